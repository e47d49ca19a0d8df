//! Running graphs on a device, with the CPU as the net under every op.
//!
//! A [`Graph`] computes over *storages*, byte ranges in host memory: read-
//! only ones (model weights in a memory map) and writable ones (the KV cache,
//! activations, inputs). Its tensors are views into them (offset, type,
//! extents, byte strides), so a graph can slice a KV cache or transpose a
//! head without copying.
//!
//! The [`Executor`] asks the chosen device which ops it supports, cuts the
//! graph into segments of consecutive ops that run on the same side, and
//! runs each segment:
//! - on the built-in CPU backend in place: it wraps the host memory;
//! - on a plugin device through device buffers that outlive the run. What
//!   a storage's [`Storage`] kind says decides what moves: weights are
//!   uploaded once, the KV cache (`State`) stays on the device, inputs
//!   (`Write`) are sent as the bytes that changed, activations (`Scratch`)
//!   never move but between ops on different sides, and outputs come back
//!   at the end. Every byte moved is counted in the backend's stats.
//!
//! A segment that fails on the device is re-run on the CPU when the host
//! can rebuild what it needs; otherwise the device's state is lost, the run
//! fails, and the executor runs on the CPU from then on (see [`Executor`]).
//!
//! [`HostGraph`] is the simple case: every tensor dense and owning its bytes.

use super::Backend;
use super::spans::Spans;
use kiln_plugin_api::Desc;
use kiln_plugin_api::abi::{KILN_OP_PARAM_COUNT, KilnBuffer, KilnOp, KilnTensor};
use kiln_plugin_api::host::RawBuffer;
use kiln_plugin_api::{BackendError, DType, ErrorCode, OpKind};
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes a graph computes over, and what the executor may assume about
/// them between runs (which decides what a plugin device keeps and moves).
/// Storages a [`Graph`] holds without allocating.
pub const INLINE_STORAGES: usize = 6;

pub enum Storage<'a> {
    /// Read-only and unchanging for the executor's life (weights): a plugin
    /// device keeps its copy resident across runs.
    Read(&'a [u8]),
    /// Read-write and the host's (inputs, outputs): current on the host
    /// when a run starts and when it ends. A plugin device keeps a copy and
    /// is sent only the bytes that changed since it last saw them.
    Write(&'a mut [u8]),
    /// Read-write state that lives on between runs (the KV cache): on a
    /// plugin device it stays there, and the host's copy is brought up to
    /// date only where a CPU op needs it. Graphs read only the bytes of it
    /// that earlier ops wrote (a device's copy starts undefined), and the
    /// host does not change it between runs without
    /// [`Executor::forget_state`].
    State(&'a mut [u8]),
    /// Read-write and meaningless between runs (activations): never moved
    /// at a run's start or end, only between ops on different sides.
    Scratch(&'a mut [u8]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    State,
    Scratch,
}

impl Storage<'_> {
    fn len(&self) -> usize {
        self.bytes().len()
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Read(b) => b,
            Storage::Write(b) | Storage::State(b) | Storage::Scratch(b) => b,
        }
    }

    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self {
            Storage::Read(_) => None,
            Storage::Write(b) | Storage::State(b) | Storage::Scratch(b) => Some(b),
        }
    }

    fn kind(&self) -> Option<Kind> {
        match self {
            Storage::Read(_) => None,
            Storage::Write(_) => Some(Kind::Write),
            Storage::State(_) => Some(Kind::State),
            Storage::Scratch(_) => Some(Kind::Scratch),
        }
    }
}

/// A tensor: a view into a storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorRef {
    pub storage: usize,
    /// Byte offset of element 0 in the storage.
    pub offset: usize,
    pub desc: Desc,
}

impl TensorRef {
    /// A dense tensor at `offset` in `storage`.
    pub fn dense(storage: usize, offset: usize, dtype: DType, ne: [usize; 4]) -> TensorRef {
        TensorRef {
            storage,
            offset,
            desc: Desc::contiguous(dtype, ne),
        }
    }

    /// The same bytes seen with other extents and strides.
    pub fn view(&self, ne: [usize; 4], nb: [usize; 4], byte_offset: usize) -> TensorRef {
        TensorRef {
            storage: self.storage,
            offset: self.offset + byte_offset,
            desc: Desc {
                dtype: self.desc.dtype,
                ne,
                nb,
            },
        }
    }

    /// Bytes spanned in the storage, from `offset`.
    fn span(&self) -> Option<Range<usize>> {
        let end = self.offset.checked_add(self.desc.extent()?)?;
        Some(self.offset..end)
    }

    pub(crate) fn raw(&self, buffer: KilnBuffer, base: usize) -> KilnTensor {
        KilnTensor {
            buffer,
            offset: (self.offset - base) as u64,
            dtype: self.desc.dtype.raw(),
            n_dims: 4,
            ne: self.desc.ne.map(|n| n as i64),
            nb: self.desc.nb.map(|n| n as u64),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HostOp {
    pub kind: OpKind,
    pub src: Vec<usize>,
    pub dst: usize,
    pub params: [i32; KILN_OP_PARAM_COUNT],
}

impl HostOp {
    pub fn new(kind: OpKind, src: &[usize], dst: usize) -> HostOp {
        HostOp {
            kind,
            src: src.to_vec(),
            dst,
            params: [0; KILN_OP_PARAM_COUNT],
        }
    }

    pub fn with_params(mut self, params: &[i32]) -> HostOp {
        self.params[..params.len()].copy_from_slice(params);
        self
    }

    /// The raw op, with tensor indices mapped through `index`.
    fn raw(&self, mut index: impl FnMut(usize) -> u32) -> KilnOp {
        let mut src = [0u32; 4];
        for (s, &i) in src.iter_mut().zip(&self.src) {
            *s = index(i);
        }
        KilnOp {
            kind: self.kind.raw(),
            n_src: self.src.len() as u32,
            src,
            dst: index(self.dst),
            flags: 0,
            params: self.params,
        }
    }
}

/// Storages, views into them, and the ops over the views, run in order.
#[derive(Default)]
pub struct Graph<'a> {
    /// Inline up to [`INLINE_STORAGES`] (a model's graphs have six at
    /// most), so that running a graph kept from step to step allocates
    /// nothing.
    pub storages: SmallVec<[Storage<'a>; INLINE_STORAGES]>,
    pub tensors: Vec<TensorRef>,
    pub ops: Vec<HostOp>,
}

impl<'a> Graph<'a> {
    pub fn add_storage(&mut self, s: Storage<'a>) -> usize {
        self.storages.push(s);
        self.storages.len() - 1
    }

    pub fn add_tensor(&mut self, t: TensorRef) -> usize {
        self.tensors.push(t);
        self.tensors.len() - 1
    }

    pub fn push(&mut self, op: HostOp) {
        self.ops.push(op);
    }

    fn validate(&self) -> Result<(), BackendError> {
        for (i, t) in self.tensors.iter().enumerate() {
            let ok = self
                .storages
                .get(t.storage)
                .zip(t.span())
                .is_some_and(|(s, span)| span.end <= s.len());
            if !ok {
                return Err(BackendError::invalid(format!(
                    "tensor {i} ({:?} {} at {}) does not fit its storage",
                    t.desc.ne, t.desc.dtype, t.offset
                )));
            }
        }
        for (i, op) in self.ops.iter().enumerate() {
            let at = |m: String| BackendError::invalid(m).at_op(i as u32);
            if op.src.len() > 4 {
                return Err(at(format!("op {i} has more than 4 sources")));
            }
            if op
                .src
                .iter()
                .chain([&op.dst])
                .any(|&t| t >= self.tensors.len())
            {
                return Err(at(format!("op {i} names a tensor that does not exist")));
            }
            if op.src.contains(&op.dst) {
                return Err(at(format!("op {i} writes one of its own sources")));
            }
            if self.storages[self.tensors[op.dst].storage].kind().is_none() {
                return Err(at(format!("op {i} writes into read-only storage")));
            }
        }
        Ok(())
    }
}

/// A dense tensor in host memory that owns its bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub dtype: DType,
    pub ne: [usize; 4],
    pub data: Vec<u8>,
}

impl HostTensor {
    pub fn zeros(dtype: DType, ne: [usize; 4]) -> HostTensor {
        let bytes = dtype.row_bytes(ne[0]).expect("whole blocks") * ne[1] * ne[2] * ne[3];
        HostTensor {
            dtype,
            ne,
            data: vec![0; bytes],
        }
    }

    pub fn from_f32(ne: [usize; 4], values: &[f32]) -> HostTensor {
        assert_eq!(values.len(), ne.iter().product::<usize>());
        HostTensor {
            dtype: DType::F32,
            ne,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn from_i32(ne: [usize; 4], values: &[i32]) -> HostTensor {
        assert_eq!(values.len(), ne.iter().product::<usize>());
        HostTensor {
            dtype: DType::I32,
            ne,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Every element as f32 (dequantizing block types).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.ne.iter().product()];
        let row = self.dtype.row_bytes(self.ne[0]).expect("whole blocks");
        for (dst, src) in out
            .chunks_exact_mut(self.ne[0])
            .zip(self.data.chunks_exact(row))
        {
            kiln_blocks::dequantize_row(self.dtype, src, dst);
        }
        out
    }

    /// This tensor as the ABI describes it, in `buffer` at offset 0.
    pub fn raw(&self, buffer: KilnBuffer) -> KilnTensor {
        TensorRef::dense(0, 0, self.dtype, self.ne).raw(buffer, 0)
    }
}

/// A graph whose tensors are all dense and own their bytes.
#[derive(Clone, Debug, Default)]
pub struct HostGraph {
    pub tensors: Vec<HostTensor>,
    pub ops: Vec<HostOp>,
}

impl HostGraph {
    pub fn add_tensor(&mut self, t: HostTensor) -> usize {
        self.tensors.push(t);
        self.tensors.len() - 1
    }

    /// The general form: one writable storage per tensor.
    pub fn as_graph(&mut self) -> Graph<'_> {
        let tensors = self
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| TensorRef::dense(i, 0, t.dtype, t.ne))
            .collect();
        Graph {
            storages: self
                .tensors
                .iter_mut()
                .map(|t| Storage::Write(&mut t.data))
                .collect(),
            tensors,
            ops: self.ops.clone(),
        }
    }
}

/// The byte span of each storage a segment touches, and whether it writes it.
/// A strided view counts as its whole hull: moving a few bytes too many is
/// cheap, and every byte is then current on the side that runs next.
fn segment_spans(graph: &Graph<'_>, ops: &Range<usize>) -> BTreeMap<usize, (Range<usize>, bool)> {
    let mut spans: BTreeMap<usize, (Range<usize>, bool)> = BTreeMap::new();
    for op in &graph.ops[ops.clone()] {
        for (&t, writes) in op.src.iter().map(|t| (t, false)).chain([(&op.dst, true)]) {
            let tr = &graph.tensors[t];
            let span = tr.span().expect("validated");
            let e = spans.entry(tr.storage).or_insert((span.clone(), false));
            e.0 = e.0.start.min(span.start)..e.0.end.max(span.end);
            e.1 |= writes;
        }
    }
    spans
}

/// The byte spans of the tensors that `ops` use in storage `s`, sorted,
/// with overlapping spans merged (touching ones stay apart: each can go
/// in a piece of its own).
fn tensor_spans(graph: &Graph<'_>, ops: Range<usize>, s: usize) -> Vec<Range<usize>> {
    let mut spans: Vec<Range<usize>> = graph.ops[ops]
        .iter()
        .flat_map(|op| op.src.iter().chain([&op.dst]))
        .map(|&t| &graph.tensors[t])
        .filter(|t| t.storage == s)
        .map(|t| t.span().expect("validated"))
        .collect();
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::new();
    for r in spans {
        match merged.last_mut() {
            Some(last) if r.start < last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Where a piece of a read-only storage starts: aligned down, so that a
/// tensor keeps the alignment it has in the storage.
const PIECE_ALIGN: usize = 256;

/// Packs sorted, disjoint `spans` into pieces of at most `limit` bytes,
/// each a run of whole spans; a span wider than `limit` cannot be placed.
fn pack_pieces(spans: &[Range<usize>], limit: usize) -> Result<Vec<Range<usize>>, Range<usize>> {
    let mut pieces: Vec<Range<usize>> = Vec::new();
    for r in spans {
        let start = r.start - r.start % PIECE_ALIGN;
        if r.end - start > limit {
            return Err(r.clone());
        }
        match pieces.last_mut() {
            Some(p) if r.end - p.start <= limit => p.end = r.end,
            _ => pieces.push(start..r.end),
        }
    }
    Ok(pieces)
}

/// A device buffer holding bytes `range` of a storage.
#[derive(Clone, Debug)]
struct Piece {
    range: Range<usize>,
    buffer: RawBuffer,
}

/// The raw tensors and ops of `graph.ops[ops]`, only the tensors they use,
/// renumbered; `placed` gives each storage's buffers and the bytes of the
/// storage each holds (one piece holding all of it, except read-only
/// storages wider than the device's largest buffer); every tensor lies in
/// one of its storage's pieces.
fn raw_segment(
    graph: &Graph<'_>,
    ops: &Range<usize>,
    placed: &HashMap<usize, Vec<Piece>>,
) -> (Vec<KilnTensor>, Vec<KilnOp>) {
    let mut local: BTreeMap<usize, u32> = BTreeMap::new();
    let mut raw_tensors = Vec::new();
    let mut index = |t: usize| -> u32 {
        *local.entry(t).or_insert_with(|| {
            let tr = &graph.tensors[t];
            let span = tr.span().expect("validated");
            let piece = placed[&tr.storage]
                .iter()
                .find(|p| p.range.start <= span.start && span.end <= p.range.end)
                .expect("every tensor placed");
            raw_tensors.push(tr.raw(piece.buffer.0, piece.range.start));
            (raw_tensors.len() - 1) as u32
        })
    };
    let raw_ops = graph.ops[ops.clone()]
        .iter()
        .map(|op| op.raw(&mut index))
        .collect();
    (raw_tensors, raw_ops)
}

/// What runs on a built-in CPU backend keep from one to the next, so
/// that a graph run again (a decode step) allocates nothing: each
/// storage's wrapper, reused while the storage's bytes stay where they
/// were, and the lists of raw tensors and ops handed to the backend.
#[derive(Default)]
struct HostRun {
    /// The backend the wrappers belong to.
    backend: Option<Arc<Backend>>,
    /// Per storage index: where its bytes were (address, length) and the
    /// wrapper of them.
    wrapped: Vec<Option<(usize, usize, RawBuffer)>>,
    /// Per storage index: whether the ops being run touch it.
    touched: Vec<bool>,
    /// Per graph tensor: its index in `tensors` (`u32::MAX`: not used).
    local: Vec<u32>,
    tensors: Vec<KilnTensor>,
    ops: Vec<KilnOp>,
}

impl HostRun {
    /// Frees every wrapper.
    fn release(&mut self) {
        if let Some(b) = &self.backend {
            for (_, _, w) in self.wrapped.drain(..).flatten() {
                let _ = b.handle().buffer_free(w);
            }
        }
        self.wrapped.clear();
    }

    /// Runs `graph.ops[ops]` on `backend`, in place over the host's bytes.
    fn run(
        &mut self,
        backend: &Arc<Backend>,
        graph: &mut Graph<'_>,
        ops: Range<usize>,
        threads: u32,
    ) -> Result<(), BackendError> {
        if !self
            .backend
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, backend))
        {
            self.release();
            self.backend = Some(backend.clone());
        }
        let handle = backend.handle();
        let _device = backend.lock_device(0);
        let n_storages = graph.storages.len();
        self.touched.clear();
        self.touched.resize(n_storages, false);
        for op in &graph.ops[ops.clone()] {
            for &t in op.src.iter().chain([&op.dst]) {
                self.touched[graph.tensors[t].storage] = true;
            }
        }
        self.wrapped
            .resize(n_storages.max(self.wrapped.len()), None);
        for (s, storage) in graph.storages.iter_mut().enumerate() {
            if !self.touched[s] {
                continue;
            }
            let (ptr, len) = match storage {
                // The CPU backend never writes a source tensor, and
                // `validate` refused any op whose destination is read-only.
                Storage::Read(b) => (b.as_ptr() as *mut u8, b.len()),
                other => {
                    let b = other.bytes_mut().expect("writable");
                    (b.as_mut_ptr(), b.len())
                }
            };
            if let Some((at, n, _)) = self.wrapped[s]
                && (at, n) == (ptr as usize, len)
            {
                continue;
            }
            if let Some((_, _, old)) = self.wrapped[s].take() {
                let _ = handle.buffer_free(old);
            }
            // SAFETY: a CPU wrapper is a view of the bytes, used only
            // while they are where it says: during this call, over the
            // storage `graph` borrows (neither moved nor resized in it),
            // or in a later run whose storage is at the same address with
            // the same length. Read-only storage is only read (above).
            let b = unsafe { handle.buffer_wrap_host(0, ptr, len as u64)? };
            self.wrapped[s] = Some((ptr as usize, len, b));
        }
        self.local.clear();
        self.local.resize(graph.tensors.len(), u32::MAX);
        self.tensors.clear();
        self.ops.clear();
        let HostRun {
            wrapped,
            local,
            tensors,
            ..
        } = self;
        for op in &graph.ops[ops.clone()] {
            let raw = op.raw(|t| {
                if local[t] == u32::MAX {
                    let tr = &graph.tensors[t];
                    let (_, _, buffer) = wrapped[tr.storage].expect("touched storages are wrapped");
                    tensors.push(tr.raw(buffer.0, 0));
                    local[t] = (tensors.len() - 1) as u32;
                }
                local[t]
            });
            self.ops.push(raw);
        }
        handle
            .graph_compute(0, &self.tensors, &self.ops, threads)
            .map_err(|e| offset_op(e, ops.start))?;
        handle.synchronize(0)?;
        backend.count(&backend.stats.ops_run, ops.len() as u64);
        Ok(())
    }
}

impl Drop for HostRun {
    fn drop(&mut self) {
        self.release();
    }
}

/// Upload runs closer than this are sent as one call.
const UPLOAD_GAP: usize = 256;
/// The granularity at which a `Write` storage's bytes are compared with
/// what the device holds.
const UPLOAD_CHUNK: usize = 64;

/// A writable storage's copy on a plugin device, kept between runs.
struct Slot {
    kind: Kind,
    /// The host bytes it mirrors (address, length): a `State` slot whose
    /// host bytes moved starts over.
    host: (usize, usize),
    buffer: RawBuffer,
    capacity: usize,
    /// Bytes whose latest value is on the device only.
    host_stale: Spans,
    /// Bytes whose latest value is on the host only.
    device_stale: Spans,
    /// `Write` storages: what the device holds, where `known`, so that an
    /// upload sends only the bytes that changed.
    shadow: Vec<u8>,
    known: Spans,
}

/// What a plugin device holds for one executor.
#[derive(Default)]
struct DeviceState {
    /// Read-only storages by (address, length): uploaded once, whole, or
    /// in pieces where wider than the device's largest buffer.
    resident: HashMap<(usize, usize), Vec<Piece>>,
    /// Writable storages by their index in the graph.
    slots: Vec<Option<Slot>>,
    /// Set when the executor comes back to a restarted device: the `State`
    /// slots placed next start from the host's copy (which the CPU kept
    /// current), not from nothing.
    state_from_host: bool,
}

/// Why a run on a plugin device stopped.
enum Failure {
    /// The CPU failed an op (a bad graph): nothing about the device.
    Cpu(BackendError),
    /// The device failed where the CPU cannot take over from the bytes the
    /// host has: what it held is lost.
    Lost(BackendError),
}

/// What one graph run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecReport {
    pub ops_on_target: usize,
    /// Ops the target does not support, run on the CPU.
    pub ops_unsupported_on_cpu: usize,
    /// Segments that failed on the target and were re-run on the CPU, with the error.
    pub reruns: Vec<(Range<usize>, String)>,
    /// Ops run on the CPU because the target failed earlier and lost its
    /// state ([`Executor::take_state_lost`]).
    pub ops_failed_over: usize,
}

/// Runs graphs on `target`'s `device`, with the built-in CPU as the fallback.
///
/// On a plugin device the executor keeps what the graphs leave there: read-
/// only storages stay resident, `State` stays on the device between runs,
/// `Write` storages are sent as differences, and only what a CPU op or the
/// host needs comes back. Every byte is current on at least one side; a
/// segment is moved only after the bytes it touches are current where it
/// runs. If the device fails where the host has no current copy of what
/// the segment needs, the state is lost: the run fails, the executor runs
/// on the CPU from then on, and [`Executor::take_state_lost`] says so once,
/// for the owner to rebuild its state (a session re-evaluates its tokens).
pub struct Executor {
    pub target: Arc<Backend>,
    pub device: u32,
    pub cpu: Arc<Backend>,
    state: Mutex<DeviceState>,
    failed_over: AtomicBool,
    state_lost: AtomicBool,
    /// The target's generation when it failed ([`Backend::generation`]):
    /// a plugin worker started after it may take the work back.
    lost_generation: std::sync::atomic::AtomicU64,
    upload_progress: Option<UploadProgress>,
    /// Runs on the built-in CPU (the target's, or the fallback's).
    host: Mutex<HostRun>,
    /// CPU threads its graphs may use (0: the backend's choice).
    threads: u32,
}

/// Told how the weights' upload to a device goes: (bytes sent, bytes in
/// all), after each chunk of [`WEIGHTS_CHUNK`] bytes and at the end.
pub type UploadProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Bytes of weights sent to a device per `buffer_write`.
pub const WEIGHTS_CHUNK: usize = 16 << 20;

impl Executor {
    pub fn new(target: Arc<Backend>, device: u32) -> Executor {
        Executor {
            target,
            device,
            cpu: Backend::builtin_cpu(),
            state: Mutex::default(),
            failed_over: AtomicBool::new(false),
            state_lost: AtomicBool::new(false),
            lost_generation: Default::default(),
            upload_progress: None,
            host: Mutex::default(),
            threads: 0,
        }
    }

    /// Lets this executor's graphs use `threads` CPU threads (the caller's
    /// included) of a pool of the calling thread's own, where the backend
    /// has threads (ABI 1.3); `None`: the backend's choice (on the
    /// built-in CPU, the process's shared pool).
    pub fn set_threads(&mut self, threads: Option<usize>) {
        self.threads = threads.map_or(0, |n| n.clamp(1, u32::MAX as usize) as u32);
    }

    /// Runs `graph.ops[ops]` on `backend`, a built-in CPU.
    fn run_on_host(
        &self,
        backend: &Arc<Backend>,
        graph: &mut Graph<'_>,
        ops: Range<usize>,
    ) -> Result<(), BackendError> {
        let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
        host.run(backend, graph, ops, self.threads)
    }

    /// Reports the weights' upload (once per session's weights) to `f`.
    pub fn set_upload_progress(&mut self, f: UploadProgress) {
        self.upload_progress = Some(f);
    }

    /// For each op, whether the target device runs it (asked once per op
    /// signature, see [`Backend::supports`]).
    pub fn plan(&self, graph: &Graph<'_>) -> Vec<bool> {
        if self.target.is_builtin() {
            return vec![true; graph.ops.len()];
        }
        graph
            .ops
            .iter()
            .map(|op| {
                let mut tensors = Vec::new();
                let raw = op.raw(|t| {
                    tensors
                        .push(graph.tensors[t].raw(std::ptr::null_mut(), graph.tensors[t].offset));
                    (tensors.len() - 1) as u32
                });
                let signature = super::OpSignature {
                    kind: raw.kind,
                    params: raw.params,
                    tensors: tensors.iter().map(|t| (t.dtype, t.ne, t.nb)).collect(),
                };
                self.target.supports(self.device, signature, || {
                    self.target
                        .handle()
                        .supports_op(self.device, &raw, &tensors)
                        .unwrap_or(false)
                })
            })
            .collect()
    }

    /// Whether the target failed and this executor now runs on the CPU.
    pub fn failed_over(&self) -> bool {
        self.failed_over.load(Ordering::Relaxed)
    }

    /// True once after a run failed because the device lost the `State`
    /// it held: the host's copy is not current, and the owner must compute
    /// it again (the executor runs on the CPU from then on).
    pub fn take_state_lost(&self) -> bool {
        self.state_lost.swap(false, Ordering::Relaxed)
    }

    /// The host changed its copy of `State` storage `index` (or wants the
    /// device's forgotten): the next run sends it again.
    pub fn forget_state(&self, index: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(slot)) = st.slots.get_mut(index) {
            slot.host_stale.clear();
            slot.device_stale = Spans::all(slot.host.1);
        }
    }

    /// Runs the whole graph on the target alone (no fallback): for the
    /// conformance gate, which must see the device's own results.
    pub fn run_on_target(&self, graph: &mut Graph<'_>) -> Result<(), BackendError> {
        graph.validate()?;
        if self.target.is_builtin() {
            return self.run_on_host(&self.target, graph, 0..graph.ops.len());
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let plan = vec![true; graph.ops.len()];
        match self.run_planned(&mut st, graph, &plan, false) {
            Ok(_) => Ok(()),
            Err(Failure::Cpu(e) | Failure::Lost(e)) => {
                self.release(&mut st);
                Err(e)
            }
        }
    }

    pub fn run(&self, graph: &mut Graph<'_>) -> Result<ExecReport, BackendError> {
        graph.validate()?;
        let n = graph.ops.len();
        if self.target.is_builtin() {
            self.run_on_host(&self.target, graph, 0..n)?;
            return Ok(ExecReport {
                ops_on_target: n,
                ..ExecReport::default()
            });
        }
        if self.failed_over() && !self.fail_back() {
            self.run_on_host(&self.cpu, graph, 0..n)?;
            return Ok(ExecReport {
                ops_failed_over: n,
                ..ExecReport::default()
            });
        }
        // A plugin's worker that died since the last run took what this
        // executor kept there: the state is lost.
        if self
            .target
            .handle()
            .worker()
            .is_some_and(|w| !w.is_running())
        {
            return Err(self.device_fault("lost its worker process"));
        }
        let plan = self.plan(graph);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match self.run_planned(&mut st, graph, &plan, true) {
            Ok(report) => Ok(report),
            Err(Failure::Cpu(e)) => Err(e),
            Err(Failure::Lost(e)) => {
                Err(self.fail_over(&mut st, &format!("failed and lost the state it held: {e}")))
            }
        }
    }

    /// The owner found the device's results wrong (`why`: non-finite
    /// logits): the device is treated as lost, as if it had failed (a
    /// plugin's worker is killed and counted as crashed), and the error
    /// to recover from is returned: the state is lost, the CPU runs from
    /// now on.
    pub fn device_fault(&self, why: &str) -> BackendError {
        if let Some(w) = self.target.handle().worker() {
            w.condemn("graph_compute", why);
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.fail_over(&mut st, why)
    }

    /// The device's state is lost (`what` happened): frees what is left
    /// there, runs on the CPU from now on, and tells the owner once
    /// ([`Self::take_state_lost`]); the error says so.
    fn fail_over(&self, st: &mut DeviceState, what: &str) -> BackendError {
        self.release(st);
        self.lost_generation
            .store(self.target.generation(), Ordering::Relaxed);
        self.failed_over.store(true, Ordering::Relaxed);
        self.state_lost.store(true, Ordering::Relaxed);
        self.target.count(&self.target.stats.device_losses, 1);
        let name = &self.target.devices[self.device as usize].name;
        BackendError::new(
            ErrorCode::Device,
            format!(
                "{} device {} ({name}) {what}; running on the CPU from now on",
                self.target.name(),
                self.device
            ),
        )
    }

    /// After a failover: whether the target came back (a plugin's worker
    /// restarted after the crash, see [`Backend::revive`]); if so the
    /// executor runs there again, uploading the weights anew and the
    /// `State` from the host's copy. A device that failed in-process stays
    /// failed.
    fn fail_back(&self) -> bool {
        if self.target.handle().worker().is_none() || !self.target.revive() {
            return false;
        }
        if self.target.generation() <= self.lost_generation.load(Ordering::Relaxed) {
            return false;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // What the dead worker held died with it: forget it unfreed.
        *st = DeviceState {
            state_from_host: true,
            ..DeviceState::default()
        };
        self.failed_over.store(false, Ordering::Relaxed);
        true
    }

    fn run_planned(
        &self,
        st: &mut DeviceState,
        graph: &mut Graph<'_>,
        plan: &[bool],
        fallback: bool,
    ) -> Result<ExecReport, Failure> {
        if plan.iter().any(|&on| on) {
            self.begin(st, graph).map_err(Failure::Lost)?;
        }
        let mut report = ExecReport::default();
        let mut start = 0;
        while start < plan.len() {
            let on_target = plan[start];
            let end = (start..plan.len())
                .find(|&i| plan[i] != on_target)
                .unwrap_or(plan.len());
            let ops = start..end;
            let spans = segment_spans(graph, &ops);
            if on_target {
                // The CPU can take over only where the host can bring back
                // every byte the segment needs as it was before it ran.
                let recoverable = spans.iter().all(|(&s, (span, writes))| {
                    !writes
                        || st.slots[s]
                            .as_ref()
                            .is_none_or(|slot| slot.host_stale.overlapping(span).is_empty())
                });
                match self.device_segment(st, graph, &ops, &spans) {
                    Ok(()) => report.ops_on_target += ops.len(),
                    Err(e) if !fallback || !recoverable => return Err(Failure::Lost(e)),
                    Err(e) => {
                        self.target
                            .count(&self.target.stats.runtime_failures_rerun, 1);
                        self.host_segment(st, graph, &ops, &spans)?;
                        report.reruns.push((ops.clone(), e.to_string()));
                    }
                }
            } else {
                self.target.count(
                    &self.target.stats.ops_unsupported_fallback,
                    ops.len() as u64,
                );
                self.host_segment(st, graph, &ops, &spans)?;
                report.ops_unsupported_on_cpu += ops.len();
            }
            start = end;
        }
        // `Write` storages are the host's at the end of a run.
        for (s, slot) in st.slots.iter_mut().enumerate() {
            if let Some(slot) = slot.as_mut().filter(|s| s.kind == Kind::Write) {
                let host = graph.storages[s].bytes_mut().expect("writable");
                for r in std::mem::take(&mut slot.host_stale).iter() {
                    self.fetch(slot, host, r.clone()).map_err(Failure::Lost)?;
                }
            }
        }
        Ok(report)
    }

    /// Matches the device's slots to the graph's writable storages, and
    /// marks what a run start makes stale (see [`Storage`]).
    fn begin(&self, st: &mut DeviceState, graph: &Graph<'_>) -> Result<(), BackendError> {
        st.slots.resize_with(graph.storages.len(), || None);
        for (i, storage) in graph.storages.iter().enumerate() {
            let Some(kind) = storage.kind() else {
                if let Some(slot) = st.slots[i].take() {
                    let _ = self.target.handle().buffer_free(slot.buffer);
                }
                continue;
            };
            let host = (storage.bytes().as_ptr() as usize, storage.len());
            let fits = st.slots[i].as_ref().is_some_and(|slot| {
                slot.kind == kind
                    && if kind == Kind::State {
                        slot.host == host
                    } else {
                        slot.capacity >= host.1
                    }
            });
            if !fits {
                if let Some(slot) = st.slots[i].take() {
                    let _ = self.target.handle().buffer_free(slot.buffer);
                }
                let buffer = self
                    .target
                    .handle()
                    .buffer_alloc(self.device, host.1.max(1) as u64)?;
                st.slots[i] = Some(Slot {
                    kind,
                    host,
                    buffer,
                    capacity: host.1,
                    host_stale: Spans::default(),
                    // `Write` is marked below; a new `State` buffer holds
                    // nothing the graphs read (they read only what they
                    // wrote), unless the host's copy is what holds it.
                    device_stale: if kind == Kind::State && st.state_from_host {
                        Spans::all(host.1)
                    } else {
                        Spans::default()
                    },
                    shadow: Vec::new(),
                    known: Spans::default(),
                });
            }
            let slot = st.slots[i].as_mut().expect("placed above");
            match kind {
                Kind::State => {}
                Kind::Write => {
                    if slot.host.1 != host.1 {
                        slot.known.clear();
                    }
                    slot.host_stale.clear();
                    slot.device_stale = Spans::all(host.1);
                }
                Kind::Scratch => {
                    slot.host_stale.clear();
                    slot.device_stale.clear();
                }
            }
            slot.host = host;
        }
        st.state_from_host = false;
        Ok(())
    }

    /// Runs a segment on the target: brings what it touches up to date
    /// there, computes, and marks what it wrote as newer on the device.
    fn device_segment(
        &self,
        st: &mut DeviceState,
        graph: &mut Graph<'_>,
        ops: &Range<usize>,
        spans: &BTreeMap<usize, (Range<usize>, bool)>,
    ) -> Result<(), BackendError> {
        let handle = self.target.handle();
        let mut placed = HashMap::new();
        for (&s, (span, _)) in spans {
            if let Storage::Read(_) = &graph.storages[s] {
                placed.insert(s, self.place_read(st, graph, ops, s, span)?);
                continue;
            }
            let slot = st.slots[s].as_mut().expect("made at the run's start");
            let host = graph.storages[s].bytes();
            for r in slot.device_stale.overlapping(span) {
                self.update(slot, host, r.clone())?;
                slot.device_stale.remove(r);
            }
            placed.insert(
                s,
                vec![Piece {
                    range: 0..host.len(),
                    buffer: slot.buffer,
                }],
            );
        }
        // From here the device's copy of what the segment writes is in
        // flux: good again only if the segment succeeds.
        for (&s, (span, writes)) in spans {
            if let (true, Some(slot)) = (*writes, st.slots[s].as_mut()) {
                slot.device_stale.insert(span.clone());
                slot.known.remove(span.clone());
            }
        }
        let (tensors, raw_ops) = raw_segment(graph, ops, &placed);
        {
            let _device = self.target.lock_device(self.device);
            handle
                .graph_compute(self.device, &tensors, &raw_ops, self.threads)
                .map_err(|e| offset_op(e, ops.start))?;
            handle.synchronize(self.device)?;
        }
        for (&s, (span, writes)) in spans {
            if let (true, Some(slot)) = (*writes, st.slots[s].as_mut()) {
                slot.device_stale.remove(span.clone());
                slot.host_stale.insert(span.clone());
            }
        }
        self.target
            .count(&self.target.stats.ops_run, ops.len() as u64);
        Ok(())
    }

    /// Runs a segment on the CPU: brings what it touches up to date on the
    /// host first, then marks what it wrote as newer there.
    fn host_segment(
        &self,
        st: &mut DeviceState,
        graph: &mut Graph<'_>,
        ops: &Range<usize>,
        spans: &BTreeMap<usize, (Range<usize>, bool)>,
    ) -> Result<(), Failure> {
        for (&s, (span, writes)) in spans {
            let Some(slot) = st.slots.get_mut(s).and_then(Option::as_mut) else {
                continue;
            };
            let host = graph.storages[s].bytes_mut().expect("writable");
            for r in slot.host_stale.overlapping(span) {
                self.fetch(slot, host, r.clone()).map_err(Failure::Lost)?;
                slot.host_stale.remove(r);
            }
            if *writes {
                slot.device_stale.insert(span.clone());
            }
        }
        self.run_on_host(&self.cpu, graph, ops.clone())
            .map_err(Failure::Cpu)
    }

    /// Brings `slot`'s device copy of `range` up to date from `host`; for a
    /// `Write` slot, only the chunks that differ from what it holds.
    fn update(
        &self,
        slot: &mut Slot,
        host: &[u8],
        range: Range<usize>,
    ) -> Result<(), BackendError> {
        if slot.kind != Kind::Write {
            return self.send(slot.buffer, range.start, &host[range]);
        }
        if slot.shadow.len() < host.len() {
            slot.shadow.resize(host.len(), 0);
        }
        // The first time, all of it: later runs then send only what
        // changed, wherever their views reach.
        let range = if slot.known.is_empty() {
            0..host.len()
        } else {
            range
        };
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut push = |r: Range<usize>| match runs.last_mut() {
            Some(last) if r.start <= last.end + UPLOAD_GAP => last.end = r.end,
            _ => runs.push(r),
        };
        let mut at = range.start;
        for k in slot.known.overlapping(&range) {
            if at < k.start {
                push(at..k.start);
            }
            let mut c = k.start;
            while c < k.end {
                let e = (c + UPLOAD_CHUNK).min(k.end);
                if host[c..e] != slot.shadow[c..e] {
                    push(c..e);
                }
                c = e;
            }
            at = k.end;
        }
        if at < range.end {
            push(at..range.end);
        }
        for r in runs {
            self.send(slot.buffer, r.start, &host[r.clone()])?;
            slot.shadow[r.clone()].copy_from_slice(&host[r]);
        }
        slot.known.insert(range);
        Ok(())
    }

    /// Copies `slot`'s device bytes of `range` into `host`.
    fn fetch(
        &self,
        slot: &mut Slot,
        host: &mut [u8],
        range: Range<usize>,
    ) -> Result<(), BackendError> {
        self.target.handle().buffer_read(
            slot.buffer,
            range.start as u64,
            &mut host[range.clone()],
        )?;
        self.target
            .count(&self.target.stats.bytes_from_device, range.len() as u64);
        if slot.kind == Kind::Write && slot.shadow.len() >= range.end {
            slot.shadow[range.clone()].copy_from_slice(&host[range.clone()]);
            slot.known.insert(range);
        }
        Ok(())
    }

    fn send(&self, buffer: RawBuffer, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        self.target
            .handle()
            .buffer_write(buffer, offset as u64, data)?;
        self.target
            .count(&self.target.stats.bytes_to_device, data.len() as u64);
        Ok(())
    }

    /// The pieces of read-only storage `s` on the device, uploading what
    /// the segment `ops` needs and the device does not hold yet: the whole
    /// storage, or, where it is wider than the device's largest buffer
    /// (`max_buffer_size`), runs of whole tensors of the graph packed into
    /// buffers that size (a tensor no buffer can hold is an error). `hull`
    /// spans every byte of `s` the segment touches.
    fn place_read(
        &self,
        st: &mut DeviceState,
        graph: &Graph<'_>,
        ops: &Range<usize>,
        s: usize,
        hull: &Range<usize>,
    ) -> Result<Vec<Piece>, BackendError> {
        let bytes = graph.storages[s].bytes();
        let key = (bytes.as_ptr() as usize, bytes.len());
        let limit = self.target.devices[self.device as usize].max_buffer_size;
        let held = st.resident.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        // Every step after the first, where one buffer holds it all.
        if held
            .iter()
            .any(|p| p.range.start <= hull.start && hull.end <= p.range.end)
        {
            return Ok(held.to_vec());
        }
        let missing = |spans: Vec<Range<usize>>| -> Vec<Range<usize>> {
            spans
                .into_iter()
                .filter(|r| {
                    !held
                        .iter()
                        .any(|p| p.range.start <= r.start && r.end <= p.range.end)
                })
                .collect()
        };
        if missing(tensor_spans(graph, ops.clone(), s)).is_empty() {
            return Ok(held.to_vec());
        }
        let ranges = if limit == 0 || bytes.len() as u64 <= limit {
            std::iter::once(0..bytes.len()).collect()
        } else {
            // Place every tensor of the graph now, not only the segment's:
            // the weights go up once, in as few buffers as fit.
            let spans = missing(tensor_spans(graph, 0..graph.ops.len(), s));
            pack_pieces(&spans, limit as usize).map_err(|r| {
                BackendError::new(
                    ErrorCode::OutOfMemory,
                    format!(
                        "a tensor of {} bytes is wider than the largest buffer {} device {} \
                         allocates ({limit} bytes)",
                        r.len(),
                        self.target.name(),
                        self.device
                    ),
                )
            })?
        };
        let handle = self.target.handle();
        let total: usize = ranges.iter().map(|r| r.len()).sum();
        let mut sent = 0;
        for range in ranges {
            let b = handle.buffer_alloc(self.device, range.len().max(1) as u64)?;
            if let Err(e) = self.upload(b, &bytes[range.clone()], sent, total) {
                let _ = handle.buffer_free(b);
                return Err(e);
            }
            sent += range.len();
            st.resident
                .entry(key)
                .or_default()
                .push(Piece { range, buffer: b });
        }
        Ok(st.resident[&key].clone())
    }

    /// Sends read-only bytes (the weights) in chunks, reporting progress
    /// as `before` bytes sent out of `total` plus this call's.
    fn upload(
        &self,
        buffer: RawBuffer,
        bytes: &[u8],
        before: usize,
        total: usize,
    ) -> Result<(), BackendError> {
        for (i, chunk) in bytes.chunks(WEIGHTS_CHUNK).enumerate() {
            self.send(buffer, i * WEIGHTS_CHUNK, chunk)?;
            if let Some(f) = &self.upload_progress {
                f(
                    (before + i * WEIGHTS_CHUNK + chunk.len()) as u64,
                    total as u64,
                );
            }
        }
        Ok(())
    }

    /// Frees everything the executor holds on the device.
    fn release(&self, st: &mut DeviceState) {
        let handle = self.target.handle();
        for piece in st.resident.drain().flat_map(|(_, pieces)| pieces) {
            let _ = handle.buffer_free(piece.buffer);
        }
        for slot in st.slots.drain(..).flatten() {
            let _ = handle.buffer_free(slot.buffer);
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let mut st = std::mem::take(self.state.get_mut().unwrap_or_else(|p| p.into_inner()));
        self.release(&mut st);
    }
}

/// Maps a segment-local op index back to the graph's.
fn offset_op(mut e: BackendError, start: usize) -> BackendError {
    e.op_index = e.op_index.map(|i| i + start as u32);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_plugin_api::types::f32_param;

    fn cpu_exec() -> Executor {
        Executor::new(Backend::builtin_cpu(), 0)
    }

    #[test]
    fn read_only_storage_is_packed_into_pieces_of_whole_tensors() {
        // Touching spans stay apart, so they can go in different pieces.
        let g_spans = [0..300, 300..700, 700..900, 1000..1100];
        assert_eq!(
            pack_pieces(&g_spans, 1000),
            Ok(vec![0..900, 768..1100]),
            "a piece starts aligned down, and holds whole spans"
        );
        assert_eq!(
            pack_pieces(&g_spans, 4096),
            Ok(std::iter::once(0..1100).collect())
        );
        assert_eq!(pack_pieces(&g_spans, 350), Err(300..700));
    }

    #[test]
    fn cpu_runs_a_small_graph_in_place() {
        let mut g = HostGraph::default();
        let a = g.add_tensor(HostTensor::from_f32([4, 1, 1, 1], &[1., 2., 3., 4.]));
        let b = g.add_tensor(HostTensor::from_f32([4, 1, 1, 1], &[1., 1., 1., 1.]));
        let s = g.add_tensor(HostTensor::zeros(DType::F32, [4, 1, 1, 1]));
        let y = g.add_tensor(HostTensor::zeros(DType::F32, [4, 1, 1, 1]));
        g.ops.push(HostOp::new(OpKind::Add, &[a, b], s));
        g.ops
            .push(HostOp::new(OpKind::Scale, &[s], y).with_params(&[f32_param(0.5)]));
        let report = cpu_exec().run(&mut g.as_graph()).unwrap();
        assert_eq!(report.ops_on_target, 2);
        assert_eq!(g.tensors[y].to_f32(), vec![1.0, 1.5, 2.0, 2.5]);
    }

    #[test]
    fn views_into_shared_storage_and_read_only_weights() {
        // Weights [2 x 2] read-only; one writable arena holds x, a
        // transposed view of it, and the result.
        let weights: Vec<u8> = [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut arena = vec![0u8; 64];
        arena[..16].copy_from_slice(
            &[1f32, 0., 0., 1.]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>(),
        );
        let mut g = Graph::default();
        let ws = g.add_storage(Storage::Read(&weights));
        let ar = g.add_storage(Storage::Write(&mut arena));
        let w = g.add_tensor(TensorRef::dense(ws, 0, DType::F32, [2, 2, 1, 1]));
        let x = g.add_tensor(TensorRef::dense(ar, 0, DType::F32, [2, 2, 1, 1]));
        let y = g.add_tensor(TensorRef::dense(ar, 16, DType::F32, [2, 2, 1, 1]));
        // The transpose of y, copied densely after it.
        let yt = g.add_tensor(g.tensors[y].view([2, 2, 1, 1], [8, 4, 16, 16], 0));
        let out = g.add_tensor(TensorRef::dense(ar, 32, DType::F32, [2, 2, 1, 1]));
        g.push(HostOp::new(OpKind::MulMat, &[w, x], y));
        g.push(HostOp::new(OpKind::Cpy, &[yt], out));
        cpu_exec().run(&mut g).unwrap();
        drop(g);
        let f: Vec<f32> = arena
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // y[n, m] = sum_k w[k, n] x[k, m] with x = I: y = w's rows as columns.
        assert_eq!(&f[4..8], &[1., 3., 2., 4.]);
        assert_eq!(&f[8..12], &[1., 2., 3., 4.]);
    }

    #[test]
    fn malformed_graphs_are_refused_before_running() {
        let exec = cpu_exec();
        let mut g = HostGraph::default();
        let a = g.add_tensor(HostTensor::from_f32([2, 1, 1, 1], &[1., 2.]));
        g.ops.push(HostOp::new(OpKind::Silu, &[a], a));
        let err = exec.run(&mut g.as_graph()).unwrap_err();
        assert!(
            err.message.contains("writes one of its own sources"),
            "{err}"
        );
        g.ops[0] = HostOp::new(OpKind::Silu, &[a], 7);
        assert!(exec.run(&mut g.as_graph()).is_err());
        let weights = [0u8; 8];
        let mut g = Graph::default();
        let s = g.add_storage(Storage::Read(&weights));
        let x = g.add_tensor(TensorRef::dense(s, 0, DType::F32, [2, 1, 1, 1]));
        let y = g.add_tensor(TensorRef::dense(s, 0, DType::F32, [2, 1, 1, 1]));
        g.push(HostOp::new(OpKind::Silu, &[x], y));
        let err = exec.run(&mut g).unwrap_err();
        assert!(err.message.contains("read-only"), "{err}");
        let too_big = g.add_tensor(TensorRef::dense(s, 4, DType::F32, [2, 1, 1, 1]));
        g.ops[0] = HostOp::new(OpKind::Silu, &[too_big], y);
        assert!(
            exec.run(&mut g)
                .unwrap_err()
                .message
                .contains("does not fit")
        );
    }

    #[test]
    fn an_error_from_the_cpu_names_the_op() {
        let mut g = HostGraph::default();
        let a = g.add_tensor(HostTensor::from_f32([2, 1, 1, 1], &[1., 2.]));
        let b = g.add_tensor(HostTensor::zeros(DType::F32, [3, 1, 1, 1]));
        g.ops.push(HostOp::new(OpKind::Silu, &[a], b));
        let err = cpu_exec().run(&mut g.as_graph()).unwrap_err();
        assert_eq!(err.op_index, Some(0));
        assert!(err.message.contains("shape"), "{err}");
    }
}
