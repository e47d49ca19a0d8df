//! `kiln run`

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, print_json};
use crate::backend::exec::Executor;
use crate::backend::{BackendSet, rank_devices};
use crate::config::Config;
use crate::model::generate::{Request, generate};
use crate::model::sample::SamplingParams;
use crate::model::{Model, Session};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

pub struct RunArgs {
    pub model: String,
    pub prompt: String,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub backend: Option<String>,
    pub ctx: Option<usize>,
    pub json: bool,
}

/// A model argument: a file, or the name of a registered model.
pub fn resolve_model(config: &Config, arg: &str) -> Result<PathBuf, CliError> {
    let path = PathBuf::from(arg);
    if path.is_file() {
        return Ok(path);
    }
    let registry = super::open_registry(config)?;
    match registry.model_path(arg)? {
        Some(p) => Ok(p),
        None => Err(CliError(format!(
            "{arg} is neither a model file nor a registered model (see `kiln models list`, or `kiln models add FILE`)"
        ))),
    }
}

/// The executor for `--backend NAME`, or for the best-scoring device.
pub fn executor(config: &Config, backend: Option<&str>) -> Result<(Executor, String), CliError> {
    let mut registry = super::open_registry(config)?;
    let set = BackendSet::load(&registry);
    for p in &set.problems {
        eprintln!("kiln: warning: {p}");
    }
    let (ranked, problems) = rank_devices(&set, &mut registry, false, |m| eprintln!("kiln: {m}"));
    for p in &problems {
        eprintln!("kiln: warning: {p}");
    }
    let pick = match backend {
        Some(name) => ranked.iter().find(|r| r.backend == name).ok_or_else(|| {
            let names: Vec<String> = set.backends.iter().map(|b| b.name()).collect();
            CliError(format!(
                "no usable backend named {name}; available: {}",
                names.join(", ")
            ))
        })?,
        None => ranked
            .first()
            .ok_or_else(|| CliError("no usable device".into()))?,
    };
    let b = set
        .backends
        .iter()
        .find(|b| b.name() == pick.backend)
        .expect("ranked devices come from the set")
        .clone();
    let label = format!(
        "{} device {} ({})",
        b.name(),
        pick.device,
        b.devices[pick.device as usize].name
    );
    Ok((Executor::new(b, pick.device), label))
}

pub fn run(config: &Config, args: RunArgs) -> CliResult {
    args.sampling.validate().map_err(CliError)?;
    let path = resolve_model(config, &args.model)?;
    let (exec, backend) = executor(config, args.backend.as_deref())?;
    let model = Model::load_for(&path, &exec.target)?;
    let tok = model.tokenizer()?;
    let prompt = tok.encode(&args.prompt, true).map_err(CliError)?;
    let load_ms = model.load_ms;
    let mut session = Session::new(model, exec, args.ctx)?;
    let req = Request {
        stop: args.stop,
        ..Request::new(prompt.clone(), args.max_tokens, args.sampling)
    };
    let stdout = std::io::stdout();
    let output = generate(&mut session, &tok, &req, |text| {
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
            "stop_reason": output.stop_reason,
            "timings": {
                "load_ms": load_ms,
                "time_to_first_token_ms": output.timings.time_to_first_token_ms,
                "prompt_tokens_per_s": output.timings.prompt_tokens_per_s,
                "decode_tokens_per_s": output.timings.decode_tokens_per_s,
                "prompt_tokens": output.timings.prompt_tokens,
                "generated_tokens": output.timings.decode_tokens,
            },
        }));
    } else {
        println!();
        eprintln!(
            "kiln: {} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s on {backend} (load {:.0} ms, first token {:.0} ms)",
            output.timings.prompt_tokens,
            output.timings.prompt_tokens_per_s,
            output.timings.decode_tokens,
            output.timings.decode_tokens_per_s,
            load_ms,
            output.timings.time_to_first_token_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}
