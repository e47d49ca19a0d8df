//! `kiln serve` and `kiln demo` as a client sees them: the language server
//! over stdio (our client, and Neovim's), the HTTP API over TCP (raw
//! requests, and the `openai` Python package), hostile input of each kind.

use kiln_serve::demo::Client;
use kiln_tests::serve::{
    at, demo_model, error_code, http, http_server, initialize, open, post, serve, status, watchdog,
};
use kiln_tests::{Home, python, repo_root};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_language_server_completes_and_survives_bad_input() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(
        ws.path().join("shapes.py"),
        "def circle_area(radius):\n    return 3.14159 * radius * radius\n",
    )
    .unwrap();
    std::fs::write(ws.path().join(".gitignore"), "out/\n").unwrap();
    std::fs::create_dir(ws.path().join("out")).unwrap();
    std::fs::write(
        ws.path().join("out/generated.py"),
        "def generated():\n    pass\n",
    )
    .unwrap();
    let mut c = serve(&home, &[]);

    // Before initialize: requests are refused, the session goes on.
    let r = c.request("kiln/status", Value::Null).unwrap();
    assert_eq!(error_code(&r), -32002, "{r}");

    let init = initialize(&mut c, ws.path(), json!({"maxTokens": 8}));
    let caps = &init["result"]["capabilities"];
    assert_eq!(caps["inlineCompletionProvider"], json!(true), "{init}");
    assert_eq!(caps["textDocumentSync"]["change"], json!(2));
    assert_eq!(init["result"]["serverInfo"]["name"], "kiln");

    // Malformed JSON: a parse error with a null id.
    c.send_raw(b"Content-Length: 9\r\n\r\n{\"jsonrpc").unwrap();
    let r = c.next_response().unwrap();
    assert_eq!(error_code(&r), -32700, "{r}");
    assert_eq!(r["id"], Value::Null);
    // Not JSON-RPC.
    c.send_raw(b"Content-Length: 2\r\n\r\n[]").unwrap();
    assert_eq!(error_code(&c.next_response().unwrap()), -32600);
    // A header without Content-Length.
    c.send_raw(b"Content-Type: x\r\n\r\n").unwrap();
    assert_eq!(error_code(&c.next_response().unwrap()), -32700);
    // Unknown method.
    let r = c.request("textDocument/teleport", json!({})).unwrap();
    assert_eq!(error_code(&r), -32601, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("teleport"));
    // Unknown notifications are ignored; bad params are named.
    c.notify("$/somethingNew", json!({})).unwrap();
    let r = c
        .request(
            "textDocument/completion",
            json!({"textDocument": {"uri": "file:///nope.py"}}),
        )
        .unwrap();
    assert_eq!(error_code(&r), -32602, "{r}");
    let r = c
        .request(
            "textDocument/inlineCompletion",
            at("file:///never-opened.py", 0, 0),
        )
        .unwrap();
    assert_eq!(error_code(&r), -32602);
    assert!(r["error"]["message"].as_str().unwrap().contains("didOpen"));

    // A 100 MB message is read past and answered; the server keeps serving.
    let big = 100 * 1024 * 1024;
    let mut msg = format!("Content-Length: {big}\r\n\r\n").into_bytes();
    msg.resize(msg.len() + big, b' ');
    c.send_raw(&msg).unwrap();
    drop(msg);
    let r = c.next_response().unwrap();
    assert_eq!(error_code(&r), -32600, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("104857600")
    );

    // Completions, both kinds, on an edited document.
    let uri = format!("file://{}/main.py", ws.path().display());
    open(
        &mut c,
        &uri,
        "from shapes import circle_area\n\n\ndef area(r):\n    return \n",
    );
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2}, "contentChanges": [
            {"range": {"start": {"line": 4, "character": 11}, "end": {"line": 4, "character": 11}}, "text": "circle"},
        ]}),
    )
    .unwrap();
    let r = c
        .request("textDocument/inlineCompletion", at(&uri, 4, 17))
        .unwrap();
    let items = r["result"]["items"].as_array().expect("items");
    let meta = &r["result"]["kiln"];
    assert!(meta["prompt_tokens"].as_u64().unwrap() > 0, "{r}");
    if let Some(item) = items.first() {
        assert!(item["insertText"].is_string());
        assert_eq!(item["range"]["start"], json!({"line": 4, "character": 17}));
    }
    // The same place again: the completion cache answers.
    let r2 = c
        .request("textDocument/inlineCompletion", at(&uri, 4, 17))
        .unwrap();
    // The same text; each item has its own id for kiln.accepted.
    let texts = |r: &Value| -> Vec<Value> {
        (r["result"]["items"].as_array().unwrap().iter())
            .map(|i| i["insertText"].clone())
            .collect()
    };
    assert_eq!(texts(&r2), texts(&r));
    assert_ne!(
        r2["result"]["kiln"]["completion"],
        r["result"]["kiln"]["completion"]
    );
    assert_eq!(
        r2["result"]["kiln"]["completion_cache_hit"],
        json!(true),
        "{r2}"
    );
    // One more character: the KV cache keeps the shared prefix.
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 3}, "contentChanges": [
            {"range": {"start": {"line": 4, "character": 17}, "end": {"line": 4, "character": 17}}, "text": "_"},
        ]}),
    )
    .unwrap();
    let r = c
        .request("textDocument/completion", at(&uri, 4, 18))
        .unwrap();
    assert!(r["result"]["items"].is_array(), "{r}");
    if let Some(item) = r["result"]["items"].as_array().unwrap().first() {
        assert_eq!(
            item["textEdit"]["range"]["start"],
            json!({"line": 4, "character": 18})
        );
        let cached = item["data"]["cached_tokens"].as_u64().unwrap();
        let fresh = item["data"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            cached > fresh,
            "typing one character reuses the prompt's prefix: {item}"
        );
    }

    let s = status(&mut c);
    assert_eq!(s["architecture"], "llama");
    assert_eq!(
        s["fim_template"], "qwen",
        "the demo vocabulary has Qwen's FIM tokens"
    );
    assert!(s["prefix_cache_hit_rate"].as_f64().unwrap() > 0.0, "{s}");
    assert_eq!(s["completion_cache_hits"], json!(1));
    assert_eq!(s["open_documents"], json!(1));
    // The workspace is indexed in the background (out/ is ignored).
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&mut c)["workspace"]["files"] != json!(1) {
        assert!(Instant::now() < deadline, "workspace never indexed");
        std::thread::sleep(Duration::from_millis(50));
    }
    for m in ["kiln/models", "kiln/plugins", "kiln/backends"] {
        let r = c.request(m, Value::Null).unwrap();
        assert!(r.get("result").is_some(), "{m}: {r}");
    }
    let r = c
        .request("kiln/activateModel", json!({"model": "nothing"}))
        .unwrap();
    assert_eq!(error_code(&r), -32602);
    let r = c
        .request("kiln/activateModel", json!({"model": "nothing@3"}))
        .unwrap();
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not registered"),
        "{r}"
    );
    // Progress for the model load was reported.
    assert!(
        c.notifications
            .iter()
            .any(|n| n["method"] == "$/progress" && n["params"]["value"]["kind"] == "end"),
        "{:?}",
        c.notifications
    );
    let code = c.close().unwrap();
    assert!(code.success(), "{code}");
}

#[test]
fn cancelling_stops_generation_and_newer_requests_supersede_older_ones() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    let mut c = serve(&home, &[]);
    initialize(
        &mut c,
        ws.path(),
        json!({"maxTokens": 3000, "mode": "none"}),
    );
    let uri = format!("file://{}/a.py", ws.path().display());
    // Greedy decoding of the demo model runs to maxTokens from these texts
    // (checked with `kiln run --temperature 0`); others end early.
    open(&mut c, &uri, "def total_area(shapes):\n    total = 0\n");
    // kiln/status is answered once the model is loaded: from here a
    // completion request starts generating at once (a request cancelled
    // while the model loads is answered, but never reaches the engine).
    status(&mut c);

    // $/cancelRequest: answered RequestCancelled, generation stops.
    let id = c
        .request_async("textDocument/inlineCompletion", at(&uri, 1, 13))
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    c.notify("$/cancelRequest", json!({"id": id})).unwrap();
    let r = c.wait(id).unwrap();
    assert_eq!(error_code(&r), -32800, "{r}");
    let s = status(&mut c);
    assert_eq!(s["cancelled"], json!(1), "{s}");
    assert!(
        s["last_tokens_after_cancel"].as_u64().unwrap() <= 1,
        "tokens generated after the cancel: {s}"
    );

    // A new request for the same document cancels the running one, which
    // is answered with no items.
    let first = c
        .request_async("textDocument/inlineCompletion", at(&uri, 1, 13))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"text": "def total_area(shapes):\n    total = 10\n"}]}),
    )
    .unwrap();
    let second = c
        .request_async("textDocument/inlineCompletion", at(&uri, 1, 14))
        .unwrap();
    let r = c.wait(first).unwrap();
    assert_eq!(r["result"]["items"], json!([]), "{r}");
    // kiln/status answers while the second one generates.
    let t0 = Instant::now();
    let s = status(&mut c);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(s["cancelled"], json!(2), "{s}");
    c.notify("$/cancelRequest", json!({"id": second})).unwrap();
    assert_eq!(error_code(&c.wait(second).unwrap()), -32800);
    assert!(status(&mut c)["max_tokens_after_cancel"].as_u64().unwrap() <= 1);

    // A client that vanishes mid-request: the server ends, exit code 1
    // (no shutdown), and does not hang.
    c.request_async("textDocument/inlineCompletion", at(&uri, 1, 13))
        .unwrap();
    let t0 = Instant::now();
    let code = c.hang_up().unwrap();
    assert_eq!(code.code(), Some(1));
    assert!(t0.elapsed() < Duration::from_secs(30));
}

/// The demo model with another `general.name` (so another sha256).
/// Debounce (`--debounce-ms`, `[completion] debounce_ms`, the client's
/// `debounceMs`): an automatic inline completion waits before it starts,
/// and the next keystroke's request cancels it unstarted; one the user
/// invokes does not wait.
#[test]
fn a_debounced_completion_is_cancelled_unstarted_by_the_next_keystroke() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        "[completion]\ndebounce_ms = 300\n",
    )
    .unwrap();
    let mut c = serve(&home, &[]);
    initialize(&mut c, ws.path(), json!({"maxTokens": 4, "mode": "none"}));
    let uri = format!("file://{}/a.py", ws.path().display());
    open(&mut c, &uri, "def total_area(shapes):\n    total = 0\n");
    status(&mut c);
    let automatic = |line: u32, character: u32| {
        let mut p = at(&uri, line, character);
        p["context"] = json!({"triggerKind": 2});
        p
    };
    let first = c
        .request_async("textDocument/inlineCompletion", automatic(1, 13))
        .unwrap();
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"text": "def total_area(shapes):\n    total = 10\n"}]}),
    )
    .unwrap();
    let second = c
        .request_async("textDocument/inlineCompletion", automatic(1, 14))
        .unwrap();
    let r = c.wait(first).unwrap();
    assert_eq!(r["result"]["items"], json!([]), "{r}");
    let s = status(&mut c);
    assert_eq!(s["cancelled"], json!(1), "{s}");
    assert_eq!(s["last_tokens_after_cancel"], json!(0), "unstarted: {s}");
    let r = c.wait(second).unwrap();
    let meta = &r["result"]["kiln"];
    // Held for its debounce (less the time before it was queued).
    assert!(
        meta["total_ms"].as_f64().unwrap() >= 250.0,
        "not debounced: {r}"
    );
    // Invoked by the user: answered without the wait being a cancel.
    let mut invoked = at(&uri, 1, 14);
    invoked["context"] = json!({"triggerKind": 1});
    let r = c.request("textDocument/inlineCompletion", invoked).unwrap();
    assert!(r["result"]["items"].is_array(), "{r}");
    // Out of range from the client: refused, the previous one kept.
    c.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"kiln": {"debounceMs": 99999}}}),
    )
    .unwrap();
    status(&mut c);
    assert!(
        c.notifications
            .iter()
            .any(|n| n["method"] == "window/logMessage"
                && n["params"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("debounceMs"))),
        "{:#?}",
        c.notifications
    );
    c.close().unwrap();
}

fn renamed_demo_model(dst: &Path, name: &str) {
    kiln_tests::rewrite_gguf(&demo_model(), dst, |meta| {
        meta.iter_mut()
            .find(|(k, _)| k == "general.name")
            .unwrap()
            .1 = kiln_runtime::gguf::Value::String(name.into());
    });
}

#[test]
fn the_editor_switches_and_rolls_back_models_through_the_server() {
    let home = Home::default();
    let v2 = home.path().join("v2.gguf");
    renamed_demo_model(&v2, "coder-second");
    home.ok(&[
        "models",
        "add",
        demo_model().to_str().unwrap(),
        "--name",
        "coder",
    ]);
    home.ok(&["models", "add", v2.to_str().unwrap(), "--name", "coder"]);
    // Each version served is locked in memory.
    std::fs::write(home.path().join("config.toml"), "[pool]\nmlock = true\n").unwrap();
    // No --model: the registry's active model (coder@2, the newest).
    let mut c = Client::spawn({
        let mut cmd = home.command(&["serve"]);
        cmd.env("KILN_THREADS", "1");
        cmd
    })
    .unwrap();
    initialize(&mut c, home.path(), json!({"maxTokens": 4}));
    assert_eq!(status(&mut c)["model"], "coder@2");
    let models = c.request("kiln/models", Value::Null).unwrap();
    assert_eq!(
        models["result"]["models"].as_array().unwrap().len(),
        2,
        "{models}"
    );
    let r = c
        .request("kiln/activateModel", json!({"model": "coder@1"}))
        .unwrap();
    assert_eq!(r["result"]["serving"], "coder@1", "{r}");
    assert_eq!(status(&mut c)["model"], "coder@1");

    // Completions go on with the new model.
    let uri = format!("file://{}/x.py", home.path().display());
    open(&mut c, &uri, "x = 1\n");
    let r = c
        .request("textDocument/inlineCompletion", at(&uri, 0, 5))
        .unwrap();
    assert!(r["result"]["items"].is_array(), "{r}");
    let served = r["result"]["kiln"]["completion"]
        .as_str()
        .map(str::to_string);
    // coder@1's weights are the ones locked now (coder@2's went with its
    // session, which the completion replaced).
    // SAFETY: a plain libc call.
    if unsafe { libc::geteuid() } == 0 {
        let models = c.request("kiln/models", Value::Null).unwrap();
        let first = &models["result"]["served"][0];
        let size = std::fs::metadata(demo_model()).unwrap().len();
        assert_eq!(first["locked_bytes"], size, "{first:#}");
        let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid())).unwrap();
        let locked: u64 = (status.lines())
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert!(locked << 10 >= size, "VmLck {locked} kB < {size} bytes");
    }
    let r = c
        .request("kiln/rollbackModel", json!({"name": "coder"}))
        .unwrap();
    assert_eq!(r["result"]["serving"], "coder@2", "{r}");
    assert_eq!(status(&mut c)["model"], "coder@2");
    // A completion coder@1 served is not explained by coder@2: refused,
    // naming both (an explanation by another model's weights would be
    // of another completion).
    let served = served.unwrap_or_else(|| panic!("coder@1 served no completion id"));
    let r = c.request("kiln/explain", json!({"id": served})).unwrap();
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("was served by coder@1") && message.contains("now serves coder@2"),
        "{r}"
    );
    // The registry saw it all, with the server as the actor.
    let log = home.ok(&["models", "list", "--json"]);
    let v: Value = serde_json::from_str(&log).unwrap();
    let active: Vec<&Value> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "active")
        .collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["version"], 2);
    assert!(c.close().unwrap().success());
}

#[test]
fn a_model_that_cannot_load_is_reported_not_fatal() {
    let home = Home::default();
    let bad = home.path().join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let mut c = Client::spawn({
        let mut cmd = home.command(&["serve", "--model", bad.to_str().unwrap()]);
        cmd.stderr(Stdio::null());
        cmd
    })
    .unwrap();
    initialize(&mut c, home.path(), Value::Null);
    let r = c.request("kiln/status", Value::Null).unwrap();
    assert_eq!(error_code(&r), -32803, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("broken.gguf"),
        "{r}"
    );
    let logs: Vec<&Value> = c
        .notifications
        .iter()
        .filter(|n| n["method"] == "window/logMessage")
        .collect();
    assert!(!logs.is_empty());
    // Bad settings are refused with a message; the server stays up.
    c.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"kiln": {"maxTokens": -4}}}),
    )
    .unwrap();
    let r = c.request("kiln/models", Value::Null).unwrap();
    assert!(r["result"]["models"].is_array(), "{r}");
    assert!(c.close().unwrap().success());
}

// ---------------------------------------------------------------- HTTP

#[test]
fn the_http_api_answers_validates_and_keeps_serving() {
    let home = Home::default();
    let srv = http_server(&home);
    let a = srv.addr.as_str();
    let (code, body) = http(a, "GET", "/healthz", b"");
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(a, "GET", "/v1/models", b"");
    assert_eq!(code, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    let id = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(id, "demo");

    let (code, v) = post(
        a,
        "/v1/completions",
        &json!({"model": id, "prompt": "def add(a, b):", "suffix": "\n", "max_tokens": 5, "temperature": 0, "seed": 1}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap() <= 5,
        "{v}"
    );
    // Without `model`, the served one answers (as llama.cpp's server
    // does); the same greedy text. Another model's id is a 404.
    let (code, without) = post(
        a,
        "/v1/completions",
        &json!({"prompt": "def add(a, b):", "suffix": "\n", "max_tokens": 5, "temperature": 0, "seed": 1}),
    );
    assert_eq!(code, 200, "{without}");
    assert_eq!(without["choices"][0]["text"], v["choices"][0]["text"]);
    assert_eq!(without["model"], id.as_str(), "{without}");
    let (code, other) = post(
        a,
        "/v1/completions",
        &json!({"model": "elsewhere", "prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(code, 404, "{other}");
    assert_eq!(other["error"]["code"], "model_not_found", "{other}");

    let (code, v) = post(
        a,
        "/v1/chat/completions",
        &json!({"model": id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // OpenAI's content parts, joined into the text the template sees.
    let (code, v) = post(
        a,
        "/v1/chat/completions",
        &json!({"model": id, "messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}], "max_tokens": 2}),
    );
    assert_eq!(code, 200, "{v}");

    // Each bad request: 4xx in OpenAI's error shape, naming the problem.
    let bad = |body: &[u8], path: &str, want: u16, words: &str| {
        let (code, text) = http(a, "POST", path, body);
        assert_eq!(code, want, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words), "{msg:?} should mention {words:?}");
        assert!(v["error"]["type"].is_string());
    };
    let big = vec![b' '; 5 * 1024 * 1024];
    bad(&big, "/v1/completions", 413, "larger than");
    bad(
        b"{\"model\": \"\xff\xfe\"}",
        "/v1/completions",
        400,
        "UTF-8",
    );
    bad(b"{\"model\": ", "/v1/completions", 400, "JSON");
    let j = |v: Value| v.to_string().into_bytes();
    bad(
        &j(json!({"model": "gpt-9", "prompt": "x"})),
        "/v1/completions",
        404,
        "gpt-9",
    );
    bad(
        &j(json!({"model": id, "prompt": "x", "max_tokens": -1})),
        "/v1/completions",
        400,
        "max_tokens",
    );
    bad(
        &j(json!({"model": id, "prompt": "x", "max_tokens": 1_000_000})),
        "/v1/completions",
        400,
        "max_tokens",
    );
    bad(
        &j(json!({"model": id, "prompt": "x", "temperature": 9})),
        "/v1/completions",
        400,
        "temperature",
    );
    bad(
        &j(json!({"model": id, "prompt": "x", "top_p": 0})),
        "/v1/completions",
        400,
        "top_p",
    );
    bad(
        &j(json!({"model": id, "prompt": "x", "n": 3})),
        "/v1/completions",
        400,
        "n must be 1",
    );
    bad(
        &j(json!({"model": id, "prompt": 7})),
        "/v1/completions",
        400,
        "prompt",
    );
    bad(
        &j(json!({"model": id, "prompt": "x", "stop": [1]})),
        "/v1/completions",
        400,
        "stop",
    );
    bad(
        &j(json!({"model": id, "messages": []})),
        "/v1/chat/completions",
        400,
        "messages",
    );
    bad(
        &j(json!({"model": id, "messages": [{"role": "wizard", "content": "x"}]})),
        "/v1/chat/completions",
        400,
        "role",
    );
    bad(
        &j(
            json!({"model": id, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        ),
        "/v1/chat/completions",
        400,
        "text parts",
    );
    bad(
        &j(json!({"model": id, "prompt": "x".repeat(20000)})),
        "/v1/completions",
        400,
        "context",
    );
    let (code, _) = http(a, "GET", "/v2/nothing", b"");
    assert_eq!(code, 404);

    // Streaming, with a client that leaves mid-stream; the server goes on.
    let mut s = TcpStream::connect(a).unwrap();
    let body = json!({"model": id, "prompt": "x = ", "max_tokens": 3000, "stream": true, "temperature": 0}).to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    let mut data_lines = 0;
    while data_lines < 3 {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("data: ") {
            data_lines += 1;
        }
    }
    // /metrics answers while that generation runs.
    let t0 = Instant::now();
    let (code, metrics) = http(a, "GET", "/metrics", b"");
    assert_eq!(code, 200);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(metrics.contains("kiln:num_requests_running 1"), "{metrics}");
    drop(r);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (_, m) = http(a, "GET", "/metrics", b"");
        if m.contains("finished_reason=\"cancelled\"") {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the vanished client's generation never stopped:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for name in [
        "kiln:request_success_total",
        "kiln:time_to_first_token_seconds_bucket",
        "kiln:e2e_request_latency_seconds_bucket",
        "kiln:inter_token_latency_seconds_bucket",
        "kiln:prompt_tokens_total",
        "kiln:generation_tokens_total",
        "kiln:prefix_cache_hits_total",
        "kiln:prefix_cache_queries_total",
        "kiln:backend_ops_total",
        "kiln:backend_fallbacks_total",
        "kiln:backend_transfer_bytes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let (code, _) = http(a, "GET", "/healthz", b"");
    assert_eq!(code, 200);
}

#[test]
fn http_refuses_non_loopback_addresses_unless_asked() {
    let home = Home::default();
    let model = demo_model();
    let err = home.fails(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--http",
        "0.0.0.0:0",
    ]);
    assert!(err.contains("--allow-remote"), "{err}");
    let err = home.fails(&[
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--http",
        "localhost",
    ]);
    assert!(err.contains("127.0.0.1:8080"), "{err}");
    let err = home.fails(&["serve", "--http", "127.0.0.1:0"]);
    assert!(err.contains("kiln models add"), "{err}");
}

#[test]
fn the_openai_python_client_talks_to_kiln() {
    let ok = Command::new(python())
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("KILN_REQUIRE_OPENAI").is_none(),
            "KILN_REQUIRE_OPENAI is set but {} cannot import openai",
            python().display()
        );
        eprintln!("the openai package is not installed; skipping");
        return;
    }
    let home = Home::default();
    let srv = http_server(&home);
    let out = Command::new(python())
        .arg(repo_root().join("tests/oracle/openai_client.py"))
        .arg(format!("http://{}/v1", srv.addr))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["model"], "demo");
    assert!(v["stream_chunks"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(
        v["stream_text"], v["text"],
        "streamed and whole answers agree (greedy): {v}"
    );
    assert_eq!(v["not_found_status"], 404);
}

#[test]
fn neovim_gets_completions_from_kiln() {
    let nvim = Command::new("nvim").arg("--version").output();
    if !nvim.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("KILN_REQUIRE_NVIM").is_none(),
            "KILN_REQUIRE_NVIM is set but nvim is not installed (apt-get install neovim)"
        );
        eprintln!("nvim is not installed; skipping");
        return;
    }
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    let file = ws.path().join("main.py");
    std::fs::write(&file, "def add(a, b):\n    return a\n").unwrap();
    let out = ws.path().join("result.json");
    let model = demo_model();
    let status = Command::new("nvim")
        .args(["--headless", "-n", "-i", "NONE", "-u", "NONE", "-c"])
        .arg(format!(
            "luafile {}",
            repo_root().join("tests/fixtures/nvim_lsp.lua").display()
        ))
        .arg(&file)
        .env("KILN_BIN", kiln_tests::kiln_bin())
        .env("KILN_MODEL", &model)
        .env("KILN_HOME", home.path())
        .env("KILN_THREADS", "1")
        .env("KILN_RESULT", &out)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&out).unwrap_or_else(|_| {
        panic!(
            "nvim wrote no result:\n{}\n{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        )
    });
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["server_name"], "kiln", "{v}");
    let items = v["items"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert!(!items.is_empty(), "{v}");
    assert_eq!(items[0]["detail"], "kiln");
    assert!(items[0]["textEdit"]["newText"].is_string());
}

/// One prompt path: a completion asked over LSP and over HTTP with the
/// same prefix and suffix gets the same prompt (token count) and, greedy,
/// the same text.
#[test]
fn the_language_server_and_the_http_api_make_the_same_prompt() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    let (prefix, suffix) = ("def area(r):\n    return 3.14 * r", "\n\nprint(area(2))\n");
    let mut c = serve(&home, &[]);
    initialize(
        &mut c,
        ws.path(),
        json!({"maxTokens": 6, "mode": "none", "workspaceContext": false}),
    );
    let uri = format!("file://{}/a.py", ws.path().display());
    open(&mut c, &uri, &format!("{prefix}{suffix}"));
    let r = c
        .request("textDocument/inlineCompletion", at(&uri, 1, 16))
        .unwrap();
    let meta = &r["result"]["kiln"];
    let lsp_prompt =
        meta["prompt_tokens"].as_u64().unwrap() + meta["cached_tokens"].as_u64().unwrap();
    let lsp_text = r["result"]["items"][0]["insertText"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(c.close().unwrap().success());

    let srv = http_server(&home);
    let (code, v) = post(
        &srv.addr,
        "/v1/completions",
        &json!({"model": "demo", "prompt": prefix, "suffix": suffix, "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        lsp_prompt,
        "{v} {r}"
    );
    assert_eq!(v["choices"][0]["text"], lsp_text, "{v} {r}");
}

#[test]
fn kiln_demo_serves_the_active_model_then_one_found_elsewhere_and_else_kiln_code() {
    let home = Home::default();
    // Nothing registered: kiln-code, the model kiln trained itself, from
    // the binary (written under KILN_HOME once), said so.
    let v = home.json(&["demo", "--keystrokes", "2", "--max-tokens", "2", "--json"]);
    assert_eq!(v["report"]["model"], "kiln-code", "{v}");
    let shipped =
        std::fs::read(kiln_tests::repo_root().join("models/kiln-code/kiln-code.gguf")).unwrap();
    assert_eq!(
        std::fs::read(home.path().join("demo/kiln-code.gguf")).unwrap(),
        shipped
    );
    let out = home.ok(&["demo", "--keystrokes", "2", "--max-tokens", "2"]);
    assert!(out.contains("the model is kiln-code"), "{out}");
    assert!(out.contains("kiln models add FILE.gguf"), "{out}");
    assert!(
        out.contains("kiln pull hf:Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:Q8_0"),
        "{out}"
    );
    // A model in LM Studio's folder: the demo serves it, and says how to
    // import it.
    let studio = home.user_home().join(".lmstudio/models/pub/repo");
    std::fs::create_dir_all(&studio).unwrap();
    renamed_demo_model(&studio.join("studio-coder.gguf"), "studio");
    let out = home.ok(&["demo", "--keystrokes", "2", "--max-tokens", "2"]);
    assert!(
        out.contains("serving studio-coder from lmstudio:pub/repo/studio-coder.gguf")
            && out.contains("kiln models import"),
        "{out}"
    );
    assert!(!out.contains("RANDOM"), "{out}");
    // A model added (and so active): the demo serves it, by name.
    let m = home.path().join("mine.gguf");
    renamed_demo_model(&m, "mine");
    home.ok(&["models", "add", m.to_str().unwrap(), "--name", "mine"]);
    let out = home.ok(&["demo", "--keystrokes", "2", "--max-tokens", "2"]);
    assert!(out.contains("serving the active model, mine@1"), "{out}");
    assert!(!out.contains("RANDOM"), "{out}");
    let v = home.json(&["demo", "--keystrokes", "2", "--max-tokens", "2", "--json"]);
    assert_eq!(v["report"]["model"], "mine@1", "{v}");
    assert_eq!(v["report"]["requests"], 2, "{v}");
}

/// `kiln context` shows what a completion at a position sends: the
/// snippets the cursor needs (a definition from another file, not an
/// unrelated file), each with its exact token count, and the whole prompt,
/// whose token count is the tokenizer's; the `kiln/context` request over
/// LSP shows the same, and the completion then sends exactly that many
/// tokens. Positions past the file, files not open and missing files get
/// clear errors.
#[test]
fn kiln_context_shows_the_prompt_a_completion_sends() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(
        ws.path().join("shapes.py"),
        "def circle_area(radius):\n    return 3.14159 * radius * radius\n",
    )
    .unwrap();
    std::fs::write(
        ws.path().join("net.py"),
        "def fetch(url):\n    return urlopen(url).read()\n",
    )
    .unwrap();
    let main = "from shapes import circle_area\n\ndef wheel():\n    return circle_area(4)\n";
    std::fs::write(ws.path().join("main.py"), main).unwrap();
    let model = demo_model();
    let cli = |extra: &[&str]| {
        let mut args = vec![
            "context",
            "--workspace",
            ws.path().to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let args = cli(&["--file", "main.py", "--line", "3", "--character", "23"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let shown = home.json(&args);
    // The index was persisted, and a second run reads it back.
    assert_eq!(shown["workspace"]["index"]["parsed"], 3, "{shown:#}");
    // The index's memory, and the process's (Linux).
    let bytes = shown["workspace"]["memory_bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes < 1 << 20, "{shown:#}");
    assert!(shown["process"]["peak_resident_bytes"].as_u64().unwrap() > bytes);
    assert!(home.path().join("cache/index.db").exists());
    let again = home.json(&args);
    assert_eq!(again["workspace"]["index"]["reused"], 3, "{again:#}");
    assert_eq!(again["prompt"], shown["prompt"]);
    // With encryption at rest it is kept in memory only.
    let sealed = Home::default();
    sealed.ok(&["store", "encrypt"]);
    let s = sealed.json(&args);
    assert_eq!(s["workspace"]["index"]["parsed"], 3, "{s:#}");
    assert_eq!(s["prompt"], shown["prompt"]);
    assert!(!sealed.path().join("cache/index.db").exists());
    let snippets = shown["snippets"].as_array().unwrap();
    assert_eq!(snippets[0]["path"], "shapes.py", "{shown:#}");
    assert_eq!(snippets[0]["start_line"], 0);
    assert_eq!(snippets[0]["end_line"], 2);
    assert!(
        snippets[0]["why"].as_str().unwrap().contains("defines"),
        "{shown:#}"
    );
    assert!(
        snippets.iter().all(|s| s["path"] != "net.py"),
        "an unrelated file stays out: {shown:#}"
    );
    let spent: u64 = snippets.iter().map(|s| s["tokens"].as_u64().unwrap()).sum();
    assert_eq!(shown["context_tokens"].as_u64().unwrap(), spent);
    assert!(spent <= shown["context_budget"].as_u64().unwrap());
    let tok = kiln_runtime::model::Model::load(&model)
        .unwrap()
        .tokenizer()
        .unwrap();
    let prompt = shown["prompt"].as_str().unwrap();
    assert!(prompt.contains("def circle_area"), "{prompt}");
    assert_eq!(
        shown["prompt_tokens"].as_u64().unwrap() as usize,
        tok.encode(prompt, true).unwrap().len(),
        "the count is the tokenizer's"
    );

    // The language server shows the same, and sends it.
    let mut c = serve(&home, &[]);
    initialize(&mut c, ws.path(), json!({"maxTokens": 4, "mode": "none"}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&mut c)["workspace"]["files"] != json!(3) {
        assert!(Instant::now() < deadline, "the workspace is never indexed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        status(&mut c)["workspace"]["memory_bytes"],
        shown["workspace"]["memory_bytes"]
    );
    let uri = format!("file://{}/main.py", ws.path().display());
    let r = c.request("kiln/context", at(&uri, 3, 23)).unwrap();
    assert_eq!(error_code(&r), -32602, "not open yet: {r}");
    open(&mut c, &uri, main);
    let r = c.request("kiln/context", at(&uri, 3, 23)).unwrap();
    let over_lsp = &r["result"];
    // The same snippets (their scores move with the files' age).
    let placed = |v: &Value| -> Vec<(Value, Value, Value, Value)> {
        (v["snippets"].as_array().unwrap().iter())
            .map(|s| {
                let f = |k: &str| s[k].clone();
                (f("path"), f("start_line"), f("end_line"), f("tokens"))
            })
            .collect()
    };
    assert_eq!(placed(over_lsp), placed(&shown), "{r}");
    assert_eq!(over_lsp["prompt"], shown["prompt"], "{r}");
    assert_eq!(over_lsp["prompt_tokens"], shown["prompt_tokens"], "{r}");
    let r = c
        .request("textDocument/inlineCompletion", at(&uri, 3, 23))
        .unwrap();
    let meta = &r["result"]["kiln"];
    let sent = meta["prompt_tokens"].as_u64().unwrap() + meta["cached_tokens"].as_u64().unwrap();
    assert_eq!(sent, shown["prompt_tokens"].as_u64().unwrap(), "{r}");
    // The completion shown is the line's second query from now on: the
    // context shows it, and the next completion sends that prompt.
    let completion = r["result"]["items"][0]["insertText"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!completion.trim().is_empty(), "{r}");
    let r = c.request("kiln/context", at(&uri, 3, 23)).unwrap();
    assert_eq!(r["result"]["second_query"], completion.as_str(), "{r:#}");
    let again = c
        .request("textDocument/inlineCompletion", at(&uri, 3, 23))
        .unwrap();
    let meta = &again["result"]["kiln"];
    let sent = meta["prompt_tokens"].as_u64().unwrap() + meta["cached_tokens"].as_u64().unwrap();
    assert_eq!(
        sent,
        r["result"]["prompt_tokens"].as_u64().unwrap(),
        "{again}"
    );
    let r = c.request("kiln/context", at(&uri, 2, 0)).unwrap();
    assert!(
        r["result"].get("second_query").is_none(),
        "another line: {r:#}"
    );
    // Lines changed in another open document (the edit ring, fed by
    // didChange) come into the context with the lines around them.
    let net_uri = format!("file://{}/net.py", ws.path().display());
    let net: String = "def fetch(url):\n    return urlopen(url).read()\n".to_string()
        + &(0..30)
            .map(|i| format!("PAD_{i} = {i}\n"))
            .collect::<String>();
    open(&mut c, &net_uri, &net);
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": net_uri, "version": 2}, "contentChanges": [
            {"range": {"start": {"line": 20, "character": 0}, "end": {"line": 20, "character": 0}},
             "text": "WHEEL_RADIUS = circle_area(4)\n"}]}),
    )
    .unwrap();
    let r = c.request("kiln/context", at(&uri, 3, 23)).unwrap();
    let edit = (r["result"]["snippets"].as_array().unwrap().iter())
        .find(|s| s["resolution"] == "edit")
        .unwrap_or_else(|| panic!("no edited range: {r:#}"));
    assert_eq!(edit["path"], "net.py", "{r:#}");
    assert_eq!(
        (edit["start_line"].as_u64(), edit["end_line"].as_u64()),
        (Some(17), Some(24)),
        "{r:#}"
    );
    assert!(edit["why"].as_str().unwrap().contains("edited"), "{r:#}");
    assert!(c.close().unwrap().success());

    // Clear errors.
    let fails = |extra: &[&str]| {
        let mut args = cli(extra);
        args.retain(|a| a != "--json");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        home.fails(&args)
    };
    let past = fails(&["--file", "main.py", "--line", "9", "--character", "0"]);
    assert!(
        past.contains("--line 9 is past the end of main.py (4 lines"),
        "{past}"
    );
    let missing = fails(&["--file", "gone.py", "--line", "0", "--character", "0"]);
    assert!(
        missing.contains("--file") && missing.contains("gone.py"),
        "{missing}"
    );
}

/// Files saved while kiln serves reach the index: a save (or the client's
/// watched-file notice) indexes again in the background, parsing only
/// what changed, and the next completion's context can hold the new
/// definition.
#[test]
fn saved_files_reach_the_index_without_a_restart() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(
        ws.path().join("shapes.py"),
        "def circle_area(r):\n    return 3.14 * r * r\n",
    )
    .unwrap();
    let mut c = serve(&home, &[]);
    watchdog(c.pid(), Duration::from_secs(300));
    initialize(&mut c, ws.path(), json!({"maxTokens": 2}));
    let definitions = |c: &mut Client| status(c)["workspace"]["definitions"].as_u64();
    let wait_for = |c: &mut Client, want: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while definitions(c) != Some(want) {
            assert!(Instant::now() < deadline, "{}", status(c));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&mut c, 1);
    // A new file with two definitions, then a save of another document.
    std::fs::write(
        ws.path().join("sizes.py"),
        "def square_area(side):\n    return side * side\n\nLIMIT = 10\n",
    )
    .unwrap();
    let uri = format!("file://{}/main.py", ws.path().display());
    open(&mut c, &uri, "x = square_area(");
    c.notify(
        "textDocument/didSave",
        json!({"textDocument": {"uri": uri}}),
    )
    .unwrap();
    wait_for(&mut c, 3);
    let ctx = c
        .request(
            "kiln/context",
            json!({"textDocument": {"uri": uri}, "position": {"line": 0, "character": 16}}),
        )
        .unwrap();
    let snippets = ctx["result"]["snippets"].as_array().unwrap();
    assert!(snippets.iter().any(|s| s["path"] == "sizes.py"), "{ctx:#}");
    // A file removed, through the watched-files notice.
    std::fs::remove_file(ws.path().join("shapes.py")).unwrap();
    c.notify(
        "workspace/didChangeWatchedFiles",
        json!({"changes": [{"uri": format!("file://{}/shapes.py", ws.path().display()), "type": 3}]}),
    )
    .unwrap();
    wait_for(&mut c, 2);
    assert!(c.close().unwrap().success());
}

/// `kiln serve --kv-type q8_0` over HTTP: completions from a q8_0 cache;
/// a prompt the server moved away from comes back from the prefix tree
/// (counted in /metrics), and the cache's bytes are reported.
#[test]
fn a_served_q8_0_cache_and_a_prompt_switched_back_to_from_the_prefix_tree() {
    let home = Home::default();
    let srv = kiln_tests::serve::http_server_with(&home, &demo_model(), &["--kv-type", "q8_0"]);
    let file = |name: &str| {
        (0..60)
            .map(|i| format!("def {name}_{i}(x):\n    return x + {i}\n"))
            .collect::<String>()
    };
    let (a, b) = (file("alpha"), file("beta"));
    // The first file again, typed on: its start comes from the tree.
    let again = format!("{a}def gamma(");
    let (texts, metrics) = kiln_tests::serve::completions_then_metrics(&srv, &[&a, &b, &again]);
    assert_eq!(texts.len(), 3);
    let restored = kiln_tests::serve::metric(&metrics, "kiln:prefix_tree_restored_tokens_total");
    assert!(restored > 100, "{metrics}");
    assert!(kiln_tests::serve::metric(&metrics, "kiln:kv_cache_bytes") > 0);
    assert!(kiln_tests::serve::metric(&metrics, "kiln:prefix_tree_bytes") > 0);
}
