//! `/dashboard` in a real browser (headless Chromium over WebDriver): the
//! page served beside the language server takes live snapshots, its
//! charts receive points while a scripted client completes code, a model
//! activation shows up, and the page loads nothing from anywhere but the
//! kiln process.

use kiln_tests::serve::{at, demo_model, initialize, open, status, two_versions, watchdog};
use kiln_tests::webdriver::Browser;
use kiln_tests::{Home, target_dir};
use serde_json::{Value, json};
use std::time::Duration;

#[test]
fn the_dashboard_is_live_in_a_real_browser_and_loads_nothing_from_elsewhere() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let Some(home) = two_versions() else {
        return;
    };
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(
        ws.path().join("shapes.py"),
        "def circle_area(radius):\n    return 3.14159 * radius * radius\n",
    )
    .unwrap();
    let mut cmd = home.command(&[
        "serve",
        "--model",
        "coder",
        "--metrics",
        "127.0.0.1:0",
        "--dashboard-interval",
        "1",
    ]);
    cmd.env("KILN_THREADS", "1");
    let mut c = kiln_serve::demo::Client::spawn(cmd).unwrap();
    watchdog(c.pid(), Duration::from_secs(300));
    initialize(&mut c, ws.path(), json!({"maxTokens": 8}));
    // Set before the server starts; kiln/status answers once the model is loaded.
    let addr = status(&mut c)["metrics_address"]
        .as_str()
        .expect("kiln/status names the metrics address")
        .to_string();
    let origin = format!("http://{addr}");
    browser.goto(&format!("{origin}/dashboard"));
    assert!(
        browser.wait_for(
            "return !!(window.kilnDashboard && kilnDashboard.connected && kilnDashboard.points > 0)",
            Duration::from_secs(30)
        ),
        "the page never received a snapshot: {}",
        browser.eval("return document.body.innerText")
    );
    let before = browser
        .eval("return kilnDashboard.points")
        .as_u64()
        .unwrap();

    // A scripted editing session: completions while the page watches.
    let uri = format!("file://{}/main.py", ws.path().display());
    open(&mut c, &uri, "");
    for i in 0..6u32 {
        let text: String = (0..=i)
            .map(|k| format!("a{k} = circle_area({k})\n"))
            .collect();
        c.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": uri}, "contentChanges": [{"text": text}]}),
        )
        .unwrap();
        let r = c
            .request("textDocument/inlineCompletion", at(&uri, i, 4))
            .unwrap();
        assert!(r["result"]["items"].is_array(), "{r}");
    }
    assert!(
        browser.wait_for(
            "const s = kilnDashboard.snapshots; return s.length > 0 && s[s.length - 1].totals.requests >= 6",
            Duration::from_secs(30)
        ),
        "the requests never showed up"
    );
    let after = browser
        .eval("return kilnDashboard.points")
        .as_u64()
        .unwrap();
    assert!(after > before, "no new points ({before} then {after})");
    // The charts hold the new points: latencies and throughput drawn.
    let drawn = browser.eval(
        "const c = kilnDashboard.charts; return [c.latency.data[1].some(v => v !== null), \
         c.throughput.data[2].some(v => v > 0), c.histogram.data[1].some(v => v > 0)]",
    );
    assert_eq!(drawn, json!([true, true, true]), "charts: {drawn}");
    let context = browser.eval("return document.getElementById('context').innerText");
    assert!(context.as_str().unwrap().contains("main.py"), "{context}");
    let offline = browser.eval("return document.getElementById('offline').innerText");
    let offline = offline.as_str().unwrap();
    assert!(
        offline.contains(&addr) && offline.contains("yes"),
        "{offline}"
    );

    // A model activation from the editor shows up on the page.
    let r = c
        .request("kiln/activateModel", json!({"model": "coder@1"}))
        .unwrap();
    assert!(r["error"].is_null(), "{r}");
    assert!(
        browser.wait_for(
            "return kilnDashboard.model === 'coder@1' && \
             document.getElementById('events').innerText.includes('now serving coder@1')",
            Duration::from_secs(30)
        ),
        "the activation never showed: {}",
        browser.eval("return document.getElementById('events').innerText")
    );

    // An explanation from the editor: the page draws its attention map
    // (coder@1 is SmolLM2) and shades the prompt's tokens.
    let r = c
        .request(
            "kiln/explain",
            json!({"textDocument": {"uri": uri}, "position": {"line": 5, "character": 4}, "completion": "circle_area(5)", "budgetTokens": 1}),
        )
        .unwrap();
    assert!(r["error"].is_null(), "{r}");
    assert!(r["result"]["explanation"].get("attention").is_none(), "{r}");
    assert!(
        browser.wait_for(
            "const e = kilnDashboard.explanation; return !!e && e.explanation.attention.layers === 30 && \
             document.querySelectorAll('#attn-text span').length === e.explanation.attention.tokens.length && \
             document.getElementById('attn-map').height > 0 && !document.getElementById('attn').hidden",
            Duration::from_secs(30)
        ),
        "the explanation never showed: {}",
        browser.eval("return document.getElementById('explanation').innerText")
    );
    // The heat map is drawn: not all of the canvas is the background.
    let painted = browser.eval(
        "const c = document.getElementById('attn-map'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
         const first = d.slice(0, 4).join(); let other = 0; \
         for (let i = 0; i < d.length; i += 4) if (d.slice(i, i + 4).join() !== first) other++; return other",
    );
    assert!(painted.as_u64().unwrap() > 100, "{painted}");

    // An A/B experiment started from the editor shows up with its arms.
    let r = c
        .request(
            "kiln/abStart",
            json!({"name": "page-test", "a": "coder@1", "b": "coder@2"}),
        )
        .unwrap();
    assert!(r["error"].is_null(), "{r}");
    assert!(
        browser.wait_for(
            "const t = document.getElementById('experiments').innerText; \
             return t.includes('page-test') && t.includes('coder@2') && t.includes('undecided')",
            Duration::from_secs(30)
        ),
        "the experiment never showed: {}",
        browser.eval("return document.getElementById('experiments').innerText")
    );

    // Everything the page loaded came from this kiln; nothing was blocked
    // or failed.
    let loaded = browser.eval("return performance.getEntriesByType('resource').map(e => e.name)");
    let loaded: Vec<&str> = loaded
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(loaded.len() >= 4, "{loaded:?}");
    assert!(loaded.iter().all(|u| u.starts_with(&origin)), "{loaded:?}");
    assert_eq!(
        browser.eval("return window.__kilnErrors"),
        Value::Array(vec![])
    );
    browser.screenshot(&target_dir().join("dashboard-test.png"));
    c.notify("exit", Value::Null).unwrap();
}

#[test]
fn the_dashboard_is_served_with_the_http_api_and_refuses_bad_intervals() {
    let home = Home::default();
    let server =
        kiln_tests::serve::http_server_with(&home, &demo_model(), &["--dashboard-interval", "1"]);
    let (code, page) = kiln_tests::serve::http(&server.addr, "GET", "/dashboard", b"");
    assert_eq!(code, 200);
    assert!(page.contains("/dashboard/uPlot.iife.min.js"), "{page}");
    let (_, license) =
        kiln_tests::serve::http(&server.addr, "GET", "/dashboard/LICENSE-uPlot", b"");
    assert!(license.contains("MIT"));
    kiln_tests::serve::post(
        &server.addr,
        "/v1/completions",
        &json!({"prompt": "def f(x):", "max_tokens": 4}),
    );
    std::thread::sleep(Duration::from_millis(2500));
    let (code, history) = kiln_tests::serve::http(&server.addr, "GET", "/dashboard/history", b"");
    assert_eq!(code, 200);
    let h: Value = serde_json::from_str(&history).unwrap();
    let last = h.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["totals"]["requests"], 1.0, "{last}");
    assert_eq!(last["offline"]["loopback_only"], true, "{last}");
    assert_eq!(last["offline"]["outbound_connections"], 0, "{last}");
    assert_eq!(last["totals"]["completion_cache_evictions"], 0.0, "{last}");
    // Plugin health: none installed in this home.
    assert_eq!(last["offline"]["models"]["plugins"], json!([]), "{last}");
    let (_, metrics) = kiln_tests::serve::http(&server.addr, "GET", "/metrics", b"");
    assert!(
        metrics.contains("kiln:completion_cache_evictions_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("kiln:model_info{"), "{metrics}");

    // `kiln top` finds the server through its run file (a stale one of a
    // dead process is skipped and removed) and prints its numbers.
    let stale = home.path().join("run/serve-999999999.json");
    std::fs::write(
        &stale,
        r#"{"pid": 999999999, "address": "127.0.0.1:9", "model": null}"#,
    )
    .unwrap();
    let out = home.ok(&["top", "--plain", "--count", "2"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("demo") && lines[0].contains("outbound connections 0"),
        "{out}"
    );
    assert!(!stale.exists());
    drop(server);
    let err = home.fails(&["top", "--plain", "--count", "1"]);
    assert!(err.contains("no running `kiln serve`"), "{err}");

    for bad in ["0", "61"] {
        let err = home.fails(&[
            "serve",
            "--http",
            "127.0.0.1:0",
            "--dashboard-interval",
            bad,
        ]);
        assert!(err.contains("--dashboard-interval"), "{err}");
    }
}
