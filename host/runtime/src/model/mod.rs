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
pub mod explain;
pub mod forward;
pub mod generate;
pub mod lora;
pub mod prefix;
pub mod sample;
pub mod session;

use crate::backend::Backend;
use crate::gguf::{GgufError, GgufFile};
use crate::tokenizer::{Tokenizer, TokenizerError};
pub use config::{Arch, ModelConfig};
use kiln_plugin_api::{BackendError, DType};
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
    #[error(
        "the model needs about {need_mib} MiB on {device} ({weights_mib} MiB of weights + {kv_mib} MiB of KV cache + {scratch_mib} MiB of work space) but it has {free_mib} MiB free; choose another device (--backend cpu), a smaller quantization (kiln quantize) or a smaller context (--ctx)"
    )]
    DeviceMemory {
        device: String,
        need_mib: u64,
        weights_mib: u64,
        kv_mib: u64,
        scratch_mib: u64,
        free_mib: u64,
    },
    #[error(
        "{what} needs one buffer of {} but {device} allocates at most {} at once; choose another device (--backend cpu), or a smaller context (--ctx) where it is the KV cache or the work space",
        crate::measure::human_bytes(*bytes),
        crate::measure::human_bytes(*max_bytes)
    )]
    DeviceBuffer {
        device: String,
        what: String,
        bytes: u64,
        max_bytes: u64,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    Invalid(String),
}

/// Whether the tensor called `name` is only ever a matrix product's
/// weights (so its rows may take a kernel's layout): the attention and
/// feed-forward projections and the output head, not the embedding table
/// (read by row) or norms.
fn is_matrix_weight(name: &str) -> bool {
    name == "output.weight" || lora::is_target(name)
}

/// Threads the CPU backend and the host's own work on a model
/// (repacking) use: `KILN_THREADS`, else the CPU backend's default.
pub fn cpu_threads() -> usize {
    host_threads()
}

fn host_threads() -> usize {
    std::env::var("KILN_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or_else(kiln_cpu::kernels::default_threads)
}

/// Rewrites rows of `row` bytes from `from` to `to` in place, on
/// [`host_threads`].
fn repack_rows(from: DType, to: DType, data: &mut [u8], row: usize) {
    use kiln_plugin_api::interleave;
    assert!(
        interleave::is_interleaved(to) && interleave::plain(to) == from,
        "no repacking {from} to {to}"
    );
    let threads = host_threads();
    let rows_per = (data.len() / row).div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for part in data.chunks_mut(rows_per * row) {
            s.spawn(move || {
                part.chunks_exact_mut(row)
                    .for_each(|r| interleave::pack(to, r))
            });
        }
    });
}

/// A loaded model: its file (mapped) and configuration.
pub struct Model {
    pub file: GgufFile,
    pub config: ModelConfig,
    pub load_ms: f64,
    /// The LoRA adapter applied at run time, if any ([`Model::load_adapted`]).
    pub adapter: Option<lora::Applied>,
    /// A tokenizer built while the file was read, for the first call of
    /// [`Model::tokenizer`].
    built: std::sync::Mutex<Option<Result<Tokenizer, TokenizerError>>>,
}

impl Model {
    /// Maps and validates a GGUF model, then reads its pages in
    /// ([`GgufFile::prefault`]). Nothing is copied: the weights are the
    /// file's pages (shared with the page cache).
    pub fn load(path: &Path) -> Result<Arc<Model>, ModelError> {
        Model::load_with(path, None, |d| d)
    }

    /// As [`Model::load`], with the matrix weights in the layout `device`
    /// of `target` wants ([`Backend::weight_layout`], asked through the
    /// ABI): the built-in CPU backend takes Q4_0 interleaved on AVX2 and
    /// AVX-512, Q5_0 on AVX-512. A model with such weights is read
    /// into this process's memory ([`GgufFile::copy_into_memory`]: huge pages,
    /// instead of the file's map) and repacked there in place, so memory
    /// stays one copy of the file; the file is never written. Costs one
    /// read of the file and one pass over those weights at load.
    pub fn load_for(
        path: &Path,
        target: &Arc<Backend>,
        device: u32,
    ) -> Result<Arc<Model>, ModelError> {
        Model::load_with(path, None, |d| target.weight_layout(device, d))
    }

    /// As [`Model::load_for`], with the LoRA adapter at `adapter` applied
    /// at run time ([`lora`]): its matrices in memory beside the weights
    /// (which stay in their stored type), its products added to each
    /// projection it adapts. The model is then read into memory, as for a
    /// repacked one.
    pub fn load_adapted(
        path: &Path,
        adapter: Option<&Path>,
        target: &Arc<Backend>,
        device: u32,
    ) -> Result<Arc<Model>, ModelError> {
        Model::load_with(path, adapter, |d| target.weight_layout(device, d))
    }

    fn load_with(
        path: &Path,
        adapter: Option<&Path>,
        layout: impl Fn(DType) -> DType,
    ) -> Result<Arc<Model>, ModelError> {
        let start = Instant::now();
        let (mut file, built) = if crate::crypt::is_encrypted(path).unwrap_or(false) {
            // Decrypting the weights is the longest part of such a load:
            // it starts first, and the header is read (its own chunks
            // decrypted again) and the tokenizer built meanwhile. One
            // open for both: the file key is unwrapped once.
            let failed = |e| crate::gguf::crypt_error(path, e);
            let keys = crate::crypt::Keys::from_process_env().map_err(failed)?;
            let sealed = crate::crypt::Sealed::open(path, &keys).map_err(failed)?;
            let (plain, read) = std::thread::scope(|s| {
                let plain = s.spawn(|| sealed.decrypt());
                let read = GgufFile::header_of_sealed(path, &sealed).map(|file| {
                    let tokenizer = Tokenizer::from_gguf(&file);
                    (file, tokenizer)
                });
                (plain.join().expect("decrypting the model panicked"), read)
            });
            let (mut file, tokenizer) = read?;
            file.attach(plain.map_err(failed)?)?;
            (file, Some(tokenizer))
        } else {
            (GgufFile::open(path)?, None)
        };
        let config = ModelConfig::from_gguf(&file)?;
        let repack: Vec<(usize, DType)> = (file.tensors.iter().enumerate())
            .filter(|(_, t)| is_matrix_weight(&t.name))
            .map(|(i, t)| (i, layout(t.dtype)))
            .filter(|&(i, to)| to != file.tensors[i].dtype)
            .collect();
        if !repack.is_empty() {
            file.copy_into_memory()?;
        } else if adapter.is_none() {
            // (An adapter's matrices are appended to a copy read from the
            // file: paging the map in first would hold the weights twice.)
            file.prefault();
        }
        for (i, to) in repack {
            let t = &file.tensors[i];
            let (from, row) = (t.dtype, t.dtype.row_bytes(t.ne[0] as usize));
            let row = row.expect("checked by ModelConfig");
            repack_rows(from, to, file.tensor_data_mut(i).expect("in memory"), row);
            file.tensors[i].dtype = to;
        }
        let adapter = match adapter {
            None => None,
            Some(a) => {
                let (tensors, applied) = lora::read(a, &file).map_err(ModelError::Invalid)?;
                file.append_tensors(tensors)?;
                Some(applied)
            }
        };
        Ok(Arc::new(Model {
            file,
            config,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
            adapter,
            built: std::sync::Mutex::new(built),
        }))
    }

    /// The model's tokenizer, checked against its embedding table.
    pub fn tokenizer(&self) -> Result<Tokenizer, ModelError> {
        let built = self.built.lock().unwrap_or_else(|e| e.into_inner()).take();
        let t = built.unwrap_or_else(|| Tokenizer::from_gguf(&self.file))?;
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
        self.file.tensor_bytes()
    }
}
