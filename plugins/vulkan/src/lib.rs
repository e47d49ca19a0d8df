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

use kiln_plugin_api::{Backend, BackendError, DType, DeviceInfo, Graph, HostServices, Op, Tensors};
use std::ffi::CStr;
pub use vulkan::Buffer;

pub struct VulkanBackend {
    vk: Option<vulkan::Instance>,
    _host: HostServices,
}

impl VulkanBackend {
    fn device(&self, device: u32) -> Result<&vulkan::Device, BackendError> {
        self.vk
            .as_ref()
            .and_then(|vk| vk.devices.get(device as usize))
            .ok_or_else(|| BackendError::invalid(format!("no Vulkan device {device}")))
    }
}

impl Backend for VulkanBackend {
    type Buffer = Buffer;
    const NAME: &'static CStr = c"vulkan";
    const VERSION: &'static CStr = c"0.1.0";

    fn new(host: HostServices) -> Result<Self, BackendError> {
        let vk = match vulkan::Instance::open() {
            Ok(vk) => {
                for note in &vk.notes {
                    host.log(kiln_plugin_api::abi::KILN_LOG_INFO, note);
                }
                Some(vk)
            }
            Err(why) => {
                // No loader or no driver: no devices, and the host goes on
                // with the CPU.
                host.log(
                    kiln_plugin_api::abi::KILN_LOG_INFO,
                    &format!("no Vulkan devices: {why}"),
                );
                None
            }
        };
        Ok(VulkanBackend { vk, _host: host })
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
        self.device(device)?.alloc(device, size)
    }

    fn buffer_write(&self, b: &Buffer, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.device(b.device)?.write(b, offset, data)
    }

    fn buffer_read(&self, b: &Buffer, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.device(b.device)?.read(b, offset, out)
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
        self.device(src.device)?
            .copy(src, src_offset, dst, dst_offset, size)
    }

    fn supports_op(&self, device: u32, op: &Op, tensors: &Tensors<'_, Buffer>) -> bool {
        self.device(device)
            .is_ok_and(|d| ops::plan(op, tensors, &d.limits).is_ok())
    }

    fn graph_compute(&self, device: u32, g: &Graph<'_, Buffer>) -> Result<(), BackendError> {
        let d = self.device(device)?;
        graph::submit(d, g)
    }

    fn synchronize(&self, device: u32) -> Result<(), BackendError> {
        self.device(device)?.wait()
    }
}

kiln_plugin_api::export_backend!(VulkanBackend);
