//! `kiln serve` against what editors and clients really send: text beyond
//! ASCII at every position in both position encodings, broken frames,
//! edits kiln cannot apply, concurrent writers of one home, requests whose
//! client left, prompts far over the context. Each runs the real binary
//! (LSP over stdio, HTTP over loopback).

use kiln_serve::demo::Client;
use kiln_tests::serve::{
    at, demo_model, error_code, http, http_server, initialize, open, post, serve, watchdog,
};
use kiln_tests::{Home, rewrite_gguf};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

fn session(home: &Home, root: &Path, options: Value, capabilities: Value) -> (Client, Value) {
    let mut c = serve(home, &[]);
    watchdog(c.pid(), Duration::from_secs(600));
    let init = c
        .request(
            "initialize",
            json!({"processId": null, "rootUri": format!("file://{}", root.display()),
                   "capabilities": capabilities, "initializationOptions": options}),
        )
        .unwrap();
    c.notify("initialized", json!({})).unwrap();
    (c, init)
}

fn message(r: &Value) -> String {
    r["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Lines mixing ASCII, accented Latin, CJK, emoji (surrogate pairs, a flag
/// of two) and combining marks.
const MIXED: &str = "s = 'café' # 中文 😀\nnaïve = \"e\u{301}\" + '🇫🇷'\r\n日本語 = 1\n\n😀x";

#[test]
fn non_ascii_text_is_completed_at_every_position_in_both_encodings() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    for (offered, encoding) in [
        (json!(null), "utf-16"),
        (json!(["utf-8", "utf-16"]), "utf-8"),
    ] {
        let (mut c, init) = session(
            &home,
            ws.path(),
            json!({"maxTokens": 2, "mode": "line", "workspaceContext": false}),
            json!({"general": {"positionEncodings": offered}}),
        );
        assert_eq!(
            init["result"]["capabilities"]["positionEncoding"], encoding,
            "{init}"
        );
        // The report: `é = 1`, the cursor after `é`.
        let uri = format!("file://{}/accent.py", ws.path().display());
        open(&mut c, &uri, "é = 1");
        let character = if encoding == "utf-8" { 2 } else { 1 };
        for method in ["textDocument/inlineCompletion", "textDocument/completion"] {
            let r = c.request(method, at(&uri, 0, character)).unwrap();
            assert!(r["result"]["items"].is_array(), "{method}: {r}");
        }
        let uri = format!("file://{}/mixed.py", ws.path().display());
        open(&mut c, &uri, MIXED);
        let lines: Vec<&str> = MIXED
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        let (mut answered, mut refused) = (0, 0);
        for (line, text) in lines.iter().enumerate() {
            let units = |c: char| {
                if encoding == "utf-8" {
                    c.len_utf8()
                } else {
                    c.len_utf16()
                }
            };
            let mut boundaries = vec![0];
            for ch in text.chars() {
                boundaries.push(boundaries.last().unwrap() + units(ch));
            }
            let end = *boundaries.last().unwrap();
            // Every code unit of the line, and two past its end (clamped).
            for character in 0..=end + 2 {
                let r = c
                    .request(
                        "textDocument/inlineCompletion",
                        at(&uri, line as u32, character as u32),
                    )
                    .unwrap();
                if boundaries.contains(&character) || character > end {
                    assert!(
                        r["result"]["items"].is_array(),
                        "{encoding} line {line} character {character}: {r}"
                    );
                    if let Some(item) = r["result"]["items"].get(0) {
                        assert_eq!(
                            item["range"]["start"],
                            json!({"line": line, "character": character})
                        );
                    }
                    answered += 1;
                } else {
                    assert_eq!(error_code(&r), -32602, "{encoding} {line}:{character} {r}");
                    assert!(message(&r).contains("inside a character"), "{r}");
                    refused += 1;
                }
            }
        }
        assert!(answered >= 60 && refused >= 4, "{answered} {refused}");
        // Past the last line: the end of the document.
        let r = c
            .request("textDocument/completion", at(&uri, 99, 0))
            .unwrap();
        assert!(r["result"]["items"].is_array(), "{r}");
        assert!(c.close().unwrap().success());
    }
}

#[test]
fn broken_frames_are_answered_and_the_session_goes_on() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    let (mut c, _) = session(&home, ws.path(), json!({}), json!({}));
    let body = r#"{"jsonrpc":"2.0","id":"lost","method":"kiln/models"}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "non-numeric",
            format!("Content-Length: abc\r\n\r\n{body}").into_bytes(),
        ),
        (
            "negative",
            format!("Content-Length: -5\r\n\r\n{body}").into_bytes(),
        ),
        (
            "missing",
            format!("Content-Type: x\r\n\r\n{body}").into_bytes(),
        ),
        (
            "too small",
            format!("Content-Length: 7\r\n\r\n{body}").into_bytes(),
        ),
        ("not UTF-8", {
            let mut v = b"Content-L\xffength: 10\r\n\r\n".to_vec();
            v.extend(body.bytes());
            v
        }),
    ];
    for (what, bytes) in cases {
        c.send_raw(&bytes).unwrap();
        let r = c.next_response().unwrap();
        assert_eq!(error_code(&r), -32700, "{what}: {r}");
        assert_eq!(r["id"], Value::Null);
        // The next valid request is read and answered.
        let r = c.request("kiln/models", Value::Null).unwrap();
        assert!(r["result"]["models"].is_array(), "{what}: {r}");
    }
    // A header value that is not UTF-8 is no reason to refuse a message.
    let mut raw = b"X-Junk: \xff\xfe\r\n".to_vec();
    raw.extend(format!("Content-Length: {}\r\n\r\n{body}", body.len()).bytes());
    c.send_raw(&raw).unwrap();
    assert!(c.next_response().unwrap()["result"].is_object());
    // A length of 10^12: answered, and the next message is not swallowed.
    c.send_raw(format!("Content-Length: 1000000000000\r\n\r\n{body}").as_bytes())
        .unwrap();
    let r = c.next_response().unwrap();
    assert_eq!(error_code(&r), -32600, "{r}");
    assert!(message(&r).contains("1000000000000"), "{r}");
    let r = c.request("kiln/models", Value::Null).unwrap();
    assert!(r["result"]["models"].is_array(), "{r}");
    // Ids that are neither strings nor integers.
    for id in [json!([1]), json!({"a": 1}), json!(true), json!(1.5)] {
        c.send(&json!({"jsonrpc": "2.0", "id": id, "method": "kiln/models"}))
            .unwrap();
        let r = c.next_response().unwrap();
        assert_eq!(error_code(&r), -32600, "{id}: {r}");
        assert_eq!(r["id"], Value::Null);
    }
    c.send(&json!({"jsonrpc": "2.0", "id": 5, "method": 7}))
        .unwrap();
    assert_eq!(error_code(&c.next_response().unwrap()), -32600);
    assert!(c.close().unwrap().success());
}

fn document(c: &mut Client, uri: &str) -> Value {
    let r = c
        .request("kiln/document", json!({"textDocument": {"uri": uri}}))
        .unwrap();
    r["result"].clone()
}

fn shown_errors(c: &Client) -> Vec<String> {
    c.notifications
        .iter()
        .filter(|n| n["method"] == "window/showMessage" && n["params"]["type"] == 1)
        .map(|n| {
            n["params"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn edits_kiln_cannot_apply_are_refused_where_the_editor_sees_them() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    let (mut c, _) = session(&home, ws.path(), json!({"maxTokens": 2}), json!({}));
    let uri = format!("file://{}/a.py", ws.path().display());
    open(&mut c, &uri, "abc\n");
    // A range that is not an object: refused, nothing inserted at the top.
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2},
               "contentChanges": [{"range": 5, "text": "INSERTED"}]}),
    )
    .unwrap();
    let d = document(&mut c, &uri);
    assert_eq!(d["text"], "abc\n");
    assert!(
        d["outOfSync"].as_str().unwrap().contains("not a range"),
        "{d}"
    );
    assert!(
        shown_errors(&c).iter().any(|m| m.contains(&uri)),
        "{:?}",
        c.notifications
    );
    let r = c
        .request("textDocument/inlineCompletion", at(&uri, 0, 3))
        .unwrap();
    assert_eq!(error_code(&r), -32803, "{r}");
    assert!(message(&r).contains("reopen"), "{r}");
    // The whole text again: in sync, completions come back.
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 3}, "contentChanges": [{"text": "x = 1\n"}]}),
    )
    .unwrap();
    assert_eq!(document(&mut c, &uri)["outOfSync"], Value::Null);
    let r = c
        .request("textDocument/inlineCompletion", at(&uri, 0, 5))
        .unwrap();
    assert!(r["result"]["items"].is_array(), "{r}");
    // A lone surrogate in an edit: the editor is told which document.
    let before = shown_errors(&c).len();
    let edit = format!(
        r#"{{"jsonrpc":"2.0","method":"textDocument/didChange","params":{{"textDocument":{{"uri":"{uri}","version":4}},"contentChanges":[{{"range":{{"start":{{"line":0,"character":0}},"end":{{"line":0,"character":0}}}},"text":"\ud83d"}}]}}}}"#
    );
    c.send_raw(format!("Content-Length: {}\r\n\r\n{edit}", edit.len()).as_bytes())
        .unwrap();
    let d = document(&mut c, &uri);
    assert!(
        d["outOfSync"].as_str().unwrap().contains("surrogate"),
        "{d}"
    );
    let shown = shown_errors(&c);
    assert!(
        shown.len() > before && shown.last().unwrap().contains(&uri),
        "{shown:?}"
    );
    // A request with one: refused with an error.
    let req = r#"{"jsonrpc":"2.0","id":"s","method":"textDocument/inlineCompletion","params":{"textDocument":{"uri":"file:///\udc00"},"position":{"line":0,"character":0}}}"#;
    c.send_raw(format!("Content-Length: {}\r\n\r\n{req}", req.len()).as_bytes())
        .unwrap();
    let r = c.next_response().unwrap();
    assert_eq!(
        (r["id"].clone(), error_code(&r)),
        (json!("s"), -32602),
        "{r}"
    );
    // A position that is not one.
    let r = c
        .request(
            "textDocument/completion",
            json!({"textDocument": {"uri": uri}, "position": {"line": -1, "character": 0}}),
        )
        .unwrap();
    assert_eq!(error_code(&r), -32602, "{r}");
    assert!(c.close().unwrap().success());
}

/// The editor's copy of a document: UTF-16 code units, edited as an
/// editor does (LSP's line breaks, positions clamped to their line and to
/// the text, refused inside a surrogate pair).
struct EditorText(Vec<u16>);

impl EditorText {
    fn offset(&self, line: u32, character: u32) -> Option<usize> {
        let (u, nl, cr) = (&self.0, b'\n' as u16, b'\r' as u16);
        let mut start = 0;
        for _ in 0..line {
            match u[start..].iter().position(|&c| c == nl || c == cr) {
                None => return Some(u.len()),
                Some(i) => {
                    let at = start + i;
                    start = at
                        + if u[at] == cr && u.get(at + 1) == Some(&nl) {
                            2
                        } else {
                            1
                        };
                }
            }
        }
        let end = u[start..]
            .iter()
            .position(|&c| c == nl || c == cr)
            .map_or(u.len(), |i| start + i);
        let at = (start + character as usize).min(end);
        let inside = at < end && (0xDC00..0xE000).contains(&u[at]);
        (!inside).then_some(at)
    }
}

fn arb_text() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "a", "x = 1", "é", "中文", "😀", "e\u{301}", "\n", "\r\n", "\r", " ", "🇫🇷",
    ]);
    prop::collection::vec(pieces, 0..10).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random edits at random positions (valid, past the end, inside
    /// surrogate pairs) and completions between them: the server never
    /// fails, and while every edit was valid its text is the editor's.
    #[test]
    fn random_edits_keep_kilns_copy_equal_to_the_editors(
        start in arb_text(),
        edits in prop::collection::vec((0u32..5, 0u32..12, 0u32..5, 0u32..12, arb_text()), 1..10),
    ) {
        static SERVER: std::sync::Mutex<Option<(Home, tempfile::TempDir, Client, u64)>> =
            std::sync::Mutex::new(None);
        let mut guard = SERVER.lock().unwrap_or_else(|p| p.into_inner());
        let (_, _, c, n) = guard.get_or_insert_with(|| {
            let home = Home::default();
            let ws = tempfile::tempdir().unwrap();
            let (c, _) = session(&home, ws.path(), json!({"maxTokens": 1, "workspaceContext": false}), json!({}));
            (home, ws, c, 0)
        });
        *n += 1;
        let uri = format!("file:///case{n}.py");
        open(c, &uri, &start);
        let mut editor = EditorText(start.encode_utf16().collect());
        let n_edits = edits.len();
        for (l1, c1, l2, c2, text) in edits {
            let (a, b) = (editor.offset(l1, c1), editor.offset(l2, c2));
            c.notify("textDocument/didChange", json!({"textDocument": {"uri": uri}, "contentChanges": [
                {"range": {"start": {"line": l1, "character": c1}, "end": {"line": l2, "character": c2}}, "text": text}]})).unwrap();
            let d = document(c, &uri);
            match (a, b) {
                (Some(a), Some(b)) if a <= b => {
                    editor.0.splice(a..b, text.encode_utf16());
                    prop_assert_eq!(d["outOfSync"].clone(), Value::Null);
                    prop_assert_eq!(d["text"].as_str().unwrap(), String::from_utf16(&editor.0).unwrap());
                }
                _ => {
                    prop_assert!(d["outOfSync"].is_string(), "{d}");
                    // Both start again from the whole text.
                    c.notify("textDocument/didChange", json!({"textDocument": {"uri": uri}, "contentChanges": [{"text": start}]})).unwrap();
                    editor = EditorText(start.encode_utf16().collect());
                }
            }
        }
        // A completion anywhere: items, or a position refused.
        let (line, character) = (n_edits as u32 % 5, n_edits as u32 * 7 % 12);
        let r = c.request("textDocument/inlineCompletion", at(&uri, line, character)).unwrap();
        prop_assert!(r["result"]["items"].is_array() || error_code(&r) == -32602, "{r}");
    }
}

/// The demo model with another `general.name` (so another sha256).
fn renamed_demo_model(dst: &Path, name: &str) {
    rewrite_gguf(&demo_model(), dst, |meta| {
        meta.iter_mut()
            .find(|(k, _)| k == "general.name")
            .unwrap()
            .1 = kiln_runtime::gguf::Value::String(name.into());
    });
}

fn blobs(home: &Home) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(home.path().join("models/blobs"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn several_kiln_processes_share_one_home() {
    let home = Home::default();
    let files: Vec<_> = (0..6)
        .map(|i| {
            let p = home.path().join(format!("m{i}.gguf"));
            renamed_demo_model(&p, &format!("coder-{i}"));
            p
        })
        .collect();
    // Six adds at once on a new home: all land, as versions 1 to 6.
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            home.command(&["models", "add", f.to_str().unwrap(), "--name", "coder"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list = home.json(&["models", "list", "--json"]);
    let models = list["models"].as_array().unwrap();
    let mut versions: Vec<u64> = models
        .iter()
        .map(|m| m["version"].as_u64().unwrap())
        .collect();
    versions.sort();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    assert_eq!(models.iter().filter(|m| m["state"] == "active").count(), 1);
    assert_eq!(blobs(&home).len(), 6);
    // Activations and rollbacks at once, beside two running servers.
    let mut server = serve(&home, &[]);
    watchdog(server.pid(), Duration::from_secs(300));
    initialize(&mut server, home.path(), json!({}));
    let mut second = serve(&home, &[]);
    watchdog(second.pid(), Duration::from_secs(300));
    initialize(&mut second, home.path(), json!({}));
    let children: Vec<_> = (1..=6)
        .map(|v| {
            let spec = format!("coder@{v}");
            let args: Vec<&str> = if v % 2 == 0 {
                vec!["models", "rollback", "coder"]
            } else {
                vec!["models", "activate", &spec]
            };
            home.command(&args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for s in [&mut server, &mut second] {
        let r = s.request("kiln/models", Value::Null).unwrap();
        assert_eq!(r["result"]["models"].as_array().unwrap().len(), 6, "{r}");
        let r = s.request("kiln/backends", Value::Null).unwrap();
        assert!(r["result"]["devices"].is_array(), "{r}");
    }
    for child in children {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("locked") && !err.contains("move it away"),
            "{err}"
        );
    }
    let list = home.json(&["models", "list", "--json"]);
    let active = list["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "active")
        .count();
    assert_eq!(active, 1, "{list}");
    assert!(server.close().unwrap().success());
    assert!(second.close().unwrap().success());

    // A registry held by another writer: kiln waits its turn.
    let holder = std::thread::spawn({
        let db = home.path().join("kiln.db");
        move || {
            let conn = rusqlite::Connection::open(db).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            conn.execute_batch("COMMIT").unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    home.ok(&["models", "rollback", "coder"]);
    holder.join().unwrap();

    // An add the registry refuses after the copy: the copy is taken back.
    let conn = rusqlite::Connection::open(home.path().join("kiln.db")).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER refuse_doomed BEFORE INSERT ON models WHEN NEW.name = 'doomed'
         BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END;",
    )
    .unwrap();
    drop(conn);
    let doomed = home.path().join("doomed.gguf");
    renamed_demo_model(&doomed, "doomed");
    let err = home.fails(&[
        "models",
        "add",
        doomed.to_str().unwrap(),
        "--name",
        "doomed",
    ]);
    assert!(err.contains("refused by a test trigger"), "{err}");
    assert_eq!(blobs(&home).len(), 6, "{:?}", blobs(&home));

    // What a killed add leaves: reported, then removed on request.
    let dir = home.path().join("models/blobs");
    std::fs::write(dir.join(format!("sha256-{}", "0".repeat(64))), b"half").unwrap();
    std::fs::write(dir.join(".incoming-999999999-00000000"), b"partial").unwrap();
    let out = home.kiln(&["models", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["orphans"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["problems"], 2, "{v}");
    home.ok(&["models", "verify", "--remove-orphans"]);
    assert_eq!(blobs(&home).len(), 6);
    home.ok(&["models", "verify"]);
}

/// Raw request bytes for `POST path` with a JSON body.
fn raw_post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn abandoned_http_requests_stop_during_their_prompt() {
    let home = Home::default();
    let srv = http_server(&home);
    watchdog(srv.child.id(), Duration::from_secs(600));
    let a = srv.addr.as_str();
    // About 3,000 prompt tokens each (the demo vocabulary has one token per
    // word or character here).
    let prompt: String = (0..1000).map(|i| format!("v{} ", i % 10)).collect();
    let body =
        json!({"model": "demo", "prompt": prompt, "max_tokens": 4, "temperature": 0}).to_string();
    for _ in 0..3 {
        let mut s = TcpStream::connect(a).unwrap();
        s.write_all(&raw_post("/v1/completions", &body)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
    }
    // A real request right after: answered.
    let (code, v) = post(
        a,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "x = ", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let metrics = loop {
        let (_, m) = http(a, "GET", "/metrics", b"");
        if metric(
            &m,
            "kiln:request_success_total{finished_reason=\"cancelled\"}",
        ) >= 3.0
        {
            break m;
        }
        assert!(Instant::now() < deadline, "{m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Prompt tokens evaluated: the real request's and what the first
    // abandoned one got through before its client was noticed gone, far
    // fewer than the three prompts.
    let one_prompt = v["usage"]["prompt_tokens"].as_f64().unwrap();
    let evaluated = metric(&metrics, "kiln:prompt_tokens_total");
    assert!(
        evaluated < 2.0 * 3000.0 + one_prompt,
        "{evaluated} prompt tokens evaluated:\n{metrics}"
    );
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

#[test]
fn oversized_prompts_are_refused_with_bounded_work_and_memory() {
    let home = Home::default();
    let srv = http_server(&home);
    watchdog(srv.child.id(), Duration::from_secs(600));
    let a = srv.addr.clone();
    let (code, _) = post(
        &a,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(code, 200);
    let before = rss_mib(srv.child.id());
    let prompt = "fn main() { println!(\"é中😀\"); }\n".repeat(3_900_000 / 40);
    let body = json!({"model": "demo", "prompt": prompt, "max_tokens": 4}).to_string();
    assert!(body.len() < 4 << 20);
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let (a, body) = (a.clone(), body.clone());
            std::thread::spawn(move || http(&a, "POST", "/v1/completions", body.as_bytes()))
        })
        .collect();
    let (code, _) = http(&a, "GET", "/healthz", b"");
    assert_eq!(code, 200);
    for c in clients {
        let (code, text) = c.join().unwrap();
        assert_eq!(code, 400, "{}", &text[..text.len().min(300)]);
        assert!(text.contains("context_length_exceeded"), "{text}");
    }
    let grown = rss_mib(srv.child.id()) - before;
    assert!(grown < 256.0, "resident memory grew by {grown:.0} MiB");

    // Integral floats are integers; fractions are not.
    let (code, v) = post(
        &a,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "x", "max_tokens": 4.0, "n": 1.0}),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) = post(
        &a,
        "/v1/completions",
        &json!({"model": "demo", "prompt": "x", "max_tokens": 4.5}),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not an integer"),
        "{v}"
    );

    // A client that never finishes its headers is cut off; others are
    // served meanwhile.
    let mut slow = TcpStream::connect(&a).unwrap();
    slow.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(http(&a, "GET", "/healthz", b"").0, 200);
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(30),
        "the connection stayed open {waited:?}"
    );
    let reply = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "{reply}"
    );
}
