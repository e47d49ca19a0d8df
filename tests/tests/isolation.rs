//! A vendor's crash never takes kiln down: plugins run in a supervised
//! worker process (`host/runtime/src/backend/worker.rs`). The C fixture
//! built with `FIXTURE_FAULTS` segfaults, hangs, leaks memory until it is
//! killed, fills its outputs with NaN, or aborts in its init, as
//! `KILN_FIXTURE_FAULT` says; with each, a running `kiln serve` keeps
//! answering with the CPU's text, the crash is counted in `/metrics` and
//! recorded in the registry, and repeated crashes quarantine the plugin.

use kiln_tests::serve::{
    completions_then_metrics, demo_model, http, http_server_env, http_server_with, metric,
};
use kiln_tests::{Home, ManifestSpec, c_fixture, plugin_dir, rust_cdylib};
use std::time::{Duration, Instant};

const PROMPTS: [&str; 3] = ["def add(a, b):", "fn main() {", "class Stack:"];

/// The faulty C fixture added as `accel` (conformance passes: no fault is
/// set while it is added) and its device scored (so that a server's
/// first graphs on it are a completion's), with a 2 s watchdog and 1 GiB
/// per worker (the score's weights are about 300 MiB of it).
fn faulty_accel() -> Home {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_faults", &["-DFIXTURE_FAULTS"]);
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("accel", "1.0.0"));
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    std::fs::write(
        home.path().join("config.toml"),
        "[plugins]\ncall_timeout_seconds = 2\nworker_memory_mb = 1024\n",
    )
    .unwrap();
    home.ok(&["backends"]);
    home
}

fn cpu_texts(home: &Home) -> Vec<String> {
    let srv = http_server_with(home, &demo_model(), &["--backend", "cpu"]);
    completions_then_metrics(&srv, &PROMPTS).0
}

const CRASHES: &str = "kiln:plugin_worker_crashes_total{plugin=\"accel\"}";

#[test]
fn each_fault_of_a_plugin_leaves_kiln_serve_answering_with_the_cpus_text() {
    let home = faulty_accel();
    let cpu = cpu_texts(&home);
    for fault in ["segv", "hang", "leak", "corrupt"] {
        let srv = http_server_env(
            &home,
            &demo_model(),
            &["--backend", "accel"],
            &[("KILN_FIXTURE_FAULT", fault)],
        );
        let (texts, metrics) = completions_then_metrics(&srv, &PROMPTS);
        assert_eq!(texts, cpu, "{fault}");
        assert!(metric(&metrics, CRASHES) >= 1, "{fault}: {metrics}");
        let (code, _) = http(&srv.addr, "GET", "/healthz", b"");
        assert_eq!(code, 200, "{fault}");
        let crashes = home.json(&["plugins", "list", "--json"])["plugins"][0]["crashes"].clone();
        let cause = crashes[0]["cause"].as_str().unwrap_or_default().to_string();
        let expected = match fault {
            "segv" => "signal 11 (SIGSEGV)",
            "hang" => "no answer to graph_compute in 2.0 s",
            "leak" => "over its 1.0 GiB limit",
            _ => "non-finite logits",
        };
        assert!(cause.contains(expected), "{fault}: {crashes:#}");
    }
}

#[test]
fn a_plugin_that_aborts_in_its_init_is_left_out_and_the_cpu_serves() {
    let home = faulty_accel();
    let cpu = cpu_texts(&home);
    let srv = http_server_env(
        &home,
        &demo_model(),
        &[],
        &[("KILN_FIXTURE_FAULT", "abort-init")],
    );
    let (texts, _) = completions_then_metrics(&srv, &PROMPTS);
    assert_eq!(texts, cpu);
    let crashes = home.json(&["plugins", "list", "--json"])["plugins"][0]["crashes"].clone();
    assert_eq!(crashes[0]["during"], "kiln_backend_init", "{crashes:#}");
    assert!(
        crashes[0]["cause"]
            .as_str()
            .unwrap()
            .contains("signal 6 (SIGABRT)"),
        "{crashes:#}"
    );
}

/// A plugin that crashes at every graph is restarted with a backoff and
/// quarantined at its third crash: the registry, the audit log, `kiln
/// doctor`, `/metrics` and the next `kiln serve` know; `kiln plugins
/// release` lifts it.
#[test]
fn repeated_crashes_quarantine_a_plugin_until_it_is_released() {
    let home = faulty_accel();
    let cpu = cpu_texts(&home);
    let srv = http_server_env(
        &home,
        &demo_model(),
        &["--backend", "accel"],
        &[("KILN_FIXTURE_FAULT", "segv")],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (texts, metrics) = completions_then_metrics(&srv, &PROMPTS);
        assert_eq!(texts, cpu);
        if metrics.contains("kiln:plugin_quarantined{plugin=\"accel\"} 1") {
            break metrics;
        }
        assert!(Instant::now() < deadline, "not quarantined: {metrics}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(metric(&metrics, CRASHES), 3, "{metrics}");
    assert!(
        metric(
            &metrics,
            "kiln:plugin_worker_restarts_total{plugin=\"accel\"}"
        ) >= 2
    );
    drop(srv);

    let listed = home.json(&["plugins", "list", "--json"]);
    assert!(
        listed["plugins"][0]["quarantined_at"].is_string(),
        "{listed:#}"
    );
    let log = home.ok(&["plugins", "log"]);
    assert!(log.contains("quarantine"), "{log}");
    let doctor = home.kiln(&["doctor"]);
    let report = String::from_utf8_lossy(&doctor.stdout).to_string()
        + &String::from_utf8_lossy(&doctor.stderr);
    assert!(!doctor.status.success(), "{report}");
    assert!(
        report.contains("quarantined") && report.contains("kiln plugins release accel"),
        "{report}"
    );
    // The next server leaves it out (with the reason) and serves on the CPU.
    let srv = http_server_with(&home, &demo_model(), &[]);
    assert_eq!(completions_then_metrics(&srv, &PROMPTS).0, cpu);
    drop(srv);

    let released = home.ok(&["plugins", "release", "accel"]);
    assert!(released.contains("released accel@1.0.0"), "{released}");
    let listed = home.json(&["plugins", "list", "--json"]);
    assert!(listed["plugins"][0]["quarantined_at"].is_null());
    assert!(
        home.fails(&["plugins", "release", "accel"])
            .contains("not quarantined")
    );
}

/// A worker that crashed is replaced after its backoff and the device is
/// used again: the flaky-device fixture (kiln's own CPU kernels behind
/// device buffers, so its tokens are the CPU's) segfaults at its third
/// model-sized graph in every process it runs in.
#[test]
fn a_restarted_worker_takes_the_work_back() {
    let home = Home::default();
    let lib = rust_cdylib("kiln-fixture-flaky-device", "kiln_fixture_flaky_device");
    let dir = plugin_dir(
        home.path(),
        &lib,
        &ManifestSpec::new("flaky-device", "0.1.0"),
    );
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    let cpu = cpu_texts(&home);
    let srv = http_server_env(
        &home,
        &demo_model(),
        &["--backend", "flaky-device:0"],
        &[("KILN_FIXTURE_CRASH_AT", "3")],
    );
    let ops = "kiln:backend_ops_total{backend=\"flaky-device\"}";
    let restarts = "kiln:plugin_worker_restarts_total{plugin=\"flaky-device\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before = None;
    loop {
        let (texts, metrics) = completions_then_metrics(&srv, &PROMPTS);
        assert_eq!(texts, cpu);
        let (ran, restarted) = (metric(&metrics, ops), metric(&metrics, restarts));
        match before {
            None if restarted >= 1 => before = Some(ran),
            Some(b) if ran > b => break,
            _ => {}
        }
        assert!(Instant::now() < deadline, "no restart used: {metrics}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `[plugins.isolation]` runs a trusted plugin in kiln's process; every
/// other runs in a worker, which dies with kiln.
#[test]
fn isolation_is_per_plugin_and_a_worker_dies_with_kiln() {
    let home = faulty_accel();
    let doctor = home.json(&["doctor", "--json"]);
    let accel = |d: &serde_json::Value| {
        d["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "accel")
            .cloned()
            .unwrap()
    };
    assert_eq!(accel(&doctor)["isolation"], "process", "{doctor:#}");
    assert!(accel(&doctor)["worker_pid"].is_u64(), "{doctor:#}");

    // A server's worker is its child and goes when kiln is killed, even
    // while it is stuck in a plugin's call (no watchdog for 10 minutes).
    std::fs::write(
        home.path().join("config.toml"),
        "[plugins]\ncall_timeout_seconds = 600\n",
    )
    .unwrap();
    let mut srv = http_server_env(
        &home,
        &demo_model(),
        &["--backend", "accel"],
        &[("KILN_FIXTURE_FAULT", "hang")],
    );
    let addr = srv.addr.clone();
    std::thread::spawn(move || {
        let body = br#"{"model": "demo", "prompt": "def f(", "max_tokens": 4}"#;
        http(&addr, "POST", "/v1/completions", body)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let kiln = srv.child.id();
    // Children are listed by the thread that started them.
    let children: String = std::fs::read_dir(format!("/proc/{kiln}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .collect::<Vec<_>>()
        .join(" ");
    let worker: u32 = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("plugin-worker"))
        })
        .expect("kiln serve runs the plugin in a worker process");
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{worker}")).exists()
        && std::fs::read_to_string(format!("/proc/{worker}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(Instant::now() < deadline, "worker {worker} outlived kiln");
        std::thread::sleep(Duration::from_millis(50));
    }

    std::fs::write(
        home.path().join("config.toml"),
        "[plugins.isolation]\naccel = \"in-process\"\n",
    )
    .unwrap();
    let doctor = home.json(&["doctor", "--json"]);
    assert_eq!(accel(&doctor)["isolation"], "in-process", "{doctor:#}");
    assert!(accel(&doctor)["worker_pid"].is_null());
    let listed = home.json(&["plugins", "list", "--json"]);
    assert_eq!(listed["plugins"][0]["isolation"], "in-process");

    // The same sign-off from the command line, recorded and undone.
    std::fs::remove_file(home.path().join("config.toml")).unwrap();
    let out = home.ok(&["plugins", "trust", "accel"]);
    assert!(
        out.contains("a crash in it is now a crash of kiln"),
        "{out}"
    );
    assert_eq!(
        accel(&home.json(&["doctor", "--json"]))["isolation"],
        "in-process"
    );
    home.ok(&["plugins", "isolate", "accel"]);
    assert_eq!(
        accel(&home.json(&["doctor", "--json"]))["isolation"],
        "process"
    );
    home.ok(&["tune", "rollback"]);
    assert_eq!(
        accel(&home.json(&["doctor", "--json"]))["isolation"],
        "in-process"
    );
    let err = home.fails(&["plugins", "trust", "nope"]);
    assert!(err.contains("no installed plugin named nope"), "{err}");
    // `KILN_CONFIG` names the file every reader takes, plugin loading too.
    home.ok(&["plugins", "isolate", "accel"]);
    let other = home.path().join("other.toml");
    std::fs::write(&other, "[plugins.isolation]\naccel = \"in-process\"\n").unwrap();
    let out = home
        .command(&["doctor", "--json"])
        .env("KILN_CONFIG", &other)
        .output()
        .unwrap();
    let doctor: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(accel(&doctor)["isolation"], "in-process", "{doctor:#}");

    std::fs::write(
        home.path().join("config.toml"),
        "[plugins]\ncall_timeout_seconds = -1\n",
    )
    .unwrap();
    let out = home.kiln(&["doctor"]);
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("call_timeout_seconds = -1"), "{report}");
}

/// The worker's protocol where it differs from a call in-process: a
/// posted write that fails condemns the worker (the host went on as if it
/// had succeeded), and a buffer from a worker that died is refused by the
/// next one instead of reaching the plugin.
#[test]
fn a_failed_posted_write_condemns_the_worker_and_old_buffers_are_refused() {
    use kiln_runtime::backend::worker::{Limits, Worker};
    use std::sync::{Arc, Mutex};
    let lib = c_fixture("kiln_fixture_faults", &["-DFIXTURE_FAULTS"]);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let hook = {
        let seen = seen.clone();
        Arc::new(move |c: &kiln_runtime::backend::worker::Crash| {
            seen.lock()
                .unwrap()
                .push(format!("{}: {}", c.during, c.cause))
        })
    };
    let w = Worker::start("accel", &lib, Limits::default(), Some(hook)).unwrap();
    assert_eq!(w.generation(), 1);
    let b = w.buffer_alloc(0, 64).unwrap();
    w.buffer_write(b, 0, &[7u8; 64]).unwrap();
    let mut back = [0u8; 64];
    w.buffer_read(b, 0, &mut back).unwrap();
    assert_eq!(back, [7u8; 64]);
    // Out of the buffer's range: the fixture refuses it, but the host
    // did not wait for the answer.
    w.buffer_write(b, 1000, &[1u8; 8]).unwrap();
    let err = w.buffer_read(b, 0, &mut back).unwrap_err();
    assert!(err.message.contains("did not wait for failed"), "{err}");
    assert!(!w.is_running());
    assert_eq!(seen.lock().unwrap().len(), 1, "{:?}", seen.lock().unwrap());
    // After the backoff a new worker runs; the old buffer is not its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.revive() {
        assert!(Instant::now() < deadline, "no restart");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.generation(), 2);
    let err = w.buffer_read(b, 0, &mut back).unwrap_err();
    assert!(err.message.contains("not one of this worker's"), "{err}");
    assert!(w.is_running(), "a refused call is not a crash");
}

/// Through the language server: a plugin that chatters on stdout (kiln's
/// stdout is the editor's channel) and segfaults at every graph; the
/// editor gets the CPU's completions and never an error.
#[test]
fn an_editor_sees_the_cpus_completions_through_a_crashing_plugin() {
    use kiln_serve::demo::Client;
    use kiln_tests::serve::{at, initialize, open};
    use serde_json::json;
    let home = faulty_accel();
    let ws = tempfile::tempdir().unwrap();
    let uri = format!("file://{}/main.py", ws.path().display());
    let text = "def add(a, b):\n    return a + b\n\n\ndef area(r):\n    return \n";
    let session = |fault: Option<&str>| {
        let model = demo_model();
        let mut args = vec!["serve", "--model", model.to_str().unwrap(), "--backend"];
        args.push(if fault.is_some() { "accel" } else { "cpu" });
        let mut cmd = home.command(&args);
        cmd.env("KILN_THREADS", "1");
        if let Some(f) = fault {
            cmd.env("KILN_FIXTURE_FAULT", f);
        }
        let mut c = Client::spawn(cmd).expect("spawn kiln serve");
        initialize(&mut c, ws.path(), json!({}));
        open(&mut c, &uri, text);
        let mut items = Vec::new();
        for (line, character) in [(5, 11), (1, 16), (4, 12)] {
            let r = c
                .request("textDocument/inlineCompletion", at(&uri, line, character))
                .unwrap();
            assert!(r["error"].is_null(), "{r}");
            items.push(r["result"]["items"][0]["insertText"].clone());
        }
        let _ = c.request("shutdown", json!(null));
        items
    };
    assert_eq!(session(Some("segv")), session(None));
    let crashes = home.json(&["plugins", "list", "--json"])["plugins"][0]["crashes"].clone();
    assert!(
        crashes[0]["cause"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGSEGV"),
        "{crashes:#}"
    );
}
