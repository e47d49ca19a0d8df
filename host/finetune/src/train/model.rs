//! A model for training: its frozen base weights, read from the GGUF file
//! in their stored type and dequantized when a product needs them, and
//! the LoRA pairs trained on top. [`Trainable::loss`] runs one packed
//! sequence forward and, with gradients asked for, backward. Memory is
//! bounded by two budgets: a layer's inside is kept from the forward pass
//! while every layer's fits [`Trainable::activation_budget`], else only
//! its input is kept and the inside recomputed when its gradient is
//! needed; the dequantized (f32) base matrices the backward pass reads are
//! kept between steps while they fit [`Trainable::dense_budget`], else
//! dequantized at every use.

use super::linalg::{Float, Op, gemm};
use super::ops::{self, Attn, Rope};
use kiln_plugin_api::DType;
use kiln_plugin_api::abi::KILN_ROPE_NEOX;
use kiln_runtime::gguf::GgufFile;
use kiln_runtime::model::config::{Arch, Ffn, ModelConfig, Norm};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

/// The projections LoRA can adapt, as GGUF names them (`blk.N.<name>.weight`):
/// the ones inference applies adapters to.
pub use kiln_runtime::model::lora::TARGETS;
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The frozen model.
pub struct Base {
    pub cfg: ModelConfig,
    file: GgufFile,
}

/// A frozen matrix: `rows` rows of `cols` elements in `dtype`.
pub struct Weight<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    data: &'a [u8],
}

impl Weight<'_> {
    /// Rows `r0..r1`, dequantized into `out` ((r1 − r0) × cols).
    pub fn rows_into<T: Float>(&self, r0: usize, r1: usize, out: &mut [T]) {
        let row_bytes = self.dtype.row_bytes(self.cols).expect("whole blocks");
        for (r, o) in (r0..r1).zip(out.chunks_exact_mut(self.cols)) {
            T::dequantize(
                self.dtype,
                &self.data[r * row_bytes..(r + 1) * row_bytes],
                o,
            );
        }
    }

    /// Rows `r0..r1` as their own matrix.
    fn slice(&self, r0: usize, r1: usize) -> Weight<'_> {
        let row_bytes = self.dtype.row_bytes(self.cols).expect("whole blocks");
        Weight {
            dtype: self.dtype,
            rows: r1 - r0,
            cols: self.cols,
            data: &self.data[r0 * row_bytes..r1 * row_bytes],
        }
    }

    /// The whole matrix, dequantized on the pool's threads.
    pub fn dense<T: Float>(&self) -> Vec<T> {
        let mut out = vec![T::zero(); self.rows * self.cols];
        let cols = self.cols;
        super::linalg::for_rows(&mut out, cols * 16, &|i, chunk: &mut [T]| {
            self.rows_into(i * 16, i * 16 + chunk.len() / cols, chunk)
        });
        let tail = self.rows / 16 * 16;
        self.rows_into(tail, self.rows, &mut out[tail * cols..]);
        out
    }
}

impl Base {
    /// Opens `path` for training, or says why its architecture cannot be
    /// trained yet.
    pub fn open(path: &Path) -> Result<Base, String> {
        let file = GgufFile::open(path).map_err(|e| e.to_string())?;
        let cfg = ModelConfig::from_gguf(&file).map_err(|e| e.to_string())?;
        let unsupported = |what: &str| {
            Err(format!(
                "{}: training does not support {what} yet (llama and qwen2 models can be trained)",
                path.display()
            ))
        };
        if !matches!(cfg.arch, Arch::Llama | Arch::Qwen2) {
            return unsupported(&format!("{} models", cfg.arch.name()));
        }
        if cfg.norm != Norm::Rms
            || cfg.ffn != Ffn::SwiGlu
            || cfg.qk_norm
            || cfg.post_norms
            || cfg.out_ffn_bias
            || cfg.embd_scale.is_some()
        {
            return unsupported("this model's layer shape");
        }
        if cfg.sliding_window.is_some() || cfg.rope_yarn.is_some() || cfg.rope_freqs {
            return unsupported("sliding windows or long-context RoPE scaling");
        }
        Ok(Base { cfg, file })
    }

    /// The model file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn weight(&self, name: &str) -> Weight<'_> {
        let t = self
            .file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name}: checked by ModelConfig"));
        Weight {
            dtype: t.dtype,
            rows: t.ne[1] as usize,
            cols: t.ne[0] as usize,
            data: self.file.tensor_data(t),
        }
    }

    fn vector<T: Float>(&self, name: &str) -> Vec<T> {
        let w = self.weight(name);
        let mut out = vec![T::zero(); w.cols * w.rows];
        w.rows_into(0, w.rows, &mut out);
        out
    }

    fn output(&self) -> Weight<'_> {
        self.weight(self.output_name())
    }

    /// The output head's tensor: its own, or the token embeddings when tied.
    fn output_name(&self) -> &'static str {
        if self.cfg.tied_output {
            "token_embd.weight"
        } else {
            "output.weight"
        }
    }

    /// A projection's (rows, cols): (output width, input width).
    pub fn shape(&self, layer: usize, target: usize) -> (usize, usize) {
        let w = self.weight(&format!("blk.{layer}.{}.weight", TARGETS[target]));
        (w.rows, w.cols)
    }
}

/// `x` rounded to f16 values.
fn round_f16<T: Float>(x: &mut [T]) {
    for v in x {
        *v = T::of32(half::f16::from_f64(v.f64()).to_f32());
    }
}

/// One LoRA pair on a projection `W` (out × in): `W + s·B·A`, `A` r × in,
/// `B` out × r, `s = alpha / r`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair<T> {
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub rows: usize,
    pub cols: usize,
}

/// The adapter: per layer, a pair for each adapted projection.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter<T> {
    pub rank: usize,
    pub alpha: f32,
    pub layers: Vec<[Option<Pair<T>>; 7]>,
}

impl<T: Float> Adapter<T> {
    /// A fresh adapter on `targets` (indices into [`TARGETS`]): `A` drawn
    /// uniformly in ±1/√in (as PEFT's Kaiming-uniform init with a = √5
    /// gives), `B` zero, so it starts as the base model.
    pub fn new(base: &Base, rank: usize, alpha: f32, targets: &[usize], seed: u64) -> Adapter<T> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let layers = (0..base.cfg.n_layer)
            .map(|l| {
                std::array::from_fn(|t| {
                    targets.contains(&t).then(|| {
                        let (rows, cols) = base.shape(l, t);
                        let bound = 1.0 / (cols as f64).sqrt();
                        Pair {
                            a: (0..rank * cols)
                                .map(|_| T::of((rng.f64() * 2.0 - 1.0) * bound))
                                .collect(),
                            b: vec![T::zero(); rows * rank],
                            rows,
                            cols,
                        }
                    })
                })
            })
            .collect();
        Adapter {
            rank,
            alpha,
            layers,
        }
    }

    /// The same shapes, all zero (for gradients and optimizer moments).
    pub fn zeros_like(&self) -> Adapter<T> {
        let mut z = self.clone();
        for p in z.pairs_mut() {
            p.a.fill(T::zero());
            p.b.fill(T::zero());
        }
        z
    }

    pub fn pairs(&self) -> impl Iterator<Item = &Pair<T>> {
        self.layers.iter().flatten().flatten()
    }

    pub fn pairs_mut(&mut self) -> impl Iterator<Item = &mut Pair<T>> {
        self.layers.iter_mut().flatten().flatten()
    }

    /// Every parameter tensor in a fixed order (A then B, pair by pair).
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Vec<T>> {
        self.pairs_mut().flat_map(|p| [&mut p.a, &mut p.b])
    }

    pub fn tensors(&self) -> impl Iterator<Item = &Vec<T>> {
        self.pairs().flat_map(|p| [&p.a, &p.b])
    }

    pub fn parameters(&self) -> usize {
        self.tensors().map(Vec::len).sum()
    }

    fn scale(&self) -> T {
        T::of(self.alpha as f64 / self.rank as f64)
    }
}

/// One packed sequence: its tokens, where its documents start, and the
/// `[from, to)` ranges of positions whose tokens are targets.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub docs: Vec<usize>,
    pub loss: Vec<[usize; 2]>,
}

impl Sequence {
    /// Per position, its document's first position.
    fn firsts(&self) -> Vec<usize> {
        let mut first = vec![0; self.tokens.len()];
        let mut starts = self.docs.clone();
        starts.sort_unstable();
        for (j, &s) in starts.iter().enumerate() {
            let end = starts.get(j + 1).copied().unwrap_or(self.tokens.len());
            first[s.min(self.tokens.len())..end.min(self.tokens.len())].fill(s);
        }
        first
    }

    /// (position whose logits predict, target token) pairs.
    pub fn targets(&self) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        for &[from, to] in &self.loss {
            for i in from.max(1)..to.min(self.tokens.len()) {
                out.push((i - 1, self.tokens[i]));
            }
        }
        out
    }
}

/// A layer's forward values the backward needs.
struct Saved<T> {
    x: Vec<T>,
    h1: Vec<T>,
    rstd1: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    p: Vec<T>,
    o: Vec<T>,
    x2: Vec<T>,
    h2: Vec<T>,
    rstd2: Vec<T>,
    g: Vec<T>,
    u: Vec<T>,
    m: Vec<T>,
    /// Per target, `x·Aᵀ` (the LoRA's inner activations).
    lora: [Vec<T>; 7],
}

/// One sequence's RoPE angles and attention shape.
struct Ctx<'f, T> {
    rope: Rope<T>,
    attn: Attn<'f>,
}

/// The base model with an adapter, ready to run sequences.
pub struct Trainable<'b, T> {
    pub base: &'b Base,
    norms: Vec<(Vec<T>, Vec<T>)>,
    biases: Vec<[Option<Vec<T>>; 3]>,
    out_norm: Vec<T>,
    /// Vocabulary rows per tile of the output head.
    pub tile_rows: usize,
    /// Run the base products forward on the CPU backend's own mat-mul
    /// kernels (in f32), so that training sees the numbers the served
    /// model computes, activations rounded to 8 bits for the quantized
    /// types as inference rounds them; the backward passes gradients
    /// through that rounding unchanged (straight-through). Off for the
    /// finite-difference checks (rounding is piecewise constant).
    pub kernels: bool,
    /// Bytes one sequence's layer insides may take before the backward
    /// pass recomputes them instead (each layer's input is kept either way).
    pub activation_budget: usize,
    /// Bytes the output head's logits for one sequence may take to be kept
    /// from the log-sum-exp pass for the gradient pass (else computed twice).
    pub logits_budget: usize,
    /// The dequantized base matrices, kept once read, where all of them fit
    /// the dense budget given to [`Trainable::with_budgets`].
    dense: HashMap<String, OnceLock<Vec<T>>>,
}

/// Full training's gradients (and parameters): every tensor of the model
/// by its GGUF name, in f32 or f64, the same shapes as the file's.
pub type Dense<T> = BTreeMap<String, Vec<T>>;

/// Where the backward pass adds gradients: the adapter's pairs, and in
/// full training every tensor's.
struct Sink<'g, T> {
    adapter: Option<&'g mut Adapter<T>>,
    full: Option<&'g mut Dense<T>>,
}

impl<T> Sink<'_, T> {
    fn full(&mut self, name: &str) -> Option<&mut Vec<T>> {
        self.full.as_deref_mut().and_then(|d| d.get_mut(name))
    }
}

/// A layer's forward pass as the backward pass finds it: all it needs, or
/// only its input.
enum Kept<T> {
    Saved(Box<Saved<T>>),
    Input(Vec<T>),
}

impl<T> Saved<T> {
    fn bytes(&self) -> usize {
        let n: usize = [
            &self.x,
            &self.h1,
            &self.rstd1,
            &self.q,
            &self.k,
            &self.v,
            &self.p,
            &self.o,
            &self.x2,
            &self.h2,
            &self.rstd2,
            &self.g,
            &self.u,
            &self.m,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>()
            + self.lora.iter().map(Vec::len).sum::<usize>();
        n * std::mem::size_of::<T>()
    }
}

/// The default budgets: 512 MiB of activations, 64 MiB of logits, 1 GiB
/// of dense weights (SmolLM2-135M: about 330 MiB of activations at 256
/// tokens, 48 MiB of logits, 530 MiB of weights; the file is 94 MiB).
pub const ACTIVATION_BUDGET: usize = 512 << 20;
pub const LOGITS_BUDGET: usize = 64 << 20;
pub const DENSE_BUDGET: usize = 1 << 30;

impl<'b, T: Float> Trainable<'b, T> {
    pub fn new(base: &'b Base) -> Trainable<'b, T> {
        Trainable::with_budgets(base, ACTIVATION_BUDGET, LOGITS_BUDGET, DENSE_BUDGET)
    }

    /// [`Trainable::new`] with other memory budgets (bytes): 0 keeps
    /// nothing (every layer recomputed, logits computed twice, matrices
    /// dequantized at every use).
    pub fn with_budgets(
        base: &'b Base,
        activations: usize,
        logits: usize,
        dense: usize,
    ) -> Trainable<'b, T> {
        let cfg = &base.cfg;
        let norms = (0..cfg.n_layer)
            .map(|l| {
                (
                    base.vector(&format!("blk.{l}.attn_norm.weight")),
                    base.vector(&format!("blk.{l}.ffn_norm.weight")),
                )
            })
            .collect();
        let biases = (0..cfg.n_layer)
            .map(|l| {
                std::array::from_fn(|t| {
                    cfg.qkv_bias
                        .then(|| base.vector(&format!("blk.{l}.{}.bias", TARGETS[t])))
                })
            })
            .collect();
        // Tiles of the output head of about 16 MiB.
        let tile_rows = ((16 << 20) / (cfg.n_embd * std::mem::size_of::<T>())).clamp(64, 16384);
        let mut names: Vec<String> = (0..cfg.n_layer)
            .flat_map(|l| TARGETS.iter().map(move |t| format!("blk.{l}.{t}.weight")))
            .collect();
        names.push(base.output_name().to_string());
        let bytes: usize = names
            .iter()
            .map(|n| {
                let w = base.weight(n);
                w.rows * w.cols * std::mem::size_of::<T>()
            })
            .sum();
        let dense = if bytes <= dense {
            names.into_iter().map(|n| (n, OnceLock::new())).collect()
        } else {
            HashMap::new()
        };
        Trainable {
            base,
            norms,
            biases,
            out_norm: base.vector("output_norm.weight"),
            tile_rows,
            kernels: true,
            activation_budget: activations,
            logits_budget: logits,
            dense,
        }
    }

    /// Full training: every tensor of the model a parameter, an f32 (or
    /// f64) copy dequantized from the file and updated in place
    /// ([`Trainable::params_mut`]); products on the dense path (`kernels`
    /// off: the parameters are not in a kernel's format), every layer's
    /// inside and the logits kept.
    pub fn full(base: &'b Base) -> Trainable<'b, T> {
        let mut m = Trainable::with_budgets(base, usize::MAX, usize::MAX, 0);
        m.kernels = false;
        let mut names: Vec<String> = (0..base.cfg.n_layer)
            .flat_map(|l| TARGETS.iter().map(move |t| format!("blk.{l}.{t}.weight")))
            .collect();
        names.push("token_embd.weight".into());
        if !base.cfg.tied_output {
            names.push("output.weight".into());
        }
        m.dense = names
            .into_iter()
            .map(|n| {
                let cell = OnceLock::new();
                let _ = cell.set(base.weight(&n).dense());
                (n, cell)
            })
            .collect();
        m
    }

    /// Full training's parameters by their GGUF names, in name order: the
    /// matrices, embeddings, norms and biases.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Vec<T>)> {
        let mut out: Vec<(String, &mut Vec<T>)> = Vec::new();
        for (name, cell) in self.dense.iter_mut() {
            if let Some(v) = cell.get_mut() {
                out.push((name.clone(), v));
            }
        }
        for (l, (attn, ffn)) in self.norms.iter_mut().enumerate() {
            out.push((format!("blk.{l}.attn_norm.weight"), attn));
            out.push((format!("blk.{l}.ffn_norm.weight"), ffn));
        }
        out.push(("output_norm.weight".into(), &mut self.out_norm));
        for (l, biases) in self.biases.iter_mut().enumerate() {
            for (t, b) in biases.iter_mut().enumerate() {
                if let Some(b) = b {
                    out.push((format!("blk.{l}.{}.bias", TARGETS[t]), b));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Zeros shaped as every parameter of full training, by name.
    pub fn zero_grads(&mut self) -> Dense<T> {
        self.params_mut()
            .into_iter()
            .map(|(n, v)| (n, vec![T::zero(); v.len()]))
            .collect()
    }

    /// Tensor `name` dequantized: kept from its first use where the dense
    /// budget allows, else made now.
    fn dense(&self, name: &str) -> Cow<'_, [T]> {
        match self.dense.get(name) {
            Some(cell) => Cow::Borrowed(cell.get_or_init(|| self.base.weight(name).dense())),
            None => Cow::Owned(self.base.weight(name).dense()),
        }
    }

    /// `x (t × cols) · Wᵀ` for tensor `name`: on the CPU backend's kernels
    /// where [`Trainable::kernels`] asks for them, else over the dense matrix.
    fn product(&self, name: &str, x: &[T]) -> Vec<T> {
        let w = self.base.weight(name);
        if self.kernels
            && let Some(y) = T::kernel_product(w.dtype, w.data, w.rows, w.cols, x)
        {
            return y;
        }
        let t = x.len() / w.cols;
        let mut y = vec![T::zero(); t * w.rows];
        gemm(
            Op::N,
            Op::T,
            t,
            w.rows,
            w.cols,
            T::one(),
            x,
            &self.dense(name),
            T::zero(),
            &mut y,
        );
        y
    }

    fn eps(&self) -> f64 {
        self.base.cfg.norm_eps as f64
    }

    /// `x·Wᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ` for layer `l`'s projection `target`;
    /// returns the output and `x·Aᵀ`.
    fn project(
        &self,
        adapter: &Adapter<T>,
        l: usize,
        target: usize,
        x: &[T],
        t: usize,
    ) -> (Vec<T>, Vec<T>) {
        let name = format!("blk.{l}.{}.weight", TARGETS[target]);
        let w = self.base.weight(&name);
        let (rows, cols) = (w.rows, w.cols);
        let mut y = self.product(&name, x);
        if let Some(Some(b)) = self.biases[l].get(target) {
            for row in y.chunks_exact_mut(rows) {
                for (y, &b) in row.iter_mut().zip(b) {
                    *y += b;
                }
            }
        }
        let mut u = Vec::new();
        if let Some(p) = &adapter.layers[l][target] {
            let r = adapter.rank;
            u = vec![T::zero(); t * r];
            gemm(
                Op::N,
                Op::T,
                t,
                r,
                cols,
                T::one(),
                x,
                &p.a,
                T::zero(),
                &mut u,
            );
            gemm(
                Op::N,
                Op::T,
                t,
                rows,
                r,
                adapter.scale(),
                &u,
                &p.b,
                T::one(),
                &mut y,
            );
        }
        (y, u)
    }

    /// Adds to `dx` the gradient through [`Trainable::project`] and to
    /// `sink` the pair's (and in full training the matrix's and bias's).
    #[allow(clippy::too_many_arguments)]
    fn project_back(
        &self,
        adapter: &Adapter<T>,
        sink: &mut Sink<T>,
        l: usize,
        target: usize,
        x: &[T],
        u: &[T],
        dy: &[T],
        t: usize,
        dx: &mut [T],
    ) {
        let name = format!("blk.{l}.{}.weight", TARGETS[target]);
        let w = self.base.weight(&name);
        let (rows, cols) = (w.rows, w.cols);
        gemm(
            Op::N,
            Op::N,
            t,
            cols,
            rows,
            T::one(),
            dy,
            &self.dense(&name),
            T::one(),
            dx,
        );
        if let Some(dw) = sink.full(&name) {
            // dW += dyᵀ·x
            gemm(Op::T, Op::N, rows, cols, t, T::one(), dy, x, T::one(), dw);
        }
        if let Some(db) = sink.full(&format!("blk.{l}.{}.bias", TARGETS[target])) {
            for row in dy.chunks_exact(rows) {
                for (b, &d) in db.iter_mut().zip(row) {
                    *b += d;
                }
            }
        }
        let pair = (adapter.layers[l][target].as_ref())
            .zip((sink.adapter.as_deref_mut()).and_then(|g| g.layers[l][target].as_mut()));
        if let Some((p, gp)) = pair {
            let (r, s) = (adapter.rank, adapter.scale());
            // dB += s·dyᵀ·u; du = s·dy·B; dA += duᵀ·x; dx += du·A
            gemm(Op::T, Op::N, rows, r, t, s, dy, u, T::one(), &mut gp.b);
            let mut du = vec![T::zero(); t * r];
            gemm(Op::N, Op::N, t, r, rows, s, dy, &p.b, T::zero(), &mut du);
            gemm(
                Op::T,
                Op::N,
                r,
                cols,
                t,
                T::one(),
                &du,
                x,
                T::one(),
                &mut gp.a,
            );
            gemm(Op::N, Op::N, t, cols, r, T::one(), &du, &p.a, T::one(), dx);
        }
    }

    fn rope(&self, seq_firsts: &[usize]) -> Rope<T> {
        let cfg = &self.base.cfg;
        let positions: Vec<usize> = seq_firsts.iter().enumerate().map(|(i, &f)| i - f).collect();
        Rope::new(
            &positions,
            cfg.n_rot,
            cfg.rope_freq_base,
            cfg.rope_freq_scale,
            cfg.rope_mode & KILN_ROPE_NEOX != 0,
        )
    }

    /// Layer `l` on `x`: its output, and what its backward needs.
    fn layer(&self, adapter: &Adapter<T>, l: usize, x: Vec<T>, ctx: &Ctx<T>) -> (Vec<T>, Saved<T>) {
        let (rope, attn) = (&ctx.rope, &ctx.attn);
        let cfg = &self.base.cfg;
        let t = attn.t;
        let (h1, rstd1) = ops::rms_norm(&x, &self.norms[l].0, self.eps());
        let (mut q, uq) = self.project(adapter, l, Q, &h1, t);
        let (mut k, uk) = self.project(adapter, l, K, &h1, t);
        let (mut v, uv) = self.project(adapter, l, V, &h1, t);
        rope.apply(&mut q, cfg.head_dim, false);
        rope.apply(&mut k, cfg.head_dim, false);
        if self.kernels {
            // As inference's cache holds them (f16).
            round_f16(&mut k);
            round_f16(&mut v);
        }
        let (o, p) = attn.forward(&q, &k, &v);
        let (a, uo) = self.project(adapter, l, O, &o, t);
        let x2: Vec<T> = x.iter().zip(&a).map(|(&x, &a)| x + a).collect();
        let (h2, rstd2) = ops::rms_norm(&x2, &self.norms[l].1, self.eps());
        let (g, ug) = self.project(adapter, l, GATE, &h2, t);
        let (u, uu) = self.project(adapter, l, UP, &h2, t);
        let m = ops::swiglu(&g, &u);
        let (d, ud) = self.project(adapter, l, DOWN, &m, t);
        let out = x2.iter().zip(&d).map(|(&x, &d)| x + d).collect();
        let saved = Saved {
            x,
            h1,
            rstd1,
            q,
            k,
            v,
            p,
            o,
            x2,
            h2,
            rstd2,
            g,
            u,
            m,
            lora: [uq, uk, uv, uo, ug, uu, ud],
        };
        (out, saved)
    }

    /// The gradient of layer `l`'s input from its output's, adding the
    /// parameters' gradients to `sink`.
    fn layer_back(
        &self,
        adapter: &Adapter<T>,
        sink: &mut Sink<T>,
        l: usize,
        s: &Saved<T>,
        dout: Vec<T>,
        ctx: &Ctx<T>,
    ) -> Vec<T> {
        let (rope, attn) = (&ctx.rope, &ctx.attn);
        let cfg = &self.base.cfg;
        let t = attn.t;
        let e = cfg.n_embd;
        // out = x2 + down(m)
        let mut dm = vec![T::zero(); s.m.len()];
        self.project_back(
            adapter,
            sink,
            l,
            DOWN,
            &s.m,
            &s.lora[DOWN],
            &dout,
            t,
            &mut dm,
        );
        let (dg, du) = ops::swiglu_back(&s.g, &s.u, &dm);
        let mut dh2 = vec![T::zero(); t * e];
        self.project_back(
            adapter,
            sink,
            l,
            GATE,
            &s.h2,
            &s.lora[GATE],
            &dg,
            t,
            &mut dh2,
        );
        self.project_back(adapter, sink, l, UP, &s.h2, &s.lora[UP], &du, t, &mut dh2);
        let mut dx2 = dout;
        ops::rms_norm_back(&s.x2, &self.norms[l].1, &s.rstd2, &dh2, &mut dx2);
        if let Some(dw) = sink.full(&format!("blk.{l}.ffn_norm.weight")) {
            ops::rms_norm_back_weight(&s.x2, &s.rstd2, &dh2, dw);
        }
        // x2 = x + output(attention(rope(q), rope(k), v))
        let mut do_ = vec![T::zero(); s.o.len()];
        self.project_back(adapter, sink, l, O, &s.o, &s.lora[O], &dx2, t, &mut do_);
        let (mut dq, mut dk, dv) = attn.backward(&s.q, &s.k, &s.v, &s.p, &do_);
        rope.apply(&mut dq, cfg.head_dim, true);
        rope.apply(&mut dk, cfg.head_dim, true);
        let mut dh1 = vec![T::zero(); t * e];
        self.project_back(adapter, sink, l, Q, &s.h1, &s.lora[Q], &dq, t, &mut dh1);
        self.project_back(adapter, sink, l, K, &s.h1, &s.lora[K], &dk, t, &mut dh1);
        self.project_back(adapter, sink, l, V, &s.h1, &s.lora[V], &dv, t, &mut dh1);
        let mut dx = dx2;
        ops::rms_norm_back(&s.x, &self.norms[l].0, &s.rstd1, &dh1, &mut dx);
        if let Some(dw) = sink.full(&format!("blk.{l}.attn_norm.weight")) {
            ops::rms_norm_back_weight(&s.x, &s.rstd1, &dh1, dw);
        }
        dx
    }

    /// The token embeddings of `tokens`.
    fn embed(&self, tokens: &[u32]) -> Vec<T> {
        let w = self.base.weight("token_embd.weight");
        let e = w.cols;
        let mut x = vec![T::zero(); tokens.len() * e];
        // Full training's parameters (or a kept dense copy), else the file.
        let dense = (self.dense.get("token_embd.weight")).and_then(|c| c.get());
        for (row, &tok) in x.chunks_exact_mut(e).zip(tokens) {
            let tok = tok as usize;
            match dense {
                Some(d) => row.copy_from_slice(&d[tok * e..(tok + 1) * e]),
                None => w.rows_into(tok, tok + 1, row),
            }
        }
        x
    }

    /// The logits of every position of `tokens` (for tests and the
    /// comparison with inference): t × vocab.
    pub fn logits(&self, adapter: &Adapter<T>, seq: &Sequence) -> Vec<T> {
        let (hf, _, _) = self.trunk(adapter, seq, false);
        self.product(self.base.output_name(), &hf)
    }

    /// Every layer forward, then the final norm: (its output, where
    /// `keep`, what each layer's backward pass will find, the final norm's
    /// input and 1/rms). The layers' insides are kept while all of them fit
    /// the activation budget (they are the same size in every layer).
    #[allow(clippy::type_complexity)]
    fn trunk(
        &self,
        adapter: &Adapter<T>,
        seq: &Sequence,
        keep: bool,
    ) -> (Vec<T>, Vec<Kept<T>>, (Vec<T>, Vec<T>)) {
        let firsts = seq.firsts();
        let ctx = self.ctx(&firsts);
        let n_layer = self.base.cfg.n_layer;
        let mut x = self.embed(&seq.tokens);
        let mut kept = Vec::new();
        for l in 0..n_layer {
            if !keep {
                x = self.layer(adapter, l, x, &ctx).0;
                continue;
            }
            let input = x.clone();
            let (out, saved) = self.layer(adapter, l, x, &ctx);
            kept.push(
                if saved.bytes().saturating_mul(n_layer) <= self.activation_budget {
                    Kept::Saved(Box::new(saved))
                } else {
                    Kept::Input(input)
                },
            );
            x = out;
        }
        let (hf, rstd) = ops::rms_norm(&x, &self.out_norm, self.eps());
        (hf, kept, (x, rstd))
    }

    /// What every layer of one sequence shares: RoPE's angles at each
    /// token's position in its document, and attention's shape.
    fn ctx<'f>(&self, firsts: &'f [usize]) -> Ctx<'f, T> {
        let cfg = &self.base.cfg;
        Ctx {
            rope: self.rope(firsts),
            attn: Attn {
                t: firsts.len(),
                heads: cfg.n_head,
                kv_heads: cfg.n_head_kv,
                head_dim: cfg.head_dim,
                first: firsts,
            },
        }
    }

    /// The summed cross-entropy of `seq`'s targets (and their count); with
    /// `grads`, adds `scale ×` its gradient with respect to the adapter.
    pub fn loss(
        &self,
        adapter: &Adapter<T>,
        seq: &Sequence,
        grads: Option<(&mut Adapter<T>, T)>,
    ) -> (f64, usize) {
        let grads = grads.map(|(g, scale)| {
            let sink = Sink {
                adapter: Some(g),
                full: None,
            };
            (sink, scale)
        });
        self.loss_with(adapter, seq, grads)
    }

    /// Full training ([`Trainable::full`]): [`Trainable::loss`] with
    /// `scale ×` the gradient of every tensor added to `grads` (from
    /// [`Trainable::zero_grads`]).
    pub fn loss_full(&self, seq: &Sequence, grads: &mut Dense<T>, scale: T) -> (f64, usize) {
        let none = Adapter::new(self.base, 1, 1.0, &[], 0);
        let sink = Sink {
            adapter: None,
            full: Some(grads),
        };
        self.loss_with(&none, seq, Some((sink, scale)))
    }

    fn loss_with(
        &self,
        adapter: &Adapter<T>,
        seq: &Sequence,
        grads: Option<(Sink<T>, T)>,
    ) -> (f64, usize) {
        let targets = seq.targets();
        if targets.is_empty() {
            return (0.0, 0);
        }
        let e = self.base.cfg.n_embd;
        let keep = grads.is_some();
        let (hf, kept, (x_last, rstd)) = self.trunk(adapter, seq, keep);
        let mut h = Vec::with_capacity(targets.len() * e);
        for &(pos, _) in &targets {
            h.extend_from_slice(&hf[pos * e..(pos + 1) * e]);
        }
        let toks: Vec<u32> = targets.iter().map(|&(_, t)| t).collect();
        let out = self.base.output();
        let name = self.base.output_name();
        // The kept dense matrix's rows, else only this tile's dequantized.
        let weights = |v0: usize, v1: usize| -> Cow<'_, [T]> {
            match self.dense.get(name) {
                Some(cell) => {
                    Cow::Borrowed(&cell.get_or_init(|| out.dense())[v0 * out.cols..v1 * out.cols])
                }
                None => {
                    let mut w = vec![T::zero(); (v1 - v0) * out.cols];
                    out.rows_into(v0, v1, &mut w);
                    Cow::Owned(w)
                }
            }
        };
        let logits = |v0: usize, v1: usize, h: &[T]| -> Vec<T> {
            let tile = out.slice(v0, v1);
            if self.kernels
                && let Some(y) = T::kernel_product(tile.dtype, tile.data, tile.rows, tile.cols, h)
            {
                return y;
            }
            let n = h.len() / out.cols;
            let mut y = vec![T::zero(); n * (v1 - v0)];
            let w = weights(v0, v1);
            gemm(
                Op::N,
                Op::T,
                n,
                v1 - v0,
                out.cols,
                T::one(),
                h,
                &w,
                T::zero(),
                &mut y,
            );
            y
        };
        let head = ops::Head {
            vocab: out.rows,
            tile_rows: self.tile_rows,
            keep_logits: self.logits_budget,
            logits: &logits,
            weights: &weights,
        };
        let Some((mut sink, scale)) = grads else {
            let loss = head.cross_entropy(&h, e, &toks, T::one(), None, None);
            return (loss, targets.len());
        };
        let mut dh = vec![T::zero(); h.len()];
        let dw = sink.full(name).map(|d| d.as_mut_slice());
        let loss = head.cross_entropy(&h, e, &toks, scale, Some(&mut dh), dw);
        let t = seq.tokens.len();
        let mut dhf = vec![T::zero(); t * e];
        for (j, &(pos, _)) in targets.iter().enumerate() {
            for (d, &g) in dhf[pos * e..(pos + 1) * e]
                .iter_mut()
                .zip(&dh[j * e..(j + 1) * e])
            {
                *d += g;
            }
        }
        let mut dx = vec![T::zero(); t * e];
        ops::rms_norm_back(&x_last, &self.out_norm, &rstd, &dhf, &mut dx);
        if let Some(dw) = sink.full("output_norm.weight") {
            ops::rms_norm_back_weight(&x_last, &rstd, &dhf, dw);
        }
        let firsts = seq.firsts();
        let ctx = self.ctx(&firsts);
        for (l, kept) in kept.into_iter().enumerate().rev() {
            let saved = match kept {
                Kept::Saved(saved) => *saved,
                Kept::Input(x) => self.layer(adapter, l, x, &ctx).1,
            };
            dx = self.layer_back(adapter, &mut sink, l, &saved, dx, &ctx);
        }
        if let Some(de) = sink.full("token_embd.weight") {
            for (row, &tok) in dx.chunks_exact(e).zip(&seq.tokens) {
                let tok = tok as usize;
                for (d, &g) in de[tok * e..(tok + 1) * e].iter_mut().zip(row) {
                    *d += g;
                }
            }
        }
        (loss, targets.len())
    }
}
