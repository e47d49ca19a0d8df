//! The forward pass of every architecture kiln runs (llama, qwen2, qwen3,
//! gemma3), as a graph of backend ops; the architectures differ only by
//! what their `ModelConfig` turns on.
//!
//! One graph per batch of tokens. Its storages, by index:
//! - [`WEIGHTS`]: the GGUF file's memory map (read-only);
//! - [`KV`]: the KV cache, per layer K then V, each `[head_dim,
//!   n_head_kv, n_ctx]` in the cache's type (f16, q8_0 or q4_0: rows of a
//!   head's elements, so quantized blocks run along the head) for the
//!   fused attention op; for a backend without that op, f16 with V
//!   transposed as `[n_ctx, head_dim, n_head_kv]` (llama.cpp's layout
//!   without flash attention: V's rows contiguous for the weighted sum),
//!   see [`KvCache`];
//! - [`INPUTS`]: token ids, positions, the causal mask and, for models
//!   with sliding-window layers, the windowed one;
//! - [`SCRATCH`]: activations, placed by liveness so that a layer reuses the
//!   space of the one before (see [`Builder::finish`]);
//! - [`LOGITS`]: the output, f32 `[n_vocab, rows]`.

use super::config::{Ffn, ModelConfig, Norm};
use crate::backend::exec::{HostOp, TensorRef};
use crate::gguf::GgufFile;
use kiln_plugin_api::Desc;
use kiln_plugin_api::types::f32_param;
use kiln_plugin_api::{DType, OpKind};

pub const WEIGHTS: usize = 0;
pub const KV: usize = 1;
pub const INPUTS: usize = 2;
pub const SCRATCH: usize = 3;
pub const LOGITS: usize = 4;
/// Where a graph built with [`Attention::capture_from`] writes the
/// attention probabilities it records (see [`Attention`]).
pub const ATTENTION: usize = 5;

/// Scratch allocations are aligned to this.
const ALIGN: usize = 64;

/// Queries per attention block by default: each block's scores cover the
/// positions up to its last query only (see [`build`]).
pub const ATTENTION_BLOCK: usize = 64;

/// What the KV cache holds and how attention reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCache {
    /// F16, Q8_0 or Q4_0 ([`KvCache::TYPES`]).
    pub dtype: DType,
    /// Attention is one fused op per layer ([`OpKind::Attention`]: tiled,
    /// online softmax, no query × position matrix), V stored like K.
    /// Otherwise matrix products and a softmax, `block` queries at a time,
    /// over V transposed: for a device without the fused op (f16 only).
    pub fused: bool,
}

impl Default for KvCache {
    fn default() -> Self {
        KvCache {
            dtype: DType::F16,
            fused: true,
        }
    }
}

impl KvCache {
    /// The types a cache may hold, by name.
    pub const TYPES: [(&'static str, DType); 3] = [
        ("f16", DType::F16),
        ("q8_0", DType::Q8_0),
        ("q4_0", DType::Q4_0),
    ];

    /// The type named `name` (`f16`, `q8_0`, `q4_0`); the error lists them.
    pub fn parse_type(name: &str) -> Result<DType, String> {
        Self::TYPES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
            .map(|(_, d)| *d)
            .ok_or_else(|| format!("unknown KV cache type {name:?}: use f16, q8_0 or q4_0"))
    }

    /// The name [`KvCache::parse_type`] reads.
    pub fn type_name(dtype: DType) -> &'static str {
        Self::TYPES
            .iter()
            .find(|(_, d)| *d == dtype)
            .map_or("?", |(n, _)| n)
    }

    /// Bytes of one head's K (or V) at one position.
    pub fn head_bytes(&self, cfg: &ModelConfig) -> usize {
        self.dtype
            .row_bytes(cfg.head_dim)
            .expect("a whole number of blocks (checked by `check`)")
    }

    /// Whether `cfg`'s heads fit this cache: quantized blocks of 32 must
    /// tile a head.
    pub fn check(&self, cfg: &ModelConfig) -> Result<(), String> {
        if !Self::TYPES.iter().any(|(_, d)| *d == self.dtype) {
            return Err(format!(
                "a KV cache of {} is not supported: use f16, q8_0 or q4_0",
                self.dtype
            ));
        }
        if !self.fused && self.dtype != DType::F16 {
            return Err("a quantized KV cache needs the fused attention op".into());
        }
        if self.dtype.row_bytes(cfg.head_dim).is_none() {
            return Err(format!(
                "a {} KV cache needs a head size that is a multiple of {}, and this model's is {}: use f16",
                Self::type_name(self.dtype),
                self.dtype.block_len(),
                cfg.head_dim
            ));
        }
        Ok(())
    }
}

/// How a graph runs attention: over `kv`; unfused, `block` queries at a
/// time, each block against the positions up to its last query; with
/// `capture_from`, the attention probabilities of the batch's queries
/// `from..` are also copied to storage [`ATTENTION`], as f32 `[t_len,
/// n_tokens - from, n_head, n_layer]` (`t_len` the positions the batch's
/// last query sees; a row's positions past its own query are left as they
/// were, zero in a zeroed storage). A fused graph that captures computes
/// the probabilities beside the fused op, in blocks as the unfused one.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub block: usize,
    pub capture_from: Option<usize>,
    pub kv: KvCache,
}

impl Attention {
    pub fn new(block: usize, kv: KvCache) -> Attention {
        Attention {
            block,
            capture_from: None,
            kv,
        }
    }

    /// Bytes of storage [`ATTENTION`] a capture of `rows` queries over
    /// `t_len` positions needs.
    pub fn capture_bytes(cfg: &ModelConfig, rows: usize, t_len: usize) -> usize {
        4 * t_len * rows * cfg.n_head * cfg.n_layer
    }
}

/// Which tokens' logits a step produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    Last,
    All,
}

/// Where the inputs of a step sit in the inputs storage.
#[derive(Clone, Copy, Debug)]
pub struct InputLayout {
    pub tokens: usize,
    pub positions: usize,
    pub mask: usize,
    /// The sliding-window mask, `[n_kv, n_tokens]` as the causal one; at
    /// `mask` when the model has no windowed layers.
    pub mask_window: usize,
    pub bytes: usize,
}

impl InputLayout {
    pub fn new(n_tokens: usize, n_kv: usize, windowed: bool) -> InputLayout {
        let align = |n: usize| n.div_ceil(ALIGN) * ALIGN;
        let tokens = 0;
        let positions = align(4 * n_tokens);
        let mask = positions + align(4 * n_tokens);
        let mask_bytes = 4 * n_kv * n_tokens;
        let mask_window = if windowed {
            mask + align(mask_bytes)
        } else {
            mask
        };
        InputLayout {
            tokens,
            positions,
            mask,
            mask_window,
            bytes: mask_window + mask_bytes,
        }
    }

    /// Writes both masks for `n_tokens` queries at positions `n_past..`
    /// over `n_kv` positions: query i sees position t when t ≤ its own
    /// and, in the windowed mask, when it is fewer than `window` behind.
    pub fn fill_masks(
        &self,
        inputs: &mut [u8],
        n_past: usize,
        n_tokens: usize,
        n_kv: usize,
        window: Option<usize>,
    ) {
        fill_mask(&mut inputs[self.mask..], n_past, n_tokens, n_kv, |_| true);
        if let Some(w) = window {
            self.fill_window(inputs, n_past, n_tokens, n_kv, w);
        }
    }

    /// The windowed mask alone: what a decode step rewrites (its causal
    /// row, every position up to its own, stays zeros).
    pub fn fill_window(
        &self,
        inputs: &mut [u8],
        n_past: usize,
        n_tokens: usize,
        n_kv: usize,
        window: usize,
    ) {
        let inputs = &mut inputs[self.mask_window..];
        fill_mask(inputs, n_past, n_tokens, n_kv, |behind| behind < window);
    }
}

/// One mask, `[n_kv, n_tokens]` f32 from `out`'s start: query i (at
/// position n_past + i) sees position t when t is not after it and
/// `near(how far t is behind)`; the rest is −∞.
fn fill_mask(
    out: &mut [u8],
    n_past: usize,
    n_tokens: usize,
    n_kv: usize,
    near: impl Fn(usize) -> bool,
) {
    for i in 0..n_tokens {
        let p = n_past + i;
        for (t, v) in out[4 * i * n_kv..][..4 * n_kv]
            .chunks_exact_mut(4)
            .enumerate()
        {
            let seen = t <= p && near(p - t);
            v.copy_from_slice(&if seen { 0.0f32 } else { f32::NEG_INFINITY }.to_le_bytes());
        }
    }
}

/// Byte offsets of layer `l`'s K and V caches.
pub fn kv_offsets(cfg: &ModelConfig, kv: KvCache, n_ctx: usize, l: usize) -> (usize, usize) {
    let layer = n_ctx * cfg.n_head_kv * kv.head_bytes(cfg);
    (2 * l * layer, 2 * l * layer + layer)
}

pub fn kv_bytes(cfg: &ModelConfig, kv: KvCache, n_ctx: usize) -> usize {
    2 * cfg.n_layer * n_ctx * cfg.n_head_kv * kv.head_bytes(cfg)
}

struct Alloc {
    size: usize,
    first: usize,
    last: usize,
    offset: usize,
}

/// How a tensor of a graph follows the position of the batch: a decode
/// graph is built once and these rules re-applied before each token
/// (see [`Follow::apply`]), instead of building the graph again.
pub enum Follow {
    /// Its byte offset is `base + n_past * stride`: where this step's K or
    /// V goes in the cache.
    Offset { base: usize, stride: usize },
    /// Its extents and strides over the `t` positions a query sees
    /// (`n_past + n_tokens`).
    Desc(Box<dyn Fn(usize) -> Desc + Send + Sync>),
}

impl Follow {
    /// Sets `t` for a batch of `n_tokens` at positions `n_past..`.
    pub fn apply(&self, t: &mut TensorRef, n_past: usize, n_tokens: usize) {
        match self {
            Follow::Offset { base, stride } => t.offset = base + n_past * stride,
            Follow::Desc(desc) => t.desc = desc(n_past + n_tokens),
        }
    }
}

/// Collects tensors and ops; scratch tensors get offsets at the end.
pub struct Builder<'f> {
    file: &'f GgufFile,
    pub tensors: Vec<TensorRef>,
    pub ops: Vec<HostOp>,
    /// Tensors that depend on the batch's position, and how.
    pub follows: Vec<(usize, Follow)>,
    allocs: Vec<Alloc>,
    /// For each tensor: its scratch allocation and offset inside it.
    alloc_of: Vec<Option<(usize, usize)>>,
}

fn dense_nb(dtype: DType, ne: [usize; 4]) -> [usize; 4] {
    Desc::contiguous(dtype, ne).nb
}

impl<'f> Builder<'f> {
    pub fn new(file: &'f GgufFile) -> Builder<'f> {
        Builder {
            file,
            tensors: Vec::new(),
            ops: Vec::new(),
            follows: Vec::new(),
            allocs: Vec::new(),
            alloc_of: Vec::new(),
        }
    }

    fn push(&mut self, t: TensorRef, alloc: Option<(usize, usize)>) -> usize {
        self.tensors.push(t);
        self.alloc_of.push(alloc);
        self.tensors.len() - 1
    }

    /// A weight tensor, straight from the file (validated by the config).
    pub fn weight(&mut self, name: &str) -> usize {
        let info = self.file.tensor(name).expect("checked by ModelConfig");
        let ne = info.ne.map(|n| n as usize);
        let offset = (self.file.data_offset + info.offset) as usize;
        self.push(TensorRef::dense(WEIGHTS, offset, info.dtype, ne), None)
    }

    /// A tensor at a fixed place in a storage other than scratch.
    pub fn fixed(
        &mut self,
        storage: usize,
        offset: usize,
        dtype: DType,
        ne: [usize; 4],
        nb: [usize; 4],
    ) -> usize {
        let t = TensorRef {
            storage,
            offset,
            desc: Desc { dtype, ne, nb },
        };
        self.push(t, None)
    }

    /// A new dense scratch tensor.
    pub fn scratch(&mut self, dtype: DType, ne: [usize; 4]) -> usize {
        let t = TensorRef::dense(SCRATCH, 0, dtype, ne);
        let size = t.desc.extent().expect("small extents");
        self.allocs.push(Alloc {
            size,
            first: usize::MAX,
            last: 0,
            offset: 0,
        });
        let id = self.allocs.len() - 1;
        self.push(t, Some((id, 0)))
    }

    /// Another view of tensor `base`'s bytes.
    pub fn view(
        &mut self,
        base: usize,
        ne: [usize; 4],
        nb: [usize; 4],
        byte_offset: usize,
    ) -> usize {
        let t = self.tensors[base].view(ne, nb, byte_offset);
        let alloc = self.alloc_of[base].map(|(id, o)| (id, o + byte_offset));
        self.push(t, alloc)
    }

    /// `base` seen as dense with other extents (same number of elements).
    pub fn reshape(&mut self, base: usize, ne: [usize; 4]) -> usize {
        let dtype = self.tensors[base].desc.dtype;
        self.view(base, ne, dense_nb(dtype, ne), 0)
    }

    pub fn op(&mut self, kind: OpKind, src: &[usize], dst: usize, params: &[i32]) -> usize {
        let i = self.ops.len();
        for &t in src.iter().chain([&dst]) {
            if let Some((id, _)) = self.alloc_of[t] {
                let a = &mut self.allocs[id];
                a.first = a.first.min(i);
                a.last = a.last.max(i);
            }
        }
        self.ops
            .push(HostOp::new(kind, src, dst).with_params(params));
        dst
    }

    /// `kind(src)` into a new scratch tensor of `dtype` and `ne`.
    pub fn new_op(
        &mut self,
        kind: OpKind,
        src: &[usize],
        dtype: DType,
        ne: [usize; 4],
        params: &[i32],
    ) -> usize {
        let dst = self.scratch(dtype, ne);
        self.op(kind, src, dst, params)
    }

    /// `name`'s product with `x` (`rows` × the columns of `x`), plus
    /// `B·(A·x)` where the model carries a LoRA pair for it
    /// (`NAME.lora_a`, `NAME.lora_b`, `B` already scaled: [`super::lora`]).
    fn project(&mut self, name: &str, x: usize, rows: usize) -> usize {
        let n = self.ne(x)[1];
        let w = self.weight(name);
        let y = self.new_op(OpKind::MulMat, &[w, x], DType::F32, [rows, n, 1, 1], &[]);
        let (a, b) = (format!("{name}.lora_a"), format!("{name}.lora_b"));
        let Some(r) = self.file.tensor(&a).map(|t| t.ne[1] as usize) else {
            return y;
        };
        let (a, b) = (self.weight(&a), self.weight(&b));
        let ax = self.new_op(OpKind::MulMat, &[a, x], DType::F32, [r, n, 1, 1], &[]);
        let bax = self.new_op(OpKind::MulMat, &[b, ax], DType::F32, [rows, n, 1, 1], &[]);
        self.new_op(OpKind::Add, &[y, bax], DType::F32, [rows, n, 1, 1], &[])
    }

    /// Records that tensor `t` follows the batch's position.
    fn follow(&mut self, t: usize, rule: Follow) -> usize {
        self.follows.push((t, rule));
        t
    }

    fn ne(&self, t: usize) -> [usize; 4] {
        self.tensors[t].desc.ne
    }

    /// Places every scratch allocation: first fit, in op order, reusing the
    /// space of allocations whose last use is behind. Returns the scratch
    /// size needed.
    pub fn finish(&mut self) -> usize {
        let mut order: Vec<usize> = (0..self.allocs.len())
            .filter(|&i| self.allocs[i].first != usize::MAX)
            .collect();
        order.sort_by_key(|&i| self.allocs[i].first);
        let mut live: Vec<usize> = Vec::new();
        let mut peak = 0;
        for id in order {
            let now = self.allocs[id].first;
            live.retain(|&l| self.allocs[l].last >= now);
            live.sort_by_key(|&l| self.allocs[l].offset);
            let size = self.allocs[id].size.div_ceil(ALIGN) * ALIGN;
            let mut offset = 0;
            for &l in &live {
                let a = &self.allocs[l];
                if a.offset >= offset + size {
                    break;
                }
                offset = offset.max((a.offset + a.size).div_ceil(ALIGN) * ALIGN);
            }
            self.allocs[id].offset = offset;
            peak = peak.max(offset + size);
            live.push(id);
        }
        for (t, alloc) in self.tensors.iter_mut().zip(&self.alloc_of) {
            if let Some((id, o)) = alloc {
                t.offset = self.allocs[*id].offset + o;
            }
        }
        peak
    }
}

/// Builds the graph for `n_tokens` tokens at positions `n_past..`, with a
/// KV cache of `n_ctx` positions, running attention as `attention` says.
/// Returns the builder (tensors, ops, scratch placed), the scratch
/// size, and the logits rows.
pub fn build<'f>(
    cfg: &ModelConfig,
    file: &'f GgufFile,
    n_ctx: usize,
    n_past: usize,
    n_tokens: usize,
    logits: LogitsFor,
    attention: Attention,
) -> (Builder<'f>, usize, usize) {
    let layout = InputLayout::new(n_tokens, n_past + n_tokens, cfg.sliding_window.is_some());
    let seq = Seq {
        kv: KV,
        n_ctx,
        n_past,
        n_tokens,
        mask: layout.mask,
        mask_window: layout.mask_window,
    };
    build_seqs(cfg, file, &[seq], &layout, logits, attention)
}

/// One sequence of a graph's batch: its tokens are the batch's next
/// `n_tokens` rows, at positions `n_past..` of its own KV cache (storage
/// `kv`, `n_ctx` positions), seen through its own masks (`[n_past +
/// n_tokens, n_tokens]` f32 at byte offsets `mask` and `mask_window` of
/// [`INPUTS`]).
#[derive(Clone, Copy, Debug)]
pub struct Seq {
    pub kv: usize,
    pub n_ctx: usize,
    pub n_past: usize,
    pub n_tokens: usize,
    pub mask: usize,
    pub mask_window: usize,
}

/// The storage of sequence `i`'s KV cache in a graph of several
/// ([`build_decode_batch`]): the first at [`KV`], the others after
/// [`LOGITS`] (a batch records no attention).
pub fn batch_kv_storage(i: usize) -> usize {
    if i == 0 { KV } else { LOGITS + i }
}

/// Where a batch of single-token sequences has its inputs: token ids and
/// positions as [`InputLayout`], then each sequence's causal and
/// windowed masks (one row over the positions it sees).
#[derive(Clone, Debug)]
pub struct BatchLayout {
    pub tokens: usize,
    pub positions: usize,
    pub seqs: Vec<Seq>,
    pub bytes: usize,
}

/// The graph of one decode step for several sequences at once (one token
/// each, at position `n_past[i]` of the sequence's cache of `n_ctx[i]`
/// positions, in storage [`batch_kv_storage`]`(i)`), over the fused
/// attention: the matrix products read each weight once for every
/// sequence, and attention runs per sequence. Returns the builder, its
/// scratch size and where the inputs go; the logits are one row per
/// sequence.
pub fn build_decode_batch<'f>(
    cfg: &ModelConfig,
    file: &'f GgufFile,
    caches: &[(usize, usize)],
    kv: KvCache,
) -> (Builder<'f>, usize, BatchLayout) {
    assert!(kv.fused, "a batch of sequences runs the fused attention");
    let align = |n: usize| n.div_ceil(ALIGN) * ALIGN;
    let b = caches.len();
    let positions = align(4 * b);
    let mut at = positions + align(4 * b);
    let windowed = cfg.sliding_window.is_some();
    let seqs = (caches.iter().enumerate())
        .map(|(i, &(n_ctx, n_past))| {
            let row = align(4 * (n_past + 1));
            let mask = at;
            let mask_window = if windowed { mask + row } else { mask };
            at = mask_window + row;
            Seq {
                kv: batch_kv_storage(i),
                n_ctx,
                n_past,
                n_tokens: 1,
                mask,
                mask_window,
            }
        })
        .collect();
    let layout = BatchLayout {
        tokens: 0,
        positions,
        seqs,
        bytes: at,
    };
    let inputs = InputLayout {
        tokens: 0,
        positions,
        mask: 0,
        mask_window: 0,
        bytes: at,
    };
    let attention = Attention::new(ATTENTION_BLOCK, kv);
    let (builder, scratch, _) =
        build_seqs(cfg, file, &layout.seqs, &inputs, LogitsFor::All, attention);
    (builder, scratch, layout)
}

/// [`build`] for the sequences `seqs`, one after the other in the batch's
/// rows; token ids and positions where `inputs` says (its masks are the
/// sequences'). Several sequences need the fused attention, without
/// capture.
fn build_seqs<'f>(
    cfg: &ModelConfig,
    file: &'f GgufFile,
    seqs: &[Seq],
    inputs: &InputLayout,
    logits: LogitsFor,
    attention: Attention,
) -> (Builder<'f>, usize, usize) {
    use DType::{F16, F32, I32};
    let single = seqs.len() == 1;
    assert!(
        single || (attention.kv.fused && attention.capture_from.is_none()),
        "several sequences run the fused attention, and record none"
    );
    // The first sequence: the only one where the unfused attention or a
    // capture run.
    let Seq { n_ctx, n_past, .. } = seqs[0];
    let (e, hd, h, hkv, ff) = (
        cfg.n_embd,
        cfg.head_dim,
        cfg.n_head,
        cfg.n_head_kv,
        cfg.n_ff,
    );
    let (kv, qd) = (cfg.kv_dim(), cfg.q_dim());
    let n: usize = seqs.iter().map(|s| s.n_tokens).sum();
    let t_len = n_past + seqs[0].n_tokens;
    let kv_t = attention.kv.dtype;
    let fused = attention.kv.fused;
    // Bytes of a head's K or V at one position, of all heads' (a
    // position), and of an f16 element (the unfused V).
    let head = attention.kv.head_bytes(cfg);
    let pos_bytes = hkv * head;
    let el = 2;
    let layout = inputs;
    let mut b = Builder::new(file);

    let tokens = b.fixed(
        INPUTS,
        layout.tokens,
        I32,
        [n, 1, 1, 1],
        dense_nb(I32, [n, 1, 1, 1]),
    );
    let pos = b.fixed(
        INPUTS,
        layout.positions,
        I32,
        [n, 1, 1, 1],
        dense_nb(I32, [n, 1, 1, 1]),
    );
    // Only a one-token graph is reused across positions (decode); its
    // position-dependent tensors say how they follow.
    let reusable = single && n == 1;
    let input_mask = |b: &mut Builder<'f>, offset: usize, s: &Seq| {
        let (t, n) = (s.n_past + s.n_tokens, s.n_tokens);
        let m = b.fixed(
            INPUTS,
            offset,
            F32,
            [t, n, 1, 1],
            dense_nb(F32, [t, n, 1, 1]),
        );
        if reusable {
            b.follow(
                m,
                Follow::Desc(Box::new(|t| Desc::contiguous(F32, [t, 1, 1, 1]))),
            );
        }
        m
    };
    // Each sequence's causal and windowed masks.
    let masks: Vec<(usize, usize)> = (seqs.iter())
        .map(|s| {
            let mask = input_mask(&mut b, s.mask, s);
            let mask_window = match cfg.sliding_window {
                Some(_) => input_mask(&mut b, s.mask_window, s),
                None => mask,
            };
            (mask, mask_window)
        })
        .collect();
    let embd = b.weight("token_embd.weight");
    let mut x = b.new_op(OpKind::GetRows, &[embd, tokens], F32, [e, n, 1, 1], &[]);
    if let Some(s) = cfg.embd_scale {
        x = b.new_op(OpKind::Scale, &[x], F32, [e, n, 1, 1], &[f32_param(s)]);
    }
    let eps = [f32_param(cfg.norm_eps)];
    let kq_scale = [f32_param(1.0 / (hd as f32).sqrt())];
    // The model's norm over rows of `ne[0]`: x · weight after an RMS
    // norm, or (LayerNorm) x · weight + bias after centring and scaling.
    let norm = |b: &mut Builder<'f>, x: usize, weight: &str| {
        let ne = b.ne(x);
        let kind = match cfg.norm {
            Norm::Rms => OpKind::RmsNorm,
            Norm::Layer => OpKind::Norm,
        };
        let normed = b.new_op(kind, &[x], F32, ne, &eps);
        let w = b.weight(weight);
        let y = b.new_op(OpKind::Mul, &[normed, w], F32, ne, &[]);
        match cfg.norm {
            Norm::Rms => y,
            Norm::Layer => {
                let bias = b.weight(&weight.replace(".weight", ".bias"));
                b.new_op(OpKind::Add, &[y, bias], F32, ne, &[])
            }
        }
    };
    // y + the bias named `bias`, where the model has one.
    let biased = |b: &mut Builder<'f>, y: usize, bias: &str| {
        if cfg.out_ffn_bias {
            let ne = b.ne(y);
            let bias = b.weight(bias);
            b.new_op(OpKind::Add, &[y, bias], F32, ne, &[])
        } else {
            y
        }
    };

    for l in 0..cfg.n_layer {
        let name = |s: &str| format!("blk.{l}.{s}");
        let rope = cfg.rope_params(l);
        let mask_of = |i: usize| {
            let (mask, mask_window) = masks[i];
            if cfg.is_local(l) { mask_window } else { mask }
        };
        let mask = mask_of(0);
        // Attention.
        let xa = norm(&mut b, x, &name("attn_norm.weight"));
        let proj = |b: &mut Builder<'f>, which: &str, rows: usize| {
            let mut y = b.project(&name(&format!("attn_{which}.weight")), xa, rows);
            if cfg.qkv_bias {
                let bias = b.weight(&name(&format!("attn_{which}.bias")));
                y = b.new_op(OpKind::Add, &[y, bias], F32, [rows, n, 1, 1], &[]);
            }
            y
        };
        let q = proj(&mut b, "q", qd);
        let k = proj(&mut b, "k", kv);
        let v = proj(&mut b, "v", kv);
        let mut q3 = b.reshape(q, [hd, h, n, 1]);
        let mut k3 = b.reshape(k, [hd, hkv, n, 1]);
        if cfg.qk_norm {
            q3 = norm(&mut b, q3, &name("attn_q_norm.weight"));
            k3 = norm(&mut b, k3, &name("attn_k_norm.weight"));
        }
        // Llama 3's per-dimension frequency factors, where the file has them.
        let rope_src: Vec<usize> = if cfg.rope_freqs {
            vec![pos, b.weight("rope_freqs.weight")]
        } else {
            vec![pos]
        };
        let qr = b.new_op(
            OpKind::Rope,
            &[&[q3], &rope_src[..]].concat(),
            F32,
            [hd, h, n, 1],
            &rope,
        );
        let kr = b.new_op(
            OpKind::Rope,
            &[&[k3], &rope_src[..]].concat(),
            F32,
            [hd, hkv, n, 1],
            &rope,
        );
        let (k_off, v_off) = kv_offsets(cfg, attention.kv, n_ctx, l);
        // Where sequence `s`'s K (or V) goes: its positions n_past.. of
        // the cache at `base`, `stride` bytes a position, strides `nb` for
        // [hd, hkv, n] (moved to each step's position in a decode graph).
        let at_positions =
            |b: &mut Builder<'f>, s: &Seq, base: usize, stride: usize, nb: [usize; 4]| {
                let ne = [hd, hkv, s.n_tokens, 1];
                let dst = b.fixed(s.kv, base + s.n_past * stride, kv_t, ne, nb);
                if reusable {
                    b.follow(dst, Follow::Offset { base, stride });
                }
                dst
            };
        // A position's heads one after the other, rows of `head` bytes.
        let rows = |n: usize| [kv_t.block_bytes(), head, pos_bytes, pos_bytes * n];
        // All of a layer's K (or V) up to position t in cache `storage`,
        // as [hd, t, hkv].
        let up_to = |b: &mut Builder<'f>, storage: usize, base: usize, t: usize| {
            let all = b.fixed(
                storage,
                base,
                kv_t,
                [hd, t, hkv, 1],
                [kv_t.block_bytes(), pos_bytes, head, pos_bytes * t],
            );
            if reusable {
                b.follow(
                    all,
                    Follow::Desc(Box::new(move |t| Desc {
                        dtype: kv_t,
                        ne: [hd, t, hkv, 1],
                        nb: [kv_t.block_bytes(), pos_bytes, head, pos_bytes * t],
                    })),
                );
            }
            all
        };
        let v3 = b.reshape(v, [hd, hkv, n, 1]);
        let merged = b.scratch(F32, [hd, h, n, 1]);
        // Each sequence's rows: K and V into its cache, then (fused) its
        // queries' attention over its positions.
        let mut r0 = 0;
        for (i, s) in seqs.iter().enumerate() {
            let ns = s.n_tokens;
            let (k_off, v_off) = kv_offsets(cfg, attention.kv, s.n_ctx, l);
            // The sequence's rows of a [hd, heads, n] tensor.
            let own = |b: &mut Builder<'f>, t: usize, heads: usize| {
                if single {
                    return t;
                }
                let nb = dense_nb(F32, [hd, heads, ns, 1]);
                b.view(t, [hd, heads, ns, 1], nb, r0 * hd * heads * 4)
            };
            let (ks, vs) = (own(&mut b, kr, hkv), own(&mut b, v3, hkv));
            let k_dst = at_positions(&mut b, s, k_off, pos_bytes, rows(ns));
            b.op(OpKind::Cpy, &[ks], k_dst, &[]);
            let v_dst = if fused {
                at_positions(&mut b, s, v_off, pos_bytes, rows(ns))
            } else {
                // V transposed (f16 only): a position is one element of each row.
                let nb = [n_ctx * el, hd * n_ctx * el, el, el * n];
                at_positions(&mut b, s, v_off, el, nb)
            };
            b.op(OpKind::Cpy, &[vs], v_dst, &[]);
            if fused {
                // Q and the output per head, [hd, n, h]: views of the
                // token-major rows.
                let heads_nb = [4, hd * h * 4, hd * 4, hd * h * ns * 4];
                let t = s.n_past + ns;
                let k_all = up_to(&mut b, s.kv, k_off, t);
                let v_all = up_to(&mut b, s.kv, v_off, t);
                let q_heads = b.view(qr, [hd, ns, h, 1], heads_nb, r0 * hd * h * 4);
                let out = b.view(merged, [hd, ns, h, 1], heads_nb, r0 * hd * h * 4);
                b.op(
                    OpKind::Attention,
                    &[q_heads, k_all, v_all, mask_of(i)],
                    out,
                    &kq_scale,
                );
            }
            r0 += ns;
        }
        // Unfused attention (or, fused, the probabilities a capture
        // records), in blocks of queries: a block's scores need only the
        // positions up to its last query (the causal mask hides the
        // rest), so a long prompt skips almost half of the products and
        // softmax.
        let blocks = if fused && attention.capture_from.is_none() {
            0
        } else {
            n
        };
        for q0 in (0..blocks).step_by(attention.block) {
            let nq = attention.block.min(n - q0);
            let t = n_past + q0 + nq;
            // Scores: per head, K (positions 0..t) against Q.
            let k_all = up_to(&mut b, KV, k_off, t);
            let q_heads = b.view(
                qr,
                [hd, nq, h, 1],
                [4, hd * h * 4, hd * 4, hd * h * nq * 4],
                q0 * hd * h * 4,
            );
            let kq = b.new_op(OpKind::MulMat, &[k_all, q_heads], F32, [t, nq, h, 1], &[]);
            if reusable {
                b.follow(
                    kq,
                    Follow::Desc(Box::new(move |t| Desc::contiguous(F32, [t, 1, h, 1]))),
                );
            }
            let mask_rows = b.view(
                mask,
                [t, nq, 1, 1],
                [4, t_len * 4, t_len * nq * 4, t_len * nq * 4],
                q0 * t_len * 4,
            );
            let probs = b.new_op(
                OpKind::SoftMax,
                &[kq, mask_rows],
                F32,
                [t, nq, h, 1],
                &kq_scale,
            );
            if reusable {
                b.follow(
                    mask_rows,
                    Follow::Desc(Box::new(|t| Desc {
                        dtype: F32,
                        ne: [t, 1, 1, 1],
                        nb: [4, t * 4, t * 4, t * 4],
                    })),
                );
                b.follow(
                    probs,
                    Follow::Desc(Box::new(move |t| Desc::contiguous(F32, [t, 1, h, 1]))),
                );
            }
            if let Some(from) = attention.capture_from {
                // This block's queries from `from` on, as they are.
                let c0 = from.max(q0);
                if c0 < q0 + nq {
                    let (nc, rows) = (q0 + nq - c0, n - from);
                    let src = b.view(
                        probs,
                        [t, nc, h, 1],
                        [4, t * 4, t * nq * 4, t * nq * h * 4],
                        (c0 - q0) * t * 4,
                    );
                    let dst = b.fixed(
                        ATTENTION,
                        ((l * h * rows) + (c0 - from)) * t_len * 4,
                        F32,
                        [t, nc, h, 1],
                        [4, t_len * 4, rows * t_len * 4, h * rows * t_len * 4],
                    );
                    b.op(OpKind::Cpy, &[src], dst, &[]);
                }
            }
            if fused {
                continue;
            }
            let v_all = b.fixed(
                KV,
                v_off,
                F16,
                [t, hd, hkv, 1],
                [el, n_ctx * el, hd * n_ctx * el, hd * n_ctx * el * hkv],
            );
            if reusable {
                b.follow(
                    v_all,
                    Follow::Desc(Box::new(move |t| Desc {
                        dtype: F16,
                        ne: [t, hd, hkv, 1],
                        nb: [el, n_ctx * el, hd * n_ctx * el, hd * n_ctx * el * hkv],
                    })),
                );
            }
            let kqv = b.new_op(OpKind::MulMat, &[v_all, probs], F32, [hd, nq, h, 1], &[]);
            let kqv_tokens = b.view(
                kqv,
                [hd, h, nq, 1],
                [4, hd * nq * 4, hd * 4, hd * h * nq * 4],
                0,
            );
            let dst = b.view(
                merged,
                [hd, h, nq, 1],
                dense_nb(F32, [hd, h, nq, 1]),
                q0 * hd * h * 4,
            );
            b.op(OpKind::Cpy, &[kqv_tokens], dst, &[]);
        }
        let merged = b.reshape(merged, [qd, n, 1, 1]);
        let o = b.project(&name("attn_output.weight"), merged, e);
        let mut o = biased(&mut b, o, &name("attn_output.bias"));
        if cfg.post_norms {
            o = norm(&mut b, o, &name("post_attention_norm.weight"));
        }
        let x1 = b.new_op(OpKind::Add, &[x, o], F32, [e, n, 1, 1], &[]);
        // Feed-forward: a gated activation (SwiGLU or GeGLU), or GELU.
        let xf = norm(&mut b, x1, &name("ffn_norm.weight"));
        let up = b.project(&name("ffn_up.weight"), xf, ff);
        let up = biased(&mut b, up, &name("ffn_up.bias"));
        let hidden = match cfg.ffn {
            Ffn::Gelu => b.new_op(OpKind::Gelu, &[up], F32, [ff, n, 1, 1], &[]),
            Ffn::SwiGlu | Ffn::GeGlu => {
                let gate = b.project(&name("ffn_gate.weight"), xf, ff);
                let act = if cfg.ffn == Ffn::SwiGlu {
                    OpKind::Silu
                } else {
                    OpKind::Gelu
                };
                let act = b.new_op(act, &[gate], F32, [ff, n, 1, 1], &[]);
                b.new_op(OpKind::Mul, &[act, up], F32, [ff, n, 1, 1], &[])
            }
        };
        let down = b.project(&name("ffn_down.weight"), hidden, e);
        let mut down = biased(&mut b, down, &name("ffn_down.bias"));
        if cfg.post_norms {
            down = norm(&mut b, down, &name("post_ffw_norm.weight"));
        }
        x = b.new_op(OpKind::Add, &[x1, down], F32, [e, n, 1, 1], &[]);
    }

    let xo = norm(&mut b, x, "output_norm.weight");
    let (rows, src) = match logits {
        LogitsFor::All => (n, xo),
        LogitsFor::Last => (
            1,
            b.view(xo, [e, 1, 1, 1], [4, e * 4, e * 4, e * 4], (n - 1) * e * 4),
        ),
    };
    let out = b.weight(if cfg.tied_output {
        "token_embd.weight"
    } else {
        "output.weight"
    });
    let v = cfg.n_vocab;
    let logits_t = b.fixed(
        LOGITS,
        0,
        F32,
        [v, rows, 1, 1],
        dense_nb(F32, [v, rows, 1, 1]),
    );
    b.op(OpKind::MulMat, &[out, src], logits_t, &[]);
    debug_assert_eq!(b.ne(logits_t), [v, rows, 1, 1]);
    let scratch = b.finish();
    (b, scratch, rows)
}
