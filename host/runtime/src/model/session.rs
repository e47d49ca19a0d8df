//! A model with a KV cache: evaluates batches of tokens and returns logits.
//! The cache remembers which tokens it holds, so a new prompt that shares a
//! prefix with the last one only evaluates the part after the prefix.

use super::forward::{
    self, ATTENTION, Attention, Follow, INPUTS, InputLayout, KV, KvCache, LOGITS, LogitsFor,
    SCRATCH, WEIGHTS,
};
use super::{Model, ModelError};
use crate::backend::exec::{Executor, Graph, HostOp, Storage, TensorRef};
use smallvec::{SmallVec, smallvec};
use std::sync::Arc;

/// Tokens evaluated per graph; bounds the scratch memory of a long prompt.
pub const DEFAULT_BATCH: usize = 256;

pub struct Session {
    pub model: Arc<Model>,
    exec: Executor,
    n_ctx: usize,
    n_batch: usize,
    /// Queries per attention block ([`forward::ATTENTION_BLOCK`]).
    attention_block: usize,
    /// The cache's type and layout.
    kv_cache: KvCache,
    /// Positions the cache has room for now: it grows by pages of
    /// [`KV_PAGE`] positions (doubling) up to `n_ctx` as they are used.
    cap: usize,
    kv: Vec<u8>,
    /// The tokens whose K and V are in the cache, in order.
    cached: Vec<u32>,
    scratch: Vec<u8>,
    inputs: Vec<u8>,
    /// The last run's logits, a row of `n_vocab` per token asked for;
    /// the graph writes them in place ([`f32_bytes`]).
    logits: Vec<f32>,
    /// The one-token graph, built once and moved to each position.
    decode: Option<DecodeGraph>,
    /// Prefixes kept beside the live cache ([`Session::reuse_prefix`]):
    /// on the built-in CPU with the fused layout, whose host bytes are the
    /// cache.
    prefixes: Option<super::prefix::PrefixTree>,
    /// Prefixes restored from the tree, and their tokens.
    pub prefix_restores: u64,
    pub prefix_restored_tokens: u64,
}

/// Fewer tokens than this are not worth keeping in, or restoring from,
/// the prefix tree.
const PREFIX_MIN: usize = 32;

/// The KV cache grows in whole pages of this many positions.
pub const KV_PAGE: usize = 256;

/// A decode step's graph, built once per session for the largest position
/// (so its scratch fits every step) and moved to each step's position by
/// its [`Follow`] rules: no graph or mask is built per token.
struct DecodeGraph {
    tensors: Vec<TensorRef>,
    ops: Vec<HostOp>,
    follows: Vec<(usize, Follow)>,
    scratch_bytes: usize,
    /// Token id, position, and a causal mask of zeros (a single query
    /// sees every position up to its own); for windowed models also the
    /// window's row, rewritten each step ([`InputLayout::fill_window`]).
    inputs: Vec<u8>,
    layout: InputLayout,
}

/// The KV cache size a session gets: `requested`, else the model's
/// training context, at most 4096.
pub fn default_n_ctx(cfg: &super::ModelConfig, requested: Option<usize>) -> usize {
    requested.unwrap_or(cfg.n_ctx_train.min(4096)).max(1)
}

/// Refuses a plugin device that cannot hold the model: the weights (the
/// file's tensors), the KV cache and the largest batch's scratch must fit
/// its free memory, and each of them its largest buffer (the weights
/// tensor by tensor: the executor places them in several buffers where
/// needed), before anything is allocated, so that a request never meets
/// an allocation failure.
fn check_device_memory(
    model: &Model,
    exec: &Executor,
    n_ctx: usize,
    kv: KvCache,
    kv_bytes: u64,
) -> Result<(), ModelError> {
    let (target, d) = (&exec.target, exec.device);
    let free = match target.handle().device_memory(d) {
        Some(Ok((free, _))) => free,
        // A plugin built for ABI 1.0, or one that cannot say now.
        _ => target.devices[d as usize].free_memory,
    };
    if free == 0 {
        return Ok(());
    }
    let n = DEFAULT_BATCH.min(n_ctx);
    let (_, scratch, _) = forward::build(
        &model.config,
        &model.file,
        n_ctx,
        n_ctx - n,
        n,
        LogitsFor::Last,
        Attention::new(forward::ATTENTION_BLOCK, kv),
    );
    let mib = |b: u64| b.div_ceil(1 << 20);
    let device = || {
        format!(
            "{} device {d} ({})",
            target.name(),
            target.devices[d as usize].name
        )
    };
    // Weights wider than the largest buffer go up in several; one tensor,
    // the KV cache and the work space must each fit one.
    let max_buffer = target.devices[d as usize].max_buffer_size;
    let widest = model.file.tensors.iter().max_by_key(|t| t.size);
    let parts = [
        widest.map(|t| (format!("tensor {}", t.name), t.size)),
        Some(("the KV cache".to_string(), kv_bytes)),
        Some(("the work space".to_string(), scratch as u64)),
    ];
    if let Some((what, bytes)) = parts
        .into_iter()
        .flatten()
        .find(|(_, b)| max_buffer != 0 && *b > max_buffer)
    {
        return Err(ModelError::DeviceBuffer {
            device: device(),
            what,
            bytes,
            max_bytes: max_buffer,
        });
    }
    let weights = model.file.bytes().len() as u64;
    let need = weights + kv_bytes + scratch as u64;
    if need > free {
        return Err(ModelError::DeviceMemory {
            device: device(),
            need_mib: mib(need),
            weights_mib: mib(weights),
            kv_mib: mib(kv_bytes),
            scratch_mib: mib(scratch as u64),
            free_mib: free >> 20,
        });
    }
    Ok(())
}

/// Whether `exec`'s device runs the fused attention op of a decode step
/// over `kv` (the built-in CPU always does; a plugin is asked).
fn runs_fused_attention(model: &Model, exec: &Executor, kv: KvCache) -> bool {
    if exec.target.is_builtin() {
        return true;
    }
    let (b, _, _) = forward::build(
        &model.config,
        &model.file,
        2,
        1,
        1,
        LogitsFor::Last,
        Attention::new(forward::ATTENTION_BLOCK, kv),
    );
    let graph = Graph {
        storages: SmallVec::new(),
        tensors: b.tensors,
        ops: b.ops,
    };
    let plan = exec.plan(&graph);
    graph
        .ops
        .iter()
        .zip(plan)
        .all(|(op, on)| on || op.kind != kiln_plugin_api::OpKind::Attention)
}

/// The memory a session of the model at `path` takes: its weights, its
/// KV cache at `n_ctx` positions (default as [`Session::new`]'s) of
/// `kv_type`, and the work space of a prompt batch ([`DEFAULT_BATCH`]
/// tokens); with [`Budget::with_sequences`], the KV caches of the other
/// requests decoded together with it ([`decode_batch`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Budget {
    pub n_ctx: usize,
    pub kv_type: &'static str,
    pub weights_bytes: u64,
    /// One sequence's KV cache.
    pub kv_bytes: u64,
    pub scratch_bytes: u64,
    /// Requests decoded together (1: one at a time).
    pub sequences: usize,
    /// The KV caches of the sequences besides the first.
    pub batch_kv_bytes: u64,
    pub total_bytes: u64,
}

impl Budget {
    /// This budget with `bytes` more held beside the weights (a LoRA
    /// adapter's pairs).
    pub fn with_weights(mut self, bytes: u64) -> Budget {
        self.weights_bytes += bytes;
        self.total_bytes += bytes;
        self
    }

    /// This budget for `sequences` requests decoded together (at least
    /// one), each with a KV cache of its own.
    pub fn with_sequences(mut self, sequences: usize) -> Budget {
        self.sequences = sequences.max(1);
        self.batch_kv_bytes = (self.sequences as u64 - 1) * self.kv_bytes;
        self.total_bytes =
            self.weights_bytes + self.kv_bytes + self.batch_kv_bytes + self.scratch_bytes;
        self
    }

    /// Its KV caches, every sequence's.
    pub fn all_kv_bytes(&self) -> u64 {
        self.kv_bytes + self.batch_kv_bytes
    }

    /// This budget for as many requests decoded together as fit in
    /// `budget` bytes, at most `want` and at least one.
    pub fn fitting(self, want: usize, budget: u64) -> Budget {
        let fits = |s: usize| self.clone().with_sequences(s).total_bytes <= budget;
        let s = (1..=want.max(1)).rev().find(|&s| fits(s)).unwrap_or(1);
        self.with_sequences(s)
    }

    /// What it is made of, for messages: `N MiB (W of weights, K of KV
    /// cache at T tokens[ for each of S requests decoded together], X of
    /// work space)`.
    pub fn describe(&self) -> String {
        let mib = |b: u64| b >> 20;
        let each = if self.sequences > 1 {
            format!(" for each of {} requests decoded together", self.sequences)
        } else {
            String::new()
        };
        format!(
            "{} MiB ({} of weights, {} of KV cache at {} tokens{each}, {} of work space)",
            mib(self.total_bytes),
            mib(self.weights_bytes),
            mib(self.all_kv_bytes()),
            self.n_ctx,
            mib(self.scratch_bytes)
        )
    }
}

/// [`Budget`] of the model file at `path` (its header and metadata are
/// read; no weights).
pub fn budget(
    path: &std::path::Path,
    n_ctx: Option<usize>,
    kv_type: kiln_plugin_api::DType,
) -> Result<Budget, ModelError> {
    budget_of(&crate::gguf::GgufFile::open_header(path)?, n_ctx, kv_type)
}

/// [`budget`] of a model whose header is open already (the pool and
/// `kiln doctor` check its adapter against the same header).
pub fn budget_of(
    file: &crate::gguf::GgufFile,
    n_ctx: Option<usize>,
    kv_type: kiln_plugin_api::DType,
) -> Result<Budget, ModelError> {
    let cfg = super::ModelConfig::from_gguf(file)?;
    let n_ctx = default_n_ctx(&cfg, n_ctx);
    let weights_bytes = file.tensor_bytes();
    let kv = KvCache {
        dtype: kv_type,
        fused: true,
    };
    kv.check(&cfg).map_err(ModelError::Invalid)?;
    let kv_bytes = forward::kv_bytes(&cfg, kv, n_ctx) as u64;
    let batch = DEFAULT_BATCH.min(n_ctx);
    let (_, scratch, _) = forward::build(
        &cfg,
        file,
        n_ctx,
        0,
        batch,
        LogitsFor::Last,
        Attention::new(forward::ATTENTION_BLOCK, kv),
    );
    let scratch_bytes = scratch as u64;
    Ok(Budget {
        n_ctx,
        kv_type: KvCache::type_name(kv_type),
        weights_bytes,
        kv_bytes,
        scratch_bytes,
        sequences: 1,
        batch_kv_bytes: 0,
        total_bytes: weights_bytes + kv_bytes + scratch_bytes,
    })
}

impl Session {
    /// A session with an f16 cache of `n_ctx` positions (default: the
    /// model's training context, at most 4096), running on `exec`'s device.
    pub fn new(
        model: Arc<Model>,
        exec: Executor,
        n_ctx: Option<usize>,
    ) -> Result<Session, ModelError> {
        Session::with_kv_type(model, exec, n_ctx, kiln_plugin_api::DType::F16)
    }

    /// [`Session::new`] with a cache of `kv_type` (f16, q8_0 or q4_0).
    /// Attention is the fused op where the device runs it; a device
    /// without it gets the unfused graph over an f16 cache, or (a
    /// quantized cache) the fused op on the CPU.
    pub fn with_kv_type(
        model: Arc<Model>,
        exec: Executor,
        n_ctx: Option<usize>,
        kv_type: kiln_plugin_api::DType,
    ) -> Result<Session, ModelError> {
        let cfg = &model.config;
        let n_ctx = default_n_ctx(cfg, n_ctx);
        let mut kv_cache = KvCache {
            dtype: kv_type,
            fused: true,
        };
        kv_cache.check(cfg).map_err(ModelError::Invalid)?;
        if !runs_fused_attention(&model, &exec, kv_cache) {
            if kv_type == kiln_plugin_api::DType::F16 {
                kv_cache.fused = false;
            } else {
                eprintln!(
                    "kiln: {} runs no fused attention; with a {} KV cache attention runs on the CPU",
                    exec.target.name(),
                    KvCache::type_name(kv_type)
                );
            }
        }
        let kv_bytes = forward::kv_bytes(cfg, kv_cache, n_ctx) as u64;
        // On the CPU the cache starts at a page and grows as it is used;
        // a device gets all of it (its memory was checked for that, and
        // the host's copy of its cache is not current to move).
        let cap = if exec.target.is_builtin() {
            n_ctx.min(KV_PAGE)
        } else {
            n_ctx
        };
        if let Some(free) = crate::measure::proc_kib_field("/proc/meminfo", "MemAvailable") {
            // Mapped weights not yet resident need memory too.
            let need = model.weight_bytes() + kv_bytes;
            if need > free {
                let mib = |b: u64| b >> 20;
                return Err(ModelError::Memory {
                    need_mib: mib(need),
                    weights_mib: mib(model.weight_bytes()),
                    kv_mib: mib(kv_bytes),
                    free_mib: mib(free),
                });
            }
        }
        if !exec.target.is_builtin() {
            check_device_memory(&model, &exec, n_ctx, kv_cache, kv_bytes)?;
        }
        Ok(Session {
            kv: crate::measure::huge_zeroed(forward::kv_bytes(cfg, kv_cache, cap)),
            cap,
            model,
            exec,
            n_ctx,
            n_batch: DEFAULT_BATCH,
            attention_block: forward::ATTENTION_BLOCK,
            kv_cache,
            cached: Vec::new(),
            scratch: Vec::new(),
            inputs: Vec::new(),
            logits: Vec::new(),
            decode: None,
            prefixes: None,
            prefix_restores: 0,
            prefix_restored_tokens: 0,
        }
        .with_prefix_budget(kv_bytes as usize))
    }

    /// Keeps up to `bytes` of other prompts' K and V beside the live cache
    /// (0: none). The default is the live cache's own size. Only on the
    /// built-in CPU with the fused layout (elsewhere the device holds the
    /// cache); otherwise a no-op.
    pub fn with_prefix_budget(mut self, bytes: usize) -> Session {
        self.set_prefix_budget(bytes);
        self
    }

    /// See [`Session::with_prefix_budget`].
    pub fn set_prefix_budget(&mut self, bytes: usize) {
        let usable = self.exec.target.is_builtin() && self.kv_cache.fused && bytes > 0;
        self.prefixes = usable.then(|| {
            let cfg = &self.model.config;
            let (k, v) = (0..cfg.n_layer)
                .map(|l| forward::kv_offsets(cfg, self.kv_cache, self.cap, l))
                .unzip();
            let layout = super::prefix::Layout {
                k,
                v,
                pos_bytes: cfg.n_head_kv * self.kv_cache.head_bytes(cfg),
            };
            super::prefix::PrefixTree::new(layout, bytes)
        });
    }

    /// Makes room in the cache for `positions` (at most `n_ctx`): the
    /// next pages, at least doubling, each layer's rows moved to their
    /// new places.
    fn reserve(&mut self, positions: usize) {
        if positions > self.cap {
            self.grow(positions);
        }
        // Room for as many tokens as the cache holds: a decode step's
        // push allocates nothing.
        if self.cached.capacity() < self.cap {
            self.cached.reserve_exact(self.cap - self.cached.len());
        }
    }

    fn grow(&mut self, positions: usize) {
        let cfg = &self.model.config;
        let new_cap = positions
            .max(2 * self.cap)
            .next_multiple_of(KV_PAGE)
            .min(self.n_ctx);
        let mut kv = crate::measure::huge_zeroed(forward::kv_bytes(cfg, self.kv_cache, new_cap));
        let n = self.cached.len();
        let pos = cfg.n_head_kv * self.kv_cache.head_bytes(cfg);
        for l in 0..cfg.n_layer {
            let (k_old, v_old) = forward::kv_offsets(cfg, self.kv_cache, self.cap, l);
            let (k_new, v_new) = forward::kv_offsets(cfg, self.kv_cache, new_cap, l);
            kv[k_new..k_new + n * pos].copy_from_slice(&self.kv[k_old..k_old + n * pos]);
            if self.kv_cache.fused {
                kv[v_new..v_new + n * pos].copy_from_slice(&self.kv[v_old..v_old + n * pos]);
            } else {
                // V transposed: a row of f16s per head dimension.
                for row in 0..cfg.kv_dim() {
                    let (from, to) = (v_old + 2 * row * self.cap, v_new + 2 * row * new_cap);
                    kv[to..to + 2 * n].copy_from_slice(&self.kv[from..from + 2 * n]);
                }
            }
        }
        self.kv = kv;
        self.cap = new_cap;
        self.decode = None;
        self.exec.forget_state(KV);
        if let Some(tree) = self.prefixes.as_mut() {
            let (k, v) = (0..cfg.n_layer)
                .map(|l| forward::kv_offsets(cfg, self.kv_cache, new_cap, l))
                .unzip();
            tree.set_offsets(k, v);
        }
    }

    /// Positions the cache has room for now (it grows up to `n_ctx`).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes of K and V kept in the prefix tree.
    pub fn prefix_bytes(&self) -> usize {
        self.prefixes.as_ref().map_or(0, |t| t.bytes())
    }

    /// Makes the cache ready for `tokens`: keeps the common prefix of the
    /// live cache, or, where the prefix tree holds a longer prefix of
    /// them, copies that in (keeping the live cache's tokens in the tree
    /// first). The live cache's tokens are also kept when most of them
    /// are about to go (the user moved to another file), not while a
    /// line is typed. Returns how many leading tokens are cached, at most
    /// `tokens.len() - 1` (the last one is evaluated for fresh logits).
    pub fn reuse_prefix(&mut self, tokens: &[u32]) -> usize {
        let limit = tokens.len().saturating_sub(1);
        let live = self.common_prefix(tokens).min(limit);
        let Some(tree) = self.prefixes.as_mut() else {
            self.truncate(live);
            return live;
        };
        let m = tree.longest(&tokens[..limit]);
        let leaving = self.cached.len() - live;
        let moving_on = leaving >= PREFIX_MIN && 2 * leaving >= self.cached.len();
        if moving_on || m.len >= live + PREFIX_MIN {
            tree.insert(&self.cached, &self.kv);
        }
        if m.len >= live + PREFIX_MIN {
            self.reserve(m.len);
            let tree = self.prefixes.as_mut().expect("checked above");
            // The tree changed: look again (the same prefix, or longer).
            let m = tree.longest(&tokens[..limit]);
            tree.restore(&m, &mut self.kv);
            self.exec.forget_state(KV);
            self.cached = tokens[..m.len].to_vec();
            self.prefix_restores += 1;
            self.prefix_restored_tokens += m.len as u64;
            return m.len;
        }
        self.truncate(live);
        live
    }

    /// Applies `config.toml`'s `[engine]` knobs that shape a session's
    /// graphs (those set; the rest stay kiln's defaults): what `kiln
    /// serve`, `kiln run` and `kiln bench` share.
    pub fn configure(&mut self, engine: &kiln_registry::config::EngineConfig) {
        if let Some(b) = engine.attention_block {
            self.set_attention_block(b);
        }
        if let Some(b) = engine.prompt_batch {
            self.set_prompt_batch(b);
        }
    }

    /// Runs this session's graphs on `threads` CPU threads of a pool of
    /// the calling thread's own (a model served beside others, on its
    /// share of the cores); `None`: the process's shared pool.
    pub fn set_threads(&mut self, threads: Option<usize>) {
        self.exec.set_threads(threads);
    }

    /// Sets the tokens a prompt is evaluated in per graph (at least 1;
    /// [`DEFAULT_BATCH`] by default): larger batches use the weights
    /// more per pass and need more work space. The logits do not depend
    /// on it beyond float rounding.
    pub fn set_prompt_batch(&mut self, tokens: usize) {
        self.n_batch = tokens.max(1);
    }

    /// Tokens a prompt is evaluated in per graph.
    pub fn prompt_batch(&self) -> usize {
        self.n_batch
    }

    /// Queries per attention block of prompt graphs.
    pub fn attention_block(&self) -> usize {
        self.attention_block
    }

    /// Sets the queries per attention block (at least 1). The results do
    /// not depend on it (a test holds kiln to that); it is a knob for
    /// tests and measurements.
    pub fn set_attention_block(&mut self, queries: usize) {
        self.attention_block = queries.max(1);
        self.decode = None;
    }

    /// Runs attention unfused (products and a softmax over V transposed,
    /// as for a device without the fused op) from now on, with an empty
    /// cache: llama.cpp's default path rounds as that graph does, so the
    /// parity tests hold the rest of the graph to it. f16 caches only.
    pub fn set_unfused_attention(&mut self) -> Result<(), ModelError> {
        let kv = KvCache {
            dtype: self.kv_cache.dtype,
            fused: false,
        };
        kv.check(&self.model.config).map_err(ModelError::Invalid)?;
        self.kv_cache = kv;
        self.prefixes = None;
        self.kv.fill(0);
        self.exec.forget_state(KV);
        self.cached.clear();
        self.decode = None;
        Ok(())
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The cache's type and whether attention is the fused op.
    pub fn kv_cache(&self) -> KvCache {
        self.kv_cache
    }

    /// Bytes the KV cache holds.
    pub fn kv_bytes(&self) -> usize {
        self.kv.len()
    }

    /// Positions in use.
    /// Bytes of work space the session holds now (the largest batch's).
    pub fn scratch_bytes(&self) -> usize {
        self.scratch.len()
    }

    pub fn n_past(&self) -> usize {
        self.cached.len()
    }

    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// Forgets everything after the first `n` cached tokens.
    pub fn truncate(&mut self, n: usize) {
        self.cached.truncate(n);
    }

    /// How many leading tokens of `tokens` the cache already holds.
    pub fn common_prefix(&self, tokens: &[u32]) -> usize {
        self.cached
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Evaluates `tokens` after what is cached. Returns the logits of the
    /// last token (`LogitsFor::Last`) or of every token (`All`), each row
    /// `n_vocab` long.
    pub fn eval(&mut self, tokens: &[u32], which: LogitsFor) -> Result<Vec<f32>, ModelError> {
        self.eval_until(tokens, which, &|| false)
            .map(|r| r.expect("never stopped"))
    }

    /// [`Session::eval`], asking `stop` before each batch: `None` when it
    /// said to stop (what was evaluated by then stays in the cache).
    pub fn eval_until(
        &mut self,
        tokens: &[u32],
        which: LogitsFor,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Vec<f32>>, ModelError> {
        let n_vocab = self.model.config.n_vocab;
        if tokens.is_empty() {
            return Err(ModelError::Invalid("nothing to evaluate: no tokens".into()));
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::Token { id, n_vocab });
        }
        if self.n_past() + tokens.len() <= self.n_ctx {
            self.reserve(self.n_past() + tokens.len());
        } else {
            return Err(ModelError::Context {
                needed: tokens.len(),
                used: self.n_past(),
                n_ctx: self.n_ctx,
            });
        }
        let mut out = Vec::new();
        let batches: Vec<&[u32]> = tokens.chunks(self.n_batch).collect();
        for (i, batch) in batches.iter().enumerate() {
            if stop() {
                return Ok(None);
            }
            let last = i + 1 == batches.len();
            // With `Last`, earlier batches only fill the cache; their one
            // row of logits is dropped.
            if batch.len() == 1 {
                self.eval_one(batch[0])?;
            } else {
                self.eval_batch(batch, which, None)?;
            }
            if which == LogitsFor::All || last {
                out.extend_from_slice(&self.logits);
            }
        }
        Ok(Some(out))
    }

    /// Evaluates one token at the next position and returns its logits
    /// (`n_vocab` long): a decode step. After the session's first steps
    /// it allocates nothing (the graph, its inputs, the work space and
    /// the logits are the session's, kept from step to step) until the
    /// cache grows by a page ([`KV_PAGE`]).
    pub fn decode(&mut self, token: u32) -> Result<&[f32], ModelError> {
        self.ready_for(token)?;
        self.eval_one(token)?;
        Ok(&self.logits)
    }

    /// Checks `token` and the room for it, and makes that room: what a
    /// decode step (alone or in a batch) needs first.
    fn ready_for(&mut self, token: u32) -> Result<(), ModelError> {
        let n_vocab = self.model.config.n_vocab;
        if token as usize >= n_vocab {
            return Err(ModelError::Token { id: token, n_vocab });
        }
        if self.n_past() + 1 > self.n_ctx {
            return Err(ModelError::Context {
                needed: 1,
                used: self.n_past(),
                n_ctx: self.n_ctx,
            });
        }
        self.reserve(self.n_past() + 1);
        Ok(())
    }

    /// The logits of the session's last evaluated token (after
    /// [`decode_batch`]).
    pub fn logits(&self) -> &[f32] {
        let n = self.model.config.n_vocab;
        &self.logits[self.logits.len().saturating_sub(n)..]
    }

    /// Why this session cannot decode in a batch with `first`'s, if it
    /// cannot: another model, not on the built-in CPU (a device keeps
    /// each session's cache apart), or another cache layout.
    fn batch_refusal(&self, first: &Session) -> Option<&'static str> {
        if !Arc::ptr_eq(&self.model, &first.model) {
            Some("the sessions are of different models")
        } else if !self.exec.target.is_builtin() {
            Some("only sessions on the built-in CPU decode in one batch")
        } else if !self.kv_cache.fused || self.kv_cache != first.kv_cache {
            Some("the sessions' KV caches differ, or attention is not fused")
        } else {
            None
        }
    }

    /// Evaluates `tokens` on a graph built for them, leaving their logits
    /// in `self.logits`; with `capture`, also records the attention
    /// probabilities of the queries from `capture.0` on into `capture.1`
    /// (see [`forward::Attention`]).
    fn eval_batch(
        &mut self,
        tokens: &[u32],
        which: LogitsFor,
        capture: Option<(usize, &mut Vec<u8>)>,
    ) -> Result<(), ModelError> {
        let model = self.model.clone();
        let cfg = &model.config;
        let (n_past, n) = (self.n_past(), tokens.len());
        let t_len = n_past + n;
        self.reserve(t_len);
        let (builder, scratch_bytes, rows) = forward::build(
            cfg,
            &model.file,
            self.cap,
            n_past,
            n,
            which,
            Attention {
                block: self.attention_block,
                capture_from: capture.as_ref().map(|c| c.0),
                kv: self.kv_cache,
            },
        );
        grow_scratch(&mut self.scratch, scratch_bytes);
        let window = cfg.sliding_window.map(|s| s.window);
        let layout = InputLayout::new(n, t_len, window.is_some());
        self.inputs.clear();
        self.inputs.resize(layout.bytes, 0);
        for (i, &t) in tokens.iter().enumerate() {
            let at = layout.tokens + 4 * i;
            self.inputs[at..at + 4].copy_from_slice(&(t as i32).to_le_bytes());
            let at = layout.positions + 4 * i;
            self.inputs[at..at + 4].copy_from_slice(&((n_past + i) as i32).to_le_bytes());
        }
        // Causal mask: token i (at position n_past + i) sees positions
        // 0..=n_past + i (and the windowed layers the last `window` of them).
        layout.fill_masks(&mut self.inputs, n_past, n, t_len, window);
        self.logits.clear();
        self.logits.resize(rows * cfg.n_vocab, 0.0);
        let mut graph = Graph {
            storages: smallvec![
                Storage::Read(model.file.bytes()),
                Storage::State(&mut self.kv),
                Storage::Write(&mut self.inputs),
                Storage::Scratch(&mut self.scratch),
                Storage::Write(f32_bytes(&mut self.logits)),
            ],
            tensors: builder.tensors,
            ops: builder.ops,
        };
        debug_assert_eq!(
            (WEIGHTS, KV, INPUTS, SCRATCH, LOGITS, ATTENTION),
            (0, 1, 2, 3, 4, 5)
        );
        let capturing = capture.is_some();
        if let Some((from, probs)) = capture {
            probs.clear();
            probs.resize(Attention::capture_bytes(cfg, n - from, t_len), 0);
            graph.storages.push(Storage::Write(probs));
        }
        let ran = self.exec.run(&mut graph);
        drop(graph);
        if let Err(e) = self.checked(ran) {
            if capturing {
                // What was recorded is lost with the run: the caller asks
                // again, and a cache the device lost is evaluated anew.
                if self.exec.take_state_lost() {
                    self.cached.clear();
                }
                return Err(e.into());
            }
            return self.recover(e, tokens, which);
        }
        self.cached.extend_from_slice(tokens);
        from_le(&mut self.logits);
        Ok(())
    }

    /// The attention the model pays while it predicts `completion` after
    /// `prompt`: for each layer and head, each position's attention
    /// probability averaged over the queries that predict the
    /// completion's tokens (the prompt's last token and the completion's
    /// tokens but the last), as f32 `[n_layer][n_head][positions]` over
    /// the `prompt.len() + completion.len() - 1` positions those queries
    /// see. Reuses the cached prefix; leaves the queries' tokens cached.
    pub fn attention(
        &mut self,
        prompt: &[u32],
        completion: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        if prompt.is_empty() || completion.is_empty() {
            return Err(ModelError::Invalid(
                "attention needs a prompt and a completion of at least one token each".into(),
            ));
        }
        let all: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        let n_vocab = self.model.config.n_vocab;
        if let Some(&id) = all.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::Token { id, n_vocab });
        }
        let positions = all.len() - 1;
        if positions > self.n_ctx {
            return Err(ModelError::Context {
                needed: positions,
                used: 0,
                n_ctx: self.n_ctx,
            });
        }
        let first = prompt.len() - 1;
        let keep = self.common_prefix(&all).min(first);
        self.truncate(keep);
        if keep < first {
            self.eval(&all[keep..first], LogitsFor::Last)?;
        }
        let cfg = self.model.config.clone();
        let heads = cfg.n_layer * cfg.n_head;
        // Queries per graph: what keeps the recorded probabilities within
        // 32 MiB.
        let per_query = Attention::capture_bytes(&cfg, 1, positions);
        let chunk = ((32usize << 20) / per_query.max(1)).clamp(1, 64);
        let mut sums = vec![0f32; heads * positions];
        let mut probs = Vec::new();
        for queries in all[first..positions].chunks(chunk) {
            let nq = queries.len();
            let t_len = self.n_past() + nq;
            self.eval_batch(queries, LogitsFor::Last, Some((0, &mut probs)))?;
            let rows: Vec<f32> = probs
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            for (hd, sum) in sums.chunks_exact_mut(positions).enumerate() {
                for row in rows[hd * nq * t_len..(hd + 1) * nq * t_len].chunks_exact(t_len) {
                    for (s, p) in sum.iter_mut().zip(row) {
                        *s += p;
                    }
                }
            }
        }
        let n = completion.len() as f32;
        sums.iter_mut().for_each(|s| *s /= n);
        Ok(sums)
    }

    /// A run's outcome, where a device that handed back NaN or infinite
    /// logits failed: it computed garbage (a driver bug, a corrupted
    /// buffer) and its state cannot be trusted either, so it is treated
    /// as lost and the CPU evaluates again. (The CPU's own logits are
    /// passed on as they are.)
    fn checked(
        &self,
        ran: Result<crate::backend::exec::ExecReport, kiln_plugin_api::BackendError>,
    ) -> Result<(), kiln_plugin_api::BackendError> {
        let report = ran?;
        let finite = || {
            self.logits
                .iter()
                .all(|l| f32::from_bits(u32::from_le(l.to_bits())).is_finite())
        };
        if report.ops_on_target > 0 && !self.exec.target.is_builtin() && !finite() {
            return Err(self.exec.device_fault("returned non-finite logits"));
        }
        Ok(())
    }

    /// One token at the next position, on the session's decode graph (one
    /// query's logits, left in `self.logits`; for one token `All` and
    /// `Last` are the same row).
    fn eval_one(&mut self, token: u32) -> Result<(), ModelError> {
        let model = self.model.clone();
        let cfg = &model.config;
        let n_past = self.n_past();
        let d = match &mut self.decode {
            Some(d) => d,
            None => {
                // Built for the last position, so that its scratch (the
                // scores grow with the position) fits every step.
                let (b, scratch_bytes, _) = forward::build(
                    cfg,
                    &model.file,
                    self.cap,
                    self.cap - 1,
                    1,
                    LogitsFor::Last,
                    Attention::new(self.attention_block, self.kv_cache),
                );
                let layout = InputLayout::new(1, self.cap, cfg.sliding_window.is_some());
                self.decode.insert(DecodeGraph {
                    tensors: b.tensors,
                    ops: b.ops,
                    follows: b.follows,
                    scratch_bytes,
                    inputs: vec![0; layout.bytes],
                    layout,
                })
            }
        };
        for (t, rule) in &d.follows {
            rule.apply(&mut d.tensors[*t], n_past, 1);
        }
        let at = d.layout.tokens;
        d.inputs[at..at + 4].copy_from_slice(&(token as i32).to_le_bytes());
        let at = d.layout.positions;
        d.inputs[at..at + 4].copy_from_slice(&(n_past as i32).to_le_bytes());
        if let Some(s) = cfg.sliding_window {
            // The windowed layers' row: zeros, but for positions `window`
            // or more behind. (Rewritten whole: the cache may have been
            // cut back since the last step.)
            d.layout
                .fill_window(&mut d.inputs, n_past, 1, n_past + 1, s.window);
        }
        grow_scratch(&mut self.scratch, d.scratch_bytes);
        self.logits.resize(cfg.n_vocab, 0.0);
        let mut graph = Graph {
            storages: smallvec![
                Storage::Read(model.file.bytes()),
                Storage::State(&mut self.kv),
                Storage::Write(&mut d.inputs),
                Storage::Scratch(&mut self.scratch),
                Storage::Write(f32_bytes(&mut self.logits)),
            ],
            tensors: std::mem::take(&mut d.tensors),
            ops: std::mem::take(&mut d.ops),
        };
        let result = self.exec.run(&mut graph);
        d.tensors = std::mem::take(&mut graph.tensors);
        d.ops = std::mem::take(&mut graph.ops);
        drop(graph);
        if let Err(e) = self.checked(result) {
            return self.recover(e, &[token], LogitsFor::Last);
        }
        self.cached.push(token);
        from_le(&mut self.logits);
        Ok(())
    }

    /// After a failed run: when the device lost the KV cache it held (the
    /// executor now runs on the CPU), evaluates the cached tokens again to
    /// rebuild it and then `tokens`, so the caller sees a slower step, not
    /// an error. Any other error is passed on.
    fn recover(
        &mut self,
        e: kiln_plugin_api::BackendError,
        tokens: &[u32],
        which: LogitsFor,
    ) -> Result<(), ModelError> {
        if !self.exec.take_state_lost() {
            return Err(e.into());
        }
        eprintln!(
            "kiln: {e}; evaluating the {} cached tokens again on the CPU",
            self.cached.len()
        );
        let replay = std::mem::take(&mut self.cached);
        if !replay.is_empty() {
            self.eval(&replay, LogitsFor::Last)?;
        }
        self.logits = self.eval(tokens, which)?;
        Ok(())
    }
}

/// Whether `sessions` can decode together in [`decode_batch`]: sessions of
/// one model on the built-in CPU with the same fused KV cache; the error
/// says why not.
pub fn can_batch(sessions: &[&mut Session]) -> Result<(), ModelError> {
    let Some(first) = sessions.first() else {
        return Err(ModelError::Invalid("a batch of no sessions".into()));
    };
    match sessions.iter().find_map(|s| s.batch_refusal(first)) {
        Some(why) => Err(ModelError::Invalid(why.into())),
        None => Ok(()),
    }
}

/// One decode step of several sequences in one forward pass: session i
/// evaluates `tokens[i]` at its next position, and its logits are then
/// [`Session::logits`]. The weights are read once for all of them (a
/// decode step is bound by that read), attention runs per sequence over
/// its own cache. Each session's logits are the bits of its
/// [`Session::decode`] of the same token (the products are the same per
/// row whatever the batch). Sessions of one model on the built-in CPU
/// with the same fused KV cache ([`can_batch`]). On an error no session
/// holds the token: the caller may go on one by one.
pub fn decode_batch(sessions: &mut [&mut Session], tokens: &[u32]) -> Result<(), ModelError> {
    can_batch(sessions)?;
    if sessions.len() != tokens.len() {
        return Err(ModelError::Invalid(format!(
            "{} tokens for {} sessions",
            tokens.len(),
            sessions.len()
        )));
    }
    let model = sessions[0].model.clone();
    let cfg = &model.config;
    for (s, &token) in sessions.iter_mut().zip(tokens) {
        s.ready_for(token)?;
    }
    let caches: Vec<(usize, usize)> = sessions.iter().map(|s| (s.cap, s.n_past())).collect();
    let (b, scratch_bytes, layout) =
        forward::build_decode_batch(cfg, &model.file, &caches, sessions[0].kv_cache);
    let mut inputs = vec![0u8; layout.bytes];
    for (i, (&token, seq)) in tokens.iter().zip(&layout.seqs).enumerate() {
        let at = layout.tokens + 4 * i;
        inputs[at..at + 4].copy_from_slice(&(token as i32).to_le_bytes());
        let at = layout.positions + 4 * i;
        inputs[at..at + 4].copy_from_slice(&(seq.n_past as i32).to_le_bytes());
        // The causal row is zeros (a single query sees every position up
        // to its own); the windowed layers' row hides those too far back.
        if let Some(s) = cfg.sliding_window {
            let one = InputLayout {
                tokens: 0,
                positions: 0,
                mask: seq.mask,
                mask_window: seq.mask_window,
                bytes: layout.bytes,
            };
            one.fill_window(&mut inputs, seq.n_past, 1, seq.n_past + 1, s.window);
        }
    }
    let n_vocab = cfg.n_vocab;
    let mut logits = vec![0f32; tokens.len() * n_vocab];
    let (first, rest) = sessions.split_first_mut().expect("checked: not empty");
    grow_scratch(&mut first.scratch, scratch_bytes);
    let mut storages: SmallVec<[Storage; 6]> = smallvec![
        Storage::Read(model.file.bytes()),
        Storage::State(&mut first.kv),
        Storage::Write(&mut inputs),
        Storage::Scratch(&mut first.scratch),
        Storage::Write(f32_bytes(&mut logits)),
    ];
    for s in rest.iter_mut() {
        storages.push(Storage::State(&mut s.kv));
    }
    debug_assert!(
        (1..tokens.len()).all(|i| forward::batch_kv_storage(i) == LOGITS + i),
        "the caches after the first follow the logits"
    );
    let mut graph = Graph {
        storages,
        tensors: b.tensors,
        ops: b.ops,
    };
    let ran = first.exec.run(&mut graph);
    drop(graph);
    ran?;
    from_le(&mut logits);
    for ((s, &token), row) in sessions
        .iter_mut()
        .zip(tokens)
        .zip(logits.chunks_exact(n_vocab))
    {
        s.cached.push(token);
        s.logits.clear();
        s.logits.extend_from_slice(row);
    }
    Ok(())
}

/// Makes the work space at least `bytes` long: a fresh one (what it held
/// is meaningless between runs), on huge pages where it can be.
fn grow_scratch(scratch: &mut Vec<u8>, bytes: usize) {
    if scratch.len() < bytes {
        *scratch = crate::measure::huge_zeroed(bytes);
    }
}

/// `logits` as the little-endian bytes a graph writes them as.
fn f32_bytes(logits: &mut [f32]) -> &mut [u8] {
    // SAFETY: the bytes of f32s, which any bytes are a value of; u8 has
    // no alignment to keep.
    unsafe { std::slice::from_raw_parts_mut(logits.as_mut_ptr().cast(), logits.len() * 4) }
}

/// The logits a graph wrote as little-endian bytes, as this machine's
/// f32s (a no-op where it is little-endian).
fn from_le(logits: &mut [f32]) {
    if cfg!(target_endian = "big") {
        for l in logits {
            *l = f32::from_bits(u32::from_le(l.to_bits()));
        }
    }
}
