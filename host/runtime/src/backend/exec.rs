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
//! - on a plugin device through device buffers: read-only storages are
//!   uploaded once and stay resident; the writable bytes a segment touches
//!   are uploaded, computed on, and downloaded, all or nothing. If any step
//!   fails nothing is written back, the segment is re-run on the CPU, and
//!   the backend's `runtime_failures_rerun` counter goes up.
//!
//! [`HostGraph`] is the simple case: every tensor dense and owning its bytes.

use super::Backend;
use kiln_plugin_api::Desc;
use kiln_plugin_api::abi::{KILN_OP_PARAM_COUNT, KilnBuffer, KilnOp, KilnTensor};
use kiln_plugin_api::host::RawBuffer;
use kiln_plugin_api::{BackendError, DType, OpKind};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Bytes a graph computes over.
pub enum Storage<'a> {
    /// Read-only and unchanging for the executor's life (weights): a plugin
    /// device keeps its copy resident across runs.
    Read(&'a [u8]),
    /// Read-write.
    Write(&'a mut [u8]),
}

impl Storage<'_> {
    fn len(&self) -> usize {
        match self {
            Storage::Read(b) => b.len(),
            Storage::Write(b) => b.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Read(b) => b,
            Storage::Write(b) => b,
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

    fn raw(&self, buffer: KilnBuffer, base: usize) -> KilnTensor {
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
    pub storages: Vec<Storage<'a>>,
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
            if matches!(
                self.storages[self.tensors[op.dst].storage],
                Storage::Read(_)
            ) {
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

/// Frees plugin buffers when a segment ends, whatever happened.
struct Buffers<'a> {
    backend: &'a Backend,
    list: Vec<RawBuffer>,
}

impl Drop for Buffers<'_> {
    fn drop(&mut self) {
        for b in self.list.drain(..) {
            let _ = self.backend.handle().buffer_free(b);
        }
    }
}

/// Read-only storages resident on a plugin device, by (address, length).
#[derive(Default)]
struct Resident {
    buffers: HashMap<(usize, usize), RawBuffer>,
}

/// Runs `graph.ops[ops]` on one device (see the module docs).
fn run_segment(
    backend: &Backend,
    device: u32,
    graph: &mut Graph<'_>,
    ops: Range<usize>,
    resident: Option<&Mutex<Resident>>,
) -> Result<(), BackendError> {
    let spans = segment_spans(graph, &ops);
    let handle = backend.handle();
    let mut buffers = Buffers {
        backend,
        list: Vec::new(),
    };
    // Per storage: the device buffer and the storage offset it starts at.
    let mut placed: HashMap<usize, (RawBuffer, usize)> = HashMap::new();
    let _device = backend.lock_device(device);
    if backend.is_builtin() {
        for &s in spans.keys() {
            let (ptr, len) = match &mut graph.storages[s] {
                // The CPU backend never writes a source tensor, and
                // `validate` refused any op whose destination is read-only.
                Storage::Read(b) => (b.as_ptr() as *mut u8, b.len()),
                Storage::Write(b) => (b.as_mut_ptr(), b.len()),
            };
            // SAFETY: the storage outlives this call (it is borrowed by
            // `graph`), is neither moved nor resized before `buffers` drops,
            // and read-only storage is only ever read (see above).
            let b = unsafe { handle.buffer_wrap_host(device, ptr, len as u64)? };
            buffers.list.push(b);
            placed.insert(s, (b, 0));
        }
    } else {
        for (&s, (span, _)) in &spans {
            if let (Storage::Read(bytes), Some(resident)) = (&graph.storages[s], resident) {
                let key = (bytes.as_ptr() as usize, bytes.len());
                let mut r = resident.lock().unwrap_or_else(|p| p.into_inner());
                let b = match r.buffers.get(&key) {
                    Some(b) => *b,
                    None => {
                        let b = handle.buffer_alloc(device, bytes.len() as u64)?;
                        if let Err(e) = handle.buffer_write(b, 0, bytes) {
                            let _ = handle.buffer_free(b);
                            return Err(e);
                        }
                        r.buffers.insert(key, b);
                        b
                    }
                };
                placed.insert(s, (b, 0));
                continue;
            }
            let b = handle.buffer_alloc(device, span.len() as u64)?;
            buffers.list.push(b);
            handle.buffer_write(b, 0, &graph.storages[s].bytes()[span.clone()])?;
            placed.insert(s, (b, span.start));
        }
    }
    // Only the tensors this segment uses, renumbered.
    let mut local: BTreeMap<usize, u32> = BTreeMap::new();
    let mut raw_tensors = Vec::new();
    let mut index = |t: usize| -> u32 {
        *local.entry(t).or_insert_with(|| {
            let tr = &graph.tensors[t];
            let (b, base) = placed[&tr.storage];
            raw_tensors.push(tr.raw(b.0, base));
            (raw_tensors.len() - 1) as u32
        })
    };
    let raw_ops: Vec<KilnOp> = graph.ops[ops.clone()]
        .iter()
        .map(|op| op.raw(&mut index))
        .collect();
    handle.graph_compute(device, &raw_tensors, &raw_ops)?;
    handle.synchronize(device)?;
    if !backend.is_builtin() {
        // Download into scratch first so a failure leaves the graph untouched.
        let mut results = Vec::new();
        for (&s, (span, writes)) in &spans {
            if *writes {
                let mut data = vec![0u8; span.len()];
                handle.buffer_read(placed[&s].0, 0, &mut data)?;
                results.push((s, span.start, data));
            }
        }
        for (s, start, data) in results {
            if let Storage::Write(bytes) = &mut graph.storages[s] {
                bytes[start..start + data.len()].copy_from_slice(&data);
            }
        }
    }
    backend.count(&backend.stats.ops_run, ops.len() as u64);
    Ok(())
}

/// What one graph run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecReport {
    pub ops_on_target: usize,
    /// Ops the target does not support, run on the CPU.
    pub ops_unsupported_on_cpu: usize,
    /// Segments that failed on the target and were re-run on the CPU, with the error.
    pub reruns: Vec<(Range<usize>, String)>,
}

/// Runs graphs on `target`'s `device`, with the built-in CPU as the fallback.
pub struct Executor {
    pub target: Arc<Backend>,
    pub device: u32,
    pub cpu: Arc<Backend>,
    resident: Mutex<Resident>,
}

impl Executor {
    pub fn new(target: Arc<Backend>, device: u32) -> Executor {
        Executor {
            target,
            device,
            cpu: Backend::builtin_cpu(),
            resident: Mutex::default(),
        }
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

    /// Runs the whole graph on the target alone (no fallback): for the
    /// conformance gate, which must see the device's own results.
    pub fn run_on_target(&self, graph: &mut Graph<'_>) -> Result<(), BackendError> {
        graph.validate()?;
        let n = graph.ops.len();
        run_segment(&self.target, self.device, graph, 0..n, Some(&self.resident))
    }

    pub fn run(&self, graph: &mut Graph<'_>) -> Result<ExecReport, BackendError> {
        graph.validate()?;
        let plan = self.plan(graph);
        let mut report = ExecReport::default();
        let mut start = 0;
        while start < plan.len() {
            let on_target = plan[start];
            let end = (start..plan.len())
                .find(|&i| plan[i] != on_target)
                .unwrap_or(plan.len());
            let ops = start..end;
            if on_target {
                match run_segment(
                    &self.target,
                    self.device,
                    graph,
                    ops.clone(),
                    Some(&self.resident),
                ) {
                    Ok(()) => report.ops_on_target += ops.len(),
                    Err(e) => {
                        self.target
                            .count(&self.target.stats.runtime_failures_rerun, 1);
                        run_segment(&self.cpu, 0, graph, ops.clone(), None)
                            .map_err(|cpu| offset_op(cpu, ops.start))?;
                        report.reruns.push((ops, e.to_string()));
                    }
                }
            } else {
                self.target.count(
                    &self.target.stats.ops_unsupported_fallback,
                    ops.len() as u64,
                );
                run_segment(&self.cpu, 0, graph, ops.clone(), None)
                    .map_err(|e| offset_op(e, ops.start))?;
                report.ops_unsupported_on_cpu += ops.len();
            }
            start = end;
        }
        Ok(report)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let r = self.resident.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, b) in r.buffers.drain() {
            let _ = self.target.handle().buffer_free(b);
        }
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
