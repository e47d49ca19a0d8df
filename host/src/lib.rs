//! kiln: a local model-optimization host.
//!
//! This crate is the `kiln` binary's library. One module per capability:
//! - [`convert`]: Hugging Face checkpoints (safetensors) to GGUF;
//! - [`config`]: `KILN_HOME`, `config.toml`, plugin directories;
//! - [`cpu_features`]: what this CPU and OS can run;
//! - [`gguf`]: the GGUF model format, read over mmap and written atomically;
//! - [`plugin`]: manifests, preflight checks, discovery, the plugin store;
//! - [`policy`]: WebAssembly policies: store, quality gate, runs, replay;
//! - [`quantize`]: `kiln quantize`, llama.cpp's rules and bytes;
//! - [`registry`]: the SQLite catalog, migrations, rollback, audit log;
//! - [`backend`]: negotiated backends, execution with CPU fallback,
//!   conformance, device scoring;
//! - [`model`]: llama/qwen2 inference on the backend ABI, KV cache, sampling;
//! - [`measure`]: process memory from `/proc`, percentiles;
//! - [`install`]: the `kiln plugins add` pipeline;
//! - [`serve`]: `kiln serve`: the language server, the HTTP API, the engine;
//! - [`store`]: the content-addressed model store (`kiln models`);
//! - [`tokenizer`]: tokenizers from GGUF vocabularies (SentencePiece, byte-level BPE);
//! - [`cli`]: the command line.

pub mod backend;
pub mod cli;
pub mod config;
pub mod convert;
pub mod cpu_features;
pub mod gguf;
pub mod install;
pub mod measure;
pub mod model;
pub mod plugin;
pub mod policy;
pub mod quantize;
pub mod registry;
pub mod serve;
pub mod store;
pub mod tokenizer;
