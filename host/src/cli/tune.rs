//! `kiln tune`: finds the settings that make a model fastest on this
//! machine. Each trial measures a setting as whole `kiln bench` processes
//! (so that the thread count, which a process fixes at start, can vary):
//! the time to first token of a prompt of `--prompt-tokens` tokens, the
//! decode speed and the peak memory. Trials are recorded in the registry
//! as they run (a killed search resumes with `kiln tune resume`); the best
//! setting is measured again against the default, interleaved, and
//! declared better only when a paired sign test says so; `kiln tune
//! apply` writes a trial's setting into `config.toml` as a recorded
//! change that `kiln tune rollback` undoes.

use super::{CliResult, JSON_SCHEMA_VERSION, open_registry, print_json, table};
use kiln_registry::Registry;
use kiln_registry::config::{Config, EngineSetting, KvType};
use kiln_runtime::tune::{
    Grid, Halving, Observation, PolicySampler, Random, Sampler, Setting, Space, median,
    pareto_front, sign_test,
};
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::process::{Command, ExitCode};

/// What `kiln tune run` was asked.
pub struct RunArgs {
    pub model: String,
    /// `typing` (a replayed typing session through the language server)
    /// or `prompt` (one prompt's time to first token).
    pub objective: String,
    pub keystrokes: usize,
    pub max_tokens: usize,
    pub sampler: String,
    pub trials: u32,
    pub repeats: u32,
    pub prompt_tokens: usize,
    pub max_memory_mb: Option<u64>,
    pub confirm: u32,
    pub seed: u64,
    pub json: bool,
}

/// The knobs searched: threads (1 to the CPUs this process may use), the
/// KV cache type, the attention block of prompt graphs, and for a typing
/// session the speculative decoding of completions (greedy: the same
/// tokens either way, so only speed is at stake).
fn default_space(typing: bool) -> Space {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let mut knobs = vec![
        json!({"type": "int", "name": "threads", "lo": 1, "hi": cpus.max(1), "log": false}),
        json!({"type": "choice", "name": "kv_type", "options": ["f16", "q8_0", "q4_0"]}),
        json!({"type": "int", "name": "attention_block", "lo": 16, "hi": 256, "log": true}),
    ];
    if typing {
        knobs.push(json!({"type": "choice", "name": "draft", "options": ["none", "ngram"]}));
    }
    serde_json::from_value(json!({ "knobs": knobs })).expect("a valid space")
}

/// The setting kiln would use now for `model`: the environment's or
/// config's threads, config's KV type for it, config's attention block
/// (and for a typing session, config's draft).
fn current_setting(config: &Config, model: &str, typing: bool) -> Setting {
    let mut s: Setting = [
        ("threads", json!(kiln_runtime::model::cpu_threads())),
        (
            "kv_type",
            json!(
                config
                    .kv_cache
                    .for_model(&kv_key(config, model).unwrap_or_else(|_| model.to_string()))
                    .name()
            ),
        ),
        (
            "attention_block",
            json!(
                config
                    .engine
                    .attention_block
                    .unwrap_or(kiln_runtime::model::forward::ATTENTION_BLOCK)
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if typing {
        s.insert(
            "draft".into(),
            json!(config.completion_draft.as_deref().unwrap_or("none")),
        );
    }
    s
}

fn describe(s: &Setting) -> String {
    s.iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_string)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One setting measured `repeats` times, a whole process each: what was
/// measured by name (`ttft_ms`, `e2e_ms`, `decode_tokens_per_s`,
/// `memory_bytes`), one value per repeat.
struct Measured(std::collections::BTreeMap<String, Vec<f64>>);

impl Measured {
    fn to_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (k, v) in &self.0 {
            out.insert(k.clone(), json!(v));
            out.insert(format!("median_{k}"), json!(median(v)));
        }
        Value::Object(out)
    }
}

/// What a trial measures, from the run's objective.
struct Objective {
    kind: String,
    prompt_tokens: usize,
    keystrokes: usize,
    max_tokens: usize,
}

impl Objective {
    fn of(o: &Value) -> Objective {
        Objective {
            kind: o["kind"].as_str().unwrap_or("prompt").to_string(),
            prompt_tokens: o["prompt_tokens"].as_u64().unwrap_or(512) as usize,
            keystrokes: o["keystrokes"].as_u64().unwrap_or(40) as usize,
            max_tokens: o["max_tokens"].as_u64().unwrap_or(16) as usize,
        }
    }
}

/// What `s` sets in a config, the model's KV cache type under `key`.
fn engine_setting<'a>(s: &'a Setting, key: &'a str) -> Result<EngineSetting<'a>, String> {
    let kv_type = match s.get("kv_type").and_then(Value::as_str) {
        None => None,
        Some("f16") => Some(KvType::F16),
        Some("q8_0") => Some(KvType::Q8_0),
        Some("q4_0") => Some(KvType::Q4_0),
        Some(other) => return Err(format!("unknown KV cache type {other}")),
    };
    let int = |k: &str| s.get(k).and_then(Value::as_u64).map(|v| v as usize);
    Ok(EngineSetting {
        threads: int("threads"),
        attention_block: int("attention_block"),
        kv_type: kv_type.map(|kv| (key, kv)),
        draft: s.get("draft").and_then(Value::as_str),
    })
}

/// The `[kv_cache.models]` key kiln looks `model` up by: a file's stem,
/// a registered model's `NAME@VERSION`.
fn kv_key(config: &Config, model: &str) -> Result<String, String> {
    kiln_runtime::store::resolve_served(config, Some(model))
        .map(|(id, _)| id)
        .map_err(|e| e.to_string())
}

/// Writes the user's config with `s` applied where a trial's processes
/// read it (`KILN_CONFIG`), so that what is measured is what `kiln tune
/// apply` would write.
fn trial_config(config: &Config, model: &str, s: &Setting) -> Result<std::path::PathBuf, String> {
    let before = kiln_registry::config::config_text(config)?;
    let key = kv_key(config, model)?;
    let text = kiln_registry::config::engine_setting_text(
        &before,
        &config.config_file,
        &engine_setting(s, &key)?,
    )?;
    let dir = config.home.join("cache");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(format!("tune-trial-{}.toml", std::process::id()));
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

fn measure_once(
    config: &Config,
    objective: &Objective,
    model: &str,
    s: &Setting,
) -> Result<Vec<(&'static str, f64)>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find kiln itself: {e}"))?;
    let trial_config = trial_config(config, model, s)?;
    let mut cmd = Command::new(exe);
    cmd.env("KILN_CONFIG", &trial_config);
    if let Some(t) = s.get("threads").and_then(Value::as_u64) {
        cmd.env("KILN_THREADS", t.to_string());
    }
    let typing = objective.kind == "typing";
    if typing {
        cmd.args(["demo", "--model", model, "--json"])
            .args(["--keystrokes", &objective.keystrokes.to_string()])
            .args(["--max-tokens", &objective.max_tokens.to_string()]);
    } else {
        cmd.args(["bench", model, "--json", "--decode-tokens", "8"])
            .args(["--prompt-tokens", &objective.prompt_tokens.to_string()]);
    }
    let out = cmd.output().map_err(|e| format!("cannot run kiln: {e}"));
    let _ = std::fs::remove_file(&trial_config);
    let out = out?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let r: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("kiln printed no JSON: {e}"))?;
    let mib = |v: &Value| v.as_f64().map(|m| m * (1 << 20) as f64);
    if typing {
        let r = &r["report"];
        let memory = mib(&r["server_anonymous_memory_mib"])
            .zip(mib(&r["server_file_backed_memory_mib"]))
            .map_or(f64::NAN, |(a, f)| a + f);
        match (r["ttft_ms_p50"].as_f64(), r["e2e_ms_p50"].as_f64()) {
            (Some(t), Some(e)) => Ok(vec![
                ("ttft_ms", t),
                ("e2e_ms", e),
                ("memory_bytes", memory),
            ]),
            _ => Err("kiln demo reported no latencies".into()),
        }
    } else {
        let prompt_tps = r["prompt_tokens_per_s"].as_f64().unwrap_or(0.0);
        if prompt_tps <= 0.0 {
            return Err("kiln bench measured no prompt speed".into());
        }
        Ok(vec![
            ("ttft_ms", objective.prompt_tokens as f64 / prompt_tps * 1e3),
            (
                "decode_tokens_per_s",
                r["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            ),
            (
                "memory_bytes",
                r["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN),
            ),
        ])
    }
}

fn measure(
    config: &Config,
    objective: &Objective,
    model: &str,
    s: &Setting,
    repeats: u32,
) -> Result<Measured, String> {
    let mut m = Measured(Default::default());
    for _ in 0..repeats.max(1) {
        for (k, v) in measure_once(config, objective, model, s)? {
            m.0.entry(k.to_string()).or_default().push(v);
        }
    }
    Ok(m)
}

/// What is minimised: the median of the objective's metric, infinite for
/// a failed trial or one over the memory cap.
fn metric_of(metrics: &Value, objective: &Value) -> f64 {
    let name = objective["metric"].as_str().unwrap_or("ttft_ms");
    let value = metrics[format!("median_{name}")]
        .as_f64()
        .unwrap_or(f64::INFINITY);
    let memory = metrics["median_memory_bytes"].as_f64().unwrap_or(f64::NAN);
    if objective["max_memory_bytes"]
        .as_f64()
        .is_some_and(|m| memory > m)
    {
        f64::INFINITY
    } else {
        value
    }
}

fn sampler_for(
    config: &Config,
    registry: &Registry,
    name: &str,
    seed: u64,
    repeats: u32,
) -> Result<Box<dyn Sampler>, String> {
    Ok(match name {
        "grid" => Box::new(Grid { repeats }),
        "random" => Box::new(Random {
            rng: fastrand::Rng::with_seed(seed),
            repeats,
        }),
        "halving" => Box::new(Halving::new(seed, 8, repeats)),
        other => {
            // `policy` (the active tuning policy), or `policy:NAME|FILE`.
            let spec = match other.strip_prefix("policy") {
                Some("") => None,
                Some(rest) if rest.starts_with(':') => Some(&rest[1..]),
                _ => {
                    return Err(format!(
                        "unknown sampler {other}: give grid, random, halving, policy (the active \
                         tuning policy) or policy:NAME|FILE.wasm (e.g. the shipped tpe or genetic)"
                    ));
                }
            };
            let bytes = match spec {
                Some(s) if s.ends_with(".wasm") || std::path::Path::new(s).is_file() => {
                    std::fs::read(s).map_err(|e| format!("cannot read {s}: {e}"))?
                }
                Some(s) => {
                    let p = registry
                        .policies()
                        .map_err(|e| e.to_string())?
                        .into_iter()
                        .find(|p| p.name == s || p.label() == s)
                        .ok_or_else(|| format!("no installed policy {s} (`kiln policy list`)"))?;
                    std::fs::read(&p.blob_path)
                        .map_err(|e| format!("cannot read {}: {e}", p.blob_path.display()))?
                }
                None => {
                    let p = registry
                        .active_policy("tune")
                        .map_err(|e| e.to_string())?
                        .ok_or("no active tuning policy: `kiln policy add tpe.wasm`, or name one with --sampler policy:FILE")?;
                    std::fs::read(&p.blob_path)
                        .map_err(|e| format!("cannot read {}: {e}", p.blob_path.display()))?
                }
            };
            let sandbox = kiln_runtime::policy::sandbox(config);
            let policy = sandbox.load(&bytes, None).map_err(|e| e.to_string())?;
            Box::new(PolicySampler {
                policy,
                seed,
                repeats,
            })
        }
    })
}

/// The trials done so far as the sampler sees them.
fn history(
    registry: &Registry,
    run: &kiln_registry::tune::TuneRun,
) -> Result<Vec<Observation>, String> {
    Ok(registry
        .tune_trials(run.id)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|t| t.status != "running")
        .map(|t| Observation {
            setting: serde_json::from_value(t.setting.clone()).unwrap_or_default(),
            metric: t
                .metrics
                .as_ref()
                .map_or(f64::INFINITY, |m| metric_of(m, &run.objective)),
            repeats: t.repeats,
        })
        .collect())
}

pub fn run(config: &Config, args: &RunArgs) -> CliResult {
    let mut registry = open_registry(config)?;
    // Resolved now, so that a bad name fails before any trial.
    kiln_runtime::store::resolve(config, &args.model)?;
    let typing = args.objective == "typing";
    let space = default_space(typing);
    let mut objective = match args.objective.as_str() {
        "typing" => json!({
            "kind": "typing", "metric": "e2e_ms", "keystrokes": args.keystrokes,
            "max_tokens": args.max_tokens,
        }),
        "prompt" => json!({
            "kind": "prompt", "metric": "ttft_ms", "prompt_tokens": args.prompt_tokens,
            "decode_tokens": 8,
        }),
        other => {
            return Err(format!(
                "unknown objective {other}: give typing (a replayed typing session's latency) \
                 or prompt (one prompt's time to first token)"
            )
            .into());
        }
    };
    for (k, v) in [
        (
            "max_memory_bytes",
            json!(args.max_memory_mb.map(|m| m << 20)),
        ),
        ("repeats", json!(args.repeats)),
        ("confirm", json!(args.confirm)),
        ("seed", json!(args.seed)),
        (
            "default",
            json!(current_setting(config, &args.model, typing)),
        ),
    ] {
        objective[k] = v;
    }
    // Checked before the run is recorded.
    sampler_for(config, &registry, &args.sampler, args.seed, args.repeats)?;
    let run = registry.tune_start(
        &args.model,
        &args.sampler,
        &serde_json::to_value(&space).unwrap_or_default(),
        &objective,
        args.trials,
    )?;
    eprintln!(
        "kiln: tuning run {} ({} trials, {} sampler; `kiln tune resume {}` continues it if stopped)",
        run.id, args.trials, args.sampler, run.id
    );
    search(config, &mut registry, run.id, args.json)
}

pub fn resume(config: &Config, id: i64, as_json: bool) -> CliResult {
    let mut registry = open_registry(config)?;
    let run = registry.tune_run(id)?;
    if run.state == "done" {
        return Err(format!("tuning run {id} is done; `kiln tune show {id}` shows it").into());
    }
    let dropped = registry.tune_forget_unfinished(id)?;
    if dropped > 0 {
        eprintln!("kiln: measuring again the {dropped} trial(s) cut short");
    }
    search(config, &mut registry, id, as_json)
}

fn search(config: &Config, registry: &mut Registry, id: i64, as_json: bool) -> CliResult {
    let run = registry.tune_run(id)?;
    let space: Space = serde_json::from_value(run.space.clone())
        .map_err(|e| format!("tuning run {id}'s space is unreadable: {e}"))?;
    let o = &run.objective;
    let objective = Objective::of(o);
    let unit = if o["metric"] == "e2e_ms" {
        "ms end to end"
    } else {
        "ms to the first token"
    };
    let repeats = o["repeats"].as_u64().unwrap_or(1) as u32;
    let seed = o["seed"].as_u64().unwrap_or(1);
    let default: Setting = serde_json::from_value(o["default"].clone()).unwrap_or_default();
    let mut sampler = sampler_for(config, registry, &run.sampler, seed, repeats)?;
    let mut done = history(registry, &run)?;
    // A stateful sampler (halving) is brought to where it was: it is
    // deterministic, so it proposes what it proposed before.
    for i in 0..done.len() {
        sampler.propose(&space, &done[..i])?;
    }
    let tty = std::io::stderr().is_terminal();
    while (done.len() as u32) < run.trials_wanted {
        // The default is always measured first: the line to beat.
        let proposal = if done.is_empty() {
            Some(kiln_runtime::tune::Proposal {
                setting: default.clone(),
                repeats,
            })
        } else {
            sampler.propose(&space, &done)?
        };
        let Some(p) = proposal else {
            break;
        };
        let setting_json = serde_json::to_value(&p.setting).unwrap_or_default();
        let trial = registry.tune_trial_start(id, &setting_json, p.repeats)?;
        let (ok, metrics) = match measure(config, &objective, &run.model, &p.setting, p.repeats) {
            Ok(m) => (true, m.to_json()),
            Err(e) => (false, json!({"error": e})),
        };
        registry.tune_trial_done(trial, ok, &metrics)?;
        let metric = if ok {
            metric_of(&metrics, o)
        } else {
            f64::INFINITY
        };
        done.push(Observation {
            setting: p.setting.clone(),
            metric,
            repeats: p.repeats,
        });
        let best = done
            .iter()
            .min_by(|a, b| a.metric.total_cmp(&b.metric))
            .expect("one at least");
        let n = done.len();
        let width = 24;
        let filled = n * width / run.trials_wanted.max(1) as usize;
        let line = format!(
            "[{}{}] {n}/{} {}: {} (best {:.1} {unit}: {})",
            "#".repeat(filled.min(width)),
            " ".repeat(width - filled.min(width)),
            run.trials_wanted,
            describe(&p.setting),
            if ok {
                format!("{metric:.1} {unit}")
            } else {
                format!("failed: {}", metrics["error"].as_str().unwrap_or(""))
            },
            best.metric,
            describe(&best.setting)
        );
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
    let verdict = confirm(config, registry, &run, &done, &default, &objective)?;
    registry.tune_finish(id, &verdict)?;
    show(config, id, as_json)
}

/// The best setting against the default, measured side by side
/// (`confirm` pairs, alternating), and the sign test over the pairs.
fn confirm(
    config: &Config,
    registry: &Registry,
    run: &kiln_registry::tune::TuneRun,
    done: &[Observation],
    default: &Setting,
    objective: &Objective,
) -> Result<Value, String> {
    let metric = run.objective["metric"].as_str().unwrap_or("ttft_ms");
    let one = |s: &Setting| -> Result<f64, String> {
        let m = measure(config, objective, &run.model, s, 1)?;
        m.0.get(metric)
            .and_then(|v| v.first().copied())
            .ok_or_else(|| format!("no {metric} measured"))
    };
    let pairs_wanted = run.objective["confirm"].as_u64().unwrap_or(5) as u32;
    // A setting measured more than once (halving's later rungs) counts
    // by its latest, most repeated measurement, not its luckiest.
    let latest: Vec<&Observation> = done
        .iter()
        .enumerate()
        .filter(|(i, o)| !done[i + 1..].iter().any(|later| later.setting == o.setting))
        .map(|(_, o)| o)
        .collect();
    let Some(best) = latest
        .into_iter()
        .filter(|o| o.metric.is_finite())
        .min_by(|a, b| a.metric.total_cmp(&b.metric))
    else {
        return Ok(json!({"better": false, "reason": "no trial succeeded within the memory cap"}));
    };
    let best_trial = registry
        .tune_trials(run.id)
        .map_err(|e| e.to_string())?
        .into_iter()
        .rev()
        .find(|t| {
            serde_json::from_value::<Setting>(t.setting.clone())
                .ok()
                .as_ref()
                == Some(&best.setting)
        })
        .map(|t| t.id);
    if &best.setting == default || pairs_wanted == 0 {
        return Ok(json!({
            "better": false, "best_trial": best_trial, "setting": best.setting,
            "reason": if &best.setting == default { "the default is the best setting found" } else { "not confirmed (--confirm 0)" },
        }));
    }
    eprintln!(
        "kiln: measuring the best setting ({}) against the default ({}), {pairs_wanted} pairs",
        describe(&best.setting),
        describe(default)
    );
    let mut pairs = Vec::new();
    for i in 0..pairs_wanted {
        // Which goes first alternates, so that an order effect (a warmer
        // cache, a drifting clock) falls on both.
        let (d, b) = if i % 2 == 0 {
            let d = one(default)?;
            (d, one(&best.setting)?)
        } else {
            let b = one(&best.setting)?;
            (one(default)?, b)
        };
        pairs.push((b, d));
    }
    let p = sign_test(&pairs);
    let (best_ms, default_ms) = (
        median(&pairs.iter().map(|x| x.0).collect::<Vec<_>>()),
        median(&pairs.iter().map(|x| x.1).collect::<Vec<_>>()),
    );
    let better = p < 0.05 && best_ms < default_ms;
    Ok(json!({
        "better": better, "best_trial": best_trial, "setting": best.setting,
        "metric": metric, "best_ms": best_ms, "default_ms": default_ms,
        "pairs": pairs.iter().map(|(b, d)| json!({"best_ms": b, "default_ms": d})).collect::<Vec<_>>(),
        "p_value": p,
        "reason": if better {
            format!("faster in {} of {} pairs (sign test p = {p:.3})", pairs.iter().filter(|(b, d)| b < d).count(), pairs.len())
        } else {
            format!("not shown faster: sign test p = {p:.3} over {} pairs (needs p < 0.05; 5 pairs at least)", pairs.len())
        },
    }))
}

pub fn show(config: &Config, id: i64, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let run = registry.tune_run(id)?;
    let trials = registry.tune_trials(id)?;
    let metric = run.objective["metric"].as_str().unwrap_or("ttft_ms");
    let points: Vec<(f64, f64)> = trials
        .iter()
        .map(|t| match &t.metrics {
            Some(m) if t.status == "done" => (
                m[format!("median_{metric}")]
                    .as_f64()
                    .unwrap_or(f64::INFINITY),
                m["median_memory_bytes"].as_f64().unwrap_or(f64::INFINITY),
            ),
            _ => (f64::INFINITY, f64::INFINITY),
        })
        .collect();
    let front: Vec<i64> = pareto_front(&points)
        .into_iter()
        .map(|i| trials[i].id)
        .collect();
    if as_json {
        print_json(&json!({
            "schema_version": JSON_SCHEMA_VERSION, "run": run, "trials": trials,
            "pareto_front": front,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "tuning run {} of {} ({} sampler, {}): {} of {} trials",
        run.id,
        run.model,
        run.sampler,
        run.state,
        trials.len(),
        run.trials_wanted
    );
    let value = |t: &kiln_registry::tune::TuneTrial, k: &str| -> String {
        t.metrics
            .as_ref()
            .and_then(|m| m[format!("median_{k}")].as_f64())
            .filter(|v| v.is_finite())
            .map_or("-".into(), |v| format!("{v:.1}"))
    };
    let rows: Vec<Vec<String>> = trials
        .iter()
        .zip(&points)
        .map(|(t, &(_, memory))| {
            let setting: Setting = serde_json::from_value(t.setting.clone()).unwrap_or_default();
            vec![
                t.id.to_string(),
                describe(&setting),
                t.repeats.to_string(),
                if t.status == "done" {
                    value(t, "ttft_ms")
                } else {
                    t.status.clone()
                },
                value(t, "e2e_ms"),
                value(t, "decode_tokens_per_s"),
                if memory.is_finite() {
                    format!("{:.0}", memory / (1 << 20) as f64)
                } else {
                    "-".into()
                },
                if front.contains(&t.id) { "*" } else { "" }.into(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "TRIAL",
                "SETTING",
                "RUNS",
                "TTFT MS",
                "E2E MS",
                "DECODE TOK/S",
                "MEMORY MIB",
                "PARETO",
            ],
            &rows
        )
    );
    if let Some(v) = &run.verdict {
        if let (Some(b), Some(d)) = (v["best_ms"].as_f64(), v["default_ms"].as_f64()) {
            println!(
                "side by side ({metric}, medians of {} pairs): the best setting {b:.1} ms, the default {d:.1} ms",
                v["pairs"].as_array().map_or(0, Vec::len)
            );
        }
        println!(
            "{}: {}{}",
            if v["better"] == true {
                "better than the default"
            } else {
                "no setting shown better than the default"
            },
            v["reason"].as_str().unwrap_or(""),
            match v["best_trial"].as_i64() {
                Some(t) if v["better"] == true => format!("; `kiln tune apply {t}` uses it"),
                _ => String::new(),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(config: &Config, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let runs = registry.tune_runs()?;
    if as_json {
        print_json(&json!({"schema_version": JSON_SCHEMA_VERSION, "runs": runs}));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.model.clone(),
                r.sampler.clone(),
                r.state.clone(),
                r.trials_wanted.to_string(),
                r.created_at.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["RUN", "MODEL", "SAMPLER", "STATE", "TRIALS", "STARTED"],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

pub fn apply(config: &Config, trial_id: i64) -> CliResult {
    let mut registry = open_registry(config)?;
    let trial = registry.tune_trial(trial_id)?;
    if trial.status != "done" {
        return Err(format!(
            "trial {trial_id} did not finish ({}); apply a measured one",
            trial.status
        )
        .into());
    }
    let run = registry.tune_run(trial.run_id)?;
    let s: Setting = serde_json::from_value(trial.setting.clone()).unwrap_or_default();
    let key = kv_key(config, &run.model)?;
    let setting = engine_setting(&s, &key).map_err(|e| format!("trial {trial_id}: {e}"))?;
    let (before, after) = kiln_registry::config::with_engine_setting(config, &setting)?;
    let version = registry.record_config_version(
        &kiln_registry::actor(),
        &format!(
            "kiln tune apply {trial_id} (run {}: {})",
            run.id,
            describe(&s)
        ),
        &before,
        &after,
    )?;
    kiln_registry::config::write_config_text(config, &after)?;
    println!(
        "applied trial {trial_id} ({}) to {} as change {version}; `kiln tune rollback` undoes it",
        describe(&s),
        config.config_file.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn rollback(config: &Config) -> CliResult {
    let mut registry = open_registry(config)?;
    let v = registry
        .last_config_version()?
        .ok_or("kiln has not changed config.toml (or every change is rolled back)")?;
    let now = kiln_registry::config::config_text(config)?;
    if now != v.after {
        return Err(format!(
            "{} changed since kiln wrote change {} ({}); nothing was rolled back: edit it by hand",
            config.config_file.display(),
            v.id,
            v.reason
        )
        .into());
    }
    registry.roll_back_config_version(v.id, &kiln_registry::actor())?;
    kiln_registry::config::write_config_text(config, &v.before)?;
    println!("rolled back change {} ({})", v.id, v.reason);
    Ok(ExitCode::SUCCESS)
}
