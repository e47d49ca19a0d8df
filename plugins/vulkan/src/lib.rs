//! kiln's Vulkan backend, a plugin like any vendor's: it uses only the
//! public ABI (`kiln-plugin-api`, the Rust side of `kiln_backend.h`) and
//! its manifest. See `plugins/vulkan/README.md`.
//!
//! - [`vulkan`]: the loader, opened at run time (no Vulkan: no devices),
//!   and each device: its queue, memory types, pipelines.
//! - [`ops`]: which ops and types the shaders run, and the checks that
//!   keep a shader inside its tensors.
//! - [`graph`]: a graph as one command buffer: an op record and a
//!   descriptor set per op, a barrier between ops, one submission.

mod graph;
mod ops;
mod vulkan;

use kiln_plugin_api::{
    Backend, BackendError, DType, DeviceInfo, ErrorCode, Graph, HostServices, Op, OpKind, Tensors,
};
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
pub use vulkan::Buffer;

pub struct VulkanBackend {
    vk: Option<vulkan::Instance>,
    /// Ops declined on purpose (`KILN_VULKAN_DISABLE_OPS`).
    disabled: Vec<OpKind>,
    /// A failure to simulate (`KILN_VULKAN_FAULT`).
    fault: Option<Fault>,
    _host: HostServices,
}

/// `KILN_VULKAN_FAULT=lost:N` or `oom:N`: the Nth graph of a model's size
/// (at least [`Fault::MODEL_OPS`] ops; the gate's are smaller) fails as a
/// lost device (and every call after it fails too) or as out of memory
/// (once). For testing how the host copes; never set in use.
struct Fault {
    lost_for_good: bool,
    at: u32,
    graphs: AtomicU32,
    lost: AtomicBool,
}

impl Fault {
    const MODEL_OPS: u32 = 20;

    fn parse(spec: &str) -> Option<Fault> {
        let (kind, at) = spec.split_once(':')?;
        Some(Fault {
            lost_for_good: match kind {
                "lost" => true,
                "oom" => false,
                _ => return None,
            },
            at: at.parse().ok()?,
            graphs: AtomicU32::new(0),
            lost: AtomicBool::new(false),
        })
    }
}

impl VulkanBackend {
    fn device(&self, device: u32) -> Result<&vulkan::Device, BackendError> {
        self.vk
            .as_ref()
            .and_then(|vk| vk.devices.get(device as usize))
            .ok_or_else(|| BackendError::invalid(format!("no Vulkan device {device}")))
    }

    /// The device, unless a simulated loss took it.
    fn live(&self, device: u32) -> Result<&vulkan::Device, BackendError> {
        if self
            .fault
            .as_ref()
            .is_some_and(|f| f.lost.load(Ordering::SeqCst))
        {
            return Err(BackendError::new(
                ErrorCode::Device,
                "VK_ERROR_DEVICE_LOST (simulated: KILN_VULKAN_FAULT)",
            ));
        }
        self.device(device)
    }

    /// Fails this graph if `KILN_VULKAN_FAULT` says so.
    fn inject(&self, n_ops: u32) -> Result<(), BackendError> {
        let Some(f) = self.fault.as_ref().filter(|_| n_ops >= Fault::MODEL_OPS) else {
            return Ok(());
        };
        if f.graphs.fetch_add(1, Ordering::SeqCst) + 1 != f.at {
            return Ok(());
        }
        if f.lost_for_good {
            f.lost.store(true, Ordering::SeqCst);
            return Err(BackendError::new(
                ErrorCode::Device,
                "VK_ERROR_DEVICE_LOST (simulated: KILN_VULKAN_FAULT)",
            ));
        }
        Err(BackendError::new(
            ErrorCode::OutOfMemory,
            "VK_ERROR_OUT_OF_DEVICE_MEMORY (simulated: KILN_VULKAN_FAULT)",
        ))
    }
}

impl Backend for VulkanBackend {
    type Buffer = Buffer;
    const NAME: &'static CStr = c"vulkan";
    const VERSION: &'static CStr = c"0.1.0";

    fn new(host: HostServices) -> Result<Self, BackendError> {
        use kiln_plugin_api::abi::{KILN_LOG_INFO, KILN_LOG_WARN};
        let vk = match vulkan::Instance::open() {
            Ok(vk) => {
                // Why a device is not offered: a warning when that leaves
                // none (`kiln backends` shows it), else a note.
                let level = if vk.devices.is_empty() {
                    KILN_LOG_WARN
                } else {
                    KILN_LOG_INFO
                };
                for note in &vk.notes {
                    host.log(level, note);
                }
                for (i, d) in vk.devices.iter().enumerate() {
                    let paths = d.limits.describe();
                    host.log(
                        KILN_LOG_INFO,
                        &format!("device {i} ({}): {paths}", d.info.name),
                    );
                }
                Some(vk)
            }
            Err(why) => {
                // No loader or no driver: no devices, and the host goes on
                // with the CPU.
                host.log(KILN_LOG_WARN, &format!("no Vulkan devices: {why}"));
                None
            }
        };
        let mut disabled = Vec::new();
        for name in std::env::var("KILN_VULKAN_DISABLE_OPS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            match (1..=32)
                .filter_map(OpKind::from_raw)
                .find(|k| k.name().eq_ignore_ascii_case(name))
            {
                Some(k) => disabled.push(k),
                None => host.log(
                    kiln_plugin_api::abi::KILN_LOG_WARN,
                    &format!("KILN_VULKAN_DISABLE_OPS: no op named {name:?}"),
                ),
            }
        }
        let fault = std::env::var("KILN_VULKAN_FAULT").ok().and_then(|spec| {
            let f = Fault::parse(&spec);
            if f.is_none() {
                host.log(
                    kiln_plugin_api::abi::KILN_LOG_WARN,
                    &format!("KILN_VULKAN_FAULT={spec:?} is not lost:N or oom:N; ignored"),
                );
            }
            f
        });
        Ok(VulkanBackend {
            vk,
            disabled,
            fault,
            _host: host,
        })
    }

    fn device_count(&self) -> u32 {
        self.vk.as_ref().map_or(0, |vk| vk.devices.len() as u32)
    }

    fn device_info(&self, device: u32) -> Result<DeviceInfo, BackendError> {
        let d = self.device(device)?;
        let mut info = d.info.clone();
        if let Some((free, _)) = d.memory_budget() {
            info.free_memory = free;
        }
        Ok(info)
    }

    fn device_memory(&self, device: u32) -> Result<(u64, u64), BackendError> {
        let d = self.device(device)?;
        Ok(d.memory_budget()
            .unwrap_or((d.info.free_memory, d.info.total_memory)))
    }

    fn weight_layout(&self, _device: u32, dtype: DType) -> DType {
        dtype
    }

    fn buffer_alloc(&self, device: u32, size: u64) -> Result<Buffer, BackendError> {
        self.live(device)?.alloc(device, size)
    }

    fn buffer_write(&self, b: &Buffer, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.live(b.device)?.write(b, offset, data)
    }

    fn buffer_read(&self, b: &Buffer, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.live(b.device)?.read(b, offset, out)
    }

    fn buffer_copy(
        &self,
        src: &Buffer,
        src_offset: u64,
        dst: &Buffer,
        dst_offset: u64,
        size: u64,
    ) -> Result<(), BackendError> {
        if src.device != dst.device {
            return Err(BackendError::invalid(
                "buffer_copy between two Vulkan devices",
            ));
        }
        self.live(src.device)?
            .copy(src, src_offset, dst, dst_offset, size)
    }

    fn supports_op(&self, device: u32, op: &Op, tensors: &Tensors<'_, Buffer>) -> bool {
        !self.disabled.contains(&op.kind)
            && self
                .device(device)
                .is_ok_and(|d| ops::plan(op, tensors, &d.limits).is_ok())
    }

    fn graph_compute(&self, device: u32, g: &Graph<'_, Buffer>) -> Result<(), BackendError> {
        let d = self.live(device)?;
        self.inject(g.n_ops())?;
        graph::submit(d, g)
    }

    fn synchronize(&self, device: u32) -> Result<(), BackendError> {
        self.live(device)?.wait()
    }
}

kiln_plugin_api::export_backend!(VulkanBackend);
