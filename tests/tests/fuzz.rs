//! Bounded, seeded fuzz runs of what parses hostile bytes: the language
//! server's framing (in process, and against the real `kiln serve`), the
//! HTTP API's request bodies (against the real server on loopback) and
//! the GGUF header with the metadata read from it (config, tokenizer).
//! Each run is deterministic for its seed and stops after its iteration
//! count or time budget (`KILN_FUZZ_SECONDS` raises the budget); a failure
//! names its seed and iteration. What a run found is kept as a test below
//! or in the module it concerned.

use kiln_runtime::gguf::GgufFile;
use kiln_serve::lsp::{Frame, FrameReader};
use kiln_tests::Home;
use kiln_tests::fuzz::{Mutator, run_for};
use kiln_tests::serve::{demo_model, http_server, initialize, serve, watchdog};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

fn budget(default_s: u64) -> Duration {
    let s = std::env::var("KILN_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_s);
    Duration::from_secs(s)
}

fn frame(body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!("Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

fn lsp_seeds() -> Vec<Vec<u8>> {
    let messages = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}}),
        json!({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {"uri": "file:///a.py", "languageId": "python", "version": 1, "text": "é = 1\n😀"}}}),
        json!({"jsonrpc": "2.0", "method": "textDocument/didChange", "params": {"textDocument": {"uri": "file:///a.py", "version": 2}, "contentChanges": [{"range": {"start": {"line": 0, "character": 1}, "end": {"line": 1, "character": 2}}, "text": "中"}]}}),
        json!({"jsonrpc": "2.0", "id": "x", "method": "textDocument/inlineCompletion", "params": {"textDocument": {"uri": "file:///a.py"}, "position": {"line": 0, "character": 1}}}),
        json!({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "x"}}),
    ];
    let mut seeds: Vec<Vec<u8>> = messages.iter().map(frame).collect();
    seeds.push(seeds.concat());
    seeds
}

const LSP_WORDS: &[&[u8]] = &[
    b"Content-Length: ",
    b"content-length:",
    b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n",
    b"\r\n\r\n",
    b"\r\n",
    b"\\ud800",
    b"\\udc00",
    b"\\u0000",
    b"99999999999999999999",
    b"\"jsonrpc\":\"2.0\"",
    b"\"id\":[1]",
    b"\"method\":7",
];

#[test]
fn fuzz_lsp_framing_in_process() {
    let seeds = lsp_seeds();
    let mut m = Mutator::new(0x6b696c6e, LSP_WORDS);
    let mut frames = 0usize;
    let n = run_for(200_000, budget(20), |i| {
        let seed = &seeds[m.rng().usize(..seeds.len())];
        let input = m.mutate(seed, &seeds);
        let mut r = FrameReader::with_limit(&input[..], 4096);
        // Every byte is read once at most, so the frames are fewer than
        // the bytes: the reader cannot loop without consuming input.
        for k in 0.. {
            match r.next_frame() {
                Ok(Some(f)) => {
                    frames += 1;
                    if let Frame::TooLarge(n) = f {
                        assert!(n > 4096, "iteration {i}: {n}");
                    }
                }
                Ok(None) => break,
                Err(e) => panic!("iteration {i}: reading from memory failed: {e}"),
            }
            assert!(k <= input.len(), "iteration {i}: frames without end");
        }
    });
    eprintln!("lsp framing: {n} inputs, {frames} frames");
    assert!(n >= 1000);
}

/// Mutated messages sent to the real server, each followed by a valid
/// request that must be answered. Declared lengths are never raised and no
/// header is planted in a body, so that the server is never owed bytes it
/// would rightly wait for.
#[test]
fn fuzz_lsp_against_the_server() {
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    let mut c = serve(&home, &[]);
    watchdog(c.pid(), Duration::from_secs(600));
    initialize(
        &mut c,
        ws.path(),
        json!({"maxTokens": 1, "workspaceContext": false}),
    );
    let bodies: Vec<Vec<u8>> = lsp_seeds()[..5]
        .iter()
        .map(|f| {
            let at = f.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            f[at..].to_vec()
        })
        .collect();
    let words: Vec<&[u8]> = LSP_WORDS
        .iter()
        .copied()
        .filter(|w| !w.to_ascii_lowercase().starts_with(b"content-") && !w.starts_with(b"\r\n"))
        .collect();
    let mut m = Mutator::new(0x6c7370, &words);
    let n = run_for(400, budget(30), |i| {
        let k = m.rng().usize(..bodies.len());
        let body = m.mutate(&bodies[k], &bodies);
        let header = match m.rng().u8(0..6) {
            0 => "Content-Length: nope\r\n\r\n".to_string(),
            1 => format!("Content-Length: -{}\r\n\r\n", body.len()),
            2 => "Content-Type: x\r\n\r\n".to_string(),
            3 => format!("Content-Length: {}\r\n\r\n", body.len() / 2),
            _ => format!("Content-Length: {}\r\n\r\n", body.len()),
        };
        let mut bytes = header.into_bytes();
        bytes.extend_from_slice(&body);
        c.send_raw(&bytes).unwrap();
        let r = c
            .request("kiln/models", Value::Null)
            .unwrap_or_else(|e| panic!("iteration {i}: the server is gone: {e}"));
        assert!(r["result"]["models"].is_array(), "iteration {i}: {r}");
    });
    eprintln!("lsp server: {n} mutated messages");
    assert!(c.close().unwrap().success());
}

/// One request over a fresh connection; `None` when the server took longer
/// than `wait` (the connection is dropped, which cancels the job).
fn post_raw(addr: &str, path: &str, body: &[u8], wait: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_string()))
}

/// Replaces one value anywhere in `v` (an object's field, an array's item,
/// or a new field) with a value of another type or an edge of its range.
fn mutate_json(rng: &mut fastrand::Rng, v: &mut Value) {
    let pick = rng.u8(0..14);
    let replacement = || -> Value {
        match pick {
            0 => Value::Null,
            1 => json!(-1),
            2 => json!(0),
            3 => json!(1.5),
            4 => json!(1e300),
            5 => json!(i64::MAX),
            6 => json!(""),
            7 => json!("\u{0}\u{ffff}é😀"),
            8 => json!([]),
            9 => json!({}),
            10 => json!(true),
            11 => json!([1, "a", null]),
            12 => json!(4.0),
            _ => json!("x".repeat(5000)),
        }
    };
    match v {
        Value::Object(o) if !o.is_empty() && rng.bool() => {
            let k = o.keys().nth(rng.usize(..o.len())).unwrap().clone();
            if rng.u8(0..4) == 0 {
                o[&k] = replacement();
            } else {
                mutate_json(rng, &mut o[&k]);
            }
        }
        Value::Object(o) => {
            let keys = [
                "max_tokens",
                "n",
                "stop",
                "suffix",
                "messages",
                "prompt",
                "logprobs",
                "echo",
                "best_of",
                "temperature",
                "top_p",
                "seed",
                "stream",
                "model",
            ];
            o.insert(keys[rng.usize(..keys.len())].to_string(), replacement());
        }
        Value::Array(a) if !a.is_empty() => {
            let i = rng.usize(..a.len());
            mutate_json(rng, &mut a[i]);
        }
        other => *other = replacement(),
    }
}

#[test]
fn fuzz_http_request_bodies() {
    let home = Home::default();
    let srv = http_server(&home);
    watchdog(srv.child.id(), Duration::from_secs(600));
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("/v1/completions", json!({"model": "demo", "prompt": "def f(é):", "suffix": "\n", "max_tokens": 2, "temperature": 0, "stop": ["\n"], "seed": 3}).to_string().into_bytes()),
        ("/v1/completions", json!({"model": "demo", "prompt": ["x = "], "max_tokens": 1.0, "stream": true, "top_p": 0.5, "n": 1}).to_string().into_bytes()),
        ("/v1/chat/completions", json!({"model": "demo", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "中文 😀"}], "max_tokens": 2}).to_string().into_bytes()),
    ];
    let others: Vec<Vec<u8>> = seeds.iter().map(|s| s.1.clone()).collect();
    let words: &[&[u8]] = &[
        b"\"max_tokens\":",
        b"\"stream\":true",
        b"null",
        b"-1",
        b"1e400",
        b"[]",
        b"{}",
        b"\"\\ud800\"",
        b"\"messages\":",
        b"\"role\":\"tool\"",
        b"4096",
        b"0.0",
    ];
    let mut m = Mutator::new(0x68747470, words);
    let mut statuses = std::collections::BTreeMap::new();
    let n = run_for(400, budget(40), |i| {
        let (path, seed) = &seeds[m.rng().usize(..seeds.len())];
        // Half the inputs are broken bytes, half well-formed JSON with
        // values of the wrong type or range.
        let body = if m.rng().bool() {
            m.mutate(seed, &others)
        } else {
            let mut v: Value = serde_json::from_slice(seed).unwrap();
            mutate_json(m.rng(), &mut v);
            v.to_string().into_bytes()
        };
        let Some((status, text)) = post_raw(&srv.addr, path, &body, Duration::from_secs(2)) else {
            *statuses.entry(0).or_insert(0) += 1;
            return;
        };
        *statuses.entry(status).or_insert(0) += 1;
        assert!(
            status == 200 || (400..500).contains(&status),
            "iteration {i}: {status} for {:?}:\n{text}",
            String::from_utf8_lossy(&body)
        );
        if status != 200 {
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("iteration {i}: {status} without a JSON error: {text}"));
            assert!(v["error"]["message"].is_string(), "iteration {i}: {v}");
        }
    });
    eprintln!("http bodies: {n} requests, statuses {statuses:?} (0: slower than 2 s, dropped)");
    let (code, _) = kiln_tests::serve::http(&srv.addr, "GET", "/healthz", b"");
    assert_eq!(code, 200);
}

/// The GGUF header and what kiln reads from its metadata: the model
/// configuration (every tensor's shape checked) and the tokenizer.
fn read_header(bytes: Vec<u8>) {
    let Ok(f) = GgufFile::from_bytes(Path::new("fuzzed.gguf"), bytes) else {
        return;
    };
    let _ = kiln_runtime::model::ModelConfig::from_gguf(&f);
    let _ = kiln_runtime::tokenizer::Tokenizer::from_gguf(&f);
}

#[test]
fn fuzz_gguf_header() {
    // The header (metadata, vocabulary included, and the tensor table) is
    // mutated; the tensor data after it stays as it is.
    let model = std::fs::read(demo_model()).unwrap();
    let data_offset = GgufFile::open(&demo_model()).unwrap().data_offset as usize;
    let (seed, data) = model.split_at(data_offset);
    let seeds = vec![seed.to_vec()];
    let words: &[&[u8]] = &[
        b"GGUF",
        b"general.architecture",
        b"llama",
        b"tokenizer.ggml.tokens",
        b"tokenizer.ggml.model",
        b"llama.block_count",
        b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    ];
    let mut m = Mutator::new(0x67677566, words);
    let n = run_for(50_000, budget(30), |_| {
        let mut bytes = m.mutate(seed, &seeds);
        bytes.extend_from_slice(data);
        read_header(bytes)
    });
    eprintln!("gguf header: {n} inputs of {} bytes", seed.len());
    assert!(n >= 200);
}
