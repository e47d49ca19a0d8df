//! The host's side of the ABI: opening a backend library, negotiating the
//! version both ways, and a safe handle over the negotiated table.
//!
//! Everything the host needs to call into a plugin goes through
//! [`BackendHandle`]; the host crate itself contains no `extern "C"` calls.
//! Libraries are opened with `RTLD_NOW | RTLD_LOCAL` (an unresolved symbol
//! fails at open time instead of crashing at first use) and are never
//! closed: a backend may own threads and thread-local destructors that run
//! code from its library, so unloading it could jump into unmapped memory.

use crate::abi::*;
use crate::layout::layout_fingerprint;
use crate::plugin::{DeviceInfo, c_str_lossy};
use crate::types::*;
use core::ffi::{c_char, c_void};
use core::mem::{MaybeUninit, offset_of, size_of};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// Why a backend could not be opened or negotiated.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the dynamic loader refused the library: {0}")]
    Open(String),
    #[error("the library does not export `{KILN_BACKEND_ENTRY_SYMBOL}` (is it a kiln backend?)")]
    MissingEntry,
    #[error("the plugin's init failed: {0}")]
    Init(BackendError),
    #[error("the plugin's init reported success but returned a null {0}")]
    NullResult(&'static str),
    #[error(
        "ABI major version mismatch: the plugin was built for kiln ABI {plugin_major}.{plugin_minor}, this host speaks ABI {host_major}.{host_minor}; rebuild the plugin against kiln_backend.h {host_major}.x"
    )]
    MajorMismatch {
        plugin_major: u16,
        plugin_minor: u16,
        host_major: u16,
        host_minor: u16,
    },
    #[error(
        "{structure} is {actual} bytes but ABI {major}.{minor} needs at least {required}; the plugin was built against a broken or truncated header"
    )]
    StructTooSmall {
        structure: &'static str,
        actual: u32,
        required: usize,
        major: u16,
        minor: u16,
    },
    #[error(
        "layout fingerprint mismatch for ABI {major}.{minor}: the plugin reports {actual:#018x}, the ABI defines {expected:#018x}; the plugin was built against an edited kiln_backend.h"
    )]
    Fingerprint {
        major: u16,
        minor: u16,
        expected: u64,
        actual: u64,
    },
    #[error("the plugin's table lacks the required function `{0}`")]
    MissingFunction(&'static str),
}

/// Opens a backend library and returns its entry point. The library stays
/// loaded for the rest of the process.
///
/// # Safety
/// Opening a library runs its initialisers, which are arbitrary code. Call
/// this only after the library passed the manifest checks (hash, ABI, CPU
/// features, ELF sanity).
pub unsafe fn open_library(path: &Path) -> Result<KilnBackendInitFn, LoadError> {
    #[cfg(unix)]
    let lib: libloading::Library = {
        use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
        // SAFETY: the caller vetted the library (see above).
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| LoadError::Open(e.to_string()))?
            .into()
    };
    #[cfg(not(unix))]
    // SAFETY: the caller vetted the library (see above).
    let lib =
        unsafe { libloading::Library::new(path) }.map_err(|e| LoadError::Open(e.to_string()))?;

    // SAFETY: the symbol, if present, has the entry point's type by the
    // ABI's contract; we copy the function pointer out before leaking `lib`.
    let entry: KilnBackendInitFn = unsafe {
        match lib.get::<KilnBackendInitFn>(KILN_BACKEND_ENTRY_SYMBOL.as_bytes()) {
            Ok(sym) => *sym,
            Err(_) => return Err(LoadError::MissingEntry),
        }
    };
    // Never unload (see the module docs).
    std::mem::forget(lib);
    Ok(entry)
}

/// A sink for the plugin's log lines and out-of-band error reports.
pub trait HostSink: Send + Sync + 'static {
    fn log(&self, level: i32, message: &str);
    fn report_error(&self, code: ErrorCode, message: &str);
}

unsafe extern "C" fn host_log(ctx: *mut c_void, level: i32, msg: *const c_char, len: usize) {
    if ctx.is_null() || msg.is_null() {
        return;
    }
    // SAFETY: ctx is the `&'static dyn HostSink` box we leaked in
    // `host_api`; msg/len describe bytes the plugin owns for this call.
    let (sink, bytes) = unsafe {
        (
            &*(ctx as *const Box<dyn HostSink>),
            core::slice::from_raw_parts(msg.cast::<u8>(), len),
        )
    };
    let text = String::from_utf8_lossy(bytes);
    // A panicking sink must not unwind into the plugin.
    let _ = catch_unwind(AssertUnwindSafe(|| sink.log(level, &text)));
}

unsafe extern "C" fn host_report_error(
    ctx: *mut c_void,
    code: i32,
    msg: *const c_char,
    len: usize,
) {
    if ctx.is_null() || msg.is_null() {
        return;
    }
    // SAFETY: as in `host_log`.
    let (sink, bytes) = unsafe {
        (
            &*(ctx as *const Box<dyn HostSink>),
            core::slice::from_raw_parts(msg.cast::<u8>(), len),
        )
    };
    let text = String::from_utf8_lossy(bytes);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        sink.report_error(ErrorCode::from_status(code), &text)
    }));
}

/// The host's services table, leaked for the life of the process.
#[derive(Clone, Copy)]
pub struct HostApi(&'static KilnHostApi);

// SAFETY: the table is immutable after construction, and its functions and
// context (a `HostSink`, which is Send + Sync) may be used from any thread.
unsafe impl Send for HostApi {}
// SAFETY: as above.
unsafe impl Sync for HostApi {}

impl HostApi {
    pub fn raw(&self) -> &'static KilnHostApi {
        self.0
    }
}

/// Builds the host's services table around `sink`. The table and the sink
/// live for the rest of the process (plugins may keep the pointer).
pub fn host_api(sink: Box<dyn HostSink>) -> HostApi {
    let ctx: &'static mut Box<dyn HostSink> = Box::leak(Box::new(sink));
    HostApi(Box::leak(Box::new(KilnHostApi {
        struct_size: size_of::<KilnHostApi>() as u32,
        abi_major: KILN_ABI_VERSION_MAJOR,
        abi_minor: KILN_ABI_VERSION_MINOR,
        layout_fingerprint: layout_fingerprint(KILN_ABI_VERSION_MINOR),
        host_ctx: (ctx as *mut Box<dyn HostSink>).cast(),
        log: Some(host_log),
        report_error: Some(host_report_error),
    })))
}

/// A device buffer owned by a plugin. Freed with [`BackendHandle::buffer_free`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RawBuffer(pub KilnBuffer);

// SAFETY: buffer handles are opaque tokens; the ABI lets the host use them
// from any thread (never freeing one while it is in use).
unsafe impl Send for RawBuffer {}
// SAFETY: as above.
unsafe impl Sync for RawBuffer {}

/// A negotiated backend: the plugin's table (copied up to the size both
/// sides know, the rest zeroed), its instance pointer, and what it declared.
pub struct BackendHandle {
    api: KilnBackendApi,
    ctx: *mut c_void,
    name: String,
    version: String,
    abi_minor: u16,
    device_info_size: usize,
}

// SAFETY: the ABI's threading contract lets the host call a backend from
// any thread; the calls that must be serialised per device are serialised by
// the host's executor, not by this handle.
unsafe impl Send for BackendHandle {}
// SAFETY: as above.
unsafe impl Sync for BackendHandle {}

fn call(f: impl FnOnce(*mut KilnError) -> i32) -> Result<(), BackendError> {
    let mut err = KilnError::default();
    let status = f(&mut err);
    if status == KILN_STATUS_OK {
        Ok(())
    } else {
        Err(BackendError::from_raw(status, &err))
    }
}

impl BackendHandle {
    /// Calls the entry point and negotiates: the major must match, the
    /// declared sizes must cover the declared minor, the fingerprint must be
    /// the one that minor defines, and every required function must be set.
    ///
    /// # Safety
    /// `entry` is a backend entry point (from [`open_library`] or a linked
    /// plugin) and `host` a table from [`host_api`].
    pub unsafe fn negotiate(
        entry: KilnBackendInitFn,
        host: HostApi,
    ) -> Result<BackendHandle, LoadError> {
        let mut table: *const KilnBackendApi = core::ptr::null();
        let mut ctx: *mut c_void = core::ptr::null_mut();
        let mut err = KilnError::default();
        // SAFETY: the entry point's contract; all out pointers are ours.
        let status = unsafe { entry(host.raw(), &mut table, &mut ctx, &mut err) };
        if status != KILN_STATUS_OK {
            return Err(LoadError::Init(BackendError::from_raw(status, &err)));
        }
        if table.is_null() {
            return Err(LoadError::NullResult("table"));
        }
        // Read the fixed header first: it is the same in every 1.x and says
        // how much of the rest exists.
        // SAFETY: every 1.x table starts with these fields; we read them one
        // by one so a short table is never read past its header.
        let (struct_size, major, minor, fingerprint) = unsafe {
            (
                core::ptr::addr_of!((*table).struct_size).read_unaligned(),
                core::ptr::addr_of!((*table).abi_major).read_unaligned(),
                core::ptr::addr_of!((*table).abi_minor).read_unaligned(),
                core::ptr::addr_of!((*table).layout_fingerprint).read_unaligned(),
            )
        };
        if major != KILN_ABI_VERSION_MAJOR {
            return Err(LoadError::MajorMismatch {
                plugin_major: major,
                plugin_minor: minor,
                host_major: KILN_ABI_VERSION_MAJOR,
                host_minor: KILN_ABI_VERSION_MINOR,
            });
        }
        // A plugin newer than the host is read as the host's minor: the
        // fields the host knows are a prefix of what the plugin filled.
        let known_minor = minor.min(KILN_ABI_VERSION_MINOR);
        let required = backend_api_size_for_minor(known_minor);
        if (struct_size as usize) < required {
            return Err(LoadError::StructTooSmall {
                structure: "KilnBackendApi",
                actual: struct_size,
                required,
                major,
                minor,
            });
        }
        if minor <= KILN_ABI_VERSION_MINOR {
            let expected = layout_fingerprint(minor);
            if fingerprint != expected {
                return Err(LoadError::Fingerprint {
                    major,
                    minor,
                    expected,
                    actual: fingerprint,
                });
            }
        }
        let mut api = MaybeUninit::<KilnBackendApi>::zeroed();
        let n = (struct_size as usize).min(size_of::<KilnBackendApi>());
        // SAFETY: the plugin declared `struct_size` readable bytes; we copy
        // at most that many into a zeroed table, so fields the plugin does
        // not have read as null (`None`). All-zero is a valid
        // `KilnBackendApi` (null pointers, `None` functions).
        let api = unsafe {
            core::ptr::copy_nonoverlapping(table.cast::<u8>(), api.as_mut_ptr().cast::<u8>(), n);
            api.assume_init()
        };
        let device_info_size = api.device_info_size as usize;
        let info_required = device_info_size_for_minor(known_minor);
        if device_info_size < info_required {
            return Err(LoadError::StructTooSmall {
                structure: "KilnDeviceInfo",
                actual: api.device_info_size,
                required: info_required,
                major,
                minor,
            });
        }
        let required_fns: [(&'static str, bool); 10] = [
            ("device_count", api.device_count.is_some()),
            ("device_info", api.device_info.is_some()),
            ("buffer_alloc", api.buffer_alloc.is_some()),
            ("buffer_free", api.buffer_free.is_some()),
            ("buffer_write", api.buffer_write.is_some()),
            ("buffer_read", api.buffer_read.is_some()),
            ("buffer_copy", api.buffer_copy.is_some()),
            ("supports_op", api.supports_op.is_some()),
            ("graph_compute", api.graph_compute.is_some()),
            ("synchronize", api.synchronize.is_some()),
        ];
        if let Some((name, _)) = required_fns.iter().find(|(_, present)| !present) {
            return Err(LoadError::MissingFunction(name));
        }
        // SAFETY: name and version are static NUL-terminated strings by contract.
        let (name, version) = unsafe { (c_str_lossy(api.name), c_str_lossy(api.version)) };
        Ok(BackendHandle {
            api,
            ctx,
            name,
            version,
            abi_minor: minor,
            device_info_size: device_info_size.min(size_of::<KilnDeviceInfo>()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The ABI minor the plugin declared.
    pub fn abi_minor(&self) -> u16 {
        self.abi_minor
    }

    pub fn device_count(&self) -> Result<u32, BackendError> {
        let f = self.api.device_count.expect("checked in negotiate");
        let mut n = 0u32;
        // SAFETY: a required function of a negotiated table, our ctx, our outputs.
        call(|err| unsafe { f(self.ctx, &mut n, err) })?;
        Ok(n)
    }

    pub fn device_info(&self, device: u32) -> Result<DeviceInfo, BackendError> {
        let f = self.api.device_info.expect("checked in negotiate");
        // SAFETY: all-zero is a valid KilnDeviceInfo.
        let mut raw: KilnDeviceInfo = unsafe { MaybeUninit::zeroed().assume_init() };
        raw.struct_size = size_of::<KilnDeviceInfo>() as u32;
        // SAFETY: as in `device_count`; `raw` is ours and sized as declared.
        call(|err| unsafe { f(self.ctx, device, &mut raw, err) })?;
        // Fields past what the plugin declared stay as we zeroed them.
        let uuid = if self.device_info_size > offset_of!(KilnDeviceInfo, uuid) {
            raw.uuid
        } else {
            [0; 16]
        };
        let kind = DeviceKind::from_raw(raw.kind).ok_or_else(|| {
            BackendError::invalid(format!("device {device}: unknown device kind {}", raw.kind))
        })?;
        Ok(DeviceInfo {
            kind,
            name: read_c_string(&raw.name),
            total_memory: raw.total_memory,
            free_memory: raw.free_memory,
            capabilities: raw.capabilities,
            max_buffer_size: raw.max_buffer_size,
            buffer_alignment: raw.buffer_alignment,
            uuid,
        })
    }

    /// Current (free, total) memory; `None` when the plugin predates 1.1 or
    /// does not implement the query.
    pub fn device_memory(&self, device: u32) -> Option<Result<(u64, u64), BackendError>> {
        let f = self.api.device_memory?;
        let (mut free, mut total) = (0u64, 0u64);
        // SAFETY: present in the negotiated table; our ctx and outputs.
        Some(
            call(|err| unsafe { f(self.ctx, device, &mut free, &mut total, err) })
                .map(|()| (free, total)),
        )
    }

    /// The layout `device` wants matrix weights of `dtype` in: the
    /// plugin's answer (1.2), or `dtype` itself when it predates 1.2, does
    /// not implement the query, or answers with a type that is neither
    /// `dtype` nor a kiln layout of it.
    pub fn weight_layout(&self, device: u32, dtype: DType) -> DType {
        let Some(f) = self.api.weight_layout else {
            return dtype;
        };
        let mut out = dtype.raw();
        // SAFETY: present in the negotiated table; our ctx and output.
        match call(|err| unsafe { f(self.ctx, device, dtype.raw(), &mut out, err) }) {
            // Only the type itself or a kiln layout of it: anything else
            // would make the host repack rows into what they are not.
            Ok(()) => DType::from_raw(out)
                .filter(|&t| t == dtype || crate::interleave::plain(t) == dtype)
                .unwrap_or(dtype),
            Err(_) => dtype,
        }
    }

    pub fn buffer_alloc(&self, device: u32, size: u64) -> Result<RawBuffer, BackendError> {
        let f = self.api.buffer_alloc.expect("checked in negotiate");
        let mut out: KilnBuffer = core::ptr::null_mut();
        // SAFETY: as in `device_count`.
        call(|err| unsafe { f(self.ctx, device, size, &mut out, err) })?;
        if out.is_null() {
            return Err(BackendError::new(
                ErrorCode::Internal,
                "buffer_alloc succeeded but returned a null buffer",
            ));
        }
        Ok(RawBuffer(out))
    }

    /// Wraps host memory as a device buffer, if the plugin can.
    ///
    /// # Safety
    /// `ptr` must stay valid for `size` bytes until the buffer is freed.
    pub unsafe fn buffer_wrap_host(
        &self,
        device: u32,
        ptr: *mut u8,
        size: u64,
    ) -> Result<RawBuffer, BackendError> {
        let Some(f) = self.api.buffer_wrap_host else {
            return Err(BackendError::unsupported(
                "the plugin cannot wrap host memory",
            ));
        };
        let mut out: KilnBuffer = core::ptr::null_mut();
        // SAFETY: present in the table; the caller keeps `ptr` alive.
        call(|err| unsafe { f(self.ctx, device, ptr.cast(), size, &mut out, err) })?;
        if out.is_null() {
            return Err(BackendError::new(
                ErrorCode::Internal,
                "buffer_wrap_host succeeded but returned a null buffer",
            ));
        }
        Ok(RawBuffer(out))
    }

    /// Frees a buffer this backend made. The caller must not use it again.
    pub fn buffer_free(&self, buffer: RawBuffer) -> Result<(), BackendError> {
        let f = self.api.buffer_free.expect("checked in negotiate");
        // SAFETY: as in `device_count`; the handle is one of ours.
        call(|err| unsafe { f(self.ctx, buffer.0, err) })
    }

    pub fn buffer_write(
        &self,
        buffer: RawBuffer,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        let f = self.api.buffer_write.expect("checked in negotiate");
        // SAFETY: `data` is readable for its length for the whole call.
        call(|err| unsafe {
            f(
                self.ctx,
                buffer.0,
                offset,
                data.as_ptr().cast(),
                data.len() as u64,
                err,
            )
        })
    }

    pub fn buffer_read(
        &self,
        buffer: RawBuffer,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), BackendError> {
        let f = self.api.buffer_read.expect("checked in negotiate");
        // SAFETY: `out` is writable for its length for the whole call.
        call(|err| unsafe {
            f(
                self.ctx,
                buffer.0,
                offset,
                out.as_mut_ptr().cast(),
                out.len() as u64,
                err,
            )
        })
    }

    pub fn buffer_copy(
        &self,
        src: RawBuffer,
        src_offset: u64,
        dst: RawBuffer,
        dst_offset: u64,
        size: u64,
    ) -> Result<(), BackendError> {
        let f = self.api.buffer_copy.expect("checked in negotiate");
        // SAFETY: as in `device_count`.
        call(|err| unsafe { f(self.ctx, src.0, src_offset, dst.0, dst_offset, size, err) })
    }

    /// Whether the device can run `op` over `tensors` (buffers may be null).
    pub fn supports_op(
        &self,
        device: u32,
        op: &KilnOp,
        tensors: &[KilnTensor],
    ) -> Result<bool, BackendError> {
        let f = self.api.supports_op.expect("checked in negotiate");
        let mut out = 0u32;
        // SAFETY: `op` and `tensors` are live for the call.
        call(|err| unsafe {
            f(
                self.ctx,
                device,
                op,
                tensors.as_ptr(),
                tensors.len() as u32,
                &mut out,
                err,
            )
        })?;
        Ok(out != 0)
    }

    /// Submits a graph. On an asynchronous device the work may still be
    /// running when this returns; call [`Self::synchronize`].
    pub fn graph_compute(
        &self,
        device: u32,
        tensors: &[KilnTensor],
        ops: &[KilnOp],
    ) -> Result<(), BackendError> {
        self.graph_compute_threads(device, tensors, ops, 0)
    }

    /// [`Self::graph_compute`] on at most `threads` CPU threads (0: the
    /// backend's choice); sent as 0 to a backend older than ABI 1.3.
    pub fn graph_compute_threads(
        &self,
        device: u32,
        tensors: &[KilnTensor],
        ops: &[KilnOp],
        threads: u32,
    ) -> Result<(), BackendError> {
        let f = self.api.graph_compute.expect("checked in negotiate");
        let graph = KilnGraph {
            struct_size: size_of::<KilnGraph>() as u32,
            n_tensors: tensors.len() as u32,
            tensors: tensors.as_ptr(),
            n_ops: ops.len() as u32,
            threads: if self.abi_minor() >= 3 { threads } else { 0 },
            ops: ops.as_ptr(),
        };
        // SAFETY: the graph and its arrays are live for the call.
        call(|err| unsafe { f(self.ctx, device, &graph, err) })
    }

    pub fn synchronize(&self, device: u32) -> Result<(), BackendError> {
        let f = self.api.synchronize.expect("checked in negotiate");
        // SAFETY: as in `device_count`.
        call(|err| unsafe { f(self.ctx, device, err) })
    }
}
