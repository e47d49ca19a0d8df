//! Real released models against llama.cpp (llama-cpp-python), on the
//! files people download: SmolLM2-135M-Instruct as released in Q4_1
//! (llama architecture, GPT-2 BPE with the `smollm` pre-tokenizer, the
//! output tied to a Q8_0 embedding) and Gemma 3 270M in Q4_K_M (gemma3:
//! Q/K norms, post-norms, GeGLU, sliding-window layers; SentencePiece
//! with byte fallback; Q5_0, Q8_0, Q4_K and Q6_K weights).
//!
//! For prompts of code (ASCII and not), and a chat rendered with the
//! model's template where it has one (SmolLM2):
//! - the prompt's token ids equal llama.cpp's;
//! - the logits of the prompt's first real token, evaluated alone (after
//!   nothing, so that attention has one position and every layer's
//!   products and norms show), agree within a bound per model and
//!   predict llama.cpp's next token or a near tie;
//! - every position's logits are as close to llama.cpp's as llama.cpp's
//!   own two attention paths are to each other (within
//!   [`NOISE_FACTOR`] times their distance on that prompt);
//! - 32 greedy tokens after the prompt are llama.cpp's, or part from them
//!   only where the two are close: llama.cpp's token within
//!   [`TIE_BOUND`] of kiln's best in kiln's own logits, or within the
//!   distance of llama.cpp's two paths.
//!
//! Why these bounds. On real activations a last-bit difference decides,
//! now and then, on which side of a rounding boundary an activation falls
//! when it is quantized to 8 bits for the next product; the largest
//! activation of a block sets the block's scale, so one ulp there moves
//! the whole block, and some layers later the logits. kiln's RMSNorm,
//! GELU and RoPE round as ggml's do, bit for bit (RMSNorm was the largest
//! source: a Gemma 3 token moved by 0.9 of the spread, now 9e-7); what
//! remains is the order of sums: kiln adds a product's scaled blocks in f32
//! in one order (`kiln_blocks::q8_dot`, the K-quants' in f64), so that
//! every ISA path gives the same bits, ggml in f32 lanes of its own order,
//! per kernel and ISA. (This test once also asked one prompt's first token
//! to agree to rounding, 1e-4: with kiln's sums exact in f64 one SmolLM2
//! prompt in five escaped every flip, at 3e-6. Once both engines round
//! their sums, none did (the best 6.6e-2; with the reference alone summing
//! exactly again, the same prompt was back at 3e-6): a draw on which
//! activations fall near a rounding boundary, not a property of the code,
//! and one that differs with the CPU llama.cpp is built for.)
//!
//! How large that is, measured on SmolLM2 Q4_1 (AVX-512 machine; the
//! spread is the logits' standard deviation; median and largest over the
//! positions of three prompts): kiln against llama.cpp 0.19–0.24 and
//! 0.33–0.47; llama.cpp's flash-attention path against its default one
//! 0.21–0.25 and 0.28–0.50; llama.cpp with every norm weight moved by one
//! ulp 0.16–0.24 and 0.29–0.56; llama.cpp built for AVX2 alone against the
//! native build 0.12–0.18 and 0.26–0.41 (and the two builds' greedy texts
//! part on the Q8_0 chat prompt at token 22, where kiln's parted from the
//! AVX2 build's). kiln is as close to llama.cpp as llama.cpp is to
//! itself, and a wrong kernel, norm or layer is far outside that (the
//! RMSNorm difference above was 0.9 on the first token, where llama.cpp's
//! paths agree exactly). So the bounds are llama.cpp's own, measured in
//! the test on the machine at hand:
//! - the first real token evaluated alone: there attention has one key
//!   and llama.cpp's paths agree exactly, so the bound is per model (the
//!   8-bit flips' size): SmolLM2 Q4_1 3e-6 to 0.124 (Q4_1 is the worst
//!   case: a block's minimum and its codes' products nearly cancel, and
//!   llama.cpp adds them in f32), bound 0.15; Gemma 3 1.4e-6 for `def`,
//!   0.35 and 0.59 for `fn` and `#` (activations reach 26,800), bound 1;
//!   SmolLM2 requantized by `kiln quantize --allow-requantize` (byte for
//!   byte llama.cpp's requantization) up to 0.14, bound 0.2; Gemma 3
//!   requantized likewise 1e-6 to 0.59 (its own release's flips), bound 1;
//! - every position: [`NOISE_FACTOR`] times the distance between
//!   llama.cpp's two attention paths on the same prompt.
//!
//! The models come from PyPI (`tests/fetch_models.sh`, run by
//! `cargo xtask test`), never from a model hub.

use kiln_runtime::backend::Backend;
use kiln_runtime::backend::exec::Executor;
use kiln_runtime::model::forward::LogitsFor;
use kiln_runtime::model::sample::argmax;
use kiln_runtime::model::{Model, Session};
use kiln_tests::{
    Home, largest_row_error, llama_cpp_available, llama_logits_with, oracle,
    quantize_like_llama_cpp, real_model, relative_error, spread,
};
use std::path::Path;
use std::sync::Arc;

const GREEDY: usize = 32;

/// Where kiln's greedy tokens first part from llama.cpp's: llama.cpp's
/// token's logit below kiln's best, over the spread (or, if larger, the
/// distance between llama.cpp's two attention paths on the prompt).
const TIE_BOUND: f64 = 0.1;

/// kiln's logits at any position against llama.cpp's, as a multiple of the
/// distance between llama.cpp's own two attention paths (flash attention
/// off and on) at any position of the same prompt (at least [`TIE_BOUND`]).
const NOISE_FACTOR: f64 = 2.0;

const PROMPTS: [&str; 4] = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", ",
    "// Sorts the array in place.\nfunction bubbleSort(arr) {\n  for (let i = 0; i < arr.length; i++) {\n",
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    printf(\"héllo, wörld 42\\n\");\n",
];

struct Run {
    logits: Vec<f32>,
    greedy: Vec<u32>,
    /// kiln only: the logits before each greedy token.
    steps: Vec<Vec<f32>>,
}

/// kiln on `tokens`, then `n_greedy` greedy tokens.
fn kiln_run(m: &Arc<Model>, tokens: &[u32], n_greedy: usize) -> Run {
    let mut s = Session::new(
        m.clone(),
        Executor::new(Backend::builtin_cpu(), 0),
        Some(512),
    )
    .unwrap();
    let n_vocab = s.model.config.n_vocab;
    let logits = s.eval(tokens, LogitsFor::All).unwrap();
    let mut step = logits[logits.len() - n_vocab..].to_vec();
    let (mut greedy, mut steps) = (Vec::new(), Vec::new());
    for _ in 0..n_greedy {
        let next = argmax(&step);
        greedy.push(next);
        steps.push(std::mem::replace(
            &mut step,
            s.eval(&[next], LogitsFor::Last).unwrap(),
        ));
    }
    Run {
        logits,
        greedy,
        steps,
    }
}

/// llama.cpp's run ([`kiln_run`]'s); `flash_attn`: its flash-attention
/// path.
fn llama_run(model: &Path, tokens: &[u32], n_greedy: usize, dir: &Path, flash_attn: bool) -> Run {
    let (logits, greedy) = llama_logits_with(model, tokens, n_greedy, dir, flash_attn);
    Run {
        logits,
        greedy,
        steps: Vec::new(),
    }
}

/// Checks `model` on every prompt; `solo_bound`: the first real token's
/// logits, evaluated alone, relative to their spread. Where no 8-bit
/// rounding flips, the two agree to rounding: at least one prompt's first
/// token must (a wrong kernel, norm or layer fails every prompt). `chat`:
/// also a chat rendered with the file's template, where it has one.
fn check(model: &Path, solo_bound: f64, chat: bool) {
    let mut best_solo = f64::INFINITY;
    let home = Home::default();
    // Loaded once: every run below is a new session on it.
    let loaded = Model::load_for(model, &Backend::builtin_cpu(), 0).unwrap();
    let tok = loaded.tokenizer().unwrap();
    // The code prompts, and a chat as `/v1/chat/completions` renders it
    // with the model's own template, where the file has one.
    let mut prompts: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    if let Some(template) = loaded
        .file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .filter(|_| chat)
    {
        let messages = serde_json::json!([
            {"role": "user", "content": "Write a Python function that checks whether a number is prime."}
        ]);
        let inputs = kiln_serve::chat::ChatInputs {
            messages: &messages,
            tools: None,
            bos_token: "",
            eos_token: "",
            add_generation_prompt: true,
        };
        prompts.push(kiln_serve::chat::render(template, &inputs).unwrap());
    }
    let texts = home.path().join("prompts.json");
    std::fs::write(&texts, serde_json::to_string(&prompts).unwrap()).unwrap();
    let theirs: Vec<Vec<u32>> = serde_json::from_str(&oracle(
        "llama_tokenize.py",
        &[model.as_os_str(), texts.as_os_str()],
    ))
    .unwrap();
    for (text, their_ids) in prompts.iter().zip(&theirs) {
        let ids = tok.encode(text, tok.add_bos).unwrap();
        assert_eq!(
            &ids,
            their_ids,
            "{}: token ids of {text:?}",
            model.display()
        );
        let solo = &ids[usize::from(tok.add_bos)..][..1];
        let (ours_solo, llama_solo) = (
            kiln_run(&loaded, solo, 0).logits,
            llama_run(model, solo, 0, home.path(), false).logits,
        );
        let err = relative_error(&ours_solo, &llama_solo);
        best_solo = best_solo.min(err);
        let (ours_top, llama_top) = (argmax(&ours_solo), argmax(&llama_solo));
        let gap = (ours_solo[ours_top as usize] - ours_solo[llama_top as usize]) as f64
            / spread(&ours_solo);
        assert!(
            gap <= TIE_BOUND,
            "{text:?}: after the first token alone kiln predicts {:?}, llama.cpp {:?}, {gap:.3} of the spread apart",
            tok.decode(&[ours_top]),
            tok.decode(&[llama_top]),
        );
        let ours = kiln_run(&loaded, &ids, GREEDY);
        let llama = llama_run(model, &ids, GREEDY, home.path(), false);
        let other = llama_run(model, &ids, GREEDY, home.path(), true);
        let n_vocab = ours.logits.len() / ids.len();
        // How far llama.cpp is from itself on this prompt, and kiln from it.
        let noise = largest_row_error(&other.logits, &llama.logits, n_vocab);
        let far = largest_row_error(&ours.logits, &llama.logits, n_vocab);
        if std::env::var_os("KILN_PARITY_DEBUG").is_some() {
            let rows = ours
                .logits
                .chunks(n_vocab)
                .zip(llama.logits.chunks(n_vocab));
            for (i, (a, b)) in rows.enumerate() {
                eprintln!("position {i}: {:.2e} of the spread", relative_error(a, b));
            }
        }
        let parted = ours
            .greedy
            .iter()
            .zip(&llama.greedy)
            .position(|(a, b)| a != b);
        let parts = |p: Option<usize>| match p {
            None => "equal".to_string(),
            Some(i) => format!("parts at token {i}"),
        };
        let theirs_parted = other
            .greedy
            .iter()
            .zip(&llama.greedy)
            .position(|(a, b)| a != b);
        eprintln!(
            "{}: {text:?}: the first token alone: logits {err:.2e} of the spread; \
             every position: kiln {far:.3}, llama.cpp's two paths {noise:.3}; greedy {} \
             (llama.cpp's two paths: {})",
            model.display(),
            parts(parted),
            parts(theirs_parted),
        );
        assert!(
            err <= solo_bound,
            "{text:?}: the first token's logits differ by {err:.3e} of the spread (bound {solo_bound})"
        );
        let bound = NOISE_FACTOR * noise.max(TIE_BOUND);
        assert!(
            far <= bound,
            "{text:?}: a position's logits differ from llama.cpp's by {far:.3} of the spread, \
             llama.cpp's two attention paths by {noise:.3} (bound {bound:.3})"
        );
        if let Some(i) = parted {
            let step = &ours.steps[i];
            let (best, theirs) = (
                step[ours.greedy[i] as usize],
                step[llama.greedy[i] as usize],
            );
            let gap = (best - theirs) as f64 / spread(step);
            assert!(
                gap <= TIE_BOUND.max(noise),
                "{text:?}: greedy parts at token {i}: kiln {:?}, llama.cpp {:?}, {gap:.3} of the spread apart in kiln's logits \
                 (no near tie; llama.cpp's two paths are {noise:.3} apart)",
                tok.decode(&ours.greedy[..=i]),
                tok.decode(&llama.greedy[..=i]),
            );
        }
    }
    eprintln!(
        "{}: the closest first token {best_solo:.3e} of the spread from llama.cpp's",
        model.display()
    );
}

#[test]
fn smollm2_q4_1_as_released_matches_llama_cpp() {
    let Some(model) = real_model("smollm2-135m-instruct-q4_1.gguf") else {
        return;
    };
    if !llama_cpp_available() {
        return;
    }
    check(&model, 0.15, true);
}

#[test]
fn gemma3_q4_k_m_matches_llama_cpp() {
    let Some(model) = real_model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    if !llama_cpp_available() {
        return;
    }
    check(&model, 1.0, true);
}

/// kiln-code, the model kiln trained itself and ships as `kiln demo`'s
/// default (models/kiln-code, Q8_0, its own byte-level BPE vocabulary
/// with Qwen2's pre-tokenizer and FIM tokens): llama.cpp tokenizes the
/// prompts as kiln does and gives the same greedy tokens, as for the
/// released models. The file is the one committed, at most 10 MB, and
/// kiln's fill-in-the-middle detection finds its template.
#[test]
fn kiln_code_as_shipped_matches_llama_cpp() {
    let model = kiln_tests::repo_root().join("models/kiln-code/kiln-code.gguf");
    let size = std::fs::metadata(&model).unwrap().len();
    assert!(size <= 10 << 20, "kiln-code is {size} bytes");
    let loaded = Model::load(&model).unwrap();
    let tok = loaded.tokenizer().unwrap();
    assert_eq!(
        kiln_serve::fim::FimTemplate::detect(&tok, "kiln-code"),
        kiln_serve::fim::FimTemplate::Qwen
    );
    if !llama_cpp_available() {
        return;
    }
    check(&model, 0.15, false);
}

/// The release requantized by `kiln quantize --allow-requantize` to Q8_0
/// and to the Q4_K_M preset (whose K-quants fall back to Q5_0, Q5_1 and
/// Q8_0 on SmolLM2's 576-wide rows) is byte for byte llama.cpp's own
/// requantization, and runs as llama.cpp runs it.
#[test]
fn smollm2_requantized_by_kiln_matches_llama_cpp() {
    // Measured: the first token alone 3e-6 to 0.10 (q8_0) and 3e-6 to
    // 0.14 (q4_k_m) of the spread: 8-bit flips as in the module's note.
    requantized("smollm2-135m-instruct-q4_1.gguf", 0.2);
}

/// Gemma 3 requantized the same way (its Q4_K, Q5_0, Q6_K and Q8_0 weights
/// dequantized and quantized again, byte for byte as llama.cpp does).
#[test]
fn gemma3_requantized_by_kiln_matches_llama_cpp() {
    requantized("gemma-3-270m-q4_k_m.gguf", 1.0);
}

/// `file` requantized by kiln (as llama.cpp requantizes it) to Q8_0 and the
/// Q4_K_M preset, each [`check`]ed with `solo_bound`.
fn requantized(file: &str, solo_bound: f64) {
    let Some(model) = real_model(file) else {
        return;
    };
    if !llama_cpp_available() {
        return;
    }
    let home = Home::default();
    for target in ["q8_0", "q4_k_m"] {
        let ours = quantize_like_llama_cpp(&home, &model, target, &["--allow-requantize"]);
        check(&ours, solo_bound, true);
    }
}
