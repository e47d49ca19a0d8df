//! Bounded fuzzing in CI, seeded with real inputs: the GGUF parser with the
//! headers of released models, the tokenizer with a real vocabulary, the
//! language server's framing with broken streams, JSON-RPC messages and
//! HTTP request bodies against running servers, and the policy loader
//! with changed WebAssembly modules and random inputs. Each target runs
//! `KILN_FUZZ_CASES` cases (default 300) or `KILN_FUZZ_SECONDS` seconds
//! (default 20), whichever ends first, from a fixed seed
//! (`KILN_FUZZ_SEED` to explore others), and reports what it ran. A
//! crash (a panic, a dead server, a 5xx) fails the test; what it found
//! becomes a test of its own.

use kiln_serve::lsp::framing::{Frame, FrameReader};
use kiln_tests::serve::{http, http_server, serve};
use kiln_tests::{Home, policies_dir, real_model};
use serde_json::{Value, json};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::{Duration, Instant};

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn seeded(target: &str) -> Rng {
        let base: u64 = std::env::var("KILN_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6b69_6c6e);
        let mut h = base ^ 0xcbf2_9ce4_8422_2325;
        for b in target.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        Rng(h | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}

/// The cases and the time each target may take.
struct Budget {
    cases: usize,
    until: Instant,
    ran: usize,
}

impl Budget {
    fn new() -> Budget {
        let env = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Budget {
            cases: env("KILN_FUZZ_CASES", 300) as usize,
            until: Instant::now() + Duration::from_secs(env("KILN_FUZZ_SECONDS", 20)),
            ran: 0,
        }
    }

    fn more(&mut self) -> bool {
        let go = self.ran < self.cases && Instant::now() < self.until;
        if go {
            self.ran += 1;
        }
        go
    }
}

/// `seed` with a few random changes: bits flipped, bytes set, 32- and
/// 64-bit fields set to edge values (lengths, counts, types), ranges cut,
/// repeated or inserted, the end cut.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        if b.is_empty() {
            b.push(rng.next() as u8);
        }
        let at = rng.below(b.len());
        match rng.below(7) {
            0 => b[at] ^= 1 << rng.below(8),
            1 => b[at] = rng.next() as u8,
            2 => {
                let edge = *rng.pick(&[
                    0u64,
                    1,
                    2,
                    7,
                    13,
                    255,
                    1 << 31,
                    u32::MAX as u64,
                    1 << 40,
                    u64::MAX / 2,
                    u64::MAX,
                ]);
                let width = if rng.below(2) == 0 { 4 } else { 8 };
                for (k, byte) in edge.to_le_bytes()[..width].iter().enumerate() {
                    if let Some(x) = b.get_mut(at + k) {
                        *x = *byte;
                    }
                }
            }
            3 => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                b.drain(at..end);
            }
            4 => {
                let end = (at + 1 + rng.below(64)).min(b.len());
                let copy = b[at..end].to_vec();
                let to = rng.below(b.len());
                b.splice(to..to, copy);
            }
            5 => {
                let n = rng.below(16);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(at..at, junk);
            }
            _ => b.truncate(at),
        }
    }
    b
}

fn report(target: &str, ran: usize, detail: &str) {
    eprintln!("fuzz {target}: {ran} executions, 0 crashes{detail}");
}

#[test]
fn gguf_headers_of_released_models() {
    // The released models' headers (metadata and tensor tables; their
    // tensors lie past the seed, so a changed header is read to the end
    // and refused there), and a whole small generated model, whose
    // changed copies also parse.
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    for file in [
        "smollm2-135m-instruct-q4_1.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let Some(path) = real_model(file) else {
            continue;
        };
        let f = kiln_runtime::gguf::GgufFile::open(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        seeds.push((
            file.to_string(),
            bytes[..(f.data_offset as usize + 4096).min(bytes.len())].to_vec(),
        ));
    }
    let tiny = kiln_tests::tiny_model(&["--arch", "llama", "--dtype", "f16", "--vocab", "300"]);
    seeds.push(("a generated llama".into(), std::fs::read(&tiny).unwrap()));
    for (file, seed) in &seeds {
        let file = file.as_str();
        let mut rng = Rng::seeded(file);
        let mut budget = Budget::new();
        let mut parsed = 0;
        while budget.more() {
            let input = mutate(&mut rng, seed);
            let r = catch_unwind(AssertUnwindSafe(|| {
                kiln_runtime::gguf::GgufFile::from_bytes(Path::new(file), input)
                    .map(|g| g.tensors.len())
            }));
            match r {
                Err(_) => panic!(
                    "the GGUF parser panicked on a changed header of {file} (case {})",
                    budget.ran
                ),
                Ok(Ok(_)) => parsed += 1,
                Ok(Err(e)) => assert!(!e.to_string().is_empty()),
            }
        }
        report(
            &format!("gguf {file}"),
            budget.ran,
            &format!(", {parsed} parsed"),
        );
    }
}

/// Text of code, words in several scripts, emoji, whitespace runs,
/// control characters and special-token look-alikes, at random.
fn random_text(rng: &mut Rng) -> String {
    const PARTS: &[&str] = &[
        "fn ",
        "def ",
        "return x",
        "    ",
        "\t",
        "\n",
        "\r\n",
        " ",
        "{",
        "}",
        "(",
        ")",
        "::",
        "->",
        "é",
        "ß",
        "中文",
        "日本語",
        "한국어",
        "Ωμέγα",
        "кириллица",
        "עברית",
        "العربية",
        "हिन्दी",
        "😀",
        "👩‍💻",
        "🏳️‍🌈",
        "\u{200b}",
        "\u{feff}",
        "\u{0301}",
        "\u{0000}",
        "\u{001b}",
        "\u{7f}",
        "0123456789",
        "1e-9",
        "<",
        ">",
        "<|",
        "|>",
        "<s>",
        "</s>",
        "<|im_start|>",
        "<|endoftext|>",
        "<fim_prefix>",
        "\\u0000",
        "''",
        "\"\"",
        "```",
        "#",
        "//",
        "/*",
        "*/",
        "a",
        "Z",
        "_",
    ];
    let n = rng.below(40);
    let mut s = String::new();
    for _ in 0..n {
        // Special-token look-alikes in one text of a few.
        let mut p = *rng.pick(PARTS);
        while p.starts_with('<') && rng.below(8) != 0 {
            p = *rng.pick(PARTS);
        }
        s.push_str(p);
    }
    if rng.below(4) == 0 {
        // Any code point, not only those above.
        for _ in 0..rng.below(8) {
            if let Some(c) = char::from_u32(rng.below(0x11_0000) as u32) {
                s.push(c);
            }
        }
    }
    s
}

/// GPT-2's byte-level alphabet: the token text of byte `b`.
fn byte_token(b: u8) -> String {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return char::from(b).to_string();
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap().to_string()
}

#[test]
fn a_real_tokenizer_with_random_text() {
    let Some(path) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let f = kiln_runtime::gguf::GgufFile::open(&path).unwrap();
    let tok = kiln_runtime::tokenizer::Tokenizer::from_gguf(&f).unwrap();
    let mut rng = Rng::seeded("tokenizer");
    let mut budget = Budget::new();
    let mut round_trips = 0;
    while budget.more() {
        let text = random_text(&mut rng);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let ids = tok.encode(&text, false)?;
            let back = tok.decode(&ids);
            let limited = tok.encode_within(&text, false, 8).is_ok();
            Ok::<_, String>((ids.len(), back, limited))
        }));
        let Ok(Ok((_, back, _))) = r else {
            panic!("the tokenizer panicked or failed on {text:?}: {r:?}");
        };
        // Byte-level BPE loses nothing but the special tokens' text and
        // the bytes the vocabulary has no token for (SmolLM2 has none for
        // 0xF2, the first byte of planes 8 to 11).
        let special = ["<|", "<s>", "</s>", "<fim"]
            .iter()
            .any(|t| text.contains(t));
        if !special && text.bytes().all(|b| tok.token_id(&byte_token(b)).is_some()) {
            assert_eq!(back, text, "decode(encode(x)) differs from x");
            round_trips += 1;
        }
    }
    report(
        "tokenizer",
        budget.ran,
        &format!(", {round_trips} exact round trips"),
    );
}

/// A random JSON value: every type, edge numbers, unicode, nesting, and
/// now and then the keys LSP and the HTTP API read.
fn random_json(rng: &mut Rng, depth: usize) -> Value {
    const KEYS: &[&str] = &[
        "textDocument",
        "uri",
        "position",
        "line",
        "character",
        "text",
        "contentChanges",
        "range",
        "start",
        "end",
        "prompt",
        "suffix",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "messages",
        "role",
        "content",
        "model",
        "id",
        "accepted",
        "accepted_length",
        "completion",
        "budget_tokens",
        "attention",
        "settings",
        "kiln",
        "name",
        "a",
        "b",
        "split",
        "command",
        "arguments",
        "user",
        "maxTokens",
        "mode",
        "abUnit",
    ];
    match rng.below(if depth > 3 { 6 } else { 9 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(*rng.pick(&[0i64, 1, -1, 2, 4, 16, 4096, 1 << 31, i64::MAX, i64::MIN])),
        3 => json!(*rng.pick(&[0.5f64, -0.0, 1e-300, 1e300, 2.5, -7.25])),
        4 | 5 => json!(random_text(rng)),
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.below(5))
                .map(|_| (rng.pick(KEYS).to_string(), random_json(rng, depth + 1)))
                .collect(),
        ),
    }
}

#[test]
fn lsp_framing_of_broken_streams() {
    let mut rng = Rng::seeded("framing");
    let mut budget = Budget::new();
    let mut frames = 0;
    while budget.more() {
        let mut stream = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let body = random_json(&mut rng, 0).to_string();
            match rng.below(8) {
                0 | 1 => {
                    stream.extend(format!("Content-Length: {}\r\n\r\n{body}", body.len()).bytes())
                }
                2 => stream.extend(
                    format!(
                        "Content-Length: {}\r\n\r\n{body}",
                        body.len() + rng.below(9)
                    )
                    .bytes(),
                ),
                3 => stream.extend(
                    format!(
                        "Content-Length: {}\r\n\r\n{body}",
                        body.len().saturating_sub(rng.below(9))
                    )
                    .bytes(),
                ),
                4 => stream.extend(format!("Content-Length: {}\r\n\r\n", u64::MAX).bytes()),
                5 => stream.extend(
                    format!(
                        "Content-Type: x\r\nContent-Length: -{}\r\n\r\n{body}",
                        body.len()
                    )
                    .bytes(),
                ),
                6 => stream.extend((0..rng.below(200)).map(|_| rng.next() as u8)),
                _ => stream.extend(mutate(
                    &mut rng,
                    format!("Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
                )),
            }
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            let mut reader = FrameReader::with_limit(std::io::Cursor::new(&stream), 4096);
            let mut n = 0;
            for _ in 0..10_000 {
                match reader.next_frame() {
                    Ok(Some(Frame::Json(_) | Frame::LoneSurrogates(_))) => n += 1,
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(n),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Err("no end after 10,000 frames".to_string())
        }));
        match r {
            Ok(Ok(n)) => frames += n,
            other => panic!(
                "framing failed on {:?}: {other:?}",
                String::from_utf8_lossy(&stream)
            ),
        }
    }
    report(
        "lsp framing",
        budget.ran,
        &format!(", {frames} messages read"),
    );
}

#[test]
fn json_rpc_messages_against_a_running_language_server() {
    const METHODS: &[&str] = &[
        "textDocument/inlineCompletion",
        "textDocument/completion",
        "textDocument/didOpen",
        "textDocument/didChange",
        "textDocument/didClose",
        "textDocument/didSave",
        "workspace/didChangeConfiguration",
        "workspace/executeCommand",
        "kiln/status",
        "kiln/context",
        "kiln/explain",
        "kiln/document",
        "kiln/models",
        "kiln/experiments",
        "kiln/abStart",
        "kiln/abStop",
        "$/cancelRequest",
        "initialized",
        "no/such",
        "",
    ];
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    let mut c = serve(&home, &[]);
    kiln_tests::serve::watchdog(c.pid(), Duration::from_secs(180));
    kiln_tests::serve::initialize(&mut c, ws.path(), json!({"maxTokens": 4}));
    let uri = format!("file://{}/a.py", ws.path().display());
    kiln_tests::serve::open(&mut c, &uri, "def f(x):\n    return x\n");
    let mut rng = Rng::seeded("json-rpc");
    let mut budget = Budget::new();
    let mut asked = Vec::new();
    // Answers come in any order (an explanation after a later error).
    let mut answered = std::collections::HashMap::new();
    let read_answer = |c: &mut kiln_serve::demo::Client,
                       asked: &[(i64, &str, Value)],
                       answered: &mut std::collections::HashMap<i64, Value>| {
        let r = c.next_response().unwrap_or_else(|e| {
            let missing: Vec<String> = (asked.iter())
                .filter(|(id, ..)| !answered.contains_key(id))
                .map(|(id, m, p)| format!("{id} {m} {p}"))
                .collect();
            panic!(
                "the server stopped ({e}) with {} requests unanswered, the first: {:?}",
                missing.len(),
                &missing[..missing.len().min(20)]
            )
        });
        assert!(r.get("result").is_some() || r.get("error").is_some(), "{r}");
        if let Some(id) = r["id"].as_i64() {
            answered.insert(id, r);
        }
    };
    while budget.more() {
        // At most 256 requests in flight, as an editor would have: the
        // server is fuzzed, not flooded past what a test can wait for.
        while asked.len() - answered.len() > 256 {
            read_answer(&mut c, &asked, &mut answered);
        }
        let method = *rng.pick(METHODS);
        let mut params = random_json(&mut rng, 0);
        if rng.below(2) == 0 {
            // Often about the open document, so that deeper code runs.
            params = json!({"textDocument": {"uri": uri}, "position": {"line": rng.below(4), "character": rng.below(30)}, "x": params});
        }
        if std::env::var_os("KILN_FUZZ_TRACE").is_some() {
            eprintln!("send {method} {params}");
        }
        if rng.below(4) == 0 {
            c.notify(method, params).unwrap();
        } else {
            let id = c.request_async(method, params.clone()).unwrap();
            asked.push((id, method, params));
        }
    }
    // Every request is answered, and the server still works.
    while answered.len() < asked.len() {
        read_answer(&mut c, &asked, &mut answered);
    }
    let status = c.request("kiln/status", Value::Null).unwrap();
    assert!(status["result"]["model"].is_string(), "{status}");
    let code = c.close().unwrap();
    assert!(code.success(), "{code:?}");
    report(
        "json-rpc",
        budget.ran,
        &format!(", {} requests answered", asked.len()),
    );
}

#[test]
fn http_request_bodies_against_a_running_server() {
    const PATHS: &[&str] = &[
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/explain",
        "/v1/feedback",
    ];
    let home = Home::default();
    let server = http_server(&home);
    let mut rng = Rng::seeded("http");
    let mut budget = Budget::new();
    let mut by_code = std::collections::BTreeMap::new();
    while budget.more() {
        let path = *rng.pick(PATHS);
        let mut v = random_json(&mut rng, 0);
        if let Some(o) = v.as_object_mut() {
            // Small generations and budgets: the point is the parsing.
            o.insert(
                "max_tokens".into(),
                json!(*rng.pick(&[0i64, 1, 2, -1, 1 << 40])),
            );
            o.insert("budget_tokens".into(), json!(*rng.pick(&[1i64, 64, 0, -5])));
            if rng.below(2) == 0 {
                o.insert("prompt".into(), json!(random_text(&mut rng)));
            }
        }
        let mut body = v.to_string().into_bytes();
        if rng.below(4) == 0 {
            body = mutate(&mut rng, &body);
        }
        let (code, text) = http(&server.addr, "POST", path, &body);
        assert!(
            code < 500,
            "{path} answered {code} to {:?}: {text}",
            String::from_utf8_lossy(&body)
        );
        *by_code.entry(code).or_insert(0) += 1;
    }
    let (code, _) = http(&server.addr, "GET", "/healthz", b"");
    assert_eq!(code, 200, "the server stopped answering");
    report(
        "http bodies",
        budget.ran,
        &format!(", answers by status {by_code:?}"),
    );
}

#[test]
fn policy_modules_changed_and_fed_random_input() {
    let Some(dir) = policies_dir() else {
        return;
    };
    let sandbox = kiln_sandbox::runtime::Sandbox::new(None);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut rng = Rng::seeded("policies");
    let mut budget = Budget::new();
    let (mut loaded, mut called) = (0, 0);
    while budget.more() {
        let file = rng.pick(&files).clone();
        let bytes = std::fs::read(&file).unwrap();
        let changed = rng.below(2) == 0;
        let module = if changed {
            mutate(&mut rng, &bytes)
        } else {
            bytes
        };
        // Random bytes, or a well-formed ranking or tuning request
        // (changed or not), so that calls reach the policies' own code.
        let input: Vec<u8> = match rng.below(4) {
            0 => (0..rng.below(512)).map(|_| rng.next() as u8).collect(),
            k => {
                let seed = rng.next();
                let valid = if rng.below(2) == 0 {
                    kiln_runtime::policy::synthetic_rank(rng.below(40), seed).encode()
                } else {
                    kiln_runtime::policy::synthetic_tune(rng.below(12), seed).encode()
                };
                if k == 1 {
                    mutate(&mut rng, &valid)
                } else {
                    valid
                }
            }
        };
        let r = catch_unwind(AssertUnwindSafe(|| {
            let p = sandbox.load(&module, None)?;
            Ok::<_, kiln_sandbox::PolicyError>((true, p.call_raw(&input).is_ok()))
        }));
        match r {
            Err(_) => panic!(
                "the sandbox panicked on {} (changed: {changed})",
                file.display()
            ),
            Ok(Ok((l, c))) => {
                loaded += l as usize;
                called += c as usize;
            }
            Ok(Err(e)) => assert!(!e.to_string().is_empty()),
        }
    }
    report(
        "policies",
        budget.ran,
        &format!(", {loaded} modules loaded, {called} calls answered"),
    );
}
