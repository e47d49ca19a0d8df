//! `kiln explain` on a real released model with a planted case: of
//! several files in the prompt only one holds the answer, and it must
//! come out as the most important; the result is the same every run and
//! the work stays within its budget.

use kiln_tests::{Home, real_model};
use serde_json::Value;

const PLANTED: &str = "# colors.py\nRED = \"#ff0000\"\nGREEN = \"#00ff00\"\n\n\
# config.py\nDATABASE_PORT = 7913\nDATABASE_HOST = \"localhost\"\n\n\
# shapes.py\ndef square(x):\n    return x * x\n\n\
# main.py\nfrom config import DATABASE_PORT\nassert DATABASE_PORT ==";

fn explain(home: &Home, model: &str, budget: &str) -> Value {
    home.json(&[
        "explain",
        model,
        "--prompt",
        PLANTED,
        "--max-tokens",
        "5",
        "--budget-tokens",
        budget,
        "--json",
    ])["explanation"]
        .clone()
}

#[test]
fn the_snippet_that_holds_the_answer_matters_most_and_the_result_repeats() {
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let model = model.to_str().unwrap();
    let home = Home::default();
    let e = explain(&home, model, "4000");
    assert!(e["completion"].as_str().unwrap().contains("7913"), "{e}");
    let top = &e["parts"][0];
    assert_eq!(top["kind"], "block", "{e}");
    assert_eq!(top["label"], "# config.py", "{e}");
    assert!(top["importance"].as_f64().unwrap() > 1.0, "{e}");
    // The line inside it that carries the answer outranks its neighbours.
    assert_eq!(e["lines"][0]["label"], "DATABASE_PORT = 7913", "{e}");
    // Within that line, the number the completion copies.
    assert_eq!(e["spans"][0]["label"], "7913", "{e}");
    // Without it the model no longer says 7913.
    let cf = &e["counterfactual"];
    assert_eq!(cf["removed"]["label"], "# config.py");
    assert!(!cf["completion"].as_str().unwrap().contains("7913"), "{cf}");
    assert!(e["evaluated_tokens"].as_u64().unwrap() <= 4000);
    // Deterministic: the same numbers again.
    assert_eq!(explain(&home, model, "4000"), e);
    // A small budget measures fewer parts, says so, and keeps to it.
    let small = explain(&home, model, "150");
    assert!(
        small["evaluated_tokens"].as_u64().unwrap() <= 150,
        "{small}"
    );
    assert!(small["skipped_parts"].as_u64().unwrap() > 0, "{small}");
}

#[test]
fn the_attention_map_is_the_models_own_attention_over_the_prompt() {
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let model = model.to_str().unwrap();
    let home = Home::default();
    let run = || {
        home.json(&[
            "explain",
            model,
            "--prompt",
            PLANTED,
            "--completion",
            " 7913",
            "--budget-tokens",
            "1",
            "--attention",
            "--json",
        ])["explanation"]["attention"]
            .clone()
    };
    let m = run();
    // SmolLM2-135M: 30 layers of 9 query heads.
    assert_eq!(
        (m["layers"].as_u64(), m["heads"].as_u64()),
        (Some(30), Some(9))
    );
    let tokens: Vec<&str> = m["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(tokens.concat().ends_with(PLANTED), "{tokens:?}");
    let weights = m["weights"].as_array().unwrap();
    assert_eq!(weights.len(), 30);
    // Probabilities: each head's attention to the prompt and to the
    // completion's own tokens adds up to 1.
    let mut copying = 0;
    let answer = PLANTED.find("7913").unwrap();
    for (l, layer) in weights.iter().enumerate() {
        for (h, row) in layer.as_array().unwrap().iter().enumerate() {
            let row: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(row.len(), tokens.len());
            assert!(row.iter().all(|&w| (0.0..=1.0).contains(&w)), "{l}/{h}");
            let rest = m["to_completion"][l][h].as_f64().unwrap();
            let total = row.iter().sum::<f64>() + rest;
            assert!((total - 1.0).abs() < 2e-3, "layer {l} head {h}: {total}");
            // Heads whose strongest attention (past the first token) is on
            // the digits the completion copies.
            let top = (1..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            let start: usize = tokens[..top].iter().map(|t| t.len()).sum::<usize>()
                - (tokens.concat().len() - PLANTED.len());
            if (answer..answer + 4).contains(&start) {
                copying += 1;
            }
        }
    }
    assert!(copying > 0, "no head attends most to the answer's digits");
    assert_eq!(run(), m, "the same map again");
}

#[test]
fn the_http_api_explains_with_the_served_model_and_refuses_bad_requests() {
    use kiln_tests::serve::{http_server_with, post};
    use serde_json::json;
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let home = Home::default();
    let server = http_server_with(&home, &model, &[]);
    let (code, r) = post(
        &server.addr,
        "/v1/explain",
        &json!({"prompt": PLANTED, "max_tokens": 5, "budget_tokens": 4000}),
    );
    assert_eq!(code, 200, "{r}");
    let e = &r["explanation"];
    assert!(e["completion"].as_str().unwrap().contains("7913"), "{r}");
    assert_eq!(e["parts"][0]["label"], "# config.py", "{r}");
    assert_eq!(e["lines"][0]["label"], "DATABASE_PORT = 7913", "{r}");
    // Within that line, the number the completion copies.
    assert_eq!(e["spans"][0]["label"], "7913", "{r}");
    // A completion served before, by its id: the text it was served with.
    let (code, served) = post(
        &server.addr,
        "/v1/completions",
        &json!({"prompt": PLANTED, "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(code, 200, "{served}");
    let (code, r) = post(
        &server.addr,
        "/v1/explain",
        &json!({"id": served["id"], "budget_tokens": 4000}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        r["explanation"]["completion"], served["choices"][0]["text"],
        "{r}"
    );
    assert_eq!(r["explanation"]["parts"][0]["label"], "# config.py", "{r}");
    let (code, r) = post(&server.addr, "/v1/explain", &json!({"id": "cmpl-999999"}));
    assert_eq!(code, 404, "{r}");
    assert_eq!(r["error"]["code"], "completion_not_found", "{r}");
    // A given completion is explained as given.
    let (code, r) = post(
        &server.addr,
        "/v1/explain",
        &json!({"prompt": PLANTED, "completion": " 7913", "budget_tokens": 4000}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["explanation"]["completion"], " 7913");
    assert!(
        r["explanation"].get("attention").is_none(),
        "only where asked"
    );
    let (code, r) = post(
        &server.addr,
        "/v1/explain",
        &json!({"prompt": PLANTED, "completion": " 7913", "budget_tokens": 1, "attention": true}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["explanation"]["attention"]["layers"], 30, "{r}");
    // The dashboard shows the last one, with its map.
    let (code, last) = kiln_tests::serve::http(&server.addr, "GET", "/dashboard/explanation", b"");
    assert_eq!(code, 200, "{last}");
    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["explanation"]["attention"]["heads"], 9, "{last}");
    for (body, param) in [
        (json!({"max_tokens": 4}), "prompt"),
        (
            json!({"prompt": PLANTED, "budget_tokens": 0}),
            "budget_tokens",
        ),
        (json!({"prompt": PLANTED, "completion": 3}), "completion"),
        (json!({"prompt": PLANTED, "model": "other"}), "model"),
        (json!({"id": "cmpl-1", "prompt": PLANTED}), "id"),
        (json!({"id": 7}), "id"),
        (json!({"prompt": PLANTED, "attention": 1}), "attention"),
    ] {
        let (code, r) = post(&server.addr, "/v1/explain", &body);
        assert!(code == 400 || code == 404, "{body}: {code} {r}");
        assert_eq!(r["error"]["param"], param, "{r}");
    }
    // Still serving.
    let (code, _) = post(
        &server.addr,
        "/v1/completions",
        &json!({"prompt": "def f(x):", "max_tokens": 2}),
    );
    assert_eq!(code, 200);
}

#[test]
fn the_language_server_explains_the_completion_at_a_position() {
    use kiln_tests::serve::{at, error_code, initialize, open, serve_model, status, watchdog};
    use serde_json::json;
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let home = Home::default();
    let ws = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("colors.py", "RED = \"#ff0000\"\nGREEN = \"#00ff00\"\n"),
        (
            "config.py",
            "DATABASE_PORT = 7913\nDATABASE_HOST = \"localhost\"\n",
        ),
        ("shapes.py", "def square(x):\n    return x * x\n"),
    ] {
        std::fs::write(ws.path().join(name), text).unwrap();
    }
    let mut c = serve_model(&home, &model, &[]);
    watchdog(c.pid(), std::time::Duration::from_secs(300));
    initialize(&mut c, ws.path(), json!({"maxTokens": 5}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while status(&mut c)["workspace"]["files"] != json!(3) {
        assert!(
            std::time::Instant::now() < deadline,
            "workspace never indexed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let uri = format!("file://{}/main.py", ws.path().display());
    let text = "from config import DATABASE_PORT\nassert DATABASE_PORT ==";
    open(&mut c, &uri, text);
    let r = c.request("kiln/explain", at(&uri, 1, 23)).unwrap();
    let e = &r["result"]["explanation"];
    // The snippet of config.py, and in it the line naming the port, is
    // what the completion leans on; without it the model writes another.
    assert_eq!(e["parts"][0]["kind"], "snippet", "{r}");
    assert!(
        e["parts"][0]["label"]
            .as_str()
            .unwrap()
            .starts_with("config.py"),
        "{r}"
    );
    assert!(e["parts"][0]["importance"].as_f64().unwrap() > 1.0, "{r}");
    assert_eq!(e["lines"][0]["label"], "DATABASE_PORT = 7913", "{r}");
    // Within that line, the number the completion copies.
    assert_eq!(e["spans"][0]["label"], "7913", "{r}");
    assert_ne!(e["counterfactual"]["completion"], e["completion"], "{r}");
    // Why each snippet was chosen comes with it.
    let snippets = r["result"]["context"]["snippets"].as_array().unwrap();
    assert!(snippets.iter().all(|s| s["why"].is_string()), "{r}");
    // Each snippet's part is its block in the prompt: the line naming its
    // file, then its text.
    let prompt = r["result"]["context"]["prompt"].as_str().unwrap();
    let snippet_parts: Vec<&serde_json::Value> = (e["parts"].as_array().unwrap().iter())
        .filter(|p| p["kind"] == "snippet")
        .collect();
    assert_eq!(snippet_parts.len(), snippets.len(), "{r}");
    for p in snippet_parts {
        let (start, end) = (
            p["start"].as_u64().unwrap() as usize,
            p["end"].as_u64().unwrap() as usize,
        );
        let path = p["label"].as_str().unwrap().rsplit_once(':').unwrap().0;
        let block = &prompt[start..end];
        assert!(
            block.lines().next().unwrap().ends_with(path) && block.ends_with('\n'),
            "{block:?}"
        );
    }
    let bad = c
        .request("kiln/explain", json!({"textDocument": {"uri": uri}, "position": {"line": 1, "character": 23}, "budgetTokens": 0}))
        .unwrap();
    assert_eq!(error_code(&bad), -32602, "{bad}");
    let closed = c
        .request("kiln/explain", at("file:///nowhere.py", 0, 0))
        .unwrap();
    assert_eq!(error_code(&closed), -32602, "{closed}");

    // An inline completion the server served, explained by its id: the
    // prompt it was made from (the same as at its position) and the text
    // the editor was shown.
    let served = c
        .request("textDocument/inlineCompletion", at(&uri, 1, 23))
        .unwrap();
    let item = &served["result"]["items"][0];
    let shown = item["insertText"].as_str().unwrap().to_string();
    let completion = served["result"]["kiln"]["completion"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        item["command"]["arguments"][0]["completion"],
        completion.as_str()
    );
    // The document changes after it was shown: the explanation is still
    // of what was served.
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri, "version": 2},
               "contentChanges": [{"text": format!("import os\n{text}")}]}),
    )
    .unwrap();
    let by_id = c
        .request("kiln/explain", json!({"id": completion}))
        .unwrap();
    let e = &by_id["result"]["explanation"];
    assert_eq!(e["completion"], shown.as_str(), "{by_id}");
    assert_eq!(
        by_id["result"]["context"]["prompt"], r["result"]["context"]["prompt"],
        "{by_id}"
    );
    assert!(
        e["parts"][0]["label"]
            .as_str()
            .unwrap()
            .starts_with("config.py"),
        "{by_id}"
    );
    assert!(
        e["parts"][0]["importance"].as_f64().unwrap() > 1.0,
        "{by_id}"
    );
    // Ids not kept, not strings, or given with a position: refused.
    for bad in [
        json!({"id": "nope"}),
        json!({"id": 3}),
        json!({"id": completion, "textDocument": {"uri": uri}, "position": {"line": 1, "character": 23}}),
    ] {
        let r = c.request("kiln/explain", bad.clone()).unwrap();
        assert_eq!(error_code(&r), -32602, "{bad}: {r}");
    }
    assert!(c.close().unwrap().success());
}
