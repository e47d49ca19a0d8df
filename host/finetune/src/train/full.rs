//! Full training: every tensor of a small model a parameter, trained from
//! its initial weights (how a model is trained from scratch, e.g. kiln's
//! default model). The same forward and backward as LoRA training
//! ([`Trainable::full`], [`Trainable::loss_full`]) in f32 on the dense
//! path, AdamW (decay on matrices only), warm-up and cosine decay, global
//! norm clipping, accumulation over sequences in a seeded order. The
//! trained model is written as a GGUF file with the initial file's
//! metadata (architecture, tokenizer), matrices in the type asked for.
//!
//! Deterministic: the same initial file, data and options give the same
//! bytes (each product's element is summed in one order whatever the
//! thread count; every reduction is per row).

use super::model::{Base, Dense, Trainable};
use super::optim::{AdamW, Schedule, update};
use super::run::{Progress, crop, read_sequences, step_batch};
use kiln_plugin_api::DType;
use kiln_runtime::gguf::{GgufWriter, TensorSpec, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Options {
    pub steps: usize,
    /// Sequences per step.
    pub accumulate: usize,
    pub lr: f64,
    pub warmup: usize,
    /// Decoupled weight decay on the matrices (not norms or biases).
    pub weight_decay: f64,
    pub clip: f64,
    pub seq_len: Option<usize>,
    pub seed: u64,
    /// Evaluate on held-out sequences every this many steps (0: at the
    /// start and the end only).
    pub eval_every: usize,
    pub eval_sequences: usize,
    /// The type of the written model's matrices (norms stay F32).
    pub dtype: DType,
}

/// What a run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub steps_done: usize,
    pub stopped: bool,
    pub parameters: usize,
    /// Held-out loss per target token before the first step and at the end.
    pub eval_loss_initial: Option<f64>,
    pub eval_loss: Option<f64>,
    pub losses: Vec<f64>,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub seconds: f64,
}

fn mean_loss(model: &Trainable<f32>, seqs: &[super::model::Sequence]) -> Option<f64> {
    let none = super::model::Adapter::new(model.base, 1, 1.0, &[], 0);
    let (mut sum, mut n) = (0.0, 0);
    for s in seqs {
        let (l, k) = model.loss(&none, s, None);
        sum += l;
        n += k;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Whether parameter `name` is decayed (matrices and embeddings).
fn decayed(name: &str) -> bool {
    !(name.contains("norm") || name.ends_with(".bias"))
}

/// Trains every tensor of the model at `init` on the data directory
/// `data`, writing the trained model to `out`.
pub fn train(
    init: &Path,
    data: &Path,
    out: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
    stop: &AtomicBool,
) -> Result<Outcome, String> {
    if opts.accumulate == 0 || opts.steps == 0 {
        return Err("steps and accumulate must be positive".into());
    }
    let base = Base::open(init)?;
    let n_vocab = base.cfg.n_vocab;
    let cut = |s: Vec<super::model::Sequence>| -> Vec<super::model::Sequence> {
        s.into_iter()
            .map(|q| match opts.seq_len {
                Some(n) => crop(q, n),
                None => q,
            })
            .filter(|q| !q.targets().is_empty())
            .collect()
    };
    let train_seqs = cut(read_sequences(&data.join("train.jsonl"), n_vocab)?);
    if train_seqs.is_empty() {
        return Err(format!("{}: no training sequences", data.display()));
    }
    // No held-out file is no evaluation; a broken one is an error.
    let eval_path = data.join("eval.jsonl");
    let mut eval_seqs = if eval_path.is_file() {
        cut(read_sequences(&eval_path, n_vocab)?)
    } else {
        Vec::new()
    };
    eval_seqs.truncate(opts.eval_sequences);
    let mut model = Trainable::<f32>::full(&base);
    let adam = AdamW::new(&super::model::Adapter::new(&base, 1, 1.0, &[], 0), 0.0);
    let betas = (adam.beta1, adam.beta2, adam.eps);
    let mut m = model.zero_grads();
    let mut v = model.zero_grads();
    let parameters: usize = m.values().map(Vec::len).sum();
    let schedule = Schedule {
        lr: opts.lr,
        warmup: opts.warmup,
        steps: opts.steps,
        min_ratio: 0.1,
    };
    let eval_loss_initial = mean_loss(&model, &eval_seqs);
    let mut eval_loss = eval_loss_initial;
    let started = Instant::now();
    let (mut tokens, mut losses, mut stopped) = (0usize, Vec::new(), false);
    for step in 0..opts.steps {
        if stop.load(Ordering::Relaxed) {
            stopped = true;
            break;
        }
        let batch = step_batch(train_seqs.len(), opts.accumulate, opts.seed, step);
        let targets: usize = batch.iter().map(|&i| train_seqs[i].targets().len()).sum();
        let scale = 1.0 / targets.max(1) as f32;
        let mut grads: Dense<f32> = model.zero_grads();
        let mut sum = 0.0;
        for &i in &batch {
            sum += model.loss_full(&train_seqs[i], &mut grads, scale).0;
            tokens += train_seqs[i].tokens.len();
        }
        let norm = grads
            .values()
            .map(|g| super::linalg::sum_squares(g))
            .sum::<f64>()
            .sqrt();
        if norm > opts.clip && norm > 0.0 {
            let s = (opts.clip / norm) as f32;
            grads
                .values_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= s));
        }
        let lr = schedule.at(step);
        let corrections = adam.corrections(step as u64 + 1);
        for (name, p) in model.params_mut() {
            let decay = if decayed(&name) {
                opts.weight_decay
            } else {
                0.0
            };
            let (mm, vv) = (
                m.get_mut(&name).expect("same names"),
                v.get_mut(&name).expect("same names"),
            );
            update(betas, p, &grads[&name], mm, vv, lr, decay, corrections);
        }
        let loss = sum / targets.max(1) as f64;
        losses.push(loss);
        let done = step + 1;
        let evaluate = done == opts.steps || (opts.eval_every > 0 && done % opts.eval_every == 0);
        let this_eval = if evaluate {
            mean_loss(&model, &eval_seqs)
        } else {
            None
        };
        if this_eval.is_some() {
            eval_loss = this_eval;
        }
        let elapsed = started.elapsed().as_secs_f64();
        progress(&Progress {
            step: done,
            steps: opts.steps,
            loss,
            eval_loss: this_eval,
            lr,
            grad_norm: norm,
            tokens,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            eta_s: elapsed / done as f64 * (opts.steps - done) as f64,
        });
    }
    write_model(&mut model, out, opts.dtype, &[])?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome {
        steps_done: losses.len(),
        stopped,
        parameters,
        eval_loss_initial,
        eval_loss,
        losses,
        tokens,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        seconds,
    })
}

/// Writes full training's model: the initial file's metadata (with
/// `extra` replacing keys of the same name) and tensors in its order, the
/// parameters' current values, 2-D tensors in `dtype` where their rows fit
/// its blocks (else F32), the rest F32.
pub fn write_model(
    model: &mut Trainable<f32>,
    out: &Path,
    dtype: DType,
    extra: &[(String, Value)],
) -> Result<(), String> {
    let file = model.base.file();
    let mut metadata = file.metadata.clone();
    metadata.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    metadata.extend(extra.iter().cloned());
    let specs: Vec<TensorSpec> = (file.tensors.iter())
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: if t.n_dims == 2 && dtype.row_bytes(t.ne[0] as usize).is_some() {
                dtype
            } else {
                DType::F32
            },
            ne: t.ne,
            n_dims: t.n_dims,
        })
        .collect();
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let params = model.params_mut();
    let err = |e: std::io::Error| format!("{}: {e}", out.display());
    let mut w = GgufWriter::create(out, &metadata, &specs).map_err(err)?;
    for (name, spec) in names.iter().zip(&specs) {
        let values = &params
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| format!("{name}: not a parameter of full training"))?
            .1;
        let cols = spec.ne[0] as usize;
        let row_bytes = spec.dtype.row_bytes(cols).expect("checked above");
        let mut bytes = vec![0u8; row_bytes * (values.len() / cols)];
        for (src, dst) in values.chunks(cols).zip(bytes.chunks_mut(row_bytes)) {
            kiln_blocks::quantize_row(spec.dtype, src, dst);
        }
        w.write_tensor(&bytes).map_err(err)?;
    }
    w.finish().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::{Adapter, Sequence};

    /// From random weights, full training memorizes two documents; the
    /// written model is the trained one (its loss is the run's last
    /// held-out loss) and a second run writes the same bytes.
    #[test]
    fn a_tiny_model_learns_from_scratch_and_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("init.gguf");
        crate::train::write_tiny_model(&init, "qwen2", 2, DType::F32, 3).unwrap();
        let tokens: Vec<u32> = (0..48).map(|i| (i * 13 % 37 + 2) as u32).collect();
        let seq = Sequence {
            tokens,
            docs: vec![0, 24],
            loss: vec![[1, 24], [25, 48]],
        };
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let line = serde_json::to_string(&seq).unwrap() + "\n";
        std::fs::write(data.join("train.jsonl"), &line).unwrap();
        std::fs::write(data.join("eval.jsonl"), &line).unwrap();
        let opts = Options {
            steps: 40,
            accumulate: 1,
            lr: 1e-2,
            warmup: 4,
            weight_decay: 0.01,
            clip: 1.0,
            seq_len: None,
            seed: 1,
            eval_every: 0,
            eval_sequences: 4,
            dtype: DType::F32,
        };
        let run = |out: &Path| {
            let mut seen = Vec::new();
            let o = train(
                &init,
                &data,
                out,
                &opts,
                &mut |p| seen.push(p.loss),
                &AtomicBool::new(false),
            )
            .unwrap();
            (o, seen)
        };
        let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
        let (outcome, seen) = run(&a);
        assert_eq!(seen.len(), 40);
        let (first, last) = (
            outcome.eval_loss_initial.unwrap(),
            outcome.eval_loss.unwrap(),
        );
        assert!(last < first * 0.2, "held-out {first} -> {last}");
        run(&b);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let trained = Base::open(&a).unwrap();
        let mut m = Trainable::<f32>::new(&trained);
        m.kernels = false;
        let (l, n) = m.loss(&Adapter::new(&trained, 1, 1.0, &[], 0), &seq, None);
        assert!(
            (l / n as f64 - last).abs() < 1e-6,
            "{} vs {last}",
            l / n as f64
        );
        // A broken held-out file is refused, not skipped; none is no evaluation.
        std::fs::write(data.join("eval.jsonl"), "{not json\n").unwrap();
        let c = dir.path().join("c.gguf");
        let stop = AtomicBool::new(false);
        let e = train(&init, &data, &c, &opts, &mut |_| {}, &stop).unwrap_err();
        assert!(e.contains("not a training sequence"), "{e}");
        assert!(!c.exists());
        std::fs::remove_file(data.join("eval.jsonl")).unwrap();
        let two = Options {
            steps: 2,
            ..opts.clone()
        };
        let o = train(&init, &data, &c, &two, &mut |_| {}, &stop).unwrap();
        assert_eq!((o.eval_loss_initial, o.eval_loss), (None, None));
    }
}
