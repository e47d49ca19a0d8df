//! The Vulkan loader, devices, memory and pipelines.
//!
//! Memory: on devices whose memory the host can see (integrated GPUs,
//! software renderers) buffers are mapped and copied into directly; on
//! discrete GPUs they are device-local and reached through a staging
//! buffer. `KILN_VULKAN_STAGING=1` forces the staging path anywhere (tests
//! run it on lavapipe).

use ash::vk;
use kiln_plugin_api::abi::{KILN_CAP_ASYNC_COMPUTE, KILN_CAP_UNIFIED_MEMORY};
use kiln_plugin_api::{BackendError, DeviceInfo, DeviceKind, ErrorCode};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// A shader's SPIR-V, compiled by build.rs.
macro_rules! spv {
    ($name:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".spv"))
    };
}

/// The shaders, in [`Shader`]'s order.
pub const SHADERS: [(Shader, &[u8]); 14] = [
    (Shader::Elementwise, spv!("elementwise")),
    (Shader::Rows, spv!("rows")),
    (Shader::Rope, spv!("rope")),
    (Shader::GetRows, spv!("get_rows")),
    (Shader::MulMat, spv!("mul_mat")),
    (Shader::Quantize, spv!("quantize")),
    (Shader::MulMatF64, spv!("mul_mat_f64")),
    (Shader::MulMatSg, spv!("mul_mat_sg")),
    (Shader::MulMatF64Sg, spv!("mul_mat_f64_sg")),
    (Shader::CpyQuantized, spv!("cpy_q")),
    (Shader::MulMm, spv!("mul_mm")),
    (Shader::MulMmF64, spv!("mul_mm_f64")),
    (Shader::MulMmDot, spv!("mul_mm_dot")),
    (Shader::MulMmF16, spv!("mul_mm_f16")),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    Elementwise = 0,
    Rows = 1,
    Rope = 2,
    GetRows = 3,
    MulMat = 4,
    Quantize = 5,
    /// MUL_MAT summing in double: the CPU's results to the last bit.
    MulMatF64 = 6,
    /// The two MUL_MATs reduced with subgroup operations.
    MulMatSg = 7,
    MulMatF64Sg = 8,
    /// CPY into a 32-element quantized type.
    CpyQuantized = 9,
    /// MUL_MAT in tiles through shared memory, for prompts.
    MulMm = 10,
    MulMmF64 = 11,
    /// Tiled, with packed 8-bit integer dot products (quantized weights).
    MulMmDot = 12,
    /// Tiled, with f16 arithmetic (F16 weights).
    MulMmF16 = 13,
}

impl Shader {
    /// Whether the device can run this shader.
    fn runs_on(self, limits: &Limits) -> bool {
        match self {
            Shader::MulMatF64 => limits.f64,
            Shader::MulMatSg => limits.subgroups,
            Shader::MulMatF64Sg => limits.f64 && limits.subgroups,
            Shader::MulMm => limits.tiles,
            Shader::MulMmF64 => limits.f64 && limits.tiles,
            Shader::MulMmDot => limits.dot && limits.tiles,
            Shader::MulMmF16 => limits.fp16 && limits.tiles,
            _ => true,
        }
    }
}

/// Shared memory a workgroup of mul_mm.glsl declares: two tiles of 32
/// rows of 65 words, 32 rows of 16 scales twice, 32 columns of 8 scales
/// and 16 sums.
const TILE_SHARED_BYTES: u32 = 4 * (2 * 32 * 65 + 2 * 32 * 16 + 32 * 8 + 32 * 16);

/// Bindings per op: the record, two sources, the destination and the
/// device's scratch.
pub const BINDINGS: u32 = 5;

pub fn vk_error(what: &str, r: vk::Result) -> BackendError {
    let code = match r {
        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
            ErrorCode::OutOfMemory
        }
        _ => ErrorCode::Device,
    };
    BackendError::new(code, format!("{what}: {r}"))
}

/// What the shaders' addressing and the device allow.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes one binding may span.
    pub max_range: u64,
    /// A binding's offset is a multiple of this.
    pub offset_align: u64,
    pub max_groups: u32,
    /// MUL_MAT sums in double: the device has shaderFloat64 (enabled) and
    /// runs it at speed (a CPU implementation), or `KILN_VULKAN_F64=1`.
    pub f64: bool,
    /// Compute shaders have subgroup arithmetic: MUL_MAT reduces with it.
    pub subgroups: bool,
    /// Workgroups have the shared memory of mul_mm.glsl's tiles: prompts'
    /// MUL_MATs run tiled.
    pub tiles: bool,
    /// Tiled MUL_MATs of quantized weights take packed 8-bit dot products:
    /// the device has shaderIntegerDotProduct (enabled) and accelerates
    /// the signed 4×8-bit packed form, or `KILN_VULKAN_DOT=1`.
    pub dot: bool,
    /// Tiled MUL_MATs of F16 weights multiply and sum runs of 8 in f16:
    /// the device has shaderFloat16 (enabled) and is a GPU, or
    /// `KILN_VULKAN_FP16=1`.
    pub fp16: bool,
}

impl Limits {
    /// The matmul paths chosen for the device, for the log.
    pub fn describe(&self) -> String {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        format!(
            "matmul sums in {}, subgroup reductions: {}, tiled prompts: {}, packed 8-bit dot products: {}, f16 arithmetic: {}",
            if self.f64 { "double" } else { "float" },
            yes_no(self.subgroups),
            yes_no(self.tiles),
            yes_no(self.dot && self.tiles && !self.f64),
            yes_no(self.fp16 && self.tiles && !self.f64),
        )
    }
}

pub struct Instance {
    pub devices: Vec<Device>,
    /// What the host should log: hidden devices and why.
    pub notes: Vec<String>,
    // Dropped after the devices.
    instance: ash::Instance,
    _entry: ash::Entry,
}

pub struct Device {
    pub info: DeviceInfo,
    pub limits: Limits,
    pub device: ash::Device,
    physical: vk::PhysicalDevice,
    instance: ash::Instance,
    has_budget: bool,
    /// Memory types: buffers (and whether they are mapped), staging and
    /// op records (host-visible, coherent).
    buffer_type: u32,
    mapped: bool,
    host_type: u32,
    pub set_layout: vk::DescriptorSetLayout,
    pub pipeline_layout: vk::PipelineLayout,
    /// By shader, made on first use: a device runs one of the MUL_MAT
    /// variants, and most graphs need only some of the shaders.
    pipelines: Mutex<HashMap<Shader, vk::Pipeline>>,
    /// The queue, its command pool and the work in flight: one submission
    /// stream (the host serialises compute per device; transfers take the
    /// lock too).
    queue: Mutex<Queue>,
}

pub struct Queue {
    pub queue: vk::Queue,
    pub pool: vk::CommandPool,
    pub fence: vk::Fence,
    /// The graph submitted and not yet waited for.
    pub in_flight: Option<vk::CommandBuffer>,
    /// Kept between calls and grown as needed, so that a decode step
    /// allocates nothing: the op records of the last graph (in use until
    /// it finishes), its descriptor pool and how many sets it holds, and
    /// the staging buffer of transfers to and from device-local memory,
    /// and the scratch of the shaders (MUL_MAT's rounded activations).
    pub records: Option<Buffer>,
    pub descriptors: vk::DescriptorPool,
    pub descriptor_sets: u32,
    staging: Option<Buffer>,
    pub scratch: Option<Buffer>,
}

/// A device buffer.
pub struct Buffer {
    pub device: u32,
    pub buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    /// Usable bytes (the allocation is rounded up to whole 16-byte words,
    /// so a shader's last word load stays inside it).
    pub size: u64,
    pub capacity: u64,
    mapped: *mut u8,
    owner: ash::Device,
}

// SAFETY: `mapped` points into memory owned by this buffer and mapped for
// its whole life; the ABI's contract keeps concurrent calls on one buffer
// apart (the host never frees a buffer in use), and copies through it
// happen under the device's queue lock.
unsafe impl Send for Buffer {}
// SAFETY: as above.
unsafe impl Sync for Buffer {}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: the host frees a buffer only when no call uses it, and a
        // graph that used it was waited for (`Device::wait` before any
        // buffer call returns, and at the end of the host's run).
        unsafe {
            if !self.mapped.is_null() {
                self.owner.unmap_memory(self.memory);
            }
            self.owner.destroy_buffer(self.buffer, None);
            self.owner.free_memory(self.memory, None);
        }
    }
}

impl Buffer {
    /// The mapped bytes, when the buffer is host-visible.
    pub fn host_bytes(&self) -> Option<*mut u8> {
        (!self.mapped.is_null()).then_some(self.mapped)
    }
}

fn vendor(id: u32) -> &'static str {
    match id {
        0x1002 => "AMD",
        0x10de => "NVIDIA",
        0x8086 => "Intel",
        0x13b5 => "ARM",
        0x5143 => "Qualcomm",
        0x106b => "Apple",
        0x1010 => "Imagination",
        0x10005 => "Mesa",
        _ => "unknown vendor",
    }
}

fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// A switch that is on (`1`), off (`0`) or left to the device (unset).
fn env_choice(name: &str) -> Option<bool> {
    match std::env::var(name).ok()?.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

impl Instance {
    /// Opens the loader and every usable device. Software devices
    /// (lavapipe) are hidden unless `KILN_VULKAN_ALLOW_CPU=1`.
    pub fn open() -> Result<Instance, String> {
        // SAFETY: loading the system's Vulkan loader runs its initialisers;
        // that is what using Vulkan means.
        let entry = unsafe { ash::Entry::load() }
            .map_err(|e| format!("no Vulkan loader (libvulkan.so.1): {e}"))?;
        let app = vk::ApplicationInfo::default()
            .application_name(c"kiln")
            .api_version(vk::API_VERSION_1_1);
        let create = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: a valid create info; the instance is destroyed in Drop.
        let instance = unsafe { entry.create_instance(&create, None) }.map_err(|e| {
            format!("vkCreateInstance failed ({e}): is a Vulkan driver (ICD) installed?")
        })?;
        let mut notes = Vec::new();
        let mut devices = Vec::new();
        // SAFETY: a live instance.
        let physical = unsafe { instance.enumerate_physical_devices() }.unwrap_or_default();
        if physical.is_empty() {
            notes.push("the Vulkan loader found no devices (no ICD installed?)".into());
        }
        let allow_cpu = env_on("KILN_VULKAN_ALLOW_CPU");
        for pd in physical {
            // SAFETY: `pd` comes from this instance.
            let props = unsafe { instance.get_physical_device_properties(pd) };
            let name = props
                .device_name_as_c_str()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            if props.device_type == vk::PhysicalDeviceType::CPU && !allow_cpu {
                notes.push(format!(
                    "Vulkan device {name} is a CPU implementation, hidden (KILN_VULKAN_ALLOW_CPU=1 shows it)"
                ));
                continue;
            }
            match Device::open(&instance, pd) {
                Ok(d) => devices.push(d),
                Err(e) => notes.push(format!("Vulkan device {name} cannot be used: {e}")),
            }
        }
        Ok(Instance {
            devices,
            notes,
            instance,
            _entry: entry,
        })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.devices.clear();
        // SAFETY: every device made from it is gone.
        unsafe { self.instance.destroy_instance(None) };
    }
}

impl Device {
    fn open(instance: &ash::Instance, pd: vk::PhysicalDevice) -> Result<Device, String> {
        // The unsafe calls here: `pd` comes from `instance`, every create
        // info is valid for its call, and what is created is destroyed in
        // Drop once the Device is built (a device failing before that, once
        // at load, keeps what it had made).
        // SAFETY: handles of this instance and device; valid create infos.
        let props = unsafe { instance.get_physical_device_properties(pd) };
        let mut id = vk::PhysicalDeviceIDProperties::default();
        let mut driver = vk::PhysicalDeviceDriverProperties::default();
        let mut maintenance3 = vk::PhysicalDeviceMaintenance3Properties::default();
        let mut subgroup = vk::PhysicalDeviceSubgroupProperties::default();
        let mut dot = vk::PhysicalDeviceShaderIntegerDotProductProperties::default();
        let has_driver_props = props.api_version >= vk::API_VERSION_1_2;
        // SAFETY: handles of this instance and device; valid create infos.
        let extensions = unsafe { instance.enumerate_device_extension_properties(pd) }
            .map_err(|e| e.to_string())?;
        let has_extension = |name: &std::ffi::CStr| {
            (extensions.iter()).any(|e| e.extension_name_as_c_str().is_ok_and(|n| n == name))
        };
        // The instance asks for Vulkan 1.1: later features come through
        // their extensions, which drivers list even where they are core.
        let dot_known = has_extension(c"VK_KHR_shader_integer_dot_product");
        let f16_known = has_extension(c"VK_KHR_shader_float16_int8");
        {
            let mut props2 = vk::PhysicalDeviceProperties2::default()
                .push_next(&mut id)
                .push_next(&mut maintenance3)
                .push_next(&mut subgroup);
            if dot_known {
                props2 = props2.push_next(&mut dot);
            }
            if has_driver_props {
                props2 = props2.push_next(&mut driver);
            }
            // SAFETY: handles of this instance and device; valid create infos.
            unsafe { instance.get_physical_device_properties2(pd, &mut props2) };
        }
        let has_budget = has_extension(c"VK_EXT_memory_budget");
        // SAFETY: handles of this instance and device; valid create infos.
        let family = unsafe { instance.get_physical_device_queue_family_properties(pd) }
            .iter()
            .position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or("no compute queue")? as u32;
        let priorities = [1.0f32];
        let queue_info = vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&priorities);
        // Doubles: where the device runs them at speed (a CPU
        // implementation; GPUs mostly at 1/16 to 1/64 of floats) the
        // matmuls sum in them and give the CPU's results to the last bit.
        let cpu = props.device_type == vk::PhysicalDeviceType::CPU;
        // SAFETY: handles of this instance and device; valid create infos.
        let has_f64 = unsafe { instance.get_physical_device_features(pd) }.shader_float64 != 0
            && !env_on("KILN_VULKAN_NO_F64")
            && env_choice("KILN_VULKAN_F64").unwrap_or(cpu);
        // Packed 8-bit dot products: where the device accelerates them.
        let mut dot_features = vk::PhysicalDeviceShaderIntegerDotProductFeatures::default();
        if dot_known {
            let mut features2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut dot_features);
            // SAFETY: handles of this instance and device; valid create infos.
            unsafe { instance.get_physical_device_features2(pd, &mut features2) };
        }
        let has_dot = dot_features.shader_integer_dot_product != 0
            && env_choice("KILN_VULKAN_DOT")
                .unwrap_or(dot.integer_dot_product4x8_bit_packed_signed_accelerated != 0);
        // f16 arithmetic: on GPUs (a CPU implementation emulates it).
        let mut f16_features = vk::PhysicalDeviceShaderFloat16Int8Features::default();
        if f16_known {
            let mut features2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut f16_features);
            // SAFETY: handles of this instance and device; valid create infos.
            unsafe { instance.get_physical_device_features2(pd, &mut features2) };
        }
        let has_fp16 =
            f16_features.shader_float16 != 0 && env_choice("KILN_VULKAN_FP16").unwrap_or(!cpu);
        let features = vk::PhysicalDeviceFeatures::default().shader_float64(has_f64);
        let mut enable_dot = vk::PhysicalDeviceShaderIntegerDotProductFeatures::default()
            .shader_integer_dot_product(true);
        let mut enable_f16 =
            vk::PhysicalDeviceShaderFloat16Int8Features::default().shader_float16(true);
        let mut enabled_extensions = Vec::new();
        let mut create = vk::DeviceCreateInfo::default()
            .queue_create_infos(std::slice::from_ref(&queue_info))
            .enabled_features(&features);
        if has_dot {
            create = create.push_next(&mut enable_dot);
            enabled_extensions.push(c"VK_KHR_shader_integer_dot_product".as_ptr());
        }
        if has_fp16 {
            create = create.push_next(&mut enable_f16);
            enabled_extensions.push(c"VK_KHR_shader_float16_int8".as_ptr());
        }
        let create = create.enabled_extension_names(&enabled_extensions);
        let device =
            // SAFETY: handles of this instance and device; valid create infos.
            unsafe { instance.create_device(pd, &create, None) }.map_err(|e| e.to_string())?;

        // SAFETY: handles of this instance and device; valid create infos.
        let memory = unsafe { instance.get_physical_device_memory_properties(pd) };
        let find = |want: vk::MemoryPropertyFlags| {
            (0..memory.memory_type_count).find(|&i| {
                memory.memory_types[i as usize]
                    .property_flags
                    .contains(want)
            })
        };
        let local = vk::MemoryPropertyFlags::DEVICE_LOCAL;
        let host = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let discrete = props.device_type == vk::PhysicalDeviceType::DISCRETE_GPU;
        let host_type = find(host).ok_or("no host-visible memory")?;
        let (buffer_type, mapped) = match (find(local | host), find(local)) {
            (Some(t), _) if !discrete && !env_on("KILN_VULKAN_STAGING") => (t, true),
            (_, Some(t)) => (t, false),
            _ => (host_type, true),
        };
        let total: u64 = memory.memory_heaps[..memory.memory_heap_count as usize]
            .iter()
            .filter(|h| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
            .map(|h| h.size)
            .sum();

        let name = props
            .device_name_as_c_str()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let driver_name = if has_driver_props {
            let n = driver
                .driver_name_as_c_str()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            let i = driver
                .driver_info_as_c_str()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            format!(", {n} {i}")
        } else {
            String::new()
        };
        let full_name = format!("{name} ({}{driver_name})", vendor(props.vendor_id));
        let kind = match props.device_type {
            vk::PhysicalDeviceType::DISCRETE_GPU => DeviceKind::Gpu,
            vk::PhysicalDeviceType::INTEGRATED_GPU => DeviceKind::IntegratedGpu,
            vk::PhysicalDeviceType::CPU => DeviceKind::Cpu,
            _ => DeviceKind::Accelerator,
        };
        // `KILN_VULKAN_MAX_RANGE=BYTES` narrows the binding range, as a
        // device with a small one would have it (tests run the weights'
        // row splitting with it).
        let forced = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&v| v > 0)
                .unwrap_or(u64::MAX)
        };
        let forced_range = forced("KILN_VULKAN_MAX_RANGE");
        // `KILN_VULKAN_MAX_ALLOC=BYTES` likewise narrows the largest
        // allocation (the host then places the weights in several buffers).
        let max_alloc = maintenance3
            .max_memory_allocation_size
            .min(forced("KILN_VULKAN_MAX_ALLOC"));
        let limits = Limits {
            max_range: u64::from(props.limits.max_storage_buffer_range).min(forced_range),
            offset_align: props.limits.min_storage_buffer_offset_alignment.max(4),
            max_groups: props.limits.max_compute_work_group_count[0]
                .min(props.limits.max_compute_work_group_count[1]),
            f64: has_f64,
            subgroups: subgroup
                .supported_stages
                .contains(vk::ShaderStageFlags::COMPUTE)
                && subgroup.supported_operations.contains(
                    vk::SubgroupFeatureFlags::BASIC | vk::SubgroupFeatureFlags::ARITHMETIC,
                )
                && !env_on("KILN_VULKAN_NO_SUBGROUPS"),
            tiles: props.limits.max_compute_shared_memory_size >= TILE_SHARED_BYTES
                && !env_on("KILN_VULKAN_NO_TILES"),
            dot: has_dot,
            fp16: has_fp16,
        };
        let info = DeviceInfo {
            kind,
            name: full_name,
            total_memory: total,
            free_memory: total,
            capabilities: KILN_CAP_ASYNC_COMPUTE
                | if mapped && !discrete {
                    KILN_CAP_UNIFIED_MEMORY
                } else {
                    0
                },
            max_buffer_size: max_alloc,
            buffer_alignment: limits.offset_align as u32,
            uuid: id.device_uuid,
        };

        let bindings: Vec<_> = (0..BINDINGS)
            .map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        // SAFETY: handles of this instance and device; valid create infos.
        let set_layout = unsafe {
            device.create_descriptor_set_layout(
                &vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings),
                None,
            )
        }
        .map_err(|e| e.to_string())?;
        // SAFETY: handles of this instance and device; valid create infos.
        let pipeline_layout = unsafe {
            device.create_pipeline_layout(
                &vk::PipelineLayoutCreateInfo::default()
                    .set_layouts(std::slice::from_ref(&set_layout)),
                None,
            )
        }
        .map_err(|e| e.to_string())?;
        // SAFETY: handles of this instance and device; valid create infos.
        let pool = unsafe {
            device.create_command_pool(
                &vk::CommandPoolCreateInfo::default()
                    .queue_family_index(family)
                    .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                None,
            )
        }
        .map_err(|e| e.to_string())?;
        // SAFETY: handles of this instance and device; valid create infos.
        let fence = unsafe { device.create_fence(&vk::FenceCreateInfo::default(), None) }
            .map_err(|e| e.to_string())?;
        // SAFETY: handles of this instance and device; valid create infos.
        let queue = unsafe { device.get_device_queue(family, 0) };
        let d = Device {
            info,
            limits,
            device,
            physical: pd,
            instance: instance.clone(),
            has_budget,
            buffer_type,
            mapped,
            host_type,
            set_layout,
            pipeline_layout,
            pipelines: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue {
                queue,
                pool,
                fence,
                in_flight: None,
                records: None,
                descriptors: vk::DescriptorPool::null(),
                descriptor_sets: 0,
                staging: None,
                scratch: None,
            }),
        };
        Ok(d)
    }

    /// The compute pipeline of `shader`, compiled on first use.
    pub fn pipeline(&self, shader: Shader) -> Result<vk::Pipeline, BackendError> {
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&p) = pipelines.get(&shader) {
            return Ok(p);
        }
        let (made_for, spv) = SHADERS[shader as usize];
        debug_assert_eq!(made_for, shader);
        if !shader.runs_on(&self.limits) {
            return Err(BackendError::new(
                ErrorCode::Unsupported,
                format!("{shader:?} needs a feature this device lacks"),
            ));
        }
        let failed = |what: &str, e: vk::Result| vk_error(&format!("{shader:?} {what}"), e);
        let words = ash::util::read_spv(&mut std::io::Cursor::new(spv))
            .map_err(|e| BackendError::new(ErrorCode::Internal, format!("{shader:?}: {e}")))?;
        // SAFETY: handles of this device; valid create infos.
        let module = unsafe {
            self.device
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)
        }
        .map_err(|e| failed("vkCreateShaderModule", e))?;
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main");
        let info = vk::ComputePipelineCreateInfo::default()
            .stage(stage)
            .layout(self.pipeline_layout);
        // SAFETY: handles of this device; valid create infos.
        let made = unsafe {
            self.device
                .create_compute_pipelines(vk::PipelineCache::null(), &[info], None)
        };
        // SAFETY: made by this device, no longer needed.
        unsafe { self.device.destroy_shader_module(module, None) };
        let p = made.map_err(|(_, e)| failed("vkCreateComputePipelines", e))?[0];
        pipelines.insert(shader, p);
        Ok(p)
    }

    /// (free, total) bytes of device-local memory, from the memory-budget
    /// extension.
    pub fn memory_budget(&self) -> Option<(u64, u64)> {
        if !self.has_budget {
            return None;
        }
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let mut props = vk::PhysicalDeviceMemoryProperties2::default().push_next(&mut budget);
        // SAFETY: the extension is supported by this physical device.
        unsafe {
            self.instance
                .get_physical_device_memory_properties2(self.physical, &mut props)
        };
        let heaps = props.memory_properties.memory_heaps;
        let n = props.memory_properties.memory_heap_count as usize;
        let (mut free, mut total) = (0u64, 0u64);
        for (i, heap) in heaps[..n].iter().enumerate() {
            if heap.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL) {
                free += budget.heap_budget[i].saturating_sub(budget.heap_usage[i]);
                total += heap.size;
            }
        }
        Some((free, total))
    }

    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make_buffer(
        &self,
        device: u32,
        size: u64,
        memory_type: u32,
        map: bool,
    ) -> Result<Buffer, BackendError> {
        let capacity = size.max(1).div_ceil(16) * 16;
        if capacity > self.info.max_buffer_size {
            return Err(BackendError::new(
                ErrorCode::OutOfMemory,
                format!(
                    "a buffer of {size} bytes is larger than the device allocates at once \
                     ({} bytes, maxMemoryAllocationSize)",
                    self.info.max_buffer_size
                ),
            ));
        }
        let info = vk::BufferCreateInfo::default()
            .size(capacity)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: valid create infos; everything is owned by the Buffer,
        // whose Drop frees it (also on the error paths below, once built).
        unsafe {
            let buffer = self
                .device
                .create_buffer(&info, None)
                .map_err(|e| vk_error("vkCreateBuffer", e))?;
            let req = self.device.get_buffer_memory_requirements(buffer);
            let memory_type = if req.memory_type_bits & (1 << memory_type) != 0 {
                memory_type
            } else {
                self.device.destroy_buffer(buffer, None);
                return Err(BackendError::new(
                    ErrorCode::Device,
                    "the buffer cannot live in the chosen memory type",
                ));
            };
            let memory = match self.device.allocate_memory(
                &vk::MemoryAllocateInfo::default()
                    .allocation_size(req.size)
                    .memory_type_index(memory_type),
                None,
            ) {
                Ok(m) => m,
                Err(e) => {
                    self.device.destroy_buffer(buffer, None);
                    return Err(vk_error(&format!("allocating {size} bytes"), e));
                }
            };
            let mut b = Buffer {
                device,
                buffer,
                memory,
                size,
                capacity,
                mapped: std::ptr::null_mut(),
                owner: self.device.clone(),
            };
            self.device
                .bind_buffer_memory(buffer, memory, 0)
                .map_err(|e| vk_error("vkBindBufferMemory", e))?;
            if map {
                b.mapped = self
                    .device
                    .map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
                    .map_err(|e| vk_error("vkMapMemory", e))?
                    .cast();
            }
            Ok(b)
        }
    }

    pub fn alloc(&self, device: u32, size: u64) -> Result<Buffer, BackendError> {
        self.make_buffer(device, size, self.buffer_type, self.mapped)
    }

    /// A host-visible, mapped buffer of at least `size` bytes: `kept` if it
    /// is large enough, else a new one (rounded up to a power of two, so
    /// that growing is rare).
    pub fn host_buffer(&self, kept: Option<Buffer>, size: u64) -> Result<Buffer, BackendError> {
        match kept {
            Some(b) if b.size >= size => Ok(b),
            _ => self.make_buffer(0, self.grown(size), self.host_type, true),
        }
    }

    /// A device buffer of at least `size` bytes for the shaders' scratch:
    /// `kept` if it is large enough, else a new one (a power of two).
    pub fn scratch_buffer(&self, kept: Option<Buffer>, size: u64) -> Result<Buffer, BackendError> {
        match kept {
            Some(b) if b.size >= size => Ok(b),
            _ => self.make_buffer(0, self.grown(size.max(16)), self.buffer_type, self.mapped),
        }
    }

    /// `size` rounded up to a power of two, within the largest allocation.
    fn grown(&self, size: u64) -> u64 {
        size.next_power_of_two()
            .min(self.info.max_buffer_size)
            .max(size)
    }

    /// Waits for the graph in flight and releases what it held; its error,
    /// if it failed.
    pub fn wait(&self) -> Result<(), BackendError> {
        let mut q = self.lock();
        self.wait_locked(&mut q)
    }

    pub fn wait_locked(&self, q: &mut Queue) -> Result<(), BackendError> {
        let Some(command) = q.in_flight.take() else {
            return Ok(());
        };
        // SAFETY: the fence belongs to this device and was submitted with
        // the work; the command buffer is ours and idle after it.
        unsafe {
            let waited = self.device.wait_for_fences(&[q.fence], true, u64::MAX);
            let _ = self.device.reset_fences(&[q.fence]);
            self.device.free_command_buffers(q.pool, &[command]);
            waited.map_err(|e| vk_error("the graph failed on the device", e))
        }
    }

    fn check_range(b: &Buffer, offset: u64, len: u64) -> Result<(), BackendError> {
        if offset.checked_add(len).is_none_or(|end| end > b.size) {
            return Err(BackendError::invalid(format!(
                "{len} bytes at {offset} do not fit a buffer of {}",
                b.size
            )));
        }
        Ok(())
    }

    /// Runs one transfer command buffer to completion (staging copies).
    fn run_transfer(
        &self,
        q: &mut Queue,
        record: impl FnOnce(vk::CommandBuffer),
    ) -> Result<(), BackendError> {
        // SAFETY: the queue lock is held; the command buffer is recorded,
        // submitted and waited for here.
        unsafe {
            let cb = self
                .device
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(q.pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
                .map_err(|e| vk_error("vkAllocateCommandBuffers", e))?[0];
            let result = (|| {
                self.device
                    .begin_command_buffer(
                        cb,
                        &vk::CommandBufferBeginInfo::default()
                            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                    )
                    .map_err(|e| vk_error("vkBeginCommandBuffer", e))?;
                record(cb);
                self.device
                    .end_command_buffer(cb)
                    .map_err(|e| vk_error("vkEndCommandBuffer", e))?;
                let submit = vk::SubmitInfo::default().command_buffers(std::slice::from_ref(&cb));
                self.device
                    .queue_submit(q.queue, &[submit], q.fence)
                    .map_err(|e| vk_error("vkQueueSubmit", e))?;
                let waited = self.device.wait_for_fences(&[q.fence], true, u64::MAX);
                let _ = self.device.reset_fences(&[q.fence]);
                waited.map_err(|e| vk_error("a transfer failed on the device", e))
            })();
            self.device.free_command_buffers(q.pool, &[cb]);
            result
        }
    }

    /// Bytes a staging buffer moves at a time.
    const STAGING: u64 = 16 << 20;

    pub fn write(&self, b: &Buffer, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        Self::check_range(b, offset, data.len() as u64)?;
        let mut q = self.lock();
        self.wait_locked(&mut q)?;
        if let Some(p) = b.host_bytes() {
            // SAFETY: in range (checked), mapped for the buffer's life, and
            // no work in flight.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(offset as usize), data.len())
            };
            return Ok(());
        }
        let staging = self.host_buffer(q.staging.take(), Self::STAGING.min(data.len() as u64))?;
        for (i, chunk) in data.chunks(Self::STAGING as usize).enumerate() {
            let p = staging.host_bytes().expect("mapped");
            // SAFETY: the chunk fits the staging buffer, which is idle.
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), p, chunk.len()) };
            let at = offset + i as u64 * Self::STAGING;
            self.run_transfer(&mut q, |cb| {
                let region = vk::BufferCopy::default()
                    .src_offset(0)
                    .dst_offset(at)
                    .size(chunk.len() as u64);
                // SAFETY: both buffers are live and the region is in range.
                unsafe {
                    self.device
                        .cmd_copy_buffer(cb, staging.buffer, b.buffer, &[region])
                };
            })?;
        }
        q.staging = Some(staging);
        Ok(())
    }

    pub fn read(&self, b: &Buffer, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        Self::check_range(b, offset, out.len() as u64)?;
        let mut q = self.lock();
        self.wait_locked(&mut q)?;
        if let Some(p) = b.host_bytes() {
            // SAFETY: as in `write`.
            unsafe {
                std::ptr::copy_nonoverlapping(p.add(offset as usize), out.as_mut_ptr(), out.len())
            };
            return Ok(());
        }
        let staging = self.host_buffer(q.staging.take(), Self::STAGING.min(out.len() as u64))?;
        for (i, chunk) in out.chunks_mut(Self::STAGING as usize).enumerate() {
            let at = offset + i as u64 * Self::STAGING;
            let len = chunk.len() as u64;
            self.run_transfer(&mut q, |cb| {
                let region = vk::BufferCopy::default()
                    .src_offset(at)
                    .dst_offset(0)
                    .size(len);
                // SAFETY: as in `write`.
                unsafe {
                    self.device
                        .cmd_copy_buffer(cb, b.buffer, staging.buffer, &[region])
                };
            })?;
            let p = staging.host_bytes().expect("mapped");
            // SAFETY: the transfer finished; the chunk fits the staging buffer.
            unsafe { std::ptr::copy_nonoverlapping(p, chunk.as_mut_ptr(), chunk.len()) };
        }
        q.staging = Some(staging);
        Ok(())
    }

    pub fn copy(
        &self,
        src: &Buffer,
        so: u64,
        dst: &Buffer,
        d_o: u64,
        size: u64,
    ) -> Result<(), BackendError> {
        Self::check_range(src, so, size)?;
        Self::check_range(dst, d_o, size)?;
        if size == 0 {
            return Ok(());
        }
        let mut q = self.lock();
        self.wait_locked(&mut q)?;
        self.run_transfer(&mut q, |cb| {
            let region = vk::BufferCopy::default()
                .src_offset(so)
                .dst_offset(d_o)
                .size(size);
            // SAFETY: both buffers are live and the regions are in range.
            unsafe {
                self.device
                    .cmd_copy_buffer(cb, src.buffer, dst.buffer, &[region])
            };
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.wait();
        let q = self.queue.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: nothing is in flight (waited above); these were made by
        // this device.
        unsafe {
            let _ = self.device.device_wait_idle();
            let pipelines = self.pipelines.get_mut().unwrap_or_else(|p| p.into_inner());
            for (_, p) in pipelines.drain() {
                self.device.destroy_pipeline(p, None);
            }
            self.device
                .destroy_pipeline_layout(self.pipeline_layout, None);
            self.device
                .destroy_descriptor_set_layout(self.set_layout, None);
            if q.descriptors != vk::DescriptorPool::null() {
                self.device.destroy_descriptor_pool(q.descriptors, None);
            }
            q.records = None;
            q.staging = None;
            q.scratch = None;
            self.device.destroy_fence(q.fence, None);
            self.device.destroy_command_pool(q.pool, None);
            self.device.destroy_device(None);
        }
    }
}
