//! Speculative decoding (`--draft ngram`): tokens guessed from the text so
//! far are verified in one batch, and the output is token for token plain
//! greedy decoding's, on real released models, through `kiln run`, the
//! HTTP API (with `/metrics` counting guesses and hits) and the language
//! server's `draft` setting.

use kiln_tests::serve::{http, http_server_with, metric, post};
use kiln_tests::{Home, real_model};
use serde_json::{Value, json};
use std::path::Path;

/// An edit-like prompt: a function written again, whose completion
/// repeats code already in the file.
const REPETITIVE: &str = "def area(shape, scale):\n    if shape == \"square\":\n        \
return scale * scale\n    if shape == \"circle\":\n        return 3.14159 * scale * scale\n    \
if shape == \"triangle\":\n        return 0.5 * scale * scale\n    return 0\n\n\n\
def area_v2(shape, scale):\n    if shape == \"square\":";
/// Fresh code: little to repeat.
const FRESH: &str = "// Parse a date written as YYYY-MM-DD\nfn parse_date(s: &str) -> Option<";

fn run(home: &Home, model: &Path, prompt: &str, draft: &str, n: usize) -> Value {
    let n = n.to_string();
    let args = [
        "run",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-tokens",
        &n,
        "--temperature",
        "0",
        "--backend",
        "cpu",
        "--draft",
        draft,
        "--json",
    ];
    home.json(&args)
}

/// Greedy tokens with guesses verified in batches are those of one token
/// per step, on the llama (SmolLM2) and Gemma 3 architectures, and an
/// edit's completion takes most guesses.
#[test]
fn ngram_drafts_give_the_greedy_tokens_of_real_models() {
    let home = Home::default();
    for (file, n) in [
        ("smollm2-135m-instruct-q4_1.gguf", 48),
        ("gemma-3-270m-q4_k_m.gguf", 48),
    ] {
        let Some(model) = real_model(file) else {
            continue;
        };
        for prompt in [REPETITIVE, FRESH] {
            let plain = run(&home, &model, prompt, "none", n);
            let drafted = run(&home, &model, prompt, "ngram", n);
            assert_eq!(
                drafted["token_ids"], plain["token_ids"],
                "{file}: {prompt:?}"
            );
            assert_eq!(plain["timings"]["draft_tokens"], 0);
            let guessed = drafted["timings"]["draft_tokens"].as_u64().unwrap();
            let accepted = drafted["timings"]["draft_accepted"].as_u64().unwrap();
            assert!(accepted <= guessed, "{drafted}");
            if prompt == REPETITIVE {
                assert!(accepted >= 8, "{file}: {accepted} of {guessed} accepted");
                // Some batch carried more than one guess...
                let batches = drafted["timings"]["draft_batches"].as_u64().unwrap();
                assert!(guessed > batches, "{drafted}");
                // ...which `--draft-max` caps, the tokens unchanged.
                for max in [1, 2] {
                    let capped = home.json(&[
                        "run",
                        model.to_str().unwrap(),
                        "--prompt",
                        prompt,
                        "--max-tokens",
                        &n.to_string(),
                        "--temperature",
                        "0",
                        "--backend",
                        "cpu",
                        "--draft",
                        "ngram",
                        "--draft-max",
                        &max.to_string(),
                        "--json",
                    ]);
                    assert_eq!(capped["token_ids"], plain["token_ids"], "{file}");
                    let t = &capped["timings"];
                    let (guessed, batches) = (
                        t["draft_tokens"].as_u64().unwrap(),
                        t["draft_batches"].as_u64().unwrap(),
                    );
                    assert!(batches > 0 && guessed <= batches * max, "{file}: {t}");
                }
            }
        }
    }
}

/// `kiln serve --http --draft ngram` answers with plain greedy decoding's
/// text and counts guesses and hits in `/metrics`.
#[test]
fn the_server_decodes_speculatively_and_counts_it() {
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let home = Home::default();
    let plain = run(&home, &model, REPETITIVE, "none", 48);
    let srv = http_server_with(&home, &model, &["--draft", "ngram"]);
    let (_, models) = http(&srv.addr, "GET", "/v1/models", b"");
    let id = serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"].clone();
    let (code, v) = post(
        &srv.addr,
        "/v1/completions",
        &json!({"model": id, "prompt": REPETITIVE, "max_tokens": 48, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], plain["text"]);
    let (_, metrics) = http(&srv.addr, "GET", "/metrics", b"");
    let guessed = metric(&metrics, "kiln:draft_tokens_total");
    let accepted = metric(&metrics, "kiln:draft_accepted_total");
    assert!(accepted >= 8 && accepted <= guessed, "{metrics}");
    drop(srv);

    // The same from config.toml's `[completion] draft` (what `kiln tune
    // apply` writes); the flag still wins.
    std::fs::write(
        home.path().join("config.toml"),
        "[completion]\ndraft = \"ngram\"\n",
    )
    .unwrap();
    for (flags, drafts) in [(&[][..], true), (&["--draft", "none"][..], false)] {
        let srv = http_server_with(&home, &model, flags);
        let (code, v) = post(
            &srv.addr,
            "/v1/completions",
            &json!({"model": id, "prompt": REPETITIVE, "max_tokens": 48, "temperature": 0}),
        );
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], plain["text"]);
        let (_, metrics) = http(&srv.addr, "GET", "/metrics", b"");
        let guessed = metric(&metrics, "kiln:draft_tokens_total");
        assert_eq!(guessed > 0, drafts, "{flags:?}: {metrics}");
    }
}

/// The language server takes `draft` from the client's settings: the same
/// completion with and without it, and the guesses counted in `/metrics`.
#[test]
fn the_language_server_takes_draft_from_its_settings() {
    use kiln_tests::serve::{at, initialize, open, serve_model};
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    let uri = format!("file://{}/shapes.py", ws.path().display());
    let lines = REPETITIVE.lines().count() as u32 - 1;
    let last = REPETITIVE.lines().last().unwrap().len() as u32;
    let complete = |draft: &str, draft_max: usize| -> (Value, u64) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let mut c = serve_model(&home, &model, &["--metrics", &metrics]);
        let options = json!({"maxTokens": 32, "mode": "none", "draft": draft,
                             "draftMax": draft_max, "workspaceContext": false});
        initialize(&mut c, ws.path(), options);
        open(&mut c, &uri, REPETITIVE);
        let r = c
            .request("textDocument/completion", at(&uri, lines, last))
            .unwrap();
        let (_, text) = http(&metrics, "GET", "/metrics", b"");
        (
            r["result"]["items"].clone(),
            metric(&text, "kiln:draft_accepted_total"),
        )
    };
    let (plain, none_accepted) = complete("none", 8);
    let (drafted, accepted) = complete("ngram", 8);
    // One guess per batch at most: the same completion.
    let (one_ahead, one_accepted) = complete("ngram", 1);
    assert_eq!(
        one_ahead[0]["textEdit"], plain[0]["textEdit"],
        "{one_ahead}"
    );
    assert!(one_accepted > 0, "no guess accepted one ahead");
    let text = |items: &Value| items[0]["textEdit"]["newText"].as_str().map(str::to_string);
    assert!(text(&plain).is_some_and(|t| t.len() > 20), "{plain}");
    assert_eq!(text(&drafted), text(&plain), "{drafted} vs {plain}");
    assert_eq!(none_accepted, 0);
    assert!(accepted > 0, "no guess accepted");
}

/// `kiln run --draft MODEL`: a smaller model of the same vocabulary (here
/// the released SmolLM2 requantized by kiln to q4_0, drafting for its q8_0
/// copy) guesses greedily, and the output is token for token plain greedy
/// decoding's, on an edit and on fresh code; a draft model of another
/// vocabulary (Gemma 3) is refused with both sizes named, and a draft
/// that is no model with what `--draft` takes. Served, `kiln serve --draft
/// MODEL` answers HTTP and the language server with the same text as
/// without it, counting the guesses; a client's `draft: "model"` is
/// refused where no draft model is loaded.
#[test]
fn a_draft_model_of_the_same_vocabulary_gives_the_greedy_tokens() {
    let Some(smol) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let home = Home::default();
    let target = home.path().join("smol-q8_0.gguf");
    let draft = home.path().join("smol-q4_0.gguf");
    for (t, out) in [("q8_0", &target), ("q4_0", &draft)] {
        home.ok(&[
            "quantize",
            "--type",
            t,
            "--allow-requantize",
            smol.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
    }
    for prompt in [REPETITIVE, FRESH] {
        let plain = run(&home, &target, prompt, "none", 40);
        let drafted = run(&home, &target, prompt, draft.to_str().unwrap(), 40);
        assert_eq!(drafted["token_ids"], plain["token_ids"], "{prompt:?}");
        assert_eq!(drafted["text"], plain["text"]);
        let t = &drafted["timings"];
        let guessed = t["draft_tokens"].as_u64().unwrap();
        let accepted = t["draft_accepted"].as_u64().unwrap();
        assert!(guessed > 0 && accepted > 0, "{t}");
        assert!(accepted <= guessed);
    }
    if let Some(gemma) = real_model("gemma-3-270m-q4_k_m.gguf") {
        let err = home.fails(&[
            "run",
            target.to_str().unwrap(),
            "--prompt",
            FRESH,
            "--temperature",
            "0",
            "--draft",
            gemma.to_str().unwrap(),
        ]);
        assert!(
            err.contains("vocabulary") && err.contains("262144") && err.contains("49152"),
            "{err}"
        );
    }
    let err = home.fails(&[
        "run",
        target.to_str().unwrap(),
        "--prompt",
        FRESH,
        "--draft",
        "/no/such/draft.gguf",
    ]);
    assert!(err.contains("--draft /no/such/draft.gguf"), "{err}");
    assert!(err.contains("none, ngram, or a draft model"), "{err}");

    // Served: `kiln serve --http --draft MODEL` answers with plain greedy
    // decoding's text, counting the draft model's guesses in /metrics.
    let plain = run(&home, &target, REPETITIVE, "none", 40);
    let srv = http_server_with(&home, &target, &["--draft", draft.to_str().unwrap()]);
    let (code, v) = post(
        &srv.addr,
        "/v1/completions",
        &json!({"prompt": REPETITIVE, "max_tokens": 40, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], plain["text"]);
    let (_, metrics) = http(&srv.addr, "GET", "/metrics", b"");
    let guessed = metric(&metrics, "kiln:draft_tokens_total");
    let accepted = metric(&metrics, "kiln:draft_accepted_total");
    assert!(accepted > 0 && accepted <= guessed, "{metrics}");
    drop(srv);

    // The language server: the draft model by default, and a client may
    // ask for "model" only where one is loaded.
    use kiln_tests::serve::{at, initialize, open, serve_model, status};
    let ws = tempfile::tempdir().unwrap();
    let uri = format!("file://{}/shapes.py", ws.path().display());
    let lines = REPETITIVE.lines().count() as u32 - 1;
    let last = REPETITIVE.lines().last().unwrap().len() as u32;
    let options = json!({"maxTokens": 24, "mode": "none", "workspaceContext": false});
    let mut c = serve_model(&home, &target, &["--draft", draft.to_str().unwrap()]);
    initialize(&mut c, ws.path(), options.clone());
    let s = status(&mut c);
    assert_eq!(s["settings"]["draft"], "model", "{s}");
    assert_eq!(s["draft_model"], "smol-q4_0", "{s}");
    open(&mut c, &uri, REPETITIVE);
    let drafted = c
        .request("textDocument/completion", at(&uri, lines, last))
        .unwrap();
    c.hang_up().unwrap();
    let mut c = serve_model(&home, &target, &[]);
    let mut refused = options.clone();
    refused["draft"] = json!("model");
    initialize(&mut c, ws.path(), refused);
    // Not applied: the defaults stay.
    assert_eq!(status(&mut c)["settings"]["draft"], "none");
    assert_eq!(status(&mut c)["settings"]["maxTokens"], 64);
    c.notify(
        "workspace/didChangeConfiguration",
        json!({"settings": {"kiln": options}}),
    )
    .unwrap();
    assert_eq!(status(&mut c)["settings"]["maxTokens"], 24);
    open(&mut c, &uri, REPETITIVE);
    let greedy = c
        .request("textDocument/completion", at(&uri, lines, last))
        .unwrap();
    c.hang_up().unwrap();
    let text = |r: &Value| r["result"]["items"][0]["textEdit"]["newText"].clone();
    assert!(text(&greedy).is_string(), "{greedy}");
    assert_eq!(text(&drafted), text(&greedy));
}
