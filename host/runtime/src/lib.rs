//! kiln's runtime: everything that loads, checks and runs models and
//! backends, with no server and no command line, so that an IDE or any
//! other program can embed it. One module per capability:
//! - [`gguf`]: the GGUF model format, read over mmap and written atomically;
//! - [`tokenizer`]: tokenizers from GGUF vocabularies (SentencePiece,
//!   byte-level BPE);
//! - [`model`]: llama/qwen2/qwen3/gemma3/starcoder2 inference on the
//!   backend ABI, KV cache, sampling, generation;
//! - [`plugin`]: manifests, preflight checks, discovery, the plugin store;
//! - [`backend`]: negotiated backends, execution with CPU fallback,
//!   conformance, device scoring and choice;
//! - [`install`]: the `kiln plugins add` pipeline;
//! - [`store`]: the content-addressed model store and model lookup;
//! - [`import`]: models found in the Hugging Face cache, Ollama and LM
//!   Studio, registered without copying;
//! - [`pull`]: models downloaded from the Hugging Face Hub or a URL,
//!   resumable and checked against the hub's sha256;
//! - [`quantize`]: llama.cpp's quantization rules and bytes;
//! - [`convert`]: Hugging Face checkpoints (safetensors) to GGUF;
//! - [`policy`]: WebAssembly policies: store, quality gate, runs, replay;
//! - [`cpu_features`]: what this CPU and OS can run;
//! - [`measure`]: process memory from `/proc`, percentiles.
//!
//! State (`KILN_HOME`, the SQLite registry) comes from `kiln-registry`,
//! the layer below.

pub mod backend;
pub mod convert;
pub mod cpu_features;
pub mod crypt;
pub mod gguf;
pub mod import;
pub mod install;
pub mod measure;
pub mod model;
pub mod plugin;
pub mod policy;
pub mod pull;
pub mod quantize;
pub mod store;
pub mod tokenizer;
pub mod tune;
