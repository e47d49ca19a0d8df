//! The recipe of kiln-code, the small code model kiln trains itself and
//! ships as `kiln demo`'s default: the corpus (permissively licensed Rust
//! from the crates kiln builds with, and CPython's standard library), a
//! byte-level BPE vocabulary trained on it with the `tokenizers` crate
//! (Qwen2's pre-tokenizer, Qwen's fill-in-the-middle tokens), a llama
//! model initialized from a seed, the training data from `kiln finetune
//! prepare`'s pipeline, and full training by kiln's own trainer
//! (`kiln_finetune::train::full`). Every step is seeded and sorted: the
//! same corpus gives the same bytes (the corpus is checked against
//! `corpus.json` when one is given).
//!
//! usage: kiln-model-recipe --work DIR --out kiln-code.gguf [--steps N]
//!        [--check-corpus models/kiln-code/corpus.json]

use clap::Parser;
use kiln_finetune::prepare::{self, ForModel};
use kiln_finetune::train::full;
use kiln_plugin_api::DType;
use kiln_runtime::gguf::{GgufFile, GgufWriter, LlamaShape, TensorSpec, Value, ValueType};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// The model's shape: llama, tied output.
const VOCAB: usize = 4096;
const EMBD: usize = 256;
const LAYERS: usize = 6;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FF: usize = 704;
const CTX: u32 = 2048;
/// The special tokens, first in the vocabulary (Qwen's names, so kiln's and
/// llama.cpp's fill-in-the-middle detection find them).
const SPECIALS: [&str; 5] = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
];
/// Corpus limits: files above this are skipped (generated tables); each
/// crate gives at most `CRATE_BYTES`, Python at most `PYTHON_BYTES`.
const FILE_BYTES: u64 = 64 << 10;
const CRATE_BYTES: u64 = 96 << 10;
const PYTHON_BYTES: u64 = 12 << 20;

#[derive(Parser)]
struct Args {
    /// Where the corpus, vocabulary, initial model and data are made.
    #[arg(long)]
    work: PathBuf,
    /// The trained model (GGUF, Q8_0 matrices).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    accumulate: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The workspace's Cargo.lock: the crates whose sources are read.
    #[arg(long, default_value = "Cargo.lock")]
    lockfile: PathBuf,
    /// CPython's standard library.
    #[arg(long, default_value = "/usr/lib/python3.11")]
    python_lib: PathBuf,
    /// A corpus manifest the collected corpus must equal.
    #[arg(long)]
    check_corpus: Option<PathBuf>,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("kiln-model-recipe: {msg}");
    std::process::exit(1)
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every file under `dir` (sorted, relative paths) with one of `exts`.
fn files(dir: &Path, exts: &[&str], skip_dirs: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            match e.file_type() {
                Ok(t)
                    if t.is_dir()
                        && !skip_dirs.contains(&name.as_str())
                        && !name.starts_with('.') =>
                {
                    stack.push(p);
                }
                Ok(t) if t.is_file() && exts.iter().any(|x| name.ends_with(x)) => {
                    out.push(p.strip_prefix(dir).expect("under dir").to_path_buf());
                }
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// The crates.io packages of a Cargo.lock: (name, version).
fn locked_crates(lockfile: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(lockfile)
        .unwrap_or_else(|e| fail(format!("{}: {e}", lockfile.display())));
    let doc: toml::Table = text
        .parse()
        .unwrap_or_else(|e| fail(format!("{}: {e}", lockfile.display())));
    let mut out: Vec<(String, String)> = doc
        .get("package")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .filter(|p| {
            p.get("source")
                .and_then(|s| s.as_str())
                .is_some_and(|s| s.contains("crates.io-index"))
        })
        .filter_map(|p| {
            Some((
                p.get("name")?.as_str()?.to_string(),
                p.get("version")?.as_str()?.to_string(),
            ))
        })
        .collect();
    out.sort();
    out
}

/// The unpacked sources of `name-version` in cargo's registry.
fn registry_dir(name: &str, version: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let src = home.join("registry").join("src");
    let mut indexes: Vec<PathBuf> = std::fs::read_dir(&src)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    indexes.sort();
    indexes
        .into_iter()
        .map(|i| i.join(format!("{name}-{version}")))
        .find(|d| d.is_dir())
}

/// A licence expression all of whose choices kiln may learn from and ship
/// a model of: it names MIT or Apache-2.0 and no copyleft licence.
fn permissive(expr: &str) -> bool {
    (expr.contains("MIT") || expr.contains("Apache-2.0"))
        && !["GPL", "MPL", "EPL", "CDDL", "SSPL", "EUPL"]
            .iter()
            .any(|c| expr.contains(c))
}

/// Copies up to `cap` bytes of `files` (each under `FILE_BYTES`, valid
/// UTF-8) from `from` to `to`; returns (files, bytes, digest of the list).
fn take(from: &Path, files: &[PathBuf], to: &Path, cap: u64) -> (usize, u64, String) {
    let (mut n, mut bytes, mut list) = (0, 0u64, String::new());
    for rel in files {
        let path = from.join(rel);
        let Ok(data) = std::fs::read(&path) else {
            continue;
        };
        let len = data.len() as u64;
        if len == 0 || len > FILE_BYTES || std::str::from_utf8(&data).is_err() {
            continue;
        }
        if bytes + len > cap {
            break;
        }
        let dst = to.join(rel);
        std::fs::create_dir_all(dst.parent().expect("a file"))
            .unwrap_or_else(|e| fail(format!("{}: {e}", dst.display())));
        std::fs::write(&dst, &data).unwrap_or_else(|e| fail(format!("{}: {e}", dst.display())));
        list.push_str(&format!("{}\0{}\n", rel.display(), sha256(&data)));
        n += 1;
        bytes += len;
    }
    (n, bytes, sha256(list.as_bytes()))
}

/// Collects the corpus into `dir`; returns its manifest.
fn corpus(args: &Args, dir: &Path) -> Json {
    let _ = std::fs::remove_dir_all(dir);
    let mut sources = Vec::new();
    let mut total = 0u64;
    for (name, version) in locked_crates(&args.lockfile) {
        // Cargo unpacks what a build on this platform uses (not, say,
        // windows-sys): those are the corpus, and the manifest's digest
        // says whether another machine found the same.
        let Some(src) = registry_dir(&name, &version) else {
            continue;
        };
        let manifest = std::fs::read_to_string(src.join("Cargo.toml")).unwrap_or_default();
        let license = manifest
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| {
                t.get("package")?
                    .get("license")?
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default();
        if !permissive(&license) {
            continue;
        }
        let rs = files(&src, &[".rs"], &["target"]);
        let to = dir.join("rust").join(format!("{name}-{version}"));
        let (n, bytes, digest) = take(&src, &rs, &to, CRATE_BYTES);
        if n == 0 {
            continue;
        }
        total += bytes;
        sources.push(json!({
            "kind": "crate", "name": name, "version": version, "license": license,
            "files": n, "bytes": bytes, "sha256": digest,
        }));
    }
    let py = files(
        &args.python_lib,
        &[".py"],
        &[
            "test",
            "tests",
            "idlelib",
            "lib2to3",
            "turtledemo",
            "site-packages",
            "dist-packages",
            "__pycache__",
            "ensurepip",
        ],
    );
    let (n, bytes, digest) = take(&args.python_lib, &py, &dir.join("python"), PYTHON_BYTES);
    total += bytes;
    let debian = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "libpython3.11-stdlib"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    sources.push(json!({
        "kind": "python-stdlib", "name": "CPython standard library",
        "version": debian.map_or("unknown".to_string(), |v| format!("Debian libpython3.11-stdlib {v}")),
        "license": "PSF-2.0", "files": n, "bytes": bytes, "sha256": digest,
    }));
    let digest = sha256(
        sources
            .iter()
            .map(|s| s["sha256"].as_str().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
            .as_bytes(),
    );
    json!({"format": 1, "bytes": total, "sha256": digest, "sources": sources})
}

/// Trains the vocabulary on every corpus file: (tokens by id, merges).
fn vocabulary(dir: &Path) -> (Vec<String>, Vec<String>) {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::BpeTrainerBuilder;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": kiln_runtime::tokenizer::pre_tokenizer("qwen2").expect("known"),
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "vocab": {}, "merges": []},
    });
    let mut tok = tokenizers::Tokenizer::from_bytes(doc.to_string().as_bytes())
        .unwrap_or_else(|e| fail(format!("tokenizer: {e}")));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(VOCAB)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| tokenizers::AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let paths: Vec<String> = files(dir, &[".rs", ".py"], &[])
        .into_iter()
        .map(|p| dir.join(p).to_string_lossy().into_owned())
        .collect();
    tok.train_from_files(&mut trainer, paths)
        .unwrap_or_else(|e| fail(format!("training the vocabulary: {e}")));
    let j: Json = serde_json::from_str(&tok.to_string(false).expect("serializes")).expect("JSON");
    let vocab = j["model"]["vocab"].as_object().expect("a BPE vocabulary");
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().expect("an id") as usize] = t.clone();
    }
    let merges = j["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            Json::String(s) => s.clone(),
            Json::Array(p) => format!(
                "{} {}",
                p[0].as_str().expect("a piece"),
                p[1].as_str().expect("a piece")
            ),
            _ => fail("unexpected merge"),
        })
        .collect();
    (tokens, merges)
}

/// Writes the initial model: the vocabulary's metadata and weights drawn
/// from `seed` (normal, σ 0.02; the residual outputs scaled by
/// 1/√(2·layers); norms 1), in F32.
fn init_model(path: &Path, tokens: &[String], merges: &[String], seed: u64) {
    let s = |k: &str, v: &str| (k.to_string(), Value::String(v.to_string()));
    let u = |k: &str, v: u32| (k.to_string(), Value::U32(v));
    let id = |t: &str| tokens.iter().position(|x| x == t).expect("special") as u32;
    let types: Vec<Value> = tokens
        .iter()
        .map(|t| Value::I32(if SPECIALS.contains(&t.as_str()) { 3 } else { 1 }))
        .collect();
    let strings = |v: &[String]| {
        Value::Array(
            ValueType::String,
            v.iter().cloned().map(Value::String).collect(),
        )
    };
    let mut metadata = vec![
        s("general.architecture", "llama"),
        s("general.name", "kiln-code"),
        s(
            "general.description",
            "kiln's own small code model: trained from scratch by kiln on permissively licensed Rust and Python (models/kiln-code)",
        ),
        s("general.license", "Apache-2.0"),
        u("general.file_type", 7),
    ];
    let shape = LlamaShape {
        ctx: CTX,
        embd: EMBD,
        layers: LAYERS,
        ff: FF,
        heads: HEADS,
        kv_heads: KV_HEADS,
        vocab: tokens.len(),
    };
    metadata.extend(shape.metadata());
    metadata.extend([
        s("tokenizer.ggml.model", "gpt2"),
        s("tokenizer.ggml.pre", "qwen2"),
        ("tokenizer.ggml.tokens".into(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(ValueType::I32, types),
        ),
        ("tokenizer.ggml.merges".into(), strings(merges)),
        u("tokenizer.ggml.bos_token_id", id("<|endoftext|>")),
        u("tokenizer.ggml.eos_token_id", id("<|endoftext|>")),
        u("tokenizer.ggml.padding_token_id", id("<|fim_pad|>")),
        u("tokenizer.ggml.fim_pre_token_id", id("<|fim_prefix|>")),
        u("tokenizer.ggml.fim_suf_token_id", id("<|fim_suffix|>")),
        u("tokenizer.ggml.fim_mid_token_id", id("<|fim_middle|>")),
        u("tokenizer.ggml.fim_pad_token_id", id("<|fim_pad|>")),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]);
    // Tied: the embedding is the output head too.
    let shapes = shape.tensors(true);
    let specs: Vec<TensorSpec> = shapes
        .iter()
        .map(|(name, ne)| TensorSpec::new(name.as_str(), DType::F32, ne))
        .collect();
    let err = |e: std::io::Error| -> ! { fail(format!("{}: {e}", path.display())) };
    let mut w = GgufWriter::create(path, &metadata, &specs).unwrap_or_else(|e| err(e));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut normal = move || {
        let (a, b) = (rng.f64().max(1e-300), rng.f64());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    };
    let residual = 1.0 / (2.0 * LAYERS as f64).sqrt();
    for (name, ne) in &shapes {
        let n: usize = ne.iter().product();
        let sigma = if name.contains("attn_output") || name.contains("ffn_down") {
            0.02 * residual
        } else {
            0.02
        };
        let values: Vec<u8> = (0..n)
            .flat_map(|_| {
                let v = if ne.len() == 1 {
                    1.0
                } else {
                    (normal() * sigma) as f32
                };
                v.to_le_bytes()
            })
            .collect();
        w.write_tensor(&values).unwrap_or_else(|e| err(e));
    }
    w.finish().unwrap_or_else(|e| err(e));
}

fn main() {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)
        .unwrap_or_else(|e| fail(format!("{}: {e}", args.work.display())));
    let corpus_dir = args.work.join("corpus");
    eprintln!(
        "kiln-model-recipe: collecting the corpus into {}",
        corpus_dir.display()
    );
    let manifest = corpus(&args, &corpus_dir);
    std::fs::write(
        args.work.join("corpus.json"),
        serde_json::to_string_pretty(&manifest).expect("JSON") + "\n",
    )
    .unwrap_or_else(|e| fail(e));
    eprintln!(
        "kiln-model-recipe: {} bytes from {} sources (sha256 {})",
        manifest["bytes"],
        manifest["sources"].as_array().map_or(0, Vec::len),
        manifest["sha256"].as_str().unwrap_or("")
    );
    if let Some(check) = &args.check_corpus {
        let want: Json = std::fs::read_to_string(check)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| fail(format!("{}: not a corpus manifest", check.display())));
        if want["sha256"] != manifest["sha256"] {
            fail(format!(
                "the corpus differs from {} (sha256 {} here, {} there): the crates or the Python library differ; \
                 compare {} with it",
                check.display(),
                manifest["sha256"],
                want["sha256"],
                args.work.join("corpus.json").display()
            ));
        }
    }
    eprintln!("kiln-model-recipe: training the vocabulary ({VOCAB} tokens)");
    let (tokens, merges) = vocabulary(&corpus_dir);
    let init = args.work.join("init.gguf");
    init_model(&init, &tokens, &merges, args.seed);
    eprintln!("kiln-model-recipe: preparing the training data");
    let file = GgufFile::open(&init).unwrap_or_else(|e| fail(e));
    let tokenizer =
        kiln_runtime::tokenizer::Tokenizer::from_gguf(&file).unwrap_or_else(|e| fail(e));
    let template = kiln_serve::fim::FimTemplate::detect(&tokenizer, "kiln-code");
    drop(file);
    let data = args.work.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let report = prepare::prepare(
        &corpus_dir,
        &ForModel {
            id: "kiln-code",
            tokenizer: &tokenizer,
            template,
        },
        &data,
        &prepare::Options {
            seq_len: 256,
            eval_fraction: 0.05,
            seed: args.seed,
            eval_holes: 200,
        },
        &|_| {},
    )
    .unwrap_or_else(|e| fail(e));
    eprintln!(
        "kiln-model-recipe: {} train and {} eval tokens; training {} steps of {} sequences",
        report.tokens.train, report.tokens.eval, args.steps, args.accumulate
    );
    let opts = full::Options {
        steps: args.steps,
        accumulate: args.accumulate,
        lr: args.lr,
        warmup: (args.steps / 20).max(1),
        weight_decay: 0.1,
        clip: 1.0,
        seq_len: None,
        seed: args.seed,
        eval_every: (args.steps / 10).max(1),
        eval_sequences: 16,
        dtype: DType::Q8_0,
    };
    let mut log: Vec<Json> = Vec::new();
    let outcome = full::train(
        &init,
        &data,
        &args.out,
        &opts,
        &mut |p| {
            if p.step % 25 == 0 || p.eval_loss.is_some() {
                eprintln!(
                    "step {:>5}/{} loss {:.4}{} {:.0} tok/s eta {:.0} s",
                    p.step,
                    p.steps,
                    p.loss,
                    p.eval_loss
                        .map_or(String::new(), |e| format!(" held-out {e:.4}")),
                    p.tokens_per_s,
                    p.eta_s
                );
            }
            log.push(serde_json::to_value(p).expect("JSON"));
        },
        &AtomicBool::new(false),
    )
    .unwrap_or_else(|e| fail(e));
    let summary = json!({
        "corpus": {"bytes": manifest["bytes"], "sha256": manifest["sha256"]},
        "data": report,
        "training": outcome,
        "model_sha256": sha256(&std::fs::read(&args.out).unwrap_or_default()),
        "steps": log,
    });
    let mut by_name = BTreeMap::new();
    by_name.insert("report", summary);
    std::fs::write(
        args.work.join("report.json"),
        serde_json::to_string_pretty(&by_name).expect("JSON") + "\n",
    )
    .unwrap_or_else(|e| fail(e));
    eprintln!(
        "kiln-model-recipe: wrote {} ({} parameters; held-out loss {:?} -> {:?})",
        args.out.display(),
        outcome.parameters,
        outcome.eval_loss_initial,
        outcome.eval_loss
    );
}
