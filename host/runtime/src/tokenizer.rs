//! Tokenizers built from GGUF metadata, run by the `tokenizers` crate.
//!
//! A GGUF file carries its vocabulary the way llama.cpp reads it
//! (`tokenizer.ggml.*`): tokens, token types, and either scores
//! (SentencePiece, `model = "llama"`) or merges (byte-level BPE,
//! `model = "gpt2"`, with a pre-tokenizer named by `tokenizer.ggml.pre`).
//! kiln writes the equivalent Hugging Face `tokenizer.json` document and
//! loads it, so tokenization is the `tokenizers` crate's:
//! - SentencePiece vocabularies become BPE with byte fallback, with merges
//!   derived from the scores exactly as Hugging Face's converter derives
//!   them (every split of a piece into two pieces of the vocabulary, ordered
//!   by the piece's score), and the `▁` normalizer of Llama's tokenizer;
//! - byte-level BPE gets its merges and the pre-tokenizer regex of its
//!   family (Llama 3, Qwen2, DeepSeek-Coder, GPT-2).
//!
//! Control, unknown and user-defined tokens are added tokens, so special
//! tokens written in the text (`<|fim_prefix|>`, `<s>`) are matched as
//! tokens, as llama.cpp does with special parsing on.

use crate::gguf::{GgufFile, Value};
use serde_json::{Value as Json, json};
use std::collections::{HashMap, HashSet};
use tokenizers::AddedToken;
use tokenizers::models::bpe::{BPE, Merges, Vocab};

/// The model a tokenizer's JSON is parsed with before the real one, built
/// through the API, takes its place.
fn placeholder_model() -> Json {
    json!({"type": "BPE", "vocab": {}, "merges": []})
}

// llama.cpp's token types.
const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;
const UNUSED: i64 = 5;
const BYTE: i64 = 6;

#[derive(Debug, thiserror::Error)]
#[error("{path}: tokenizer: {what}")]
pub struct TokenizerError {
    pub path: String,
    pub what: String,
}

/// Why [`Tokenizer::encode_within`] gave no tokens.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("the text has at least {at_least} tokens, more than the {limit} that fit")]
    TooLong { at_least: usize, limit: usize },
    #[error("{0}")]
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// SentencePiece (Llama 2, TinyLlama, CodeLlama, Mistral).
    SentencePiece,
    /// Byte-level BPE (Llama 3, Qwen2/Qwen3, DeepSeek-Coder, GPT-2, StarCoder).
    ByteLevelBpe,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub kind: VocabKind,
    /// The pre-tokenizer family (`tokenizer.ggml.pre`), for BPE.
    pub pre: String,
    pub tokens: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    end_of_generation: HashSet<u32>,
}

/// Every `tokenizer.ggml.pre` name kiln knows (its pre-tokenizer regexes).
pub const PRE_TOKENIZERS: [&str; 19] = [
    "llama3",
    "llama-bpe",
    "llama-v3",
    "qwen2",
    "deepseek-r1-qwen",
    "deepseek-coder",
    "default",
    "gpt-2",
    "phi-2",
    "mpt",
    "olmo",
    "starcoder",
    "smollm",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
    "mellum2",
];

/// The pre-tokenizer regexes of each byte-level BPE family, as their
/// `tokenizer.json` files spell them.
pub fn pre_tokenizer(pre: &str) -> Option<Json> {
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    let llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let seq = |items: Vec<Json>| json!({"type": "Sequence", "pretokenizers": items});
    Some(match pre {
        "llama3" | "llama-bpe" | "llama-v3" => seq(vec![split(llama3), byte_level]),
        "qwen2" | "deepseek-r1-qwen" => seq(vec![split(qwen2), byte_level]),
        "deepseek-coder" => seq(vec![
            split(r"[\r\n]"),
            split(r"\s?\p{L}+"),
            split(r"\s?\p{P}+"),
            split("[\u{4e00}-\u{9fa5}\u{0800}-\u{4e00}\u{ac00}-\u{d7ff}]+"),
            split(r"\p{N}"),
            byte_level,
        ]),
        "default" | "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
        }
        // Single digits, then GPT-2's regex: llama.cpp gives these names
        // the same pre-tokenizer (SmolLM and SmolLM2 write `smollm`).
        "starcoder" | "smollm" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => seq(vec![
            json!({"type": "Digits", "individual_digits": true}),
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
        ]),
        _ => return None,
    })
}

/// Hugging Face's `SentencePieceExtractor`: for every piece, every split
/// into two pieces that are both in `vocab` (the ids of `tokens`, a
/// repeated string at its first), ordered by the piece's score (highest
/// first), then by the piece's id, then by the ids of the two halves.
/// Gemma 3's 262,144 pieces give 514,847 merges: the pieces are split on
/// every core.
pub fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let per = tokens.len().div_ceil(threads).max(1);
    // (score, piece, left, right): no two alike, so any sort gives one order.
    let mut found: Vec<(f32, u32, u32, u32)> = std::thread::scope(|s| {
        let jobs: Vec<_> = (tokens.chunks(per).zip(scores.chunks(per)).enumerate())
            .map(|(c, (part, scores))| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for (k, (piece, &score)) in part.iter().zip(scores).enumerate() {
                        let i = c * per + k;
                        for (at, _) in piece.char_indices().skip(1) {
                            let (l, r) = piece.split_at(at);
                            if let (Some(&l), Some(&r)) = (vocab.get(l), vocab.get(r)) {
                                out.push((score, i as u32, l, r));
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        (jobs.into_iter())
            .flat_map(|j| j.join().expect("splitting pieces panicked"))
            .collect()
    });
    found.sort_unstable_by(|a, b| {
        (b.0.total_cmp(&a.0)).then_with(|| (a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    (found.into_iter())
        .map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect()
}

/// The ids of `tokens`: a repeated string keeps its first id, as
/// llama.cpp's map does.
fn vocab_of(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate().rev() {
        vocab.insert(t.clone(), i as u32);
    }
    vocab
}

/// Splits a merge "a b" at the first space after the first character, as
/// llama.cpp does (so a token may itself start with a space).
fn split_merge(m: &str) -> Option<(&str, &str)> {
    let first = m.chars().next()?.len_utf8();
    let at = first + m[first..].find(' ')?;
    Some((&m[..at], &m[at + 1..]))
}

fn strings(f: &GgufFile, key: &str) -> Option<Vec<String>> {
    f.get(key)?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect()
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let err = |what: String| TokenizerError {
            path: f.path().display().to_string(),
            what,
        };
        let model = f
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                err("the file has no tokenizer (tokenizer.ggml.model is missing)".into())
            })?;
        let tokens = strings(f, "tokenizer.ggml.tokens").ok_or_else(|| {
            err("tokenizer.ggml.tokens is missing or not a list of strings".into())
        })?;
        let n = tokens.len();
        let types: Vec<i64> = match f.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(NORMAL)).collect(),
            None => vec![NORMAL; n],
        };
        if types.len() != n {
            return Err(err(format!("{} token types for {n} tokens", types.len())));
        }
        let id_key = |k: &str| -> Result<Option<u32>, TokenizerError> {
            match f.get(k).and_then(Value::as_u64) {
                Some(id) if id as usize >= n => Err(err(format!(
                    "{k} = {id} is outside the vocabulary of {n} tokens"
                ))),
                other => Ok(other.map(|v| v as u32)),
            }
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let eot = id_key("tokenizer.ggml.eot_token_id")?;
        let unk = id_key("tokenizer.ggml.unknown_token_id")?;

        // The BPE model is built through the library's API, not its JSON:
        // a 262,144-token vocabulary (Gemma 3) took 2.5 s to write out and
        // parse back.
        let vocab = vocab_of(&tokens);
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| matches!(**ty, CONTROL | UNKNOWN | USER_DEFINED))
            .map(|(t, ty)| AddedToken::from(t.clone(), *ty != USER_DEFINED).normalized(false))
            .collect();
        let (kind, pre, doc, bpe) = match model {
            "llama" => {
                let scores: Vec<f32> =
                    match f.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                        None => {
                            return Err(err(
                                "a SentencePiece vocabulary needs tokenizer.ggml.scores".into(),
                            ));
                        }
                    };
                if scores.len() != n {
                    return Err(err(format!("{} scores for {n} tokens", scores.len())));
                }
                let has_bytes = types.iter().filter(|&&t| t == BYTE).count() == 256;
                let merges = merges_from_scores(&tokens, &scores, &vocab);
                let add_space = f
                    .get("tokenizer.ggml.add_space_prefix")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                let mut normalizers = Vec::new();
                if add_space {
                    normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
                }
                normalizers.push(
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
                );
                let unk_token = unk.map(|u| tokens[u as usize].clone());
                let doc = json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": [],
                    "normalizer": {"type": "Sequence", "normalizers": normalizers},
                    "pre_tokenizer": null, "post_processor": null,
                    "decoder": {"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                        {"type": "ByteFallback"}, {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": if add_space { 1 } else { 0 }, "stop": 0}]},
                    "model": placeholder_model(),
                });
                let mut bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .fuse_unk(true)
                    .byte_fallback(has_bytes);
                if let Some(u) = unk_token {
                    bpe = bpe.unk_token(u);
                }
                (VocabKind::SentencePiece, String::new(), doc, bpe)
            }
            "gpt2" => {
                let pre = f
                    .get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default")
                    .to_string();
                let pre_tokenizer = pre_tokenizer(&pre).ok_or_else(|| {
                    err(format!(
                        "pre-tokenizer {pre:?} is not supported yet; kiln knows {}",
                        PRE_TOKENIZERS.join(", ")
                    ))
                })?;
                let merges: Merges = strings(f, "tokenizer.ggml.merges")
                    .ok_or_else(|| err("a BPE vocabulary needs tokenizer.ggml.merges".into()))?
                    .iter()
                    .map(|m| match split_merge(m) {
                        Some((a, b)) => Ok((a.to_string(), b.to_string())),
                        None => Err(err(format!("merge {m:?} has no space"))),
                    })
                    .collect::<Result<_, _>>()?;
                let doc = json!({
                    "version": "1.0", "truncation": null, "padding": null,
                    "added_tokens": [],
                    "normalizer": if pre == "qwen2" { json!({"type": "NFC"}) } else { Json::Null },
                    "pre_tokenizer": pre_tokenizer, "post_processor": null,
                    "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
                    "model": placeholder_model(),
                });
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(matches!(pre.as_str(), "llama3" | "llama-bpe" | "llama-v3"));
                (VocabKind::ByteLevelBpe, pre, doc, bpe)
            }
            other => {
                return Err(err(format!(
                    "tokenizer model {other:?} is not supported (kiln reads \"llama\" SentencePiece and \"gpt2\" BPE vocabularies)"
                )));
            }
        };
        let build = |e: tokenizers::Error| err(format!("cannot build the tokenizer: {e}"));
        let mut inner =
            tokenizers::Tokenizer::from_bytes(doc.to_string().as_bytes()).map_err(build)?;
        inner.with_model(bpe.build().map_err(build)?);
        // As the JSON's added_tokens would be: specials, then the rest,
        // each at its id in the vocabulary.
        let (special, user): (Vec<_>, Vec<_>) = added.into_iter().partition(|t| t.special);
        inner.add_special_tokens(special).map_err(build)?;
        inner.add_tokens(user).map_err(build)?;
        let add_bos = f
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(kind == VocabKind::SentencePiece);
        let mut end_of_generation: HashSet<u32> = [eos, eot].into_iter().flatten().collect();
        for name in [
            "<|eot_id|>",
            "<|im_end|>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "<|EOT|>",
            "<end_of_turn>",
        ] {
            if let Some(i) = tokens.iter().position(|t| t == name)
                && types[i] == CONTROL
            {
                end_of_generation.insert(i as u32);
            }
        }
        Ok(Tokenizer {
            inner,
            kind,
            pre,
            tokens,
            bos,
            eos,
            add_bos,
            end_of_generation,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// Token ids of `text`; special tokens written in the text become their
    /// ids. With `add_bos`, the BOS token comes first when the vocabulary
    /// asks for it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, String> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| format!("cannot tokenize: {e}"))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if add_bos
            && self.add_bos
            && let Some(b) = self.bos
        {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// [`Tokenizer::encode`] for text that must fit `limit` tokens, with
    /// work bounded by the limit rather than by the text: the text is
    /// counted in pieces of about 8 KiB (cut at line breaks where there
    /// are any) and refused as soon as the pieces add up to clearly more
    /// than the limit; only text that may fit is tokenized whole.
    pub fn encode_within(
        &self,
        text: &str,
        add_bos: bool,
        limit: usize,
    ) -> Result<Vec<u32>, EncodeError> {
        const PIECE: usize = 8 << 10;
        // Pieces tokenized apart may differ from the whole at each cut by
        // a few tokens (a merge across the cut, a prefix space).
        const SLACK_PER_PIECE: usize = 4;
        if text.len() > PIECE {
            let (mut at, mut counted, mut pieces) = (0, 0, 0);
            while at < text.len() {
                let mut end = (at + PIECE).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                if end < text.len()
                    && let Some(nl) = text[at..end].rfind('\n')
                    && nl > 0
                {
                    end = at + nl + 1;
                }
                counted += self
                    .encode(&text[at..end], false)
                    .map_err(EncodeError::Failed)?
                    .len();
                pieces += 1;
                at = end;
                if counted > limit + SLACK_PER_PIECE * pieces {
                    return Err(EncodeError::TooLong {
                        at_least: counted.saturating_sub(SLACK_PER_PIECE * pieces),
                        limit,
                    });
                }
            }
        }
        let ids = self.encode(text, add_bos).map_err(EncodeError::Failed)?;
        if ids.len() > limit {
            return Err(EncodeError::TooLong {
                at_least: ids.len(),
                limit,
            });
        }
        Ok(ids)
    }

    /// Text of `ids`, without control tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Whether generation should stop at this token (EOS, EOT, …).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.contains(&id)
    }

    /// The vocabulary entry of `id` as written in the model file.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == text).map(|i| i as u32)
    }
}

/// The `tokenizer.ggml.*` metadata for a Hugging Face `tokenizer.json`
/// (with its `tokenizer_config.json`, when there is one), as llama.cpp's
/// converter writes it. `vocab_size` is the model's (its embedding rows):
/// ids without a token are padded as unused `[PADn]` tokens.
pub fn gguf_metadata(
    tj: &Json,
    config: Option<&Json>,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, String> {
    use crate::gguf::ValueType as VT;
    let model = &tj["model"];
    if model["type"] != "BPE" {
        return Err(format!(
            "tokenizer model {} is not supported (kiln converts BPE and SentencePiece-BPE tokenizers)",
            model["type"]
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or("tokenizer.json has no model.vocab")?;
    let mut by_id: HashMap<usize, String> = HashMap::new();
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| format!("vocab entry {t:?} has no integer id"))?
            as usize;
        by_id.insert(id, t.clone());
    }
    let mut special: HashMap<usize, bool> = HashMap::new();
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        by_id.insert(id as usize, content.to_string());
        special.insert(id as usize, a["special"].as_bool().unwrap_or(false));
    }
    let max_id = by_id.keys().max().copied().unwrap_or(0);
    if max_id >= vocab_size {
        return Err(format!(
            "the tokenizer has token id {max_id} but the model's vocabulary is {vocab_size}; the tokenizer does not belong to this model"
        ));
    }
    let metaspace = |v: &Json| {
        let text = v.to_string();
        text.contains('\u{2581}') || text.contains("Metaspace")
    };
    let is_spm = model["byte_fallback"].as_bool().unwrap_or(false)
        && (metaspace(&tj["normalizer"]) || metaspace(&tj["pre_tokenizer"]));
    let unk = model["unk_token"].as_str();
    let tokens: Vec<String> = (0..vocab_size)
        .map(|i| {
            by_id
                .get(&i)
                .cloned()
                .unwrap_or_else(|| format!("[PAD{i}]"))
        })
        .collect();
    let is_byte = |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
    let types: Vec<i64> = (0..vocab_size)
        .map(|i| match (by_id.get(&i), special.get(&i)) {
            (None, _) => UNUSED,
            (Some(t), _) if Some(t.as_str()) == unk => UNKNOWN,
            (Some(_), Some(true)) => CONTROL,
            (Some(_), Some(false)) => USER_DEFINED,
            (Some(t), None) if is_spm && is_byte(t) => BYTE,
            _ => NORMAL,
        })
        .collect();
    let merges: Vec<(String, String)> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => split_merge(s)
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merge {s:?} has no space")),
            Json::Array(pair) if pair.len() == 2 => Ok((
                pair[0].as_str().unwrap_or_default().to_string(),
                pair[1].as_str().unwrap_or_default().to_string(),
            )),
            other => Err(format!("merge {other} is neither \"a b\" nor [a, b]")),
        })
        .collect::<Result<_, _>>()?;
    let strs =
        |v: Vec<String>| Value::Array(VT::String, v.into_iter().map(Value::String).collect());
    let type_values = Value::Array(
        VT::I32,
        types.iter().map(|&t| Value::I32(t as i32)).collect(),
    );
    let mut meta: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, v: Value| meta.push((format!("tokenizer.ggml.{k}"), v));
    if is_spm {
        // Scores that reproduce the merge order: a piece scores minus the
        // rank of the first merge that makes it; pieces no merge makes rank last.
        let mut first_rank: HashMap<String, usize> = HashMap::new();
        for (rank, (a, b)) in merges.iter().enumerate() {
            first_rank.entry(format!("{a}{b}")).or_insert(rank);
        }
        let scores: Vec<Value> = tokens
            .iter()
            .map(|t| Value::F32(first_rank.get(t).map_or(-1e9, |&r| -(r as f32))))
            .collect();
        let prepend = tj["normalizer"].to_string().contains("Prepend")
            || tj["pre_tokenizer"]["prepend_scheme"]
                .as_str()
                .is_some_and(|s| s != "never");
        put("model", Value::String("llama".into()));
        put("tokens", strs(tokens.clone()));
        put("scores", Value::Array(VT::F32, scores));
        put("token_type", type_values);
        put("add_space_prefix", Value::Bool(prepend));
    } else {
        let regexes: Vec<String> = tj["pre_tokenizer"]["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["pattern"]["Regex"].as_str().map(str::to_string))
            .collect();
        let pre_text = tj["pre_tokenizer"].to_string();
        let pre = if regexes.iter().any(|r| r.contains(r"\p{N}{1,3}")) {
            "llama-bpe"
        } else if regexes.iter().any(|r| r.contains(r"\p{L}+|\p{N}| ?")) {
            "qwen2"
        } else if regexes.iter().any(|r| r == r"\s?\p{P}+") {
            "deepseek-coder"
        } else if pre_text.contains("Digits") {
            "starcoder"
        } else if pre_text.contains("ByteLevel") && pre_text.contains("\"use_regex\":true") {
            "gpt-2"
        } else {
            return Err("unrecognised pre-tokenizer; kiln converts the Llama 3, Qwen2, DeepSeek-Coder, StarCoder and GPT-2 families".into());
        };
        put("model", Value::String("gpt2".into()));
        put("pre", Value::String(pre.into()));
        put("tokens", strs(tokens.clone()));
        put("token_type", type_values);
        put(
            "merges",
            strs(merges.iter().map(|(a, b)| format!("{a} {b}")).collect()),
        );
    }
    let id_of = |t: &str| tokens.iter().position(|x| x == t);
    let config_token = |key: &str| -> Option<String> {
        let v = &config?[key];
        v.as_str()
            .map(str::to_string)
            .or_else(|| v["content"].as_str().map(str::to_string))
    };
    let mut ids: Vec<(&str, usize)> = Vec::new();
    for (key, gguf_key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(id) = config_token(key).and_then(|t| id_of(&t)) {
            ids.push((gguf_key, id));
        }
    }
    if is_spm
        && !ids.iter().any(|(k, _)| *k == "unknown_token_id")
        && let Some(u) = unk.and_then(id_of)
    {
        ids.push(("unknown_token_id", u));
    }
    for (name, gguf_key) in [
        ("<|fim_prefix|>", "fim_pre_token_id"),
        ("<|fim_suffix|>", "fim_suf_token_id"),
        ("<|fim_middle|>", "fim_mid_token_id"),
        ("<|fim_pad|>", "fim_pad_token_id"),
        ("<|repo_name|>", "fim_rep_token_id"),
        ("<|file_sep|>", "fim_sep_token_id"),
    ] {
        if let Some(id) = id_of(name) {
            ids.push((gguf_key, id));
        }
    }
    for (k, id) in ids {
        put(k, Value::U32(id as u32));
    }
    let post = tj["post_processor"].to_string();
    let add_bos = config
        .and_then(|c| c["add_bos_token"].as_bool())
        .unwrap_or_else(|| {
            post.contains("TemplateProcessing") && post.contains("\"single\":[{\"SpecialToken\"")
        });
    let add_eos = config
        .and_then(|c| c["add_eos_token"].as_bool())
        .unwrap_or(false);
    put("add_bos_token", Value::Bool(add_bos));
    put("add_eos_token", Value::Bool(add_eos));
    Ok(meta)
}

/// Turns a growing list of token ids into text deltas, holding back bytes
/// until they form whole characters. Each token decodes a short window,
/// not the whole text again: the tokens from `prefix` on, whose text up
/// to `read` was sent, against the same window without the new ones (so
/// that what a decoder does at the window's start, such as dropping a
/// SentencePiece word's leading space, is done to both alike); the
/// deltas add up to the decoding of all the ids.
#[derive(Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Where the window starts.
    prefix: usize,
    /// Tokens sent up to here.
    read: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let sent = tok.decode(&self.ids[self.prefix..self.read]);
        let text = tok.decode(&self.ids[self.prefix..]);
        if text.ends_with('\u{fffd}')
            || text.len() <= sent.len()
            || !text.is_char_boundary(sent.len())
            || !text.starts_with(&sent)
        {
            return String::new();
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        text[sent.len()..].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_scores_then_ids() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let m = merges_from_scores(&tokens, &scores, &vocab_of(&tokens));
        let as_str: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // "bc" (score -1) before "ab" (-2) before the two ways to make "abc".
        assert_eq!(
            as_str,
            vec![("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]
        );
    }

    #[test]
    fn merges_split_after_the_first_character() {
        assert_eq!(split_merge("\u{2581} t"), Some(("\u{2581}", "t")));
        assert_eq!(split_merge("  a"), Some((" ", "a")));
        assert_eq!(split_merge("ab"), None);
    }

    #[test]
    fn every_supported_pre_tokenizer_builds() {
        for pre in PRE_TOKENIZERS {
            let p = pre_tokenizer(pre).unwrap();
            let doc = json!({"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": p,
                "post_processor": null, "decoder": null, "truncation": null, "padding": null,
                "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}});
            tokenizers::Tokenizer::from_bytes(doc.to_string().as_bytes()).unwrap();
        }
        assert!(pre_tokenizer("falcon").is_none());
    }
}
