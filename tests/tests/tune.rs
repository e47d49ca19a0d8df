//! `kiln tune` (the seed's ninth feature): each sampler finds a known
//! optimum of a synthetic objective within a set number of trials (the
//! shipped WebAssembly `tpe` and `genetic` policies through the sandbox,
//! as `kiln tune` runs them), and a short real search on the demo model:
//! recorded in the registry, resumed after a SIGKILL, its best setting
//! applied to config.toml and rolled back.

use kiln_runtime::tune::{Knob, Observation, PolicySampler, Sampler, Setting, Space, median};
use kiln_tests::Home;
use kiln_tests::serve::demo_model;
use serde_json::json;
use std::time::{Duration, Instant};

fn space() -> Space {
    Space {
        knobs: vec![
            Knob::Int {
                name: "threads".into(),
                lo: 1,
                hi: 16,
                log: false,
            },
            Knob::Choice {
                name: "kv".into(),
                options: vec!["f16".into(), "q8_0".into(), "q4_0".into()],
            },
            Knob::Int {
                name: "block".into(),
                lo: 8,
                hi: 1024,
                log: true,
            },
        ],
    }
}

/// Lowest (10) at threads 11, q8_0, block 128.
fn objective(s: &Setting) -> f64 {
    let t = s["threads"].as_i64().unwrap() as f64;
    let kv = match s["kv"].as_str().unwrap() {
        "q8_0" => 0.0,
        "f16" => 1.0,
        _ => 3.0,
    };
    let b = (s["block"].as_i64().unwrap() as f64 / 128.0).ln().abs();
    10.0 + 0.2 * (t - 11.0).powi(2) + kv + 2.0 * b
}

#[test]
fn the_shipped_tuning_policies_find_a_known_optimum() {
    let Some(dir) = kiln_tests::policies_dir() else {
        return;
    };
    let sandbox = kiln_sandbox::Sandbox::new(None);
    for (name, trials, within) in [("tpe", 60, 1.0), ("genetic", 80, 1.5)] {
        let bytes = std::fs::read(dir.join(format!("{name}.wasm"))).unwrap();
        let mut sampler = PolicySampler {
            policy: sandbox.load(&bytes, None).unwrap(),
            seed: 1,
            repeats: 1,
        };
        let space = space();
        let mut history: Vec<Observation> = Vec::new();
        for _ in 0..trials {
            let p = sampler.propose(&space, &history).unwrap().unwrap();
            history.push(Observation {
                metric: objective(&p.setting),
                setting: p.setting,
                repeats: 1,
            });
        }
        let best = history
            .iter()
            .min_by(|a, b| a.metric.total_cmp(&b.metric))
            .unwrap();
        assert!(
            best.metric - 10.0 < within,
            "{name}: best {best:?} after {trials} trials"
        );
        // Better than its own first (random) proposals: it learned.
        let early = median(&history[..10].iter().map(|o| o.metric).collect::<Vec<_>>());
        let late = median(
            &history[trials - 10..]
                .iter()
                .map(|o| o.metric)
                .collect::<Vec<_>>(),
        );
        assert!(late < early, "{name}: late {late} vs early {early}");
    }
}

fn trials_of(home: &Home, run: i64) -> Vec<serde_json::Value> {
    home.json(&["tune", "show", &run.to_string(), "--json"])["trials"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_real_search_is_recorded_resumed_after_a_kill_applied_and_rolled_back() {
    let home = Home::default();
    let model = demo_model();
    let m = model.to_str().unwrap();
    // Bad input: named, nothing recorded.
    let err = home.fails(&["tune", "run", m, "--sampler", "annealing"]);
    assert!(err.contains("unknown sampler annealing"), "{err}");
    let err = home.fails(&["tune", "run", "/nope.gguf"]);
    assert!(err.contains("nope.gguf"), "{err}");
    assert_eq!(home.json(&["tune", "list", "--json"])["runs"], json!([]));

    // A grid search of 4 trials, killed once its first trial is recorded.
    let mut child = home
        .command(&[
            "tune",
            "run",
            m,
            "--sampler",
            "grid",
            "--trials",
            "4",
            "--prompt-tokens",
            "32",
            "--confirm",
            "5",
        ])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let run = loop {
        let runs = home.json(&["tune", "list", "--json"])["runs"].clone();
        if let Some(id) = runs[0]["id"].as_i64()
            && trials_of(&home, id).iter().any(|t| t["status"] == "done")
        {
            break id;
        }
        assert!(Instant::now() < deadline, "no trial recorded");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let before = trials_of(&home, run);
    assert!(before.len() < 4, "{before:#?}");
    // The default is measured first.
    assert_eq!(
        before[0]["setting"]["attention_block"],
        json!(64),
        "{before:#?}"
    );

    let shown = home.json(&["tune", "resume", &run.to_string(), "--json"]);
    let trials = shown["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 4, "{shown:#}");
    assert!(trials.iter().all(|t| t["status"] == "done"), "{shown:#}");
    for t in trials {
        let ttft = t["metrics"]["median_ttft_ms"].as_f64().unwrap();
        assert!(ttft > 0.0 && ttft.is_finite(), "{t}");
        let rss = t["metrics"]["median_memory_bytes"].as_f64().unwrap();
        assert!(rss > 1e6, "{t}");
    }
    // The settings are the grid's first four, each once.
    let settings: Vec<_> = trials
        .iter()
        .skip(1)
        .map(|t| t["setting"].clone())
        .collect();
    for (i, s) in settings.iter().enumerate() {
        assert!(!settings[i + 1..].contains(s), "{settings:#?}");
    }
    assert_eq!(shown["run"]["state"], "done");
    let verdict = &shown["run"]["verdict"];
    assert!(verdict["reason"].is_string(), "{verdict:#}");
    assert!(!shown["pareto_front"].as_array().unwrap().is_empty());
    let err = home.fails(&["tune", "resume", &run.to_string()]);
    assert!(err.contains("is done"), "{err}");

    // A memory cap no setting fits rules every one out.
    let capped = home.json(&[
        "tune",
        "run",
        m,
        "--trials",
        "2",
        "--prompt-tokens",
        "16",
        "--max-memory-mb",
        "1",
        "--json",
    ]);
    let v = &capped["run"]["verdict"];
    assert_eq!(v["better"], false, "{v}");
    assert!(v["reason"].as_str().unwrap().contains("memory cap"), "{v}");

    // The typing objective: a replayed typing session through the language
    // server per trial, its end-to-end latency minimised.
    let typing = home.json(&[
        "tune",
        "run",
        m,
        "--trials",
        "2",
        "--keystrokes",
        "4",
        "--max-tokens",
        "4",
        "--confirm",
        "0",
        "--json",
    ]);
    assert_eq!(typing["run"]["objective"]["metric"], "e2e_ms", "{typing:#}");
    for t in typing["trials"].as_array().unwrap() {
        assert_eq!(t["status"], "done", "{t}");
        let e2e = t["metrics"]["median_e2e_ms"].as_f64().unwrap();
        let ttft = t["metrics"]["median_ttft_ms"].as_f64().unwrap();
        assert!(e2e >= ttft && ttft > 0.0, "{t}");
    }
    // Speculative decoding is a knob of a typing session (greedy: the
    // same tokens either way), and apply writes it.
    let knobs = typing["run"]["space"]["knobs"].to_string();
    assert!(knobs.contains("\"draft\""), "{knobs}");
    assert_eq!(typing["run"]["objective"]["default"]["draft"], "none");
    let typed = typing["trials"][1]["id"].as_i64().unwrap();
    home.ok(&["tune", "apply", &typed.to_string()]);
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(
        config.contains(&format!(
            "[completion]\ndraft = {}",
            typing["trials"][1]["setting"]["draft"]
        )),
        "{config}"
    );
    home.ok(&["tune", "rollback"]);
    // Typed at a pace (not waiting for each answer): the server's
    // debounce is a knob, the latencies those at the ends of words.
    let paced = home.json(&[
        "tune",
        "run",
        m,
        "--typing-ms",
        "20",
        "--keystrokes",
        "6",
        "--max-tokens",
        "4",
        "--knobs",
        "debounce_ms",
        "--sampler",
        "grid",
        "--trials",
        "2",
        "--confirm",
        "0",
        "--json",
    ]);
    assert_eq!(paced["run"]["objective"]["typing_ms"], 20, "{paced:#}");
    let paced_trials = paced["trials"].as_array().unwrap();
    assert_eq!(
        paced_trials[0]["setting"],
        json!({"debounce_ms": 0}),
        "{paced:#}"
    );
    for t in paced_trials {
        assert_eq!(t["status"], "done", "{t}");
        assert!(t["metrics"]["median_e2e_ms"].as_f64().unwrap() > 0.0, "{t}");
    }
    let debounced = paced_trials[1]["setting"]["debounce_ms"].as_u64().unwrap();
    assert!(debounced > 0, "{paced:#}");
    home.ok(&["tune", "apply", &paced_trials[1]["id"].to_string()]);
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(
        config.contains(&format!("debounce_ms = {debounced}")),
        "{config}"
    );
    home.ok(&["tune", "rollback"]);
    let demo = home.json(&[
        "demo",
        "--model",
        m,
        "--keystrokes",
        "12",
        "--max-tokens",
        "2",
        "--typing-ms",
        "10",
        "--json",
    ]);
    let report = &demo["report"];
    assert_eq!(report["requests"], 12, "{report:#}");
    let waited = report["waited_requests"].as_u64().unwrap();
    assert!((1..12).contains(&waited), "{report:#}");
    let err = home.fails(&["tune", "run", m, "--knobs", "debounce_ms"]);
    assert!(err.contains("--knobs debounce_ms"), "{err}");
    let err = home.fails(&["tune", "run", m, "--objective", "vibes"]);
    assert!(err.contains("unknown objective vibes"), "{err}");

    // Apply a trial (its setting into config.toml), then roll it back.
    let trial = trials[1]["id"].as_i64().unwrap();
    let setting = &trials[1]["setting"];
    let out = home.ok(&["tune", "apply", &trial.to_string()]);
    assert!(out.contains("kiln tune rollback"), "{out}");
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(
        config.contains(&format!("threads = {}", setting["threads"])),
        "{config}"
    );
    assert!(
        config.contains(&format!("attention_block = {}", setting["attention_block"])),
        "{config}"
    );
    assert!(
        config.contains(&format!("prompt_batch = {}", setting["prompt_batch"])),
        "{config}"
    );
    // The model's KV type under the name kiln serves it by (a file's stem).
    assert!(
        config.contains(&format!(
            "demo = \"{}\"",
            setting["kv_type"].as_str().unwrap()
        )),
        "{config}"
    );
    // kiln reads it: bench runs with the applied block.
    let bench = home.json(&[
        "bench",
        m,
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "2",
        "--json",
    ]);
    assert_eq!(bench["attention_block"], setting["attention_block"]);
    assert_eq!(bench["prompt_batch"], setting["prompt_batch"]);
    assert_eq!(bench["kv_type"], setting["kv_type"]);
    let audit = home.registry().audit_log(50).unwrap();
    assert!(
        audit.iter().any(|e| e.kind == "config"
            && e.detail
                .as_deref()
                .is_some_and(|d| d.contains("kiln tune apply"))),
        "{audit:#?}"
    );
    home.ok(&["tune", "rollback"]);
    assert!(!home.path().join("config.toml").exists());
    assert!(
        home.fails(&["tune", "rollback"])
            .contains("has not changed")
    );
    // A file changed by hand since is not overwritten.
    home.ok(&["tune", "apply", &trial.to_string()]);
    std::fs::write(home.path().join("config.toml"), "[engine]\nthreads = 1\n").unwrap();
    let err = home.fails(&["tune", "rollback"]);
    assert!(err.contains("changed since"), "{err}");
    assert_eq!(
        std::fs::read_to_string(home.path().join("config.toml")).unwrap(),
        "[engine]\nthreads = 1\n"
    );
}

/// With a quality set: each setting's completions scored on cross-file
/// holes of a real repository (the `ignore` crate Cargo.lock pins), the
/// prompt's budgets searched as knobs, a quality measured once per
/// combination of the knobs that change tokens, and an applied budget
/// read by `kiln serve`.
#[test]
fn a_search_with_a_quality_set_scores_completions_and_tunes_the_prompts_budgets() {
    let home = Home::default();
    let model = demo_model();
    let m = model.to_str().unwrap();
    let repo = kiln_tests::locked_crate_sources("ignore");
    let r = repo.to_str().unwrap();
    // Bad input: named, nothing recorded.
    let empty = tempfile::tempdir().unwrap();
    let err = home.fails(&[
        "tune",
        "run",
        m,
        "--quality",
        empty.path().to_str().unwrap(),
    ]);
    assert!(err.contains("no cross-file holes"), "{err}");
    let err = home.fails(&["tune", "run", m, "--quality", "/no/such/repo"]);
    assert!(err.contains("/no/such/repo"), "{err}");
    let err = home.fails(&[
        "tune",
        "run",
        m,
        "--quality",
        r,
        "--max-similarity-loss",
        "2",
    ]);
    assert!(err.contains("--max-similarity-loss"), "{err}");
    assert_eq!(home.json(&["tune", "list", "--json"])["runs"], json!([]));

    let shown = home.json(&[
        "tune",
        "run",
        m,
        "--quality",
        r,
        "--quality-holes",
        "3",
        "--quality-tokens",
        "200",
        "--trials",
        "3",
        "--keystrokes",
        "3",
        "--max-tokens",
        "4",
        "--confirm",
        "0",
        "--json",
    ]);
    let run = &shown["run"];
    let knobs = run["space"]["knobs"].to_string();
    for knob in [
        "context_tokens",
        "prefix_tokens",
        "suffix_tokens",
        "max_tokens",
    ] {
        assert!(knobs.contains(&format!("\"{knob}\"")), "{knobs}");
    }
    // The default is what kiln serve uses without a config.
    let default = &run["objective"]["default"];
    assert_eq!(
        (
            &default["context_tokens"],
            &default["prefix_tokens"],
            &default["suffix_tokens"]
        ),
        (&json!(512), &json!(1024), &json!(256)),
        "{default}"
    );
    let holes = run["objective"]["quality"]["holes"].as_str().unwrap();
    assert!(std::path::Path::new(holes).is_file(), "{run:#}");
    let trials = shown["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 3, "{shown:#}");
    for t in trials {
        assert_eq!(t["status"], "done", "{t}");
        let sim = t["metrics"]["median_quality_edit_similarity"]
            .as_f64()
            .unwrap();
        let nll = t["metrics"]["median_quality_nll_per_token"]
            .as_f64()
            .unwrap();
        assert!((0.0..=1.0).contains(&sim), "{t}");
        assert!(nll > 0.0 && nll.is_finite(), "{t}");
        assert!(
            t["metrics"]["quality_holes"][0].as_f64().unwrap() >= 1.0,
            "{t}"
        );
        let text = t["metrics"]["median_quality_text_nll_per_token"]
            .as_f64()
            .unwrap();
        assert!(text > 0.0 && text.is_finite(), "{t}");
        // The completion length is a knob: what its limit cuts is measured.
        let cut = t["metrics"]["median_truncated_share"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&cut), "{t}");
    }
    let verdict = &run["verdict"];
    assert_eq!(
        verdict["quality"]["default"]["nll_per_token"],
        trials[0]["metrics"]["median_quality_nll_per_token"],
        "{verdict:#}"
    );
    // The front has the quality coordinates too.
    assert!(!shown["pareto_front"].as_array().unwrap().is_empty());

    // A trial's budgets applied: kiln serve reads them from config.toml.
    let trial = &trials[2];
    home.ok(&["tune", "apply", &trial["id"].to_string()]);
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(
        config.contains(&format!(
            "context_tokens = {}",
            trial["setting"]["context_tokens"]
        )),
        "{config}"
    );
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("main.py"), "def f():\n    return 1\n").unwrap();
    let mut c = kiln_tests::serve::serve(&home, &["--ctx", "2048"]);
    kiln_tests::serve::initialize(&mut c, ws.path(), json!({}));
    let uri = format!("file://{}/main.py", ws.path().display());
    kiln_tests::serve::open(&mut c, &uri, "def f():\n    return 1\n");
    let preview = c
        .request("kiln/context", kiln_tests::serve::at(&uri, 1, 4))
        .unwrap();
    // The budgets as they fit the window (2,048 tokens less the 64 of a
    // completion): the applied ones, or those scaled down to fit.
    let budget = |k: &str| trial["setting"][k].as_u64().unwrap() as usize;
    let fitted = kiln_serve::Settings {
        prefix_tokens: budget("prefix_tokens"),
        suffix_tokens: budget("suffix_tokens"),
        context_tokens: budget("context_tokens"),
        ..kiln_serve::Settings::default()
    }
    .within(2048 - 64);
    assert_eq!(
        preview["result"]["context_budget"], fitted.context_tokens,
        "{preview:#}"
    );
    let prompt_tokens = preview["result"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens <= 2048 - 64, "{preview:#}");
    // A flag still wins over config.toml.
    c.hang_up().unwrap();
    let mut c = kiln_tests::serve::serve(&home, &["--context-tokens", "100"]);
    kiln_tests::serve::initialize(&mut c, ws.path(), json!({}));
    kiln_tests::serve::open(&mut c, &uri, "def f():\n    return 1\n");
    let preview = c
        .request("kiln/context", kiln_tests::serve::at(&uri, 1, 4))
        .unwrap();
    assert_eq!(preview["result"]["context_budget"], 100, "{preview:#}");
    c.hang_up().unwrap();
    // Budgets past the model's window shrink to fit it: completions still
    // come, not an error per keystroke.
    let mut c = kiln_tests::serve::serve(
        &home,
        &[
            "--ctx",
            "256",
            "--prefix-tokens",
            "4096",
            "--suffix-tokens",
            "1024",
            "--context-tokens",
            "4096",
            "--max-tokens",
            "8",
        ],
    );
    kiln_tests::serve::initialize(&mut c, ws.path(), json!({}));
    let long: String = (0..400).map(|i| format!("x{i} = {i}\n")).collect();
    kiln_tests::serve::open(&mut c, &uri, &long);
    let answer = c
        .request(
            "textDocument/completion",
            kiln_tests::serve::at(&uri, 400, 0),
        )
        .unwrap();
    assert!(
        answer["result"].is_object() || answer["result"].is_array(),
        "{answer:#}"
    );
    c.hang_up().unwrap();
    home.ok(&["tune", "rollback"]);
    // A file is not requantized (its new version would have nowhere to go).
    assert!(!knobs.contains("\"quant\""), "{knobs}");
    let err = home.fails(&["tune", "run", m, "--knobs", "quant"]);
    assert!(
        err.contains("--knobs quant") && err.contains("--quality"),
        "{err}"
    );

    // A registered model: requantized copies are a knob, and applying one
    // adds it as the model's new version.
    home.ok(&["models", "add", m, "--name", "demo"]);
    let shown = home.json(&[
        "tune",
        "run",
        "demo",
        "--quality",
        r,
        "--quality-holes",
        "2",
        "--knobs",
        "quant",
        "--sampler",
        "grid",
        "--trials",
        "2",
        "--objective",
        "prompt",
        "--prompt-tokens",
        "16",
        "--confirm",
        "0",
        "--json",
    ]);
    let trials = shown["trials"].as_array().unwrap();
    assert_eq!(trials[0]["setting"], json!({"quant": "as-is"}), "{shown:#}");
    let quant = trials[1]["setting"]["quant"].as_str().unwrap();
    assert_ne!(quant, "as-is");
    for t in trials {
        assert_eq!(t["status"], "done", "{t}");
        assert!(
            t["metrics"]["median_quality_nll_per_token"]
                .as_f64()
                .is_some(),
            "{t}"
        );
    }
    // The copies are gone with the run.
    let run_id = shown["run"]["id"].as_i64().unwrap();
    assert!(!home.path().join(format!("tune/run-{run_id}")).exists());
    let out = home.ok(&["tune", "apply", &trials[1]["id"].to_string()]);
    assert!(out.contains("added demo@2"), "{out}");
    let models = home.json(&["models", "list", "--json"]);
    let added = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 2)
        .unwrap_or_else(|| panic!("{models:#}"));
    assert_eq!(added["quant_type"], quant, "{added}");
    assert_eq!(added["parent"], "demo@1", "{added}");
    assert_eq!(added["state"], "active", "{added}");
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(config.contains("\"demo@2\" = "), "{config}");
    home.ok(&["tune", "rollback"]);
    home.ok(&["models", "rollback", "demo"]);

    // A config with a budget out of range is named.
    std::fs::write(
        home.path().join("config.toml"),
        "[completion]\nmax_tokens = 0\n",
    )
    .unwrap();
    let err = home.fails(&["serve", "--model", m]);
    assert!(err.contains("[completion] max_tokens = 0"), "{err}");
}

/// The quality objective: the ranking policy's declared parameters (ABI
/// 1.4; the built-in ranker's are `bm25-recency`'s) searched for the
/// likeliest completions of holes cut from a real repository, those the
/// holes cannot judge left out, the best judged on held-out holes, and a
/// trial applied as `[policies.params.bm25-recency]`, which the served
/// ranker and `kiln doctor` then use, and rolled back.
#[test]
fn the_quality_objective_fits_the_ranking_parameters_on_held_out_holes() {
    let home = Home::default();
    let model = demo_model();
    let m = model.to_str().unwrap();
    let repo = kiln_tests::locked_crate_sources("ignore");
    let r = repo.to_str().unwrap();
    let err = home.fails(&["tune", "run", m, "--objective", "quality"]);
    assert!(err.contains("--quality REPO"), "{err}");
    let err = home.fails(&["tune", "run", m, "--objective", "fastest"]);
    assert!(err.contains("typing") && err.contains("quality"), "{err}");

    let shown = home.json(&[
        "tune",
        "run",
        m,
        "--objective",
        "quality",
        "--quality",
        r,
        "--quality-holes",
        "6",
        "--trials",
        "3",
        "--sampler",
        "random",
        "--json",
    ]);
    let run = &shown["run"];
    let names: Vec<String> = (run["space"]["knobs"].as_array().unwrap().iter())
        .map(|k| k["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.is_empty(), "{run:#}");
    let declared: Vec<String> = kiln_sandbox::builtin::params()
        .into_iter()
        .map(|d| format!("policy.bm25-recency.{}", d.name))
        .collect();
    for n in &names {
        assert!(declared.contains(n), "{n}: {run:#}");
    }
    // A repository read from disk has no editor state: the recency
    // weights cannot be judged on it, so they are not searched.
    let unsearched = run["objective"]["unsearched"].to_string();
    for p in ["edit_seconds", "open_seconds", "open_in_editor"] {
        assert!(unsearched.contains(p), "{unsearched}");
    }
    assert_eq!(
        names.len() + run["objective"]["unsearched"].as_array().unwrap().len(),
        11
    );
    let q = &run["objective"]["quality"];
    let held_out = q["held_out"].as_str().unwrap();
    assert!(std::path::Path::new(held_out).is_file(), "{q}");
    assert!(q["held_out_count"].as_u64().unwrap() >= 1, "{q}");
    let trials = shown["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 3, "{shown:#}");
    for t in trials {
        assert_eq!(t["status"], "done", "{t}");
        let nll = t["metrics"]["median_quality_nll_per_token"]
            .as_f64()
            .unwrap();
        assert!(nll > 0.0 && nll.is_finite(), "{t}");
        // Nothing timed: the holes are the measurement.
        assert!(t["metrics"]["median_ttft_ms"].is_null(), "{t}");
    }
    // The default (config.toml has none: the declared defaults) first.
    assert_eq!(
        trials[0]["setting"]["policy.bm25-recency.definition"],
        json!(32.0),
        "{shown:#}"
    );
    let verdict = &run["verdict"];
    let reason = verdict["reason"].as_str().unwrap();
    if verdict["setting"] != trials[0]["setting"] {
        // Judged on the held-out holes, hole by hole.
        assert_eq!(
            verdict["held_out_holes"], q["held_out_count"],
            "{verdict:#}"
        );
        assert!(verdict["p_value"].as_f64().unwrap() <= 1.0, "{verdict:#}");
        assert!(reason.contains("held-out"), "{reason}");
    } else {
        assert!(reason.contains("default is the best"), "{reason}");
    }
    let text = home.ok(&["tune", "show", &run["id"].to_string()]);
    assert!(
        text.contains("NLL/TOKEN") && !text.contains("TTFT"),
        "{text}"
    );

    // A trial applied: config.toml's table, read by every ranker.
    let trial = &trials[2];
    home.ok(&["tune", "apply", &trial["id"].to_string()]);
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(
        config.contains("[policies.params.bm25-recency]"),
        "{config}"
    );
    let doctor = home.json(&["doctor", "--json"]);
    for n in &names {
        let param = n.rsplit('.').next().unwrap();
        assert_eq!(
            doctor["ranking"]["params"][param].as_f64(),
            trial["setting"][n].as_f64(),
            "{n}: {doctor:#}"
        );
    }
    assert_eq!(doctor["problems"], json!([]), "{doctor:#}");
    home.ok(&["tune", "rollback"]);
    assert!(
        !home.path().join("config.toml").exists() || {
            let c = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
            !c.contains("policies")
        }
    );

    // A ranking policy that declares no parameters: nothing to search.
    if let Some(dir) = kiln_tests::policies_dir() {
        home.ok(&["policy", "add", dir.join("jaccard.wasm").to_str().unwrap()]);
        let err = home.fails(&["tune", "run", m, "--objective", "quality", "--quality", r]);
        assert!(err.contains("declares no parameters"), "{err}");
    }
}
