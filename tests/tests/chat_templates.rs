//! Chat templates of released models rendered by kiln (`kiln_serve::chat`,
//! what `/v1/chat/completions` uses) and by llama.cpp's Python bindings
//! (llama-cpp-python's `Jinja2ChatFormatter`, transformers' Jinja
//! environment): the same text, or both refusing, for every template and
//! conversation.
//!
//! The templates are the ones llama.cpp keeps from released models
//! (`models/templates/*.jinja` of its source, taken from the
//! llama-cpp-python sdist by `tests/provision.sh` into
//! `target/chat-templates`, or `KILN_CHAT_TEMPLATES`); the test skips
//! without them unless `KILN_REQUIRE_CHAT_TEMPLATES` is set (CI sets it).

use kiln_serve::chat::{ChatError, ChatInputs, render};
use kiln_tests::{llama_cpp_available, oracle, target_dir};
use serde_json::{Value, json};
use std::path::PathBuf;

fn templates_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_CHAT_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("chat-templates"));
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("KILN_REQUIRE_CHAT_TEMPLATES").is_none(),
        "KILN_REQUIRE_CHAT_TEMPLATES is set but {} is missing (run tests/provision.sh)",
        dir.display()
    );
    eprintln!("skipped: no chat templates at {}", dir.display());
    None
}

/// Conversations an editor sends: one question; a system prompt and a
/// multi-turn exchange with code and non-ASCII text; a tool offered.
fn conversations() -> Vec<(Value, Option<Value>)> {
    let find_symbol = json!([{
        "type": "function",
        "function": {
            "name": "find_symbol",
            "description": "Finds where a symbol is defined in the workspace — its file and line.",
            "parameters": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "The symbol's name"},
                    "kind": {"type": "string", "enum": ["function", "type"]}
                },
                "required": ["name"]
            }
        }
    }]);
    vec![
        (
            json!([{"role": "user", "content": "Write a Rust function that reverses a string."}]),
            None,
        ),
        (
            json!([
                {"role": "system", "content": "You are a careful coding assistant. Answer briefly."},
                {"role": "user", "content": "What does this do?\n```c\nint main(void) { return 0; }\n```"},
                {"role": "assistant", "content": "It is a C program that exits with status 0."},
                {"role": "user", "content": "And « déjà vu » in Python — naïve ✓?"}
            ]),
            None,
        ),
        (
            json!([{"role": "user", "content": "Where is parse_header defined?"}]),
            Some(find_symbol),
        ),
    ]
}

/// Where llama.cpp's Python formatter and kiln knowingly part: (template,
/// conversation, why). Each must still differ, so that the list stays
/// true.
const KNOWN: [(&str, usize, &str); 1] = [(
    "meetkai-functionary-medium-v3.1.jinja",
    2,
    "`\"…\"|safe + t | tojson` adds a plain str to Python's Markup, which \
     HTML-escapes it: Python's prompt carries the tool's JSON as &#34;name&#34;…; \
     kiln writes the JSON the template means",
)];

#[test]
fn released_chat_templates_render_as_llama_cpp_renders_them() {
    let Some(dir) = templates_dir() else { return };
    if !llama_cpp_available() {
        return;
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 20,
        "only {} templates in {}",
        names.len(),
        dir.display()
    );
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for path in &names {
        let template = std::fs::read_to_string(path).unwrap();
        for (i, (messages, tools)) in conversations().into_iter().enumerate() {
            let inputs = ChatInputs {
                messages: &messages,
                tools: tools.as_ref(),
                bos_token: "<s>",
                eos_token: "</s>",
                add_generation_prompt: true,
            };
            ours.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                i,
                render(&template, &inputs),
            ));
            cases.push(json!({"template": template, "messages": messages, "tools": tools, "bos": "<s>", "eos": "</s>"}));
        }
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&cases).unwrap()).unwrap();
    let theirs: Vec<Value> =
        serde_json::from_str(&oracle("chat_render.py", &[file.path().as_os_str()])).unwrap();
    assert_eq!(theirs.len(), ours.len());
    let (mut same, mut both_refuse, mut problems) = (0, 0, Vec::new());
    let (mut lenient, mut known) = (0, 0);
    for ((name, conv, mine), theirs) in ours.iter().zip(&theirs) {
        let is_known = KNOWN.iter().any(|(n, c, _)| n == name && c == conv);
        let python_type_error = theirs["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("TypeError"));
        match (mine, theirs["prompt"].as_str()) {
            (Ok(a), Some(b)) if a == b => {
                if is_known {
                    problems.push(format!(
                        "{name} conversation {conv}: now identical; take it off KNOWN"
                    ));
                }
                same += 1;
            }
            (Ok(_), Some(_)) if is_known => known += 1,
            // Python's object model refuses what Jinja means (iterating
            // None when a tool-use template gets no tools, dumping a
            // generator): kiln renders, as minijinja iterates none as
            // empty. A template's own refusal (`raise_exception`) is a
            // ValueError and must match.
            (Ok(_), None) if python_type_error => lenient += 1,
            (Ok(a), Some(b)) if a == b => same += 1,
            (Ok(a), Some(b)) => {
                let at = a
                    .char_indices()
                    .zip(b.chars())
                    .find(|((_, x), y)| x != y)
                    .map_or(a.len().min(b.len()), |((i, _), _)| i);
                let from = a.floor_char_boundary(at.saturating_sub(40));
                problems.push(format!(
                    "{name} conversation {conv}: differs at byte {at}:\n  kiln:  {:?}\n  llama: {:?}",
                    &a[from..a.floor_char_boundary(at + 60)],
                    b.get(from..b.floor_char_boundary(at + 60)).unwrap_or(""),
                ));
            }
            (Err(ChatError::Render(_)), None) => both_refuse += 1,
            (Err(e), Some(_)) => {
                problems.push(format!("{name} conversation {conv}: kiln fails: {e}"))
            }
            (Ok(_), None) => problems.push(format!(
                "{name} conversation {conv}: kiln renders, llama.cpp's formatter fails: {}",
                theirs["error"]
            )),
            (Err(e), None) => problems.push(format!(
                "{name} conversation {conv}: kiln: {e}; llama.cpp: {}",
                theirs["error"]
            )),
        }
    }
    eprintln!(
        "{} templates × {} conversations: {same} identical, {both_refuse} refused by both, \
         {lenient} rendered by kiln where Python raised a TypeError, {known} known differences",
        names.len(),
        conversations().len()
    );
    assert!(
        problems.is_empty(),
        "{} of {} differ:\n{}",
        problems.len(),
        ours.len(),
        problems.join("\n")
    );
}

#[test]
fn smollm2_chat_completion_matches_llama_cpp() {
    // The released SmolLM2-135M-Instruct (ChatML template in its GGUF)
    // served by `kiln serve` over HTTP, against llama.cpp's chat
    // completion with the same template: the same prompt tokens, and an
    // answer that stops at the end of its turn wherever llama.cpp's does.
    let Some(model) = kiln_tests::real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    if !llama_cpp_available() {
        return;
    }
    let home = kiln_tests::Home::default();
    let server = kiln_tests::serve::http_server_with(&home, &model, &[]);
    let mut stopped = 0;
    for messages in [
        json!([{"role": "user", "content": "What is 2 + 2?"}]),
        // Greedy decoding loops on this one ("L'Étoile, la …") in
        // llama.cpp too, and runs to `max_tokens`.
        json!([{"role": "user", "content": "What is the capital of France?"}]),
        json!([
            {"role": "system", "content": "You are a helpful coding assistant."},
            {"role": "user", "content": "Write a Python function that returns the square of a number."}
        ]),
    ] {
        let request = json!({"messages": messages, "max_tokens": 96});
        let (code, ours) = kiln_tests::serve::post(
            &server.addr,
            "/v1/chat/completions",
            &json!({"model": "smollm2-135m-instruct-q4_1", "messages": messages, "max_tokens": 96, "temperature": 0}),
        );
        assert_eq!(code, 200, "{ours}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), request.to_string()).unwrap();
        let theirs: Value = serde_json::from_str(&oracle(
            "llama_chat.py",
            &[model.as_os_str(), file.path().as_os_str()],
        ))
        .unwrap();
        assert_eq!(
            ours["usage"]["prompt_tokens"], theirs["prompt_tokens"],
            "prompt lengths: kiln {ours}, llama.cpp {theirs}"
        );
        // The answer ends at the template's end-of-turn token. Whether it
        // is llama.cpp's word for word rests on near ties of the first
        // token (a chat's first token on SmolLM2: 'L' 24.91 against 'The'
        // 24.56 in llama.cpp's logits); real_models.rs holds the rendered
        // chat to llama.cpp's greedy tokens with its near-tie rule.
        let text = ours["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "{ours}");
        let finish = &ours["choices"][0]["finish_reason"];
        if theirs["finish_reason"] == "stop" {
            assert_eq!(finish, "stop", "kiln {ours}, llama.cpp {theirs}");
        }
        stopped += usize::from(finish == "stop");
    }
    assert!(
        stopped >= 2,
        "the end-of-turn token ended fewer than two answers"
    );
}
