//! Policies as kiln manages them: the content-addressed store of modules,
//! the quality gate a policy passes before it is installed, single runs
//! recorded in the decision log, and bit-exact replay of a decision.

use kiln_registry::config::Config;
use kiln_registry::{NewPolicy, PolicyRecord, Registry, Transition};
use kiln_sandbox::breaker::{Call, DEFAULT_THRESHOLD};
use kiln_sandbox::limits::LimitOverrides;
use kiln_sandbox::{
    Candidate, Cursor, Param, ParamKind, Policy, PolicyError, PolicyKind, PolicyLimits, RankInput,
    Sandbox, Trial, TuneInput, abi, builtin,
};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Default latency ceiling of the quality gate: the 99th percentile of a
/// call, instantiation included.
pub const DEFAULT_MAX_P99_MS: f64 = 25.0;

pub fn blobs_dir(config: &Config) -> PathBuf {
    config.home.join("policies").join("blobs")
}

/// The sandbox, with compiled modules cached under `$KILN_HOME/cache`.
pub fn sandbox(config: &Config) -> Sandbox {
    Sandbox::new(Some(config.home.join("cache").join("policies")))
}

/// Keeps a module as `sha256-<hex>.wasm` (written atomically).
pub fn store_blob(config: &Config, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let dir = blobs_dir(config);
    std::fs::create_dir_all(&dir)?;
    let sha = kiln_sandbox::runtime::sha256_hex(bytes);
    let path = dir.join(format!("sha256-{sha}.wasm"));
    if std::fs::read(&path).is_ok_and(|b| b == bytes) {
        // Used again: young again for `kiln store gc`'s grace period.
        let _lock = crate::store::StoreLock::acquire(&dir).map_err(std::io::Error::other)?;
        if std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
            .is_ok()
        {
            return Ok(path);
        }
    }
    let tmp = dir.join(format!(".incoming-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    // Published under the store's lock, so that `kiln store gc` sees it
    // either not yet or whole (and young enough to be spared).
    let _lock = crate::store::StoreLock::acquire(&dir).map_err(std::io::Error::other)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// A module from a file, or an installed policy's (hash-checked) blob.
pub fn resolve(
    config: &Config,
    registry: &Registry,
    arg: &str,
) -> Result<(Vec<u8>, Option<PolicyRecord>), String> {
    let path = Path::new(arg);
    if path.is_file() {
        return std::fs::read(path)
            .map(|b| (b, None))
            .map_err(|e| format!("cannot read {arg}: {e}"));
    }
    let Some(rec) = registry.policy(arg).map_err(|e| e.to_string())? else {
        return Err(format!(
            "{arg} is neither a .wasm file nor an installed policy (see `kiln policy list`)"
        ));
    };
    let bytes = std::fs::read(&rec.blob_path).map_err(|e| {
        format!(
            "{}: cannot read {}: {e}",
            rec.label(),
            rec.blob_path.display()
        )
    })?;
    let sha = kiln_sandbox::runtime::sha256_hex(&bytes);
    if sha != rec.sha256 {
        return Err(format!(
            "{}: the stored module changed (sha256 {sha}, expected {}); reinstall it",
            rec.label(),
            rec.sha256
        ));
    }
    let _ = config;
    Ok((bytes, Some(rec)))
}

/// One request for a policy.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Rank(RankInput),
    Tune(TuneInput),
}

impl Input {
    pub fn parse(kind: PolicyKind, json: &str) -> Result<Input, String> {
        match kind {
            PolicyKind::Rank => serde_json::from_str(json)
                .map(Input::Rank)
                .map_err(|e| format!("not a ranking input: {e}")),
            PolicyKind::Tune => serde_json::from_str(json)
                .map(Input::Tune)
                .map_err(|e| format!("not a tuning input: {e}")),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Input::Rank(r) => r.encode(),
            Input::Tune(t) => t.encode(),
        }
    }
}

/// A recorded case for the quality gate.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub input: Input,
    /// Ids that must come first, in this order (ranking cases).
    pub expect_top: Option<Vec<u32>>,
}

/// Cases always available: ranking requests of 5, 50 and 1,000 candidates
/// and tuning requests with 0, 6 and 20 trials, generated from fixed seeds.
pub fn synthetic_cases(kind: PolicyKind) -> Vec<Case> {
    match kind {
        PolicyKind::Rank => [5usize, 50, 1000]
            .iter()
            .map(|&n| Case {
                name: format!("synthetic-rank-{n}"),
                input: Input::Rank(synthetic_rank(n, n as u64)),
                expect_top: None,
            })
            .collect(),
        PolicyKind::Tune => [0usize, 6, 20]
            .iter()
            .map(|&n| Case {
                name: format!("synthetic-tune-{n}"),
                input: Input::Tune(synthetic_tune(n, n as u64 + 1)),
                expect_top: None,
            })
            .collect(),
    }
}

const WORDS: &[&str] = &[
    "fn", "let", "mut", "self", "return", "match", "impl", "struct", "config", "cache", "token",
    "buffer", "len", "parse", "result", "error", "value", "index", "graph", "tensor", "model",
    "vocab", "score", "rank",
];

/// A ranking request of `n` snippets with plausible features.
pub fn synthetic_rank(n: usize, seed: u64) -> RankInput {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut words = |k: usize| {
        (0..k)
            .map(|_| WORDS[rng.usize(..WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let prefix = format!("fn main() {{\n    let {} = {};\n", words(2), words(6));
    let candidates = (0..n as u32)
        .map(|id| {
            let text = words(12 + (id as usize * 7) % 40);
            let mut r = fastrand::Rng::with_seed(seed ^ u64::from(id).wrapping_mul(0x9E37_79B9));
            let same_file = r.u32(..4) == 0;
            Candidate {
                id,
                path: format!("src/module_{}.rs", id % 17),
                token_count: text.split(' ').count() as u32 * 2,
                text,
                bm25: r.f32() * 12.0,
                jaccard: r.f32(),
                edit_recency_s: if r.bool() { r.f32() * 3600.0 } else { -1.0 },
                open_recency_s: if r.bool() { r.f32() * 7200.0 } else { -1.0 },
                line_distance: if same_file { r.i32(0..400) } else { -1 },
                same_file,
                import_related: r.u32(..5) == 0,
                open_in_editor: r.u32(..3) == 0,
                symbol_overlap: r.f32(),
                definition: if r.bool() { r.f32() * 1.2 } else { 0.0 },
                resolution: r.u32(..3),
                path_distance: r.i32(-1..6),
                import_hops: r.u32(..3),
            }
        })
        .collect();
    RankInput {
        cursor: Cursor {
            language: "rust".into(),
            path: "src/main.rs".into(),
            prefix,
            suffix: "}\n".into(),
            line: 2,
            column: 4,
        },
        candidates,
    }
}

/// A tuning request over three settings with `trials` past results.
pub fn synthetic_tune(trials: usize, seed: u64) -> TuneInput {
    let params = vec![
        Param {
            name: "learning_rate".into(),
            kind: ParamKind::LogFloat,
            lo: 1e-4,
            hi: 1e-1,
        },
        Param {
            name: "batch".into(),
            kind: ParamKind::Int,
            lo: 1.0,
            hi: 64.0,
        },
        Param {
            name: "temperature".into(),
            kind: ParamKind::Float,
            lo: 0.0,
            hi: 2.0,
        },
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let trials = (0..trials)
        .map(|_| {
            let lr = (1e-4f64.ln() + rng.f64() * (1e-1f64.ln() - 1e-4f64.ln())).exp();
            let batch = rng.u32(1..=64) as f64;
            let temp = rng.f64() * 2.0;
            // A bowl with its minimum at lr = 3e-3, batch = 16, temperature = 0.7.
            let metric = (lr.ln() - 3e-3f64.ln()).powi(2)
                + ((batch - 16.0) / 16.0).powi(2)
                + (temp - 0.7).powi(2);
            Trial {
                values: vec![lr, batch, temp],
                metric,
            }
        })
        .collect();
    TuneInput {
        params,
        trials,
        seed,
    }
}

/// Reads `*.json` cases from `dir`: `{"input": …, "expect": {"top": [ids]}}`.
pub fn read_cases(dir: &Path, kind: PolicyKind) -> Result<Vec<Case>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the cases directory {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", f.display()))?;
        let input = Input::parse(kind, &v["input"].to_string())
            .map_err(|e| format!("{}: {e}", f.display()))?;
        let expect_top = v["expect"]["top"].as_array().map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        });
        cases.push(Case {
            name: f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            input,
            expect_top,
        });
    }
    if cases.is_empty() {
        return Err(format!("{} has no *.json cases", dir.display()));
    }
    Ok(cases)
}

/// What the quality gate measured.
#[derive(Clone, Debug, Serialize)]
pub struct GateReport {
    pub cases: usize,
    pub calls: usize,
    pub failures: Vec<String>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_p99_ms: f64,
    pub fuel_max: u64,
    pub fuel_mean: f64,
    /// Ranking: mean share of the built-in ranker's top 5 that the policy
    /// also puts in its top 5.
    pub agreement_with_builtin: Option<f64>,
    pub passed: bool,
}

fn top_k(scores: &[f32], ids: &[u32], k: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.into_iter().take(k).map(|i| ids[i]).collect()
}

/// Runs every case `repeats` times; fails on any error, any unmet
/// expectation, or a p99 latency over `max_p99_ms`.
pub fn quality_gate(
    policy: &Policy,
    cases: &[Case],
    max_p99_ms: f64,
    repeats: usize,
) -> GateReport {
    let mut times = Vec::new();
    let mut fuels = Vec::new();
    let mut failures = Vec::new();
    let mut agreements = Vec::new();
    for case in cases {
        for r in 0..repeats.max(1) {
            let result = match &case.input {
                Input::Rank(i) => policy
                    .rank(i)
                    .map(|o| (o.elapsed, o.fuel_used, Some(o.value))),
                Input::Tune(t) => policy.tune(t).map(|o| (o.elapsed, o.fuel_used, None)),
            };
            match result {
                Ok((elapsed, fuel, scores)) => {
                    times.push(elapsed.as_secs_f64() * 1e3);
                    fuels.push(fuel);
                    if let (0, Some(scores), Input::Rank(i)) = (r, scores, &case.input) {
                        let ids: Vec<u32> = i.candidates.iter().map(|c| c.id).collect();
                        let k = ids.len().min(5);
                        if k > 0 {
                            let ours = top_k(&scores, &ids, k);
                            let theirs = top_k(&builtin::rank(i), &ids, k);
                            agreements.push(
                                ours.iter().filter(|x| theirs.contains(x)).count() as f64
                                    / k as f64,
                            );
                        }
                        if let Some(want) = &case.expect_top {
                            let got = top_k(&scores, &ids, want.len());
                            if &got != want {
                                failures.push(format!(
                                    "{}: expected top {want:?}, got {got:?}",
                                    case.name
                                ));
                            }
                        }
                    }
                }
                Err(e) => {
                    failures.push(format!("{}: {e}", case.name));
                    break;
                }
            }
        }
    }
    let p99 = crate::measure::percentile(&times, 99.0);
    if p99 > max_p99_ms {
        failures.push(format!(
            "p99 latency {p99:.2} ms exceeds the ceiling of {max_p99_ms} ms"
        ));
    }
    GateReport {
        cases: cases.len(),
        calls: times.len(),
        p50_ms: crate::measure::percentile(&times, 50.0),
        p90_ms: crate::measure::percentile(&times, 90.0),
        p99_ms: p99,
        max_p99_ms,
        fuel_max: fuels.iter().copied().max().unwrap_or(0),
        fuel_mean: if fuels.is_empty() {
            0.0
        } else {
            fuels.iter().sum::<u64>() as f64 / fuels.len() as f64
        },
        agreement_with_builtin: (!agreements.is_empty())
            .then(|| agreements.iter().sum::<f64>() / agreements.len() as f64),
        passed: failures.is_empty(),
        failures,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("{path}: refused: {source}")]
    Refused { path: String, source: PolicyError },
    #[error("{label}: failed the quality gate:\n  {}", report.failures.join("\n  "))]
    Gate {
        label: String,
        report: Box<GateReport>,
    },
    #[error("{0}")]
    Other(String),
}

/// `kiln policy add`: inspect, compile, gate, store, register (active).
pub fn add(
    config: &Config,
    registry: &mut Registry,
    file: &Path,
    cases_dir: Option<&Path>,
    overrides: &LimitOverrides,
    max_p99_ms: f64,
    actor: &str,
) -> Result<(PolicyRecord, Transition, GateReport), AddError> {
    let shown = file.display().to_string();
    let bytes =
        std::fs::read(file).map_err(|e| AddError::Other(format!("cannot read {shown}: {e}")))?;
    let meta = kiln_sandbox::meta::inspect(&bytes, kiln_sandbox::limits::CEILING.module_bytes)
        .map_err(|source| AddError::Refused {
            path: shown.clone(),
            source,
        })?;
    let merged = LimitOverrides {
        fuel: overrides.fuel.or(meta.limits.fuel),
        deadline_ms: overrides.deadline_ms.or(meta.limits.deadline_ms),
        memory_mib: overrides.memory_mib.or(meta.limits.memory_mib),
        table_elements: overrides.table_elements.or(meta.limits.table_elements),
    };
    let limits = PolicyLimits::with(&merged).map_err(|e| AddError::Refused {
        path: shown.clone(),
        source: PolicyError::Limits(e),
    })?;
    let policy = sandbox(config)
        .load(&bytes, Some(limits))
        .map_err(|source| AddError::Refused {
            path: shown.clone(),
            source,
        })?;
    let mut cases = synthetic_cases(policy.meta.kind);
    if let Some(dir) = cases_dir {
        cases.extend(read_cases(dir, policy.meta.kind).map_err(AddError::Other)?);
    }
    let report = quality_gate(&policy, &cases, max_p99_ms, 5);
    if !report.passed {
        return Err(AddError::Gate {
            label: policy.meta.label(),
            report: Box::new(report),
        });
    }
    let blob = store_blob(config, &bytes)
        .map_err(|e| AddError::Other(format!("cannot store the module: {e}")))?;
    let (rec, t) = registry
        .add_policy(
            &NewPolicy {
                name: policy.meta.name.clone(),
                version: policy.meta.version.to_string(),
                kind: policy.meta.kind.name().to_string(),
                sha256: policy.sha256.clone(),
                blob_path: blob,
                abi: policy.meta.abi,
                limits: serde_json::to_value(limits).unwrap_or_default(),
                quality: serde_json::to_value(&report).unwrap_or_default(),
            },
            actor,
        )
        .map_err(|e| AddError::Other(e.to_string()))?;
    Ok((rec, t, report))
}

/// The limits an installed policy was added with, or its own requests.
pub fn limits_of(record: Option<&PolicyRecord>, policy_bytes: &[u8]) -> Option<PolicyLimits> {
    if let Some(l) = record.and_then(|r| serde_json::from_value(r.limits.clone()).ok()) {
        return Some(l);
    }
    let meta =
        kiln_sandbox::meta::inspect(policy_bytes, kiln_sandbox::limits::CEILING.module_bytes)
            .ok()?;
    PolicyLimits::with(&meta.limits).ok()
}

/// One recorded call.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub policy: String,
    pub sha256: String,
    pub kind: String,
    pub decision_id: i64,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
    /// Ranking only: the built-in ranker's scores, used when the policy failed.
    pub fallback: Option<Vec<f32>>,
    pub fuel_used: Option<u64>,
    pub elapsed_us: Option<u64>,
    pub log: String,
    /// This failure tripped the circuit breaker (the policy is now disabled).
    pub tripped: bool,
}

/// Runs a policy once on `input`, records the decision (and, for an
/// installed policy, the breaker's count).
pub fn run_once(
    registry: &mut Registry,
    policy: &Policy,
    input: &Input,
    seal: Option<&crate::crypt::Keys>,
) -> Result<RunReport, String> {
    let bytes = input.encode();
    let kind = policy.meta.kind;
    match (kind, input) {
        (PolicyKind::Rank, Input::Rank(_)) | (PolicyKind::Tune, Input::Tune(_)) => {}
        _ => {
            return Err(format!(
                "{} is a {} policy; the input is for the other kind",
                policy.meta.label(),
                kind.name()
            ));
        }
    }
    if let Input::Tune(t) = input {
        t.validate()?;
    }
    let start = std::time::Instant::now();
    let mut call = Call {
        policy: policy.meta.label(),
        sha256: policy.sha256.clone(),
        input: bytes.clone(),
        output: None,
        error: None,
        fuel_used: None,
        elapsed: start.elapsed(),
    };
    let mut log = String::new();
    let value = policy.call_raw(&bytes).and_then(|out| {
        call.fuel_used = Some(out.fuel_used);
        call.elapsed = out.elapsed;
        log = out.log;
        let value = match input {
            Input::Rank(i) => {
                serde_json::to_value(abi::decode_scores(&out.value, i.candidates.len())?)
            }
            Input::Tune(t) => serde_json::to_value(abi::decode_proposal(&out.value, &t.params)?),
        }
        .unwrap_or_default();
        call.output = Some(out.value);
        Ok(value)
    });
    if let Err(e) = &value {
        call.error = Some(e.to_string());
    }
    let recorded = record(registry, &call, kind, seal)?;
    let fallback = match (&value, input) {
        (Err(_), Input::Rank(i)) => Some(builtin::rank(i)),
        _ => None,
    };
    Ok(RunReport {
        policy: call.policy,
        sha256: call.sha256,
        kind: kind.name().into(),
        decision_id: recorded.decision_id,
        output: value.ok(),
        error: call.error,
        fallback,
        fuel_used: call.fuel_used,
        elapsed_us: call.fuel_used.map(|_| call.elapsed.as_micros() as u64),
        log,
        tripped: recorded.tripped,
    })
}

/// What recording a call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    /// The decision's id in the log (`kiln policy replay ID`).
    pub decision_id: i64,
    /// This failure tripped the circuit breaker: the policy is now
    /// disabled in the registry.
    pub tripped: bool,
}

/// Logs `call` as a decision (input and output bytes, so it replays bit
/// for bit) and counts its outcome against the circuit breaker's limit
/// ([`DEFAULT_THRESHOLD`] consecutive failures disable an installed policy).
/// With `seal` (encryption at rest) the input and output bytes are stored
/// encrypted, each an age file.
pub fn record(
    registry: &mut Registry,
    call: &Call,
    kind: PolicyKind,
    seal: Option<&crate::crypt::Keys>,
) -> Result<Recorded, String> {
    let sealed = |b: &[u8]| match seal {
        Some(keys) => crate::crypt::encrypt_bytes(b, keys).map_err(|e| e.to_string()),
        None => Ok(b.to_vec()),
    };
    let input = sealed(&call.input)?;
    let output = call.output.as_deref().map(sealed).transpose()?;
    let decision_id = registry
        .record_decision(
            &call.policy,
            &call.sha256,
            kind.name(),
            &input,
            output.as_deref(),
            call.error.as_deref(),
            call.fuel_used,
            call.fuel_used.map(|_| call.elapsed.as_micros() as u64),
            seal.is_some(),
        )
        .map_err(|e| e.to_string())?;
    let tripped = registry
        .record_policy_outcome(
            &call.sha256,
            call.error.is_none(),
            call.error.as_deref(),
            DEFAULT_THRESHOLD,
        )
        .map_err(|e| e.to_string())?;
    Ok(Recorded {
        decision_id,
        tripped,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub decision_id: i64,
    pub policy: String,
    pub identical: bool,
    pub original: Option<String>,
    pub replayed: Option<String>,
    pub fuel_used: Option<u64>,
}

/// Re-runs decision `id` with the exact module (by sha256) and input bytes,
/// and compares the output bytes.
pub fn replay(config: &Config, registry: &Registry, id: i64) -> Result<ReplayReport, String> {
    let mut d = registry
        .decision(id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no decision {id} in the log"))?;
    if d.encrypted {
        let keys = crate::crypt::Keys::from_env(config).map_err(|e| e.to_string())?;
        let open = |b: &[u8]| {
            crate::crypt::decrypt_bytes(b, &keys)
                .map_err(|e| format!("decision {id} is stored encrypted: {}", e.detail()))
        };
        d.input = open(&d.input)?;
        d.output = d.output.as_deref().map(open).transpose()?;
    }
    let blob = blobs_dir(config).join(format!("sha256-{}.wasm", d.policy_sha256));
    let bytes = std::fs::read(&blob).map_err(|e| {
        format!(
            "the module of {} is gone ({}): {e}",
            d.policy,
            blob.display()
        )
    })?;
    if kiln_sandbox::runtime::sha256_hex(&bytes) != d.policy_sha256 {
        return Err(format!(
            "{} changed on disk; the decision cannot be replayed exactly",
            blob.display()
        ));
    }
    let policy = sandbox(config)
        .load(
            &bytes,
            limits_of(registry.policy(&d.policy).ok().flatten().as_ref(), &bytes),
        )
        .map_err(|e| e.to_string())?;
    let describe = |r: &Result<Vec<u8>, String>| match r {
        Ok(b) => format!(
            "{} bytes, sha256 {}",
            b.len(),
            kiln_sandbox::runtime::sha256_hex(b)
        ),
        Err(e) => format!("error: {e}"),
    };
    let original: Result<Vec<u8>, String> = match (&d.output, &d.error) {
        (Some(o), _) => Ok(o.clone()),
        (None, Some(e)) => Err(e.clone()),
        (None, None) => Err("no output recorded".into()),
    };
    let now = policy.call_raw(&d.input);
    let fuel = now.as_ref().ok().map(|o| o.fuel_used);
    let replayed: Result<Vec<u8>, String> = now.map(|o| o.value).map_err(|e| e.to_string());
    Ok(ReplayReport {
        decision_id: id,
        policy: d.policy,
        identical: original == replayed,
        original: Some(describe(&original)),
        replayed: Some(describe(&replayed)),
        fuel_used: fuel,
    })
}
