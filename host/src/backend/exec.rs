//! Running graphs on a device, with the CPU as the net under every op.
//!
//! A [`HostGraph`] keeps its tensors in host memory. The [`Executor`] asks
//! the chosen device which ops it supports, cuts the graph into segments of
//! consecutive ops that run on the same side, and runs each segment:
//! - on a plugin device: upload the segment's inputs, compute, synchronize,
//!   download its outputs, all or nothing. If any step fails the outputs
//!   are not written back, the segment is re-run on the CPU, and the
//!   backend's `runtime_failures_rerun` counter goes up;
//! - on the CPU: zero-copy, the CPU backend wraps the host memory.

use super::Backend;
use kiln_plugin_api::abi::{KILN_OP_PARAM_COUNT, KilnBuffer, KilnOp, KilnTensor};
use kiln_plugin_api::host::RawBuffer;
use kiln_plugin_api::{BackendError, DType, OpKind};
use std::collections::BTreeSet;
use std::ops::Range;

/// A dense tensor in host memory.
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
            kiln_cpu::quant::dequantize_row(self.dtype, src, dst);
        }
        out
    }

    /// This tensor as the ABI describes it, in `buffer` at offset 0.
    pub fn raw(&self, buffer: KilnBuffer) -> KilnTensor {
        let desc = kiln_cpu::ops::Desc::contiguous(self.dtype, self.ne);
        KilnTensor {
            buffer,
            offset: 0,
            dtype: self.dtype.raw(),
            n_dims: 4,
            ne: self.ne.map(|n| n as i64),
            nb: desc.nb.map(|n| n as u64),
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

/// Tensors and the ops over them, executed in order.
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

    fn validate(&self) -> Result<(), BackendError> {
        for (i, op) in self.ops.iter().enumerate() {
            if op.src.len() > 4 {
                return Err(
                    BackendError::invalid(format!("op {i} has more than 4 sources"))
                        .at_op(i as u32),
                );
            }
            if op
                .src
                .iter()
                .chain([&op.dst])
                .any(|&t| t >= self.tensors.len())
            {
                return Err(BackendError::invalid(format!(
                    "op {i} names a tensor that does not exist"
                ))
                .at_op(i as u32));
            }
            if op.src.contains(&op.dst) {
                return Err(
                    BackendError::invalid(format!("op {i} writes one of its own sources"))
                        .at_op(i as u32),
                );
            }
        }
        Ok(())
    }
}

/// Which tensors a segment reads from outside and which it writes.
fn segment_io(graph: &HostGraph, ops: &Range<usize>) -> (BTreeSet<usize>, BTreeSet<usize>) {
    let (mut inputs, mut outputs) = (BTreeSet::new(), BTreeSet::new());
    for op in &graph.ops[ops.clone()] {
        for &s in &op.src {
            if !outputs.contains(&s) {
                inputs.insert(s);
            }
        }
        outputs.insert(op.dst);
    }
    (inputs, outputs)
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

/// Runs `graph.ops[ops]` on one device. On a device that can wrap host
/// memory and is the built-in CPU, in place; otherwise through device
/// buffers, writing outputs back only when every step succeeded.
pub fn run_segment(
    backend: &Backend,
    device: u32,
    graph: &mut HostGraph,
    ops: Range<usize>,
) -> Result<(), BackendError> {
    let (inputs, outputs) = segment_io(graph, &ops);
    let touched: Vec<usize> = inputs.union(&outputs).copied().collect();
    let local = |t: usize| touched.binary_search(&t).expect("touched") as u32;
    let raw_ops: Vec<KilnOp> = graph.ops[ops.clone()]
        .iter()
        .map(|op| op.raw(local))
        .collect();
    let handle = backend.handle();
    let mut buffers = Buffers {
        backend,
        list: Vec::with_capacity(touched.len()),
    };
    let _device = backend.lock_device(device);
    if backend.is_builtin() {
        let mut raw_tensors = Vec::with_capacity(touched.len());
        for &t in &touched {
            let data = &mut graph.tensors[t].data;
            // SAFETY: the buffer wraps `data`, which is neither moved nor
            // resized until `buffers` is dropped at the end of this function.
            let b =
                unsafe { handle.buffer_wrap_host(device, data.as_mut_ptr(), data.len() as u64)? };
            buffers.list.push(b);
            raw_tensors.push(graph.tensors[t].raw(b.0));
        }
        handle.graph_compute(device, &raw_tensors, &raw_ops)?;
        handle.synchronize(device)?;
    } else {
        let mut raw_tensors = Vec::with_capacity(touched.len());
        for &t in &touched {
            let tensor = &graph.tensors[t];
            let b = handle.buffer_alloc(device, tensor.data.len() as u64)?;
            buffers.list.push(b);
            if inputs.contains(&t) {
                handle.buffer_write(b, 0, &tensor.data)?;
            }
            raw_tensors.push(tensor.raw(b.0));
        }
        handle.graph_compute(device, &raw_tensors, &raw_ops)?;
        handle.synchronize(device)?;
        // Download into scratch first so a failure leaves the graph untouched.
        let mut results = Vec::with_capacity(outputs.len());
        for &t in &outputs {
            let mut data = vec![0u8; graph.tensors[t].data.len()];
            handle.buffer_read(buffers.list[local(t) as usize], 0, &mut data)?;
            results.push((t, data));
        }
        for (t, data) in results {
            graph.tensors[t].data = data;
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

/// Runs graphs on `target`'s `device`, with `cpu` as the fallback.
pub struct Executor<'a> {
    pub target: &'a Backend,
    pub device: u32,
    pub cpu: &'a Backend,
}

impl Executor<'_> {
    /// For each op, whether the target device runs it.
    pub fn plan(&self, graph: &HostGraph) -> Vec<bool> {
        if self.target.is_builtin() {
            return vec![true; graph.ops.len()];
        }
        graph
            .ops
            .iter()
            .map(|op| {
                let mut tensors = Vec::new();
                let idx = |t: usize| -> u32 {
                    tensors.push(graph.tensors[t].raw(std::ptr::null_mut()));
                    (tensors.len() - 1) as u32
                };
                let raw = op.raw(idx);
                self.target
                    .handle()
                    .supports_op(self.device, &raw, &tensors)
                    .unwrap_or(false)
            })
            .collect()
    }

    pub fn run(&self, graph: &mut HostGraph) -> Result<ExecReport, BackendError> {
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
                match run_segment(self.target, self.device, graph, ops.clone()) {
                    Ok(()) => report.ops_on_target += ops.len(),
                    Err(e) => {
                        self.target
                            .count(&self.target.stats.runtime_failures_rerun, 1);
                        run_segment(self.cpu, 0, graph, ops.clone())
                            .map_err(|cpu| offset_op(cpu, ops.start))?;
                        report.reruns.push((ops, e.to_string()));
                    }
                }
            } else {
                self.target.count(
                    &self.target.stats.ops_unsupported_fallback,
                    ops.len() as u64,
                );
                run_segment(self.cpu, 0, graph, ops.clone())
                    .map_err(|e| offset_op(e, ops.start))?;
                report.ops_unsupported_on_cpu += ops.len();
            }
            start = end;
        }
        Ok(report)
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

    #[test]
    fn cpu_runs_a_small_graph_in_place() {
        let cpu = Backend::builtin_cpu();
        let mut g = HostGraph::default();
        let a = g.add_tensor(HostTensor::from_f32([4, 1, 1, 1], &[1., 2., 3., 4.]));
        let b = g.add_tensor(HostTensor::from_f32([4, 1, 1, 1], &[1., 1., 1., 1.]));
        let s = g.add_tensor(HostTensor::zeros(DType::F32, [4, 1, 1, 1]));
        let y = g.add_tensor(HostTensor::zeros(DType::F32, [4, 1, 1, 1]));
        g.ops.push(HostOp::new(OpKind::Add, &[a, b], s));
        g.ops
            .push(HostOp::new(OpKind::Scale, &[s], y).with_params(&[f32_param(0.5)]));
        let exec = Executor {
            target: &cpu,
            device: 0,
            cpu: &cpu,
        };
        let report = exec.run(&mut g).unwrap();
        assert_eq!(report.ops_on_target, 2);
        assert_eq!(g.tensors[y].to_f32(), vec![1.0, 1.5, 2.0, 2.5]);
    }

    #[test]
    fn malformed_graphs_are_refused_before_running() {
        let cpu = Backend::builtin_cpu();
        let mut g = HostGraph::default();
        let a = g.add_tensor(HostTensor::from_f32([2, 1, 1, 1], &[1., 2.]));
        g.ops.push(HostOp::new(OpKind::Silu, &[a], a));
        let exec = Executor {
            target: &cpu,
            device: 0,
            cpu: &cpu,
        };
        let err = exec.run(&mut g).unwrap_err();
        assert!(
            err.message.contains("writes one of its own sources"),
            "{err}"
        );
        g.ops[0] = HostOp::new(OpKind::Silu, &[a], 7);
        assert!(exec.run(&mut g).is_err());
    }

    #[test]
    fn an_error_from_the_cpu_names_the_op() {
        let cpu = Backend::builtin_cpu();
        let mut g = HostGraph::default();
        let a = g.add_tensor(HostTensor::from_f32([2, 1, 1, 1], &[1., 2.]));
        let b = g.add_tensor(HostTensor::zeros(DType::F32, [3, 1, 1, 1]));
        g.ops.push(HostOp::new(OpKind::Silu, &[a], b));
        let exec = Executor {
            target: &cpu,
            device: 0,
            cpu: &cpu,
        };
        let err = exec.run(&mut g).unwrap_err();
        assert_eq!(err.op_index, Some(0));
        assert!(err.message.contains("shape"), "{err}");
    }
}
