//! Several models in one `kiln serve`: the pool loads them on first use
//! within `[pool] max_memory_mb`, unloads idle ones, and routes each
//! request to a chain of models. A model that cannot load, or hangs past
//! its route's deadline, is marked failed and the next one answers,
//! saying so; when every one fails, the answer kept from before does.
//! Over the real HTTP API and language server, with the real binary.

use kiln_tests::serve::{
    HttpServer, demo_model, http, http_server_args, initialize, open, post, serve_model, status,
};
use kiln_tests::{Home, ManifestSpec, c_fixture, plugin_dir};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Writes `home`'s `config.toml`.
fn configure(home: &Home, text: &str) {
    std::fs::write(home.path().join("config.toml"), text).unwrap();
}

/// Waits (15 s at most) until the server has unloaded model `id`.
fn wait_unloaded(addr: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while model(&models(addr), id)["kiln"]["loaded"] == true {
        assert!(Instant::now() < deadline, "{id} was never unloaded");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A copy of the demo model named `name`.gguf in `dir`.
fn demo_copy(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(format!("{name}.gguf"));
    std::fs::copy(demo_model(), &p).unwrap();
    p
}

/// The demo model cut short: its header reads, its weights do not.
fn broken_copy(dir: &Path, name: &str) -> PathBuf {
    let bytes = std::fs::read(demo_model()).unwrap();
    let p = dir.join(format!("{name}.gguf"));
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    p
}

fn complete(addr: &str, body: Value) -> (u16, Value) {
    post(addr, "/v1/completions", &body)
}

fn models(addr: &str) -> Vec<Value> {
    let (code, body) = http(addr, "GET", "/v1/models", b"");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"].as_array().unwrap().clone()
}

fn model<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not listed: {list:#?}"))
}

fn metrics(addr: &str) -> String {
    http(addr, "GET", "/metrics", b"").1
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_model_that_cannot_load_is_failed_and_the_next_in_its_chain_answers() {
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let broken = broken_copy(dir.path(), "broken");
    let backup = demo_copy(dir.path(), "backup");
    configure(
        &home,
        &format!(
            "[models.primary]\nmodel = {:?}\n[models.backup]\nmodel = {:?}\n\n\
             [pool]\ncooldown_seconds = 60\n\n\
             [[routes]]\nkind = \"inline\"\nmodels = [\"primary\", \"backup\"]\n",
            broken.display(),
            backup.display()
        ),
    );
    let demo = demo_model();
    let args = [
        "--model",
        demo.to_str().unwrap(),
        "--dashboard-interval",
        "1",
    ];
    let srv = http_server_args(&home, &args, &[]);
    // Every model is listed; only the first one is loaded yet.
    let list = models(&srv.addr);
    let ids: Vec<&str> = list.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["demo", "backup", "primary"], "{list:#?}");
    assert_eq!(model(&list, "demo")["kiln"]["loaded"], true);
    assert_eq!(model(&list, "backup")["kiln"]["loaded"], false);

    let ask = json!({"prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0});
    let (code, v) = complete(&srv.addr, ask.clone());
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(v["model"], "backup", "{v:#}");
    let route = &v["route"];
    assert_eq!(route["model"], "backup");
    assert_eq!(route["kind"], "inline");
    assert_eq!(route["from_cache"], false);
    assert_eq!(route["fallback_from"][0]["model"], "primary", "{v:#}");
    assert_eq!(route["fallback_from"][0]["reason"], "load", "{v:#}");
    // The same text as the demo model gives served alone.
    let (_, direct) = complete(
        &srv.addr,
        json!({"model": "demo", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(v["choices"][0]["text"], direct["choices"][0]["text"]);
    assert_eq!(direct["model"], "demo");
    assert!(direct["route"]["fallback_from"].is_null(), "{direct:#}");

    // While it cools down the failed model is skipped, not loaded again.
    let (code, v) = complete(
        &srv.addr,
        json!({"prompt": "class Stack:", "max_tokens": 4}),
    );
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(
        v["route"]["fallback_from"][0]["reason"], "cooling_down",
        "{v:#}"
    );

    let list = models(&srv.addr);
    let primary = &model(&list, "primary")["kiln"];
    assert_eq!(primary["health"], "failed", "{primary:#}");
    assert_eq!(primary["loaded"], false);
    assert_eq!(primary["failures"], 1, "{primary:#}");
    assert!(
        primary["last_error"]
            .as_str()
            .unwrap()
            .contains("broken.gguf"),
        "the error names the file: {primary:#}"
    );
    assert_eq!(model(&list, "backup")["kiln"]["health"], "healthy");
    assert_eq!(model(&list, "backup")["kiln"]["loaded"], true);
    let m = metrics(&srv.addr);
    assert_eq!(
        metric(
            &m,
            "kiln:route_fallbacks_total{model=\"primary\",reason=\"load\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "kiln:model_health{model=\"primary\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "kiln:model_loaded{model=\"backup\"}"),
        1.0,
        "{m}"
    );
    // The dashboard shows the pool and said what happened.
    std::thread::sleep(Duration::from_millis(1500));
    let (_, history) = http(&srv.addr, "GET", "/dashboard/history", b"");
    let h: Value = serde_json::from_str(&history).unwrap();
    let snaps = h.as_array().unwrap();
    let pool = &snaps.last().unwrap()["pool"];
    let primary = (pool["models"].as_array().unwrap().iter())
        .find(|m| m["model"] == "primary")
        .unwrap_or_else(|| panic!("{pool:#}"));
    assert_eq!(primary["health"], "failed", "{pool:#}");
    assert!(pool["memory_bytes"].as_f64().unwrap() > 0.0, "{pool:#}");
    let events: Vec<&str> = (snaps.iter())
        .flat_map(|s| s["events"].as_array().unwrap().iter())
        .filter_map(Value::as_str)
        .collect();
    assert!(
        events.iter().any(|e| e.starts_with("primary failed")),
        "{events:?}"
    );
    assert!(events.contains(&"loaded backup"), "{events:?}");

    // A model named by the request has no fallback; one not served is 404.
    let (code, v) = complete(
        &srv.addr,
        json!({"model": "primary", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(code, 503, "{v:#}");
    assert_eq!(v["error"]["code"], "no_model_available", "{v:#}");
    let (code, v) = complete(&srv.addr, json!({"model": "nope", "prompt": "x"}));
    assert_eq!(code, 404, "{v:#}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("demo, backup, primary"), "{msg}");
    let (code, v) = complete(&srv.addr, json!({"model": 7, "prompt": "x"}));
    assert_eq!(
        (code, &v["error"]["param"]),
        (400, &json!("model")),
        "{v:#}"
    );
    // Chat has no route of its own: the first model answers it.
    let (code, _) = http(&srv.addr, "GET", "/healthz", b"");
    assert_eq!(code, 200);
}

#[test]
fn a_model_hanging_past_its_deadline_is_failed_and_the_fallback_answers_in_time() {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_faults", &["-DFIXTURE_FAULTS"]);
    let pdir = plugin_dir(home.path(), &lib, &ManifestSpec::new("accel", "1.0.0"));
    home.ok(&["plugins", "add", pdir.to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let slow = demo_copy(dir.path(), "slow");
    let backup = demo_copy(dir.path(), "backup");
    // The plugin's watchdog would end the hang after 30 s; the route's
    // deadline is 1.5 s.
    configure(
        &home,
        &format!(
            "[plugins]\ncall_timeout_seconds = 30\nworker_memory_mb = 1024\n\n\
             [models.slow]\nmodel = {:?}\nbackend = \"accel\"\n\
             [models.backup]\nmodel = {:?}\nbackend = \"cpu\"\n\n\
             [[routes]]\nmodels = [\"slow\", \"backup\"]\ndeadline_ms = 1500\n",
            slow.display(),
            backup.display()
        ),
    );
    // Its device scored (no fault set), so that serving measures nothing.
    home.ok(&["backends"]);
    let srv = http_server_args(
        &home,
        &[
            "--model",
            demo_model().to_str().unwrap(),
            "--backend",
            "cpu",
        ],
        &[("KILN_FIXTURE_FAULT", "hang")],
    );
    let ask = json!({"prompt": "fn main() {", "max_tokens": 4, "temperature": 0});
    let started = Instant::now();
    let (code, v) = complete(&srv.addr, ask.clone());
    let took = started.elapsed();
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(v["model"], "backup", "{v:#}");
    let failed = &v["route"]["fallback_from"][0];
    assert_eq!(failed["model"], "slow", "{v:#}");
    assert_eq!(failed["reason"], "deadline", "{v:#}");
    assert!(took < Duration::from_secs(20), "answered after {took:?}");
    // The hung model is skipped now: the next answer comes at once.
    let started = Instant::now();
    let (code, v) = complete(&srv.addr, json!({"prompt": "def f(", "max_tokens": 4}));
    assert_eq!(code, 200, "{v:#}");
    assert_eq!(v["route"]["fallback_from"][0]["reason"], "cooling_down");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "a failed model is not waited for again: {:?}",
        started.elapsed()
    );
    let m = metrics(&srv.addr);
    assert_eq!(
        metric(
            &m,
            "kiln:route_fallbacks_total{model=\"slow\",reason=\"deadline\"}"
        ),
        1.0,
        "{m}"
    );
    let list = models(&srv.addr);
    assert_eq!(model(&list, "slow")["kiln"]["health"], "failed");
    assert!(
        (model(&list, "slow")["kiln"]["last_error"].as_str().unwrap()).contains("deadline"),
        "{list:#?}"
    );
}

#[test]
fn models_load_within_the_budget_and_idle_ones_are_unloaded() {
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let a = demo_copy(dir.path(), "a");
    let b = demo_copy(dir.path(), "b");
    // What one demo model needs, as the pool counts it.
    let probe = http_server_args(&home, &["--model", a.to_str().unwrap()], &[]);
    let need = model(&models(&probe.addr), "a")["kiln"]["need_bytes"]
        .as_u64()
        .unwrap();
    drop(probe);
    // Room for the first model and one more, not two.
    let mib = (2 * need + need / 2).div_ceil(1 << 20);
    configure(
        &home,
        &format!(
            "[pool]\nmax_memory_mb = {mib}\n\n\
             [models.a]\nmodel = {:?}\n[models.b]\nmodel = {:?}\n\
             [models.idle]\nmodel = {:?}\nkeep_alive_seconds = 1\n\
             [models.huge]\nmodel = {:?}\nctx = 1048576\n",
            a.display(),
            b.display(),
            demo_copy(dir.path(), "idle").display(),
            demo_copy(dir.path(), "huge").display(),
        ),
    );
    let srv = http_server_args(&home, &["--model", demo_model().to_str().unwrap()], &[]);
    let ask = |m: &str| {
        let (code, v) = complete(
            &srv.addr,
            json!({"model": m, "prompt": "x = ", "max_tokens": 3}),
        );
        assert_eq!(code, 200, "{m}: {v:#}");
        assert_eq!(v["model"], m, "{v:#}");
    };
    ask("a");
    let list = models(&srv.addr);
    assert_eq!(model(&list, "a")["kiln"]["loaded"], true);
    ask("b");
    // `a` made room for `b`; the first model stays.
    let list = models(&srv.addr);
    assert_eq!(model(&list, "a")["kiln"]["loaded"], false, "{list:#?}");
    assert_eq!(model(&list, "b")["kiln"]["loaded"], true);
    assert_eq!(model(&list, "demo")["kiln"]["loaded"], true);
    let m = metrics(&srv.addr);
    assert_eq!(
        metric(
            &m,
            "kiln:model_unloads_total{model=\"a\",reason=\"budget\"}"
        ),
        1.0,
        "{m}"
    );
    let used = metric(&m, "kiln:pool_memory_bytes ");
    let budget = metric(&m, "kiln:pool_budget_bytes ");
    assert!(used > 0.0 && used <= budget, "{used} of {budget}");
    // Read from the process when the metrics are rendered.
    assert!(metric(&m, "kiln:huge_pages_bytes ") >= 0.0, "{m}");

    // A model that cannot fit is refused with the numbers, nothing loaded.
    let (code, v) = complete(
        &srv.addr,
        json!({"model": "huge", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(code, 503, "{v:#}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("huge") && msg.contains("MiB") && msg.contains("max_memory_mb"),
        "{msg}"
    );
    assert_eq!(model(&models(&srv.addr), "huge")["kiln"]["loaded"], false);

    // Idle past its keep-alive: unloaded.
    ask("idle");
    wait_unloaded(&srv.addr, "idle");
    let m = metrics(&srv.addr);
    assert_eq!(
        metric(
            &m,
            "kiln:model_unloads_total{model=\"idle\",reason=\"idle\"}"
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn when_every_model_fails_the_answer_kept_from_before_is_given() {
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let only = demo_copy(dir.path(), "only");
    configure(
        &home,
        &format!(
            "[models.only]\nmodel = {:?}\nkeep_alive_seconds = 0\n\n\
             [[routes]]\nkind = \"inline\"\nmodels = [\"only\"]\n",
            only.display()
        ),
    );
    let srv = http_server_args(&home, &["--model", demo_model().to_str().unwrap()], &[]);
    let ask = json!({"prompt": "import os\n", "max_tokens": 5, "temperature": 0});
    let (code, first) = complete(&srv.addr, ask.clone());
    assert_eq!(code, 200, "{first:#}");
    assert_eq!(first["model"], "only");
    // Unloaded when idle; then its file is damaged.
    wait_unloaded(&srv.addr, "only");
    let bytes = std::fs::read(&only).unwrap();
    std::fs::write(&only, &bytes[..bytes.len() / 3]).unwrap();
    let (code, again) = complete(&srv.addr, ask);
    assert_eq!(code, 200, "{again:#}");
    assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"]);
    assert_eq!(again["route"]["from_cache"], true, "{again:#}");
    assert_eq!(again["route"]["fallback_from"][0]["reason"], "load");
    // Another request has nothing kept: refused, naming the failure.
    let (code, v) = complete(
        &srv.addr,
        json!({"prompt": "import sys\n", "max_tokens": 5}),
    );
    assert_eq!(code, 503, "{v:#}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("only"),
        "{v:#}"
    );
    let m = metrics(&srv.addr);
    assert_eq!(
        metric(&m, "kiln:route_offline_cache_answers_total "),
        1.0,
        "{m}"
    );
}

#[test]
fn several_models_on_the_command_line_are_served_by_name_and_fall_back_in_order() {
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let second = demo_copy(dir.path(), "second");
    let srv = http_server_args(
        &home,
        &[
            "--model",
            demo_model().to_str().unwrap(),
            "--model",
            second.to_str().unwrap(),
        ],
        &[],
    );
    let list = models(&srv.addr);
    let ids: Vec<&str> = list.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["demo", "second"]);
    let (code, v) = complete(&srv.addr, json!({"prompt": "a", "max_tokens": 2}));
    assert_eq!((code, v["model"].as_str()), (200, Some("demo")), "{v:#}");
    let (code, v) = complete(
        &srv.addr,
        json!({"model": "second", "prompt": "a", "max_tokens": 2}),
    );
    assert_eq!((code, v["model"].as_str()), (200, Some("second")), "{v:#}");
    // Streamed, the chunks name the model too.
    let (code, body) = http(
        &srv.addr,
        "POST",
        "/v1/completions",
        br#"{"model": "second", "prompt": "b", "max_tokens": 3, "stream": true}"#,
    );
    assert_eq!(code, 200);
    assert!(body.contains("\"model\":\"second\""), "{body}");
    assert!(body.contains("[DONE]"), "{body}");
}

#[test]
fn an_editor_gets_the_fallbacks_completion_and_sees_the_models_health() {
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let broken = broken_copy(dir.path(), "broken");
    let backup = demo_copy(dir.path(), "backup");
    configure(
        &home,
        &format!(
            "[models.py]\nmodel = {:?}\n[models.backup]\nmodel = {:?}\n\n\
             [[routes]]\nkind = \"inline\"\npaths = [\"**/*.py\"]\nlanguages = [\"python\"]\n\
             models = [\"py\", \"backup\"]\n",
            broken.display(),
            backup.display()
        ),
    );
    let ws = tempfile::tempdir().unwrap();
    let mut c = serve_model(&home, &demo_model(), &[]);
    initialize(&mut c, ws.path(), json!({"workspaceContext": false}));
    let uri = format!("file://{}/src/app.py", ws.path().display());
    open(&mut c, &uri, "def add(a, b):\n    ");
    let r = c
        .request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": uri}, "position": {"line": 1, "character": 4},
                   "context": {"triggerKind": 1}}),
        )
        .unwrap();
    let route = &r["result"]["kiln"]["route"];
    assert_eq!(route["model"], "backup", "{r:#}");
    assert_eq!(route["fallback_from"][0]["model"], "py", "{r:#}");
    // A file the route does not match goes to the first model.
    let other = format!("file://{}/notes.txt", ws.path().display());
    c.notify(
        "textDocument/didOpen",
        json!({"textDocument": {"uri": other, "languageId": "plaintext", "version": 1, "text": "hello "}}),
    )
    .unwrap();
    let r = c
        .request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": other}, "position": {"line": 0, "character": 6},
                   "context": {"triggerKind": 1}}),
        )
        .unwrap();
    assert_eq!(r["result"]["kiln"]["route"]["model"], "demo", "{r:#}");
    let s = status(&mut c);
    let models = s["models"].as_array().unwrap();
    let py = models.iter().find(|m| m["id"] == "py").unwrap();
    assert_eq!(py["health"], "failed", "{s:#}");
    assert!(s["pool"]["budget_bytes"].as_u64().unwrap() > 0, "{s:#}");
    let served = c.request("kiln/models", Value::Null).unwrap();
    assert_eq!(
        served["result"]["served"].as_array().unwrap().len(),
        3,
        "{served:#}"
    );
    // The route removed and config.toml read again: the first model
    // answers the Python file now, and `py` is no longer served.
    configure(
        &home,
        &format!("[models.backup]\nmodel = {:?}\n", backup.display()),
    );
    let r = c.request("kiln/reloadConfig", Value::Null).unwrap();
    let applied = &r["result"]["applied"];
    assert!(
        applied.as_array().unwrap().contains(&json!("routes")),
        "{r:#}"
    );
    let ids: Vec<&str> = (r["result"]["models"].as_array().unwrap().iter())
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["demo", "backup"], "{r:#}");
    let r = c
        .request(
            "textDocument/inlineCompletion",
            json!({"textDocument": {"uri": uri}, "position": {"line": 1, "character": 4},
                   "context": {"triggerKind": 1}}),
        )
        .unwrap();
    assert_eq!(r["result"]["kiln"]["route"]["model"], "demo", "{r:#}");
    // A route naming no model is refused; what is served stays.
    configure(&home, "[[routes]]\nmodels = [\"gone\"]\n");
    let r = c.request("kiln/reloadConfig", Value::Null).unwrap();
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("gone") && msg.contains("stays"), "{r:#}");
    c.close().unwrap();
}

/// Reads a server-sent event stream, calling `each` with every chunk's
/// text as it arrives; returns the whole text.
fn stream_chat(addr: &str, body: &Value, mut each: impl FnMut(&str)) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
            each(t);
        }
    }
    text
}

/// Streams a long chat (on `chat_model`, else the route's) alone, then
/// again with an inline completion asked once its first text arrived:
/// the completion must come back while the chat still streams, the chat
/// be paused for it, and its text be the same as alone.
fn inline_during_chat(srv: &HttpServer, chat_model: Option<&str>) {
    let chat = |seed: u64| {
        let mut v = json!({"messages": [{"role": "user", "content": "Write a long story about a compiler."}],
               "max_tokens": 600, "temperature": 0, "seed": seed, "stream": true});
        if let Some(m) = chat_model {
            v["model"] = json!(m);
        }
        v
    };
    let alone = stream_chat(&srv.addr, &chat(1), |_| {});
    let paused_before = metric(&metrics(&srv.addr), "kiln:requests_paused_total ");
    // The same chat (another seed: not the cache's answer), and an inline
    // completion asked once its first text arrived.
    let addr = srv.addr.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let inline = std::thread::spawn(move || {
        rx.recv().unwrap();
        let (code, v) = complete(
            &addr,
            json!({"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(code, 200, "{v:#}");
    });
    let mut first = Some(tx);
    let mut chunks_after_inline = 0;
    let paused_text = stream_chat(&srv.addr, &chat(2), |_| {
        if let Some(tx) = first.take() {
            tx.send(()).unwrap();
        }
        if inline.is_finished() {
            chunks_after_inline += 1;
        }
    });
    inline.join().unwrap();
    assert!(
        chunks_after_inline > 0,
        "the inline completion came back only after the chat ended ({} chars)",
        alone.len()
    );
    assert_eq!(paused_text, alone, "pausing changed the chat's text");
    let paused = metric(&metrics(&srv.addr), "kiln:requests_paused_total ") - paused_before;
    assert!(paused >= 1.0, "the chat was never paused");
}

#[test]
fn an_inline_completion_pauses_a_running_chat_and_the_chat_goes_on_unchanged() {
    let home = Home::default();
    let srv = http_server_args(&home, &["--model", demo_model().to_str().unwrap()], &[]);
    inline_during_chat(&srv, None);
}

#[test]
fn models_taking_turns_pause_another_models_chat_for_an_inline_completion() {
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let chat = demo_copy(dir.path(), "chat");
    configure(
        &home,
        &format!(
            "[pool]\nparallel_models = false\n\n[models.chat]\nmodel = {:?}\n\n\
             [[routes]]\nkind = \"chat\"\nmodels = [\"chat\"]\n",
            chat.display()
        ),
    );
    let srv = http_server_args(&home, &["--model", demo_model().to_str().unwrap()], &[]);
    inline_during_chat(&srv, None);
    let list = models(&srv.addr);
    assert_eq!(model(&list, "chat")["kiln"]["loaded"], true, "{list:#?}");
}

#[test]
fn config_read_again_on_sighup_changes_the_models_and_routes_served() {
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let a = demo_copy(dir.path(), "a");
    let b = demo_copy(dir.path(), "b");
    let config = home.path().join("config.toml");
    std::fs::write(&config, format!("[models.a]\nmodel = {:?}\n", a.display())).unwrap();
    let srv = http_server_args(&home, &["--model", demo_model().to_str().unwrap()], &[]);
    let ask = |m: &str| {
        complete(
            &srv.addr,
            json!({"model": m, "prompt": "x = ", "max_tokens": 2}),
        )
        .0
    };
    assert_eq!(ask("a"), 200);
    assert_eq!(ask("b"), 404);
    let hup = |srv: &HttpServer| {
        // SAFETY: a plain kill(2) of the child we started.
        let sent = unsafe { libc::kill(srv.child.id() as i32, libc::SIGHUP) };
        assert_eq!(sent, 0);
    };
    let listed = |srv: &HttpServer| -> Vec<String> {
        models(&srv.addr)
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let wait_for = |want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while listed(&srv) != want {
            assert!(
                Instant::now() < deadline,
                "{:?} never became {want:?}",
                listed(&srv)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // `b` added, and every inline completion routed to it.
    std::fs::write(
        &config,
        format!(
            "[models.a]\nmodel = {:?}\n[models.b]\nmodel = {:?}\n\n[[routes]]\nkind = \"inline\"\nmodels = [\"b\"]\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    hup(&srv);
    wait_for(&["demo", "a", "b"]);
    assert_eq!(ask("b"), 200);
    let (_, v) = complete(&srv.addr, json!({"prompt": "y = ", "max_tokens": 2}));
    assert_eq!(v["model"], "b", "{v:#}");
    // A file that cannot be used changes nothing.
    std::fs::write(&config, "[[routes]]\nmodels = [\"nowhere\"]\n").unwrap();
    hup(&srv);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(listed(&srv), ["demo", "a", "b"]);
    let (_, v) = complete(&srv.addr, json!({"prompt": "z = ", "max_tokens": 2}));
    assert_eq!(v["model"], "b", "{v:#}");
    // `a` and the route removed: `a` goes (unloaded), requests go to the
    // first model again.
    std::fs::write(&config, format!("[models.b]\nmodel = {:?}\n", b.display())).unwrap();
    hup(&srv);
    wait_for(&["demo", "b"]);
    let (_, v) = complete(&srv.addr, json!({"prompt": "w = ", "max_tokens": 2}));
    assert_eq!(v["model"], "demo", "{v:#}");
    assert_eq!(ask("a"), 404);
    let m = metrics(&srv.addr);
    assert!(!m.contains("kiln:model_loaded{model=\"a\"}"), "{m}");
}

/// Sends the server SIGHUP and waits (15 s at most) until `/v1/models`
/// lists `mark`, a model only its new `config.toml` names.
fn reread_until_listed(srv: &HttpServer, mark: &str) {
    // SAFETY: a plain kill(2) of the child we started.
    let sent = unsafe { libc::kill(srv.child.id() as i32, libc::SIGHUP) };
    assert_eq!(sent, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !models(&srv.addr).iter().any(|m| m["id"] == mark) {
        assert!(Instant::now() < deadline, "config.toml was not read again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `VmLck` of process `pid`, in bytes.
fn locked_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = (status.lines())
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

#[test]
fn weights_are_locked_in_memory_when_asked() {
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let a = demo_copy(dir.path(), "a");
    let b = demo_copy(dir.path(), "b");
    configure(
        &home,
        &format!(
            "[pool]\nmlock = true\n\n[models.a]\nmodel = {:?}\n[models.b]\nmodel = {:?}\nmlock = false\n",
            a.display(),
            b.display()
        ),
    );
    let srv = http_server_args(&home, &["--model", demo_model().to_str().unwrap()], &[]);
    for m in ["a", "b"] {
        let (code, v) = complete(
            &srv.addr,
            json!({"model": m, "prompt": "x", "max_tokens": 2}),
        );
        assert_eq!(code, 200, "{v:#}");
    }
    let list = models(&srv.addr);
    let size = std::fs::metadata(demo_model()).unwrap().len();
    // SAFETY: plain libc calls that fill the struct given.
    let (root, limit) = unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r);
        (libc::geteuid() == 0, r.rlim_cur)
    };
    if root || limit == libc::RLIM_INFINITY || limit >= 3 * size {
        for m in ["demo", "a"] {
            let s = &model(&list, m)["kiln"];
            assert_eq!(s["locked_bytes"], size, "{m}: {s:#}");
        }
        assert_eq!(
            model(&list, "b")["kiln"]["locked_bytes"],
            0,
            "b said mlock = false"
        );
        assert!(
            locked_memory(srv.child.id()) >= 2 * size,
            "VmLck {} < {}",
            locked_memory(srv.child.id()),
            2 * size
        );
    } else {
        // The limit refuses it: said, and the model served all the same.
        let e = model(&list, "a")["kiln"]["lock_error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(e.contains("ulimit -l"), "{e}");
    }
}

/// The live threads of process `pid` named `prefix…`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

/// `[models.NAME] threads` runs that model's graphs on a pool of CPU
/// threads of its own (its workers are `kiln-own-N`), shown by
/// `/v1/models`; its greedy text is the text the shared pool gives.
#[test]
fn a_model_with_threads_of_its_own_runs_on_them_and_answers_the_same() {
    let Some(real) = kiln_tests::real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let home = Home::default();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    std::fs::copy(&real, &a).unwrap();
    std::fs::copy(&real, &b).unwrap();
    configure(
        &home,
        &format!(
            "[models.a]\nmodel = {:?}\n\n[models.b]\nmodel = {:?}\nthreads = 2\n",
            a.display(),
            b.display()
        ),
    );
    let srv = http_server_args(&home, &["--model", demo_model().to_str().unwrap()], &[]);
    let pid = srv.child.id();
    let prompt = "def fibonacci(n):\n    ";
    let mut texts = Vec::new();
    for m in ["a", "b"] {
        let (code, v) = complete(
            &srv.addr,
            json!({"model": m, "prompt": prompt, "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(code, 200, "{v:#}");
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert_eq!(texts[0], texts[1], "the same model on its own threads");
    let list = models(&srv.addr);
    assert_eq!(model(&list, "b")["kiln"]["threads"], 2);
    assert_eq!(model(&list, "a")["kiln"]["threads"], Value::Null);
    assert_eq!(
        threads_named(pid, "kiln-own"),
        1,
        "b's pool: its caller and one worker"
    );

    // A bad value makes the config invalid, named.
    configure(
        &home,
        &format!("[models.c]\nmodel = {:?}\nthreads = 0\n", a.display()),
    );
    let out = home.kiln(&["doctor"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("[models.c] threads = 0: give 1 to 1024"),
        "{text}"
    );
}

/// `kiln serve --max-memory` sets the pool's budget over `[pool]
/// max_memory_mb` (and keeps it through a reload); a first model larger
/// than it is refused at the start, naming the flag.
#[test]
fn the_command_lines_memory_budget_wins_over_the_config() {
    let home = Home::default();
    configure(&home, "[pool]\nmax_memory_mb = 100000\n");
    let demo = demo_model();
    let srv = http_server_args(
        &home,
        &["--model", demo.to_str().unwrap(), "--max-memory", "1.5G"],
        &[],
    );
    let budget = || metric(&metrics(&srv.addr), "kiln:pool_budget_bytes ");
    assert_eq!(budget(), (1536u64 << 20) as f64);
    // SIGHUP: config.toml read again (its new model served); the flag
    // still wins.
    let dir = tempfile::tempdir().unwrap();
    let extra = demo_copy(dir.path(), "extra");
    configure(
        &home,
        &format!(
            "[pool]\nmax_memory_mb = 200000\n\n[models.extra]\nmodel = {:?}\n",
            extra.display()
        ),
    );
    reread_until_listed(&srv, "extra");
    assert_eq!(budget(), (1536u64 << 20) as f64);
    drop(srv);

    let out = home.kiln(&[
        "serve",
        "--model",
        demo.to_str().unwrap(),
        "--http",
        "127.0.0.1:0",
        "--max-memory",
        "1M",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("but the pool's budget (--max-memory) is 1 MiB"),
        "{err}"
    );
    let out = home.kiln(&["serve", "--max-memory", "12X"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not a size"),
        "{err}"
    );
}

/// Models on a plugin's device count against that device's budget
/// (`[pool] max_device_memory_mb`, else its free memory): loading one
/// there that would not fit unloads the least recently used idle one
/// there, while the host's budget counts only their host copies; a model
/// larger than the device's budget is refused, naming the device.
#[test]
fn models_on_a_device_stay_within_its_memory_budget() {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture", &[]);
    let pdir = plugin_dir(home.path(), &lib, &ManifestSpec::new("accel", "1.0.0"));
    home.ok(&["plugins", "add", pdir.to_str().unwrap()]);
    home.ok(&["backends"]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        demo_copy(dir.path(), "a"),
        demo_copy(dir.path(), "b"),
        demo_copy(dir.path(), "c"),
    );
    // `mark` names a model only listed: it shows when the file was read.
    let models = |extra: &str, mark: &str| {
        format!(
            "{extra}[models.a]\nmodel = {:?}\nbackend = \"accel\"\n\
             [models.b]\nmodel = {:?}\nbackend = \"accel\"\n\
             [models.c]\nmodel = {:?}\nbackend = \"accel\"\n\
             [models.{mark}]\nmodel = {:?}\n",
            a.display(),
            b.display(),
            c.display(),
            a.display()
        )
    };
    configure(&home, &models("", "mark0"));
    let srv = http_server_args(
        &home,
        &[
            "--model",
            demo_model().to_str().unwrap(),
            "--backend",
            "cpu",
        ],
        &[],
    );
    let ask = |m: &str| {
        complete(
            &srv.addr,
            json!({"model": m, "prompt": "x = ", "max_tokens": 2, "temperature": 0}),
        )
    };
    // Without a device budget: the fixture's free memory (512 MiB) holds
    // both.
    assert_eq!(ask("a").0, 200);
    let list = self::models(&srv.addr);
    let need = model(&list, "a")["kiln"]["need_bytes"].as_u64().unwrap();
    assert_eq!(model(&list, "a")["kiln"]["device"], "accel:0", "{list:#?}");
    assert_eq!(ask("b").0, 200);
    let list = self::models(&srv.addr);
    assert_eq!(model(&list, "a")["kiln"]["loaded"], true);
    assert_eq!(model(&list, "b")["kiln"]["loaded"], true);
    // The host holds only their KV caches and work space (besides the
    // CPU's first model): less than the two models' whole needs.
    let used = metric(&metrics(&srv.addr), "kiln:pool_memory_bytes ");
    let on_cpu: u64 = (list.iter())
        .filter(|m| m["kiln"]["loaded"] == true && m["kiln"]["device"].is_null())
        .map(|m| m["kiln"]["need_bytes"].as_u64().unwrap())
        .sum();
    assert!(on_cpu > 0, "{list:#?}");
    assert!(
        used - (on_cpu as f64) < 2.0 * need as f64,
        "{used} ({on_cpu} on the CPU) of {need}"
    );

    // A device budget for two and a half of them: loading `c` unloads
    // `a`, the least recently used there.
    let mib = (need * 5 / 2).div_ceil(1 << 20);
    let reload = |text: String, mark: &str| {
        configure(&home, &text);
        reread_until_listed(&srv, mark);
    };
    reload(
        models(
            &format!("[pool]\nmax_device_memory_mb = {mib}\n\n"),
            "mark1",
        ),
        "mark1",
    );
    assert_eq!(ask("c").0, 200);
    let list = self::models(&srv.addr);
    let loaded = |m: &str| model(&list, m)["kiln"]["loaded"].as_bool().unwrap();
    assert!(!loaded("a") && loaded("b") && loaded("c"), "{list:#?}");
    assert!(
        loaded("demo"),
        "the CPU's model is not the device's to unload"
    );
    let m = metrics(&srv.addr);
    assert!(
        metric(
            &m,
            "kiln:model_unloads_total{model=\"a\",reason=\"budget\"}"
        ) >= 1.0,
        "{m}"
    );

    // Smaller than one model: refused, naming the device.
    reload(
        models("[pool]\nmax_device_memory_mb = 1\n\n", "mark2"),
        "mark2",
    );
    // (A prompt not answered before: the offline cache has nothing.)
    let (code, v) = complete(
        &srv.addr,
        json!({"model": "a", "prompt": "y = ", "max_tokens": 2}),
    );
    assert_eq!(code, 503, "{v:#}");
    let text = v.to_string();
    assert!(
        text.contains("of accel:0's memory but the pool's budget there is 1 MiB"),
        "{text}"
    );
    // `kiln doctor` says so before any request.
    let out = home.kiln(&["doctor"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("of accel:0's memory but its budget ([pool] max_device_memory_mb) is 1 MiB"),
        "{said}"
    );
    drop(srv);
    // A first model on the device larger than its budget: the server
    // does not start, and says why.
    let out = home.kiln(&[
        "serve",
        "--model",
        a.to_str().unwrap(),
        "--backend",
        "accel",
        "--http",
        "127.0.0.1:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("of accel:0's memory but its budget ([pool] max_device_memory_mb) is 1 MiB"),
        "{err}"
    );
}

/// With no `--backend`, each model runs on the best-scoring device that
/// runs its weight products: a device scored above the CPU that has no
/// products of a model's weight type is passed over for the CPU (said on
/// stderr), while a model whose products it runs goes to it — for `kiln
/// run`, `kiln serve`'s first model and a `[models]` entry alike.
#[test]
fn each_model_runs_on_the_best_device_that_runs_its_products() {
    use kiln_tests::tiny_llama;
    let home = Home::default();
    let lib = c_fixture("kiln_fixture", &[]);
    let pdir = plugin_dir(home.path(), &lib, &ManifestSpec::new("accel", "1.0.0"));
    home.ok(&["plugins", "add", pdir.to_str().unwrap()]);
    home.ok(&["backends"]);
    // The fixture's device (f32 products only) scored far above the CPU,
    // in the registry's cache of scores.
    let db = rusqlite::Connection::open(home.path().join("kiln.db")).unwrap();
    let raised = db
        .execute(
            "UPDATE device_scores SET score = 1e9 WHERE backend_key NOT LIKE 'builtin-cpu-%'",
            [],
        )
        .unwrap();
    assert!(raised >= 1);
    let (f32_model, f16_model) = (tiny_llama("f32"), tiny_llama("f16"));
    let run = |model: &std::path::Path| {
        let out = home.kiln(&[
            "run",
            model.to_str().unwrap(),
            "--prompt",
            "t1 t2",
            "--max-tokens",
            "2",
            "--json",
        ]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["backend"].as_str().unwrap().to_string(), err)
    };
    let (on, _) = run(&f32_model);
    assert!(on.starts_with("accel device 0"), "{on}");
    let (on, err) = run(&f16_model);
    assert!(on.starts_with("cpu device 0"), "{on}");
    assert!(
        err.contains("accel:0 scores")
            && err.contains("runs no products of")
            && err.contains("f16 weights"),
        "{err}"
    );

    // kiln serve: the first model (f16) on the CPU, a [models] entry (f32)
    // on the device.
    configure(
        &home,
        &format!("[models.fast]\nmodel = {:?}\n", f32_model.display()),
    );
    let srv = http_server_args(&home, &["--model", f16_model.to_str().unwrap()], &[]);
    let (code, v) = complete(
        &srv.addr,
        json!({"model": "fast", "prompt": "t1 t2", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v:#}");
    let list = models(&srv.addr);
    assert_eq!(
        model(&list, "fast")["kiln"]["device"],
        "accel:0",
        "{list:#?}"
    );
    let first = (list.iter())
        .find(|m| m["id"] != "fast")
        .unwrap_or_else(|| panic!("{list:#?}"));
    assert!(first["kiln"]["device"].is_null(), "{list:#?}");
}
