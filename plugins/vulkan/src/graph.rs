//! A graph as one command buffer: per op a record (the tensors' types,
//! extents, strides and base offsets, and the params) in a host-visible
//! buffer, a descriptor set binding the record, a window of each
//! tensor's buffer and the device's scratch, a dispatch (two for a
//! MUL_MAT: its activations are rounded first), and a barrier before the
//! next one. One submission; [`crate::vulkan::Device::wait`] waits for it.

use crate::ops;
use crate::vulkan::{BINDINGS, Buffer, Device, Shader, vk_error};
use ash::vk;
use kiln_plugin_api::{BackendError, Graph, OpKind, Tensor};

/// A tensor as a shader sees it (`Tensor` in shaders/common.glsl).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TensorRecord {
    /// Byte offset of element 0 inside the bound window.
    base: u32,
    dtype: u32,
    ne: [u32; 4],
    nb: [u32; 4],
}

/// An op as a shader sees it (`Record` in shaders/common.glsl).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Record {
    s0: TensorRecord,
    s1: TensorRecord,
    d: TensorRecord,
    kind: u32,
    n_src: u32,
    params: [i32; 8],
    /// The rows [lo, hi) of src0 this dispatch holds: all of them, or a
    /// part of weights split over several dispatches.
    rows: [u32; 2],
    /// What the host side computes for the shader: ROPE's angle step.
    aux: f32,
}

/// A window of a buffer bound for one tensor.
struct Window {
    buffer: vk::Buffer,
    offset: u64,
    range: u64,
    record: TensorRecord,
}

fn window(t: &Tensor<'_, Buffer>, align: u64) -> Result<Window, BackendError> {
    let b = t
        .buffer
        .ok_or_else(|| BackendError::invalid("a graph tensor has no buffer"))?;
    let extent = ops::desc(t)?
        .extent()
        .ok_or_else(|| BackendError::invalid("extent overflows"))? as u64;
    if t.offset.checked_add(extent).is_none_or(|end| end > b.size) {
        return Err(BackendError::invalid(format!(
            "a tensor of {extent} bytes at {} does not fit its buffer of {}",
            t.offset, b.size
        )));
    }
    let offset = t.offset - t.offset % align;
    let base = t.offset - offset;
    // Whole words: the allocation is rounded up to 16 bytes.
    let range = (base + extent).div_ceil(4) * 4;
    let range = range.min(b.capacity - offset);
    Ok(Window {
        buffer: b.buffer,
        offset,
        range,
        record: TensorRecord {
            base: base as u32,
            dtype: t.dtype.raw(),
            ne: t.ne.map(|n| n as u32),
            nb: t.nb.map(|n| n as u32),
        },
    })
}

/// One dispatch: an op, or a part of an op whose weights are split by rows.
struct Step {
    kind: u32,
    n_src: u32,
    params: [i32; 8],
    rows: [u32; 2],
    aux: f32,
    shader: Shader,
    groups: u64,
    windows: Vec<Window>,
    /// Scratch bytes it writes or reads.
    scratch: u64,
}

/// Rows [r0, r0 + n) of `t` along dimension `dim`, as a tensor.
fn rows_of<'a>(t: &Tensor<'a, Buffer>, dim: usize, r0: usize, n: usize) -> Tensor<'a, Buffer> {
    let mut ne = t.ne;
    ne[dim] = n as i64;
    Tensor {
        buffer: t.buffer,
        offset: t.offset + r0 as u64 * t.nb[dim],
        dtype: t.dtype,
        n_dims: t.n_dims,
        ne,
        nb: t.nb,
    }
}

/// The dispatches of op `i`: one, or for weights larger than a binding
/// spans, one per run of rows that fits (a matmul's part writes those
/// rows of the destination; a row lookup's part copies the rows it holds).
fn steps_of(g: &Graph<'_, Buffer>, i: u32, dev: &Device) -> Result<Vec<Step>, BackendError> {
    let op = g.op(i)?;
    let align = dev.limits.offset_align;
    let plan = ops::plan(&op, &g.tensors, &dev.limits)?;
    let mut tensors = Vec::with_capacity(3);
    for &t in op.srcs().iter().chain([&op.dst]) {
        tensors.push(g.tensors.get(t)?);
    }
    let scratch = plan.activations.map_or(0, |(_, bytes)| bytes);
    // ROPE's angle step, base^(-2 / n_rot), from the same libm powf as the
    // CPU's: a GPU's pow is approximate, and the angles must be the CPU's
    // to the last bit (K is rounded to f16 right after).
    let aux = if op.kind == OpKind::Rope && op.params[0] > 0 {
        f32::from_bits(op.params[2] as u32).powf(-2.0 / op.params[0] as f32)
    } else {
        0.0
    };
    let step = |parts: &[Tensor<'_, Buffer>], rows, shader, groups| -> Result<Step, BackendError> {
        Ok(Step {
            kind: op.kind.raw(),
            n_src: op.srcs().len() as u32,
            params: op.params,
            rows,
            aux,
            shader,
            groups,
            windows: parts
                .iter()
                .map(|t| window(t, align))
                .collect::<Result<_, _>>()?,
            scratch,
        })
    };
    // The dispatches' tensors, source rows and plans: the whole op, or
    // its runs of rows (each planned again as the tensors it binds).
    let ne1 = tensors[0].ne[1] as usize;
    let parts = match plan.split_rows {
        None => vec![(tensors, [0, ne1 as u32], plan.shader, plan.groups)],
        Some(per_part) => {
            let dst = tensors.len() - 1;
            let mut parts = Vec::with_capacity(ne1.div_ceil(per_part));
            for r0 in (0..ne1).step_by(per_part) {
                let n = per_part.min(ne1 - r0);
                let part: Vec<_> = (tensors.iter().enumerate())
                    .map(|(k, t)| match k {
                        0 => rows_of(t, 1, r0, n),
                        k if k == dst && op.kind == OpKind::MulMat => rows_of(t, 0, r0, n),
                        // The whole tensor.
                        _ => rows_of(t, 1, 0, t.ne[1] as usize),
                    })
                    .collect();
                let descs = part.iter().map(ops::desc).collect::<Result<Vec<_>, _>>()?;
                let p =
                    ops::plan_descs(op.kind, &op.params, &descs[..dst], &descs[dst], &dev.limits)?;
                parts.push((part, [r0 as u32, (r0 + n) as u32], p.shader, p.groups));
            }
            parts
        }
    };
    let mut steps = Vec::with_capacity(parts.len() + 1);
    // A matmul's activations are rounded once, before its first part (the
    // record tells quantize.comp the weights' type and width; it reads
    // only src1).
    if let Some((groups, _)) = plan.activations {
        let (first, rows, ..) = &parts[0];
        steps.push(step(first, *rows, Shader::Quantize, groups)?);
    }
    for (part, rows, shader, groups) in &parts {
        steps.push(step(part, *rows, *shader, *groups)?);
    }
    Ok(steps)
}

/// Records and submits `g`; returns before it finishes.
pub fn submit(dev: &Device, g: &Graph<'_, Buffer>) -> Result<(), BackendError> {
    let align = dev.limits.offset_align;
    // Everything is checked before anything is recorded.
    let mut steps = Vec::with_capacity(g.n_ops() as usize);
    for i in 0..g.n_ops() {
        steps.extend(steps_of(g, i, dev).map_err(|e| e.at_op(i))?);
    }
    let n = steps.len();
    if n == 0 {
        return Ok(());
    }
    // Shaders not used before are compiled now, before the queue is held.
    let pipelines = steps
        .iter()
        .map(|s| dev.pipeline(s.shader))
        .collect::<Result<Vec<_>, _>>()?;
    let stride = (std::mem::size_of::<Record>() as u64).div_ceil(align) * align;
    let mut q = dev.lock();
    dev.wait_locked(&mut q)?;
    let records = dev.host_buffer(q.records.take(), stride * n as u64)?;
    let scratch_bytes = steps.iter().map(|s| s.scratch).max().unwrap_or(0).max(16);
    let scratch = match dev.scratch_buffer(q.scratch.take(), scratch_bytes) {
        Ok(b) => b,
        Err(e) => {
            q.records = Some(records);
            return Err(e);
        }
    };
    let base = records.host_bytes().expect("host buffers are mapped");
    for (i, step) in steps.iter().enumerate() {
        let w = &step.windows;
        let dst = w.last().expect("a destination");
        let r = Record {
            s0: w[0].record,
            s1: if w.len() > 2 {
                w[1].record
            } else {
                TensorRecord::default()
            },
            d: dst.record,
            kind: step.kind,
            n_src: step.n_src,
            params: step.params,
            rows: step.rows,
            aux: step.aux,
        };
        // SAFETY: record i fits at i * stride (the buffer has n strides),
        // and the buffer is idle and mapped.
        unsafe {
            std::ptr::write_unaligned(base.add(i * stride as usize).cast::<Record>(), r);
        }
    }
    let device = &dev.device;
    // The unsafe calls below: every handle was made by `device`, the queue
    // lock is held, and what the command buffer uses lives until `wait`
    // frees it.
    // The pool of the last graph, emptied, or a larger one.
    if q.descriptor_sets >= n as u32 {
        // SAFETY: handles of this device, used under its queue lock (see `submit`).
        unsafe {
            device.reset_descriptor_pool(q.descriptors, vk::DescriptorPoolResetFlags::empty())
        }
        .map_err(|e| vk_error("vkResetDescriptorPool", e))?;
    } else {
        if q.descriptors != vk::DescriptorPool::null() {
            // SAFETY: handles of this device, used under its queue lock (see `submit`).
            unsafe { device.destroy_descriptor_pool(q.descriptors, None) };
            q.descriptors = vk::DescriptorPool::null();
            q.descriptor_sets = 0;
        }
        let sets = (n as u32).next_power_of_two();
        let sizes = [vk::DescriptorPoolSize {
            ty: vk::DescriptorType::STORAGE_BUFFER,
            descriptor_count: BINDINGS * sets,
        }];
        // SAFETY: handles of this device, used under its queue lock (see `submit`).
        q.descriptors = unsafe {
            device.create_descriptor_pool(
                &vk::DescriptorPoolCreateInfo::default()
                    .max_sets(sets)
                    .pool_sizes(&sizes),
                None,
            )
        }
        .map_err(|e| vk_error("vkCreateDescriptorPool", e))?;
        q.descriptor_sets = sets;
    }
    let pool = q.descriptors;
    let layouts = vec![dev.set_layout; n];
    let recorded = (|| -> Result<vk::CommandBuffer, BackendError> {
        // SAFETY: handles of this device, used under its queue lock (see `submit`).
        let sets = unsafe {
            device.allocate_descriptor_sets(
                &vk::DescriptorSetAllocateInfo::default()
                    .descriptor_pool(pool)
                    .set_layouts(&layouts),
            )
        }
        .map_err(|e| vk_error("vkAllocateDescriptorSets", e))?;
        let mut infos = Vec::with_capacity(BINDINGS as usize * n);
        for (i, step) in steps.iter().enumerate() {
            let w = &step.windows;
            infos.push(vk::DescriptorBufferInfo {
                buffer: records.buffer,
                offset: i as u64 * stride,
                range: std::mem::size_of::<Record>() as u64,
            });
            let dst = w.last().expect("a destination");
            let s1 = if w.len() > 2 { &w[1] } else { &w[0] };
            for win in [&w[0], s1, dst] {
                infos.push(vk::DescriptorBufferInfo {
                    buffer: win.buffer,
                    offset: win.offset,
                    range: win.range,
                });
            }
            infos.push(vk::DescriptorBufferInfo {
                buffer: scratch.buffer,
                offset: 0,
                range: scratch_bytes,
            });
        }
        let writes: Vec<_> = (0..BINDINGS as usize * n)
            .map(|k| {
                vk::WriteDescriptorSet::default()
                    .dst_set(sets[k / BINDINGS as usize])
                    .dst_binding((k % BINDINGS as usize) as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(std::slice::from_ref(&infos[k]))
            })
            .collect();
        // SAFETY: handles of this device, used under its queue lock (see `submit`).
        unsafe { device.update_descriptor_sets(&writes, &[]) };
        // SAFETY: handles of this device, used under its queue lock (see `submit`).
        let cb = unsafe {
            device.allocate_command_buffers(
                &vk::CommandBufferAllocateInfo::default()
                    .command_pool(q.pool)
                    .level(vk::CommandBufferLevel::PRIMARY)
                    .command_buffer_count(1),
            )
        }
        .map_err(|e| vk_error("vkAllocateCommandBuffers", e))?[0];
        let barrier = |cb, src_stage, src, dst_stage, dst| {
            let b = vk::MemoryBarrier::default()
                .src_access_mask(src)
                .dst_access_mask(dst);
            // SAFETY: handles of this device, used under its queue lock (see `submit`).
            unsafe {
                device.cmd_pipeline_barrier(
                    cb,
                    src_stage,
                    dst_stage,
                    vk::DependencyFlags::empty(),
                    &[b],
                    &[],
                    &[],
                )
            };
        };
        let result = (|| {
            // SAFETY: handles of this device, used under its queue lock (see `submit`).
            unsafe {
                device.begin_command_buffer(
                    cb,
                    &vk::CommandBufferBeginInfo::default()
                        .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                )
            }
            .map_err(|e| vk_error("vkBeginCommandBuffer", e))?;
            // Earlier transfers and host writes before the first op.
            barrier(
                cb,
                vk::PipelineStageFlags::TRANSFER | vk::PipelineStageFlags::HOST,
                vk::AccessFlags::TRANSFER_WRITE | vk::AccessFlags::HOST_WRITE,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE,
            );
            let max = dev.limits.max_groups as u64;
            for (i, step) in steps.iter().enumerate() {
                let x = step.groups.min(max);
                let y = step.groups.div_ceil(x);
                // SAFETY: handles of this device, used under its queue lock (see `submit`).
                unsafe {
                    device.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, pipelines[i]);
                    device.cmd_bind_descriptor_sets(
                        cb,
                        vk::PipelineBindPoint::COMPUTE,
                        dev.pipeline_layout,
                        0,
                        &[sets[i]],
                        &[],
                    );
                    device.cmd_dispatch(cb, x as u32, y as u32, 1);
                }
                // Between the graph's own dispatches, compute to compute;
                // after the last one, also to the copies and host reads
                // that take the results (and the next graph's shaders).
                let (stages, access) = if i + 1 < n {
                    (vk::PipelineStageFlags::empty(), vk::AccessFlags::empty())
                } else {
                    (
                        vk::PipelineStageFlags::TRANSFER | vk::PipelineStageFlags::HOST,
                        vk::AccessFlags::TRANSFER_READ | vk::AccessFlags::HOST_READ,
                    )
                };
                barrier(
                    cb,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::AccessFlags::SHADER_WRITE,
                    vk::PipelineStageFlags::COMPUTE_SHADER | stages,
                    vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE | access,
                );
            }
            // SAFETY: handles of this device, used under its queue lock (see `submit`).
            unsafe { device.end_command_buffer(cb) }
                .map_err(|e| vk_error("vkEndCommandBuffer", e))?;
            let submit = vk::SubmitInfo::default().command_buffers(std::slice::from_ref(&cb));
            // SAFETY: handles of this device, used under its queue lock (see `submit`).
            unsafe { device.queue_submit(q.queue, &[submit], q.fence) }
                .map_err(|e| vk_error("vkQueueSubmit", e))
        })();
        match result {
            Ok(()) => Ok(cb),
            Err(e) => {
                // SAFETY: handles of this device, used under its queue lock (see `submit`).
                unsafe { device.free_command_buffers(q.pool, &[cb]) };
                Err(e)
            }
        }
    })();
    // The records and scratch stay alive (and untouched) until the graph is
    // waited for.
    q.records = Some(records);
    q.scratch = Some(scratch);
    q.in_flight = Some(recorded?);
    Ok(())
}
