//! `kiln demo`

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_registry::config::Config;
use kiln_serve::demo::{self, Keystroke};
use std::process::{Command, ExitCode};

/// The first model in another tool's store (the Hugging Face cache,
/// Ollama, LM Studio) that kiln loads.
fn found_elsewhere() -> Option<kiln_runtime::import::Found> {
    use kiln_runtime::import;
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let roots = import::roots(home.as_deref(), |k| std::env::var_os(k));
    let (found, _) = import::discover(&roots);
    found
        .into_iter()
        .find(|f| kiln_runtime::model::Model::load(&f.path).is_ok_and(|m| m.tokenizer().is_ok()))
}

/// The small code model `kiln demo` recommends pulling.
const RECOMMENDED: &str = "hf:Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:Q8_0";

/// kiln-code: the small code model kiln trained itself
/// (`models/kiln-code`: its recipe, corpus and numbers), shipped inside
/// the binary so the demo shows real completions with no network.
const KILN_CODE: &[u8] = include_bytes!("../../../models/kiln-code/kiln-code.gguf");

/// kiln-code written under `$KILN_HOME/demo` (again when this binary's
/// copy differs from the file there).
fn ensure_kiln_code(home: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    let dir = home.join("demo");
    let path = dir.join("kiln-code.gguf");
    if std::fs::read(&path).ok().as_deref() != Some(KILN_CODE) {
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".kiln-code.partial-{}", std::process::id()));
        std::fs::write(&tmp, KILN_CODE)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

pub fn run(
    config: &Config,
    model: Option<&str>,
    keystrokes: usize,
    max_tokens: Option<usize>,
    typing_ms: u64,
    json: bool,
) -> CliResult {
    if keystrokes == 0 {
        return Err(CliError("--keystrokes must be at least 1".into()));
    }
    // The model asked for; else the registry's active model (a real one
    // the user added); else a model the user has in another tool's store
    // (what `kiln models import` finds); only with none, the generated
    // random-weight model.
    let active = match model {
        Some(_) => None,
        None => match kiln_runtime::store::resolve_served(config, None) {
            Ok(found) => Some(found),
            Err(kiln_runtime::store::StoreError::NothingActive) => None,
            Err(e) => return Err(e.into()),
        },
    };
    // What `kiln serve --model` gets: a registered model by its name and
    // version (so reports name it), else a file.
    let served: std::ffi::OsString = match (model, active) {
        (Some(m), _) => kiln_runtime::store::resolve_served(config, Some(m))?
            .1
            .into(),
        (None, Some((label, _))) => {
            if !json {
                println!("kiln demo: serving the active model, {label}.\n");
            }
            label.into()
        }
        (None, None) if let Some(found) = found_elsewhere() => {
            if !json {
                println!(
                    "kiln demo: no model is registered; serving {} from {} ({}).\n\
                     `kiln models import` registers it (and the others found) without copying.\n",
                    found.name,
                    found.origin(),
                    found.path.display()
                );
            }
            found.path.into()
        }
        (None, None) => {
            let p = ensure_kiln_code(&config.home)?;
            if !json {
                println!(
                    "kiln demo: no model is registered, so the model is kiln-code, kiln's own small code\n\
                     model (5.5M parameters, trained from scratch by kiln on permissively licensed Rust\n\
                     and Python; models/kiln-code in kiln's sources has its recipe and scores). Its\n\
                     completions are real but a tiny model's: short, and often wrong. For a capable\n\
                     model, run\n\
                     \n    kiln pull {RECOMMENDED}\n\n\
                     (Qwen2.5-Coder 0.5B Instruct in Q8_0: a small code model with fill-in-the-middle),\n\
                     or `kiln models add FILE.gguf`, or keep one in the Hugging Face cache, Ollama or\n\
                     LM Studio, where `kiln models import` finds it; `kiln demo` then serves it.\n"
                );
            }
            p.into()
        }
    };
    let dir = std::env::temp_dir().join(format!("kiln-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut serve = Command::new(std::env::current_exe()?);
    serve.arg("serve").arg("--model").arg(&served);
    if let Some(n) = max_tokens {
        serve.arg("--max-tokens").arg(n.to_string());
    }
    if !json {
        println!(
            "typing {keystrokes} characters of {} in {} (one inline completion request per keystroke):\n",
            demo::DEMO_TYPED_FILE,
            dir.display()
        );
    }
    let show = |k: &Keystroke| {
        if json || !(k.character.is_multiple_of(8)) {
            return;
        }
        let shown: String = k.completion.chars().take(40).collect();
        println!(
            "  {:>3}:{:<3} {:>7.1} ms (first token {:>6.1} ms, {:>4} of {:>4} prompt tokens reused{})  {:?}",
            k.line + 1,
            k.character,
            k.client_ms,
            k.time_to_first_token_ms,
            k.cached_tokens,
            k.cached_tokens + k.prompt_tokens,
            if k.completion_cache_hit {
                ", cached answer"
            } else {
                ""
            },
            shown
        );
    };
    let report = demo::typing_session(serve, &dir, keystrokes, typing_ms, show);
    let _ = std::fs::remove_dir_all(&dir);
    let report = report.map_err(CliError)?;
    if json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "report": report}));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "\n{} requests to {} on {}:\n  end to end (client) p50 {:.1} ms, p99 {:.1} ms\n  time to first token  p50 {:.1} ms, p99 {:.1} ms\n  prompt tokens reused from the KV cache: {:.0}%\n  answered from the completion cache: {:.0}%",
        report.requests,
        report.model,
        report.backend,
        report.e2e_ms_p50,
        report.e2e_ms_p99,
        report.ttft_ms_p50,
        report.ttft_ms_p99,
        report.prefix_cache_hit_rate * 100.0,
        report.completion_cache_hit_rate * 100.0,
    );
    if let Some(anon) = report.server_anonymous_memory_mib {
        println!(
            "  server memory beyond the weights: {anon:.1} MiB (weights paged in: {:.1} MiB, read into memory to repack: {:.1} MiB)",
            report.server_file_backed_memory_mib.unwrap_or(0.0),
            report.server_copied_weights_mib
        );
    }
    if let Some(ws) = report.status.get("workspace") {
        println!(
            "  workspace context: {} files, {} chunks indexed (.gitignore respected)",
            ws["files"], ws["chunks"]
        );
    }
    Ok(ExitCode::SUCCESS)
}
