//! WebAssembly policies end to end: the shipped policies, built from
//! source (Rust with rustc 1.63, C with clang), pass the quality gate and
//! install; the built-in ranker equals the BM25+recency policy bit for bit;
//! decisions replay exactly; hostile policies are contained with a clear
//! message while kiln keeps serving; the circuit breaker trips and resets;
//! a policy built for an older ABI minor loads.

use kiln_runtime::policy::{synthetic_rank, synthetic_tune};
use kiln_sandbox::{Sandbox, builtin};
use kiln_tests::{Home, policies_dir};
use std::path::{Path, PathBuf};

fn policy(name: &str) -> Option<PathBuf> {
    policies_dir().map(|d| d.join(format!("{name}.wasm")))
}

/// A WAT ranking policy: `rank_body` returns the packed output; helpers
/// from the sandbox's own tests are not reachable here, so this is small.
fn wat_policy(
    dir: &Path,
    file: &str,
    abi: &str,
    name: &str,
    alloc_body: &str,
    rank_body: &str,
    extra: &str,
) -> PathBuf {
    wat_policy_version(
        dir, file, abi, name, "1.0.0", "", alloc_body, rank_body, extra,
    )
}

#[allow(clippy::too_many_arguments)]
fn wat_policy_version(
    dir: &Path,
    file: &str,
    abi: &str,
    name: &str,
    version: &str,
    limits: &str,
    alloc_body: &str,
    rank_body: &str,
    extra: &str,
) -> PathBuf {
    let text = format!(
        r#"(module
  (@custom "kiln_policy" "{{\"abi\":\"{abi}\",\"kind\":\"rank\",\"name\":\"{name}\",\"version\":\"{version}\"{limits}}}")
  {extra}
  (memory (export "memory") 2)
  (global $top (mut i32) (i32.const 4096))
  (func (export "kiln_alloc") (param $n i32) (result i32) (local $p i32)
    {alloc_body}
    global.get $top local.set $p
    global.get $top local.get $n i32.add global.set $top
    (if (i32.gt_u (global.get $top) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.div_u (global.get $top) (i32.const 65536)) (i32.const 1))))))
    local.get $p)
  (func (export "kiln_rank") (param $ptr i32) (param $len i32) (result i64)
    {rank_body}))"#
    );
    let path = dir.join(file);
    std::fs::write(&path, wat::parse_str(text).unwrap()).unwrap();
    path
}

/// Returns n scores (`bits`, an f32 expression) written at the top of the heap.
fn scores(bits: &str, count_delta: i32) -> String {
    scores_after("", bits, count_delta)
}

/// As [`scores`], running `prelude` first (after the locals).
fn scores_after(prelude: &str, bits: &str, count_delta: i32) -> String {
    format!(
        r#"(local $n i32) (local $i i32) (local $out i32)
    {prelude}
    (local.set $n (i32.add (i32.load (i32.add (local.get $ptr) (i32.const 24))) (i32.const {count_delta})))
    (local.set $out (call 0 (i32.add (i32.const 4) (i32.mul (local.get $n) (i32.const 4)))))
    (i32.store (local.get $out) (local.get $n))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (f32.store (i32.add (i32.add (local.get $out) (i32.const 4)) (i32.mul (local.get $i) (i32.const 4))) ({bits}))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (i32.add (i32.const 4) (i32.mul (local.get $n) (i32.const 4)))))"#
    )
}

fn write_input(home: &Home, name: &str, value: &impl serde::Serialize) -> PathBuf {
    let p = home.path().join(name);
    std::fs::write(&p, serde_json::to_string(value).unwrap()).unwrap();
    p
}

#[test]
fn shipped_policies_pass_the_gate_run_and_replay() {
    let Some(_) = policies_dir() else { return };
    let home = Home::default();
    for name in ["bm25_recency", "jaccard", "proximity", "tpe", "genetic"] {
        let added = home.json(&[
            "policy",
            "add",
            policy(name).unwrap().to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(added["quality"]["passed"], true, "{name}: {added}");
        assert_eq!(added["quality"]["calls"], 15, "{name}");
    }
    let list = home.json(&["policy", "list", "--json"]);
    let active: Vec<(String, String)> = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["state"] == "active")
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_string(),
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // The last added of each kind is the active one.
    assert_eq!(
        active,
        [
            ("rank".to_string(), "proximity".to_string()),
            ("tune".to_string(), "genetic".to_string())
        ]
    );

    let rank_in = write_input(&home, "rank.json", &synthetic_rank(40, 9));
    let tune_in = write_input(&home, "tune.json", &synthetic_tune(12, 4));
    let mut decisions = Vec::new();
    for (name, input) in [
        ("bm25-recency", &rank_in),
        ("jaccard-windows", &rank_in),
        ("proximity", &rank_in),
        ("tpe", &tune_in),
        ("genetic", &tune_in),
    ] {
        let run = home.json(&[
            "policy",
            "run",
            name,
            "--input",
            input.to_str().unwrap(),
            "--json",
        ]);
        assert!(run["run"]["error"].is_null(), "{name}: {run}");
        assert!(run["run"]["fuel_used"].as_u64().unwrap() > 0);
        decisions.push(run["run"]["decision_id"].as_i64().unwrap());
    }
    for id in decisions {
        let r = home.json(&["policy", "replay", &id.to_string(), "--json"]);
        assert_eq!(r["replay"]["identical"], true, "{r}");
    }
    // Tuning proposals respect the bounds of the space.
    let space = synthetic_tune(12, 4);
    let run = home.json(&[
        "policy",
        "run",
        "tpe",
        "--input",
        tune_in.to_str().unwrap(),
        "--json",
    ]);
    for (v, p) in run["run"]["output"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&space.params)
    {
        let v = v.as_f64().unwrap();
        assert!(v >= p.lo && v <= p.hi, "{} = {v}", p.name);
    }
    // Compiled modules are cached on disk.
    assert!(
        std::fs::read_dir(home.path().join("cache/policies"))
            .unwrap()
            .count()
            >= 5 * 2
    );
}

#[test]
fn the_builtin_ranker_equals_the_bm25_recency_policy_bit_for_bit() {
    let Some(path) = policy("bm25_recency") else {
        return;
    };
    let p = Sandbox::new(None)
        .load(&std::fs::read(path).unwrap(), None)
        .unwrap();
    for (n, seed) in [(1, 1), (50, 2), (1000, 3)] {
        let input = synthetic_rank(n, seed);
        let ours = builtin::rank(&input);
        let theirs = p.rank(&input).unwrap().value;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&theirs), "{n} candidates");
    }
}

#[test]
fn hostile_policies_are_contained_and_kiln_keeps_serving() {
    let Some(good) = policy("bm25_recency") else {
        return;
    };
    let home = Home::default();
    home.ok(&["policy", "add", good.to_str().unwrap()]);
    let d = home.path();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            // Little fuel, the longest deadline: fuel, not the clock,
            // stops it however loaded the machine is.
            wat_policy_version(
                d,
                "loop.wasm",
                "1.1",
                "loop",
                "1.0.0",
                r#",\"limits\":{\"fuel\":10000000,\"deadline_ms\":2000}"#,
                "",
                "(loop $l (br $l)) (i64.const 0)",
                "",
            ),
            "ran out of fuel",
        ),
        (
            wat_policy(
                d,
                "grow.wasm",
                "1.1",
                "grow",
                "",
                "(loop $l (drop (memory.grow (i32.const 64))) (br $l)) (i64.const 0)",
                "",
            ),
            "tried to grow its memory past",
        ),
        (
            wat_policy(
                d,
                "deep.wasm",
                "1.1",
                "deep",
                "",
                "(call $deep (i32.const 0)) (i64.const 0)",
                "(func $deep (param i32) (call $deep (i32.add (local.get 0) (i32.const 1))))",
            ),
            "overflowed its stack",
        ),
        (
            wat_policy(
                d,
                "wasi.wasm",
                "1.1",
                "wasi",
                "",
                &scores("f32.const 1", 0),
                r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#,
            ),
            "imports wasi_snapshot_preview1.fd_write",
        ),
        (
            wat_policy(
                d,
                "host.wasm",
                "1.1",
                "host",
                "",
                &scores("f32.const 1", 0),
                r#"(import "kiln" "read_file" (func (param i32) (result i32)))"#,
            ),
            "imports kiln.read_file",
        ),
        (
            wat_policy(d, "v2.wasm", "2.0", "v2", "", &scores("f32.const 1", 0), ""),
            "built for policy ABI 2.0",
        ),
        (
            wat_policy(
                d,
                "wild.wasm",
                "1.1",
                "wild",
                "",
                "(i64.const 0x7fff000000000010)",
                "",
            ),
            "outside the policy's",
        ),
        (
            wat_policy(
                d,
                "nan.wasm",
                "1.1",
                "nan",
                "",
                &scores("f32.const nan", 0),
                "",
            ),
            "not a finite number",
        ),
        (
            wat_policy(
                d,
                "short.wasm",
                "1.1",
                "short",
                "",
                &scores("f32.const 1", -1),
                "",
            ),
            "scores for",
        ),
        (
            wat_policy(
                d,
                "badalloc.wasm",
                "1.1",
                "badalloc",
                "unreachable",
                &scores("f32.const 1", 0),
                "",
            ),
            "in kiln_alloc",
        ),
    ];
    // A 100 MB module, refused before it is parsed.
    let huge = d.join("huge.wasm");
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.resize(100 << 20, 0);
    std::fs::write(&huge, bytes).unwrap();
    let mut cases = cases;
    cases.push((huge, "it was not parsed"));
    let before = home.json(&["policy", "list", "--json"]);
    let rank_in = write_input(&home, "rank.json", &synthetic_rank(10, 1));
    for (file, want) in &cases {
        let err = home.fails(&["policy", "add", file.to_str().unwrap()]);
        assert!(
            err.contains(want),
            "{}: {want:?} not in {err}",
            file.display()
        );
        assert!(!err.contains("panicked"));
        // Nothing was installed, and kiln still serves the good policy.
        assert_eq!(home.json(&["policy", "list", "--json"]), before);
        let run = home.json(&[
            "policy",
            "run",
            "bm25-recency",
            "--input",
            rank_in.to_str().unwrap(),
            "--json",
        ]);
        assert!(run["run"]["error"].is_null());
    }
    // Run directly (not installed): contained too, and the built-in
    // ranker's scores stand in.
    let out = home.kiln(&[
        "policy",
        "run",
        cases[0].0.to_str().unwrap(),
        "--input",
        rank_in.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        run["run"]["error"]
            .as_str()
            .unwrap()
            .contains("ran out of fuel")
    );
    assert_eq!(run["run"]["fallback"].as_array().unwrap().len(), 10);
    // A failed decision replays to the same failure.
    let id = run["run"]["decision_id"].as_i64().unwrap();
    assert_eq!(
        home.json(&["policy", "replay", &id.to_string(), "--json"])["replay"]["identical"],
        true
    );
}

#[test]
fn the_circuit_breaker_trips_after_repeated_failures_and_resets_on_enable() {
    if policies_dir().is_none() {
        return;
    }
    let home = Home::default();
    // Passes the gate (5, 50 and 1000 candidates) but rejects 7.
    let reject_seven = r#"(if (i32.eq (i32.load (i32.add (local.get $ptr) (i32.const 24))) (i32.const 7)) (then (return (i64.const 0))))"#;
    let flaky = wat_policy(
        home.path(),
        "flaky.wasm",
        "1.1",
        "flaky",
        "",
        &scores_after(reject_seven, "f32.const 0.5", 0),
        "",
    );
    home.ok(&["policy", "add", flaky.to_str().unwrap()]);
    let seven = write_input(&home, "seven.json", &synthetic_rank(7, 2));
    for attempt in 1..=3 {
        let out = home.kiln(&[
            "policy",
            "run",
            "flaky",
            "--input",
            seven.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(1));
        let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            run["run"]["tripped"],
            attempt == 3,
            "attempt {attempt}: {run}"
        );
    }
    let err = home.fails(&["policy", "run", "flaky", "--input", seven.to_str().unwrap()]);
    assert!(
        err.contains("disabled by the circuit breaker after 3 consecutive failures"),
        "{err}"
    );
    let log = home.registry().audit_log(100).unwrap();
    assert!(
        log.iter()
            .any(|e| e.action == "trip" && e.actor == "circuit-breaker")
    );
    home.ok(&["policy", "enable", "flaky"]);
    let ok_input = write_input(&home, "five.json", &synthetic_rank(5, 2));
    home.ok(&[
        "policy",
        "run",
        "flaky",
        "--input",
        ok_input.to_str().unwrap(),
    ]);
}

#[test]
fn an_older_minor_loads_and_versions_roll_back() {
    if policies_dir().is_none() {
        return;
    }
    let home = Home::default();
    let old = wat_policy(
        home.path(),
        "old.wasm",
        "1.0",
        "steady",
        "",
        &scores("f32.const 1", 0),
        "",
    );
    let added = home.json(&["policy", "add", old.to_str().unwrap(), "--json"]);
    assert_eq!(added["policy"]["abi"], "1.0");
    // The same version again is refused, with what to do instead.
    let again = home.fails(&["policy", "add", old.to_str().unwrap()]);
    assert!(
        again.contains(
            "steady@1.0.0 is already installed (same sha256); use `kiln policy enable steady@1.0.0`"
        ),
        "{again}"
    );
    // Version 1.1.0 of the same policy, built for ABI 1.1.
    let v2 = wat_policy_version(
        home.path(),
        "v2.wasm",
        "1.1",
        "steady",
        "1.1.0",
        "",
        "",
        &scores("f32.const 2", 0),
        "",
    );
    home.ok(&["policy", "add", v2.to_str().unwrap()]);
    let rank_in = write_input(&home, "rank.json", &synthetic_rank(3, 1));
    let run = |home: &Home| {
        home.json(&[
            "policy",
            "run",
            "steady",
            "--input",
            rank_in.to_str().unwrap(),
            "--json",
        ])["run"]["output"]
            .clone()
    };
    assert_eq!(run(&home), serde_json::json!([2.0, 2.0, 2.0]));
    assert!(
        home.ok(&["policy", "rollback", "steady"])
            .contains("1.1.0 -> 1.0.0")
    );
    assert_eq!(run(&home), serde_json::json!([1.0, 1.0, 1.0]));
    // A module that rejects every input fails the gate and installs nothing.
    let rejecting = wat_policy(
        home.path(),
        "reject.wasm",
        "1.1",
        "reject",
        "",
        "(i64.const 0)",
        "",
    );
    let err = home.fails(&["policy", "add", rejecting.to_str().unwrap()]);
    assert!(err.contains("returned no output"), "{err}");
    assert_eq!(
        home.json(&["policy", "list", "--json"])["policies"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn the_quality_gate_reads_recorded_cases_and_refuses_what_fails_them() {
    let Some(good) = policy("bm25_recency") else {
        return;
    };
    let cases = kiln_tests::repo_root().join("plugins/policies/cases");
    let rank_cases = cases.join("rank");
    let home = Home::default();
    // The shipped cases: 3 synthetic + 2 recorded, 5 repeats each.
    let r = home.json(&[
        "policy",
        "test",
        good.to_str().unwrap(),
        "--cases",
        rank_cases.to_str().unwrap(),
        "--json",
    ]);
    let report = &r["report"];
    assert_eq!(report["passed"], true, "{r}");
    assert_eq!(report["cases"], 5);
    assert_eq!(report["calls"], 25);
    assert_eq!(report["agreement_with_builtin"], 1.0);
    assert!(report["fuel_max"].as_u64().unwrap() > 0);
    let (p50, p99) = (
        report["p50_ms"].as_f64().unwrap(),
        report["p99_ms"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99, "{report}");
    let tune = home.json(&[
        "policy",
        "test",
        policy("tpe").unwrap().to_str().unwrap(),
        "--cases",
        cases.join("tune").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(tune["report"]["passed"], true, "{tune}");
    assert!(tune["report"]["agreement_with_builtin"].is_null());

    // A ranker that puts the last candidate first misses the recorded top
    // picks: `test` reports it, `add` refuses it and installs nothing.
    let backwards = wat_policy(
        home.path(),
        "backwards.wasm",
        "1.1",
        "backwards",
        "",
        &scores("f32.convert_i32_u (local.get $i)", 0),
        "",
    );
    let out = home.kiln(&[
        "policy",
        "test",
        backwards.to_str().unwrap(),
        "--cases",
        rank_cases.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAIL rust-cache-eviction: expected top [1], got [5]"),
        "{stdout}"
    );
    let err = home.fails(&[
        "policy",
        "add",
        backwards.to_str().unwrap(),
        "--cases",
        rank_cases.to_str().unwrap(),
    ]);
    assert!(
        err.contains("backwards@1.0.0: failed the quality gate") && err.contains("expected top"),
        "{err}"
    );
    // A latency ceiling no policy can meet refuses even a good policy.
    let err = home.fails(&[
        "policy",
        "add",
        good.to_str().unwrap(),
        "--max-p99-ms",
        "0.000001",
    ]);
    assert!(err.contains("exceeds the ceiling of 0.000001 ms"), "{err}");
    let listed = home.json(&["policy", "list", "--json"]);
    assert_eq!(listed["policies"].as_array().unwrap().len(), 0, "{listed}");
    // A broken case file is named, with what is wrong.
    let broken = home.path().join("broken-cases");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("half.json"), "{\"input\": {\"cursor\": ").unwrap();
    let err = home.fails(&[
        "policy",
        "test",
        good.to_str().unwrap(),
        "--cases",
        broken.to_str().unwrap(),
    ]);
    assert!(err.contains("half.json: not JSON"), "{err}");
}

#[test]
fn the_sdk_examples_are_the_documented_ones_and_rust_equals_c() {
    let Some(rust) = policy("fresh_first") else {
        return;
    };
    let c = policy("fresh_first_c").unwrap();
    let root = kiln_tests::repo_root().join("plugins/policies");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for file in [
        "examples/fresh_first.rs",
        "examples/fresh_first.c",
        "examples/near.rs",
    ] {
        let source = std::fs::read_to_string(root.join(file)).unwrap();
        assert!(
            readme.contains(&source),
            "plugins/policies/README.md must show {file} verbatim"
        );
    }
    let home = Home::default();
    for p in [&rust, &c] {
        let r = home.json(&[
            "policy",
            "test",
            p.to_str().unwrap(),
            "--cases",
            root.join("cases/rank").to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(r["report"]["passed"], true, "{r}");
    }
    let sandbox = Sandbox::new(None);
    let rust = sandbox.load(&std::fs::read(rust).unwrap(), None).unwrap();
    let c = sandbox.load(&std::fs::read(c).unwrap(), None).unwrap();
    let input = synthetic_rank(500, 11);
    let (a, b) = (
        rust.rank(&input).unwrap().value,
        c.rank(&input).unwrap().value,
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a), bits(&b));

    // The parameter example: declared, and its value from config.toml
    // changes what it scores.
    let near = std::sync::Arc::new(
        sandbox
            .load(&std::fs::read(policy("near").unwrap()).unwrap(), None)
            .unwrap(),
    );
    assert_eq!(near.meta.params[0].name, "reach");
    use kiln_sandbox::breaker::Ranker;
    let tables = [("near".to_string(), [("reach".to_string(), 300.0)].into())].into();
    let (far, problems) = Ranker::new(Some(near.clone()), 3).with_params(&tables);
    assert!(problems.is_empty(), "{problems:?}");
    let ours = far.rank(&input);
    assert_eq!(ours.source, kiln_sandbox::breaker::Source::Policy);
    assert_ne!(
        bits(&ours.scores),
        bits(&Ranker::new(Some(near), 3).rank(&input).scores)
    );
}

/// The server's status once it logged a ranking decision, and that
/// decision's id (within 30 s).
fn first_decision(c: &mut kiln_serve::demo::Client) -> (serde_json::Value, i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = kiln_tests::serve::status(c);
        if let Some(id) = s["policy"]["decisions"]["last_decision_id"].as_i64() {
            return (s, id);
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A workspace of two Python files, each defining a function
/// `complete_on_line` uses, and the URI of a third, `main.py`.
fn shapes_workspace() -> (tempfile::TempDir, String) {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(
        ws.path().join("shapes.py"),
        "def circle_area(radius):\n    return 3.14159 * radius * radius\n",
    )
    .unwrap();
    std::fs::write(
        ws.path().join("sizes.py"),
        "def square_area(side):\n    return side * side\n",
    )
    .unwrap();
    let uri = format!("file://{}/main.py", ws.path().display());
    (ws, uri)
}

/// A language-server session on `home`, with `--metrics` on loopback, its
/// workspace `ws` indexed.
fn serving(home: &Home, ws: &Path, files: usize) -> kiln_serve::demo::Client {
    use kiln_tests::serve::{initialize, serve, status, watchdog};
    let mut c = serve(home, &["--metrics", "127.0.0.1:0"]);
    watchdog(c.pid(), std::time::Duration::from_secs(300));
    initialize(&mut c, ws, serde_json::json!({"maxTokens": 2}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while status(&mut c)["workspace"]["files"] != serde_json::json!(files) {
        assert!(
            std::time::Instant::now() < deadline,
            "workspace never indexed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    c
}

/// Completes at the end of line `line` of a document that asks for both
/// workspace files, so the ranking policy gets exactly two candidates.
fn complete_on_line(c: &mut kiln_serve::demo::Client, uri: &str, line: u32) -> serde_json::Value {
    let text: String = (0..=line)
        .map(|i| format!("v{i} = circle_area(2) + square_area(3)\n"))
        .collect();
    c.notify(
        "textDocument/didChange",
        serde_json::json!({"textDocument": {"uri": uri}, "contentChanges": [{"text": text}]}),
    )
    .unwrap();
    let r = c
        .request(
            "textDocument/inlineCompletion",
            kiln_tests::serve::at(uri, line, 36),
        )
        .unwrap();
    assert!(r["result"]["items"].is_array(), "{r}");
    r
}

fn http_get(addr: &str, path: &str) -> String {
    kiln_tests::serve::http(addr, "GET", path, b"").1
}

#[test]
fn served_decisions_replay_and_a_trap_while_serving_disables_the_policy_for_good() {
    use kiln_tests::serve::{open, status};
    let Some(_) = policies_dir() else { return };
    let home = Home::default();
    let (ws, uri) = shapes_workspace();

    // A served decision of a well-behaved policy replays bit for bit, from
    // a log encrypted at rest (the decision holds the workspace's code).
    home.ok(&["store", "encrypt"]);
    home.ok(&[
        "policy",
        "add",
        policy("jaccard").unwrap().to_str().unwrap(),
    ]);
    let mut c = serving(&home, ws.path(), 2);
    open(&mut c, &uri, "");
    complete_on_line(&mut c, &uri, 0);
    let (s, id) = first_decision(&mut c);
    assert_eq!(s["policy"]["active"], "jaccard-windows@1.1.0", "{s}");
    // The fuel it burned is counted (the dashboard's fuel per call).
    let s = status(&mut c);
    let metrics = http_get(s["metrics_address"].as_str().unwrap(), "/metrics");
    let fuel: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"kiln:policy_fuel_total{policy="jaccard-windows@1.1.0"} "#))
        .unwrap_or_else(|| panic!("no fuel counted: {metrics}"))
        .parse()
        .unwrap();
    assert!(fuel > 0.0, "{metrics}");
    let log = home.json(&["policy", "log", "--json"]);
    assert_eq!(log["decisions"][0]["id"], id, "{log}");
    assert_eq!(
        log["decisions"][0]["error"],
        serde_json::Value::Null,
        "{log}"
    );
    let replay = home.json(&["policy", "replay", &id.to_string(), "--json"]);
    assert_eq!(replay["replay"]["identical"], true, "{replay}");
    let logged = home.registry().decision(id).unwrap().unwrap();
    assert!(logged.encrypted && logged.input.starts_with(b"age-encryption.org/v1\n"));
    assert!(!String::from_utf8_lossy(&logged.input).contains("circle_area"));
    assert!(c.close().unwrap().success());

    // A policy that passes the gate (5, 50 and 1,000 candidates) but traps
    // on four (what the completions below rank: the workspace's two
    // definitions, each as its signature and as its body): three
    // completions on new lines trip its breaker.
    let trap_on_two = r#"(if (i32.eq (i32.load (i32.add (local.get $ptr) (i32.const 24))) (i32.const 4)) (then unreachable))"#;
    let trap = wat_policy(
        home.path(),
        "trap.wasm",
        "1.1",
        "trap-on-two",
        "",
        &scores_after(trap_on_two, "f32.const 0.5", 0),
        "",
    );
    home.ok(&["policy", "add", trap.to_str().unwrap()]);
    let mut c = serving(&home, ws.path(), 2);
    open(&mut c, &uri, "");
    for line in 0..3 {
        complete_on_line(&mut c, &uri, line);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let s = loop {
        let s = status(&mut c);
        if s["policy"]["decisions"]["trips"] == 1 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(s["policy"]["breaker_open"], true, "{s}");
    assert!(
        s["policy"]["last_error"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{s}"
    );
    // Completions go on, ranked by the built-in ranker.
    complete_on_line(&mut c, &uri, 3);
    let metrics = http_get(s["metrics_address"].as_str().unwrap(), "/metrics");
    assert!(
        metrics
            .contains(r#"kiln:policy_calls_total{policy="trap-on-two@1.0.0",outcome="error"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"kiln:policy_breaker_trips_total{policy="trap-on-two@1.0.0"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"kiln:policy_breaker_open{policy="trap-on-two@1.0.0"} 1"#));
    assert!(c.close().unwrap().success());

    // After a restart the registry still holds the trip.
    let list = home.json(&["policy", "list", "--json"]);
    let trap_rec = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "trap-on-two")
        .unwrap()
        .clone();
    assert_eq!(trap_rec["state"], "disabled", "{list}");
    assert!(
        home.registry()
            .audit_log(100)
            .unwrap()
            .iter()
            .any(|e| e.action == "trip" && e.subject == "trap-on-two")
    );
    let mut c = serving(&home, ws.path(), 2);
    let s = status(&mut c);
    assert_eq!(s["policy"]["active"], serde_json::Value::Null, "{s}");
    assert_eq!(
        s["policy"]["disabled_by_breaker"][0]["policy"], "trap-on-two@1.0.0",
        "{s}"
    );
    assert!(c.close().unwrap().success());
}

/// `kiln policy new`: a Rust and a C ranking policy that build with their
/// own build.sh (the toolchains the shipped policies use) and pass
/// `kiln policy test` with the cases they come with, as generated; bad
/// names, languages and places are refused.
#[test]
fn a_scaffolded_policy_builds_and_passes_its_test_as_generated() {
    if kiln_tests::policies_dir().is_none() {
        return;
    }
    let home = Home::default();
    for lang in ["rust", "c"] {
        let name = format!("starter-{lang}");
        let dir = home.path().join(&name);
        let made = home.json(&[
            "policy",
            "new",
            &name,
            "--lang",
            lang,
            "--dir",
            dir.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(made["policy"], name.as_str(), "{made:#}");
        let build = std::process::Command::new(dir.join("build.sh"))
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "{lang}: {}",
            String::from_utf8_lossy(&build.stderr)
        );
        let wasm = dir.join(format!("{name}.wasm"));
        let test = home.json(&[
            "policy",
            "test",
            wasm.to_str().unwrap(),
            "--cases",
            dir.join("cases").to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(test["report"]["passed"], true, "{lang}: {test:#}");
        assert_eq!(test["policy"], format!("{name}@0.1.0"), "{test:#}");
        // It starts as the built-in ranker.
        assert_eq!(test["report"]["agreement_with_builtin"], 1.0, "{test:#}");
        let err = home.fails(&["policy", "new", &name, "--dir", dir.to_str().unwrap()]);
        assert!(err.contains("is not empty"), "{err}");
    }
    let err = home.fails(&["policy", "new", "Not_A_Name"]);
    assert!(err.contains("lowercase letters"), "{err}");
    let err = home.fails(&["policy", "new", "ok-name", "--lang", "go"]);
    assert!(err.contains("choose rust or c"), "{err}");
}

/// `kiln store gc` collects policy modules nothing names, and spares the
/// installed ones, the ones logged decisions were made with (`kiln policy
/// replay` needs them) and any stored within the hour (a run logs its
/// decisions after storing its module).
#[test]
fn store_gc_collects_policy_modules_nothing_names_and_spares_the_rest() {
    let (Some(installed), Some(run_only)) = (policy("jaccard"), policy("proximity")) else {
        return;
    };
    let home = Home::default();
    home.ok(&["policy", "add", installed.to_str().unwrap()]);
    let rank_in = write_input(&home, "rank.json", &synthetic_rank(20, 3));
    let run = home.json(&[
        "policy",
        "run",
        run_only.to_str().unwrap(),
        "--input",
        rank_in.to_str().unwrap(),
        "--json",
    ]);
    let decision = run["run"]["decision_id"].as_i64().unwrap();
    let blobs = home.path().join("policies").join("blobs");
    let age = |p: &Path| {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
            .unwrap()
    };
    for entry in std::fs::read_dir(&blobs).unwrap() {
        age(&entry.unwrap().path());
    }
    let old = blobs.join(format!("sha256-{}.wasm", "1".repeat(64)));
    std::fs::write(&old, b"\0asm left by a run two hours ago").unwrap();
    age(&old);
    let young = blobs.join(format!("sha256-{}.wasm", "2".repeat(64)));
    std::fs::write(&young, b"\0asm stored a moment ago").unwrap();
    let gc = |args: &[&str]| home.json(&[&["store", "gc", "--json"], args].concat());
    let dry = gc(&["--dry-run"]);
    let files: Vec<&str> = (dry["files"].as_array().unwrap().iter())
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec![old.to_str().unwrap()], "{dry}");
    gc(&[]);
    assert!(!old.exists() && young.exists());
    let r = home.json(&["policy", "replay", &decision.to_string(), "--json"]);
    assert_eq!(r["replay"]["identical"], true, "{r}");
    let run = home.json(&[
        "policy",
        "run",
        "jaccard-windows",
        "--input",
        rank_in.to_str().unwrap(),
        "--json",
    ]);
    assert!(run["run"]["error"].is_null(), "{run}");
}

/// ABI 1.4's declared parameters: the shipped `bm25-recency` declares the
/// built-in formula's weights (the same list the built-in ranker has), and
/// with any values `config.toml` gives them the policy still equals the
/// built-in ranker bit for bit; the C `proximity` reads its own; values
/// that cannot be used keep their defaults and are named.
#[test]
fn declared_parameters_reach_the_policy_and_the_builtin_ranker() {
    use kiln_sandbox::breaker::{ParamTables, Ranker};
    let Some(_) = policies_dir() else { return };
    let sandbox = Sandbox::new(None);
    let load = |name: &str| {
        std::sync::Arc::new(
            sandbox
                .load(&std::fs::read(policy(name).unwrap()).unwrap(), None)
                .unwrap(),
        )
    };
    let bm25 = load("bm25_recency");
    assert_eq!(bm25.meta.abi, (1, 4));
    assert_eq!(bm25.meta.name, builtin::NAME);
    assert_eq!(
        bm25.meta.params,
        builtin::params(),
        "the policy declares the formula's own list"
    );
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut rng = fastrand::Rng::with_seed(5);
    for round in 0..20 {
        let mut set = std::collections::BTreeMap::new();
        for d in builtin::params() {
            let v = d.min + rng.f64() * (d.max - d.min);
            set.insert(d.name, (v * 100.0).round() / 100.0);
        }
        let tables: ParamTables = [(builtin::NAME.to_string(), set)].into();
        let (policy, problems) = Ranker::new(Some(bm25.clone()), 3).with_params(&tables);
        assert!(problems.is_empty(), "{problems:?}");
        let (fallback, _) = Ranker::new(None, 3).with_params(&tables);
        let input = synthetic_rank(200, round);
        let ours = policy.rank(&input);
        assert_eq!(ours.source, kiln_sandbox::breaker::Source::Policy);
        let theirs = fallback.rank(&input);
        assert_eq!(bits(&ours.scores), bits(&theirs.scores), "round {round}");
        // The values are in the input the policy got (and replays).
        let call = ours.call.unwrap();
        assert_eq!(call.input, input.encode_with(policy.params()));
        assert_ne!(
            bits(&ours.scores),
            bits(&builtin::rank(&input)),
            "round {round}: other weights, other scores"
        );
    }

    // proximity (C): its `reach` and `definition` change its scores.
    let proximity = load("proximity");
    let names: Vec<&str> = (proximity.meta.params.iter())
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(names, ["definition", "reach"]);
    let input = synthetic_rank(300, 9);
    let defaults = Ranker::new(Some(proximity.clone()), 3).rank(&input).scores;
    let tables: ParamTables = [(
        "proximity".to_string(),
        [
            ("reach".to_string(), 400.0),
            ("definition".to_string(), 0.0),
        ]
        .into(),
    )]
    .into();
    let (tuned, problems) = Ranker::new(Some(proximity.clone()), 3).with_params(&tables);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(tuned.params(), [0.0, 400.0]);
    let tuned_scores = tuned.rank(&input);
    assert_eq!(tuned_scores.source, kiln_sandbox::breaker::Source::Policy);
    assert_ne!(bits(&tuned_scores.scores), bits(&defaults));

    // Out of range, not a whole parameter, or not declared: the default,
    // and a line naming the table, the key and the range.
    let tables: ParamTables = [
        (
            "proximity".to_string(),
            [("reach".to_string(), 0.5), ("wobble".to_string(), 1.0)].into(),
        ),
        (
            builtin::NAME.to_string(),
            [("definition".to_string(), 500.0)].into(),
        ),
    ]
    .into();
    let (r, problems) = Ranker::new(Some(proximity), 3).with_params(&tables);
    assert_eq!(r.params(), [8.0, 20.0]);
    assert_eq!(r.weights(), &builtin::Weights::defaults());
    let all = problems.join("\n");
    assert_eq!(problems.len(), 3, "{all}");
    assert!(
        all.contains(
            "[policies.params.proximity] reach = 0.5: give 1 to 2000; its default 20 is used"
        ),
        "{all}"
    );
    assert!(
        all.contains("[policies.params.proximity] wobble: not a parameter it declares (give some of definition, reach)"),
        "{all}"
    );
    assert!(
        all.contains("[policies.params.bm25-recency] definition = 500: give 0 to 128"),
        "{all}"
    );
}

/// Served: `[policies.params.NAME]` in config.toml reaches the active
/// policy (the language server's status shows the values in force), the
/// decision log keeps them in the input, and the decision replays.
#[test]
fn configured_parameters_are_served_logged_and_replayed() {
    use kiln_tests::serve::{open, status};
    let Some(_) = policies_dir() else { return };
    let home = Home::default();
    std::fs::write(
        home.path().join("config.toml"),
        "[policies.params.proximity]\nreach = 120\ndefinition = 3.5\n",
    )
    .unwrap();
    let (ws, uri) = shapes_workspace();
    home.ok(&[
        "policy",
        "add",
        policy("proximity").unwrap().to_str().unwrap(),
    ]);
    let mut c = serving(&home, ws.path(), 2);
    open(&mut c, &uri, "");
    complete_on_line(&mut c, &uri, 0);
    let (s, id) = first_decision(&mut c);
    assert_eq!(s["policy"]["active"], "proximity@1.2.0", "{s}");
    assert_eq!(
        s["policy"]["params"],
        serde_json::json!({"definition": 3.5, "reach": 120.0}),
        "{s}"
    );
    // Edited while serving: `kiln/reloadConfig` applies it; a broken file
    // is refused and the values in use stay; SIGHUP reloads too.
    let config = home.path().join("config.toml");
    std::fs::write(
        &config,
        "[policies.params.proximity]
reach = 300
",
    )
    .unwrap();
    let r = c
        .request("kiln/reloadConfig", serde_json::json!({}))
        .unwrap();
    assert_eq!(
        r["result"]["ranking"]["params"],
        serde_json::json!({"definition": 8.0, "reach": 300.0}),
        "{r}"
    );
    std::fs::write(
        &config,
        "[policies.params.proximity]
reach = \"far\"\n",
    )
    .unwrap();
    let r = c
        .request("kiln/reloadConfig", serde_json::json!({}))
        .unwrap();
    let e = r["error"]["message"].as_str().unwrap_or_default();
    assert!(e.contains("config.toml") && e.contains("stays"), "{r}");
    assert_eq!(status(&mut c)["policy"]["params"]["reach"], 300.0);
    std::fs::write(
        &config,
        "[policies.params.proximity]
reach = 50
",
    )
    .unwrap();
    // SAFETY: kill(2) with the pid of the server this test started.
    unsafe { libc::kill(c.pid() as i32, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while status(&mut c)["policy"]["params"]["reach"] != 50.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(c.close().unwrap().success());
    let logged = home.registry().decision(id).unwrap().unwrap();
    let input = &logged.input;
    let u32_at = |at: usize| u32::from_le_bytes(input[at..at + 4].try_into().unwrap()) as usize;
    let f64_at = |at: usize| f64::from_le_bytes(input[at..at + 8].try_into().unwrap());
    assert_eq!((u32_at(8), u32_at(36)), (40, 2));
    assert_eq!((f64_at(u32_at(32)), f64_at(u32_at(32) + 8)), (3.5, 120.0));
    let replay = home.json(&["policy", "replay", &id.to_string(), "--json"]);
    assert_eq!(replay["replay"]["identical"], true, "{replay}");
}
