//! The LoRA trainer: f32 forward and backward over a frozen GGUF model
//! (weights kept in their stored type, dequantized when a product needs
//! them), the products on the CPU backend's thread pool.
//!
//! - [`linalg`]: the dense products (f32 and f64) and row loops.
//! - [`ops`]: each op's forward and backward.
//! - [`model`]: the base model, the adapter, a sequence's loss and
//!   gradient with each layer recomputed in the backward pass.
//! - [`optim`]: AdamW, the warm-up and cosine schedule, clipping.
//! - [`dp`]: DP-SGD's exact discrete Gaussian noise and its accountant.
//! - [`file`]: adapters in llama.cpp's LoRA format, checkpoints.
//! - [`run`]: the training loop (`kiln finetune train`).
//! - [`merge`]: an adapter merged into its base (`kiln finetune merge`).
//! - [`eval`]: base against adapter on held-out files (`kiln finetune
//!   eval`).

pub mod dp;
pub mod eval;
pub mod file;
pub mod full;
pub mod linalg;
pub mod merge;
pub mod model;
pub mod ops;
pub mod optim;
pub mod run;

/// Writes a small random llama or qwen2 model for tests: `layers` layers,
/// 32-wide embeddings, 4 query heads over 2 key/value heads, vocabulary
/// of 40 (qwen2's output tied to the embeddings); weights in `dtype` (F32 or a quantized type whose blocks fit
/// 32-element rows).
#[doc(hidden)]
pub fn write_tiny_model(
    path: &std::path::Path,
    arch: &str,
    layers: usize,
    dtype: kiln_plugin_api::DType,
    seed: u64,
) -> std::io::Result<()> {
    use kiln_plugin_api::DType;
    use kiln_runtime::gguf::{GgufWriter, TensorSpec, Value, ValueType};
    let (e, ff, heads, kv_heads, vocab) = (32usize, 64usize, 4usize, 2usize, 40usize);
    let hd = e / heads;
    let s = |k: &str, v: &str| (k.to_string(), Value::String(v.to_string()));
    let u = |k: &str, v: usize| (format!("{arch}.{k}"), Value::U32(v as u32));
    let metadata = vec![
        s("general.architecture", arch),
        s("general.name", "tiny"),
        u("context_length", 256),
        u("embedding_length", e),
        u("block_count", layers),
        u("feed_forward_length", ff),
        u("attention.head_count", heads),
        u("attention.head_count_kv", kv_heads),
        u("rope.dimension_count", hd),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        s("tokenizer.ggml.model", "gpt2"),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                ValueType::String,
                (0..vocab).map(|i| Value::String(format!("t{i}"))).collect(),
            ),
        ),
    ];
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![e, vocab]),
        ("output_norm.weight".into(), vec![e]),
    ];
    // qwen2's output shares the token embeddings (as Qwen2.5's small models'
    // do); llama's has its own.
    if arch != "qwen2" {
        shapes.push(("output.weight".into(), vec![e, vocab]));
    }
    for l in 0..layers {
        let b = |n: &str| format!("blk.{l}.{n}");
        shapes.push((b("attn_norm.weight"), vec![e]));
        shapes.push((b("attn_q.weight"), vec![e, e]));
        shapes.push((b("attn_k.weight"), vec![e, kv_heads * hd]));
        shapes.push((b("attn_v.weight"), vec![e, kv_heads * hd]));
        if arch == "qwen2" {
            shapes.push((b("attn_q.bias"), vec![e]));
            shapes.push((b("attn_k.bias"), vec![kv_heads * hd]));
            shapes.push((b("attn_v.bias"), vec![kv_heads * hd]));
        }
        shapes.push((b("attn_output.weight"), vec![e, e]));
        shapes.push((b("ffn_norm.weight"), vec![e]));
        shapes.push((b("ffn_gate.weight"), vec![e, ff]));
        shapes.push((b("ffn_up.weight"), vec![e, ff]));
        shapes.push((b("ffn_down.weight"), vec![ff, e]));
    }
    let specs: Vec<TensorSpec> = shapes
        .iter()
        .map(|(name, ne)| {
            TensorSpec::new(
                name.as_str(),
                if ne.len() == 2 { dtype } else { DType::F32 },
                ne,
            )
        })
        .collect();
    let mut w = GgufWriter::create(path, &metadata, &specs)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    for ((name, ne), spec) in shapes.iter().zip(&specs) {
        let n: usize = ne.iter().product();
        let values: Vec<f32> = if name.contains("norm") {
            (0..n).map(|_| 0.8 + 0.4 * rng.f32()).collect()
        } else {
            let bound = 1.0 / (ne[0] as f32).sqrt();
            (0..n)
                .map(|_| (rng.f32() * 2.0 - 1.0) * bound * 1.7)
                .collect()
        };
        let mut bytes = vec![0u8; spec.size() as usize];
        let row = ne[0];
        let row_bytes = spec.dtype.row_bytes(row).expect("whole blocks");
        for (src, dst) in values.chunks(row).zip(bytes.chunks_mut(row_bytes)) {
            kiln_blocks::quantize_row(spec.dtype, src, dst);
        }
        w.write_tensor(&bytes)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::model::{Adapter, Base, Sequence, TARGETS, Trainable};
    use kiln_plugin_api::DType;

    fn sequence() -> Sequence {
        // Two documents; the loss on most of the first and the end of the
        // second.
        Sequence {
            tokens: vec![1, 5, 9, 3, 7, 2, 30, 11, 4, 8, 39, 0],
            docs: vec![0, 5],
            loss: vec![[1, 5], [8, 12]],
        }
    }

    /// The adapter's gradient from the backward pass against central
    /// finite differences of the loss, in f64, on a tiny model of each
    /// architecture with every projection adapted (B not zero, so every
    /// path carries a gradient).
    #[test]
    fn adapter_gradients_match_finite_differences() {
        for arch in ["llama", "qwen2"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            super::write_tiny_model(&path, arch, 2, DType::Q8_0, 7).unwrap();
            let base = Base::open(&path).unwrap();
            let mut model = Trainable::<f64>::new(&base);
            // Rounding is piecewise constant: finite differences see steps.
            model.kernels = false;
            let all: Vec<usize> = (0..TARGETS.len()).collect();
            let mut adapter = Adapter::<f64>::new(&base, 2, 4.0, &all, 1);
            let mut rng = fastrand::Rng::with_seed(9);
            for p in adapter.pairs_mut() {
                p.b.iter_mut().for_each(|b| *b = rng.f64() * 0.2 - 0.1);
            }
            let seq = sequence();
            let mut grads = adapter.zeros_like();
            let (loss, n) = model.loss(&adapter, &seq, Some((&mut grads, 0.5)));
            assert_eq!(n, 8);
            assert!(loss.is_finite() && loss > 0.0);
            let analytic: Vec<f64> = grads.tensors().flatten().copied().collect();
            let count = analytic.len();
            // A spread of coordinates over every tensor.
            let mut checked = 0;
            for i in (0..count).step_by(count / 97 + 1) {
                let h = 1e-5;
                let eval = |delta: f64| {
                    let mut a = adapter.clone();
                    let x = a.tensors_mut().flat_map(|t| t.iter_mut()).nth(i).unwrap();
                    *x += delta;
                    0.5 * model.loss(&a, &seq, None).0
                };
                let numeric = (eval(h) - eval(-h)) / (2.0 * h);
                let got = analytic[i];
                assert!(
                    (got - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                    "{arch} parameter {i}: analytic {got}, numeric {numeric}"
                );
                checked += 1;
            }
            assert!(checked > 90);
        }
    }

    /// Full training: the gradient of every tensor (matrices, embeddings,
    /// untied or tied output, norms, qwen2's biases) against central finite
    /// differences in f64.
    #[test]
    fn full_gradients_match_finite_differences() {
        for (arch, tied) in [("llama", false), ("qwen2", true)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tiny.gguf");
            super::write_tiny_model(&path, arch, 2, DType::F32, 11).unwrap();
            let base = Base::open(&path).unwrap();
            assert_eq!(base.cfg.tied_output, tied, "{arch}");
            let mut model = Trainable::<f64>::full(&base);
            let seq = sequence();
            let mut grads = model.zero_grads();
            let names: Vec<String> = grads.keys().cloned().collect();
            assert!(names.iter().any(|n| n == "token_embd.weight"));
            assert!(names.iter().any(|n| n.ends_with("attn_norm.weight")));
            assert_eq!(names.iter().any(|n| n.ends_with(".bias")), arch == "qwen2");
            let (loss, n) = model.loss_full(&seq, &mut grads, 0.5);
            assert_eq!(n, 8);
            assert!(loss.is_finite() && loss > 0.0);
            let mut checked = 0;
            for name in &names {
                let len = grads[name].len();
                for i in (0..len).step_by(len / 7 + 1) {
                    let h = 1e-5;
                    let mut eval = |delta: f64| {
                        let mut params = model.params_mut();
                        let p = params.iter_mut().find(|(n, _)| n == name).unwrap();
                        p.1[i] += delta;
                        drop(params);
                        let l = 0.5
                            * model
                                .loss(&Adapter::new(&base, 1, 1.0, &[], 0), &seq, None)
                                .0;
                        let mut params = model.params_mut();
                        params.iter_mut().find(|(n, _)| n == name).unwrap().1[i] -= delta;
                        l
                    };
                    let numeric = (eval(h) - eval(-h)) / (2.0 * h);
                    let got = grads[name][i];
                    assert!(
                        (got - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                        "{arch} {name}[{i}]: analytic {got}, numeric {numeric}"
                    );
                    checked += 1;
                }
            }
            assert!(checked > 100, "{checked}");
        }
    }

    /// The memory budgets change what is kept, never a number: the loss
    /// and the gradient are the same to the bit with every layer's inside
    /// kept, logits kept and matrices cached as with nothing kept
    /// (recomputed layers, logits computed twice, dequantized at each use),
    /// on the kernels' path and on the dense one.
    #[test]
    fn budgets_change_no_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        super::write_tiny_model(&path, "qwen2", 2, DType::Q4_1, 5).unwrap();
        let base = Base::open(&path).unwrap();
        let all: Vec<usize> = (0..TARGETS.len()).collect();
        let mut adapter = Adapter::<f32>::new(&base, 2, 4.0, &all, 1);
        let mut rng = fastrand::Rng::with_seed(4);
        for p in adapter.pairs_mut() {
            p.b.iter_mut().for_each(|b| *b = rng.f32() * 0.2 - 0.1);
        }
        let seq = sequence();
        for kernels in [true, false] {
            let run = |model: &mut Trainable<f32>| {
                model.kernels = kernels;
                // A tile smaller than the vocabulary: several tiles kept.
                model.tile_rows = 16;
                let mut grads = adapter.zeros_like();
                let (loss, _) = model.loss(&adapter, &seq, Some((&mut grads, 1.0)));
                (loss, grads.tensors().flatten().copied().collect::<Vec<_>>())
            };
            let kept = run(&mut Trainable::<f32>::new(&base));
            let none = run(&mut Trainable::<f32>::with_budgets(&base, 0, 0, 0));
            assert_eq!(kept.0.to_bits(), none.0.to_bits(), "kernels {kernels}");
            assert!(
                kept.1
                    .iter()
                    .zip(&none.1)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            assert!(kept.1.iter().any(|&g| g != 0.0));
        }
    }

    /// With B = 0 the adapter changes nothing, and an adapter's effect is
    /// the same as merging it into an f32 copy of the weights.
    #[test]
    fn zero_b_is_the_base_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        super::write_tiny_model(&path, "llama", 2, DType::F32, 3).unwrap();
        let base = Base::open(&path).unwrap();
        let model = Trainable::<f32>::new(&base);
        let none = Adapter::<f32>::new(&base, 4, 8.0, &[], 1);
        let fresh = Adapter::<f32>::new(&base, 4, 8.0, &[0, 1, 2, 3, 4, 5, 6], 1);
        let seq = sequence();
        assert_eq!(model.logits(&none, &seq), model.logits(&fresh, &seq));
    }
}
