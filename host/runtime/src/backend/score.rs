//! The device microbenchmark: kiln picks the device that measures fastest
//! on the work of a completion, not the one a fixed order prefers. Both
//! halves are whole graphs, as the model's are, with the weights resident
//! on the device and ops of a model's size, so that a device's fixed cost
//! per submission and per op counts as it does in real use:
//! - decode: one graph of a chain of [`CHAIN`] matrix-vector products over
//!   distinct 2048 × 2048 weight matrices, each reading the last one's
//!   output (a decode step is one graph of dependent ops streaming the
//!   weights);
//! - prompt: one 2048 × 2048 product with [`BATCH`] activation columns (a
//!   prompt's batch).
//!
//! Weights are Q4_0 (what most downloaded models are near), or the first
//! of F16 and F32 the device runs when it has no Q4_0 product. The score
//! is the effective GFLOP/s of a modeled completion over such matrices: a
//! [`PROMPT_TOKENS`]-token prompt in batches of [`BATCH`], then
//! [`DECODE_TOKENS`] tokens decoded one graph step at a time. A device
//! that runs neither product scores 0. Each half is timed after a warm-up
//! (median of up to five runs, fewer when a run is slow; a device too slow
//! for the whole chain within half a second is timed on one product at a
//! time). Results are cached in the registry by backend build, device and
//! [`METHOD`].
//!
//! Why whole graphs: one small op per submission (this benchmark's first
//! form: a 2048 × 512 matvec and a 128 × 128 × 32 product) measured a
//! discrete GPU's submission latency, not its speed: an NVIDIA H200 scored
//! below a 16-core CPU that it runs a 1.1B-parameter Q4_0 model's
//! 512-token prompt 3.9 times as fast as (decode 1.2 times).

use super::Backend;
use super::exec::{HostTensor, TensorRef};
use kiln_plugin_api::abi::KilnOp;
use kiln_plugin_api::{BackendError, DType, OpKind, interleave};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The benchmark's version: part of the cache key, so that scores
/// measured another way are measured again rather than compared.
pub const METHOD: u32 = 2;

/// The registry's key for the scores of backend build `build` (the
/// built-in CPU's version, a plugin's sha256).
pub fn cache_key(build: &str) -> String {
    format!("{build}/score-v{METHOD}")
}

/// Matrix-vector products in the decode graph.
pub const CHAIN: usize = 16;
/// Activation columns of the prompt product.
pub const BATCH: usize = 128;
/// The modeled completion: prompt tokens, then decoded tokens.
pub const PROMPT_TOKENS: usize = 512;
pub const DECODE_TOKENS: usize = 64;
/// The weight matrices' width and height.
const DIM: usize = 2048;
/// Timed runs per half, at most, and when to stop early.
const RUNS: usize = 5;
const BUDGET: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    /// The weights' type both halves ran with (`q4_0`, `f16`, `f32`), or
    /// `null` when the device runs none of them.
    pub weights: Option<String>,
    /// Milliseconds for the decode graph of [`CHAIN`] products.
    pub decode_graph_ms: Option<f64>,
    /// Milliseconds for the prompt product of [`BATCH`] columns.
    pub prompt_batch_ms: Option<f64>,
}

impl Measurement {
    /// Effective GFLOP/s of the modeled completion (see the module's
    /// documentation); 0 when either half did not run.
    pub fn score(&self) -> f64 {
        let (Some(decode), Some(prompt)) = (self.decode_graph_ms, self.prompt_batch_ms) else {
            return 0.0;
        };
        let seconds = (PROMPT_TOKENS as f64 / BATCH as f64 * prompt
            + DECODE_TOKENS as f64 * decode / CHAIN as f64)
            / 1e3;
        let flops = ((PROMPT_TOKENS + DECODE_TOKENS) * 2 * DIM * DIM) as f64;
        flops / seconds.max(1e-12) / 1e9
    }
}

/// Measures one device.
pub fn measure(backend: &Backend, device: u32) -> Result<Measurement, BackendError> {
    let mut rng = fastrand::Rng::with_seed(0x5c0e);
    for plain in [DType::Q4_0, DType::F16, DType::F32] {
        // In the layout the device wants a model's weights in, as
        // `Model::load_for` repacks them (the handle only believes `plain`
        // or a kiln layout of it).
        let wtype = backend.weight_layout(device, plain);
        if !supports_mul_mat(backend, device, wtype, BATCH)?
            || !supports_mul_mat(backend, device, wtype, 1)?
        {
            continue;
        }
        // One random row repeated: the bytes every weight buffer holds.
        let mut row = kiln_blocks::random_row(plain, DIM, &mut rng);
        if wtype != plain {
            interleave::pack(wtype, &mut row);
        }
        let w = HostTensor {
            dtype: wtype,
            ne: [DIM, DIM, 1, 1],
            data: row.repeat(DIM),
        };
        return Ok(Measurement {
            weights: Some(plain.name().to_lowercase()),
            decode_graph_ms: Some(time_graph(backend, device, &w, CHAIN, 1)?),
            prompt_batch_ms: Some(time_graph(backend, device, &w, 1, BATCH)?),
        });
    }
    Ok(Measurement {
        weights: None,
        decode_graph_ms: None,
        prompt_batch_ms: None,
    })
}

fn mul_mat(w: u32, x: u32, dst: u32) -> KilnOp {
    KilnOp {
        kind: OpKind::MulMat.raw(),
        n_src: 2,
        src: [w, x, 0, 0],
        dst,
        flags: 0,
        params: [0; 8],
    }
}

/// Whether the device runs `dst[DIM, m] = w[DIM, DIM] · x[DIM, m]`.
fn supports_mul_mat(
    backend: &Backend,
    device: u32,
    wtype: DType,
    m: usize,
) -> Result<bool, BackendError> {
    // Descriptions only: no bytes behind them.
    let desc = |dtype, ne| TensorRef::dense(0, 0, dtype, ne).raw(std::ptr::null_mut(), 0);
    let query = [
        desc(wtype, [DIM, DIM, 1, 1]),
        desc(DType::F32, [DIM, m, 1, 1]),
        desc(DType::F32, [DIM, m, 1, 1]),
    ];
    backend
        .handle()
        .supports_op(device, &mul_mat(0, 1, 2), &query)
}

/// Milliseconds (median) for one graph of `chain` dependent products
/// `y_i = w_i · y_(i-1)` over distinct weight buffers holding `w`'s bytes,
/// with `m` activation columns. A device that takes so long for one
/// product that the whole chain would outrun [`BUDGET`] (a software
/// renderer) is timed on graphs of one product, times `chain`: its cost
/// per submission is lost in the noise there.
fn time_graph(
    backend: &Backend,
    device: u32,
    w: &HostTensor,
    chain: usize,
    m: usize,
) -> Result<f64, BackendError> {
    let mut rng = fastrand::Rng::with_seed(0x5c0f);
    let x = HostTensor::from_f32(
        [DIM, m, 1, 1],
        &(0..DIM * m).map(|_| rng.f32() - 0.5).collect::<Vec<_>>(),
    );
    let y = HostTensor::zeros(DType::F32, [DIM, m, 1, 1]);
    let h = backend.handle();
    // Tensors: the weights 0..chain, then y_0 = x, y_1 ..= y_chain.
    let mut buffers = Vec::new();
    let result = (|| {
        let mut tensors = Vec::with_capacity(2 * chain + 1);
        for t in std::iter::repeat_n(w, chain)
            .chain([&x])
            .chain(std::iter::repeat_n(&y, chain))
        {
            let b = h.buffer_alloc(device, t.data.len() as u64)?;
            buffers.push(b);
            h.buffer_write(b, 0, &t.data)?;
            tensors.push(t.raw(b.0));
        }
        let ops: Vec<KilnOp> = (0..chain as u32)
            .map(|i| mul_mat(i, chain as u32 + i, chain as u32 + i + 1))
            .collect();
        let _lock = backend.lock_device(device);
        let run = |n: usize| -> Result<Duration, BackendError> {
            let start = Instant::now();
            h.graph_compute(device, &tensors, &ops[..n], 0)?;
            h.synchronize(device)?;
            Ok(start.elapsed())
        };
        // Warm-up (pipelines compiled), then one product: a device too
        // slow for the chain is timed one product at a time, that one
        // its first sample.
        run(1)?;
        let one = run(1)?;
        let n = if one * chain as u32 > BUDGET {
            1
        } else {
            chain
        };
        let mut times = if n == 1 { vec![one] } else { Vec::new() };
        while times.len() < RUNS && (times.is_empty() || times.iter().sum::<Duration>() < BUDGET) {
            times.push(run(n)?);
        }
        times.sort();
        Ok(times[times.len() / 2].as_secs_f64() * 1e3 * (chain / n) as f64)
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
    fn the_cpu_measures_both_halves_in_q4_0() {
        let cpu = Backend::builtin_cpu();
        let m = measure(&cpu, 0).unwrap();
        assert_eq!(m.weights.as_deref(), Some("q4_0"));
        assert!(m.decode_graph_ms.unwrap() > 0.0);
        assert!(m.prompt_batch_ms.unwrap() > 0.0);
        assert!(m.score() > 0.0);
    }

    /// The score is the modeled completion's rate: a device whose graphs
    /// take twice as long scores half, and neither half is free.
    #[test]
    fn the_score_models_a_completion() {
        let m = |decode, prompt| Measurement {
            weights: Some("q4_0".into()),
            decode_graph_ms: Some(decode),
            prompt_batch_ms: Some(prompt),
        };
        // 512 / 128 prompt batches of 1 ms, 64 / 16 decode graphs of 1 ms:
        // 8 ms for 576 tokens over a 2048 × 2048 matrix.
        let flops = 576.0 * 2.0 * 2048.0 * 2048.0;
        assert!((m(1.0, 1.0).score() - flops / 8e-3 / 1e9).abs() < 1e-9);
        assert!((m(2.0, 2.0).score() * 2.0 - m(1.0, 1.0).score()).abs() < 1e-9);
        // A device with a 4× faster prompt but a 2× slower decode step
        // (4 × 0.25 + 4 × 2 = 9 ms) loses to the even one (8 ms).
        assert!(m(2.0, 0.25).score() < m(1.0, 1.0).score());
        let none = Measurement {
            weights: None,
            decode_graph_ms: None,
            prompt_batch_ms: None,
        };
        assert_eq!(none.score(), 0.0);
    }
}
