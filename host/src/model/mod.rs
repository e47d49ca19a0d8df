//! Running llama-family models: load a GGUF (weights stay in the memory
//! map), evaluate batches of tokens through the backend ABI with a KV cache,
//! and sample.
//!
//! - [`config`]: hyperparameters and the shape check of every weight;
//! - [`forward`]: the forward pass as a graph of backend ops;
//! - [`session`]: a KV cache and the evaluation loop;
//! - [`generate`]: prompt to streamed text, stop strings, timings;
//! - [`sample`]: greedy, temperature, top-k, top-p, min-p, repetition penalty.

pub mod config;
pub mod forward;
pub mod generate;
pub mod sample;
pub mod session;

use crate::gguf::{GgufError, GgufFile};
use crate::tokenizer::{Tokenizer, TokenizerError};
pub use config::{Arch, ModelConfig};
use kiln_plugin_api::BackendError;
pub use session::Session;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("the backend failed: {0}")]
    Backend(#[from] BackendError),
    #[error(
        "{needed} tokens do not fit the context of {n_ctx} ({used} already in use); shorten the prompt or raise the context size"
    )]
    Context {
        needed: usize,
        used: usize,
        n_ctx: usize,
    },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    Token { id: u32, n_vocab: usize },
    #[error(
        "the model needs about {need_mib} MiB ({weights_mib} MiB of weights + {kv_mib} MiB of KV cache) but only {free_mib} MiB of memory is free; use a smaller quantization (kiln quantize) or a smaller context"
    )]
    Memory {
        need_mib: u64,
        weights_mib: u64,
        kv_mib: u64,
        free_mib: u64,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    Invalid(String),
}

/// A loaded model: its file (mapped) and configuration.
pub struct Model {
    pub file: GgufFile,
    pub config: ModelConfig,
    pub load_ms: f64,
}

impl Model {
    /// Maps and validates a GGUF model, then reads its pages in
    /// ([`GgufFile::prefault`]). Nothing is copied: the weights are the
    /// file's pages (shared with the page cache).
    pub fn load(path: &Path) -> Result<Arc<Model>, ModelError> {
        let start = Instant::now();
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        file.prefault();
        Ok(Arc::new(Model {
            file,
            config,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        }))
    }

    /// The model's tokenizer, checked against its embedding table.
    pub fn tokenizer(&self) -> Result<Tokenizer, ModelError> {
        let t = Tokenizer::from_gguf(&self.file)?;
        if t.n_vocab() != self.config.n_vocab {
            return Err(ModelError::Invalid(format!(
                "{}: the tokenizer has {} tokens but token_embd.weight has {} rows; this vocabulary does not belong to these weights",
                self.file.path().display(),
                t.n_vocab(),
                self.config.n_vocab
            )));
        }
        Ok(t)
    }

    /// Bytes of the weights the forward pass reads.
    pub fn weight_bytes(&self) -> u64 {
        self.file.tensors.iter().map(|t| t.size).sum()
    }
}
