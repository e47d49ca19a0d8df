//! Writing a backend in Rust: implement [`Backend`] and call
//! [`export_backend!`](crate::export_backend). The glue here turns the raw
//! table calls into trait calls, validates what the host passes, and catches
//! every panic so that none crosses the C boundary: a panic becomes a
//! `KILN_STATUS_PANIC` error carrying the panic message.

use crate::abi::*;
use crate::layout::KILN_LAYOUT_FINGERPRINT;
use crate::types::*;
use core::ffi::{CStr, c_char, c_void};
use core::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A device as a backend describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub kind: DeviceKind,
    pub name: String,
    pub total_memory: u64,
    pub free_memory: u64,
    /// `KILN_CAP_*` bits.
    pub capabilities: u64,
    pub max_buffer_size: u64,
    pub buffer_alignment: u32,
    /// Stable identity; all zero when unknown.
    pub uuid: [u8; 16],
}

impl DeviceInfo {
    /// Fills a raw struct with every field (the caller truncates to the
    /// size the other side knows).
    pub fn to_raw(&self) -> KilnDeviceInfo {
        let mut raw = KilnDeviceInfo {
            struct_size: core::mem::size_of::<KilnDeviceInfo>() as u32,
            kind: self.kind.raw(),
            name: [0; KILN_DEVICE_NAME_CAPACITY],
            total_memory: self.total_memory,
            free_memory: self.free_memory,
            capabilities: self.capabilities,
            max_buffer_size: self.max_buffer_size,
            buffer_alignment: self.buffer_alignment,
            reserved0: 0,
            uuid: self.uuid,
        };
        write_c_string(&mut raw.name, &self.name);
        raw
    }
}

/// The host's services, as a plugin sees them. Copy it freely; every method
/// is thread-safe by the ABI's contract.
#[derive(Clone, Copy)]
pub struct HostServices {
    ctx: *mut c_void,
    log: Option<KilnLogFn>,
    report_error: Option<KilnReportErrorFn>,
    abi_minor: u16,
}

// SAFETY: the ABI requires the host's services to be callable from any
// thread; the context pointer is only ever handed back to those services.
unsafe impl Send for HostServices {}
// SAFETY: as above.
unsafe impl Sync for HostServices {}

impl HostServices {
    /// Services that drop everything; for tests and for hosts that pass none.
    pub fn none() -> Self {
        HostServices {
            ctx: core::ptr::null_mut(),
            log: None,
            report_error: None,
            abi_minor: KILN_ABI_VERSION_MINOR,
        }
    }

    /// The host's ABI minor version: fields it added later are absent below it.
    pub fn abi_minor(&self) -> u16 {
        self.abi_minor
    }

    pub fn log(&self, level: i32, message: &str) {
        if let Some(log) = self.log {
            // SAFETY: `log` and `ctx` come from the host's `KilnHostApi`, and
            // the message pointer and length describe a live `&str`.
            unsafe { log(self.ctx, level, message.as_ptr().cast(), message.len()) }
        }
    }

    pub fn report_error(&self, code: ErrorCode, message: &str) {
        if let Some(report) = self.report_error {
            // SAFETY: as in `log`.
            unsafe {
                report(
                    self.ctx,
                    code.status(),
                    message.as_ptr().cast(),
                    message.len(),
                )
            }
        }
    }
}

/// A tensor as the host described it, validated.
pub struct Tensor<'a, B> {
    /// `None` in `supports_op` queries.
    pub buffer: Option<&'a B>,
    pub offset: u64,
    pub dtype: DType,
    pub n_dims: u32,
    pub ne: [i64; KILN_MAX_DIMS],
    pub nb: [u64; KILN_MAX_DIMS],
}

impl<B> Tensor<'_, B> {
    pub fn n_elements(&self) -> i64 {
        self.ne.iter().product()
    }

    /// Whether the elements are densely packed in dimension order.
    pub fn is_contiguous(&self) -> bool {
        let row = self.dtype.row_bytes(self.ne[0] as usize);
        let Some(row) = row else { return false };
        self.nb[0] == self.dtype.block_bytes() as u64
            && self.nb[1] == row as u64
            && self.nb[2] == self.nb[1] * self.ne[1] as u64
            && self.nb[3] == self.nb[2] * self.ne[2] as u64
    }
}

/// The tensors of a graph or of a `supports_op` query.
pub struct Tensors<'a, B> {
    raw: &'a [KilnTensor],
    _buffers: PhantomData<&'a B>,
}

impl<'a, B> Tensors<'a, B> {
    /// The same tensors for a backend whose buffers are `C`: for a backend
    /// that wraps another and hands it the inner buffers.
    ///
    /// # Safety
    /// Every buffer handle must point to a `B` that begins with a `C`: a
    /// `#[repr(C)]` struct whose first field is the `C`.
    pub unsafe fn cast<C>(&self) -> Tensors<'a, C> {
        Tensors {
            raw: self.raw,
            _buffers: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Tensor `index`, checked: a known type, 1–4 dimensions, positive
    /// extents.
    pub fn get(&self, index: u32) -> Result<Tensor<'a, B>, BackendError> {
        let raw = self.raw.get(index as usize).ok_or_else(|| {
            BackendError::invalid(format!(
                "tensor index {index} out of range ({} tensors)",
                self.raw.len()
            ))
        })?;
        let dtype = DType::from_raw(raw.dtype).ok_or_else(|| {
            BackendError::unsupported(format!("tensor {index}: unknown dtype {}", raw.dtype))
        })?;
        if raw.n_dims == 0 || raw.n_dims as usize > KILN_MAX_DIMS {
            return Err(BackendError::invalid(format!(
                "tensor {index}: n_dims {} is not in 1..=4",
                raw.n_dims
            )));
        }
        if let Some(d) = raw.ne.iter().position(|&n| n < 1) {
            return Err(BackendError::invalid(format!(
                "tensor {index}: ne[{d}] = {} must be at least 1",
                raw.ne[d]
            )));
        }
        let buffer = if raw.buffer.is_null() {
            None
        } else {
            // SAFETY: the host only passes buffer handles that this plugin's
            // `buffer_alloc`/`buffer_wrap_host` returned and has not freed,
            // and those are `Box<B>` pointers made by this glue.
            Some(unsafe { &*(raw.buffer as *const B) })
        };
        Ok(Tensor {
            buffer,
            offset: raw.offset,
            dtype,
            n_dims: raw.n_dims,
            ne: raw.ne,
            nb: raw.nb,
        })
    }
}

/// One op, validated.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub kind: OpKind,
    n_src: u32,
    src: [u32; KILN_MAX_SRC],
    pub dst: u32,
    pub params: [i32; KILN_OP_PARAM_COUNT],
}

impl Op {
    fn from_raw(raw: &KilnOp, n_tensors: usize) -> Result<Op, BackendError> {
        let kind = OpKind::from_raw(raw.kind)
            .ok_or_else(|| BackendError::unsupported(format!("unknown op kind {}", raw.kind)))?;
        if raw.n_src as usize > KILN_MAX_SRC {
            return Err(BackendError::invalid(format!(
                "{kind}: n_src {} exceeds {KILN_MAX_SRC}",
                raw.n_src
            )));
        }
        if raw.flags != 0 {
            return Err(BackendError::unsupported(format!(
                "{kind}: unknown flags {:#x}",
                raw.flags
            )));
        }
        let srcs = &raw.src[..raw.n_src as usize];
        if let Some(bad) = srcs
            .iter()
            .chain([&raw.dst])
            .find(|&&i| i as usize >= n_tensors)
        {
            return Err(BackendError::invalid(format!(
                "{kind}: tensor index {bad} out of range ({n_tensors} tensors)"
            )));
        }
        Ok(Op {
            kind,
            n_src: raw.n_src,
            src: raw.src,
            dst: raw.dst,
            params: raw.params,
        })
    }

    pub fn srcs(&self) -> &[u32] {
        &self.src[..self.n_src as usize]
    }
}

/// A graph handed to `graph_compute`.
pub struct Graph<'a, B> {
    pub tensors: Tensors<'a, B>,
    ops: &'a [KilnOp],
    /// CPU threads the host lets this graph use (ABI 1.3's
    /// `KilnGraph.threads`; 0: the backend's choice).
    pub threads: u32,
}

impl<'a, B> Graph<'a, B> {
    /// The same graph for a backend whose buffers are `C` (see
    /// [`Tensors::cast`]).
    ///
    /// # Safety
    /// As for [`Tensors::cast`].
    pub unsafe fn cast<C>(&self) -> Graph<'a, C> {
        Graph {
            // SAFETY: the caller's promise.
            tensors: unsafe { self.tensors.cast() },
            ops: self.ops,
            threads: self.threads,
        }
    }

    pub fn n_ops(&self) -> u32 {
        self.ops.len() as u32
    }

    pub fn op(&self, index: u32) -> Result<Op, BackendError> {
        let raw = self
            .ops
            .get(index as usize)
            .ok_or_else(|| BackendError::invalid(format!("op index {index} out of range")))?;
        Op::from_raw(raw, self.tensors.len()).map_err(|e| e.at_op(index))
    }
}

/// A compute backend written in Rust.
///
/// Threading: the host may call any method from any thread; it serialises
/// `graph_compute` and `synchronize` per device and never frees a buffer
/// while another call uses it (see `docs/abi.md`).
pub trait Backend: Send + Sync + Sized + 'static {
    type Buffer: Send + Sync + 'static;

    const NAME: &'static CStr;
    const VERSION: &'static CStr;

    /// Called once, from `kiln_backend_init`.
    fn new(host: HostServices) -> Result<Self, BackendError>;

    fn device_count(&self) -> u32;
    fn device_info(&self, device: u32) -> Result<DeviceInfo, BackendError>;

    /// Current (free, total) memory of a device.
    fn device_memory(&self, device: u32) -> Result<(u64, u64), BackendError> {
        let info = self.device_info(device)?;
        Ok((info.free_memory, info.total_memory))
    }

    /// The layout `device` wants matrix weights of `dtype` in (ABI 1.2):
    /// a kiln layout such as [`DType::Q5_0X16`] that the host repacks them
    /// into at load time, or `dtype` itself (the default).
    fn weight_layout(&self, device: u32, dtype: DType) -> DType {
        let _ = device;
        dtype
    }

    fn buffer_alloc(&self, device: u32, size: u64) -> Result<Self::Buffer, BackendError>;

    /// Wraps host memory as a buffer without copying.
    ///
    /// # Safety
    /// `ptr` is valid for reads and writes of `size` bytes until the buffer
    /// is freed (the host guarantees this).
    unsafe fn buffer_wrap_host(
        &self,
        device: u32,
        ptr: *mut u8,
        size: u64,
    ) -> Result<Self::Buffer, BackendError> {
        let _ = (device, ptr, size);
        Err(BackendError::unsupported(
            "this backend cannot wrap host memory",
        ))
    }

    fn buffer_write(
        &self,
        buffer: &Self::Buffer,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError>;
    fn buffer_read(
        &self,
        buffer: &Self::Buffer,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), BackendError>;
    fn buffer_copy(
        &self,
        src: &Self::Buffer,
        src_offset: u64,
        dst: &Self::Buffer,
        dst_offset: u64,
        size: u64,
    ) -> Result<(), BackendError>;

    /// Whether `op` with these tensor descriptions (buffers are null) can run.
    fn supports_op(&self, device: u32, op: &Op, tensors: &Tensors<'_, Self::Buffer>) -> bool;

    /// Runs every op of the graph in order. Errors carry the op's index.
    fn graph_compute(
        &self,
        device: u32,
        graph: &Graph<'_, Self::Buffer>,
    ) -> Result<(), BackendError>;

    fn synchronize(&self, device: u32) -> Result<(), BackendError> {
        let _ = device;
        Ok(())
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

/// Runs `f`, turning its error or panic into a status and a filled `err`.
fn guard(err: *mut KilnError, f: impl FnOnce() -> Result<(), BackendError>) -> i32 {
    let failure = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return KILN_STATUS_OK,
        Ok(Err(e)) => e,
        Err(payload) => BackendError::new(
            ErrorCode::Panic,
            format!("plugin panicked: {}", panic_message(payload.as_ref())),
        ),
    };
    if !err.is_null() {
        // SAFETY: a non-null `err` points to a host-owned `KilnError`.
        failure.write_to(unsafe { &mut *err });
    }
    failure.code.status()
}

fn non_null<T>(p: *const T, what: &str) -> Result<(), BackendError> {
    if p.is_null() {
        Err(BackendError::invalid(format!("{what} is null")))
    } else {
        Ok(())
    }
}

/// # Safety
/// `ctx` is the pointer this glue's `init` returned for backend `B`.
unsafe fn backend<'a, B: Backend>(ctx: *mut c_void) -> &'a B {
    // SAFETY: per the contract above, `ctx` is a leaked `Box<B>`.
    unsafe { &*(ctx as *const B) }
}

/// # Safety
/// `buffer` is a handle this glue made for backend `B` and not yet freed.
unsafe fn buffer<'a, B: Backend>(buffer: KilnBuffer) -> Result<&'a B::Buffer, BackendError> {
    non_null(buffer, "buffer")?;
    // SAFETY: per the contract above, `buffer` is a leaked `Box<B::Buffer>`.
    Ok(unsafe { &*(buffer as *const B::Buffer) })
}

unsafe extern "C" fn device_count<B: Backend>(
    ctx: *mut c_void,
    out: *mut u32,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(out, "out_count")?;
        // SAFETY: ctx is ours (table contract); out is non-null and host-owned.
        unsafe { *out = backend::<B>(ctx).device_count() };
        Ok(())
    })
}

unsafe extern "C" fn device_info<B: Backend>(
    ctx: *mut c_void,
    device: u32,
    out: *mut KilnDeviceInfo,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(out, "out_info")?;
        // SAFETY: ctx is ours (table contract).
        let info = unsafe { backend::<B>(ctx) }.device_info(device)?.to_raw();
        // SAFETY: `out` is non-null and the host set its `struct_size` to
        // the bytes it owns; we copy no more than that (nor than we have).
        unsafe {
            let room = (*out).struct_size as usize;
            let n = room.min(core::mem::size_of::<KilnDeviceInfo>());
            let src = (&info as *const KilnDeviceInfo).cast::<u8>();
            // Skip `struct_size` itself: it is the host's.
            core::ptr::copy_nonoverlapping(
                src.add(4),
                out.cast::<u8>().add(4),
                n.saturating_sub(4),
            );
        }
        Ok(())
    })
}

unsafe extern "C" fn device_memory<B: Backend>(
    ctx: *mut c_void,
    device: u32,
    out_free: *mut u64,
    out_total: *mut u64,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(out_free, "out_free")?;
        non_null(out_total, "out_total")?;
        // SAFETY: ctx is ours; both outputs are non-null and host-owned.
        unsafe {
            let (free, total) = backend::<B>(ctx).device_memory(device)?;
            *out_free = free;
            *out_total = total;
        }
        Ok(())
    })
}

unsafe extern "C" fn weight_layout<B: Backend>(
    ctx: *mut c_void,
    device: u32,
    dtype: u32,
    out_dtype: *mut u32,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(out_dtype, "out_dtype")?;
        let dtype = DType::from_raw(dtype).ok_or_else(|| {
            BackendError::new(ErrorCode::InvalidArgument, format!("unknown dtype {dtype}"))
        })?;
        // SAFETY: ctx is ours; the output is non-null and host-owned.
        unsafe {
            *out_dtype = backend::<B>(ctx).weight_layout(device, dtype).raw();
        }
        Ok(())
    })
}

unsafe extern "C" fn buffer_alloc<B: Backend>(
    ctx: *mut c_void,
    device: u32,
    size: u64,
    out: *mut KilnBuffer,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(out, "out_buffer")?;
        // SAFETY: ctx is ours.
        let buf = unsafe { backend::<B>(ctx) }.buffer_alloc(device, size)?;
        // SAFETY: out is non-null and host-owned.
        unsafe { *out = Box::into_raw(Box::new(buf)).cast() };
        Ok(())
    })
}

unsafe extern "C" fn buffer_wrap_host<B: Backend>(
    ctx: *mut c_void,
    device: u32,
    host_ptr: *mut c_void,
    size: u64,
    out: *mut KilnBuffer,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(out, "out_buffer")?;
        non_null(host_ptr, "host_ptr")?;
        // SAFETY: ctx is ours; the host guarantees `host_ptr` stays valid
        // for `size` bytes until the buffer is freed (ABI contract).
        let buf = unsafe { backend::<B>(ctx).buffer_wrap_host(device, host_ptr.cast(), size)? };
        // SAFETY: out is non-null and host-owned.
        unsafe { *out = Box::into_raw(Box::new(buf)).cast() };
        Ok(())
    })
}

unsafe extern "C" fn buffer_free<B: Backend>(
    _ctx: *mut c_void,
    handle: KilnBuffer,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(handle, "buffer")?;
        // SAFETY: the host frees each handle once, when nothing else uses it.
        drop(unsafe { Box::from_raw(handle.cast::<B::Buffer>()) });
        Ok(())
    })
}

unsafe extern "C" fn buffer_write<B: Backend>(
    ctx: *mut c_void,
    handle: KilnBuffer,
    offset: u64,
    data: *const c_void,
    size: u64,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(data, "data")?;
        // SAFETY: ctx and handle are ours; `data` is readable for `size`
        // bytes by the ABI contract.
        unsafe {
            let bytes = core::slice::from_raw_parts(data.cast::<u8>(), size as usize);
            backend::<B>(ctx).buffer_write(buffer::<B>(handle)?, offset, bytes)
        }
    })
}

unsafe extern "C" fn buffer_read<B: Backend>(
    ctx: *mut c_void,
    handle: KilnBuffer,
    offset: u64,
    data: *mut c_void,
    size: u64,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(data, "data")?;
        // SAFETY: ctx and handle are ours; `data` is writable for `size`
        // bytes by the ABI contract.
        unsafe {
            let bytes = core::slice::from_raw_parts_mut(data.cast::<u8>(), size as usize);
            backend::<B>(ctx).buffer_read(buffer::<B>(handle)?, offset, bytes)
        }
    })
}

unsafe extern "C" fn buffer_copy<B: Backend>(
    ctx: *mut c_void,
    src: KilnBuffer,
    src_offset: u64,
    dst: KilnBuffer,
    dst_offset: u64,
    size: u64,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        // SAFETY: ctx and both handles are ours.
        unsafe {
            backend::<B>(ctx).buffer_copy(
                buffer::<B>(src)?,
                src_offset,
                buffer::<B>(dst)?,
                dst_offset,
                size,
            )
        }
    })
}

unsafe extern "C" fn supports_op<B: Backend>(
    ctx: *mut c_void,
    device: u32,
    op: *const KilnOp,
    tensors: *const KilnTensor,
    n_tensors: u32,
    out: *mut u32,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(op, "op")?;
        non_null(out, "out_supported")?;
        if n_tensors > 0 {
            non_null(tensors, "tensors")?;
        }
        // SAFETY: `op` points to one op and `tensors` to `n_tensors` tensors
        // (ABI contract); ctx is ours; `out` is non-null.
        unsafe {
            let raw = if n_tensors == 0 {
                &[][..]
            } else {
                core::slice::from_raw_parts(tensors, n_tensors as usize)
            };
            let table = Tensors {
                raw,
                _buffers: PhantomData,
            };
            *out = match Op::from_raw(&*op, raw.len()) {
                Ok(op) => u32::from(backend::<B>(ctx).supports_op(device, &op, &table)),
                Err(_) => 0,
            };
        }
        Ok(())
    })
}

unsafe extern "C" fn graph_compute<B: Backend>(
    ctx: *mut c_void,
    device: u32,
    graph: *const KilnGraph,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(graph, "graph")?;
        // SAFETY: `graph` points to a host-owned graph whose arrays hold
        // `n_tensors` tensors and `n_ops` ops (ABI contract); ctx is ours.
        unsafe {
            let g = &*graph;
            let slice = |p: *const KilnTensor, n: u32| {
                if n == 0 || p.is_null() {
                    &[][..]
                } else {
                    core::slice::from_raw_parts(p, n as usize)
                }
            };
            if g.n_ops > 0 {
                non_null(g.ops, "graph.ops")?;
            }
            let ops = if g.n_ops == 0 {
                &[][..]
            } else {
                core::slice::from_raw_parts(g.ops, g.n_ops as usize)
            };
            let view = Graph {
                tensors: Tensors {
                    raw: slice(g.tensors, g.n_tensors),
                    _buffers: PhantomData,
                },
                ops,
                threads: g.threads,
            };
            backend::<B>(ctx).graph_compute(device, &view)
        }
    })
}

unsafe extern "C" fn synchronize<B: Backend>(
    ctx: *mut c_void,
    device: u32,
    err: *mut KilnError,
) -> i32 {
    // SAFETY: ctx is ours.
    guard(err, || unsafe { backend::<B>(ctx) }.synchronize(device))
}

/// The table for backend `B`.
fn table<B: Backend>() -> KilnBackendApi {
    KilnBackendApi {
        struct_size: core::mem::size_of::<KilnBackendApi>() as u32,
        abi_major: KILN_ABI_VERSION_MAJOR,
        abi_minor: KILN_ABI_VERSION_MINOR,
        layout_fingerprint: KILN_LAYOUT_FINGERPRINT,
        device_info_size: core::mem::size_of::<KilnDeviceInfo>() as u32,
        reserved0: 0,
        name: B::NAME.as_ptr(),
        version: B::VERSION.as_ptr(),
        device_count: Some(device_count::<B>),
        device_info: Some(device_info::<B>),
        buffer_alloc: Some(buffer_alloc::<B>),
        buffer_wrap_host: Some(buffer_wrap_host::<B>),
        buffer_free: Some(buffer_free::<B>),
        buffer_write: Some(buffer_write::<B>),
        buffer_read: Some(buffer_read::<B>),
        buffer_copy: Some(buffer_copy::<B>),
        supports_op: Some(supports_op::<B>),
        graph_compute: Some(graph_compute::<B>),
        synchronize: Some(synchronize::<B>),
        device_memory: Some(device_memory::<B>),
        weight_layout: Some(weight_layout::<B>),
    }
}

/// Size of the 1.0 `KilnHostApi` (every field a plugin needs).
const HOST_API_SIZE_1_0: usize = core::mem::size_of::<KilnHostApi>();

/// The body of `kiln_backend_init` for backend `B`; [`export_backend!`](crate::export_backend)
/// generates the exported symbol that calls it.
///
/// # Safety
/// The caller passes pointers as `kiln_backend.h` documents for `kiln_backend_init`.
pub unsafe fn init<B: Backend>(
    host: *const KilnHostApi,
    out_api: *mut *const KilnBackendApi,
    out_ctx: *mut *mut c_void,
    err: *mut KilnError,
) -> i32 {
    guard(err, || {
        non_null(host, "host")?;
        non_null(out_api, "out_api")?;
        non_null(out_ctx, "out_ctx")?;
        // SAFETY: non-null and, by contract, a live host table.
        let host = unsafe { &*host };
        if host.abi_major != KILN_ABI_VERSION_MAJOR {
            return Err(BackendError::new(
                ErrorCode::AbiMismatch,
                format!(
                    "host speaks kiln ABI {}.{}, this plugin ({}) was built for ABI {}.{}",
                    host.abi_major,
                    host.abi_minor,
                    B::NAME.to_string_lossy(),
                    KILN_ABI_VERSION_MAJOR,
                    KILN_ABI_VERSION_MINOR
                ),
            ));
        }
        if (host.struct_size as usize) < HOST_API_SIZE_1_0 {
            return Err(BackendError::new(
                ErrorCode::AbiMismatch,
                format!(
                    "KilnHostApi is {} bytes, ABI 1.0 needs {HOST_API_SIZE_1_0}",
                    host.struct_size
                ),
            ));
        }
        let services = HostServices {
            ctx: host.host_ctx,
            log: host.log,
            report_error: host.report_error,
            abi_minor: host.abi_minor,
        };
        let backend = B::new(services)?;
        // The table lives for the rest of the process (plugins are never
        // unloaded); init runs once per process, so this leaks one table.
        let api: &'static KilnBackendApi = Box::leak(Box::new(table::<B>()));
        // SAFETY: both out pointers are non-null and host-owned.
        unsafe {
            *out_api = api;
            *out_ctx = Box::into_raw(Box::new(backend)).cast();
        }
        Ok(())
    })
}

/// Exports a [`Backend`] as this library's `kiln_backend_init`.
///
/// ```ignore
/// kiln_plugin_api::export_backend!(MyBackend);
/// ```
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        /// The kiln backend entry point (see `kiln_backend.h`).
        ///
        /// # Safety
        /// Called by a kiln host with the pointers `kiln_backend.h` documents.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_backend_init(
            host: *const $crate::abi::KilnHostApi,
            out_api: *mut *const $crate::abi::KilnBackendApi,
            out_ctx: *mut *mut ::core::ffi::c_void,
            err: *mut $crate::abi::KilnError,
        ) -> i32 {
            // SAFETY: the caller upholds the entry point's contract, which
            // is exactly `init`'s.
            unsafe { $crate::plugin::init::<$backend>(host, out_api, out_ctx, err) }
        }
    };
}

/// Reads a NUL-terminated static string from a plugin table.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that outlives the call.
pub unsafe fn c_str_lossy(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated by contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
