//! The registry through the real binary: rollback and the audit log, a
//! database from a newer kiln, a database that is not one, and the
//! durability test: `kiln plugins add` killed with SIGKILL at random points,
//! over and over, must leave a database that passes `PRAGMA
//! integrity_check` and a registry whose invariants hold.

use kiln_tests::{Home, ManifestSpec, c_fixture, plugin_dir, rust_cdylib};
use std::time::Duration;

#[test]
fn enable_disable_rollback_and_the_audit_log() {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_versions", &[]);
    for v in ["1.0.0", "1.1.0", "2.0.0"] {
        let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("vendor", v));
        home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    }
    let active = |home: &Home| -> Vec<String> {
        home.json(&["plugins", "list", "--json"])["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "active")
            .map(|p| p["version"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(active(&home), ["2.0.0"]);
    assert!(
        home.ok(&["plugins", "rollback", "vendor"])
            .contains("2.0.0 -> 1.1.0")
    );
    assert_eq!(active(&home), ["1.1.0"]);
    assert!(
        home.ok(&["plugins", "rollback", "vendor"])
            .contains("1.1.0 -> 1.0.0")
    );
    let stderr = home.fails(&["plugins", "rollback", "vendor"]);
    assert!(stderr.contains("no earlier active version"), "{stderr}");
    home.ok(&["plugins", "enable", "vendor@2.0.0"]);
    assert_eq!(active(&home), ["2.0.0"]);
    home.ok(&["plugins", "disable", "vendor"]);
    assert!(active(&home).is_empty());
    let stderr = home.fails(&["plugins", "enable", "vendor@9.9.9"]);
    assert!(stderr.contains("no installed version 9.9.9"), "{stderr}");
    let stderr = home.fails(&["plugins", "rollback", "nobody"]);
    assert!(stderr.contains("no active version"), "{stderr}");

    let log = home.json(&["plugins", "log", "--json"]);
    let rows: Vec<(String, String, String)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
            (s("action"), s("before"), s("after"))
        })
        .collect();
    let expect = [
        ("install", "", "1.0.0"),
        ("activate", "", "1.0.0"),
        ("install", "", "1.1.0"),
        ("activate", "1.0.0", "1.1.0"),
        ("install", "", "2.0.0"),
        ("activate", "1.1.0", "2.0.0"),
        ("rollback", "2.0.0", "1.1.0"),
        ("rollback", "1.1.0", "1.0.0"),
        ("enable", "1.0.0", "2.0.0"),
        ("disable", "2.0.0 active", "2.0.0 disabled"),
    ];
    let expect: Vec<(String, String, String)> = expect
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(rows, expect);
    for e in log["entries"].as_array().unwrap() {
        assert!(e["actor"].as_str().unwrap().contains("kiln-cli"), "{e}");
        assert!(e["at"].as_str().unwrap().ends_with('Z'), "{e}");
    }
}

#[test]
fn a_database_from_a_newer_kiln_is_refused_and_untouched() {
    let home = Home::default();
    home.ok(&["plugins", "list"]);
    let db = home.path().join("kiln.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("PRAGMA user_version = 42;").unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    for args in [
        &["plugins", "list"][..],
        &["backends"],
        &["plugins", "enable", "x"],
    ] {
        let stderr = home.fails(args);
        assert!(
            stderr.contains("written by a newer kiln (schema version 42"),
            "{stderr}"
        );
    }
    // doctor reports it as a problem (exit 1) rather than crashing.
    let out = home.kiln(&["doctor", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["problems"][0]
            .as_str()
            .unwrap()
            .contains("newer kiln")
    );
    assert_eq!(std::fs::read(&db).unwrap(), before);
}

#[test]
fn a_file_that_is_not_a_database_is_refused_with_advice() {
    let home = Home::default();
    std::fs::write(home.path().join("kiln.db"), vec![0x42u8; 8192]).unwrap();
    let stderr = home.fails(&["plugins", "list"]);
    assert!(
        stderr.contains("not a usable kiln registry") && stderr.contains("move it away"),
        "{stderr}"
    );
}

#[test]
fn a_broken_config_file_is_named() {
    let home = Home::default();
    std::fs::write(home.path().join("config.toml"), "[plugins]\ndirs = 7\n").unwrap();
    let stderr = home.fails(&["plugins", "list"]);
    assert!(
        stderr.contains("config.toml is not a valid kiln config") && stderr.contains("line 2"),
        "{stderr}"
    );
}

/// The registry's invariants, checked straight in SQLite.
fn check_invariants(home: &Home) {
    let r = home.registry();
    assert_eq!(r.integrity_check().unwrap(), "ok");
    let plugins = r.plugins().unwrap();
    let active = plugins
        .iter()
        .filter(|p| p.state == kiln_registry::PluginState::Active)
        .count();
    assert!(active <= 1, "more than one active version: {plugins:?}");
    for p in &plugins {
        assert!(
            p.library_path.is_file(),
            "{} points at a missing library",
            p.label()
        );
        assert_eq!(
            kiln_tests::sha256_file(&p.library_path),
            p.sha256,
            "{} store copy differs",
            p.label()
        );
    }
    let installs = r
        .audit_log(100_000)
        .unwrap()
        .iter()
        .filter(|e| e.action == "install")
        .count();
    assert_eq!(
        installs,
        plugins.len(),
        "every row has exactly one install entry"
    );
}

#[test]
fn sigkill_during_plugins_add_never_corrupts_the_registry() {
    let home = Home::default();
    let lib = rust_cdylib("kiln-cpu-plugin", "kiln_cpu_plugin");
    let mut rng = fastrand::Rng::with_seed(0xdead);
    // One add run to the end: an earlier version for the final rollback,
    // and the time an add takes here, so that the kills below land before
    // and after it finishes whatever the machine's (and the build's) speed.
    let first = plugin_dir(home.path(), &lib, &ManifestSpec::new("cpu-plugin", "0.0.1"));
    kiln_tests::kiln_bin(); // built before the clock starts
    let timed = std::time::Instant::now();
    home.ok(&["plugins", "add", first.to_str().unwrap()]);
    let full_ms = (timed.elapsed().as_millis() as u64).max(20);
    let started = std::time::Instant::now();
    let mut completed = 0;
    for i in 0..24 {
        let dir = plugin_dir(
            home.path(),
            &lib,
            &ManifestSpec::new("cpu-plugin", &format!("0.1.{i}")),
        );
        let mut child = home
            .command(&["plugins", "add", dir.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.u64(0..2 * full_ms)));
        // `Child::kill` is SIGKILL on Unix: no destructor, no handler runs.
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            completed += 1;
        }
        check_invariants(&home);
    }
    // Some runs died midway and some finished; both must have happened for
    // the test to mean anything.
    assert!(completed < 24, "no run was killed");
    assert!(
        completed > 0,
        "every run was killed (a full add took {full_ms} ms)"
    );
    eprintln!(
        "{completed}/24 adds completed before the kill ({:?})",
        started.elapsed()
    );
    // The registry is still fully usable.
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("cpu-plugin", "9.0.0"));
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    check_invariants(&home);
    home.ok(&["plugins", "rollback", "cpu-plugin"]);
}

/// Every recorded model version's blob is there with its bytes, and the
/// database is whole.
fn check_store(home: &Home) {
    let r = home.registry();
    assert_eq!(r.integrity_check().unwrap(), "ok");
    for m in r.models().unwrap() {
        assert!(m.blob_path.is_file(), "{} lost its blob", m.label());
        assert_eq!(
            kiln_tests::sha256_file(&m.blob_path),
            m.sha256,
            "{}'s blob differs",
            m.label()
        );
    }
}

#[test]
fn adds_a_gc_and_a_serve_killed_at_random_never_corrupt_the_model_store() {
    use std::process::{Child, Stdio};
    let home = Home::default();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let models: Vec<String> = (0..6)
        .map(|i| {
            let seed = (21 + i).to_string();
            let p = kiln_tests::tiny_model(&["--dtype", "f16", "--seed", &seed]);
            p.to_string_lossy().into_owned()
        })
        .collect();
    kiln_tests::kiln_bin(); // built before the clock starts
    let timed = std::time::Instant::now();
    home.ok(&["models", "add", &models[0], "--name", "served"]);
    let full_ms = (timed.elapsed().as_millis() as u64).max(20);
    let spawn = |args: &[&str]| -> Child {
        home.command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut finished, mut killed) = (0, 0);
    for round in 0..24 {
        // Two adds (now and then of the same bytes), a gc and a server
        // reading the store, all at once; then SIGKILL for whatever still
        // runs after a random while.
        let (a, b) = (&models[rng.usize(..6)], &models[rng.usize(..6)]);
        let (na, nb) = (format!("a{round}"), format!("b{round}"));
        let mut children = vec![
            spawn(&["models", "add", a, "--name", &na]),
            spawn(&["models", "add", b, "--name", &nb]),
            spawn(&["store", "gc"]),
            spawn(&["serve", "--http", "127.0.0.1:0", "--model", "served"]),
        ];
        std::thread::sleep(Duration::from_millis(rng.u64(0..3 * full_ms)));
        for c in &mut children[..3] {
            match c.try_wait().unwrap() {
                Some(_) => finished += 1,
                None => killed += 1,
            }
        }
        for c in &mut children {
            // `Child::kill` is SIGKILL on Unix: no destructor, no handler.
            let _ = c.kill();
            let _ = c.wait();
        }
        check_store(&home);
    }
    assert!(killed > 0, "nothing was killed mid-way");
    assert!(finished > 0, "nothing finished (an add took {full_ms} ms)");
    eprintln!("{finished} adds and gcs finished, {killed} were killed");
    // What the kills left is garbage gc can see, and nothing else.
    home.ok(&["store", "gc"]);
    let v: serde_json::Value =
        serde_json::from_str(&home.ok(&["models", "verify", "--json"])).unwrap();
    assert_eq!(v["problems"], 0, "{v}");
    assert_eq!(v["orphans"].as_array().unwrap().len(), 0, "{v}");
    check_store(&home);
    home.ok(&["models", "add", &models[1], "--name", "after"]);
}

#[test]
fn kiln_serve_scrubs_the_store_in_the_background_and_reports_damage() {
    use kiln_tests::serve::{http, http_server_with};
    let home = Home::default();
    let served = kiln_tests::tiny_model(&["--dtype", "f16", "--seed", "31"]);
    let other = kiln_tests::tiny_model(&["--dtype", "f16", "--seed", "32"]);
    home.ok(&[
        "models",
        "add",
        served.to_str().unwrap(),
        "--name",
        "served",
    ]);
    home.ok(&["models", "add", other.to_str().unwrap(), "--name", "other"]);
    // Every second or so (the first one a second after the start).
    std::fs::write(
        home.path().join("config.toml"),
        "[store]\nscrub_interval_hours = 0.0003\n",
    )
    .unwrap();
    let server = http_server_with(&home, &served, &[]);
    let gauge = |name: &str| -> Option<f64> {
        let (_, text) = http(&server.addr, "GET", "/metrics", b"");
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !ok() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for("no scrub ran", &|| {
        gauge("kiln:store_scrub_timestamp_seconds") > Some(0.0)
    });
    assert_eq!(gauge("kiln:store_blobs"), Some(2.0));
    assert_eq!(gauge("kiln:store_damaged_blobs"), Some(0.0));
    // A byte of the other model's blob flipped: the next scrub says so.
    let m = home.registry().model("other").unwrap().unwrap();
    let mut bytes = std::fs::read(&m.blob_path).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(&m.blob_path, bytes).unwrap();
    wait_for("the damage was not found", &|| {
        gauge("kiln:store_damaged_blobs") == Some(1.0)
    });
    let audit = home.registry().audit_log(100).unwrap();
    assert!(
        audit.iter().any(|e| e.kind == "store"
            && e.action == "scrub"
            && e.detail.as_deref().is_some_and(|d| d.contains("other@1"))),
        "{audit:?}"
    );
    // Still serving.
    let (code, _) = http(
        &server.addr,
        "POST",
        "/v1/completions",
        br#"{"prompt": "a", "max_tokens": 2}"#,
    );
    assert_eq!(code, 200);
}

#[test]
fn a_scrub_interval_out_of_range_is_named() {
    let home = Home::default();
    std::fs::write(
        home.path().join("config.toml"),
        "[store]\nscrub_interval_hours = -1\n",
    )
    .unwrap();
    let out = home.kiln(&["models", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("scrub_interval_hours"),
        "{err}"
    );
}
