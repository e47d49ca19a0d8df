//! The CPU backend behind the ABI: host-memory buffers and graph execution
//! through the reference ops. One device: this machine's CPU.

use crate::kernels;
use crate::ops::{self, Desc, View};
use kiln_plugin_api::abi::{KILN_CAP_HOST_MEMORY, KILN_CAP_UNIFIED_MEMORY};
use kiln_plugin_api::plugin::Tensor;
use kiln_plugin_api::{
    Backend, BackendError, DeviceInfo, DeviceKind, ErrorCode, Graph, HostServices, Op, OpKind,
    Tensors,
};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ffi::CStr;
use std::ptr::NonNull;

/// Every buffer and tensor offset is aligned to this.
const ALIGN: usize = 64;

/// Memory the CPU backend computes on: its own allocation or wrapped host memory.
pub struct CpuBuffer {
    ptr: NonNull<u8>,
    len: usize,
    /// `Some` when we allocated it and must free it.
    layout: Option<Layout>,
}

// SAFETY: the buffer is plain memory; the ABI's contract (the host never
// frees a buffer in use, serialises compute per device) prevents races
// that Rust could not see.
unsafe impl Send for CpuBuffer {}
// SAFETY: as above.
unsafe impl Sync for CpuBuffer {}

impl Drop for CpuBuffer {
    fn drop(&mut self) {
        if let Some(layout) = self.layout {
            // SAFETY: allocated by `alloc_zeroed` with exactly this layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

impl CpuBuffer {
    fn range(&self, offset: u64, size: u64) -> Result<*mut u8, BackendError> {
        let end = offset.checked_add(size);
        match end {
            Some(end) if end <= self.len as u64 => {
                // SAFETY: offset <= len, so the pointer stays inside the allocation.
                Ok(unsafe { self.ptr.as_ptr().add(offset as usize) })
            }
            _ => Err(BackendError::invalid(format!(
                "range {offset}+{size} is outside a buffer of {} bytes",
                self.len
            ))),
        }
    }
}

/// The CPU reference backend.
pub struct CpuBackend {
    info: DeviceInfo,
    /// The kernel path (`Isa::current`, or `Reference` for the oracle),
    /// fixed at creation.
    isa: kernels::Isa,
    /// Per op kind, weight type and shape: calls and seconds, when
    /// `KILN_CPU_PROFILE` is set ([`CpuBackend::report`]).
    profile: Option<std::sync::Mutex<std::collections::BTreeMap<String, (u64, f64)>>>,
    _host: HostServices,
}

impl CpuBackend {
    /// With `KILN_CPU_PROFILE` set: the time spent so far per op kind,
    /// first source type and shape, to stderr after each graph (meant for
    /// `kiln bench --decode-tokens 1`, whose last table covers the run).
    fn report(&self) {
        let Some(profile) = &self.profile else { return };
        let p = profile.lock().unwrap_or_else(|e| e.into_inner());
        let total: f64 = p.values().map(|v| v.1).sum();
        let mut rows: Vec<_> = p.iter().collect();
        rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        eprintln!("kiln cpu profile: {total:.3} s in ops");
        for (key, (calls, secs)) in rows {
            eprintln!(
                "  {:6.2} %  {secs:8.3} s  {calls:8} calls  {key}",
                100.0 * secs / total.max(1e-12)
            );
        }
    }
}

impl CpuBackend {
    fn check_device(&self, device: u32) -> Result<(), BackendError> {
        if device == 0 {
            Ok(())
        } else {
            Err(BackendError::invalid(format!(
                "the CPU backend has one device (0), not {device}"
            )))
        }
    }
}

fn desc_of<B>(t: &Tensor<'_, B>) -> Result<Desc, BackendError> {
    let usize_of =
        |v: i64| usize::try_from(v).map_err(|_| BackendError::invalid("extent overflows"));
    let usize_nb =
        |v: u64| usize::try_from(v).map_err(|_| BackendError::invalid("stride overflows"));
    Ok(Desc {
        dtype: t.dtype,
        ne: [
            usize_of(t.ne[0])?,
            usize_of(t.ne[1])?,
            usize_of(t.ne[2])?,
            usize_of(t.ne[3])?,
        ],
        nb: [
            usize_nb(t.nb[0])?,
            usize_nb(t.nb[1])?,
            usize_nb(t.nb[2])?,
            usize_nb(t.nb[3])?,
        ],
    })
}

/// The descriptions of an op's sources (the first `op.srcs().len()` of the
/// array; no allocation on this per-op path) and of its destination.
fn descs(op: &Op, tensors: &Tensors<'_, CpuBuffer>) -> Result<([Desc; 4], Desc), BackendError> {
    let dst = desc_of(&tensors.get(op.dst)?)?;
    let mut src = [dst; 4];
    for (slot, &i) in src.iter_mut().zip(op.srcs()) {
        *slot = desc_of(&tensors.get(i)?)?;
    }
    Ok((src, dst))
}

fn view(tensors: &Tensors<'_, CpuBuffer>, index: u32) -> Result<View, BackendError> {
    let t = tensors.get(index)?;
    let desc = desc_of(&t)?;
    let buffer = t
        .buffer
        .ok_or_else(|| BackendError::invalid(format!("tensor {index} has no buffer")))?;
    let extent = desc
        .extent()
        .ok_or_else(|| BackendError::invalid(format!("tensor {index}: extent overflows")))?;
    let data = buffer.range(t.offset, extent as u64).map_err(|e| {
        BackendError::invalid(format!(
            "tensor {index} does not fit its buffer: {}",
            e.message
        ))
    })?;
    Ok(View { data, desc })
}

/// Whether two views' bytes do not overlap (their extents were checked
/// against their buffers when they were made).
fn apart(a: &View, b: &View) -> bool {
    let span = |v: &View| {
        let start = v.data as usize;
        (start, start + v.desc.extent().unwrap_or(usize::MAX - start))
    };
    let ((a0, a1), (b0, b1)) = (span(a), span(b));
    a1 <= b0 || b1 <= a0
}

fn total_memory() -> u64 {
    meminfo_kib("MemTotal:").unwrap_or(0) * 1024
}

fn free_memory() -> u64 {
    meminfo_kib("MemAvailable:").unwrap_or(0) * 1024
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The CPU's brand string, from /proc/cpuinfo where there is one.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| format!("{} CPU", std::env::consts::ARCH))
}

/// FNV-1a of the name: stable across runs on one machine model.
fn uuid_of(name: &str) -> [u8; 16] {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in name.bytes() {
        h = (h ^ b as u128).wrapping_mul(0x0000000001000000000000000000013B);
    }
    h.to_le_bytes()
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;

    const NAME: &'static CStr = c"cpu";
    const VERSION: &'static CStr = {
        // The crate version, NUL-terminated at compile time.
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(s) => s,
            Err(_) => panic!("version has no interior NUL"),
        }
    };

    fn new(host: HostServices) -> Result<Self, BackendError> {
        let name = cpu_name();
        Ok(CpuBackend {
            info: DeviceInfo {
                kind: DeviceKind::Cpu,
                uuid: uuid_of(&name),
                name,
                total_memory: total_memory(),
                free_memory: 0,
                capabilities: KILN_CAP_HOST_MEMORY | KILN_CAP_UNIFIED_MEMORY,
                max_buffer_size: 0,
                buffer_alignment: ALIGN as u32,
            },
            isa: crate::isa_for_new_backend(),
            profile: std::env::var_os("KILN_CPU_PROFILE").map(|_| Default::default()),
            _host: host,
        })
    }

    fn device_count(&self) -> u32 {
        1
    }

    fn device_info(&self, device: u32) -> Result<DeviceInfo, BackendError> {
        self.check_device(device)?;
        Ok(DeviceInfo {
            free_memory: free_memory(),
            ..self.info.clone()
        })
    }

    /// Q5_0 interleaved for the AVX-512 kernels, Q4_0 for them and the
    /// AVX2 ones ([`kernels::weight_layout`]); the reference (and every
    /// other path) takes GGUF's layouts.
    fn weight_layout(&self, _device: u32, dtype: kiln_plugin_api::DType) -> kiln_plugin_api::DType {
        kernels::weight_layout(self.isa, dtype)
    }

    fn buffer_alloc(&self, device: u32, size: u64) -> Result<CpuBuffer, BackendError> {
        self.check_device(device)?;
        let len = usize::try_from(size)
            .ok()
            .filter(|&n| n <= isize::MAX as usize - ALIGN)
            .ok_or_else(|| {
                BackendError::new(
                    ErrorCode::OutOfMemory,
                    format!("cannot allocate {size} bytes"),
                )
            })?;
        let layout = Layout::from_size_align(len.max(1), ALIGN).expect("size checked above");
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or_else(|| {
            BackendError::new(
                ErrorCode::OutOfMemory,
                format!("cannot allocate {size} bytes"),
            )
        })?;
        Ok(CpuBuffer {
            ptr,
            len,
            layout: Some(layout),
        })
    }

    unsafe fn buffer_wrap_host(
        &self,
        device: u32,
        ptr: *mut u8,
        size: u64,
    ) -> Result<CpuBuffer, BackendError> {
        self.check_device(device)?;
        let ptr = NonNull::new(ptr).ok_or_else(|| BackendError::invalid("host pointer is null"))?;
        let len = usize::try_from(size).map_err(|_| BackendError::invalid("size overflows"))?;
        Ok(CpuBuffer {
            ptr,
            len,
            layout: None,
        })
    }

    fn buffer_write(
        &self,
        buffer: &CpuBuffer,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        let dst = buffer.range(offset, data.len() as u64)?;
        // SAFETY: `range` checked that the destination is inside the buffer.
        unsafe { std::ptr::copy(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    fn buffer_read(
        &self,
        buffer: &CpuBuffer,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), BackendError> {
        let src = buffer.range(offset, out.len() as u64)?;
        // SAFETY: `range` checked that the source is inside the buffer.
        unsafe { std::ptr::copy(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn buffer_copy(
        &self,
        src: &CpuBuffer,
        src_offset: u64,
        dst: &CpuBuffer,
        dst_offset: u64,
        size: u64,
    ) -> Result<(), BackendError> {
        let (s, d) = (src.range(src_offset, size)?, dst.range(dst_offset, size)?);
        // SAFETY: both ranges are inside their buffers; `copy` allows overlap.
        unsafe { std::ptr::copy(s, d, size as usize) };
        Ok(())
    }

    fn supports_op(&self, device: u32, op: &Op, tensors: &Tensors<'_, CpuBuffer>) -> bool {
        device == 0
            && descs(op, tensors)
                .map(|(src, dst)| {
                    ops::check(op.kind, &src[..op.srcs().len()], &dst, &op.params).is_ok()
                })
                .unwrap_or(false)
    }

    fn graph_compute(&self, device: u32, graph: &Graph<'_, CpuBuffer>) -> Result<(), BackendError> {
        self.check_device(device)?;
        // The host's share of threads for this graph (ABI 1.3), on a pool
        // of the calling thread's own; 0: the shared pool.
        kernels::with_threads(graph.threads as usize, || self.compute(graph))?;
        self.report();
        Ok(())
    }
}

impl CpuBackend {
    /// Runs every op of `graph`.
    fn compute(&self, graph: &Graph<'_, CpuBuffer>) -> Result<(), BackendError> {
        // The last op, where it was a product: its activations and its
        // result, for `kernels::run_after`'s `x_kept`.
        let mut last_product: Option<(View, View)> = None;
        for i in 0..graph.n_ops() {
            let op = graph.op(i)?;
            let n_src = op.srcs().len();
            let (src_descs, dst_desc) = descs(&op, &graph.tensors).map_err(|e| e.at_op(i))?;
            ops::check(op.kind, &src_descs[..n_src], &dst_desc, &op.params)
                .map_err(|m| BackendError::unsupported(m).at_op(i))?;
            let dst = view(&graph.tensors, op.dst).map_err(|e| e.at_op(i))?;
            let mut src = [dst; 4];
            for (slot, &t) in src.iter_mut().zip(op.srcs()) {
                *slot = view(&graph.tensors, t).map_err(|e| e.at_op(i))?;
            }
            let started = self.profile.as_ref().map(|_| std::time::Instant::now());
            // SAFETY: every view was bounds-checked against its buffer above,
            // and `check` accepted the op's shapes.
            let x_kept = op.kind == OpKind::MulMat
                && last_product.is_some_and(|(x, out)| {
                    x.data == src[1].data && x.desc == src[1].desc && apart(&out, &x)
                });
            last_product = (op.kind == OpKind::MulMat).then_some((src[1], dst));
            // SAFETY: as above; `x_kept` only where the product before
            // this one read the same view and wrote elsewhere.
            let fast = unsafe {
                kernels::run_after(self.isa, op.kind, &src[..n_src], &dst, &op.params, x_kept)
            };
            if fast.is_none() {
                // SAFETY: as above.
                unsafe { ops::run(op.kind, &src[..n_src], &dst, &op.params) }
                    .map_err(|m| BackendError::invalid(m).at_op(i))?;
            }
            if let (Some(profile), Some(started)) = (&self.profile, started) {
                let key = format!(
                    "{:?} {} {}x{} ({})",
                    op.kind,
                    src_descs[0].dtype,
                    src_descs[0].ne[0],
                    src_descs[0].ne[1],
                    if fast.is_some() {
                        "kernel"
                    } else {
                        "reference"
                    }
                );
                let mut p = profile.lock().unwrap_or_else(|e| e.into_inner());
                let e = p.entry(key).or_default();
                e.0 += 1;
                e.1 += started.elapsed().as_secs_f64();
            }
        }
        Ok(())
    }
}
