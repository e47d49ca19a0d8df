//! Long windows on a real model (SmolLM2-135M-Instruct Q4_1, from PyPI):
//! what each KV cache type costs in perplexity on a long code file, and
//! whether key→value needles placed at several depths of a long prompt
//! come back, per KV type, through the fused attention the CPU runs.
//!
//! The 8K and 32K tables (and Gemma 3's 32K window) are a bench:
//! `cargo bench -p kiln-benches --bench long_context`.

use kiln_plugin_api::DType;
use kiln_runtime::backend::Backend;
use kiln_runtime::backend::exec::Executor;
use kiln_runtime::model::forward::{KvCache, LogitsFor};
use kiln_runtime::model::{Model, Session};
use kiln_tests::real_model;
use std::sync::Arc;

fn session(model: &Arc<Model>, kv: DType, n_ctx: usize) -> Session {
    Session::with_kv_type(
        model.clone(),
        Executor::new(Backend::builtin_cpu(), 0),
        Some(n_ctx),
        kv,
    )
    .unwrap()
}

/// Perplexity of `tokens` (each predicted from the ones before it),
/// evaluated in batches of 256.
fn perplexity(model: &Arc<Model>, kv: DType, tokens: &[u32]) -> f64 {
    let mut s = session(model, kv, tokens.len());
    let n_vocab = model.config.n_vocab;
    let (mut nll, mut count) = (0f64, 0usize);
    for (c, chunk) in tokens.chunks(256).enumerate() {
        let logits = s.eval(chunk, LogitsFor::All).unwrap();
        for (i, row) in logits.chunks_exact(n_vocab).enumerate() {
            let Some(&next) = tokens.get(c * 256 + i + 1) else {
                continue;
            };
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            nll += max + sum.ln() - row[next as usize] as f64;
            count += 1;
        }
    }
    (nll / count as f64).exp()
}

/// Real code, long: the token ids of this repository's own sources, cut
/// to `n`.
fn code_tokens(model: &Model, n: usize) -> Vec<u32> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut text = String::new();
    for file in [
        "host/runtime/src/model/forward.rs",
        "host/runtime/src/model/session.rs",
    ] {
        text.push_str(&std::fs::read_to_string(root.join(file)).unwrap());
    }
    let tok = model.tokenizer().unwrap();
    let ids = tok.encode(&text, tok.add_bos).unwrap();
    assert!(ids.len() >= n, "{} tokens of code, need {n}", ids.len());
    ids[..n].to_vec()
}

#[test]
fn a_q8_0_kv_cache_costs_under_a_hundredth_of_perplexity_on_a_long_code_file() {
    let Some(path) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let model = Model::load_for(&path, &Backend::builtin_cpu(), 0).unwrap();
    let tokens = code_tokens(&model, 2048);
    let f16 = perplexity(&model, DType::F16, &tokens);
    let q8 = perplexity(&model, DType::Q8_0, &tokens);
    let q4 = perplexity(&model, DType::Q4_0, &tokens);
    eprintln!(
        "perplexity of {} tokens of code: f16 KV {f16:.4}, q8_0 {q8:.4} ({:+.4}), q4_0 {q4:.4} ({:+.4})",
        tokens.len(),
        q8 - f16,
        q4 - f16
    );
    assert!(f16 > 1.0 && f16 < 20.0, "a code model reads code: {f16}");
    assert!(
        q8 - f16 <= 0.01,
        "q8_0 KV: perplexity {q8:.4} against f16's {f16:.4}"
    );
    // q4_0 loses more, but it must still read the code.
    assert!(
        q4 < 1.5 * f16,
        "q4_0 KV: perplexity {q4:.4} against {f16:.4}"
    );
}

#[test]
fn needles_come_back_from_several_depths_with_each_kv_type() {
    let Some(path) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let model = Model::load_for(&path, &Backend::builtin_cpu(), 0).unwrap();
    let tok = model.tokenizer().unwrap();
    let needles = [
        ("PORT_ALPHA", 48213, 0.1),
        ("PORT_BRAVO", 73190, 0.5),
        ("PORT_CHARLIE", 26457, 0.9),
    ];
    let text = kiln_tests::needle_haystack(160, &needles);
    let prompt = tok.encode(&text, tok.add_bos).unwrap();
    eprintln!("haystack: {} tokens", prompt.len());
    assert!(prompt.len() > 1500, "{} tokens", prompt.len());
    for kv in [DType::F16, DType::Q8_0, DType::Q4_0] {
        let mut s = session(&model, kv, prompt.len() + 64);
        s.eval(&prompt, LogitsFor::Last).unwrap();
        let mut found = 0;
        for (name, value, depth) in needles {
            // Asked after the haystack (its cache kept), as a completion.
            let (answer, _) = kiln_tests::ask_needle(&mut s, &tok, prompt.len(), name);
            let hit = answer.trim_start().starts_with(&value.to_string());
            eprintln!(
                "{} KV, needle at {:.0} %: {answer:?} ({})",
                KvCache::type_name(kv),
                depth * 100.0,
                if hit { "found" } else { "missed" }
            );
            found += usize::from(hit);
        }
        if kv != DType::Q4_0 {
            assert_eq!(found, needles.len(), "{} KV", KvCache::type_name(kv));
        }
    }
}
