//! `kiln policy …`

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, open_registry, print_json, table};
use kiln_registry::actor;
use kiln_registry::config::Config;
use kiln_runtime::policy::{self, Input};
use kiln_sandbox::limits::LimitOverrides;
use std::path::Path;
use std::process::ExitCode;

pub struct AddArgs<'a> {
    pub file: &'a Path,
    pub cases: Option<&'a Path>,
    pub max_p99_ms: f64,
    pub overrides: LimitOverrides,
    pub json: bool,
}

pub fn add(config: &Config, a: AddArgs<'_>) -> CliResult {
    let mut registry = open_registry(config)?;
    let (rec, t, report) = policy::add(
        config,
        &mut registry,
        a.file,
        a.cases,
        &a.overrides,
        a.max_p99_ms,
        &actor(),
    )?;
    if a.json {
        print_json(
            &serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "policy": rec, "previous_active": t.before, "quality": report}),
        );
    } else {
        println!(
            "added {} ({} policy, ABI {}): {} calls, p50 {:.2} ms, p99 {:.2} ms, fuel ≤ {}{}; now the active {} policy",
            rec.label(),
            rec.kind,
            rec.abi,
            report.calls,
            report.p50_ms,
            report.p99_ms,
            report.fuel_max,
            report
                .agreement_with_builtin
                .map(|a| format!(
                    ", top-5 agreement with the built-in ranker {:.0}%",
                    a * 100.0
                ))
                .unwrap_or_default(),
            rec.kind
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(config: &Config, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let all = registry.policies()?;
    if as_json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "policies": all}));
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!(
            "No policies installed: kiln ranks context with its built-in BM25+recency ranker."
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.version.clone(),
                p.kind.clone(),
                p.state.clone(),
                p.abi.clone(),
                format!("{:.2} ms", p.quality["p99_ms"].as_f64().unwrap_or(0.0)),
                p.failures.to_string(),
                p.sha256[..12].to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "NAME", "VERSION", "KIND", "STATE", "ABI", "P99", "FAILURES", "SHA256"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

fn load(
    config: &Config,
    arg: &str,
) -> Result<(kiln_sandbox::Policy, Option<kiln_registry::PolicyRecord>), CliError> {
    let registry = open_registry(config)?;
    let (bytes, rec) = policy::resolve(config, &registry, arg).map_err(CliError)?;
    let limits = policy::limits_of(rec.as_ref(), &bytes);
    let p = policy::sandbox(config)
        .load(&bytes, limits)
        .map_err(|e| CliError(format!("{arg}: {e}")))?;
    // Keep a copy so that `kiln policy replay` finds the exact module.
    policy::store_blob(config, &bytes)
        .map_err(|e| CliError(format!("cannot store the module: {e}")))?;
    Ok((p, rec))
}

/// `kiln policy test --ctxbench`: where and how to score a ranking policy.
pub struct Ctxbench<'a> {
    pub repo: &'a Path,
    pub budgets: &'a [usize],
    pub cut: usize,
    pub seed: u64,
    pub model: Option<&'a str>,
}

/// kiln's selector on ctxbench with the policy and with the built-in
/// ranker, per budget.
fn ctxbench_scores(
    config: &Config,
    policy: std::sync::Arc<kiln_sandbox::Policy>,
    c: &Ctxbench<'_>,
) -> Result<serde_json::Value, CliError> {
    use kiln_sandbox::breaker::Ranker;
    use kiln_serve::ctxbench::{self, Selector};
    if c.budgets.is_empty() || c.budgets.contains(&0) {
        return Err(CliError(
            "--budgets takes positive token counts, e.g. 512,2048".into(),
        ));
    }
    let root = c.repo.canonicalize().map_err(|e| {
        CliError(format!(
            "{}: {e}; name a repository's directory",
            c.repo.display()
        ))
    })?;
    // Read once: for the holes, the index and both rankers' runs.
    let files = kiln_serve::context::read_files(&root);
    let holes = ctxbench::sample_files(&files, c.cut, c.seed);
    let cross = holes.iter().filter(|h| h.kind == "cross_file").count();
    if cross == 0 {
        return Err(CliError(format!(
            "{}: no cross-file holes (an identifier used in one file and defined in another); name a repository with several source files",
            root.display()
        )));
    }
    let (id, path) = kiln_runtime::store::resolve_served(config, c.model)?;
    let loaded = kiln_serve::engine::Loaded::load(
        id,
        path,
        None,
        &kiln_runtime::backend::Backend::builtin_cpu(),
        0,
    )
    .map_err(CliError)?;
    let counter = kiln_serve::prompt::Counter::of(&loaded);
    let threshold = kiln_sandbox::breaker::DEFAULT_THRESHOLD;
    let corpus = ctxbench::Corpus::new(&root, &files, &holes).map_err(CliError)?;
    let score = |ranker: &Ranker| {
        corpus
            .evaluate(&holes, &counter, ranker, c.budgets, &[Selector::Kiln])
            .map_err(CliError)
    };
    // Both with config.toml's [policies.params], as kiln serve ranks.
    let with_params = |r: Ranker| {
        let (r, problems) = r.with_params(&config.policy_params);
        for p in problems {
            eprintln!("kiln: {}: {p}", config.config_file.display());
        }
        r
    };
    let ours = score(&with_params(Ranker::new(Some(policy), threshold)))?;
    let builtin = score(&with_params(Ranker::new(None, threshold)))?;
    let rows: Vec<serde_json::Value> = ours
        .iter()
        .zip(&builtin)
        .map(|(p, b)| serde_json::json!({"budget": p.budget, "policy": p, "builtin": b}))
        .collect();
    Ok(serde_json::json!({
        "repo": root, "holes": cross, "seed": c.seed, "tokens": loaded.id, "budgets": rows,
    }))
}

pub fn test(
    config: &Config,
    arg: &str,
    cases: Option<&Path>,
    max_p99_ms: f64,
    ctxbench: Option<Ctxbench<'_>>,
    as_json: bool,
) -> CliResult {
    let (p, _) = load(config, arg)?;
    if ctxbench.is_some() && p.meta.kind != kiln_sandbox::PolicyKind::Rank {
        return Err(CliError(format!(
            "{} is a {} policy; --ctxbench scores ranking policies",
            p.meta.label(),
            p.meta.kind.name()
        )));
    }
    let mut all = policy::synthetic_cases(p.meta.kind);
    if let Some(dir) = cases {
        all.extend(policy::read_cases(dir, p.meta.kind).map_err(CliError)?);
    }
    let report = policy::quality_gate(&p, &all, max_p99_ms, 5);
    let label = p.meta.label();
    let bench = match &ctxbench {
        Some(c) => Some(ctxbench_scores(config, std::sync::Arc::new(p), c)?),
        None => None,
    };
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "policy": label, "report": report,
            "ctxbench": bench,
        }));
    } else {
        println!(
            "{}: {} cases, {} calls; latency p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms (ceiling {} ms); fuel mean {:.0}, max {}",
            label,
            report.cases,
            report.calls,
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report.max_p99_ms,
            report.fuel_mean,
            report.fuel_max
        );
        if let Some(a) = report.agreement_with_builtin {
            println!(
                "top-5 agreement with the built-in ranker: {:.1}%",
                a * 100.0
            );
        }
        for f in &report.failures {
            println!("FAIL {f}");
        }
        if let Some(b) = &bench {
            println!(
                "ctxbench: {} cross-file holes of {} (seed {}; tokens: {})",
                b["holes"],
                b["repo"].as_str().unwrap_or(""),
                b["seed"],
                b["tokens"].as_str().unwrap_or("")
            );
            println!(
                "{:>7} {:>17} {:>17} {:>15} {:>17}",
                "budget", "recall (built-in)", "density (b-in)", "mrr (b-in)", "p50 ms (b-in)"
            );
            for row in b["budgets"].as_array().into_iter().flatten() {
                let f = |who: &str, k: &str| row[who][k].as_f64().unwrap_or(0.0);
                println!(
                    "{:>7} {:>7.3} ({:>6.3}) {:>7.3} ({:>6.3}) {:>6.3} ({:>6.3}) {:>7.2} ({:>6.2})",
                    row["budget"].as_u64().unwrap_or(0),
                    f("policy", "definition_recall"),
                    f("builtin", "definition_recall"),
                    f("policy", "density"),
                    f("builtin", "density"),
                    f("policy", "mrr"),
                    f("builtin", "mrr"),
                    f("policy", "latency_ms_p50"),
                    f("builtin", "latency_ms_p50"),
                );
            }
        }
        println!("{}", if report.passed { "passed" } else { "FAILED" });
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn run(config: &Config, arg: &str, input: &Path, as_json: bool) -> CliResult {
    let (p, rec) = load(config, arg)?;
    if let Some(r) = &rec
        && r.state == "disabled"
        && r.failures >= i64::from(kiln_sandbox::breaker::DEFAULT_THRESHOLD)
    {
        return Err(CliError(format!(
            "{} was disabled by the circuit breaker after {} consecutive failures; fix it and `kiln policy enable {}`",
            r.label(),
            r.failures,
            r.name
        )));
    }
    let text = std::fs::read_to_string(input)
        .map_err(|e| CliError(format!("cannot read {}: {e}", input.display())))?;
    let input = Input::parse(p.meta.kind, &text)
        .map_err(|e| CliError(format!("{}: {e}", input_name(input))))?;
    let mut registry = open_registry(config)?;
    let seal = match config.encrypt_at_rest {
        true => Some(kiln_runtime::store::sealing_keys(config)?),
        false => None,
    };
    let report = policy::run_once(&mut registry, &p, &input, seal.as_ref()).map_err(CliError)?;
    if as_json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "run": report}));
    } else {
        match (&report.output, &report.error) {
            (Some(out), _) => println!("{out}"),
            (None, Some(e)) => {
                eprintln!("kiln: {}: {e}", report.policy);
                if let Some(f) = &report.fallback {
                    eprintln!("kiln: the built-in ranker's scores stand in:");
                    println!("{}", serde_json::to_string(f).unwrap_or_default());
                }
            }
            _ => {}
        }
        eprintln!(
            "kiln: decision {} ({}; fuel {}, {} µs){}",
            report.decision_id,
            report.policy,
            report.fuel_used.map_or("-".into(), |f| f.to_string()),
            report.elapsed_us.map_or("-".into(), |t| t.to_string()),
            if report.tripped {
                "; the circuit breaker disabled this policy"
            } else {
                ""
            }
        );
    }
    Ok(if report.error.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn input_name(p: &Path) -> String {
    p.display().to_string()
}

pub fn log(config: &Config, limit: usize, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let decisions = registry.decisions(limit)?;
    if as_json {
        print_json(
            &serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "decisions": decisions}),
        );
        return Ok(ExitCode::SUCCESS);
    }
    if decisions.is_empty() {
        println!("No decisions logged yet.");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = decisions
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.at.clone(),
                d.policy.clone(),
                d.kind.clone(),
                d.fuel_used.map(|f| f.to_string()).unwrap_or_default(),
                d.error.clone().unwrap_or_else(|| "ok".into()),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["ID", "AT", "POLICY", "KIND", "FUEL", "OUTCOME"], &rows)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn replay(config: &Config, id: i64, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let r = policy::replay(config, &registry, id).map_err(CliError)?;
    if as_json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "replay": r}));
    } else if r.identical {
        println!(
            "decision {id} ({}): replayed bit for bit ({})",
            r.policy,
            r.replayed.clone().unwrap_or_default()
        );
    } else {
        println!(
            "decision {id} ({}): DIFFERENT\n  recorded: {}\n  replayed: {}",
            r.policy,
            r.original.clone().unwrap_or_default(),
            r.replayed.clone().unwrap_or_default()
        );
    }
    Ok(if r.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The SDK a scaffolded policy builds against, as kiln ships it.
const SDK_LIB: &str = include_str!("../../../plugins/policies/sdk/src/lib.rs");
const SDK_FORMULA: &str = include_str!("../../../plugins/policies/sdk/src/formula.rs");
const SDK_HEADER: &str = include_str!("../../../plugins/policies/sdk/include/kiln_policy.h");
/// Recorded cases a new ranking policy starts with (the built-in
/// ranker's expectations, which the scaffold's formula meets).
const CASES: [(&str, &str); 2] = [
    (
        "python-request-handler.json",
        include_str!("../../../plugins/policies/cases/rank/python-request-handler.json"),
    ),
    (
        "rust-cache-eviction.json",
        include_str!("../../../plugins/policies/cases/rank/rust-cache-eviction.json"),
    ),
];

const RUST_POLICY: &str = r#"//! The ranking policy @NAME@: scores each context candidate; kiln packs
//! the best into the prompt. It starts as kiln's built-in formula (BM25,
//! the definitions of the names at the cursor, recency, the same file);
//! change `rank`, then `./build.sh` and `kiln policy test @NAME@.wasm
//! --ctxbench YOUR_REPO` to see whether it beats the built-in ranker.

use kiln_policy::{export_ranker, formula, RankInput};

fn rank(input: &RankInput, scores: &mut Vec<f32>) {
    // kiln's weights, but what a definition is worth is a parameter the
    // metadata declares: `[policies.params.@NAME@] definition = 40` in
    // kiln's config.toml sets it, `kiln tune run MODEL --objective quality
    // --quality YOUR_REPO` fits it to your code.
    let mut w = formula::Weights::defaults();
    w.definition = input.param(0, 32.0) as f32;
    for c in input.candidates() {
        scores.push(formula::bm25_recency(
            &w,
            c.bm25(),
            c.edit_recency_s(),
            c.open_recency_s(),
            c.line_distance(),
            c.flags(),
            c.definition(),
            c.import_hops(),
        ));
    }
}

export_ranker!(
    rank,
    b"{\"abi\":\"1.4\",\"kind\":\"rank\",\"name\":\"@NAME@\",\"version\":\"0.1.0\",\"params\":[\
{\"name\":\"definition\",\"default\":32,\"min\":0,\"max\":128,\"doc\":\"a definition of a name used at the cursor\"}]}"
);
"#;

const RUST_BUILD: &str = r#"#!/usr/bin/env bash
# Builds @NAME@.wasm: the SDK, then the policy, for wasm32-unknown-unknown
# (std, panic=abort) with a rustc that has that target (Debian:
# apt-get install rustc libstd-rust-dev-wasm32; or rustup target add
# wasm32-unknown-unknown and KILN_WASM_RUSTC=rustc).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
rustc=${KILN_WASM_RUSTC:-/usr/bin/rustc}
flags=(--edition 2021 --target wasm32-unknown-unknown -C opt-level=3 -C panic=abort)
mkdir -p "$here/target"
"$rustc" "${flags[@]}" --crate-type rlib --crate-name kiln_policy "$here/sdk/lib.rs" \
  -o "$here/target/libkiln_policy.rlib"
"$rustc" "${flags[@]}" -C strip=symbols --crate-type cdylib --crate-name @CRATE@ \
  --extern kiln_policy="$here/target/libkiln_policy.rlib" "$here/src/lib.rs" -o "$here/@NAME@.wasm"
echo "$here/@NAME@.wasm"
"#;

const C_POLICY: &str = r#"/* The ranking policy @NAME@: scores each context candidate; kiln packs
 * the best into the prompt. It starts as kiln's built-in formula (BM25,
 * the definitions of the names at the cursor, recency, the same file);
 * change kiln_rank, then ./build.sh and `kiln policy test @NAME@.wasm
 * --ctxbench YOUR_REPO` to see whether it beats the built-in ranker. */
#include "kiln_policy.h"

/* What a definition is worth is a parameter (ABI 1.4): [policies.params.@NAME@]
 * definition = 40 in kiln's config.toml sets it, `kiln tune run MODEL
 * --objective quality --quality YOUR_REPO` fits it to your code. */
KILN_POLICY_METADATA("{\"abi\":\"1.4\",\"kind\":\"rank\",\"name\":\"@NAME@\",\"version\":\"0.1.0\",\"params\":["
                     "{\"name\":\"definition\",\"default\":32,\"min\":0,\"max\":128,\"doc\":\"a definition of a name used at the cursor\"}]}")
KILN_DEFINE_ALLOC

static float score(const kiln_rank_input *in, const uint8_t *c) {
    float s = kiln_cand_bm25(c);
    float definition = kiln_cand_definition(in, c);
    if (definition > 0.0f) s += (float)kiln_param(in, 0, 32.0) * definition;
    float edited = kiln_cand_edit_recency_s(c), opened = kiln_cand_open_recency_s(c);
    if (edited >= 0.0f) s += 2.0f / (1.0f + edited / 60.0f);
    if (opened >= 0.0f) s += 1.0f / (1.0f + opened / 300.0f);
    uint32_t flags = kiln_cand_flags(c);
    if (flags & KILN_SAME_FILE) {
        s += 1.0f;
        int32_t d = kiln_cand_line_distance(c);
        if (d >= 0) s += 1.0f / (1.0f + (float)d / 50.0f);
    }
    if (flags & KILN_IMPORT_RELATED) s += 0.75f;
    if (flags & KILN_OPEN_IN_EDITOR) s += 0.25f;
    uint32_t hops = kiln_cand_import_hops(in, c);
    if (hops > 0) s += 2.0f / (float)hops;
    return s;
}

KILN_EXPORT(kiln_rank) int64_t kiln_rank(int32_t ptr, int32_t len) {
    kiln_rank_input in;
    if (!kiln_rank_input_parse((const uint8_t *)(uintptr_t)ptr, (uint32_t)len, &in)) return 0;
    uint8_t *out = kiln_scores_begin(in.n);
    if (!out) return 0;
    for (uint32_t i = 0; i < in.n; i++) kiln_scores_set(out, i, score(&in, kiln_candidate(&in, i)));
    return kiln_scores_end(out, in.n);
}
"#;

const C_BUILD: &str = r#"#!/usr/bin/env bash
# Builds @NAME@.wasm with clang for wasm32 and lld (Debian: apt-get
# install clang-16 lld-16; KILN_WASM_CLANG names another clang).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
clang=${KILN_WASM_CLANG:-clang-16}
"$clang" --target=wasm32 -O2 -nostdlib -fuse-ld=lld -Wl,--no-entry -Wl,--strip-debug \
  -I "$here/include" -o "$here/@NAME@.wasm" "$here/@NAME@.c"
echo "$here/@NAME@.wasm"
"#;

const README: &str = r#"# @NAME@

A kiln ranking policy (@LANG@), made by `kiln policy new`. It starts as
kiln's built-in ranking formula.

```sh
./build.sh                                          # -> @NAME@.wasm
kiln policy test @NAME@.wasm --cases cases          # latency, fuel, agreement, recorded cases
kiln policy test @NAME@.wasm --ctxbench ~/src/app   # recall, density, MRR vs the built-in ranker
kiln policy add @NAME@.wasm --cases cases           # the same gate, then active in `kiln serve`
```

A case in `cases/` is an input as `kiln policy run` takes it and the ids
that must rank first; add your own. The candidate fields are in kiln's
`sandbox/ABI.md`.
"#;

/// `kiln policy new NAME --lang rust|c [--dir DIR]`: a ranking policy
/// project that builds and passes `kiln policy test` as generated.
pub fn new(name: &str, lang: &str, dir: Option<&Path>, as_json: bool) -> CliResult {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(CliError(format!(
            "{name:?} is not a policy name: use lowercase letters, digits and '-', starting with a letter (e.g. my-ranker)"
        )));
    }
    let dir = dir.map_or_else(|| Path::new(name).to_path_buf(), Path::to_path_buf);
    if dir.exists() && std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(CliError(format!(
            "{} exists and is not empty; choose another --dir",
            dir.display()
        )));
    }
    let fill = |t: &str| {
        t.replace("@NAME@", name)
            .replace("@CRATE@", &name.replace('-', "_"))
            .replace("@LANG@", if lang == "c" { "C" } else { "Rust" })
    };
    let mut files: Vec<(String, String)> = match lang {
        "rust" => vec![
            ("src/lib.rs".into(), fill(RUST_POLICY)),
            ("sdk/lib.rs".into(), SDK_LIB.to_string()),
            ("sdk/formula.rs".into(), SDK_FORMULA.to_string()),
            ("build.sh".into(), fill(RUST_BUILD)),
        ],
        "c" => vec![
            (format!("{name}.c"), fill(C_POLICY)),
            ("include/kiln_policy.h".into(), SDK_HEADER.to_string()),
            ("build.sh".into(), fill(C_BUILD)),
        ],
        other => {
            return Err(CliError(format!("--lang {other:?}: choose rust or c")));
        }
    };
    files.push(("README.md".into(), fill(README)));
    for (file, text) in CASES {
        files.push((format!("cases/{file}"), text.to_string()));
    }
    let write = || -> std::io::Result<()> {
        for (rel, text) in &files {
            let path = dir.join(rel);
            std::fs::create_dir_all(path.parent().expect("a file in the project"))?;
            std::fs::write(&path, text)?;
            if rel == "build.sh" {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            }
        }
        Ok(())
    };
    write().map_err(|e| CliError(format!("{}: {e}", dir.display())))?;
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "policy": name, "lang": lang, "dir": dir,
            "files": files.iter().map(|(f, _)| f).collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "{}: a {lang} ranking policy; build it with {}/build.sh, then `kiln policy test {}/{name}.wasm --cases {}/cases`",
            dir.display(),
            dir.display(),
            dir.display(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
