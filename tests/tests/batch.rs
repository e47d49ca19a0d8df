//! Batched decoding: several sequences of one model decoded in one
//! forward pass give each sequence the very logits (bit for bit) of its
//! own decode step, whatever the batch's size (the products' one-row,
//! few-row and GEMM paths) and wherever each sequence stands (prompts of
//! different lengths, a sliding window past its edge); on a tiny llama, a
//! tiny Gemma 3 with a window of 7, and the released SmolLM2 and Gemma 3.

use kiln_runtime::backend::Backend;
use kiln_runtime::backend::exec::Executor;
use kiln_runtime::gguf::GgufFile;
use kiln_runtime::model::ModelError;
use kiln_runtime::model::forward::LogitsFor;
use kiln_runtime::model::generate::{
    BatchHost, Boundary, Generation, Joining, Outcome, Request, StopReason, generate,
    generate_batch,
};
use kiln_runtime::model::sample::SamplingParams;
use kiln_runtime::model::sample::argmax;
use kiln_runtime::model::session::{can_batch, decode_batch};
use kiln_runtime::model::{Model, Session};
use kiln_runtime::tokenizer::Tokenizer;
use kiln_tests::{real_model, tiny_llama, tiny_model};
use std::path::Path;
use std::sync::Arc;

const GEMMA3: &[&str] = &[
    "--arch",
    "gemma3",
    "--dtype",
    "f16",
    "--embd",
    "128",
    "--layers",
    "3",
    "--heads",
    "4",
    "--kv-heads",
    "1",
    "--head-dim",
    "64",
    "--ff",
    "256",
    "--vocab",
    "512",
    "--window",
    "7",
    "--tied",
];

fn session(m: &Arc<Model>) -> Session {
    Session::new(
        m.clone(),
        Executor::new(Backend::builtin_cpu(), 0),
        Some(512),
    )
    .unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `batch` sequences with prompts of different lengths, then `steps`
/// greedy steps decoded together and, apart, one by one.
fn check(path: &Path, batch: usize, steps: usize) {
    let m = Model::load(path).unwrap();
    let n_vocab = m.config.n_vocab as u32;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            let len = 3 + 5 * i + (i % 2) * 11;
            (0..len)
                .map(|j| 1 + ((j * 37 + i * 101) as u32 % (n_vocab - 1)))
                .collect()
        })
        .collect();
    let mut together: Vec<Session> = prompts.iter().map(|_| session(&m)).collect();
    let mut apart: Vec<Session> = prompts.iter().map(|_| session(&m)).collect();
    let mut next: Vec<u32> = Vec::new();
    for ((a, b), p) in together.iter_mut().zip(&mut apart).zip(&prompts) {
        let la = a.eval(p, LogitsFor::Last).unwrap();
        let lb = b.eval(p, LogitsFor::Last).unwrap();
        assert_eq!(bits(&la), bits(&lb));
        next.push(argmax(&la));
    }
    for step in 0..steps {
        let mut refs: Vec<&mut Session> = together.iter_mut().collect();
        decode_batch(&mut refs, &next).unwrap();
        for (i, (a, b)) in together.iter().zip(&mut apart).enumerate() {
            let alone = b.decode(next[i]).unwrap();
            assert!(
                bits(a.logits()) == bits(alone),
                "{}: batch of {batch}, sequence {i} at position {}, step {step}: the batch's logits \
                 differ from its own decode step's",
                path.display(),
                b.n_past() - 1
            );
            next[i] = argmax(alone);
        }
    }
}

#[test]
fn a_batch_of_tiny_llama_sequences_gives_each_its_own_logits() {
    let path = tiny_llama("f16");
    for batch in [1, 2, 3, 4, 7] {
        check(&path, batch, 6);
    }
}

#[test]
fn a_batch_past_a_sliding_window_gives_each_its_own_logits() {
    // Prompts of 3 to 30 tokens and 12 steps: most positions are past the
    // window of 7.
    let path = tiny_model(GEMMA3);
    for batch in [2, 5] {
        check(&path, batch, 12);
    }
}

#[test]
fn a_batch_of_released_models_gives_each_its_own_logits() {
    for file in [
        "smollm2-135m-instruct-q4_1.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let Some(path) = real_model(file) else {
            continue;
        };
        for batch in [2, 4] {
            check(&path, batch, 4);
        }
    }
}

#[test]
fn sessions_of_different_models_or_caches_are_refused() {
    let a = Model::load(&tiny_llama("f16")).unwrap();
    let b = Model::load(&tiny_model(GEMMA3)).unwrap();
    let (mut x, mut y) = (session(&a), session(&b));
    let err = can_batch(&[&mut x, &mut y]).unwrap_err().to_string();
    assert!(err.contains("different models"), "{err}");
    let mut q = Session::with_kv_type(
        b.clone(),
        Executor::new(Backend::builtin_cpu(), 0),
        Some(512),
        kiln_plugin_api::DType::Q8_0,
    )
    .unwrap();
    let err = can_batch(&[&mut y, &mut q]).unwrap_err().to_string();
    assert!(err.contains("KV caches differ"), "{err}");
    let mut refs = [&mut x];
    let err = decode_batch(&mut refs, &[1, 2]).unwrap_err().to_string();
    assert!(err.contains("2 tokens for 1 sessions"), "{err}");
    assert_eq!(
        x.n_past(),
        0,
        "a refused batch leaves the session as it was"
    );
}

/// A batch's host in a test: requests queued to join, what each streamed,
/// how each ended; request `cancel` is cancelled by its text callback.
struct Host {
    queued: std::collections::VecDeque<Joining>,
    streamed: Vec<String>,
    ended: Vec<Option<Result<Outcome, String>>>,
    cancel: Option<u64>,
    joined_late: usize,
}

impl BatchHost for Host {
    fn join(&mut self, free: &[usize]) -> Vec<Joining> {
        let n = free.len().min(self.queued.len());
        self.joined_late += n;
        (free[..n].iter())
            .map(|&session| Joining {
                session,
                ..self.queued.pop_front().unwrap()
            })
            .collect()
    }
    fn text(&mut self, tag: u64, text: &str) -> bool {
        self.streamed[tag as usize].push_str(text);
        self.cancel != Some(tag)
    }
    fn done(&mut self, tag: u64, result: Result<Outcome, ModelError>, _: &mut Session) {
        self.ended[tag as usize] = Some(result.map_err(|e| e.to_string()));
    }
}

/// Requests generated together (greedy and seeded sampling, stop strings,
/// line boundaries, different lengths, so that they end at different
/// steps), more of them than sessions (the rest join as sessions free
/// up), give each request alone's tokens, text and stop reason, on the
/// released SmolLM2; one cancelled by its text callback ends cancelled
/// while the others go on.
#[test]
fn requests_generated_together_give_what_each_gives_alone() {
    let Some(path) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    let m = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let ask = |prompt: &str, max: usize, sampling: &SamplingParams| {
        Request::new(tok.encode(prompt, true).unwrap(), max, sampling.clone())
    };
    let mut reqs = [
        ask("def fibonacci(n):\n", 40, &greedy),
        ask("fn main() {\n    let v = vec![1, 2, 3];\n", 12, &greedy),
        ask(
            "// Sorts the array in place.\nfunction sort(a) {\n",
            30,
            &SamplingParams {
                seed: 7,
                ..SamplingParams::default()
            },
        ),
        ask("import os\nimport sys\n\ndef main():\n", 24, &greedy),
        ask("#include <stdio.h>\nint main() {\n", 32, &greedy),
        ask("SELECT name, count(*) FROM users", 20, &greedy),
    ];
    reqs[3].stop = vec!["\n\n".into()];
    reqs[4].boundary = Boundary::Line;
    // Alone, each on a fresh session.
    let alone: Vec<Generation> = (reqs.iter())
        .map(|r| generate(&mut session(&m), &tok, r, |_| true).unwrap())
        .collect();
    let reasons: Vec<StopReason> = alone.iter().map(|g| g.stop_reason).collect();
    assert!(
        reasons.contains(&StopReason::MaxTokens)
            && reasons.iter().any(|r| *r != StopReason::MaxTokens),
        "the requests end in different ways: {reasons:?}"
    );
    for cancel in [None, Some(0)] {
        // Three sessions for six requests: three start, three join later.
        let mut owned: Vec<Session> = (0..3).map(|_| session(&m)).collect();
        let mut sessions: Vec<&mut Session> = owned.iter_mut().collect();
        let mut host = Host {
            queued: (reqs.iter().enumerate())
                .map(|(i, r)| Joining {
                    tag: i as u64,
                    session: 0,
                    request: r.clone(),
                    resume: None,
                })
                .collect(),
            streamed: vec![String::new(); reqs.len()],
            ended: (0..reqs.len()).map(|_| None).collect(),
            cancel,
            joined_late: 0,
        };
        let first: Vec<Joining> = (0..3)
            .map(|s| Joining {
                session: s,
                ..host.queued.pop_front().unwrap()
            })
            .collect();
        generate_batch(&mut sessions, &tok, first, None, &mut host);
        assert_eq!(host.joined_late, 3, "three requests joined a running batch");
        for (i, a) in alone.iter().enumerate() {
            let Some(Ok(Outcome::Done(t))) = &host.ended[i] else {
                panic!(
                    "request {i} did not finish: {:?}",
                    host.ended[i].as_ref().map(|r| r.is_ok())
                );
            };
            if cancel == Some(i as u64) {
                assert_eq!(t.stop_reason, StopReason::Cancelled);
                assert!(t.token_ids.len() < a.token_ids.len());
                continue;
            }
            assert_eq!(t.token_ids, a.token_ids, "request {i}");
            assert_eq!(t.text, a.text, "request {i}");
            assert_eq!(t.stop_reason, a.stop_reason, "request {i}");
            assert_eq!(host.streamed[i], t.text, "request {i}: what was streamed");
        }
    }
}

/// Over HTTP: completions sent at once to one served model (SmolLM2) are
/// decoded together — those that arrive while others decode join them at
/// the next step (`kiln:batched_requests_total` counts them, `/v1/models`
/// gives the model's `decode_batch`) — and each answer is the one a
/// server decoding one request at a time (`[engine] decode_batch = 1`)
/// gives.
#[test]
fn concurrent_http_completions_are_decoded_together_with_the_same_answers() {
    use kiln_tests::Home;
    use kiln_tests::serve::{http, http_server_with, metric, post};
    use serde_json::{Value, json};
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    const PROMPTS: [&str; 6] = [
        "def fibonacci(n):\n",
        "fn main() {\n    let v = vec![1, 2, 3];\n",
        "// Sorts the array in place.\nfunction sort(a) {\n",
        "import os\nimport sys\n\ndef main():\n",
        "#include <stdio.h>\nint main() {\n",
        "SELECT name, count(*) FROM users",
    ];
    let serve = |batch: usize| {
        let home = Home::default();
        std::fs::write(
            home.path().join("config.toml"),
            format!("[engine]\ndecode_batch = {batch}\n"),
        )
        .unwrap();
        let srv = http_server_with(&home, &model, &[]);
        let answers: Vec<String> = std::thread::scope(|s| {
            let asks: Vec<_> = (PROMPTS.iter().enumerate())
                .map(|(i, p)| {
                    let addr = srv.addr.clone();
                    s.spawn(move || {
                        // Different lengths: requests end at different steps.
                        let body = json!({"prompt": p, "max_tokens": 16 + 4 * i, "temperature": 0});
                        let (code, v) = post(&addr, "/v1/completions", &body);
                        assert_eq!(code, 200, "{v}");
                        v["choices"][0]["text"].as_str().unwrap().to_string()
                    })
                })
                .collect();
            asks.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (_, metrics) = http(&srv.addr, "GET", "/metrics", b"");
        let (_, list) = http(&srv.addr, "GET", "/v1/models", b"");
        let list: Value = serde_json::from_str(&list).unwrap();
        let said = list["data"][0]["kiln"]["decode_batch"].clone();
        (
            answers,
            metric(&metrics, "kiln:batched_requests_total"),
            said,
        )
    };
    let (together, batched, said) = serve(4);
    assert_eq!(said, 4, "/v1/models gives the model's decode_batch");
    assert!(
        (2..=6).contains(&batched),
        "six requests at once: some were decoded together, each counted once ({batched})"
    );
    let (alone, batched, said) = serve(1);
    assert_eq!((batched, said), (0, json!(1)));
    assert_eq!(
        together, alone,
        "the answers decoded together and one at a time"
    );
}
