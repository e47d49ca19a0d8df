//! The conformance gate: before a plugin is enabled, every op it claims to
//! support runs on random inputs on each of its devices and is compared
//! with the CPU reference. Like llama.cpp's `test-backend-ops`, the measure
//! is the normalized mean squared error, with a bound per op and type.
//!
//! Shapes are deliberately odd (not multiples of 8 or 16 where the type
//! allows) so that tail handling is exercised, and inputs come from a fixed
//! seed so a failure reproduces.

use super::Backend;
use super::exec::{Executor, HostGraph, HostOp, HostTensor};
use kiln_plugin_api::types::f32_param;
use kiln_plugin_api::{DType, OpKind};
use serde::Serialize;
use std::sync::Arc;

/// One op instance to check.
#[derive(Clone, Debug)]
pub struct Case {
    pub op: OpKind,
    pub inputs: Vec<(DType, [usize; 4])>,
    pub output: (DType, [usize; 4]),
    pub params: [i32; 8],
    /// Largest normalized MSE accepted against the reference.
    pub max_nmse: f64,
    /// F32 inputs are drawn from [-scale, scale) (1 unless a case tests
    /// large values).
    pub scale: f32,
}

impl Case {
    fn new(
        op: OpKind,
        inputs: &[(DType, [usize; 4])],
        output: (DType, [usize; 4]),
        max_nmse: f64,
    ) -> Case {
        Case {
            op,
            inputs: inputs.to_vec(),
            output,
            params: [0; 8],
            max_nmse,
            scale: 1.0,
        }
    }

    fn scaled(mut self, scale: f32) -> Case {
        self.scale = scale;
        self
    }

    fn params(mut self, p: &[i32]) -> Case {
        self.params[..p.len()].copy_from_slice(p);
        self
    }

    /// e.g. `mul_mat(q4_0[512,7], f32[512,5]) -> f32[7,5]`
    pub fn label(&self) -> String {
        let shape = |ne: &[usize; 4]| {
            let dims = ne.iter().rposition(|&n| n != 1).map_or(1, |i| i + 1);
            ne[..dims]
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let ins: Vec<String> = self
            .inputs
            .iter()
            .map(|(t, ne)| match (t, self.scale) {
                (DType::F32, s) if s != 1.0 => format!("{t}[{}]×{s}", shape(ne)),
                _ => format!("{t}[{}]", shape(ne)),
            })
            .collect();
        format!(
            "{}({}) -> {}[{}]",
            self.op,
            ins.join(", "),
            self.output.0,
            shape(&self.output.1)
        )
    }
}

/// Bound for a matmul by weight type: activations may be rounded to the
/// weight's precision (f16/bf16) or quantized to 8 bits, as the peers do.
fn mul_mat_bound(w: DType) -> f64 {
    match w {
        DType::F32 => 1e-6,
        _ => 5e-4,
    }
}

/// Every case of the suite.
pub fn cases() -> Vec<Case> {
    use DType::*;
    let mut v = Vec::new();
    for w in DType::WEIGHTS {
        let k = if w.block_len() == 256 { 512 } else { 96 };
        // A matrix-vector product, a small matmul with odd extents, and a
        // prompt's: more rows and columns than one tile of a device's
        // tiled kernel, in odd numbers.
        for (rows, cols) in [(7, 1), (7, 5), (37, 41)] {
            v.push(Case::new(
                OpKind::MulMat,
                &[(w, [k, rows, 1, 1]), (F32, [k, cols, 1, 1])],
                (F32, [rows, cols, 1, 1]),
                mul_mat_bound(w),
            ));
        }
    }
    // Batched with broadcast (grouped-query attention shape).
    v.push(Case::new(
        OpKind::MulMat,
        &[(F16, [64, 9, 2, 1]), (F32, [64, 3, 4, 1])],
        (F32, [9, 3, 4, 1]),
        5e-4,
    ));
    v.push(Case::new(
        OpKind::MulMat,
        &[(F16, [64, 9, 2, 1]), (F32, [64, 20, 4, 1])],
        (F32, [9, 20, 4, 1]),
        5e-4,
    ));
    // Activations near f16's largest value (attention scores of some
    // models): the CPU sums their products in f32; a device's f16
    // arithmetic must not overflow where it does not.
    v.push(
        Case::new(
            OpKind::MulMat,
            &[(F16, [64, 9, 1, 1]), (F32, [64, 20, 1, 1])],
            (F32, [9, 20, 1, 1]),
            5e-4,
        )
        .scaled(30000.0),
    );
    for op in [OpKind::Add, OpKind::Mul] {
        v.push(Case::new(
            op,
            &[(F32, [37, 5, 3, 1]), (F32, [37, 5, 3, 1])],
            (F32, [37, 5, 3, 1]),
            1e-7,
        ));
        v.push(Case::new(
            op,
            &[(F32, [37, 5, 3, 1]), (F32, [37, 1, 1, 1])],
            (F32, [37, 5, 3, 1]),
            1e-7,
        ));
    }
    v.push(
        Case::new(
            OpKind::Scale,
            &[(F32, [33, 7, 1, 1])],
            (F32, [33, 7, 1, 1]),
            1e-7,
        )
        .params(&[f32_param(0.37)]),
    );
    v.push(
        Case::new(
            OpKind::RmsNorm,
            &[(F32, [65, 3, 1, 1])],
            (F32, [65, 3, 1, 1]),
            1e-6,
        )
        .params(&[f32_param(1e-5)]),
    );
    v.push(
        Case::new(
            OpKind::Norm,
            &[(F32, [65, 3, 1, 1])],
            (F32, [65, 3, 1, 1]),
            1e-6,
        )
        .params(&[f32_param(1e-5)]),
    );
    for (mode, n_rot) in [(0, 64), (2, 64), (2, 32)] {
        v.push(
            Case::new(
                OpKind::Rope,
                &[(F32, [64, 4, 5, 1]), (I32, [5, 1, 1, 1])],
                (F32, [64, 4, 5, 1]),
                1e-6,
            )
            .params(&[n_rot, mode, f32_param(10000.0), f32_param(1.0)]),
        );
    }
    v.push(
        Case::new(
            OpKind::SoftMax,
            &[(F32, [19, 6, 1, 1])],
            (F32, [19, 6, 1, 1]),
            1e-6,
        )
        .params(&[f32_param(1.0)]),
    );
    v.push(
        Case::new(
            OpKind::SoftMax,
            &[(F32, [19, 6, 2, 1]), (F32, [19, 6, 1, 1])],
            (F32, [19, 6, 2, 1]),
            1e-6,
        )
        .params(&[f32_param(0.125)]),
    );
    v.push(Case::new(
        OpKind::Silu,
        &[(F32, [45, 3, 1, 1])],
        (F32, [45, 3, 1, 1]),
        1e-6,
    ));
    v.push(Case::new(
        OpKind::Gelu,
        &[(F32, [45, 3, 1, 1])],
        (F32, [45, 3, 1, 1]),
        1e-6,
    ));
    // Fused attention over each KV cache type: a prompt batch after a
    // cached prefix (grouped heads, a causal mask), and a decode step.
    for kv in [F32, F16, Q8_0, Q4_0] {
        for (n_q, n_kv) in [(5, 37), (1, 70)] {
            v.push(
                Case::new(
                    OpKind::Attention,
                    &[
                        (F32, [64, n_q, 4, 1]),
                        (kv, [64, n_kv, 2, 1]),
                        (kv, [64, n_kv, 2, 1]),
                        (F32, [n_kv, n_q, 1, 1]),
                    ],
                    (F32, [64, n_q, 4, 1]),
                    1e-5,
                )
                .params(&[f32_param(0.125)]),
            );
        }
    }
    for t in [F32, F16, Q4_0, Q8_0, Q2_K, Q3_K, Q6_K, IQ4_XS] {
        v.push(Case::new(
            OpKind::GetRows,
            &[(t, [256, 10, 1, 1]), (I32, [2, 1, 1, 1])],
            (F32, [256, 2, 1, 1]),
            1e-7,
        ));
    }
    for (from, to, bound) in [
        (F32, F16, 1e-6),
        (F16, F32, 1e-7),
        (F32, BF16, 1e-4),
        (F32, F32, 1e-7),
        (F32, Q8_0, 1e-3),
        (F32, Q4_0, 5e-2),
        (F32, Q4_1, 5e-2),
        (F32, Q5_0, 1e-2),
        (F32, Q5_1, 1e-2),
    ] {
        v.push(Case::new(
            OpKind::Cpy,
            &[(from, [64, 3, 1, 1])],
            (to, [64, 3, 1, 1]),
            bound,
        ));
    }
    v
}

/// Random inputs for a case: values in [-1, 1) (F32 ones scaled by the
/// case's scale), valid indices, positions, and a causal mask where the op
/// takes one.
pub fn inputs(case: &Case, rng: &mut fastrand::Rng) -> Vec<HostTensor> {
    case.inputs
        .iter()
        .enumerate()
        .map(|(i, &(dtype, ne))| match (case.op, i, dtype) {
            (OpKind::Rope, 1, _) => HostTensor::from_i32(
                ne,
                &(0..ne[0]).map(|_| rng.i32(0..4096)).collect::<Vec<_>>(),
            ),
            (OpKind::GetRows, 1, _) => {
                let rows = case.inputs[0].1[1] as i32;
                HostTensor::from_i32(
                    ne,
                    &(0..ne[0]).map(|_| rng.i32(0..rows)).collect::<Vec<_>>(),
                )
            }
            (OpKind::SoftMax, 1, _) | (OpKind::Attention, 3, _) => {
                let mut mask = vec![0f32; ne.iter().product()];
                for r in 0..ne[1] {
                    for c in 0..ne[0] {
                        if c > r + ne[0] - ne[1] {
                            mask[r * ne[0] + c] = f32::NEG_INFINITY;
                        }
                    }
                }
                HostTensor::from_f32(ne, &mask)
            }
            _ => {
                let rows = ne[1] * ne[2] * ne[3];
                let mut data: Vec<u8> = (0..rows)
                    .flat_map(|_| kiln_blocks::random_row(dtype, ne[0], rng))
                    .collect();
                if dtype == DType::F32 && case.scale != 1.0 {
                    for v in data.chunks_exact_mut(4) {
                        let x = f32::from_le_bytes(v.try_into().unwrap()) * case.scale;
                        v.copy_from_slice(&x.to_le_bytes());
                    }
                }
                HostTensor { dtype, ne, data }
            }
        })
        .collect()
}

fn graph_for(case: &Case, inputs: Vec<HostTensor>) -> HostGraph {
    let mut g = HostGraph::default();
    let srcs: Vec<usize> = inputs.into_iter().map(|t| g.add_tensor(t)).collect();
    let dst = g.add_tensor(HostTensor::zeros(case.output.0, case.output.1));
    g.ops.push(HostOp {
        kind: case.op,
        src: srcs,
        dst,
        params: case.params,
    });
    g
}

/// Normalized mean squared error of `got` against `want`; infinite when a
/// non-finite value appears where the reference is finite.
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if w.is_finite() != g.is_finite() {
            return f64::INFINITY;
        }
        if !w.is_finite() {
            continue;
        }
        err += (g as f64 - w as f64).powi(2);
        norm += (w as f64).powi(2);
    }
    if norm == 0.0 { err } else { err / norm }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    /// The plugin does not claim this op; the CPU runs it instead.
    NotClaimed,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub case: String,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nmse: Option<f64>,
    pub max_nmse: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    pub device: u32,
    pub name: String,
    pub passed: usize,
    pub failed: usize,
    pub not_claimed: usize,
    pub cases: Vec<CaseResult>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub devices: Vec<DeviceReport>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.devices.iter().all(|d| d.failed == 0)
    }

    /// One line per failed case, naming the device, op, types and error.
    pub fn failures(&self) -> Vec<String> {
        self.devices
            .iter()
            .flat_map(|d| {
                d.cases
                    .iter()
                    .filter(|c| c.outcome == Outcome::Failed)
                    .map(move |c| {
                        let why = match (&c.error, c.nmse) {
                            (Some(e), _) => e.clone(),
                            (None, Some(n)) => format!("NMSE {n:.3e} exceeds {:.0e}", c.max_nmse),
                            (None, None) => "failed".to_string(),
                        };
                        format!("device {} ({}): {}: {why}", d.device, d.name, c.case)
                    })
            })
            .collect()
    }

    /// The summary the registry keeps (counts per device, failures by name).
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "passed": self.devices.iter().map(|d| d.passed).sum::<usize>(),
            "failed": self.devices.iter().map(|d| d.failed).sum::<usize>(),
            "not_claimed": self.devices.iter().map(|d| d.not_claimed).sum::<usize>(),
            "devices": self.devices.iter().map(|d| serde_json::json!({
                "device": d.device, "name": d.name, "passed": d.passed,
                "failed": d.failed, "not_claimed": d.not_claimed,
            })).collect::<Vec<_>>(),
            "failures": self.failures(),
        })
    }
}

/// Runs one case on `target`'s `device` and on the CPU reference.
pub fn run_case(target: &Arc<Backend>, device: u32, case: &Case, seed: u64) -> CaseResult {
    let mut rng = fastrand::Rng::with_seed(seed);
    let inputs = inputs(case, &mut rng);
    let mut reference = graph_for(case, inputs.clone());
    let mut on_target = graph_for(case, inputs);
    let result = |outcome, nmse, error| CaseResult {
        case: case.label(),
        outcome,
        nmse,
        max_nmse: case.max_nmse,
        error,
    };
    let exec = Executor::new(target.clone(), device);
    if !exec.plan(&on_target.as_graph())[0] {
        return result(Outcome::NotClaimed, None, None);
    }
    let reference_exec = Executor::new(Backend::reference_cpu(), 0);
    if let Err(e) = reference_exec.run_on_target(&mut reference.as_graph()) {
        // The suite's own cases must run on the reference.
        return result(
            Outcome::Failed,
            None,
            Some(format!("CPU reference failed: {e}")),
        );
    }
    if let Err(e) = exec.run_on_target(&mut on_target.as_graph()) {
        return result(Outcome::Failed, None, Some(e.to_string()));
    }
    let dst = reference.ops[0].dst;
    let err = nmse(
        &on_target.tensors[dst].to_f32(),
        &reference.tensors[dst].to_f32(),
    );
    let outcome = if err <= case.max_nmse {
        Outcome::Passed
    } else {
        Outcome::Failed
    };
    result(outcome, Some(err), None)
}

/// Runs the whole suite on every device of `target` against the built-in
/// CPU. `progress` gets (cases done, cases total) after each case.
pub fn run(target: &Arc<Backend>, mut progress: impl FnMut(usize, usize)) -> Report {
    let all = cases();
    let total = all.len() * target.devices.len();
    let mut done = 0;
    let mut devices = Vec::new();
    for (d, info) in target.devices.iter().enumerate() {
        let mut report = DeviceReport {
            device: d as u32,
            name: info.name.clone(),
            passed: 0,
            failed: 0,
            not_claimed: 0,
            cases: Vec::new(),
        };
        for (i, case) in all.iter().enumerate() {
            let r = run_case(target, d as u32, case, 0x6b69_6c6e + i as u64);
            match r.outcome {
                Outcome::Passed => report.passed += 1,
                Outcome::Failed => report.failed += 1,
                Outcome::NotClaimed => report.not_claimed += 1,
            }
            report.cases.push(r);
            done += 1;
            progress(done, total);
        }
        devices.push(report);
    }
    Report { devices }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_and_weight_type_has_a_case() {
        let all = cases();
        for op in OpKind::ALL {
            assert!(all.iter().any(|c| c.op == op), "{op} has no case");
        }
        for w in DType::WEIGHTS {
            assert!(
                all.iter()
                    .any(|c| c.op == OpKind::MulMat && c.inputs[0].0 == w),
                "mul_mat {w} has no case"
            );
        }
    }

    #[test]
    fn the_cpu_backend_passes_its_own_suite() {
        let report = run(&Backend::builtin_cpu(), |_, _| {});
        assert!(report.passed(), "{:?}", report.failures());
        assert_eq!(report.devices[0].not_claimed, 0);
        assert_eq!(report.devices[0].passed, cases().len());
    }

    #[test]
    fn nmse_sees_nan_and_scale() {
        assert_eq!(nmse(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((nmse(&[1.1, 2.0], &[1.0, 2.0]) - 0.01 / 5.0).abs() < 1e-9);
        assert_eq!(nmse(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert_eq!(nmse(&[f32::NEG_INFINITY], &[f32::NEG_INFINITY]), 0.0);
    }

    #[test]
    fn labels_name_op_types_and_shapes() {
        let c = &cases()[0];
        assert_eq!(c.label(), "mul_mat(f32[96,7], f32[96]) -> f32[7]");
    }
}
