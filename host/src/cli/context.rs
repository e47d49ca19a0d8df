//! `kiln context`: what a completion at a position would send, the snippets
//! chosen from the workspace (each with its tokens, score and why) and the
//! whole prompt with its exact token count, as `kiln serve` builds it.

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_registry::config::Config;
use kiln_runtime::backend::Backend;
use kiln_runtime::model::session::default_n_ctx;
use kiln_runtime::store;
use kiln_serve::context::Workspace;
use kiln_serve::engine::Loaded;
use kiln_serve::fim::FimTemplate;
use kiln_serve::lsp::document::{self, Position, PositionEncoding};
use kiln_serve::preview::{At, preview};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub struct ContextArgs {
    pub workspace: PathBuf,
    pub file: PathBuf,
    pub line: u32,
    pub character: u32,
    pub utf8: bool,
    pub model: Option<String>,
    pub fim_template: Option<String>,
    pub ctx: Option<usize>,
    pub settings: kiln_serve::Settings,
    pub json: bool,
}

pub fn run(config: &Config, args: ContextArgs) -> CliResult {
    args.settings.validate().map_err(CliError)?;
    let root = args.workspace.canonicalize().map_err(|e| {
        CliError(format!(
            "--workspace {}: {e}; name the directory of the project",
            args.workspace.display()
        ))
    })?;
    let file = if args.file.is_absolute() {
        args.file.clone()
    } else {
        root.join(&args.file)
    };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        CliError(format!(
            "--file {}: {e}; give a text file, absolute or relative to the workspace",
            file.display()
        ))
    })?;
    let rel = file
        .canonicalize()
        .ok()
        .and_then(|f| f.strip_prefix(&root).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| file.clone())
        .to_string_lossy()
        .into_owned();
    let lines = text.lines().count().max(1);
    if args.line as usize >= lines && !(args.line as usize == lines && text.ends_with('\n')) {
        return Err(CliError(format!(
            "--line {} is past the end of {rel} ({lines} lines; lines count from 0)",
            args.line
        )));
    }
    let encoding = if args.utf8 {
        PositionEncoding::Utf8
    } else {
        PositionEncoding::Utf16
    };
    let pos = Position {
        line: args.line,
        character: args.character,
    };
    let offset = document::offset(&text, pos, encoding, "--line/--character")?;

    let (id, path) = store::resolve_served(config, args.model.as_deref())?;
    let fim = args
        .fim_template
        .as_deref()
        .map(FimTemplate::parse)
        .transpose()
        .map_err(CliError)?;
    // The tokenizer and template are what matter here; the weights stay
    // mapped, never run.
    let loaded = Loaded::load(id, path, fim, &Backend::builtin_cpu(), 0).map_err(CliError)?;
    let cache = kiln_serve::index_cache::path(config);
    let (ws, stats) = Workspace::index_cached(&root, cache.as_deref());
    if let Some(e) = &stats.cache_error {
        eprintln!("kiln: the persisted index was not used: {e}");
    }
    let ranker = kiln_serve::start::ranker(config, &mut |m| eprintln!("kiln: {m}"));
    let n_ctx = default_n_ctx(&loaded.model.config, args.ctx);
    let limit = n_ctx.saturating_sub(args.settings.max_tokens).max(1);
    let at = At {
        path: &rel,
        text: &text,
        offset,
        last_completion: None,
    };
    let p = preview(&loaded, &ws, &[], &at, &args.settings, &ranker, limit).map_err(CliError)?;
    if args.json {
        let mut v = serde_json::to_value(&p).expect("a preview serialises");
        v["schema_version"] = JSON_SCHEMA_VERSION.into();
        v["workspace"] = serde_json::json!({"root": root, "files": ws.files(), "chunks": ws.chunks(), "definitions": ws.definitions(), "memory_bytes": ws.memory_bytes(), "index": stats});
        // This process's own memory (the weights are mapped, not in it)
        // once the index is built, and at its peak (Linux).
        v["process"] = serde_json::json!({
            "anonymous_memory_bytes": kiln_runtime::measure::process_memory(None, "RssAnon"),
            "peak_resident_bytes": kiln_runtime::measure::process_memory(None, "VmHWM"),
        });
        print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} at {}:{}: {} of {} context tokens in {} snippets (ranked by {}), {} files indexed",
        p.model,
        rel,
        args.line,
        p.context_tokens,
        p.context_budget,
        p.snippets.len(),
        p.ranked_by,
        ws.files()
    );
    for s in &p.snippets {
        println!(
            "  {}:{}-{}  {} tokens  score {:.3}  ({})",
            s.path, s.start_line, s.end_line, s.tokens, s.score, s.why
        );
    }
    println!(
        "prompt: {} tokens ({} template; prefix {}, suffix {}):",
        p.prompt_tokens, p.fim_template, p.prefix_tokens, p.suffix_tokens
    );
    println!("{}", p.prompt);
    Ok(ExitCode::SUCCESS)
}
