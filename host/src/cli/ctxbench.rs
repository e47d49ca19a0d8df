//! `kiln ctxbench`: cut cross-file completion holes from a repository and
//! score context selectors on them (model-free metrics; see
//! `kiln_serve::ctxbench`).

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_registry::config::Config;
use kiln_runtime::backend::Backend;
use kiln_runtime::store;
use kiln_serve::ctxbench::{self, Hole};
use kiln_serve::engine::Loaded;
use kiln_serve::prompt::Counter;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

fn repo_root(repo: &Path) -> Result<std::path::PathBuf, CliError> {
    repo.canonicalize().map_err(|e| {
        CliError(format!(
            "{}: {e}; name a repository's directory",
            repo.display()
        ))
    })
}

/// Holes from a JSONL file `kiln ctxbench cut` wrote.
pub(super) fn read_holes(path: &Path) -> Result<Vec<Hole>, CliError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
    (text.lines().enumerate())
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                CliError(format!(
                    "{}:{}: not a ctxbench hole ({e}); cut holes with `kiln ctxbench cut`",
                    path.display(),
                    i + 1
                ))
            })
        })
        .collect()
}

/// `kiln ctxbench cut REPO --out FILE`: the holes as JSONL.
pub fn cut(repo: &Path, out: &Path, holes: usize, seed: u64, json: bool) -> CliResult {
    let cut = cut_to(repo, out, holes, seed)?;
    let count = |k: &str| cut.iter().filter(|h| h.kind == k).count();
    let counts = serde_json::json!({
        "cross_file": count("cross_file"), "in_file": count("in_file"), "external": count("external"),
    });
    if json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "out": out, "seed": seed, "holes": counts,
        }));
    } else {
        println!(
            "{} holes in {} (seed {seed}): {counts}",
            cut.len(),
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Cuts holes from `repo` (`holes` cross-file ones, with `seed`) into the
/// JSONL file `out`, written whole or not at all.
pub fn cut_to(repo: &Path, out: &Path, holes: usize, seed: u64) -> Result<Vec<Hole>, CliError> {
    let root = repo_root(repo)?;
    let cut = ctxbench::sample(&root, holes, seed);
    let mut text = String::new();
    for h in &cut {
        text.push_str(&serde_json::to_string(h).expect("a hole serialises"));
        text.push('\n');
    }
    let tmp = out.with_extension("partial");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, out))
        .map_err(|e| CliError(format!("{}: {e}", out.display())))?;
    Ok(cut)
}

pub struct RunArgs<'a> {
    pub repo: &'a Path,
    pub holes: Option<&'a Path>,
    pub cut: usize,
    pub seed: u64,
    pub model: Option<&'a str>,
    pub budgets: &'a [usize],
    pub json: bool,
}

/// `kiln ctxbench run REPO`: every selector at every budget.
pub fn run(config: &Config, a: RunArgs<'_>) -> CliResult {
    let root = repo_root(a.repo)?;
    let holes: Vec<Hole> = match a.holes {
        Some(path) => read_holes(path)?,
        None => ctxbench::sample(&root, a.cut, a.seed),
    };
    if a.budgets.is_empty() || a.budgets.contains(&0) {
        return Err(CliError(
            "--budgets takes positive token counts, e.g. 512,2048".into(),
        ));
    }
    let (id, path) = store::resolve_served(config, a.model)?;
    let loaded = Loaded::load(id, path, None, &Backend::builtin_cpu(), 0).map_err(CliError)?;
    let counter = Counter::of(&loaded);
    let ranker = kiln_serve::start::ranker(config, &mut |m| eprintln!("kiln: {m}"));
    let scores =
        ctxbench::evaluate(&root, &holes, &counter, &ranker, a.budgets).map_err(CliError)?;
    if a.json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "repo": root, "model": loaded.id,
            "holes": holes.len(), "scores": scores,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let cross = scores.first().map_or(0, |s| s.holes);
    println!(
        "{} cross-file holes of {} in {} (tokens: {})",
        cross,
        holes.len(),
        root.display(),
        loaded.id
    );
    println!(
        "{:<16} {:>7} {:>7} {:>8} {:>6} {:>8} {:>8} {:>8}",
        "selector", "budget", "recall", "density", "mrr", "tokens", "p50 ms", "p99 ms"
    );
    for s in &scores {
        println!(
            "{:<16} {:>7} {:>7.3} {:>8.3} {:>6.3} {:>8.0} {:>8.2} {:>8.2}",
            serde_json::to_value(s.selector)
                .expect("a name")
                .as_str()
                .unwrap_or(""),
            s.budget,
            s.definition_recall,
            s.density,
            s.mrr,
            s.mean_context_tokens,
            s.latency_ms_p50,
            s.latency_ms_p99
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub struct ModelArgs<'a> {
    pub repo: &'a Path,
    pub holes: &'a Path,
    pub model: Option<&'a str>,
    pub budget: usize,
    pub prefix_tokens: usize,
    pub suffix_tokens: usize,
    /// Only these selectors (all when `None`).
    pub selectors: Option<Vec<String>>,
    /// Tokens of the repository's own text to score the likelihood of
    /// (0: none).
    pub nll_tokens: usize,
    pub count: usize,
    pub max_tokens: usize,
    pub seed: u64,
    pub json: bool,
}

/// `kiln ctxbench model REPO --holes FILE`: every selector's context, and
/// the oracle's, through a real model.
pub fn model(config: &Config, a: ModelArgs<'_>) -> CliResult {
    let root = repo_root(a.repo)?;
    let holes = read_holes(a.holes)?;
    if a.budget == 0 || a.count == 0 || a.max_tokens == 0 || a.prefix_tokens == 0 {
        return Err(CliError(
            "--budget, --count, --max-tokens and --prefix-tokens take positive numbers".into(),
        ));
    }
    let (id, path) = store::resolve_served(config, a.model)?;
    // The KV cache type config.toml gives the model, as `kiln serve` would.
    let kv_type = super::kv_type_for(config, a.model.unwrap_or(&id), None)?;
    let loaded = Loaded::load(id, path, None, &Backend::builtin_cpu(), 0).map_err(CliError)?;
    let exec = kiln_runtime::backend::exec::Executor::new(Backend::builtin_cpu(), 0);
    let mut session =
        kiln_runtime::model::Session::with_kv_type(loaded.model.clone(), exec, None, kv_type)?;
    let ranker = kiln_serve::start::ranker(config, &mut |m| eprintln!("kiln: {m}"));
    let progress = super::Progress::new("scoring holes with the model");
    let mut on_hole = |done: usize, total: usize| progress.update(done, total);
    let scores = ctxbench::evaluate_model(
        &root,
        &holes,
        ctxbench::ModelRun {
            loaded: &loaded,
            session: &mut session,
            ranker: &ranker,
            budget: a.budget,
            prefix_tokens: a.prefix_tokens,
            suffix_tokens: a.suffix_tokens,
            selectors: a.selectors.as_deref(),
            holes: a.count,
            max_tokens: a.max_tokens,
            seed: a.seed,
            progress: &mut on_hole,
        },
    )
    .map_err(CliError)?;
    let text_nll = if a.nll_tokens > 0 {
        let files = kiln_serve::context::read_files(&root);
        Some(
            ctxbench::text_nll(&mut session, &loaded, &files, a.nll_tokens, a.seed)
                .map_err(CliError)?,
        )
    } else {
        None
    };
    if a.json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "repo": root, "model": loaded.id,
            "text_nll": text_nll,
            "budget": a.budget, "prefix_tokens": a.prefix_tokens,
            "suffix_tokens": a.suffix_tokens, "max_tokens": a.max_tokens,
            "kv_type": kiln_runtime::model::forward::KvCache::type_name(kv_type),
            "ranking": {
                "policy": ranker.policy().map(|p| p.meta.label()),
                "params": (ranker.param_values().into_iter())
                    .map(|(k, v)| (k, serde_json::json!(v)))
                    .collect::<serde_json::Map<_, _>>(),
            },
            "scores": scores,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let n = scores.first().map_or(0, |s| s.holes);
    println!(
        "{n} cross-file holes in {}, {} with {} context tokens at most (95% bootstrap intervals)",
        root.display(),
        loaded.id,
        a.budget
    );
    println!(
        "{:<18} {:>9} {:>26} {:>20} {:>20} {:>8} {:>7}",
        "selector", "NLL/tok", "ΔNLL nats/hole", "exact match", "edit similarity", "gain", "tokens"
    );
    let iv = |i: &ctxbench::Interval| format!("{:.3} [{:.3}, {:.3}]", i.mean, i.lo, i.hi);
    for s in &scores {
        println!(
            "{:<18} {:>9.3} {:>26} {:>20} {:>20} {:>8} {:>7.0}",
            s.selector,
            s.nll_per_token,
            s.delta_nll.as_ref().map_or("-".into(), iv),
            iv(&s.exact_match),
            iv(&s.edit_similarity),
            s.gain_captured
                .map_or("-".into(), |g| format!("{:.2}", g + 0.0)),
            s.mean_context_tokens
        );
    }
    if let Some(t) = &text_nll {
        println!(
            "the repository's own text: {:.3} nats per token over {} tokens of {} files",
            t.nll_per_token, t.tokens, t.files
        );
    }
    Ok(ExitCode::SUCCESS)
}
