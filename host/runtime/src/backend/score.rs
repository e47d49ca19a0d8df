//! The device microbenchmark: kiln picks the device that measures fastest
//! on the work that dominates code completion, not the one a fixed order
//! prefers. Two kernels, weights resident on the device, median of five
//! runs after a warm-up:
//! - a Q4_0 matrix-vector product, 2048 × 512 (decode is matvec-bound);
//! - an F32 matrix product, 128 × 128 × 32 (prompt processing).
//!
//! score = 0.7 × Q4_0 matvec GFLOP/s + 0.3 × F32 matmul GFLOP/s; a kernel
//! the device does not support counts as 0. Results are cached in the
//! registry by backend build (plugin sha256) and device.

use super::Backend;
use super::exec::HostTensor;
use kiln_plugin_api::abi::KilnOp;
use kiln_plugin_api::{BackendError, DType, OpKind};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    pub q4_0_matvec_gflops: Option<f64>,
    pub f32_matmul_gflops: Option<f64>,
}

impl Measurement {
    pub fn score(&self) -> f64 {
        0.7 * self.q4_0_matvec_gflops.unwrap_or(0.0) + 0.3 * self.f32_matmul_gflops.unwrap_or(0.0)
    }
}

const RUNS: usize = 5;

/// Measures one device.
pub fn measure(backend: &Backend, device: u32) -> Result<Measurement, BackendError> {
    let mut rng = fastrand::Rng::with_seed(0x5c0e);
    Ok(Measurement {
        q4_0_matvec_gflops: bench_mul_mat(backend, device, DType::Q4_0, 2048, 512, 1, &mut rng)?,
        f32_matmul_gflops: bench_mul_mat(backend, device, DType::F32, 128, 128, 32, &mut rng)?,
    })
}

/// GFLOP/s of `dst[n, m] = w[k, n] · x[k, m]`, or `None` when the device
/// does not support it.
fn bench_mul_mat(
    backend: &Backend,
    device: u32,
    wtype: DType,
    k: usize,
    n: usize,
    m: usize,
    rng: &mut fastrand::Rng,
) -> Result<Option<f64>, BackendError> {
    let w = HostTensor {
        dtype: wtype,
        ne: [k, n, 1, 1],
        data: (0..n)
            .flat_map(|_| kiln_blocks::random_row(wtype, k, rng))
            .collect(),
    };
    let x = HostTensor::from_f32(
        [k, m, 1, 1],
        &(0..k * m).map(|_| rng.f32() - 0.5).collect::<Vec<_>>(),
    );
    let y = HostTensor::zeros(DType::F32, [n, m, 1, 1]);
    let h = backend.handle();
    let op = KilnOp {
        kind: OpKind::MulMat.raw(),
        n_src: 2,
        src: [0, 1, 0, 0],
        dst: 2,
        flags: 0,
        params: [0; 8],
    };
    let null = std::ptr::null_mut();
    let query = [w.raw(null), x.raw(null), y.raw(null)];
    if !h.supports_op(device, &op, &query)? {
        return Ok(None);
    }
    let mut buffers = Vec::new();
    let result = (|| {
        let mut tensors = Vec::new();
        for t in [&w, &x, &y] {
            let b = h.buffer_alloc(device, t.data.len() as u64)?;
            buffers.push(b);
            h.buffer_write(b, 0, &t.data)?;
            tensors.push(t.raw(b.0));
        }
        let _lock = backend.lock_device(device);
        let mut times = Vec::with_capacity(RUNS);
        for run in 0..=RUNS {
            let start = Instant::now();
            h.graph_compute(device, &tensors, &[op])?;
            h.synchronize(device)?;
            if run > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[RUNS / 2].max(1e-9);
        Ok(Some(2.0 * (k * n * m) as f64 / median / 1e9))
    })();
    for b in buffers {
        let _ = h.buffer_free(b);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_measures_both_kernels() {
        let cpu = Backend::builtin_cpu();
        let m = measure(&cpu, 0).unwrap();
        assert!(m.q4_0_matvec_gflops.unwrap() > 0.0);
        assert!(m.f32_matmul_gflops.unwrap() > 0.0);
        assert!(m.score() > 0.0);
    }

    #[test]
    fn unsupported_kernels_count_as_zero() {
        let m = Measurement {
            q4_0_matvec_gflops: None,
            f32_matmul_gflops: Some(10.0),
        };
        assert_eq!(m.score(), 3.0);
    }
}
