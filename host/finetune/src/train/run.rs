//! `kiln finetune train`: the training loop over a data directory
//! `kiln finetune prepare` wrote.
//!
//! Steps take `accumulate` sequences each, in a seeded order per epoch
//! (so step `s` always sees the same sequences), the loss averaged over
//! their target tokens; the gradient is clipped to a global norm, then
//! AdamW updates the adapter at the schedule's rate. A checkpoint (the
//! adapter, AdamW's moments, the losses so far) is written every
//! `save_every` steps, at the end, and when the run is asked to stop, and
//! `resume` continues from it on the same curve. The adapter is written in
//! llama.cpp's LoRA format at the end (and at a stop).

use super::file::{self, Resume};
use super::model::{Adapter, Base, Sequence, TARGETS, Trainable};
use super::optim::{AdamW, Schedule, clip};
use kiln_runtime::gguf::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Options {
    pub rank: usize,
    pub alpha: f32,
    /// Indices into [`TARGETS`].
    pub targets: Vec<usize>,
    /// Optimizer steps (default: one pass over the training sequences).
    pub steps: Option<usize>,
    /// Sequences per step.
    pub accumulate: usize,
    pub lr: f64,
    /// Warm-up steps (default: a tenth of the steps, at most 100).
    pub warmup: Option<usize>,
    pub weight_decay: f64,
    /// The global gradient norm is clipped to this.
    pub clip: f64,
    /// Sequences are cut to this many tokens (default: as prepared).
    pub seq_len: Option<usize>,
    pub seed: u64,
    /// Evaluate on held-out sequences every this many steps (0: only at
    /// the start and the end).
    pub eval_every: usize,
    /// Held-out sequences each evaluation reads, at most.
    pub eval_sequences: usize,
    pub save_every: usize,
    pub resume: bool,
    /// Differential privacy (DP-SGD), where asked for.
    pub dp: Option<Dp>,
    /// Tests only: seed DP's sampling and noise instead of the operating
    /// system (which a real run always uses).
    #[doc(hidden)]
    pub dp_test_seed: Option<u64>,
}

/// DP-SGD's target: (ε, δ) over the whole run, and the per-sequence
/// gradient norm bound.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Dp {
    pub epsilon: f64,
    pub delta: f64,
    pub clip: f64,
}

/// What a DP run spent.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct DpReport {
    pub epsilon_target: f64,
    pub delta: f64,
    pub clip: f64,
    /// σ: the noise's standard deviation is σ·clip.
    pub noise_multiplier: f64,
    /// Each sequence's chance of being in a step (Poisson sampling).
    pub sampling_rate: f64,
    /// ε after the steps done (at most the target).
    pub epsilon_spent: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rank: 8,
            alpha: 16.0,
            targets: (0..TARGETS.len()).collect(),
            steps: None,
            accumulate: 4,
            lr: 2e-4,
            warmup: None,
            weight_decay: 0.0,
            clip: 1.0,
            seq_len: None,
            seed: 1,
            eval_every: 50,
            eval_sequences: 16,
            save_every: 25,
            resume: false,
            dp: None,
            dp_test_seed: None,
        }
    }
}

/// One step's report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Progress {
    pub step: usize,
    pub steps: usize,
    /// Mean loss per target token of this step's sequences (nats); NaN
    /// (null in JSON) for a DP step that sampled no sequence.
    pub loss: f64,
    /// Mean held-out loss, where this step evaluated.
    pub eval_loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens this run has processed (forward and backward), and their
    /// rate since it started.
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
}

/// What a run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Outcome {
    pub adapter: PathBuf,
    pub checkpoint: PathBuf,
    pub steps_done: usize,
    pub steps: usize,
    /// Stopped early by request (the checkpoint resumes it).
    pub stopped: bool,
    pub resumed_from: Option<usize>,
    pub parameters: usize,
    /// Held-out loss of the base model (the adapter at zero) and of the
    /// trained adapter.
    pub eval_loss_base: Option<f64>,
    pub eval_loss: Option<f64>,
    /// Every step's training loss, this run's and those resumed.
    pub losses: Vec<f64>,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub seconds: f64,
    /// The process's peak resident memory.
    pub peak_rss_bytes: Option<u64>,
    /// The privacy spent, for a DP run.
    pub dp: Option<DpReport>,
}

/// Reads `dir`'s sequences (`train.jsonl` or `eval.jsonl`).
pub fn read_sequences(path: &Path, n_vocab: usize) -> Result<Vec<Sequence>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "{}: {e}; write the data with `kiln finetune prepare`",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let seq: Sequence = serde_json::from_str(line).map_err(|e| {
            format!(
                "{}:{}: not a training sequence ({e})",
                path.display(),
                i + 1
            )
        })?;
        if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(format!(
                "{}:{}: token {bad} is outside this model's vocabulary of {n_vocab}; \
                 prepare the data for this model",
                path.display(),
                i + 1
            ));
        }
        out.push(seq);
    }
    Ok(out)
}

/// `seq` cut to its first `n` tokens.
pub(crate) fn crop(mut seq: Sequence, n: usize) -> Sequence {
    if seq.tokens.len() <= n {
        return seq;
    }
    seq.tokens.truncate(n);
    seq.docs.retain(|&d| d < n);
    for r in &mut seq.loss {
        r[0] = r[0].min(n);
        r[1] = r[1].min(n);
    }
    seq.loss.retain(|r| r[0] < r[1]);
    seq
}

/// The checkpoint beside `out`.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".checkpoint");
    out.with_file_name(name)
}

/// The sequences of step `step`: `accumulate` from the order of its
/// epoch (each epoch a seeded shuffle).
pub(crate) fn step_batch(n: usize, accumulate: usize, seed: u64, step: usize) -> Vec<usize> {
    (step * accumulate..(step + 1) * accumulate)
        .map(|g| {
            let (epoch, at) = (g / n, g % n);
            let mut order: Vec<usize> = (0..n).collect();
            fastrand::Rng::with_seed(seed.wrapping_add(epoch as u64)).shuffle(&mut order);
            order[at]
        })
        .collect()
}

/// Mean loss per target token over `seqs`.
fn mean_loss(model: &Trainable<f32>, adapter: &Adapter<f32>, seqs: &[Sequence]) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0);
    for s in seqs {
        let (l, k) = model.loss(adapter, s, None);
        sum += l;
        n += k;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Trains an adapter on `model` from the data directory `data`, writing
/// it to `out` (and its checkpoint beside it).
pub fn train(
    model_path: &Path,
    data: &Path,
    out: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(&Progress),
    stop: &AtomicBool,
) -> Result<Outcome, String> {
    if opts.rank == 0 || opts.accumulate == 0 || opts.targets.is_empty() {
        return Err("--rank, --accumulate and the target list must be positive".into());
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return Err(format!("--lr {} must be a positive number", opts.lr));
    }
    let base = Base::open(model_path)?;
    let manifest: serde_json::Value = std::fs::read_to_string(data.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| {
            format!(
                "{}: no manifest.json; write the data with `kiln finetune prepare`",
                data.display()
            )
        })?;
    if manifest["vocabulary"].as_u64() != Some(base.cfg.n_vocab as u64) {
        return Err(format!(
            "{}: prepared for a vocabulary of {} tokens ({}), this model has {}; \
             prepare the data with --model {}",
            data.display(),
            manifest["vocabulary"],
            manifest["model"],
            base.cfg.n_vocab,
            model_path.display()
        ));
    }
    let n_vocab = base.cfg.n_vocab;
    let cut = |v: Vec<Sequence>| -> Vec<Sequence> {
        match opts.seq_len {
            Some(n) => v.into_iter().map(|s| crop(s, n)).collect(),
            None => v,
        }
    };
    let train_seqs = cut(read_sequences(&data.join("train.jsonl"), n_vocab)?);
    let eval_all = cut(read_sequences(&data.join("eval.jsonl"), n_vocab)?);
    let eval_seqs: Vec<Sequence> = eval_all.into_iter().take(opts.eval_sequences).collect();
    if train_seqs.is_empty() {
        return Err(format!("{}: no training sequences", data.display()));
    }
    let steps = opts
        .steps
        .unwrap_or_else(|| train_seqs.len().div_ceil(opts.accumulate))
        .max(1);
    let schedule = Schedule {
        lr: opts.lr,
        warmup: opts.warmup.unwrap_or((steps / 10).min(100)),
        steps,
        min_ratio: 0.1,
    };
    // What must match for a checkpoint to continue this run.
    let settings = serde_json::json!({
        "model": base.cfg, "data": manifest["files"], "rank": opts.rank, "alpha": opts.alpha,
        "targets": opts.targets, "accumulate": opts.accumulate, "schedule": schedule,
        "weight_decay": opts.weight_decay, "clip": opts.clip, "seq_len": opts.seq_len, "seed": opts.seed,
        "dp": opts.dp,
    })
    .to_string();
    // DP-SGD: each sequence joins a step with probability q (an expected
    // `accumulate` a step), σ the least noise that keeps the run's ε.
    let dp = match opts.dp {
        None => None,
        Some(d) => {
            if !(d.epsilon > 0.0 && d.delta > 0.0 && d.delta < 1.0 && d.clip > 0.0) {
                return Err(format!(
                    "--dp-epsilon {} and --dp-delta {} must be positive (δ below 1, typically under 1/sequences), --dp-clip {} too",
                    d.epsilon, d.delta, d.clip
                ));
            }
            let q = (opts.accumulate as f64 / train_seqs.len() as f64).min(1.0);
            let sigma =
                super::dp::noise_multiplier(q, steps, d.epsilon, d.delta).ok_or_else(|| {
                    format!(
                        "no noise keeps {steps} steps at a sampling rate of {q:.4} within ε = {}; \
                     train fewer steps or raise --dp-epsilon",
                        d.epsilon
                    )
                })?;
            Some((d, q, sigma))
        }
    };
    let mut secure = match opts.dp_test_seed {
        Some(seed) => rand::SeedableRng::seed_from_u64(seed),
        None => super::dp::secure_rng(),
    };
    let ckpt = checkpoint_path(out);
    let model = Trainable::<f32>::new(&base);
    let (mut adapter, mut opt, mut losses, start) = if opts.resume {
        let (a, o, r) = file::read_checkpoint(&ckpt, &base, opts.weight_decay).map_err(|e| {
            format!("{e}; without a checkpoint, train from the start (no --resume)")
        })?;
        if r.settings != settings {
            return Err(format!(
                "{}: this checkpoint is of a run with other settings (model, data, rank, alpha, \
                 targets, steps, rate or seed); resume with the same ones, or start again",
                ckpt.display()
            ));
        }
        let losses = r.losses.iter().map(|l| l.unwrap_or(f64::NAN)).collect();
        (a, o, losses, r.step)
    } else {
        let a = Adapter::<f32>::new(&base, opts.rank, opts.alpha, &opts.targets, opts.seed);
        let o = AdamW::new(&a, opts.weight_decay);
        (a, o, Vec::new(), 0)
    };
    let eval_loss_base = if eval_seqs.is_empty() {
        None
    } else {
        let zero = Adapter::<f32>::new(&base, opts.rank, opts.alpha, &[], 0);
        mean_loss(&model, &zero, &eval_seqs)
    };
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut step = start;
    let save = |adapter: &Adapter<f32>, opt: &AdamW, step: usize, losses: &[f64]| {
        file::write_checkpoint(
            &ckpt,
            &base,
            adapter,
            opt,
            &Resume {
                step,
                settings: settings.clone(),
                losses: losses.iter().map(|l| l.is_finite().then_some(*l)).collect(),
            },
        )
    };
    let mut stopped = false;
    let mut eval_loss = None;
    while step < steps {
        if stop.load(Ordering::Relaxed) {
            stopped = true;
            break;
        }
        let (grads, grad_norm, sum, targets) = match dp {
            None => {
                let batch = step_batch(train_seqs.len(), opts.accumulate, opts.seed, step);
                let targets: usize = batch.iter().map(|&i| train_seqs[i].targets().len()).sum();
                let mut grads = adapter.zeros_like();
                let scale = 1.0 / targets.max(1) as f32;
                let mut sum = 0.0;
                for &i in &batch {
                    let seq = &train_seqs[i];
                    sum += model.loss(&adapter, seq, Some((&mut grads, scale))).0;
                    tokens += seq.tokens.len();
                }
                let norm = clip(&mut grads, opts.clip);
                (grads, norm, sum, targets)
            }
            Some((d, q, sigma)) => {
                use rand::Rng;
                // Each sequence's mean-loss gradient, clipped to `clip`,
                // summed; noise of σ·clip on the sum; divided by the
                // expected batch.
                let mut grads = adapter.zeros_like();
                let (mut sum, mut targets, mut norms) = (0.0, 0, 0.0f64);
                for seq in train_seqs.iter().filter(|_| secure.random_bool(q)) {
                    let mut g = adapter.zeros_like();
                    let n = seq.targets().len().max(1);
                    sum += model.loss(&adapter, seq, Some((&mut g, 1.0 / n as f32))).0;
                    targets += n;
                    tokens += seq.tokens.len();
                    norms = norms.max(super::dp::clip_to(
                        &mut g.tensors_mut().collect::<Vec<_>>(),
                        d.clip,
                    ));
                    for (t, s) in grads.tensors_mut().zip(g.tensors()) {
                        super::linalg::axpy(1.0, s, t);
                    }
                }
                let expected = (q * train_seqs.len() as f64) as f32;
                for t in grads.tensors_mut() {
                    super::dp::add_noise(t, sigma * d.clip, &mut secure);
                    t.iter_mut().for_each(|x| *x /= expected);
                }
                (grads, norms, sum, targets)
            }
        };
        let lr = schedule.at(step);
        opt.step(&mut adapter, &grads, lr);
        // A DP step may sample no sequence: no loss to report (null in
        // JSON), and the update is the noise alone.
        let loss = if targets == 0 {
            f64::NAN
        } else {
            sum / targets as f64
        };
        if targets > 0 && !loss.is_finite() {
            return Err(format!(
                "the loss became {loss} at step {}; lower --lr (now {})",
                step + 1,
                opts.lr
            ));
        }
        losses.push(loss);
        step += 1;
        let evaluate = !eval_seqs.is_empty()
            && (step == steps || (opts.eval_every > 0 && step % opts.eval_every == 0));
        let this_eval = if evaluate {
            mean_loss(&model, &adapter, &eval_seqs)
        } else {
            None
        };
        if this_eval.is_some() {
            eval_loss = this_eval;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let done = step - start;
        progress(&Progress {
            step,
            steps,
            loss,
            eval_loss: this_eval,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            elapsed_s: elapsed,
            eta_s: elapsed / done as f64 * (steps - step) as f64,
        });
        if opts.save_every > 0 && step % opts.save_every == 0 && step < steps {
            save(&adapter, &opt, step, &losses)?;
        }
    }
    save(&adapter, &opt, step, &losses)?;
    let privacy = dp.map(|(d, q, sigma)| {
        let f = |k: &str, v: f64| (format!("kiln.finetune.dp.{k}"), Value::F64(v));
        vec![
            f("epsilon", super::dp::epsilon(q, sigma, step, d.delta)),
            f("delta", d.delta),
            f("noise_multiplier", sigma),
            f("sampling_rate", q),
            f("clip", d.clip),
            (
                "kiln.finetune.dp.steps".to_string(),
                Value::U64(step as u64),
            ),
        ]
    });
    file::write_adapter_with(out, &base, &adapter, &privacy.unwrap_or_default())?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Outcome {
        adapter: out.to_path_buf(),
        checkpoint: ckpt,
        steps_done: step,
        steps,
        stopped,
        resumed_from: opts.resume.then_some(start),
        parameters: adapter.parameters(),
        eval_loss_base,
        eval_loss,
        losses,
        tokens,
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        seconds,
        peak_rss_bytes: kiln_runtime::measure::process_memory(None, "VmHWM"),
        dp: dp.map(|(d, q, sigma)| DpReport {
            epsilon_target: d.epsilon,
            delta: d.delta,
            clip: d.clip,
            noise_multiplier: sigma,
            sampling_rate: q,
            epsilon_spent: super::dp::epsilon(q, sigma, step, d.delta),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_plugin_api::DType;

    /// A data directory of `seqs` for the tiny model (vocabulary 40).
    fn data(dir: &Path, seqs: &[Sequence]) {
        std::fs::create_dir_all(dir).unwrap();
        let manifest =
            serde_json::json!({"format": 1, "vocabulary": 40, "model": "tiny", "files": {}});
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
        let lines: String = seqs
            .iter()
            .map(|s| serde_json::to_string(s).unwrap() + "\n")
            .collect();
        std::fs::write(dir.join("train.jsonl"), &lines).unwrap();
        std::fs::write(dir.join("eval.jsonl"), &lines).unwrap();
    }

    /// Under DP-SGD with a generous budget the tiny model still learns,
    /// the noise multiplier is the accountant's for the target, what was
    /// spent stays within it, and the adapter file records it; a budget
    /// no noise can keep is refused before training.
    #[test]
    fn dp_training_learns_within_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        crate::train::write_tiny_model(&model, "llama", 1, DType::F32, 4).unwrap();
        let seqs: Vec<Sequence> = (0..8)
            .map(|s| Sequence {
                tokens: (0..24).map(|i| ((i * 7 + s) % 37 + 2) as u32).collect(),
                docs: vec![0],
                loss: vec![[1, 24]],
            })
            .collect();
        data(&dir.path().join("data"), &seqs);
        let opts = Options {
            rank: 4,
            alpha: 8.0,
            steps: Some(40),
            accumulate: 2,
            lr: 2e-2,
            warmup: Some(2),
            eval_every: 0,
            save_every: 0,
            dp: Some(Dp {
                epsilon: 50.0,
                delta: 1e-3,
                clip: 1.0,
            }),
            // One draw of the sampling and the noise (the operating
            // system's would make a rare bad draw a failing test).
            dp_test_seed: Some(5),
            ..Options::default()
        };
        let out = dir.path().join("dp.gguf");
        let o = train(
            &model,
            &dir.path().join("data"),
            &out,
            &opts,
            &mut |_| {},
            &AtomicBool::new(false),
        )
        .unwrap();
        let d = o.dp.unwrap();
        assert_eq!(d.sampling_rate, 0.25);
        assert!(d.epsilon_spent <= 50.0 && d.epsilon_spent > 45.0, "{d:?}");
        let want = crate::train::dp::noise_multiplier(0.25, 40, 50.0, 1e-3).unwrap();
        assert_eq!(d.noise_multiplier, want);
        let (base, trained) = (o.eval_loss_base.unwrap(), o.eval_loss.unwrap());
        assert!(trained < base * 0.9, "held-out {base} -> {trained}");
        let f = kiln_runtime::gguf::GgufFile::open(&out).unwrap();
        let eps = f
            .get("kiln.finetune.dp.epsilon")
            .and_then(|v| v.as_f64())
            .unwrap();
        assert!((eps - d.epsilon_spent).abs() < 1e-12);
        // 40 steps at q = 0.25 cannot stay within ε = 0.001 at δ = 1e-3.
        let tight = Options {
            dp: Some(Dp {
                epsilon: 1e-3,
                delta: 1e-3,
                clip: 1.0,
            }),
            ..opts.clone()
        };
        let e = train(
            &model,
            &dir.path().join("data"),
            &dir.path().join("x.gguf"),
            &tight,
            &mut |_| {},
            &AtomicBool::new(false),
        );
        assert!(e.unwrap_err().contains("no noise keeps"));
    }

    #[test]
    fn a_tiny_model_learns_a_memorizable_corpus() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        crate::train::write_tiny_model(&model, "llama", 2, DType::Q8_0, 11).unwrap();
        // Two documents a model with random weights cannot predict.
        let tokens: Vec<u32> = (0..48).map(|i| (i * 17 % 37 + 2) as u32).collect();
        let seq = Sequence {
            tokens: tokens.clone(),
            docs: vec![0, 24],
            loss: vec![[1, 24], [25, 48]],
        };
        data(&dir.path().join("data"), &[seq]);
        let opts = Options {
            rank: 4,
            alpha: 8.0,
            steps: Some(60),
            accumulate: 1,
            lr: 1e-2,
            warmup: Some(5),
            eval_every: 0,
            save_every: 0,
            ..Options::default()
        };
        let out = dir.path().join("adapter.gguf");
        let mut seen = Vec::new();
        let outcome = train(
            &model,
            &dir.path().join("data"),
            &out,
            &opts,
            &mut |p| seen.push(p.loss),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(seen.len(), 60);
        let (first, last) = (seen[0], *seen.last().unwrap());
        assert!(last < first * 0.3, "loss {first} -> {last}");
        let (base, trained) = (outcome.eval_loss_base.unwrap(), outcome.eval_loss.unwrap());
        assert!(trained < base * 0.3, "held-out {base} -> {trained}");
        // The adapter reads back as trained, and a checkpoint resumes to
        // the same adapter.
        let b = Base::open(&model).unwrap();
        let back = crate::train::file::read_adapter(&out, &b).unwrap();
        assert_eq!(back.rank, 4);
        assert_eq!(back.alpha, 8.0);
        let m = Trainable::<f32>::new(&b);
        let l = m.loss(
            &back,
            &Sequence {
                tokens,
                docs: vec![0, 24],
                loss: vec![[1, 24], [25, 48]],
            },
            None,
        );
        assert!((l.0 / l.1 as f64 - trained).abs() < 1e-9);
    }
}
