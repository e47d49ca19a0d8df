//! `kiln run`

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_registry::config::Config;
use kiln_runtime::backend::Chosen;
use kiln_runtime::model::generate::{Draft, Request, generate_with_draft, same_vocabulary};
use kiln_runtime::model::sample::SamplingParams;
use kiln_runtime::model::{Model, Session};
use kiln_runtime::store;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;

pub struct RunArgs {
    pub model: String,
    /// `--adapter`: a LoRA adapter file applied at run time.
    pub adapter: Option<std::path::PathBuf>,
    pub prompt: String,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub backend: Option<String>,
    pub ctx: Option<usize>,
    pub kv_type: Option<kiln_plugin_api::DType>,
    /// `none`, `ngram`, or a draft model (a file or a registered name).
    pub draft: String,
    pub draft_max: usize,
    pub json: bool,
}

/// The executor for `--backend NAME`, or for the best-scoring device,
/// with warnings and progress on stderr.
pub fn executor(config: &Config, backend: Option<&str>) -> Result<Chosen, CliError> {
    executor_for(config, backend, None)
}

/// [`executor`] for the model file at `model`: with no backend named, the
/// best-scoring device that runs its weight products
/// (`backend::choose_for`).
pub fn executor_for(
    config: &Config,
    backend: Option<&str>,
    model: Option<&std::path::Path>,
) -> Result<Chosen, CliError> {
    let warn = |w: &str| eprintln!("kiln: warning: {w}");
    let progress = |m: &str| eprintln!("kiln: {m}");
    let mut chosen = match model {
        Some(path) => {
            kiln_runtime::backend::choose_for(config, backend, path, |_, _| true, warn, progress)?
        }
        None => kiln_runtime::backend::choose(config, backend, warn, progress)?,
    };
    let exec = &mut chosen.executor;
    if !exec.target.is_builtin() {
        let progress = super::Progress::new(&format!(
            "uploading the weights to {}:{}",
            exec.target.name(),
            exec.device
        ));
        exec.set_upload_progress(std::sync::Arc::new(move |done, total| {
            progress.bytes(done, total, "")
        }));
    }
    Ok(chosen)
}

pub fn run(config: &Config, args: RunArgs) -> CliResult {
    args.sampling.validate().map_err(CliError)?;
    let path = store::resolve(config, &args.model)?;
    let Chosen {
        executor: exec,
        label: backend,
    } = executor_for(config, args.backend.as_deref(), Some(&path))?;
    let model = Model::load_adapted(&path, args.adapter.as_deref(), &exec.target, exec.device)?;
    let adapter = model.adapter.clone();
    let tok = model.tokenizer()?;
    let prompt = tok.encode(&args.prompt, true).map_err(CliError)?;
    let load_ms = model.load_ms;
    let target = exec.target.clone();
    let kv_type = super::kv_type_for(config, &args.model, args.kv_type)?;
    let mut session = Session::with_kv_type(model, exec, args.ctx, kv_type)?;
    // `[engine]`'s knobs, as `kiln serve` and `kiln bench` read them.
    session.configure(&config.engine);
    let limit = kiln_runtime::model::generate::DRAFT_MAX_LIMIT;
    if args.draft_max == 0 || args.draft_max > limit {
        return Err(CliError(format!(
            "--draft-max takes 1 to {limit}, not {}",
            args.draft_max
        )));
    }
    // `--draft MODEL`: its own session, on the same kind of backend, its
    // KV cache of the type config.toml gives it.
    let (draft, mut drafter) = match args.draft.as_str() {
        "none" => (Draft::None, None),
        "ngram" => (Draft::Ngram, None),
        spec => {
            let path = store::resolve(config, spec).map_err(|e| {
                CliError(format!(
                    "--draft {spec}: give none, ngram, or a draft model (a GGUF file or a \
                     registered name): {e}"
                ))
            })?;
            let Chosen {
                executor: dexec, ..
            } = executor(config, args.backend.as_deref())?;
            let dmodel = Model::load_for(&path, &dexec.target, dexec.device)?;
            same_vocabulary(&tok, &dmodel.tokenizer()?)
                .map_err(|e| CliError(format!("--draft {spec}: {e}")))?;
            let dkv = super::kv_type_for(config, spec, None)?;
            let mut d = Session::with_kv_type(dmodel, dexec, Some(session.n_ctx()), dkv)?;
            d.configure(&config.engine);
            (Draft::Model, Some(d))
        }
    };
    let req = Request {
        stop: args.stop,
        draft,
        draft_max: args.draft_max,
        ..Request::new(prompt.clone(), args.max_tokens, args.sampling)
    };
    let stdout = std::io::stdout();
    let output = generate_with_draft(&mut session, drafter.as_mut(), &tok, &req, |text| {
        if !args.json {
            let mut out = stdout.lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        true
    })?;
    if args.json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "text": output.text,
            "token_ids": output.token_ids,
            "prompt_token_ids": prompt,
            "backend": backend,
            "adapter": adapter,
            "stop_reason": output.stop_reason,
            "timings": {
                "load_ms": load_ms,
                "time_to_first_token_ms": output.timings.time_to_first_token_ms,
                "prompt_tokens_per_s": output.timings.prompt_tokens_per_s,
                "decode_tokens_per_s": output.timings.decode_tokens_per_s,
                "prompt_tokens": output.timings.prompt_tokens,
                "generated_tokens": output.timings.decode_tokens,
                "draft_tokens": output.timings.draft_tokens,
                "draft_accepted": output.timings.draft_accepted,
                "draft_batches": output.timings.draft_batches,
            },
            "backend_stats": backend_stats(&target.stats),
        }));
    } else {
        println!();
        if draft != Draft::None {
            eprintln!(
                "kiln: speculative decoding: {} of {} guessed tokens accepted",
                output.timings.draft_accepted, output.timings.draft_tokens
            );
        }
        eprintln!(
            "kiln: {} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s on {backend} (load {:.0} ms, first token {:.0} ms)",
            output.timings.prompt_tokens,
            output.timings.prompt_tokens_per_s,
            output.timings.decode_tokens,
            output.timings.decode_tokens_per_s,
            load_ms,
            output.timings.time_to_first_token_ms
        );
        let stats = &target.stats;
        let unsupported = stats.ops_unsupported_fallback.load(Relaxed);
        let reruns = stats.runtime_failures_rerun.load(Relaxed);
        if unsupported + reruns > 0 {
            eprintln!(
                "kiln: note: {unsupported} ops ran on the CPU because {} does not run them, \
                 {reruns} parts of the graph ran again on the CPU after {} failed them",
                target.name(),
                target.name()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What the chosen backend did in this run: ops it ran, ops it left to
/// the CPU (unsupported, or re-run after a failure), bytes moved to and
/// from its device, and devices lost.
fn backend_stats(s: &kiln_runtime::backend::BackendStats) -> serde_json::Value {
    serde_json::json!({
        "ops_run": s.ops_run.load(Relaxed),
        "ops_unsupported_on_cpu": s.ops_unsupported_fallback.load(Relaxed),
        "segments_rerun_on_cpu": s.runtime_failures_rerun.load(Relaxed),
        "bytes_to_device": s.bytes_to_device.load(Relaxed),
        "bytes_from_device": s.bytes_from_device.load(Relaxed),
        "device_losses": s.device_losses.load(Relaxed),
    })
}
