//! `kiln finetune`: fine-tuning on the user's own code
//! (`kiln_finetune`). `prepare` writes the training data, `train` a LoRA
//! adapter from it, `eval` scores it against the base, `merge` writes the
//! base with it merged.

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_finetune::prepare::{self, ForModel, Options, Progress, Report};
use kiln_registry::config::Config;
use kiln_runtime::gguf::GgufFile;
use kiln_runtime::store;
use kiln_runtime::tokenizer::Tokenizer;
use kiln_serve::fim::FimTemplate;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `kiln finetune prepare DIR --model M --out DATA`.
pub fn prepare(
    config: &Config,
    dir: &Path,
    model: Option<&str>,
    out: &Path,
    opts: &Options,
    json: bool,
) -> CliResult {
    let (id, path) = store::resolve_served(config, model)?;
    let file = GgufFile::open(&path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let name = file
        .get("general.name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let template = FimTemplate::detect(&tokenizer, &format!("{name} {}", path.display()));
    drop(file);
    let model = ForModel {
        id: &id,
        tokenizer: &tokenizer,
        template,
    };
    let tty = std::io::stderr().is_terminal();
    let last = Mutex::new(Instant::now());
    let progress = |p: Progress| {
        let mut last = last.lock().expect("not poisoned");
        let final_line = matches!(p, Progress::Examples(d, n) if d == n);
        if !final_line && last.elapsed() < Duration::from_millis(if tty { 200 } else { 2000 }) {
            return;
        }
        *last = Instant::now();
        let line = match p {
            Progress::Walked(n) => format!("kiln: finetune prepare: {n} files found"),
            Progress::Examples(d, n) => format!("kiln: finetune prepare: {d}/{n} files tokenized"),
        };
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r{line}\x1b[K{}", if final_line { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
    };
    let report = prepare::prepare(dir, &model, out, opts, &progress).map_err(CliError)?;
    if json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "out": out,
            "model": id,
            "template": template.name(),
            "seq_len": opts.seq_len,
            "report": report,
        }));
    } else {
        print_report(out, &id, template, &report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(out: &Path, id: &str, template: FimTemplate, r: &Report) {
    let skipped: Vec<String> = (r.files.skipped.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{n} {}", k.replace('_', " ")))
        .collect();
    println!(
        "{} files seen, {} kept ({} train, {} eval); skipped: {}",
        r.files.seen,
        r.files.kept,
        r.files.train,
        r.files.eval,
        if skipped.is_empty() {
            "none".into()
        } else {
            skipped.join(", ")
        }
    );
    let langs: Vec<String> = r
        .languages
        .iter()
        .map(|(l, n)| format!("{l} {n}"))
        .collect();
    println!("languages: {}", langs.join(", "));
    println!(
        "duplicates removed: {} exact, {} near",
        r.duplicates.exact, r.duplicates.near
    );
    let secrets: usize = r.secrets.values().sum();
    let kinds: Vec<String> = r.secrets.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "secrets redacted: {secrets}{}",
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        }
    );
    let e = &r.examples;
    if template == FimTemplate::None {
        println!(
            "examples: {} plain-text windows ({id} has no fill-in-the-middle tokens)",
            e.causal
        );
    } else {
        let spans: Vec<String> = e.by_span.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "examples: {} fill-in-the-middle ({} prefix-suffix-middle, {} suffix-prefix-middle; {}), {} plain-text windows",
            e.fim_psm + e.fim_spm,
            e.fim_psm,
            e.fim_spm,
            spans.join(", "),
            e.causal
        );
    }
    println!(
        "tokens: {} train, {} eval in {} + {} sequences; {} eval holes",
        r.tokens.train, r.tokens.eval, r.sequences.train, r.sequences.eval, r.eval_holes
    );
    println!("wrote {} ({} format)", out.display(), template.name());
}

/// `kiln finetune train`'s flags.
#[derive(clap::Args)]
pub struct TrainArgs {
    data: std::path::PathBuf,
    /// The base model (default: the active model); the one the data was
    /// prepared for.
    #[arg(long)]
    model: Option<String>,
    /// The adapter file to write (GGUF).
    #[arg(long)]
    out: std::path::PathBuf,
    /// Optimizer steps (default: one pass over the training sequences).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// The projections to adapt, comma-separated, of q, k, v, o, gate, up,
    /// down.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    targets: Vec<String>,
    /// Sequences per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 4)]
    accumulate: usize,
    /// The peak learning rate (warm-up, then cosine decay to a tenth).
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Cut sequences to this many tokens (default: as prepared).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Evaluate on held-out sequences every N steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Write a checkpoint every N steps.
    #[arg(long, default_value_t = 25)]
    save_every: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Continue from the checkpoint beside --out.
    #[arg(long)]
    resume: bool,
    /// Train with differential privacy (DP-SGD): the (ε, δ) the whole run
    /// may spend, each sequence its unit; needs --dp-delta.
    #[arg(long, requires = "dp_delta")]
    dp_epsilon: Option<f64>,
    #[arg(long, requires = "dp_epsilon")]
    dp_delta: Option<f64>,
    /// The bound on each sequence's gradient norm under DP.
    #[arg(long, default_value_t = 1.0)]
    dp_clip: f64,
    /// JSON lines: one per step, then the summary.
    #[arg(long)]
    json: bool,
}

/// The short names of the projections `--targets` takes, in
/// [`kiln_finetune::train::model::TARGETS`]' order.
const TARGET_NAMES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// `kiln finetune train DATA --model M --out ADAPTER.gguf`.
pub fn train(config: &Config, a: &TrainArgs) -> CliResult {
    use kiln_finetune::train::run;
    let targets = a
        .targets
        .iter()
        .map(|t| {
            TARGET_NAMES.iter().position(|n| n == t).ok_or_else(|| {
                CliError(format!(
                    "--targets: unknown projection {t:?}; choose from {}",
                    TARGET_NAMES.join(", ")
                ))
            })
        })
        .collect::<Result<Vec<usize>, CliError>>()?;
    let (_, path) = store::resolve_served(config, a.model.as_deref())?;
    let (data, out, json) = (&a.data, &a.out, a.json);
    let opts = run::Options {
        rank: a.rank,
        alpha: a.alpha,
        targets,
        steps: a.steps,
        accumulate: a.accumulate,
        lr: a.lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        clip: 1.0,
        seq_len: a.seq_len,
        seed: a.seed,
        eval_every: a.eval_every,
        eval_sequences: 16,
        save_every: a.save_every,
        resume: a.resume,
        dp: a
            .dp_epsilon
            .zip(a.dp_delta)
            .map(|(epsilon, delta)| run::Dp {
                epsilon,
                delta,
                clip: a.dp_clip,
            }),
        dp_test_seed: None,
    };
    // Ctrl-C (or SIGTERM) stops at the end of the step under way, after
    // which the checkpoint and the adapter are written; a second one
    // exits at once (the last checkpoint stays).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(signal, stop.clone()))
            .map_err(|e| CliError(format!("cannot handle signals: {e}")))?;
    }
    let tty = std::io::stderr().is_terminal();
    let mut last = Instant::now() - Duration::from_secs(60);
    let mut progress = |p: &run::Progress| {
        if json {
            let mut line = serde_json::to_value(p).expect("JSON");
            line["schema_version"] = JSON_SCHEMA_VERSION.into();
            line["event"] = "step".into();
            println!("{line}");
            return;
        }
        let every = if tty {
            Duration::ZERO
        } else {
            Duration::from_secs(10)
        };
        if last.elapsed() < every && p.step != p.steps && p.eval_loss.is_none() {
            return;
        }
        last = Instant::now();
        let width = 24;
        let filled = width * p.step / p.steps.max(1);
        let eval = p
            .eval_loss
            .map_or(String::new(), |e| format!(" eval {e:.3}"));
        let loss = if p.loss.is_nan() {
            "-".to_string()
        } else {
            format!("{:.3}", p.loss)
        };
        let line = format!(
            "[{}{}] step {}/{} loss {loss}{eval} | {:.0} tok/s | ETA {}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            p.step,
            p.steps,
            p.tokens_per_s,
            duration(p.eta_s)
        );
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(
                err,
                "\r{line}\x1b[K{}",
                if p.step == p.steps { "\n" } else { "" }
            )
        } else {
            writeln!(err, "{line}")
        };
        if tty && p.eval_loss.is_some() && p.step != p.steps {
            let _ = writeln!(err);
        }
    };
    let outcome = run::train(&path, data, out, &opts, &mut progress, &stop).map_err(CliError)?;
    if json {
        let mut line = serde_json::to_value(&outcome).expect("JSON");
        line["schema_version"] = JSON_SCHEMA_VERSION.into();
        line["event"] = "done".into();
        println!("{line}");
        return Ok(ExitCode::SUCCESS);
    }
    if tty && outcome.stopped {
        eprintln!();
    }
    let evals = match (outcome.eval_loss_base, outcome.eval_loss) {
        (Some(b), Some(a)) => format!("; held-out loss {b:.3} → {a:.3} nats/token"),
        _ => String::new(),
    };
    println!(
        "{} {} of {} steps ({} parameters, {:.0} tok/s, {}, peak memory {}){evals}",
        if outcome.stopped {
            "stopped after"
        } else {
            "trained"
        },
        outcome.steps_done,
        outcome.steps,
        outcome.parameters,
        outcome.tokens_per_s,
        duration(outcome.seconds),
        outcome
            .peak_rss_bytes
            .map_or("unknown".into(), kiln_runtime::measure::human_bytes),
    );
    if let Some(d) = &outcome.dp {
        println!(
            "differential privacy: ε = {:.3} spent of {} at δ = {:e} (noise multiplier {:.3}, sampling rate {:.4}, clip {})",
            d.epsilon_spent, d.epsilon_target, d.delta, d.noise_multiplier, d.sampling_rate, d.clip
        );
    }
    println!(
        "wrote {} (checkpoint {}{})",
        outcome.adapter.display(),
        outcome.checkpoint.display(),
        if outcome.stopped {
            "; continue with --resume"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `kiln finetune eval DATA --model M [--adapter A]`.
pub fn eval(
    config: &Config,
    data: &Path,
    model: Option<&str>,
    adapter: Option<&Path>,
    opts: &kiln_finetune::train::eval::Options,
    json: bool,
) -> CliResult {
    let (id, path) = store::resolve_served(config, model)?;
    let adapter = adapter
        .map(|a| super::adapters::resolve(config, a))
        .transpose()?;
    let mut on = |what: &str, done: usize, total: usize| {
        super::Progress::new(&format!("kiln: {what}")).update(done, total)
    };
    let file = adapter.as_ref().map(|(f, _)| f.as_path());
    let report =
        kiln_finetune::train::eval::evaluate(&path, data, file, opts, &mut on).map_err(CliError)?;
    let recorded = match &adapter {
        Some((file, _)) => record_eval(config, &id, &path, data, file, &report)?,
        None => None,
    };
    if json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "model": id, "adapter": file,
            "recorded_for": recorded, "report": report,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let iv =
        |i: &kiln_serve::ctxbench::Interval| format!("{:.3} [{:.3}, {:.3}]", i.mean, i.lo, i.hi);
    let opt = |i: &Option<kiln_serve::ctxbench::Interval>| i.as_ref().map_or("-".into(), iv);
    println!(
        "{} held-out sequences ({} target tokens), {} holes ({} prompts), {id}; 95% bootstrap intervals",
        report.sequences, report.target_tokens, report.holes, report.template
    );
    println!(
        "{:<10} {:>26} {:>24} {:>24} {:>24}",
        "", "NLL nats/token", "bits/byte", "exact match", "edit similarity"
    );
    let row = |name: &str, s: &kiln_finetune::train::eval::Side| {
        println!(
            "{name:<10} {:>26} {:>24} {:>24} {:>24}",
            iv(&s.nll),
            iv(&s.bits_per_byte),
            opt(&s.exact_match),
            opt(&s.edit_similarity)
        );
    };
    row("base", &report.base);
    if let Some(a) = &report.adapter {
        row("adapter", a);
        println!(
            "{:<10} {:>26} {:>24} {:>24} {:>24}",
            "difference",
            opt(&report.delta_nll),
            "",
            opt(&report.delta_exact_match),
            opt(&report.delta_edit_similarity)
        );
        match recorded {
            Some(label) => println!("recorded in the registry with {label}"),
            None => println!(
                "not recorded: the adapter is not in the registry (`kiln adapters add` it, then evaluate it)"
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln finetune merge --model M --adapter A --out MERGED.gguf`.
pub fn merge(
    config: &Config,
    model: Option<&str>,
    adapter: &Path,
    out: &Path,
    dtype: &str,
    json: bool,
) -> CliResult {
    use kiln_finetune::train::{file, merge, model::Base};
    let dtype = kiln_plugin_api::DType::WEIGHTS
        .iter()
        .copied()
        .find(|t| t.name().eq_ignore_ascii_case(dtype))
        .ok_or_else(|| {
            CliError(format!(
                "--type: unknown type {dtype:?}; f16 keeps the merge exact to f16"
            ))
        })?;
    let (_, path) = store::resolve_served(config, model)?;
    let base = Base::open(&path).map_err(CliError)?;
    let a = file::read_adapter(adapter, &base).map_err(CliError)?;
    let changed = merge::write_merged(&base, &a, out, dtype).map_err(CliError)?;
    if json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "out": out, "tensors_merged": changed,
            "type": dtype.name(),
        }));
    } else {
        println!(
            "wrote {} ({changed} projections merged, in {})",
            out.display(),
            dtype.name()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes an adapter's evaluation to the registry, with the version
/// holding its bytes: `Some(NAME@VERSION)`, or `None` for a file the
/// registry does not hold.
fn record_eval(
    config: &Config,
    model: &str,
    model_path: &Path,
    data: &Path,
    adapter: &Path,
    report: &kiln_finetune::train::eval::Report,
) -> Result<Option<String>, CliError> {
    let (Some(side), Some(delta)) = (&report.adapter, &report.delta_nll) else {
        return Ok(None);
    };
    let mut registry = super::open_registry(config)?;
    let sha256 = store::hash_file(adapter, |_| {})?;
    let Some(record) = registry.adapter_by_sha256(&sha256)? else {
        return Ok(None);
    };
    let eval = kiln_registry::NewAdapterEval {
        model: model.to_string(),
        model_sha256: store::hash_file(model_path, |_| {})?,
        data: std::fs::canonicalize(data)
            .unwrap_or_else(|_| data.to_path_buf())
            .to_string_lossy()
            .into_owned(),
        sequences: report.sequences as u64,
        target_tokens: report.target_tokens as u64,
        holes: report.holes as u64,
        base_nll: report.base.nll.mean,
        adapter_nll: side.nll.mean,
        delta_nll: delta.mean,
        delta_nll_lo: delta.lo,
        delta_nll_hi: delta.hi,
        report: serde_json::to_value(report).map_err(|e| CliError(e.to_string()))?,
    };
    registry.add_adapter_eval(&record, &eval, &kiln_registry::actor())?;
    Ok(Some(record.label()))
}
