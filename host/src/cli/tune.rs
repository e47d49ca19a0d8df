//! `kiln tune`: finds the settings that make a model fastest on this
//! machine. Each trial measures a setting as whole `kiln bench` processes
//! (so that the thread count, which a process fixes at start, can vary):
//! the time to first token of a prompt of `--prompt-tokens` tokens, the
//! decode speed and the peak memory (or, the typing objective, a replayed
//! typing session through the language server). With `--quality REPO`,
//! each setting's completions are also scored on cross-file holes cut
//! from REPO (`kiln ctxbench model`: the true completion's likelihood and
//! the greedy completion's edit similarity), a setting that loses more
//! than the bounds against the default is ruled out, and the knobs that
//! trade quality for speed (the prompt's budgets) join the search. Trials
//! are recorded in the registry
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
#[derive(clap::Args)]
pub struct RunArgs {
    /// A GGUF file or registered model (NAME, NAME@VERSION).
    pub model: String,
    /// typing: a replayed typing session through the language server
    /// (`kiln demo`), its median end-to-end latency minimised; prompt:
    /// one prompt's time to first token (`kiln bench`); quality (with
    /// --quality REPO): the likelihood of the true completions of holes
    /// cut from REPO, maximised over the ranking policy's declared
    /// parameters, and confirmed on held-out holes.
    #[arg(long, default_value = "typing")]
    pub objective: String,
    /// typing: characters typed (a completion request each).
    #[arg(long, default_value_t = 40)]
    pub keystrokes: usize,
    /// typing: tokens per completion.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// typing: keystrokes this many milliseconds apart (500 after a word)
    /// without waiting for completions, the latencies of those at the
    /// ends of words minimised; the server's debounce joins the knobs. 0:
    /// each keystroke waits for its completion.
    #[arg(long, default_value_t = 0)]
    pub typing_ms: u64,
    /// grid, random, halving (successive halving), policy (the active
    /// tuning policy) or policy:NAME|FILE.wasm (the shipped tpe or genetic).
    #[arg(long, default_value = "random")]
    pub sampler: String,
    /// Trials, the default setting first.
    #[arg(long, default_value_t = 12)]
    pub trials: u32,
    /// Measurements per trial (halving doubles them per rung).
    #[arg(long, default_value_t = 1)]
    pub repeats: u32,
    /// prompt: the prompt whose time to first token is minimised.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Settings whose peak memory passes this are ruled out.
    #[arg(long)]
    pub max_memory_mb: Option<u64>,
    /// Pairs of the best and the default measured side by side for the
    /// sign test (at least 5 to be able to pass it; 0: none).
    #[arg(long, default_value_t = 5)]
    pub confirm: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Score each setting's completions on cross-file holes cut from
    /// this repository (`kiln ctxbench model`): a setting that loses
    /// more than the bounds below against the default is ruled out,
    /// and the prompt's budgets (context, prefix, suffix tokens) join
    /// the typing objective's knobs.
    #[arg(long)]
    pub quality: Option<std::path::PathBuf>,
    /// Cross-file holes cut from the --quality repository.
    #[arg(long, default_value_t = 24)]
    pub quality_holes: usize,
    /// Tokens of the --quality repository's files whose likelihood is
    /// scored (0: none).
    #[arg(long, default_value_t = 4096)]
    pub quality_tokens: usize,
    /// Edit similarity (0 to 1, of the greedy completions with the
    /// truth) a setting may lose against the default.
    #[arg(long, default_value_t = 0.02)]
    pub max_similarity_loss: f64,
    /// Nats per token of likelihood a setting may lose against the
    /// default (of the holes' true completions, and of the files' text).
    #[arg(long, default_value_t = 0.02)]
    pub max_nll_rise: f64,
    /// typing, with --quality: the share of completions the token limit
    /// cuts that a setting may add to the default's.
    #[arg(long, default_value_t = 0.05)]
    pub max_truncation_rise: f64,
    /// Only these knobs, comma-separated (the rest stay as kiln has
    /// them): threads, kv_type, attention_block, prompt_batch, draft,
    /// draft_max, debounce_ms, quant, context_tokens, prefix_tokens,
    /// suffix_tokens (default: every knob of the objective).
    #[arg(long, value_delimiter = ',')]
    pub knobs: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

/// The knobs that change which tokens a completion gets (the rest change
/// only its speed), with the ranking policy's parameters (`policy.NAME.
/// PARAM`): a setting's quality is measured once per run for each
/// combination of these.
const QUALITY_KNOBS: [&str; 5] = [
    "kv_type",
    "context_tokens",
    "prefix_tokens",
    "suffix_tokens",
    "quant",
];

/// The prefix of a ranking policy parameter's knob: `policy.NAME.PARAM`.
const POLICY_KNOB: &str = "policy.";

/// Who ranks context as `kiln serve` would now (the active ranking
/// policy, else the built-in ranker, which is `bm25-recency`), with the
/// parameters it declares and their values in force.
struct Ranking {
    ranker: kiln_sandbox::breaker::Ranker,
    policy: String,
    params: Vec<(kiln_sandbox::ParamDecl, f64)>,
}

impl Ranking {
    fn of(config: &Config) -> Ranking {
        let ranker = kiln_serve::start::ranker(config, &mut |m| eprintln!("kiln: {m}"));
        let (policy, params) = ranker.declared();
        Ranking {
            ranker,
            policy,
            params,
        }
    }
}

/// The knob of a ranking policy's parameter: `policy.NAME.PARAM`.
fn policy_knob_name(policy: &str, param: &str) -> String {
    format!("{POLICY_KNOB}{policy}.{param}")
}

/// The policy and parameter a knob names, if it names one.
fn policy_param_of(knob: &str) -> Option<(&str, &str)> {
    knob.strip_prefix(POLICY_KNOB)?.rsplit_once('.')
}

/// Removes a run's quality holes (a run refused before it was recorded).
fn remove_holes(q: &Value) {
    for key in ["holes", "held_out"] {
        if let Some(p) = q[key].as_str() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The knobs among `knobs` (`policy.NAME.PARAM`) whose parameter changes
/// the context kiln packs for some of the run's search holes when set,
/// one at a time, to its smallest or its largest value (the rest of
/// config.toml as it is): what the holes cannot see (the editor's
/// recency, in a repository read from disk) they cannot judge either.
fn exercised_params(
    config: &Config,
    model: &str,
    q: &Value,
    ranking: &Ranking,
    knobs: &[String],
) -> Result<Vec<String>, String> {
    use kiln_sandbox::breaker::{DEFAULT_THRESHOLD, Ranker};
    let repo = std::path::PathBuf::from(q["repo"].as_str().unwrap_or(""));
    let holes =
        super::ctxbench::read_holes(std::path::Path::new(q["holes"].as_str().unwrap_or("")))
            .map_err(|e| e.0)?;
    let count = q["count"].as_u64().unwrap_or(0) as usize;
    let files = kiln_serve::context::read_files(&repo);
    let corpus = kiln_serve::ctxbench::Corpus::new(&repo, &files, &holes)?;
    let (id, path) =
        kiln_runtime::store::resolve_served(config, Some(model)).map_err(|e| e.to_string())?;
    let loaded = kiln_serve::engine::Loaded::load(
        id,
        path,
        None,
        &kiln_runtime::backend::Backend::builtin_cpu(),
        0,
    )?;
    let counter = kiln_serve::prompt::Counter::of(&loaded);
    let budget = budget(config, &Setting::new(), "context_tokens");
    let chosen = |r: &Ranker| corpus.contexts(&holes, count, &counter, r, budget);
    let base = chosen(&ranking.ranker);
    let mut exercised = Vec::new();
    for (d, _) in &ranking.params {
        let knob = policy_knob_name(&ranking.policy, &d.name);
        if !knobs.contains(&knob) {
            continue;
        }
        for v in [d.min, d.max] {
            let mut tables = config.policy_params.clone();
            (tables.entry(ranking.policy.clone()).or_default()).insert(d.name.clone(), v);
            let policy = ranking.ranker.policy().cloned();
            let (r, _) = Ranker::new(policy, DEFAULT_THRESHOLD).with_params(&tables);
            if chosen(&r) != base {
                exercised.push(knob);
                break;
            }
        }
    }
    Ok(exercised)
}

/// The knob of `policy`'s parameter `d`.
fn policy_knob(policy: &str, d: &kiln_sandbox::ParamDecl) -> Value {
    let name = policy_knob_name(policy, &d.name);
    if d.integer {
        json!({"type": "int", "name": name, "lo": d.min as i64, "hi": d.max as i64, "log": d.log})
    } else {
        json!({"type": "float", "name": name, "lo": d.min, "hi": d.max, "log": d.log})
    }
}

/// The types a registered model may be requantized to (`quant`; `as-is`
/// is the model as it is).
const QUANT_TYPES: [&str; 5] = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"];

/// Tokens of each greedy completion on the quality holes (the rest of a
/// line).
const QUALITY_MAX_TOKENS: usize = 24;

/// The knobs searched: threads (1 to the CPUs this process may use), the
/// KV cache type, the attention block of prompt graphs, and for a typing
/// session the speculative decoding of completions and its draft length
/// (greedy: the same tokens either way, so only speed is at stake) and,
/// when quality is measured, the requantized copies of `quant` (more than
/// `as-is`), the completion's length limit and the prompt's budgets (the
/// text before the cursor, after it, and snippets from other files): a
/// smaller prompt, limit or type is faster and may complete worse, so a
/// search without a quality bound would only shrink them.
///
/// The quality objective searches only the ranking policy's declared
/// parameters (`policy`): they change which snippets a prompt holds and
/// nothing of its speed.
fn default_space(
    kind: &str,
    paced: bool,
    quality: bool,
    quant: &[String],
    ranking: &Ranking,
) -> Space {
    if kind == "quality" {
        let knobs: Vec<Value> = (ranking.params.iter())
            .map(|(d, _)| policy_knob(&ranking.policy, d))
            .collect();
        return serde_json::from_value(json!({ "knobs": knobs })).expect("a valid space");
    }
    let typing = kind == "typing";
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as i64;
    let mut knobs = vec![
        json!({"type": "int", "name": "threads", "lo": 1, "hi": cpus.max(1), "log": false}),
        json!({"type": "choice", "name": "kv_type", "options": ["f16", "q8_0", "q4_0"]}),
        json!({"type": "int", "name": "attention_block", "lo": 16, "hi": 256, "log": true}),
        json!({"type": "int", "name": "prompt_batch", "lo": 32, "hi": 1024, "log": true}),
    ];
    if typing {
        knobs.extend([
            json!({"type": "choice", "name": "draft", "options": ["none", "ngram"]}),
            json!({"type": "int", "name": "draft_max", "lo": 2, "hi": 32, "log": true}),
        ]);
    }
    if typing && paced {
        // Only a paced replay sends a keystroke before the last answer.
        knobs.push(json!({"type": "int", "name": "debounce_ms", "lo": 0, "hi": 200, "log": false}));
    }
    if quant.len() > 1 {
        knobs.push(json!({"type": "choice", "name": "quant", "options": quant}));
    }
    if typing && quality {
        knobs.extend([
            json!({"type": "int", "name": "max_tokens", "lo": 8, "hi": 256, "log": true}),
            json!({"type": "int", "name": "context_tokens", "lo": 64, "hi": 4096, "log": true}),
            json!({"type": "int", "name": "prefix_tokens", "lo": 128, "hi": 4096, "log": true}),
            json!({"type": "int", "name": "suffix_tokens", "lo": 16, "hi": 1024, "log": true}),
        ]);
    }
    serde_json::from_value(json!({ "knobs": knobs })).expect("a valid space")
}

/// The model a trial runs: `model`, or (a setting with a `quant`) its
/// copy requantized to that type, made once per run under
/// `$KILN_HOME/tune/run-ID/` (and removed when the run ends).
fn trial_model(config: &Config, run_id: i64, model: &str, s: &Setting) -> Result<String, String> {
    let Some(q) = s
        .get("quant")
        .and_then(Value::as_str)
        .filter(|q| *q != "as-is")
    else {
        return Ok(model.to_string());
    };
    let dir = config.home.join("tune").join(format!("run-{run_id}"));
    let out = dir.join(format!("{}-{q}.gguf", file_safe(model)));
    if !out.is_file() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        requantize(config, model, q, &out)?;
    }
    Ok(out.to_string_lossy().into_owned())
}

/// `model` (a registered model) quantized to `qtype` into `out`
/// (written whole or not at all).
fn requantize(
    config: &Config,
    model: &str,
    qtype: &str,
    out: &std::path::Path,
) -> Result<(), String> {
    use kiln_runtime::quantize::{Options, Target, quantize};
    let target = Target::parse(qtype).ok_or_else(|| format!("unknown quant type {qtype}"))?;
    let source = kiln_runtime::store::resolve(config, model).map_err(|e| e.to_string())?;
    eprintln!("kiln: quantizing {model} to {qtype} for the trials that run it");
    let options = Options {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        allow_requantize: true,
        ..Options::new(target)
    };
    quantize(&source, out, options, |_, _, _| {})
        .map(|_| ())
        .map_err(|e| format!("cannot quantize {model} to {qtype}: {e}"))
}

fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// `s` as a trial of `model` measures it: a requantized copy is a file of
/// its own, so the KV cache type kiln gives `model` is set for it too
/// unless the setting names one.
fn with_model_kv(config: &Config, model: &str, s: &Setting) -> Setting {
    let mut s = s.clone();
    if s.get("quant").is_some_and(|q| q != "as-is") && !s.contains_key("kv_type") {
        let key = kv_key(config, model).unwrap_or_else(|_| model.to_string());
        s.insert(
            "kv_type".into(),
            json!(config.kv_cache.for_model(&key).name()),
        );
    }
    s
}

/// An integer knob's value in `s`.
fn int_of(s: &Setting, key: &str) -> Option<usize> {
    s.get(key).and_then(Value::as_u64).map(|v| v as usize)
}

/// The prompt's budget `key` (`context_tokens`, `prefix_tokens`,
/// `suffix_tokens`) that `kiln serve` would use under `s`: the setting's,
/// else config.toml's `[completion]`, else the built-in default.
fn budget(config: &Config, s: &Setting, key: &str) -> usize {
    let d = kiln_serve::Settings::default();
    let c = &config.completion;
    let (from_config, default) = match key {
        "context_tokens" => (c.context_tokens, d.context_tokens),
        "prefix_tokens" => (c.prefix_tokens, d.prefix_tokens),
        _ => (c.suffix_tokens, d.suffix_tokens),
    };
    s.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .or(from_config)
        .unwrap_or(default)
}

/// The setting kiln would use now for `model`: the environment's or
/// config's threads, config's KV type for it, config's attention block
/// (and for a typing session, config's draft and its length).
fn current_setting(
    config: &Config,
    model: &str,
    typing: bool,
    quality: bool,
    ranking: &Ranking,
) -> Setting {
    let debounce = config.completion.debounce_ms.unwrap_or(0);
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
        (
            "prompt_batch",
            json!(
                config
                    .engine
                    .prompt_batch
                    .unwrap_or(kiln_runtime::model::session::DEFAULT_BATCH)
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if typing {
        s.insert(
            "draft".into(),
            json!(config.completion.draft.as_deref().unwrap_or("none")),
        );
        s.insert("debounce_ms".into(), json!(debounce));
        s.insert(
            "draft_max".into(),
            json!(
                (config.completion.draft_max).unwrap_or(kiln_runtime::model::generate::DRAFT_MAX)
            ),
        );
    }
    if typing && quality {
        for key in ["context_tokens", "prefix_tokens", "suffix_tokens"] {
            let v = budget(config, &Setting::new(), key);
            s.insert(key.into(), json!(v));
        }
        let max_tokens =
            (config.completion.max_tokens).unwrap_or(kiln_serve::Settings::default().max_tokens);
        s.insert("max_tokens".into(), json!(max_tokens));
    }
    s.insert("quant".into(), json!("as-is"));
    // The ranking policy's parameters as kiln ranks with them now.
    for (d, v) in &ranking.params {
        let v = if d.integer {
            json!(*v as i64)
        } else {
            json!(v)
        };
        s.insert(policy_knob_name(&ranking.policy, &d.name), v);
    }
    s
}

/// `s` as a line: `knob=value …`, a ranking parameter by its own name.
fn describe(s: &Setting) -> String {
    s.iter()
        .map(|(k, v)| {
            let k = policy_param_of(k).map_or(k.as_str(), |(_, param)| param);
            format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_string))
        })
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
    typing_ms: u64,
}

impl Objective {
    fn of(o: &Value) -> Objective {
        Objective {
            kind: o["kind"].as_str().unwrap_or("prompt").to_string(),
            prompt_tokens: o["prompt_tokens"].as_u64().unwrap_or(512) as usize,
            keystrokes: o["keystrokes"].as_u64().unwrap_or(40) as usize,
            max_tokens: o["max_tokens"].as_u64().unwrap_or(16) as usize,
            typing_ms: o["typing_ms"].as_u64().unwrap_or(0),
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
    let mut policy_params = kiln_registry::config::PolicyParams::new();
    for (k, v) in s {
        let Some((policy, param)) = policy_param_of(k) else {
            continue;
        };
        let v = v
            .as_f64()
            .ok_or_else(|| format!("{k} = {v}: not a number"))?;
        (policy_params.entry(policy.to_string()).or_default()).insert(param.to_string(), v);
    }
    Ok(EngineSetting {
        policy_params,
        engine: kiln_registry::config::EngineConfig {
            threads: int("threads"),
            attention_block: int("attention_block"),
            prompt_batch: int("prompt_batch"),
            decode_batch: int("decode_batch"),
        },
        kv_type: kv_type.map(|kv| (key, kv)),
        completion: kiln_registry::config::CompletionConfig {
            draft: s.get("draft").and_then(Value::as_str).map(str::to_string),
            draft_max: int("draft_max"),
            debounce_ms: int("debounce_ms"),
            max_tokens: int("max_tokens"),
            prefix_tokens: int("prefix_tokens"),
            suffix_tokens: int("suffix_tokens"),
            context_tokens: int("context_tokens"),
        },
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

/// Runs kiln (its arguments set by `args`) as a trial of `s` on `model`:
/// the user's config with `s` applied (`KILN_CONFIG`), its thread count
/// (`KILN_THREADS`); what it printed as JSON.
fn run_trial(
    config: &Config,
    model: &str,
    s: &Setting,
    args: impl FnOnce(&mut Command),
) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find kiln itself: {e}"))?;
    let trial_config = trial_config(config, model, s)?;
    let mut cmd = Command::new(exe);
    cmd.env("KILN_CONFIG", &trial_config);
    if let Some(t) = s.get("threads").and_then(Value::as_u64) {
        cmd.env("KILN_THREADS", t.to_string());
    }
    args(&mut cmd);
    let out = cmd.output().map_err(|e| format!("cannot run kiln: {e}"));
    let _ = std::fs::remove_file(&trial_config);
    let out = out?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("kiln printed no JSON: {e}"))
}

fn measure_once(
    config: &Config,
    objective: &Objective,
    model: &str,
    s: &Setting,
) -> Result<Vec<(&'static str, f64)>, String> {
    let typing = objective.kind == "typing";
    let r = run_trial(config, model, s, |cmd| {
        if typing {
            cmd.args(["demo", "--model", model, "--json"])
                .args(["--keystrokes", &objective.keystrokes.to_string()])
                .args([
                    "--max-tokens",
                    // A knob's limit, else the objective's.
                    &int_of(s, "max_tokens")
                        .unwrap_or(objective.max_tokens)
                        .to_string(),
                ])
                .args(["--typing-ms", &objective.typing_ms.to_string()]);
        } else {
            cmd.args(["bench", model, "--json", "--decode-tokens", "8"])
                .args(["--prompt-tokens", &objective.prompt_tokens.to_string()]);
        }
    })?;
    let mib = |v: &Value| v.as_f64().map(|m| m * (1 << 20) as f64);
    if typing {
        let r = &r["report"];
        // All the server holds: its anonymous and file-backed memory and
        // the weights it copied to repack them (which the demo reports
        // apart from its anonymous memory).
        let memory = mib(&r["server_anonymous_memory_mib"])
            .zip(mib(&r["server_file_backed_memory_mib"]))
            .map_or(f64::NAN, |(a, f)| {
                a + f + mib(&r["server_copied_weights_mib"]).unwrap_or(0.0)
            });
        match (r["ttft_ms_p50"].as_f64(), r["e2e_ms_p50"].as_f64()) {
            (Some(t), Some(e)) => Ok(vec![
                ("ttft_ms", t),
                ("e2e_ms", e),
                ("memory_bytes", memory),
                (
                    "truncated_share",
                    r["truncated_share"].as_f64().unwrap_or(f64::NAN),
                ),
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
    if objective.kind == "quality" {
        // Nothing is timed: the quality holes are the whole measurement.
        return Ok(m);
    }
    for _ in 0..repeats.max(1) {
        for (k, v) in measure_once(config, objective, model, s)? {
            m.0.entry(k.to_string()).or_default().push(v);
        }
    }
    Ok(m)
}

/// The model a run tunes: the registered version it started with
/// (`NAME@VERSION`, so that a version `kiln tune apply` adds later is not
/// requantized again), else what it was given.
fn source_of(run: &kiln_registry::tune::TuneRun) -> &str {
    run.objective["source"].as_str().unwrap_or(&run.model)
}

/// `s` measured as a trial of `run` (its model, or the requantized copy
/// the setting names).
fn measure_trial(
    config: &Config,
    objective: &Objective,
    run: &kiln_registry::tune::TuneRun,
    s: &Setting,
    repeats: u32,
) -> Result<Measured, String> {
    let source = source_of(run);
    let model = trial_model(config, run.id, source, s)?;
    measure(
        config,
        objective,
        &model,
        &with_model_kv(config, source, s),
        repeats,
    )
}

/// [`measure_quality`] of `s` as a trial of `run`.
fn quality_trial(
    config: &Config,
    q: &Quality,
    run: &kiln_registry::tune::TuneRun,
    s: &Setting,
) -> Result<Vec<(&'static str, f64)>, String> {
    let source = source_of(run);
    let model = trial_model(config, run.id, source, s)?;
    measure_quality(config, q, &model, &with_model_kv(config, source, s))
}

/// How a run scores quality (`--quality REPO`): the holes cut from the
/// repository when the run started, and how much a setting may lose
/// against the default.
struct Quality {
    repo: std::path::PathBuf,
    holes: std::path::PathBuf,
    count: usize,
    /// Tokens of the repository's text scored (0: none).
    text_tokens: usize,
    max_similarity_loss: f64,
    max_nll_rise: f64,
    /// The share of completions cut by the token limit a setting may add.
    max_truncation_rise: f64,
    /// The quality objective's held-out holes and their count: where the
    /// best setting is judged against the default.
    held_out: Option<(std::path::PathBuf, usize)>,
    /// The likelihood is what the run minimises (the quality objective),
    /// not a bound: only edit similarity bounds it.
    nll_is_metric: bool,
}

impl Quality {
    fn of(o: &Value) -> Option<Quality> {
        let q = o.get("quality").filter(|q| q.is_object())?;
        Some(Quality {
            repo: q["repo"].as_str()?.into(),
            holes: q["holes"].as_str()?.into(),
            count: q["count"].as_u64()? as usize,
            text_tokens: q["text_tokens"].as_u64().unwrap_or(0) as usize,
            max_similarity_loss: q["max_similarity_loss"].as_f64()?,
            max_nll_rise: q["max_nll_rise"].as_f64()?,
            max_truncation_rise: q["max_truncation_rise"].as_f64().unwrap_or(f64::INFINITY),
            held_out: q["held_out"]
                .as_str()
                .map(|h| (h.into(), q["held_out_count"].as_u64().unwrap_or(0) as usize)),
            nll_is_metric: o["kind"] == "quality",
        })
    }

    /// Whether `metrics` keeps to the bounds against `baseline`'s (the
    /// default's); `None` when either has no quality measured.
    fn keeps_to(&self, metrics: &Value, baseline: &Value) -> Option<bool> {
        let get = |m: &Value, k: &str| m[format!("median_quality_{k}")].as_f64();
        let (sim, nll) = (
            get(metrics, "edit_similarity")?,
            get(metrics, "nll_per_token")?,
        );
        let (base_sim, base_nll) = (
            get(baseline, "edit_similarity")?,
            get(baseline, "nll_per_token")?,
        );
        // The repository's own text, where it was scored.
        let text_ok = match (
            get(metrics, "text_nll_per_token"),
            get(baseline, "text_nll_per_token"),
        ) {
            (Some(t), Some(base)) => t <= base + self.max_nll_rise + 1e-9,
            (None, None) => true,
            _ => return None,
        };
        // Completions the token limit cuts (a typing session's).
        let cut_ok = match (
            metrics["median_truncated_share"].as_f64(),
            baseline["median_truncated_share"].as_f64(),
        ) {
            (Some(c), Some(base)) => c <= base + self.max_truncation_rise + 1e-9,
            _ => true,
        };
        // A margin for float rounding: equal completions are never out.
        Some(
            sim >= base_sim - self.max_similarity_loss - 1e-9
                && (self.nll_is_metric || nll <= base_nll + self.max_nll_rise + 1e-9)
                && text_ok
                && cut_ok,
        )
    }
}

/// `s`'s completions scored on the run's quality holes, in one `kiln
/// ctxbench model` process under the trial's config (its KV cache type)
/// with the prompt's budgets `kiln serve` would use: the true
/// completions' likelihood (nats per token), the greedy completions'
/// edit similarity and exact match.
fn measure_quality(
    config: &Config,
    q: &Quality,
    model: &str,
    s: &Setting,
) -> Result<Vec<(&'static str, f64)>, String> {
    let r = score_holes(config, q, model, s, &q.holes, q.count, q.text_tokens)?;
    let score = &r["scores"][0];
    match (
        score["nll_per_token"].as_f64(),
        score["edit_similarity"]["mean"].as_f64(),
        score["exact_match"]["mean"].as_f64(),
        score["holes"].as_u64(),
    ) {
        (Some(nll), Some(sim), Some(exact), Some(n)) if n > 0 => {
            let mut scores = vec![
                ("quality_nll_per_token", nll),
                ("quality_edit_similarity", sim),
                ("quality_exact_match", exact),
                ("quality_holes", n as f64),
            ];
            if let Some(t) = r["text_nll"]["nll_per_token"].as_f64() {
                scores.push(("quality_text_nll_per_token", t));
            }
            Ok(scores)
        }
        _ => Err(format!(
            "no quality holes scored in {} (kiln ctxbench model reported {score})",
            q.repo.display()
        )),
    }
}

/// `kiln ctxbench model`'s report of `s`'s completions of the first
/// `count` holes of `holes` (kiln's own context selection), in one
/// process under the trial's config.
fn score_holes(
    config: &Config,
    q: &Quality,
    model: &str,
    s: &Setting,
    holes: &std::path::Path,
    count: usize,
    text_tokens: usize,
) -> Result<Value, String> {
    run_trial(config, model, s, |cmd| {
        cmd.args(["ctxbench", "model"])
            .arg(&q.repo)
            .arg("--holes")
            .arg(holes)
            .args(["--model", model, "--selectors", "kiln", "--json"])
            .args(["--count", &count.to_string()])
            .args(["--nll-tokens", &text_tokens.to_string()])
            .args(["--max-tokens", &QUALITY_MAX_TOKENS.to_string()]);
        for (flag, key) in [
            ("--budget", "context_tokens"),
            ("--prefix-tokens", "prefix_tokens"),
            ("--suffix-tokens", "suffix_tokens"),
        ] {
            let v = budget(config, s, key).max(usize::from(key != "suffix_tokens"));
            cmd.args([flag, &v.to_string()]);
        }
    })
    .map_err(|e| format!("scoring quality: {e}"))
}

/// The quality keys of `s`: the knobs that change which tokens come.
fn quality_inputs(s: &Setting) -> Setting {
    s.iter()
        .filter(|(k, _)| QUALITY_KNOBS.contains(&k.as_str()) || policy_param_of(k).is_some())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A quality an earlier trial of the run measured for `s`'s quality
/// inputs: (its trial, the metrics).
fn known_quality(
    trials: &[kiln_registry::tune::TuneTrial],
    s: &Setting,
) -> Option<(i64, Vec<(String, f64)>)> {
    let inputs = quality_inputs(s);
    trials.iter().find_map(|t| {
        let m = t.metrics.as_ref()?;
        let setting: Setting = serde_json::from_value(t.setting.clone()).ok()?;
        if t.status != "done" || quality_inputs(&setting) != inputs {
            return None;
        }
        let known: Vec<(String, f64)> = m
            .as_object()?
            .iter()
            .filter(|(k, _)| k.starts_with("quality_"))
            .filter_map(|(k, v)| Some((k.clone(), v.as_array()?.first()?.as_f64()?)))
            .collect();
        let from = m["quality_from_trial"].as_i64().unwrap_or(t.id);
        (!known.is_empty()).then_some((from, known))
    })
}

/// The default's metrics in a run (its first trial measured the
/// default), the baseline a quality bound is held against.
fn baseline(
    run: &kiln_registry::tune::TuneRun,
    trials: &[kiln_registry::tune::TuneTrial],
) -> Option<Value> {
    let default: Setting = serde_json::from_value(run.objective["default"].clone()).ok()?;
    trials
        .iter()
        .find(|t| {
            t.status == "done"
                && serde_json::from_value::<Setting>(t.setting.clone())
                    .ok()
                    .as_ref()
                    == Some(&default)
        })
        .and_then(|t| t.metrics.clone())
}

/// What is minimised: the median of the objective's metric, infinite for
/// a failed trial, one over the memory cap, or (quality measured) one
/// that loses more quality against the `baseline` than the run allows.
fn metric_of(metrics: &Value, objective: &Value, baseline: Option<&Value>) -> f64 {
    if let Some(q) = Quality::of(objective)
        && baseline.and_then(|b| q.keeps_to(metrics, b)) != Some(true)
    {
        return f64::INFINITY;
    }
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
    let trials = registry.tune_trials(run.id).map_err(|e| e.to_string())?;
    let base = baseline(run, &trials);
    Ok(trials
        .iter()
        .filter(|t| t.status != "running")
        .map(|t| Observation {
            setting: serde_json::from_value(t.setting.clone()).unwrap_or_default(),
            metric: t.metrics.as_ref().map_or(f64::INFINITY, |m| {
                metric_of(m, &run.objective, base.as_ref())
            }),
            repeats: t.repeats,
        })
        .collect())
}

pub fn run(config: &Config, args: &RunArgs) -> CliResult {
    let mut registry = open_registry(config)?;
    // Resolved now, so that a bad name fails before any trial.
    kiln_runtime::store::resolve(config, &args.model)?;
    let typing = args.objective == "typing";
    let quality = args.quality.is_some();
    if !["typing", "prompt", "quality"].contains(&args.objective.as_str()) {
        return Err(format!(
            "unknown objective {}: give typing (a replayed typing session's latency), prompt \
             (one prompt's time to first token) or quality (the likelihood of held-out \
             completions, with --quality REPO)",
            args.objective
        )
        .into());
    }
    let quality_only = args.objective == "quality";
    if quality_only && !quality {
        return Err(
            "the quality objective scores completions on holes cut from a repository: \
                    give --quality REPO (your own code)"
                .into(),
        );
    }
    let ranking = Ranking::of(config);
    if quality_only && ranking.params.is_empty() {
        return Err(format!(
            "the ranking policy {} declares no parameters (policy ABI 1.4 `params`): the \
             quality objective has nothing to search; activate one that does (the shipped \
             bm25-recency, or no ranking policy: kiln's built-in ranker is bm25-recency)",
            ranking.policy
        )
        .into());
    }
    // Requantized copies trade quality for speed and memory: searched
    // with a quality set, for a registered model (whose new version `kiln
    // tune apply` adds to the store).
    let mut quant = vec!["as-is".to_string()];
    let mut source = None;
    if quality && !quality_only {
        match registry.model(&args.model)? {
            _ if std::path::Path::new(&args.model).is_file() => eprintln!(
                "kiln: {} is a file: requantized copies are searched for a registered model \
                 (`kiln models add FILE`, then tune it by name)",
                args.model
            ),
            Some(m) if m.encrypted => eprintln!(
                "kiln: {} is stored encrypted: requantized copies are not searched",
                m.label()
            ),
            Some(m) => {
                quant.extend(
                    (QUANT_TYPES.iter())
                        .filter(|t| **t != m.quant_type)
                        .map(|t| t.to_string()),
                );
                source = Some(m.label());
            }
            None => {}
        }
    }
    let mut space = default_space(
        &args.objective,
        args.typing_ms > 0,
        quality,
        &quant,
        &ranking,
    );
    if !args.knobs.is_empty() {
        let names: Vec<&str> = space.knobs.iter().map(|k| k.name()).collect();
        if let Some(unknown) = args.knobs.iter().find(|k| !names.contains(&k.as_str())) {
            return Err(format!(
                "--knobs {unknown}: not a knob of this search; give some of {}{}",
                names.join(", "),
                match (quality, quality_only) {
                    (_, true) => "",
                    (true, false) =>
                        " (the ranking policy's parameters are the quality objective's knobs)",
                    (false, _) => " (the prompt's budgets and quant need --quality REPO)",
                }
            )
            .into());
        }
        space
            .knobs
            .retain(|k| args.knobs.iter().any(|n| n == k.name()));
    }
    let mut default = current_setting(config, &args.model, typing, quality, &ranking);
    default.retain(|k, _| space.knobs.iter().any(|knob| knob.name() == k));
    let mut objective = match args.objective.as_str() {
        "typing" => json!({
            "kind": "typing", "metric": "e2e_ms", "keystrokes": args.keystrokes,
            "max_tokens": args.max_tokens, "typing_ms": args.typing_ms,
        }),
        "prompt" => json!({
            "kind": "prompt", "metric": "ttft_ms", "prompt_tokens": args.prompt_tokens,
            "decode_tokens": 8,
        }),
        _ => {
            json!({"kind": "quality", "metric": "quality_nll_per_token", "policy": ranking.policy})
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
        ("default", json!(default)),
    ] {
        objective[k] = v;
    }
    if let Some(repo) = &args.quality {
        objective["quality"] = quality_holes(config, repo, args)?;
    }
    if quality_only {
        // Only what the holes can judge is searched.
        let q = &objective["quality"];
        let names: Vec<String> = space.knobs.iter().map(|k| k.name().to_string()).collect();
        let exercised = exercised_params(config, &args.model, q, &ranking, &names)
            .inspect_err(|_| remove_holes(q))?;
        let unseen: Vec<&str> = (names.iter())
            .filter(|n| !exercised.contains(n))
            .map(|n| n.rsplit('.').next().unwrap_or(n))
            .collect();
        if exercised.is_empty() {
            remove_holes(q);
            return Err(format!(
                "no parameter of {} changes the context of any hole cut from {} (at its \
                 smallest or largest value): there is nothing the quality set can judge; \
                 cut more holes (--quality-holes) or name another repository",
                ranking.policy,
                args.quality
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            )
            .into());
        }
        if !unseen.is_empty() {
            eprintln!(
                "kiln: {} of {} never change a hole's context (the holes carry nothing they \
                 weigh, such as the editor's recency): not searched, they stay as they are",
                unseen.join(", "),
                ranking.policy
            );
        }
        space
            .knobs
            .retain(|k| exercised.iter().any(|e| e == k.name()));
        let mut d = default.clone();
        d.retain(|k, _| exercised.contains(k));
        objective["default"] = json!(d);
        objective["unsearched"] = json!(unseen);
    }
    if let Some(label) = source {
        objective["source"] = json!(label);
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

/// Cuts the quality holes of a run from `repo` into `$KILN_HOME/tune/`,
/// where they stay with the run (a resumed run scores the same holes):
/// the objective's `quality`.
fn quality_holes(config: &Config, repo: &std::path::Path, args: &RunArgs) -> Result<Value, String> {
    if !(0.0..=1.0).contains(&args.max_similarity_loss)
        || !(0.0..=1.0).contains(&args.max_truncation_rise)
        || !(0.0..=f64::MAX).contains(&args.max_nll_rise)
    {
        return Err(
            "--max-similarity-loss and --max-truncation-rise take 0 to 1, and --max-nll-rise \
             a number of nats at least 0"
                .into(),
        );
    }
    if args.quality_holes == 0 {
        return Err("--quality-holes takes a positive number".into());
    }
    let repo = repo.canonicalize().map_err(|e| {
        format!(
            "--quality {}: {e}; name a repository's directory",
            repo.display()
        )
    })?;
    let dir = config.home.join("tune");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let holes = dir.join(format!("holes-{stamp}-{}.jsonl", std::process::id()));
    // The quality objective fits the ranking to its holes; the best fit is
    // then judged on as many others it never saw.
    let held_out = args.objective == "quality";
    let wanted = args.quality_holes * if held_out { 2 } else { 1 };
    let cut = super::ctxbench::cut_to(&repo, &holes, wanted, args.seed).map_err(|e| e.0)?;
    let cross: Vec<&kiln_serve::ctxbench::Hole> =
        cut.iter().filter(|h| h.kind == "cross_file").collect();
    let too_few = if held_out { 2 } else { 1 };
    if cross.len() < too_few {
        let _ = std::fs::remove_file(&holes);
        return Err(format!(
            "--quality {}: {} cross-file holes (a line using a name that only another file \
             defines) in its source files; name a repository whose files use each other's \
             definitions",
            repo.display(),
            if cross.is_empty() {
                "no".to_string()
            } else {
                format!("only {}", cross.len())
            }
        ));
    }
    let mut q = json!({
        "repo": repo, "holes": holes, "count": cross.len(),
        "text_tokens": if held_out { 0 } else { args.quality_tokens },
        "max_similarity_loss": args.max_similarity_loss, "max_nll_rise": args.max_nll_rise,
        "max_truncation_rise": args.max_truncation_rise,
    });
    if held_out {
        // Alternate holes to each side, so both draw from every file.
        let write = |path: &std::path::Path, side: usize| -> Result<usize, String> {
            let mut text = String::new();
            let mut n = 0;
            for h in cross.iter().skip(side).step_by(2) {
                text.push_str(&serde_json::to_string(h).map_err(|e| e.to_string())?);
                text.push('\n');
                n += 1;
            }
            std::fs::write(path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(n)
        };
        let out = holes.with_extension("held-out.jsonl");
        q["count"] = json!(write(&holes, 0)?);
        q["held_out"] = json!(out);
        q["held_out_count"] = json!(write(&out, 1)?);
    }
    Ok(q)
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
    let (unit, digits) = match o["metric"].as_str() {
        Some("e2e_ms") => ("ms end to end", 1),
        Some("quality_nll_per_token") => ("nats/token on the holes", 3),
        _ => ("ms to the first token", 1),
    };
    let repeats = o["repeats"].as_u64().unwrap_or(1) as u32;
    let seed = o["seed"].as_u64().unwrap_or(1);
    let default: Setting = serde_json::from_value(o["default"].clone()).unwrap_or_default();
    let quality = Quality::of(o);
    let mut sampler = sampler_for(config, registry, &run.sampler, seed, repeats)?;
    let mut done = history(registry, &run)?;
    // A stateful sampler (halving) is brought to where it was: it is
    // deterministic, so it proposes what it proposed before.
    for i in 0..done.len() {
        sampler.propose(&space, &done[..i])?;
    }
    let tty = std::io::stderr().is_terminal();
    let quality_only = o["kind"] == "quality";
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
        let measured =
            measure_trial(config, &objective, &run, &p.setting, p.repeats).and_then(|mut m| {
                let Some(q) = &quality else {
                    return Ok(m.to_json());
                };
                let trials = registry.tune_trials(id).map_err(|e| e.to_string())?;
                let (from, scores) = match known_quality(&trials, &p.setting) {
                    Some((trial, known)) => (Some(trial), known),
                    None => (
                        None,
                        (quality_trial(config, q, &run, &p.setting)?.into_iter())
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    ),
                };
                for (k, v) in scores {
                    m.0.insert(k, vec![v]);
                }
                let mut j = m.to_json();
                if let Some(t) = from {
                    j["quality_from_trial"] = json!(t);
                }
                Ok(j)
            });
        let (ok, metrics) = match measured {
            Ok(m) => (true, m),
            Err(e) => (false, json!({"error": e})),
        };
        registry.tune_trial_done(trial, ok, &metrics)?;
        let base = baseline(&run, &registry.tune_trials(id)?);
        let metric = if ok {
            metric_of(&metrics, o, base.as_ref())
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
            "[{}{}] {n}/{} {}: {} (best {:.digits$} {unit}: {})",
            "#".repeat(filled.min(width)),
            " ".repeat(width - filled.min(width)),
            run.trials_wanted,
            describe(&p.setting),
            match (ok, quality_text(&metrics)) {
                (false, _) => format!("failed: {}", metrics["error"].as_str().unwrap_or("")),
                (true, None) => format!("{metric:.digits$} {unit}"),
                (true, Some(q)) if quality_only && metric.is_finite() => q,
                (true, Some(q)) if metric.is_finite() => format!("{metric:.digits$} {unit}, {q}"),
                (true, Some(q)) if quality_only =>
                    format!("{q}: ruled out (loses more edit similarity than the bounds allow)"),
                (true, Some(q)) => format!(
                    "{:.1} {unit}, {q}: ruled out ({})",
                    metrics[format!("median_{}", o["metric"].as_str().unwrap_or("ttft_ms"))]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    match (&quality, &base) {
                        (Some(q), Some(b)) if q.keeps_to(&metrics, b) == Some(false) =>
                            "loses more quality than the bounds allow",
                        _ => "over the memory cap",
                    }
                ),
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
    let mut verdict = confirm(config, registry, &run, &done, &default, &objective)?;
    if let Some(q) = &quality {
        // The quality the best setting keeps against the default's.
        let trials = registry.tune_trials(id)?;
        let scores = |m: &Value| {
            json!({
                "edit_similarity": m["median_quality_edit_similarity"],
                "exact_match": m["median_quality_exact_match"],
                "nll_per_token": m["median_quality_nll_per_token"],
                "text_nll_per_token": m["median_quality_text_nll_per_token"],
            })
        };
        let best = (verdict["best_trial"].as_i64())
            .and_then(|b| trials.iter().find(|t| t.id == b))
            .and_then(|t| t.metrics.as_ref());
        verdict["quality"] = json!({
            "repo": q.repo, "holes": o["quality"]["count"],
            "max_similarity_loss": q.max_similarity_loss, "max_nll_rise": q.max_nll_rise,
            "default": baseline(&run, &trials).as_ref().map(scores),
            "best": best.map(scores),
        });
    }
    registry.tune_finish(id, &verdict)?;
    // The requantized copies: `kiln tune apply` makes the one it adds again.
    let copies = config.home.join("tune").join(format!("run-{id}"));
    if copies.exists()
        && let Err(e) = std::fs::remove_dir_all(&copies)
    {
        eprintln!("kiln: warning: cannot remove {}: {e}", copies.display());
    }
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
        let m = measure_trial(config, objective, run, s, 1)?;
        m.0.get(metric)
            .and_then(|v| v.first().copied())
            .ok_or_else(|| format!("no {metric} measured"))
    };
    let pairs_wanted = run.objective["confirm"].as_u64().unwrap_or(5) as u32;
    let quality_only = run.objective["kind"] == "quality";
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
        return Ok(
            json!({"better": false, "reason": if run.objective["quality"].is_object() {
                "no trial succeeded within the memory cap and the quality bounds"
            } else {
                "no trial succeeded within the memory cap"
            }}),
        );
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
    if &best.setting == default || (pairs_wanted == 0 && !quality_only) {
        return Ok(json!({
            "better": false, "best_trial": best_trial, "setting": best.setting,
            "reason": if &best.setting == default { "the default is the best setting found" } else { "not confirmed (--confirm 0)" },
        }));
    }
    if quality_only {
        let mut v = confirm_quality(config, run, &best.setting, default)?;
        v["best_trial"] = json!(best_trial);
        return Ok(v);
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

/// The quality objective's verdict: the best setting and the default
/// complete the held-out holes (which the search never saw), and a
/// paired sign test over the holes' likelihoods says whether the best is
/// better there too.
fn confirm_quality(
    config: &Config,
    run: &kiln_registry::tune::TuneRun,
    best: &Setting,
    default: &Setting,
) -> Result<Value, String> {
    let q = Quality::of(&run.objective).ok_or("the run has no quality holes")?;
    let (held_out, count) = q.held_out.clone().ok_or("the run has no held-out holes")?;
    eprintln!(
        "kiln: scoring the best setting ({}) against the default on {count} held-out holes",
        describe(best)
    );
    let model = source_of(run);
    let score = |s: &Setting| -> Result<(Vec<f64>, f64, f64), String> {
        let r = score_holes(config, &q, model, s, &held_out, count, 0)?;
        let sc = &r["scores"][0];
        let holes: Vec<f64> = (sc["hole_nll"].as_array())
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        match (
            sc["nll_per_token"].as_f64(),
            sc["edit_similarity"]["mean"].as_f64(),
        ) {
            (Some(n), Some(e)) if !holes.is_empty() => Ok((holes, n, e)),
            _ => Err(format!(
                "no held-out holes scored (kiln ctxbench model reported {sc})"
            )),
        }
    };
    let (b, d) = (score(best)?, score(default)?);
    let pairs: Vec<(f64, f64)> = b.0.iter().copied().zip(d.0.iter().copied()).collect();
    let p = sign_test(&pairs);
    let wins = pairs.iter().filter(|(b, d)| b < d).count();
    let losses = pairs.iter().filter(|(b, d)| b > d).count();
    let similarity_kept = b.2 >= d.2 - q.max_similarity_loss - 1e-9;
    let better = p < 0.05 && b.1 < d.1 && similarity_kept;
    Ok(json!({
        "better": better, "setting": best, "metric": "held_out_nll_per_token",
        "held_out_holes": pairs.len(),
        "best_nll_per_token": b.1, "default_nll_per_token": d.1,
        "best_edit_similarity": b.2, "default_edit_similarity": d.2,
        "wins": wins, "losses": losses, "ties": pairs.len() - wins - losses, "p_value": p,
        "reason": if better {
            format!("likelier on {wins} of {} held-out holes, {losses} less likely (sign test p = {p:.3})", pairs.len())
        } else {
            let mut why = Vec::new();
            if p >= 0.05 || b.1 >= d.1 {
                why.push(format!("likelier on {wins}, less likely on {losses} of {} held-out holes (sign test p = {p:.3}; needs p < 0.05)", pairs.len()));
            }
            if !similarity_kept {
                why.push(format!("its held-out edit similarity {:.3} loses more than {} against the default's {:.3}", b.2, q.max_similarity_loss, d.2));
            }
            format!("not shown better: {}", why.join("; and "))
        },
    }))
}

/// A trial's quality as the progress line shows it.
fn quality_text(metrics: &Value) -> Option<String> {
    let sim = metrics["median_quality_edit_similarity"].as_f64()?;
    let nll = metrics["median_quality_nll_per_token"].as_f64()?;
    Some(
        match metrics["median_quality_text_nll_per_token"].as_f64() {
            Some(t) => format!(
                "edit similarity {sim:.3}, {nll:.3} nats/token on the holes, {t:.3} on the files"
            ),
            None => format!("edit similarity {sim:.3}, {nll:.3} nats/token"),
        },
    )
}

pub fn show(config: &Config, id: i64, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let run = registry.tune_run(id)?;
    let trials = registry.tune_trials(id)?;
    let metric = run.objective["metric"].as_str().unwrap_or("ttft_ms");
    let quality = Quality::of(&run.objective);
    let text = quality.as_ref().is_some_and(|q| q.text_tokens > 0);
    let quality = quality.is_some();
    // The quality objective times nothing: its columns are quality's.
    let timed = run.objective["kind"] != "quality";
    // The front: speed and memory, and with quality measured, the
    // likelihood and edit similarity lost (all minimised).
    let points: Vec<Vec<f64>> = trials
        .iter()
        .map(|t| {
            let m = t.metrics.as_ref().filter(|_| t.status == "done");
            let get = |k: &str| {
                m.and_then(|m| m[format!("median_{k}")].as_f64())
                    .unwrap_or(f64::NAN)
            };
            let mut p = if timed {
                vec![get(metric), get("memory_bytes")]
            } else {
                vec![]
            };
            if quality {
                p.extend([
                    get("quality_nll_per_token"),
                    -get("quality_edit_similarity"),
                ]);
            }
            if text {
                p.push(get("quality_text_nll_per_token"));
            }
            p
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
    // Why a measured trial cannot be picked, if it cannot.
    let base = baseline(&run, &trials);
    let ruled_out = |t: &kiln_registry::tune::TuneTrial| -> &'static str {
        let Some(m) = t.metrics.as_ref().filter(|_| t.status == "done") else {
            return "";
        };
        if metric_of(m, &run.objective, base.as_ref()).is_finite() {
            ""
        } else if (run.objective["max_memory_bytes"].as_f64())
            .zip(m["median_memory_bytes"].as_f64())
            .is_some_and(|(cap, used)| used > cap)
        {
            "memory"
        } else {
            "quality"
        }
    };
    let value = |t: &kiln_registry::tune::TuneTrial, k: &str| -> String {
        t.metrics
            .as_ref()
            .and_then(|m| m[format!("median_{k}")].as_f64())
            .filter(|v| v.is_finite())
            .map_or("-".into(), |v| format!("{v:.1}"))
    };
    let rows: Vec<Vec<String>> = trials
        .iter()
        .map(|t| {
            let memory = (t.metrics.as_ref())
                .and_then(|m| m["median_memory_bytes"].as_f64())
                .unwrap_or(f64::NAN);
            let setting: Setting = serde_json::from_value(t.setting.clone()).unwrap_or_default();
            let mut row = vec![
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
                ruled_out(t).into(),
            ];
            if quality {
                let q = |k: &str| {
                    (t.metrics.as_ref())
                        .and_then(|m| m[format!("median_quality_{k}")].as_f64())
                        .map_or("-".into(), |v| format!("{v:.3}"))
                };
                if text {
                    row.insert(7, q("text_nll_per_token"));
                }
                row.insert(7, q("nll_per_token"));
                row.insert(7, q("edit_similarity"));
            }
            if !timed {
                // TTFT, E2E, decode speed and memory: nothing measured.
                row.drain(3..7);
                if t.status != "done" {
                    row[3] = t.status.clone();
                }
            }
            row
        })
        .collect();
    let mut header = vec![
        "TRIAL",
        "SETTING",
        "RUNS",
        "TTFT MS",
        "E2E MS",
        "DECODE TOK/S",
        "MEMORY MIB",
        "PARETO",
        "RULED OUT",
    ];
    if quality {
        if text {
            header.insert(7, "FILES NLL/TOKEN");
        }
        header.insert(7, "NLL/TOKEN");
        header.insert(7, "EDIT SIM");
    }
    if !timed {
        header.drain(3..7);
    }
    println!("{}", table(&header, &rows));
    if let Some(v) = &run.verdict {
        let q = &v["quality"];
        if let (Some(ds), Some(dn)) = (
            q["default"]["edit_similarity"].as_f64(),
            q["default"]["nll_per_token"].as_f64(),
        ) {
            println!(
                "quality on {} cross-file holes of {}: the default's edit similarity {ds:.3}, {dn:.3} nats/token{}; a setting may lose {} of edit similarity and {} nats/token",
                q["holes"],
                q["repo"].as_str().unwrap_or(""),
                match (
                    q["best"]["edit_similarity"].as_f64(),
                    q["best"]["nll_per_token"].as_f64()
                ) {
                    (Some(bs), Some(bn)) =>
                        format!("; the best setting's {bs:.3}, {bn:.3} nats/token"),
                    _ => String::new(),
                },
                q["max_similarity_loss"],
                q["max_nll_rise"],
            );
        }
        if let Some(dt) = q["default"]["text_nll_per_token"].as_f64() {
            println!(
                "the repository's files: the default {dt:.3} nats/token{}",
                q["best"]["text_nll_per_token"]
                    .as_f64()
                    .map_or(String::new(), |b| format!(", the best setting {b:.3}"))
            );
        }
        if let (Some(b), Some(d)) = (
            v["best_nll_per_token"].as_f64(),
            v["default_nll_per_token"].as_f64(),
        ) {
            println!(
                "on {} held-out holes: the best setting {b:.3} nats/token (edit similarity {:.3}), the default {d:.3} ({:.3}); likelier on {}, less likely on {}, tied on {}",
                v["held_out_holes"],
                v["best_edit_similarity"].as_f64().unwrap_or(f64::NAN),
                v["default_edit_similarity"].as_f64().unwrap_or(f64::NAN),
                v["wins"],
                v["losses"],
                v["ties"]
            );
        }
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
    let source = source_of(&run);
    let s: Setting = serde_json::from_value(trial.setting.clone()).unwrap_or_default();
    let s = with_model_kv(config, source, &s);
    // What would be written is checked before a model version is added.
    kiln_registry::config::with_engine_setting(config, &engine_setting(&s, source)?)?;
    let key = match s
        .get("quant")
        .and_then(Value::as_str)
        .filter(|q| *q != "as-is")
    {
        None => kv_key(config, source)?,
        Some(q) => {
            // The requantized copy, made again from the run's source (the
            // quantizer writes the same bytes), as a new version of it.
            let record = registry.model(source)?.ok_or_else(|| {
                format!("{source} is no longer registered; cannot add its {q} copy")
            })?;
            let dir = config.home.join("tune");
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let tmp = dir.join(format!("apply-{trial_id}-{}.gguf", std::process::id()));
            let added = requantize(config, source, q, &tmp).and_then(|()| {
                kiln_runtime::store::add(
                    config,
                    &mut registry,
                    &tmp,
                    Some(&record.name),
                    &kiln_registry::actor(),
                    |_, _| {},
                )
                .map_err(|e| e.to_string())
            });
            let _ = std::fs::remove_file(&tmp);
            let (added, _) = added?;
            println!(
                "added {} ({q}, requantized from {source}) and made it active; `kiln models rollback {}` returns to {source}",
                added.label(),
                record.name
            );
            added.label()
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(id: i64, setting: Value, metrics: Value) -> kiln_registry::tune::TuneTrial {
        kiln_registry::tune::TuneTrial {
            id,
            run_id: 1,
            setting,
            repeats: 1,
            status: "done".into(),
            metrics: Some(metrics),
            started_at: String::new(),
            finished_at: None,
        }
    }

    #[test]
    fn a_setting_that_loses_quality_is_ruled_out() {
        let objective = json!({
            "metric": "e2e_ms",
            "quality": {"repo": "/r", "holes": "/h", "count": 10,
                        "max_similarity_loss": 0.02, "max_nll_rise": 0.05},
        });
        let m = |ms: f64, sim: f64, nll: f64| {
            json!({"median_e2e_ms": ms, "median_quality_edit_similarity": sim,
                   "median_quality_nll_per_token": nll})
        };
        let base = m(100.0, 0.5, 1.0);
        assert_eq!(metric_of(&base, &objective, Some(&base)), 100.0);
        // Within the bounds, better, or exactly at them: kept.
        assert_eq!(
            metric_of(&m(90.0, 0.49, 1.04), &objective, Some(&base)),
            90.0
        );
        assert_eq!(metric_of(&m(90.0, 0.6, 0.9), &objective, Some(&base)), 90.0);
        assert_eq!(
            metric_of(&m(90.0, 0.48, 1.05), &objective, Some(&base)),
            90.0
        );
        // Past either bound, no quality measured, or no baseline: out.
        for out in [m(50.0, 0.47, 1.0), m(50.0, 0.5, 1.06)] {
            assert_eq!(metric_of(&out, &objective, Some(&base)), f64::INFINITY);
        }
        let speed_only = json!({"median_e2e_ms": 50.0});
        assert_eq!(
            metric_of(&speed_only, &objective, Some(&base)),
            f64::INFINITY
        );
        assert_eq!(metric_of(&base, &objective, None), f64::INFINITY);
        // The repository's own text, where scored, is bounded too.
        let text = |ms: f64, t: f64| {
            let mut v = m(ms, 0.5, 1.0);
            v["median_quality_text_nll_per_token"] = json!(t);
            v
        };
        let text_base = text(100.0, 2.0);
        assert_eq!(
            metric_of(&text(80.0, 2.05), &objective, Some(&text_base)),
            80.0
        );
        assert_eq!(
            metric_of(&text(80.0, 2.06), &objective, Some(&text_base)),
            f64::INFINITY
        );
        // A typing session's completions cut by the token limit.
        let cut = |ms: f64, share: f64| {
            let mut v = m(ms, 0.5, 1.0);
            v["median_truncated_share"] = json!(share);
            v
        };
        let objective_cut = {
            let mut o = objective.clone();
            o["quality"]["max_truncation_rise"] = json!(0.1);
            o
        };
        let cut_base = cut(100.0, 0.2);
        assert_eq!(
            metric_of(&cut(60.0, 0.3), &objective_cut, Some(&cut_base)),
            60.0
        );
        assert_eq!(
            metric_of(&cut(50.0, 0.5), &objective_cut, Some(&cut_base)),
            f64::INFINITY
        );
        // One side scored and not the other: not comparable, out.
        assert_eq!(
            metric_of(&m(80.0, 0.5, 1.0), &objective, Some(&text_base)),
            f64::INFINITY
        );
        // A run without a quality set judges speed alone.
        assert_eq!(
            metric_of(&speed_only, &json!({"metric": "e2e_ms"}), None),
            50.0
        );
    }

    #[test]
    fn the_quality_objective_minimises_the_likelihood_and_bounds_only_similarity() {
        let objective = json!({
            "kind": "quality", "metric": "quality_nll_per_token",
            "quality": {"repo": "/r", "holes": "/h", "count": 10, "held_out": "/o",
                        "held_out_count": 10, "max_similarity_loss": 0.02, "max_nll_rise": 0.02},
        });
        let m = |sim: f64, nll: f64| json!({"median_quality_edit_similarity": sim, "median_quality_nll_per_token": nll});
        let base = m(0.5, 2.0);
        assert_eq!(metric_of(&base, &objective, Some(&base)), 2.0);
        // A worse likelihood is a worse metric, not a rule-out.
        assert_eq!(metric_of(&m(0.5, 2.5), &objective, Some(&base)), 2.5);
        assert_eq!(metric_of(&m(0.49, 1.9), &objective, Some(&base)), 1.9);
        assert_eq!(
            metric_of(&m(0.45, 1.5), &objective, Some(&base)),
            f64::INFINITY
        );
        let q = Quality::of(&objective).unwrap();
        assert_eq!(q.held_out, Some(("/o".into(), 10)));
        // A ranking parameter changes tokens; its knob is written to its
        // policy's table and shown by its own name.
        let setting: Setting = serde_json::from_value(json!({
            "policy.bm25-recency.definition": 40.5, "policy.my-rank.reach": 12, "threads": 2,
        }))
        .unwrap();
        assert_eq!(quality_inputs(&setting).len(), 2);
        let e = engine_setting(&setting, "m").unwrap();
        assert_eq!(e.policy_params["bm25-recency"]["definition"], 40.5);
        assert_eq!(e.policy_params["my-rank"]["reach"], 12.0);
        assert_eq!(describe(&setting), "definition=40.5 reach=12 threads=2");
    }

    #[test]
    fn a_quality_is_measured_once_per_combination_of_the_knobs_that_change_tokens() {
        let scored = json!({"median_e2e_ms": 100.0, "quality_edit_similarity": [0.5],
                            "median_quality_edit_similarity": 0.5,
                            "quality_nll_per_token": [1.2]});
        let trials = [
            trial(
                1,
                json!({"threads": 1, "kv_type": "f16", "context_tokens": 512}),
                scored.clone(),
            ),
            trial(
                2,
                json!({"threads": 2, "kv_type": "q8_0", "context_tokens": 512}),
                json!({"quality_from_trial": 7, "quality_nll_per_token": [1.3]}),
            ),
        ];
        let s = |v: Value| -> Setting { serde_json::from_value(v).unwrap() };
        // Threads do not change tokens: trial 1's quality.
        let (from, known) = known_quality(
            &trials,
            &s(json!({"threads": 2, "kv_type": "f16", "context_tokens": 512})),
        )
        .unwrap();
        assert_eq!(from, 1);
        assert_eq!(
            known,
            vec![
                ("quality_edit_similarity".to_string(), 0.5),
                ("quality_nll_per_token".to_string(), 1.2)
            ]
        );
        // Reused in turn: the trial that measured it.
        let (from, _) = known_quality(
            &trials,
            &s(json!({"threads": 1, "kv_type": "q8_0", "context_tokens": 512})),
        )
        .unwrap();
        assert_eq!(from, 7);
        // Another KV cache type or budget: measured anew.
        for other in [
            json!({"threads": 1, "kv_type": "q4_0", "context_tokens": 512}),
            json!({"threads": 1, "kv_type": "f16", "context_tokens": 256}),
        ] {
            assert!(known_quality(&trials, &s(other)).is_none());
        }
    }
}
