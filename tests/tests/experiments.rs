//! A/B experiments through the real paths: `kiln ab` on the registry, the
//! language server serving each unit its arm's version and recording
//! what the editor accepts (`kiln.accepted`) and what it superseded, and
//! `kiln ab status` reading it back. The statistics (A/A and A/B
//! simulations) are tested in the registry's unit tests.

use kiln_tests::Home;
use kiln_tests::serve::{at, initialize, open, two_versions, watchdog};
use serde_json::{Value, json};
use std::time::Duration;

/// A unit the experiment gives `arm`, by the registry's own hash.
fn unit_for(home: &Home, experiment: &str, arm: &str) -> String {
    let e = home.registry().experiment(experiment).unwrap().unwrap();
    (0..)
        .map(|i| format!("unit-{i}"))
        .find(|u| e.arm_for(u).as_str() == arm)
        .unwrap()
}

/// Two inline completions in a new session as `unit`, the first accepted
/// (its command run as an editor would) and the second superseded by a
/// third; returns the items' metadata.
fn session(home: &Home, unit: &str, in_experiment: bool) -> Vec<Value> {
    let ws = tempfile::tempdir().unwrap();
    let mut cmd = home.command(&["serve", "--model", "coder"]);
    cmd.env("KILN_THREADS", "1");
    let mut c = kiln_serve::demo::Client::spawn(cmd).unwrap();
    watchdog(c.pid(), Duration::from_secs(300));
    let init = initialize(&mut c, ws.path(), json!({"maxTokens": 6, "abUnit": unit}));
    assert_eq!(
        init["result"]["capabilities"]["executeCommandProvider"]["commands"],
        json!(["kiln.accepted"])
    );
    let uri = format!("file://{}/main.py", ws.path().display());
    open(
        &mut c,
        &uri,
        "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    ",
    );
    let mut metas = Vec::new();
    for k in 0..3 {
        let r = c
            .request("textDocument/inlineCompletion", at(&uri, 5, 4))
            .unwrap();
        let meta = r["result"]["kiln"].clone();
        let items = r["result"]["items"].as_array().unwrap().clone();
        assert!(!items.is_empty(), "{r}");
        let command = &items[0]["command"];
        assert_eq!(command["command"], "kiln.accepted", "{r}");
        assert_eq!(command["arguments"][0]["completion"], meta["completion"]);
        if k == 0 {
            let r = c
                .request(
                    "workspace/executeCommand",
                    json!({"command": "kiln.accepted", "arguments": [{"completion": meta["completion"], "acceptedLength": 5}]}),
                )
                .unwrap();
            assert_eq!(
                r["result"],
                json!({"recorded": true, "experiment": in_experiment}),
                "{r}"
            );
        }
        metas.push(meta);
    }
    // The same experiments over kiln/* methods.
    let r = c.request("kiln/experiments", Value::Null).unwrap();
    assert_eq!(
        r["result"]["experiments"][0]["experiment"]["name"], "smol-vs-demo",
        "{r}"
    );
    let r = c
        .request(
            "kiln/abStart",
            json!({"name": "again", "a": "coder@1", "b": "coder@1"}),
        )
        .unwrap();
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("two versions"),
        "{r}"
    );
    let r = c
        .request("workspace/executeCommand", json!({"command": "kiln.other"}))
        .unwrap();
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("kiln.accepted"),
        "{r}"
    );
    // Waits for the server to exit: it writes the last completion's
    // served record on the way out, and the caller reads the registry next.
    let status = c.close().unwrap();
    assert!(status.success(), "{status}");
    metas
}

#[test]
fn an_experiment_serves_each_unit_its_arm_and_counts_what_the_editor_accepts() {
    let Some(home) = two_versions() else {
        return;
    };
    // Refused with the reason, nothing started.
    for (args, says) in [
        (
            &["--a", "coder@1", "--b", "coder@9"][..],
            "no model coder@9",
        ),
        (&["--a", "coder@1", "--b", "coder@1"][..], "two versions"),
        (&["--a", "coder", "--b", "coder@2"][..], "name a version"),
        (
            &["--a", "coder@1", "--b", "coder@2", "--split", "1"][..],
            "between 0 and 1",
        ),
        (
            &["--a", "coder@1", "--b", "coder@2", "--metric", "vibes"][..],
            "acceptance",
        ),
    ] {
        let err = home.fails(&[&["ab", "start", "x"][..], args].concat());
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let v = home.json(&[
        "ab",
        "start",
        "smol-vs-demo",
        "--a",
        "coder@1",
        "--b",
        "coder@2",
        "--json",
    ]);
    assert_eq!(v["experiment"]["state"], "running", "{v}");
    let again = home.fails(&["ab", "start", "other", "--a", "coder@2", "--b", "coder@1"]);
    assert!(again.contains("already runs"), "{again}");

    // Each unit is served its arm's version, session after session.
    let (ua, ub) = (
        unit_for(&home, "smol-vs-demo", "a"),
        unit_for(&home, "smol-vs-demo", "b"),
    );
    for (unit, arm, version) in [(&ua, "a", "coder@1"), (&ub, "b", "coder@2")] {
        for m in session(&home, unit, true) {
            assert_eq!(m["experiment"]["arm"], arm, "{m}");
            assert_eq!(m["experiment"]["version"], version, "{m}");
            assert_eq!(m["experiment"]["experiment"], "smol-vs-demo", "{m}");
        }
    }
    // A second session of the same unit keeps its arm.
    assert_eq!(session(&home, &ua, true)[0]["experiment"]["arm"], "a");

    let s = home.json(&["ab", "status", "smol-vs-demo", "--json"]);
    let arms = &s["experiments"][0]["arms"];
    // Unit a: two sessions of three completions, each session's first
    // accepted and second superseded; unit b: one session.
    assert_eq!(arms[0]["version"], "coder@1", "{s}");
    assert_eq!(
        (
            arms[0]["units"].as_u64(),
            arms[0]["served"].as_u64(),
            arms[0]["accepted"].as_u64(),
            arms[0]["superseded"].as_u64()
        ),
        (Some(1), Some(6), Some(2), Some(2)),
        "{s}"
    );
    assert_eq!(
        (
            arms[1]["units"].as_u64(),
            arms[1]["served"].as_u64(),
            arms[1]["accepted"].as_u64()
        ),
        (Some(1), Some(3), Some(1)),
        "{s}"
    );
    assert_eq!(arms[0]["mean_accepted_chars"], 5.0, "{s}");
    assert!(arms[0]["mean_latency_ms"].as_f64().unwrap() > 0.0, "{s}");
    let analysis = &s["experiments"][0]["analysis"];
    assert!(analysis["winner"].is_null(), "{s}");
    assert!(analysis["events_needed"].as_u64().unwrap() > 0, "{s}");
    let text = home.ok(&["ab", "status"]);
    assert!(
        text.contains("smol-vs-demo") && text.contains("undecided"),
        "{text}"
    );

    // Stopped: everyone gets the active version again.
    home.ok(&["ab", "stop", "smol-vs-demo"]);
    let after = session(&home, &ua, false);
    assert!(after[0]["experiment"].is_null(), "{:?}", after[0]);
    let err = home.fails(&["ab", "stop", "smol-vs-demo"]);
    assert!(err.contains("already stopped"), "{err}");
    let log = home.registry().audit_log(100).unwrap();
    let actions: Vec<&str> = log
        .iter()
        .filter(|l| l.kind == "experiment" && l.subject == "smol-vs-demo")
        .map(|l| l.action.as_str())
        .collect();
    assert_eq!(actions, ["start", "stop"], "audited");
}

#[test]
fn the_http_api_serves_arms_by_user_and_takes_feedback() {
    use kiln_tests::serve::{http, http_server_with, post};
    let Some(home) = two_versions() else {
        return;
    };
    home.ok(&[
        "ab", "start", "web", "--a", "coder@1", "--b", "coder@2", "--split", "0.5",
    ]);
    let (ua, ub) = (unit_for(&home, "web", "a"), unit_for(&home, "web", "b"));
    let server = http_server_with(&home, std::path::Path::new("coder"), &[]);
    let complete = |user: &str| {
        let (code, r) = post(
            &server.addr,
            "/v1/completions",
            &json!({"prompt": "def add(a, b):\n    return", "max_tokens": 4, "user": user}),
        );
        assert_eq!(code, 200, "{r}");
        r
    };
    let ra = complete(&ua);
    assert_eq!(ra["model"], "coder@1", "{ra}");
    assert_eq!(ra["experiment"]["arm"], "a", "{ra}");
    let rb = complete(&ub);
    assert_eq!(rb["model"], "coder@2", "{rb}");
    assert_eq!(rb["experiment"]["version"], "coder@2", "{rb}");
    let (code, r) = post(
        &server.addr,
        "/v1/feedback",
        &json!({"id": ra["id"], "accepted": true, "accepted_length": 3}),
    );
    assert_eq!((code, &r["experiment"]), (200, &json!(true)), "{r}");
    let (code, r) = post(
        &server.addr,
        "/v1/feedback",
        &json!({"id": rb["id"], "accepted": false}),
    );
    assert_eq!((code, &r["experiment"]), (200, &json!(true)), "{r}");
    for (body, param) in [
        (json!({"accepted": true}), "id"),
        (json!({"id": "cmpl-1"}), "accepted"),
        (
            json!({"id": "cmpl-1", "accepted": true, "accepted_length": -2}),
            "accepted_length",
        ),
    ] {
        let (code, r) = post(&server.addr, "/v1/feedback", &body);
        assert_eq!((code, &r["error"]["param"]), (400, &json!(param)), "{r}");
    }
    // A request naming the model is served that model, outside the
    // experiment.
    let (code, r) = post(
        &server.addr,
        "/v1/completions",
        &json!({"prompt": "x = ", "max_tokens": 2, "model": "coder@2", "user": ua}),
    );
    assert_eq!(code, 200, "{r}");
    assert!(r.get("experiment").is_none(), "{r}");
    let (code, body) = http(&server.addr, "GET", "/v1/experiments", b"");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let arms = &v["experiments"][0]["arms"];
    assert_eq!(
        (arms[0]["served"].as_u64(), arms[0]["accepted"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
    assert_eq!(
        (arms[1]["served"].as_u64(), arms[1]["superseded"].as_u64()),
        (Some(1), Some(1)),
        "{v}"
    );
}

/// `n` inline completions in a new session as `unit`, each accepted
/// (`kiln.accepted`) or passed over.
fn completions(home: &Home, unit: &str, n: usize, accept: bool) {
    let ws = tempfile::tempdir().unwrap();
    let mut cmd = home.command(&["serve", "--model", "coder"]);
    cmd.env("KILN_THREADS", "1");
    let mut c = kiln_serve::demo::Client::spawn(cmd).unwrap();
    watchdog(c.pid(), Duration::from_secs(300));
    initialize(&mut c, ws.path(), json!({"maxTokens": 2, "abUnit": unit}));
    let uri = format!("file://{}/main.py", ws.path().display());
    open(&mut c, &uri, "def add(a, b):\n    return a + b\n");
    for _ in 0..n {
        let r = c
            .request("textDocument/inlineCompletion", at(&uri, 1, 4))
            .unwrap();
        if accept {
            let id = &r["result"]["kiln"]["completion"];
            let args = json!({"command": "kiln.accepted", "arguments": [{"completion": id}]});
            c.request("workspace/executeCommand", args).unwrap();
        }
    }
    assert!(c.close().unwrap().success());
}

#[test]
fn the_server_stops_a_decided_experiment_with_its_winner() {
    let Some(home) = two_versions() else {
        return;
    };
    home.ok(&["ab", "start", "decide", "--a", "coder@1", "--b", "coder@2"]);
    let (ua, ub) = (
        unit_for(&home, "decide", "a"),
        unit_for(&home, "decide", "b"),
    );
    // The control's completions are all passed over, the treatment's all
    // accepted: past 30 decided completions per arm the test decides.
    completions(&home, &ua, 31, false);
    completions(&home, &ub, 40, true);
    let s = home.json(&["ab", "status", "decide", "--json"]);
    let e = &s["experiments"][0]["experiment"];
    assert_eq!(e["state"], "stopped", "{s}");
    assert_eq!(e["winner"], "b", "{s}");
    assert!(e["reason"].as_str().unwrap().contains("decided"), "{s}");
    let audit = home.registry().audit_log(100).unwrap();
    assert!(
        audit
            .iter()
            .any(|l| l.subject == "decide" && l.action == "stop" && l.actor == "kiln serve"),
        "the server's stop is audited"
    );
}
