//! Fast kernels beside the scalar reference in [`crate::ops`]: the same
//! semantics, chosen per op at run time, each path tested against the
//! reference on random inputs of odd sizes.
//!
//! The instruction set is picked once from the CPU's features
//! ([`Isa::detect`]); `KILN_CPU_ISA=reference|scalar|neon|avx2|avxvnni|avx512` forces
//! a lower path (never one the CPU lacks), which is how the tests cover
//! every path the machine has; `reference` turns the fast kernels off. An op with no fast path here runs the reference.
//!
//! Quantized matrix products follow ggml: activations are quantized on the
//! fly to the weights' dot-product type (Q8_0 for Q4_0/Q5_0/Q8_0), and the inner
//! products are integer, scaled per block. The reference rounds activations
//! the same way; for the Q8 family it adds the block terms in
//! `kiln_blocks::q8_dot`'s order, as every kernel does (the same bits), and
//! for the K-quants in f64.
//!
//! Inside a `#[target_feature]` function, intrinsics stay out of closures
//! handed to `map`, `from_fn`, `fold` and the like: the closure is called
//! from generic code compiled without those features, so LLVM will not
//! inline it, and every call passes 512-bit values through memory (an F16
//! tile lost 14 % of prompt time that way). Plain loops, or closures
//! called directly, are inlined.

/// Calls `$kernel::<R>(args…)` for the activation rows `m0..` in groups of
/// four (`R` = 4, then the 1–3 left), `m0` bound for the arguments: the
/// lane-wise GEMMs keep `R` rows' sums in registers, so `R` is a constant.
/// `$ahead` (an [`AskAhead`]) asks for its share before each call.
macro_rules! in_groups_of_four {
    ($len:expr, $m0:ident => $kernel:ident($($arg:expr),* $(,)?); $ahead:expr) => {{
        let len = $len;
        let ahead: &mut crate::kernels::AskAhead = $ahead;
        let mut $m0 = 0;
        while $m0 < len {
            ahead.step();
            let left = len - $m0;
            match left {
                1 => $kernel::<1>($($arg),*),
                2 => $kernel::<2>($($arg),*),
                3 => $kernel::<3>($($arg),*),
                _ => $kernel::<4>($($arg),*),
            }
            $m0 += left.min(4);
        }
    }};
}

/// Runs `$block!(b, partial)` for the blocks `0..$nb` in turn, block `b`
/// into `$p[b mod 4]`: how the Q8-family GEMMs (`q8.rs`) follow
/// `kiln_blocks::q8_dot`'s order. Unrolled by four, each partial named, so
/// that each is a register of its own rather than an array indexed at run
/// time (which the compiler keeps in memory).
macro_rules! in_four_partials {
    ($nb:expr, $block:ident, [$a0:ident, $a1:ident, $a2:ident, $a3:ident]) => {{
        let nb = $nb;
        let mut b = 0;
        while b + 4 <= nb {
            $block!(b, $a0);
            $block!(b + 1, $a1);
            $block!(b + 2, $a2);
            $block!(b + 3, $a3);
            b += 4;
        }
        if b < nb {
            $block!(b, $a0);
        }
        if b + 1 < nb {
            $block!(b + 1, $a1);
        }
        if b + 2 < nb {
            $block!(b + 2, $a2);
        }
    }};
}

/// `by_rows!(n => kernel[C…](args…))` calls `x86::kernel::<R, C…>(args…)` with `R` the number of activation
/// rows (1 to 4): the row kernels keep each row's sums in registers.
macro_rules! by_rows {
    ($rows:expr => $kernel:ident[$($c:tt),*]($($arg:expr),*)) => {
        match $rows {
            1 => x86::$kernel::<1 $(, $c)*>($($arg),*),
            2 => x86::$kernel::<2 $(, $c)*>($($arg),*),
            3 => x86::$kernel::<3 $(, $c)*>($($arg),*),
            _ => x86::$kernel::<4 $(, $c)*>($($arg),*),
        }
    };
}

/// Runs `$kernel` (a [`gemm_kinds!`] kernel) for every half of 8 weight
/// rows of `$n` and every group of activation rows, as
/// [`in_groups_of_four!`].
macro_rules! in_each_half {
    ($n:expr, $xs:expr => $kernel:ident($scratch:expr, $nb:expr, $out:expr); $ahead:expr) => {{
        const HALF: usize = 8;
        let n = $n;
        let ahead: &mut crate::kernels::AskAhead = $ahead;
        for h in 0..n.div_ceil(HALF) {
            in_groups_of_four!(
                $xs.len(), m0 => $kernel($scratch, &$xs[m0..], $nb, h, m0, $out); &mut *ahead
            )
        }
    }};
}

// How the AVX2 lane-wise GEMMs (`q8.rs`, `kquant.rs`) add a group's
// products (`step(sums, codes, activations)`) and a run of them, kept as
// `CHAINS` partial sums `a`, `b` (groups by parity: `vpdpbusd`
// accumulates in place, and one chain of 8 per row left its 5-cycle
// latency exposed with only 4 rows in flight), scaled per lane, into the
// totals (`scale(total, a, b, scales)`): as i16s widened by `vpmaddwd`
// against the scales stored twice as i16s (ones for the Q8 types), or
// (AVX-VNNI) as i32s multiplied by the scales stored as i32s (or added:
// `sum_i32`). Closures written inside the `#[target_feature]` wrappers
// (`gemm_kinds!`), so they have the wrappers' features and are inlined
// into the kernels.
macro_rules! fold_i16 {
    () => {
        |s, w, x| _mm256_add_epi16(s, _mm256_maddubs_epi16(w, x))
    };
}
macro_rules! fold_signed {
    () => {
        |s, w, x| {
            _mm256_add_epi16(
                s,
                _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
            )
        }
    };
}
macro_rules! scale_i16 {
    () => {
        |t, a, b, sc| _mm256_add_epi32(t, _mm256_madd_epi16(_mm256_add_epi16(a, b), sc))
    };
}
macro_rules! dpbusd {
    () => {
        |s, w, x| _mm256_dpbusd_avx_epi32(s, w, x)
    };
}
macro_rules! scale_i32 {
    () => {
        |t, a, b, sc| _mm256_add_epi32(t, _mm256_mullo_epi32(_mm256_add_epi32(a, b), sc))
    };
}

macro_rules! sum_i32 {
    () => {
        |t, a, b, _| _mm256_add_epi32(t, _mm256_add_epi32(a, b))
    };
}

/// The AVX2 lane-wise GEMMs' kernels by shape: `$scratch, $row;` then
/// `name: features => body::<C…>(step, scale);`, each a
/// `#[target_feature]` function whose closures (`fold_i16!`…) get its
/// features.
macro_rules! gemm_kinds {
    ($scratch:ty, $row:ty; $($(#[$doc:meta])* $name:ident: $features:literal => $body:ident::<$($c:literal),*>($step:ident, $scale:ident);)*) => {$(
        $(#[$doc])*
        /// # Safety
        /// As the body's, and the CPU has the features named.
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(
            scratch: &$scratch,
            xs: &[&$row],
            nb: usize,
            h: usize,
            m0: usize,
            out: &mut crate::kernels::Tile,
        ) {
            // SAFETY: the caller's contract.
            unsafe { $body::<R, $($c),*>(scratch, xs, nb, h, m0, out, $step!(), $scale!()) }
        }
    )*};
}

mod activations;
mod attention;
mod float;
mod kquant;
mod lanes;
#[cfg(target_arch = "aarch64")]
mod neon;
mod q8;
mod threads;
mod topology;

pub use activations::row_fns;
pub use q8::Q8Row;
pub use threads::{parallel_for, set_threads, threads, with_threads};
pub use topology::default_threads;

use crate::ops::View;
use float::Float;
use kiln_plugin_api::{DType, OpKind};
use std::sync::OnceLock;

/// The best path a CPU of this architecture has without optional
/// features: NEON is part of the aarch64 base instruction set.
#[cfg(target_arch = "aarch64")]
const BASE: Isa = Isa::Neon;
#[cfg(not(target_arch = "aarch64"))]
const BASE: Isa = Isa::Scalar;

/// Whether the CPU has AVX-VNNI (the VEX-encoded 256-bit `vpdpbusd`).
fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avxvnni");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// An instruction-set path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// No fast kernels: every op runs the scalar reference (`ops::run`).
    Reference,
    /// Portable integer kernels (any CPU).
    Scalar,
    /// aarch64: NEON block sums for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL,
    /// Q2_K, Q3_K and IQ4_XS, F16/BF16 rows and tiles (`neon.rs`), the
    /// portable kernels for the rest.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// AVX2 + FMA (+ F16C).
    Avx2,
    /// The AVX2 path with AVX-VNNI's 256-bit integer dot products
    /// (`vpdpbusd` in VEX form: Alder Lake and later Intel cores, Zen 5):
    /// the 8-bit products of the Q8 and K-quant kernels in one instruction
    /// instead of three, same bits.
    AvxVnni,
    /// AVX-512 F/BW/VL with VNNI integer dot products.
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Reference => "reference",
            Isa::Scalar => "scalar",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512 => "avx512",
        }
    }

    /// The best path this CPU runs (detected once: the row loops of
    /// `activations.rs` ask for every row).
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(Isa::detect_now)
    }

    fn detect_now() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            if avx512 {
                return Isa::Avx512;
            }
            if avx2 && has_avx_vnni() {
                return Isa::AvxVnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        BASE
    }

    /// Every path this CPU runs, lowest first.
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        let mut all = vec![Isa::Scalar];
        #[cfg(target_arch = "aarch64")]
        all.push(Isa::Neon);
        #[cfg(target_arch = "x86_64")]
        all.extend([Isa::Avx2, Isa::AvxVnni, Isa::Avx512]);
        all.retain(|i| *i <= best && (*i != Isa::AvxVnni || has_avx_vnni()));
        all
    }

    /// The path in use: [`Isa::detect`], lowered by `KILN_CPU_ISA`.
    pub fn current() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::detect();
            match std::env::var("KILN_CPU_ISA").ok().as_deref() {
                Some("reference") => Isa::Reference,
                Some("scalar") => Isa::Scalar,
                #[cfg(target_arch = "aarch64")]
                Some("neon") => best.min(Isa::Neon),
                Some("avx2") => best.min(Isa::Avx2),
                // An AVX-512 CPU may lack AVX-VNNI (Zen 4, Ice Lake).
                Some("avxvnni") if has_avx_vnni() => best.min(Isa::AvxVnni),
                Some("avxvnni") => {
                    let isa = best.min(Isa::Avx2);
                    eprintln!(
                        "kiln: KILN_CPU_ISA=avxvnni, but this CPU has no AVX-VNNI; using {}",
                        isa.name()
                    );
                    isa
                }
                Some("avx512") | None | Some("") => best,
                Some(other) => {
                    eprintln!(
                        "kiln: KILN_CPU_ISA={other} is not one of reference, scalar, neon, avx2, avxvnni, avx512; using {}",
                        best.name()
                    );
                    best
                }
            }
        })
    }
}

/// The layout the kernels want weights of `dtype` in for matrix
/// products, which a host may repack them into at load time
/// ([`kiln_plugin_api::interleave`]): Q5_0 rows interleaved (Q5_0X16)
/// where AVX-512 VNNI runs them, whose decode kernel loads each field
/// whole instead of gathering it (about 1.6× the Q5_0 kernel); Q4_0 rows
/// (Q4_0X16) there and on AVX2, whose decode kernels then need no
/// gathers (AVX-512) or per-block horizontal sums (AVX2); every other
/// type as it is. Other paths run the interleaved layouts too, unpacking
/// each row first, so a repacked model stays correct on any path, only
/// slower.
pub fn weight_layout(isa: Isa, dtype: DType) -> DType {
    match (isa, dtype) {
        (Isa::Avx512, DType::Q5_0) => DType::Q5_0X16,
        (Isa::Avx512 | Isa::Avx2 | Isa::AvxVnni, DType::Q4_0) => DType::Q4_0X16,
        _ => dtype,
    }
}

/// Runs `kind` with a fast kernel when one applies; `None` when the op
/// (or these operand types and layouts) has none, and the caller runs the
/// reference.
///
/// # Safety
/// As for [`crate::ops::run`], after [`crate::ops::check`] accepted the op.
pub unsafe fn run(
    isa: Isa,
    kind: OpKind,
    src: &[View],
    dst: &View,
    params: &[i32; 8],
) -> Option<()> {
    // SAFETY: the caller's contract.
    unsafe { run_after(isa, kind, src, dst, params, false) }
}

/// [`run`]; `x_kept`: the op is a product whose activations (`src[1]`)
/// hold what they held for the last product run on this thread, which
/// read the same view (`backend.rs`: a graph's consecutive products of
/// one tensor, Q, K and V or gate and up, none writing it). That product's
/// quantized rows are then used again rather than made anew.
///
/// # Safety
/// As for [`run`], and `x_kept` is true only as described.
pub unsafe fn run_after(
    isa: Isa,
    kind: OpKind,
    src: &[View],
    dst: &View,
    params: &[i32; 8],
    x_kept: bool,
) -> Option<()> {
    match kind {
        _ if isa == Isa::Reference => None,
        // SAFETY: the caller's contract.
        OpKind::MulMat => unsafe { mul_mat(isa, &src[0], &src[1], dst, x_kept) },
        // SAFETY: the caller's contract.
        OpKind::Attention => unsafe {
            attention::run(isa, src, dst, kiln_plugin_api::types::param_f32(params[0]))
        },
        OpKind::SoftMax
        | OpKind::Silu
        | OpKind::Scale
        | OpKind::Gelu
        | OpKind::RmsNorm
        | OpKind::Norm
        | OpKind::Rope
        | OpKind::Add
        | OpKind::Mul
        | OpKind::Cpy => {
            // SAFETY: the caller's contract.
            unsafe { rows_in_parallel(isa, kind, src, dst, params) }
        }
        _ => None,
    }
}

/// Runs a row-wise op's reference on the pool: the rows of one dimension
/// are split between the threads, each running [`crate::ops::run_with`]
/// on its slice (narrowed views) with `isa`'s row loops ([`row_fns`]),
/// so the results are the reference's bits.
/// A source is narrowed with `dst` when it has that dimension's extent
/// and left whole when it is broadcast along it (extent 1); a dimension
/// with any other broadcast, or RoPE's token dimension (its positions
/// are read by token index), is not split. An op too small to share, or
/// with no dimension to split, runs on this thread: with its vector row
/// loops where it has them (softmax, SiLU), else `None`.
///
/// # Safety
/// As for [`run`].
unsafe fn rows_in_parallel(
    isa: Isa,
    kind: OpKind,
    src: &[View],
    dst: &View,
    params: &[i32; 8],
) -> Option<()> {
    let fns = row_fns(isa);
    let has_row_fns = matches!(kind, OpKind::SoftMax | OpKind::Silu);
    let on_this_thread = || {
        has_row_fns.then(|| {
            // SAFETY: the caller's contract.
            unsafe { crate::ops::run_with(fns, kind, src, dst, params) }
                .expect("row-wise reference ops cannot fail after `check`")
        })
    };
    let ne = dst.desc.ne;
    let work: usize = ne.iter().product::<usize>() * if kind == OpKind::SoftMax { 8 } else { 1 };
    if threads() < 2 || work < 1 << 16 {
        return on_this_thread();
    }
    let dims: &[usize] = if kind == OpKind::Rope {
        &[1]
    } else {
        &[3, 2, 1]
    };
    let Some(d) = dims.iter().copied().find(|&d| {
        ne[d] > 1
            && src
                .iter()
                .all(|s| s.desc.ne[d] == ne[d] || s.desc.ne[d] == 1)
    }) else {
        return on_this_thread();
    };
    // On the stack: an op has at most four sources.
    let n_src = src.len();
    let mut sources = [SendView(*dst); 4];
    for (s, v) in sources.iter_mut().zip(src) {
        *s = SendView(*v);
    }
    let dst = SendView(*dst);
    threads::parallel_for(ne[d], work, &|range| {
        let narrow = |v: &View| {
            let mut v = *v;
            if v.desc.ne[d] == ne[d] {
                // SAFETY: rows range.start.. of dimension d are inside the
                // view (range ⊆ 0..ne[d]).
                v.data = unsafe { v.data.add(range.start * v.desc.nb[d]) };
                v.desc.ne[d] = range.len();
            }
            v
        };
        let part: [View; 4] = std::array::from_fn(|i| narrow(&sources[i].get()));
        let part = &part[..n_src];
        // SAFETY: the narrowed views cover parts of the caller's views,
        // each dst row written by one thread; `check` accepted the whole
        // op, and a row slice keeps every index the reference forms
        // inside its view (sources narrowed alike or broadcast).
        unsafe { crate::ops::run_with(fns, kind, part, &narrow(&dst.get()), params) }
            .expect("row-wise reference ops cannot fail after `check`");
    });
    Some(())
}

/// A view shared with the pool's threads (which write disjoint rows).
#[derive(Clone, Copy)]
struct SendView(View);

impl SendView {
    /// The view (a method, so that closures capture the wrapper).
    fn get(&self) -> View {
        self.0
    }
}
// SAFETY: as for `SendPtr`.
unsafe impl Sync for SendView {}
// SAFETY: as above.
unsafe impl Send for SendView {}

/// Whether a quantized mat-mul kernel exists for weights of `dtype`.
pub fn has_mul_mat(dtype: DType) -> bool {
    q8::takes(dtype)
        || matches!(
            dtype,
            DType::F16
                | DType::BF16
                | DType::F32
                | DType::Q2_K
                | DType::Q3_K
                | DType::Q4_K
                | DType::Q5_K
                | DType::Q6_K
                | DType::IQ4_XS
        )
}

/// The first (up to) four rows of `xs` that match `$pat` (`first`
/// being the first's), on the stack: unused slots repeat the first. A
/// macro rather than a generic function taking a picking closure: that
/// version cost about 10 % of Q4_0 decode (it runs once per weight row).
macro_rules! first_rows {
    ($xs:expr, $first:expr, $pat:pat => $row:expr) => {{
        let mut rows = [$first; 4];
        let mut n = 1;
        for p in $xs.iter().take(4).skip(1) {
            let $pat = p else { break };
            rows[n] = $row;
            n += 1;
        }
        (rows, n)
    }};
}

/// One activation row, prepared for the weights' dot product. Rows for
/// float weights live in one buffer for the whole product ([`FloatRows`]):
/// attention prepares thousands of short rows per product, and a pair of
/// allocations for each cost more than the product itself.
enum Prepared<'a> {
    Q8(Q8Row),
    Q8K(kquant::Q8KRow),
    /// For F16, BF16 or F32 weights: rounded as they are (to f16, to bf16,
    /// not at all), kept as f32.
    Float(&'a [f32]),
}

/// Every activation row of a product with float weights, rounded, in a
/// buffer kept from product to product ([`Workspace::floats`]).
struct FloatRows<'a> {
    k: usize,
    rounded: &'a mut Vec<f32>,
}

impl<'a> FloatRows<'a> {
    /// `rows` rows of `k` in `buffer` (grown where it is too small).
    fn new(buffer: &'a mut Vec<f32>, rows: usize, k: usize) -> FloatRows<'a> {
        buffer.clear();
        buffer.resize(rows * k, 0.0);
        FloatRows { k, rounded: buffer }
    }

    /// Row `i`.
    fn row(&self, i: usize) -> &[f32] {
        &self.rounded[i * self.k..][..self.k]
    }

    /// Where the pool's threads write the rows ([`FloatRowsWriter::set`]).
    fn writer(&mut self) -> FloatRowsWriter {
        FloatRowsWriter {
            k: self.k,
            rows: self.rounded.len() / self.k.max(1),
            rounded: SendPtr(self.rounded.as_mut_ptr().cast()),
        }
    }

    /// The rows as [`Prepared`] values.
    fn prepared(&self) -> Vec<Prepared<'_>> {
        let k = self.k;
        (0..self.rounded.len() / k)
            .map(|i| Prepared::Float(&self.rounded[i * k..][..k]))
            .collect()
    }
}

/// [`FloatRows`]' buffers, for disjoint rows written by the pool's
/// threads (the buffers outlive it and are not touched otherwise).
struct FloatRowsWriter {
    k: usize,
    rows: usize,
    rounded: SendPtr,
}

impl FloatRowsWriter {
    /// Row `i` of `x` rounded as the reference's `round_activations`
    /// does for `weights`.
    ///
    /// # Safety
    /// No other thread writes row `i` meanwhile, and the [`FloatRows`]
    /// lives on, untouched.
    unsafe fn set(&self, isa: Isa, weights: Float, i: usize, x: &[f32]) {
        assert!(i < self.rows);
        let k = self.k;
        // SAFETY: row i is inside both buffers (checked above), and this
        // thread alone uses it (the caller's contract).
        let v = unsafe {
            std::slice::from_raw_parts_mut(self.rounded.get().cast::<f32>().add(i * k), k)
        };
        weights.round_row(isa, x, v);
    }
}

/// Whether products with `weights` take Q8_K activation rows (the
/// K-quants and IQ4_XS), not Q8_0 ones.
const fn has_q8k_rows(weights: DType) -> bool {
    matches!(
        weights,
        DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS
    )
}

impl Prepared<'_> {
    /// A quantized row for `weights` (not float weights: [`FloatRows`]).
    fn new(weights: DType, k: usize) -> Prepared<'static> {
        if has_q8k_rows(weights) {
            Prepared::Q8K(kquant::Q8KRow::new(k))
        } else {
            Prepared::Q8(Q8Row::new(k, weights))
        }
    }

    /// Prepares `x` for `weights`; `batched`: the product has
    /// [`GEMM_MIN_ROWS`] rows or more, so a GEMM takes it (where the
    /// decode kernels may want Q8_0 rows lane-major: [`q8::wants_lanes`]).
    fn set(&mut self, isa: Isa, weights: DType, x: &[f32], batched: bool) {
        match self {
            Prepared::Q8(q) => {
                q.quantize(isa, x);
                if !batched && q8::wants_lanes(isa, weights) {
                    q.fill_lanes();
                }
            }
            Prepared::Q8K(q) => q.quantize(isa, x),
            Prepared::Float(_) => unreachable!("set through FloatRows"),
        }
    }

    #[inline(always)]
    fn q8(&self) -> Option<&Q8Row> {
        match self {
            Prepared::Q8(q) => Some(q),
            _ => None,
        }
    }

    #[inline(always)]
    fn q8k(&self) -> Option<&kquant::Q8KRow> {
        match self {
            Prepared::Q8K(q) => Some(q),
            _ => None,
        }
    }

    /// Rows for float weights, rounded, as f32.
    #[inline(always)]
    fn rounded(&self) -> Option<&[f32]> {
        match self {
            Prepared::Float(v) => Some(v),
            _ => None,
        }
    }

    /// Dots `w` with the first rows of `xs` (all of one variant: one
    /// weight type per op), into `out`; returns how many rows it did: up to
    /// four rows share one pass over `w`.
    fn dot_many(isa: Isa, dtype: DType, w: &[u8], xs: &[Prepared], out: &mut [f32; 4]) -> usize {
        match &xs[0] {
            Prepared::Q8(first) => {
                let (rows, n) = first_rows!(xs, first, Prepared::Q8(q) => q);
                q8::dot_rows(isa, dtype, w, &rows[..n], &mut out[..n]);
                n
            }
            Prepared::Q8K(first) => {
                let (rows, n) = first_rows!(xs, first, Prepared::Q8K(q) => q);
                kquant::row_dot(dtype)(isa, w, &rows[..n], &mut out[..n]);
                n
            }
            Prepared::Float(first) => {
                let (rows, n) = first_rows!(xs, *first, Prepared::Float(v) => *v);
                let float = Float::of(dtype).expect(ONE_VARIANT);
                float::dot_rows(isa, float, w, &rows[..n], &mut out[..n]);
                n
            }
        }
    }
}

/// Every prepared row is of the weights' variant ([`Prepared::new`]).
const ONE_VARIANT: &str = "one weight type per product prepares every row alike";

/// Every row as `pick` sees them, for the GEMMs: one list per slice of
/// `per_slice` rows.
fn all_rows<'a, 'b, T: ?Sized>(
    xs: &'a [Prepared<'b>],
    per_slice: usize,
    pick: impl Fn(&'a Prepared<'b>) -> Option<&'a T> + Copy,
) -> Vec<Vec<&'a T>> {
    xs.chunks(per_slice)
        .map(|c| c.iter().map(|p| pick(p).expect(ONE_VARIANT)).collect())
        .collect()
}

/// What products keep from one to the next on the thread that runs them
/// (an engine's): the slices, the quantized activation rows and the
/// rounded float rows, so that once they have grown to a model's sizes
/// a decode step's products allocate nothing.
#[derive(Default)]
struct Workspace {
    slices: Vec<Slice>,
    rows: KeptRows,
    floats: Vec<f32>,
    /// What `rows` were last quantized from, for [`run_after`]'s `x_kept`.
    made_from: Option<MadeFrom>,
}

/// A product's activations as its quantized rows depend on them: the
/// view (address and layout), the weights' type and the path.
#[derive(Clone, Copy, PartialEq)]
struct MadeFrom {
    x: usize,
    desc: kiln_plugin_api::Desc,
    weights: DType,
    isa: Isa,
}

/// Quantized activation rows for the Q8_0-activation types and for the
/// K-quants, kept apart: a model mixing them reuses both.
#[derive(Default)]
struct KeptRows {
    q8: Vec<Prepared<'static>>,
    q8k: Vec<Prepared<'static>>,
}

thread_local! {
    static WORKSPACE: std::cell::RefCell<Workspace> = std::cell::RefCell::default();
}

impl KeptRows {
    /// `n` quantized rows for `weights` of `k` columns, reusing the rows
    /// (and their buffers) kept for that kind of weights.
    fn prepare(&mut self, weights: DType, k: usize, n: usize) -> &mut [Prepared<'static>] {
        let rows = if has_q8k_rows(weights) {
            &mut self.q8k
        } else {
            &mut self.q8
        };
        for row in rows.iter_mut().take(n) {
            match row {
                Prepared::Q8(q) => q.reset(k, weights),
                Prepared::Q8K(q) => q.reset(k),
                Prepared::Float(_) => unreachable!("float rows are not kept here"),
            }
        }
        while rows.len() < n {
            rows.push(Prepared::new(weights, k));
        }
        &mut rows[..n]
    }

    /// The `n` rows that [`KeptRows::prepare`] last made for `weights`'
    /// kind, as they are.
    fn kept(&mut self, weights: DType, n: usize) -> &mut [Prepared<'static>] {
        let rows = if has_q8k_rows(weights) {
            &mut self.q8k
        } else {
            &mut self.q8
        };
        &mut rows[..n]
    }
}

/// `dst[m][n] = w[n] · x[m]` for float or quantized `w` (rows contiguous)
/// and f32 `x`, broadcast over
/// dimensions 2 and 3 as the reference does.
///
/// # Safety
/// As for [`run`].
unsafe fn mul_mat(isa: Isa, w: &View, x: &View, dst: &View, x_kept: bool) -> Option<()> {
    // Taken for the call: a product run while another is in hand (none
    // is) would find an empty workspace, not a borrowed one.
    let mut ws = WORKSPACE.with(|w| w.take());
    // SAFETY: the caller's contract.
    let done = unsafe { mul_mat_in(&mut ws, isa, w, x, dst, x_kept) };
    WORKSPACE.with(|w| *w.borrow_mut() = ws);
    done
}

/// [`mul_mat`] with `ws`'s buffers.
///
/// # Safety
/// As for [`run`].
unsafe fn mul_mat_in(
    ws: &mut Workspace,
    isa: Isa,
    w: &View,
    x: &View,
    dst: &View,
    x_kept: bool,
) -> Option<()> {
    // Forgotten until this product has made (or reused) its rows, so one
    // that returns early leaves nothing for a later one to trust.
    let made_before = ws.made_from.take();
    let (wd, xd, dd) = (&w.desc, &x.desc, &dst.desc);
    if !has_mul_mat(wd.dtype)
        || wd.nb[0] != wd.dtype.block_bytes()
        || xd.dtype != DType::F32
        || xd.nb[0] != 4
        || dd.dtype != DType::F32
        || dd.nb[0] != 4
    {
        return None;
    }
    let k = xd.ne[0];
    let (n_count, m_count) = (wd.ne[1], xd.ne[1]);
    let (r2, r3) = (xd.ne[2] / wd.ne[2], xd.ne[3] / wd.ne[3]);
    let row_bytes = wd.dtype.row_bytes(k)?;
    // Every (i2, i3) slice (attention: one per head) in one dispatch of
    // the pool for the activations and one for the products: a dispatch
    // per head cost attention half its time.
    let ne2 = xd.ne[2];
    let n_slices = ne2 * xd.ne[3];
    let Workspace {
        slices,
        rows,
        floats: rounded,
        made_from,
    } = ws;
    slices.clear();
    slices.extend((0..n_slices).map(|s| {
        let (i2, i3) = (s % ne2, s / ne2);
        Slice {
            w: SendPtr(w.data),
            w_base: (i2 / r2) * wd.nb[2] + (i3 / r3) * wd.nb[3],
            w_nb1: wd.nb[1],
            row_bytes,
            d: SendPtr(dst.data),
            d_base: i2 * dd.nb[2] + i3 * dd.nb[3],
            d_nb1: dd.nb[1],
        }
    }));
    let slices = &slices[..];
    let batched = m_count >= GEMM_MIN_ROWS;
    // Activation row m of slice s is `xq[s * m_count + m]`.
    let n_rows = n_slices * m_count;
    let float = Float::of(wd.dtype);
    let mut floats = FloatRows::new(rounded, if float.is_some() { n_rows } else { 0 }, k);
    let from = MadeFrom {
        x: x.data as usize,
        desc: *xd,
        weights: wd.dtype,
        isa,
    };
    // (Float weights' rounded rows are not kept.)
    let reuse = x_kept && float.is_none() && made_before == Some(from);
    *made_from = float.is_none().then_some(from);
    let prepared: &mut [Prepared] = match float {
        Some(_) => &mut [],
        None if reuse => rows.kept(wd.dtype, n_rows),
        None => rows.prepare(wd.dtype, k, n_rows),
    };
    let (xp, rows_p) = (SendPtr(x.data), SendPtr(prepared.as_mut_ptr().cast()));
    let floats_w = floats.writer();
    let make = |range: std::ops::Range<usize>| {
        for i in range {
            let (s, m) = (i / m_count, i % m_count);
            let off = m * xd.nb[1] + (s % ne2) * xd.nb[2] + (s / ne2) * xd.nb[3];
            // SAFETY: row (m, i2, i3) is inside x (the caller's contract),
            // and its k f32s are contiguous (nb[0] == 4); each prepared
            // row belongs to one thread.
            unsafe {
                let row = std::slice::from_raw_parts(xp.get().add(off).cast::<f32>(), k);
                if let Some(float) = float {
                    floats_w.set(isa, float, i, row);
                } else {
                    (*rows_p.get().cast::<Prepared>().add(i)).set(isa, wd.dtype, row, batched);
                }
            }
        }
    };
    if !reuse {
        threads::parallel_for(n_rows, n_rows * k, &make);
    }
    // The rows as `Prepared` values; float ones listed only where more
    // than one row per slice needs them (not for decode).
    let listed;
    let xq: &[Prepared] = match float {
        Some(_) if m_count > 1 => {
            listed = floats.prepared();
            &listed
        }
        Some(_) => &[],
        None => prepared,
    };
    let work = n_slices * n_count * m_count * k;
    // Each GEMM says where it runs.
    let gemm = match wd.dtype {
        d if q8::takes(d) => q8::has_gemm(isa, d),
        _ if float.is_some() => float::has_gemm(isa),
        d => kquant::has_gemm(isa, d),
    };
    if batched && gemm {
        match wd.dtype {
            d if q8::takes(d) => {
                let xs = all_rows(xq, m_count, Prepared::q8);
                gemm_groups::<q8::GemmScratch>(
                    slices,
                    n_count,
                    m_count,
                    work,
                    &|s, ws, sc, out| q8::gemm16(isa, wd.dtype, ws, &xs[s], sc, out),
                );
            }
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
                let xs = all_rows(xq, m_count, Prepared::q8k);
                gemm_groups::<kquant::GemmScratch>(
                    slices,
                    n_count,
                    m_count,
                    work,
                    &|s, ws, sc, out| kquant::gemm16(isa, wd.dtype, ws, &xs[s], sc, out),
                );
            }
            _ => {
                let xs = all_rows(xq, m_count, Prepared::rounded);
                let float = float.expect("a float type: every other has its arm");
                gemm_groups::<float::GemmScratch>(
                    slices,
                    n_count,
                    m_count,
                    work,
                    &|s, ws, sc, out| float::gemm16(isa, float, ws, &xs[s], sc, out),
                );
            }
        }
        return Some(());
    }
    if m_count == 1 {
        // Decode: each thread's rows of a slice in one loop, the kernel
        // chosen once (per-row dispatch had cost 7–10 % of decode).
        threads::parallel_for(n_slices * n_count, work, &|range| {
            let mut i = range.start;
            while i < range.end {
                let s = i / n_count;
                let end = range.end.min((s + 1) * n_count);
                let sl = &slices[s];
                let w = |n: usize| {
                    // SAFETY: weight row n of this slice is inside w.
                    unsafe {
                        std::slice::from_raw_parts(sl.w.0.add(sl.w_base + n * sl.w_nb1), row_bytes)
                    }
                };
                let out = |n: usize, v: f32| {
                    // SAFETY: dst element (n, 0) of this slice is inside
                    // dst; each (slice, n) belongs to one thread.
                    unsafe {
                        sl.d.0
                            .add(sl.d_base + n * 4)
                            .cast::<f32>()
                            .write_unaligned(v)
                    }
                };
                let rows = i % n_count..end - s * n_count;
                let float_row;
                let x = match float {
                    Some(_) => {
                        float_row = Prepared::Float(floats.row(s));
                        &float_row
                    }
                    None => &xq[s],
                };
                // The quantized types' rows from several places at once;
                // the float types' groups of rows read several already.
                let order = streams(rows.clone(), DECODE_STREAMS);
                match x {
                    Prepared::Q8(x) => q8::dot_row_range(isa, wd.dtype, x, order, w, out),
                    Prepared::Q8K(x) => kquant::dot_row_range(isa, wd.dtype, x, order, w, out),
                    Prepared::Float(x) => {
                        let float = float.expect(ONE_VARIANT);
                        let mut o = [0f32; float::DECODE_ROWS];
                        let last = rows.end;
                        for n0 in rows.step_by(float::DECODE_ROWS) {
                            let count = (last - n0).min(float::DECODE_ROWS);
                            let ws: [&[u8]; float::DECODE_ROWS] =
                                std::array::from_fn(|i| w(n0 + i.min(count - 1)));
                            float::dot_weight_rows(isa, float, &ws[..count], x, &mut o[..count]);
                            for (i, v) in o[..count].iter().enumerate() {
                                out(n0 + i, *v);
                            }
                        }
                    }
                }
                i = end;
            }
        });
        return Some(());
    }
    // A few activation rows (batched decode) read the weights from
    // memory as decode does: the quantized types' rows from three places
    // at once (kernel bench, 2 rows from memory: Q4_0 and Q4_K 10–16 %
    // faster, Q8_0 1–8 %), the float types' from one (F16 was 12 % slower
    // from three).
    let parts = if float.is_some() { 1 } else { DECODE_STREAMS };
    threads::parallel_for(n_slices * n_count, work, &|range| {
        for i in streams(range, parts) {
            let (sl, n) = (&slices[i / n_count], i % n_count);
            let xq = &xq[(i / n_count) * m_count..][..m_count];
            // SAFETY: weight row n of this slice is inside w.
            let wrow = unsafe {
                std::slice::from_raw_parts(sl.w.0.add(sl.w_base + n * sl.w_nb1), row_bytes)
            };
            let mut m = 0;
            while m < xq.len() {
                let mut out = [0f32; 4];
                let got = Prepared::dot_many(isa, wd.dtype, wrow, &xq[m..], &mut out);
                for (r, v) in out[..got].iter().enumerate() {
                    // SAFETY: dst element (n, m + r) of this slice is inside
                    // dst; each (slice, n) belongs to one thread.
                    unsafe {
                        sl.d.0
                            .add(sl.d_base + (m + r) * sl.d_nb1 + n * 4)
                            .cast::<f32>()
                            .write_unaligned(*v)
                    };
                }
                m += got;
            }
        }
    });
    Some(())
}

/// From this many activation rows on, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL
/// and K-quant products use the lane-wise GEMMs ([`q8::gemm16`],
/// [`kquant::gemm16`]) where the CPU has AVX-512 VNNI (the Q8_0-activation
/// types on AVX2 too, 8 rows a register), and F16/BF16/F32 products
/// [`float::gemm16`]'s tiles (AVX2, AVX-512 and NEON).
const GEMM_MIN_ROWS: usize = 4;

/// Where one (i2, i3) slice of a product lives.
struct Slice {
    w: SendPtr,
    w_base: usize,
    w_nb1: usize,
    row_bytes: usize,
    d: SendPtr,
    d_base: usize,
    d_nb1: usize,
}

/// Weight rows per lane-wise GEMM call, and the width of the [`Tile`]
/// its results go to: activation row `m`'s product with the group's
/// weight row `n` at `row(m)[n]`.
pub(crate) const GEMM_GROUP: usize = 16;

/// Where a lane-wise GEMM's results go: activation row `m`'s products
/// with the group's weight rows in [`Tile::row`]`(m)`, [`GEMM_GROUP`]
/// values. Either a buffer of such rows or, for a whole group of weight
/// rows, the destination's own rows (its columns `n0..n0 + 16`), so the
/// kernels store their registers where the results belong.
pub struct Tile<'a> {
    ptr: std::ptr::NonNull<f32>,
    stride: usize,
    rows: usize,
    _to: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> Tile<'a> {
    /// `buf` as rows of [`GEMM_GROUP`] values, one after the other.
    pub fn new(buf: &'a mut [f32]) -> Tile<'a> {
        Tile {
            ptr: std::ptr::NonNull::from(&mut *buf).cast(),
            stride: GEMM_GROUP,
            rows: buf.len() / GEMM_GROUP,
            _to: std::marker::PhantomData,
        }
    }

    /// `rows` rows of [`GEMM_GROUP`] values, row `m` at `ptr + m *
    /// stride` (in f32s).
    ///
    /// # Safety
    /// Each such row is valid for writes for `'a` and used by nothing
    /// else meanwhile; `stride >= GEMM_GROUP`, so they do not overlap.
    unsafe fn strided(ptr: *mut f32, stride: usize, rows: usize) -> Tile<'a> {
        assert!(stride >= GEMM_GROUP);
        Tile {
            ptr: std::ptr::NonNull::new(ptr).expect("a row's address"),
            stride,
            rows,
            _to: std::marker::PhantomData,
        }
    }

    /// Activation rows the tile holds.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Asks for the cache line of row `m`'s values from `n0` on, to be
    /// written (`prefetchw`), as a kernel starts on the activation rows
    /// whose results it will store there: stored straight into a
    /// product's rows without it, a SmolLM2 prompt's GEMM waited on
    /// those lines as long as copying them from a buffer had taken (4 %
    /// of the prompt); with it the prompt is 4 % faster (AVX2).
    #[inline(always)]
    pub fn prefetch(&self, m: usize, n0: usize) {
        #[cfg(target_arch = "x86_64")]
        if m < self.rows && n0 < GEMM_GROUP {
            use std::arch::x86_64::{_MM_HINT_ET0, _mm_prefetch};
            let at = self.ptr.as_ptr().wrapping_add(m * self.stride + n0);
            // SAFETY: SSE is part of x86-64; a hint, which accesses
            // nothing.
            unsafe { _mm_prefetch::<_MM_HINT_ET0>(at.cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (m, n0);
    }

    /// Row `m`'s [`GEMM_GROUP`] values.
    #[inline(always)]
    pub fn row(&mut self, m: usize) -> &mut [f32; GEMM_GROUP] {
        assert!(m < self.rows, "row {m} of a tile of {}", self.rows);
        // SAFETY: rows below `rows` are valid and apart (`new`, `strided`),
        // and `&mut self` lends one at a time.
        unsafe { &mut *self.ptr.as_ptr().add(m * self.stride).cast() }
    }
}

/// A lane-wise GEMM kernel: the slice's index, 16 (or fewer) of its
/// weight rows, a scratch, and the tile its results go to (one row of
/// [`GEMM_GROUP`] values per activation row).
type GemmKernel<'a, S> = dyn Fn(usize, &[&[u8]], &mut S, &mut Tile) -> bool + Sync + 'a;

/// Runs `kernel` over every slice's weight rows in groups of 16, all in
/// one dispatch of the pool, one scratch per thread.
fn gemm_groups<S: Default>(
    slices: &[Slice],
    n_count: usize,
    m_count: usize,
    work: usize,
    kernel: &GemmKernel<'_, S>,
) {
    let groups = n_count.div_ceil(GEMM_GROUP);
    threads::parallel_for(slices.len() * groups, work, &|range| {
        let mut scratch = S::default();
        // A whole group's results go straight from the kernels' registers
        // to dst; the last, narrower group's through this buffer (dst's
        // rows end before its 16 columns do). Copied from such a buffer
        // for every group, a SmolLM2 prompt spent 4 % of its time
        // reading it back from L2 (and, handed through a small buffer
        // per activation row, a quarter of a Q8_0 prompt's: 256-bit
        // stores read back as 128-bit halves).
        let mut buf = Vec::new();
        for i in range {
            let (s, n0) = (i / groups, (i % groups) * GEMM_GROUP);
            let sl = &slices[s];
            let width = (n_count - n0).min(GEMM_GROUP);
            let rows: Vec<&[u8]> = (n0..n0 + width)
                .map(|n| {
                    // SAFETY: weight row n of this slice is inside the
                    // weights (the caller's contract).
                    unsafe {
                        std::slice::from_raw_parts(
                            sl.w.0.add(sl.w_base + n * sl.w_nb1),
                            sl.row_bytes,
                        )
                    }
                })
                .collect();
            let to = |m: usize| {
                sl.d.0
                    .wrapping_add(sl.d_base + m * sl.d_nb1 + n0 * 4)
                    .cast::<f32>()
            };
            let apart = sl.d_nb1 >= GEMM_GROUP * 4 && sl.d_nb1.is_multiple_of(4);
            if width == GEMM_GROUP && apart && to(0).is_aligned() {
                // SAFETY: dst elements (n0..n0 + 16, m) of this slice are
                // inside dst for every m (f32s, contiguous along n: nb[0]
                // == 4), aligned, rows at least 16 f32s apart (checked);
                // each weight row (so each column) belongs to one thread.
                let mut tile = unsafe { Tile::strided(to(0), sl.d_nb1 / 4, m_count) };
                let done = kernel(s, &rows, &mut scratch, &mut tile);
                debug_assert!(done, "a GEMM kernel was chosen where the CPU lacks it");
                continue;
            }
            buf.resize(m_count * GEMM_GROUP, 0f32);
            let done = kernel(s, &rows, &mut scratch, &mut Tile::new(&mut buf));
            debug_assert!(done, "a GEMM kernel was chosen where the CPU lacks it");
            for (m, v) in buf.chunks_exact(GEMM_GROUP).enumerate() {
                // SAFETY: dst elements (n0..n0 + width, m) of this slice
                // are inside dst, as above.
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), to(m), width) };
            }
        }
    });
}

/// How far ahead of the weight bytes in hand the row kernels ask for
/// cache lines. Decode streams every weight once per token; the hardware
/// prefetcher alone left Q4_0 decode at 75 % of the speed it reaches with
/// this (measured from 1 to 32 KiB into L1, 8 KiB was best; into L2, see
/// [`prefetch`]).
const PREFETCH_AHEAD: usize = 8192;

/// Asks for the cache lines of `bytes` bytes starting [`PREFETCH_AHEAD`]
/// past `p` (a hint: no access happens, so it may point anywhere), into
/// L2 (`T1`), not L1: lines fetched 8 KiB ahead into a 32–48 KiB L1
/// pushed out the activations and scratch the kernels were using, and
/// held the L1's few fill buffers while memory answered. With `T1`, a
/// TinyLlama-shaped 1.1B model read from memory decodes at 18.1–18.9
/// tok/s instead of 14.4–14.8 (Q8_0) and 38–41 instead of 28–36 (Q4_0,
/// in runs at two times of the day), on the AVX2 and AVX-512 paths
/// alike (F16 did not move: its decode takes four rows in step, whose
/// leads fell inside each other, see `float.rs`'s `walk`); Gemma 3
/// 270M's decode took 7 % less time, SmolLM2's (both in this machine's
/// large L3) did not move. From 2 to 32 KiB ahead, `T1` gave the same
/// speed within the noise (a 2 KiB lead that looked 5 % faster on Q8_0
/// in one sweep was not, run against 8 KiB in turns).
#[inline(always)]
fn prefetch(p: *const u8, bytes: usize) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD);
    let mut at = 0;
    while at < bytes {
        prefetch_line(ahead.wrapping_add(at));
        at += 64;
    }
}

/// The next group's weight rows, asked for into L2 a share at a time
/// while a lane-wise GEMM computes this group (one share before each
/// kernel call, or each tile of the AVX-512 float GEMM, which did this
/// first): a quantized group's first step reads its rows block by block into
/// the scratch, and read from memory (a model larger than the caches)
/// each read waited there with nothing to overlap, 13 % of a 1.1B Q8_0
/// model's prompt on AVX2. The next group's rows are taken to follow
/// this group's last one, as a matrix's rows do; where they do not,
/// the hints are wasted, never wrong. A thread's range of groups is
/// contiguous (`gemm_groups`), so the group asked for is the thread's
/// next but at a range's end.
pub(crate) struct AskAhead {
    next: *const u8,
    bytes: usize,
    share: usize,
    asked: usize,
}

impl AskAhead {
    /// For the group after `ws`, spread over `calls` kernel calls.
    pub(crate) fn new(ws: &[&[u8]], calls: usize) -> AskAhead {
        let bytes = ws.iter().map(|w| w.len()).sum::<usize>();
        let next = ws
            .last()
            .map_or(std::ptr::null(), |w| w.as_ptr().wrapping_add(w.len()));
        AskAhead {
            next,
            bytes,
            share: bytes.div_ceil(calls.max(1)).div_ceil(64) * 64,
            asked: 0,
        }
    }

    /// Asks for the next share.
    #[inline(always)]
    pub(crate) fn step(&mut self) {
        let end = (self.asked + self.share).min(self.bytes);
        for line in (self.asked..end).step_by(64) {
            prefetch_line(self.next.wrapping_add(line));
        }
        self.asked = end;
    }
}

/// Asks for the cache line at `p` into L2, as [`prefetch`] does (a hint:
/// `p` may point anywhere).
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: a prefetch never faults (SSE is baseline on x86-64).
    #[cfg(target_arch = "x86_64")]
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// How many places of its weight rows a thread reads at once in decode
/// (see [`streams`]). Measured on a TinyLlama-shaped 1.1B model read from
/// memory (2 threads, AVX-512 and AVX2 paths): one place left the
/// quantized types' products at 75–85 % of the bandwidth F16's four rows
/// in step reach; three gave 4–16 % faster decode by type (Q4_K_M 26.6
/// → 30.5 tok/s, Q5_K_M 21.7 → 25.1, Q4_1 25.2 → 29.0, Q8_0 16.9 →
/// 18.0), Gemma 3 270M 14 % faster; four was no better than three.
const DECODE_STREAMS: usize = 3;

/// The rows of `rows` in the order decode (and batched decode) visits
/// them: the range cut into `parts` ([`DECODE_STREAMS`], or 1: the range
/// as it is; at least 1) parts of consecutive rows, a row of each part in
/// turn (`a0 b0 c0 a1 b1 c1 …`), so that a thread reads memory in that
/// many places at once rather than one. Each row's kernel still
/// prefetches [`PREFETCH_AHEAD`] bytes on, inside its own part. Every row
/// is visited once.
fn streams(rows: std::ops::Range<usize>, parts: usize) -> impl Iterator<Item = usize> {
    // Zero parts would visit no row at all.
    assert!(parts > 0, "rows visited from no place");
    let len = rows.len();
    let per = len.div_ceil(parts);
    (0..per)
        .flat_map(move |i| (0..parts).map(move |s| s * per + i))
        .filter(move |&j| j < len)
        .map(move |j| rows.start + j)
}

/// A raw pointer the worker threads share; the kernels give each thread
/// disjoint outputs.
struct SendPtr(*mut u8);

impl SendPtr {
    /// The pointer (a method, so that closures capture the wrapper).
    fn get(&self) -> *mut u8 {
        self.0
    }
}
// SAFETY: used only for disjoint writes and shared reads, within a scope
// that outlives every thread using it.
unsafe impl Sync for SendPtr {}
// SAFETY: as above.
unsafe impl Send for SendPtr {}

#[cfg(test)]
mod tests;
