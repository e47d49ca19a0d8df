//! The raw C ABI: `#[repr(C)]` structs, function-pointer tables and
//! constants, mirrored one to one by `include/kiln_backend.h`.
//!
//! Rules that keep 1.x stable (see `docs/abi.md` for the full contract):
//! - A minor version may only *append* fields to the growable structs
//!   ([`KilnHostApi`], [`KilnBackendApi`], [`KilnDeviceInfo`]); each of them
//!   starts with a `struct_size` so the reader knows which fields exist.
//! - [`KilnError`], [`KilnTensor`], [`KilnOp`] and [`KilnGraph`] are frozen for
//!   the whole major version: they travel in arrays or by value, so their
//!   size is part of the contract. New operations are new op kinds.
//! - Every function returns a status (`KILN_STATUS_OK` or an error code) and
//!   fills the caller's [`KilnError`] on failure.

use core::ffi::{c_char, c_void};

/// The ABI major version this crate defines. Plugins with another major are refused.
pub const KILN_ABI_VERSION_MAJOR: u16 = 1;
/// The newest ABI minor version this crate defines.
pub const KILN_ABI_VERSION_MINOR: u16 = 3;

/// Name of the one symbol a backend library exports.
pub const KILN_BACKEND_ENTRY_SYMBOL: &str = "kiln_backend_init";

pub const KILN_ERROR_MESSAGE_CAPACITY: usize = 512;
pub const KILN_DEVICE_NAME_CAPACITY: usize = 128;
pub const KILN_MAX_DIMS: usize = 4;
pub const KILN_MAX_SRC: usize = 4;
pub const KILN_OP_PARAM_COUNT: usize = 8;

// Status codes. Zero is success; every other value is an error whose message
// is in the caller's `KilnError`.
pub const KILN_STATUS_OK: i32 = 0;
pub const KILN_STATUS_UNSUPPORTED: i32 = 1;
pub const KILN_STATUS_INVALID_ARGUMENT: i32 = 2;
pub const KILN_STATUS_OUT_OF_MEMORY: i32 = 3;
pub const KILN_STATUS_DEVICE_ERROR: i32 = 4;
pub const KILN_STATUS_ABI_MISMATCH: i32 = 5;
pub const KILN_STATUS_PANIC: i32 = 6;
pub const KILN_STATUS_INTERNAL: i32 = 7;

// Log levels for `KilnHostApi::log`.
pub const KILN_LOG_ERROR: i32 = 0;
pub const KILN_LOG_WARN: i32 = 1;
pub const KILN_LOG_INFO: i32 = 2;
pub const KILN_LOG_DEBUG: i32 = 3;

// Device kinds.
pub const KILN_DEVICE_CPU: u32 = 0;
pub const KILN_DEVICE_GPU: u32 = 1;
pub const KILN_DEVICE_INTEGRATED_GPU: u32 = 2;
pub const KILN_DEVICE_ACCELERATOR: u32 = 3;

// Device capability bits.
/// `buffer_wrap_host` works on this device (zero-copy use of host memory).
pub const KILN_CAP_HOST_MEMORY: u64 = 1 << 0;
/// Device memory is the host's memory (integrated GPUs, CPUs).
pub const KILN_CAP_UNIFIED_MEMORY: u64 = 1 << 1;
/// `graph_compute` may return before the work is done; `synchronize` waits.
pub const KILN_CAP_ASYNC_COMPUTE: u64 = 1 << 2;

// Data types. The numbers are ggml's, so GGUF tensor types map one to one.
pub const KILN_DTYPE_F32: u32 = 0;
pub const KILN_DTYPE_F16: u32 = 1;
pub const KILN_DTYPE_Q4_0: u32 = 2;
pub const KILN_DTYPE_Q4_1: u32 = 3;
pub const KILN_DTYPE_Q5_0: u32 = 6;
pub const KILN_DTYPE_Q5_1: u32 = 7;
pub const KILN_DTYPE_Q8_0: u32 = 8;
pub const KILN_DTYPE_Q2_K: u32 = 10;
pub const KILN_DTYPE_Q3_K: u32 = 11;
pub const KILN_DTYPE_Q4_K: u32 = 12;
pub const KILN_DTYPE_Q5_K: u32 = 13;
pub const KILN_DTYPE_Q6_K: u32 = 14;
pub const KILN_DTYPE_IQ4_NL: u32 = 20;
pub const KILN_DTYPE_IQ4_XS: u32 = 23;
pub const KILN_DTYPE_I32: u32 = 26;
pub const KILN_DTYPE_BF16: u32 = 30;
/// kiln's own layouts start at 256 (the low byte names the ggml type they
/// rearrange): Q5_0 rows with every 16 blocks interleaved lane-wise
/// ([`crate::interleave`]).
pub const KILN_DTYPE_Q5_0_X16: u32 = 0x106;
/// Q4_0 rows interleaved the same way, without fifth bits.
pub const KILN_DTYPE_Q4_0_X16: u32 = 0x102;

// Operation kinds; the semantics of each (shapes, params) are in the header.
pub const KILN_OP_MUL_MAT: u32 = 1;
pub const KILN_OP_ADD: u32 = 2;
pub const KILN_OP_MUL: u32 = 3;
pub const KILN_OP_SCALE: u32 = 4;
pub const KILN_OP_RMS_NORM: u32 = 5;
pub const KILN_OP_ROPE: u32 = 6;
pub const KILN_OP_SOFT_MAX: u32 = 7;
pub const KILN_OP_SILU: u32 = 8;
pub const KILN_OP_GELU: u32 = 9;
pub const KILN_OP_GET_ROWS: u32 = 10;
pub const KILN_OP_CPY: u32 = 11;
pub const KILN_OP_NORM: u32 = 12;
pub const KILN_OP_ATTENTION: u32 = 13;

// Rope modes (params[1] of KILN_OP_ROPE).
pub const KILN_ROPE_NORMAL: i32 = 0;
pub const KILN_ROPE_NEOX: i32 = 2;
/// A flag on the mode: params[4..8] carry YaRN's extrapolation mix,
/// magnitude scale and correction dimensions (see the header).
pub const KILN_ROPE_EXT: i32 = 0x100;

/// Opaque device buffer handle, created and owned by the plugin.
pub type KilnBuffer = *mut c_void;

/// A structured error, filled by the callee when it returns a non-zero status.
/// Frozen for 1.x.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KilnError {
    /// One of the `KILN_STATUS_*` codes.
    pub code: i32,
    /// Index of the failing op inside a graph, or -1.
    pub op_index: i32,
    /// NUL-terminated UTF-8, truncated to fit.
    pub message: [c_char; KILN_ERROR_MESSAGE_CAPACITY],
}

impl Default for KilnError {
    fn default() -> Self {
        KilnError {
            code: KILN_STATUS_OK,
            op_index: -1,
            message: [0; KILN_ERROR_MESSAGE_CAPACITY],
        }
    }
}

pub type KilnLogFn =
    unsafe extern "C" fn(host_ctx: *mut c_void, level: i32, message: *const c_char, len: usize);
pub type KilnReportErrorFn =
    unsafe extern "C" fn(host_ctx: *mut c_void, code: i32, message: *const c_char, len: usize);

/// Services the host offers to a plugin. Growable: read fields past 1.0 only
/// when `struct_size` covers them.
#[repr(C)]
pub struct KilnHostApi {
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    pub layout_fingerprint: u64,
    pub host_ctx: *mut c_void,
    /// Thread-safe; may be called from any thread, including plugin threads.
    pub log: Option<KilnLogFn>,
    /// For errors outside a call (a device lost on a worker thread). Thread-safe.
    pub report_error: Option<KilnReportErrorFn>,
}

/// What a plugin reports about one device. The host allocates it, zeroes it
/// and sets `struct_size`; the plugin writes at most `struct_size` bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KilnDeviceInfo {
    pub struct_size: u32,
    /// One of the `KILN_DEVICE_*` kinds.
    pub kind: u32,
    /// NUL-terminated UTF-8.
    pub name: [c_char; KILN_DEVICE_NAME_CAPACITY],
    pub total_memory: u64,
    pub free_memory: u64,
    /// `KILN_CAP_*` bits.
    pub capabilities: u64,
    /// Largest single buffer, in bytes (0: no limit beyond memory).
    pub max_buffer_size: u64,
    /// Alignment every buffer and tensor offset must honour, in bytes.
    pub buffer_alignment: u32,
    pub reserved0: u32,
    // ---- appended in 1.1 ----
    /// A stable identity for the device (all zero: unknown).
    pub uuid: [u8; 16],
}

/// Size of [`KilnDeviceInfo`] as ABI 1.0 defined it.
pub const KILN_DEVICE_INFO_SIZE_1_0: usize = core::mem::offset_of!(KilnDeviceInfo, uuid);

/// A tensor view: a buffer, a byte offset, a type, a shape and strides.
/// Dimension 0 is innermost (ggml order). Frozen for 1.x.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnTensor {
    /// Null in `supports_op` queries.
    pub buffer: KilnBuffer,
    pub offset: u64,
    pub dtype: u32,
    pub n_dims: u32,
    /// Elements per dimension; unused dimensions are 1.
    pub ne: [i64; KILN_MAX_DIMS],
    /// Stride per dimension in bytes. For block-quantized types `nb[0]` is
    /// the block size in bytes and rows are contiguous.
    pub nb: [u64; KILN_MAX_DIMS],
}

/// One operation of a graph: `dst = kind(src[0..n_src], params)`. Frozen for 1.x.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilnOp {
    pub kind: u32,
    pub n_src: u32,
    /// Indices into the graph's tensor array.
    pub src: [u32; KILN_MAX_SRC],
    pub dst: u32,
    /// Must be zero in 1.x.
    pub flags: u32,
    /// Op-specific; f32 parameters are stored as their bit pattern.
    pub params: [i32; KILN_OP_PARAM_COUNT],
}

/// A graph: tensors and ops executed in order. Frozen for 1.x.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KilnGraph {
    pub struct_size: u32,
    pub n_tensors: u32,
    pub tensors: *const KilnTensor,
    pub n_ops: u32,
    /// (1.3; `reserved0` before, always 0) CPU threads the backend may
    /// use for this graph, the caller's included: a host running several
    /// models side by side gives each its share. 0: the backend's own
    /// choice. A host sends a non-zero value only to a backend that
    /// declared 1.3 or later; a backend without threads ignores it.
    pub threads: u32,
    pub ops: *const KilnOp,
}

pub type KilnDeviceCountFn =
    unsafe extern "C" fn(ctx: *mut c_void, out_count: *mut u32, err: *mut KilnError) -> i32;
pub type KilnDeviceInfoFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    device: u32,
    out_info: *mut KilnDeviceInfo,
    err: *mut KilnError,
) -> i32;
pub type KilnBufferAllocFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    device: u32,
    size: u64,
    out_buffer: *mut KilnBuffer,
    err: *mut KilnError,
) -> i32;
pub type KilnBufferWrapHostFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    device: u32,
    host_ptr: *mut c_void,
    size: u64,
    out_buffer: *mut KilnBuffer,
    err: *mut KilnError,
) -> i32;
pub type KilnBufferFreeFn =
    unsafe extern "C" fn(ctx: *mut c_void, buffer: KilnBuffer, err: *mut KilnError) -> i32;
pub type KilnBufferWriteFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    buffer: KilnBuffer,
    offset: u64,
    data: *const c_void,
    size: u64,
    err: *mut KilnError,
) -> i32;
pub type KilnBufferReadFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    buffer: KilnBuffer,
    offset: u64,
    data: *mut c_void,
    size: u64,
    err: *mut KilnError,
) -> i32;
pub type KilnBufferCopyFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    src: KilnBuffer,
    src_offset: u64,
    dst: KilnBuffer,
    dst_offset: u64,
    size: u64,
    err: *mut KilnError,
) -> i32;
pub type KilnSupportsOpFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    device: u32,
    op: *const KilnOp,
    tensors: *const KilnTensor,
    n_tensors: u32,
    out_supported: *mut u32,
    err: *mut KilnError,
) -> i32;
pub type KilnGraphComputeFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    device: u32,
    graph: *const KilnGraph,
    err: *mut KilnError,
) -> i32;
pub type KilnSynchronizeFn =
    unsafe extern "C" fn(ctx: *mut c_void, device: u32, err: *mut KilnError) -> i32;
pub type KilnDeviceMemoryFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    device: u32,
    out_free: *mut u64,
    out_total: *mut u64,
    err: *mut KilnError,
) -> i32;

/// The layout a device wants matrix weights of `dtype` in (1.2): a kiln
/// layout (`KILN_DTYPE_Q5_0_X16`, …) the host repacks them into at load
/// time and hands only to this backend, or `dtype` itself.
pub type KilnWeightLayoutFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    device: u32,
    dtype: u32,
    out_dtype: *mut u32,
    err: *mut KilnError,
) -> i32;

/// The table a backend hands the host from `kiln_backend_init`. It must stay
/// valid (and unchanged) for the life of the process. Growable.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KilnBackendApi {
    /// `sizeof(KilnBackendApi)` as the plugin was compiled.
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    /// `kiln_layout_fingerprint()` for `abi_minor`, as the plugin was compiled.
    pub layout_fingerprint: u64,
    /// `sizeof(KilnDeviceInfo)` as the plugin was compiled.
    pub device_info_size: u32,
    pub reserved0: u32,
    /// NUL-terminated, static.
    pub name: *const c_char,
    /// NUL-terminated semver, static.
    pub version: *const c_char,
    pub device_count: Option<KilnDeviceCountFn>,
    pub device_info: Option<KilnDeviceInfoFn>,
    pub buffer_alloc: Option<KilnBufferAllocFn>,
    /// Optional (may be null): only for devices with `KILN_CAP_HOST_MEMORY`.
    pub buffer_wrap_host: Option<KilnBufferWrapHostFn>,
    pub buffer_free: Option<KilnBufferFreeFn>,
    pub buffer_write: Option<KilnBufferWriteFn>,
    pub buffer_read: Option<KilnBufferReadFn>,
    pub buffer_copy: Option<KilnBufferCopyFn>,
    pub supports_op: Option<KilnSupportsOpFn>,
    pub graph_compute: Option<KilnGraphComputeFn>,
    pub synchronize: Option<KilnSynchronizeFn>,
    // ---- appended in 1.1 ----
    /// Optional: current free and total memory of a device.
    pub device_memory: Option<KilnDeviceMemoryFn>,
    // ---- appended in 1.2 ----
    /// Optional: the layout a device wants matrix weights in.
    pub weight_layout: Option<KilnWeightLayoutFn>,
}

/// Size of [`KilnBackendApi`] as ABI 1.0 defined it.
pub const KILN_BACKEND_API_SIZE_1_0: usize = core::mem::offset_of!(KilnBackendApi, device_memory);
/// Size of [`KilnBackendApi`] as ABI 1.1 defined it.
pub const KILN_BACKEND_API_SIZE_1_1: usize = core::mem::offset_of!(KilnBackendApi, weight_layout);

/// The entry point every backend library exports as `kiln_backend_init`.
///
/// Called once per process, before any other call. On success the plugin
/// stores its table in `*out_api` and its instance pointer in `*out_ctx`.
pub type KilnBackendInitFn = unsafe extern "C" fn(
    host: *const KilnHostApi,
    out_api: *mut *const KilnBackendApi,
    out_ctx: *mut *mut c_void,
    err: *mut KilnError,
) -> i32;

/// Minimum `KilnBackendApi::struct_size` for a plugin that declares `minor`.
pub const fn backend_api_size_for_minor(minor: u16) -> usize {
    match minor {
        0 => KILN_BACKEND_API_SIZE_1_0,
        1 => KILN_BACKEND_API_SIZE_1_1,
        _ => core::mem::size_of::<KilnBackendApi>(),
    }
}

/// Minimum `KilnBackendApi::device_info_size` for a plugin that declares `minor`.
pub const fn device_info_size_for_minor(minor: u16) -> usize {
    if minor == 0 {
        KILN_DEVICE_INFO_SIZE_1_0
    } else {
        core::mem::size_of::<KilnDeviceInfo>()
    }
}
