//! The exponential, softmax and SiLU rows of the reference, written so that
//! a SIMD kernel computes the very same bits (`kernels::activations`),
//! RoPE's row, compiled with FMA where the CPU has it, and GELU's row
//! through ggml's f16 table.
//!
//! `exp` is kiln's own rather than the platform's: libm's `exp` differs
//! between glibc, musl and macOS, and no vector version of it rounds as
//! it does. This one uses only operations that a vector unit performs
//! identically, lane by lane: a multiplication, a round to nearest even,
//! a two-part (Cody–Waite) reduction by ln 2, a degree-13 Taylor
//! polynomial by Horner in fused multiply-adds (`f64::mul_add`, which is
//! exact everywhere: libm's `fma` where the CPU has no instruction), and
//! a scaling by 2^k in two exact steps. Its error is within 2 ulp of the
//! true value (tested against libm), far below the f32 that softmax and
//! SiLU produce.
//!
//! SiLU needs less: its `1 + e^−x` is an f32, so [`expf`] is the same
//! algorithm in f32 (a degree-7 polynomial, within an ulp), a quarter of
//! the vector work of `exp` (twice the lanes, half the terms): a SmolLM2
//! prompt's SiLU takes a third of the time it took with `exp`.
//!
//! A softmax row sums its exponentials in [`LANES`] interleaved partial
//! sums (element `i` into lane `i % LANES`) added by a fixed tree at the
//! end, which is what one 512-bit register (or two 256-bit ones) of f64
//! computes.

use half::f16;
use half::slice::HalfFloatSliceExt;
use std::sync::OnceLock;

/// Partial sums in a softmax row: one 512-bit register of f64.
pub const LANES: usize = 8;

pub(crate) const LOG2E: f64 = std::f64::consts::LOG2_E;
/// ln 2 split in two: the upper part has 32 trailing zero bits, so `k ·
/// LN2_HI` is exact for every `k` the reduction forms (|k| < 2^11).
pub(crate) const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
pub(crate) const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// Below this `exp` is 0 (the true value is under half the smallest
/// subnormal); above [`EXP_HI`] it is ∞.
pub(crate) const EXP_LO: f64 = -746.0;
pub(crate) const EXP_HI: f64 = 709.79;

/// 1/n! for n = 0..=13: e^r for |r| ≤ ln 2 / 2 to better than 1e-17.
pub(crate) const EXP_POLY: [f64; 14] = {
    let mut c = [1.0; 14];
    let mut n = 1;
    while n < 14 {
        c[n] = c[n - 1] / n as f64;
        n += 1;
    }
    c
};

/// [`expf`]'s range: below `EXPF_LO` it takes `EXPF_LO` (e^x under half
/// the smallest subnormal), above `EXPF_HI` it takes `EXPF_HI` (∞); both
/// keep `k` where its two factors of 2^k are normal f32s.
pub(crate) const EXPF_LO: f32 = -104.0;
pub(crate) const EXPF_HI: f32 = 89.0;
pub(crate) const LOG2E_F32: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two for f32: the upper part has 9 trailing zero bits,
/// so `k · LN2_HI_F32` is exact for every `k` [`expf`] forms (|k| ≤ 150).
pub(crate) const LN2_HI_F32: f32 = f32::from_bits(0x3f31_7200);
pub(crate) const LN2_LO_F32: f32 = 1.428_606_8e-6;
/// 1/n! for n = 0..=7: e^r for |r| ≤ ln 2 / 2 to about 6e-9 (a tenth of
/// an f32 ulp) before rounding.
pub(crate) const EXPF_POLY: [f32; 8] = {
    let mut c = [1.0; 8];
    let mut n = 1;
    while n < 8 {
        c[n] = (EXP_POLY[n]) as f32;
        n += 1;
    }
    c
};

/// e^x in f32, as [`exp`] computes it in f64: k = round(x · log2 e),
/// r = x − k · ln 2 in two fused steps, a degree-7 Taylor polynomial by
/// Horner in fused multiply-adds and 2^k in two exact factors. Within an
/// ulp of the true value (0.88 at worst, tested); NaN stays NaN. Every step is one a
/// vector unit performs identically lane by lane
/// (`kernels::activations`), so a SIMD SiLU has these bits.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    // `clamp` keeps a NaN (`f32::max` would turn it into the bound), as
    // the vector `max` and `min` with the bound first do.
    let t = x.clamp(EXPF_LO, EXPF_HI);
    let k = (t * LOG2E_F32).round_ties_even();
    let r = (-k).mul_add(LN2_LO_F32, (-k).mul_add(LN2_HI_F32, t));
    let mut p = EXPF_POLY[7];
    for &c in EXPF_POLY[..7].iter().rev() {
        p = p.mul_add(r, c);
    }
    let k = k as i32;
    let k1 = k >> 1;
    let k2 = k - k1;
    p * pow2f(k1) * pow2f(k2)
}

/// 2^k for -126 ≤ k ≤ 127.
fn pow2f(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// e^x. NaN stays NaN.
#[inline(always)]
pub fn exp(x: f64) -> f64 {
    if x < EXP_LO {
        return 0.0;
    }
    if x > EXP_HI {
        return f64::INFINITY;
    }
    let k = (x * LOG2E).round_ties_even();
    let r = (-k).mul_add(LN2_LO, (-k).mul_add(LN2_HI, x));
    let mut p = EXP_POLY[13];
    for &c in EXP_POLY[..13].iter().rev() {
        p = p.mul_add(r, c);
    }
    // 2^k as 2^k1 · 2^k2, each a normal f64 even where e^x is subnormal;
    // the first product is exact and the second rounds once.
    let k = k as i32;
    let k1 = k >> 1;
    let k2 = k - k1;
    p * pow2(k1) * pow2(k2)
}

/// 2^k for -1022 ≤ k ≤ 1023.
fn pow2(k: i32) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// Runs `$body` compiled with FMA where the CPU has it: `mul_add` is then
/// one instruction rather than a call into libm (same bits either way).
macro_rules! with_fma {
    ($($body:tt)*) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "fma")]
            fn fma(f: impl FnOnce()) {
                f()
            }
            if std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has FMA.
                return unsafe { fma(|| { $($body)* }) };
            }
        }
        $($body)*
    }};
}

/// A softmax row after its scale and mask: `out = e^(x − max) / Σ`, each
/// exponential kept in `e` (as long as `x`). A row that is all −∞ (fully
/// masked) gives zeros.
pub fn softmax_row(x: &[f32], e: &mut [f64], out: &mut [f32]) {
    with_fma! { softmax_row_inline(x, e, out) }
}

#[inline(always)]
fn softmax_row_inline(x: &[f32], e: &mut [f64], out: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        out.fill(0.0);
        return;
    }
    let mut lanes = [0f64; LANES];
    for (i, (e, &v)) in e.iter_mut().zip(x).enumerate() {
        *e = exp((v - max) as f64);
        lanes[i % LANES] += *e;
    }
    let sum = lane_sum(lanes);
    for (o, &v) in out.iter_mut().zip(e.iter()) {
        *o = (v / sum) as f32;
    }
}

/// The tree a vector reduction adds [`LANES`] partial sums in: lane `j`
/// with `j + 4`, then `j` with `j + 2`, then the two left.
pub(crate) fn lane_sum(l: [f64; LANES]) -> f64 {
    let s = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (s[0] + s[2]) + (s[1] + s[3])
}

/// x · σ(x) as ggml computes it, `x / (1 + e^−x)` in f32, with e^−x
/// from [`expf`] (libm's `expf` within an ulp or two).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(-x))
}

/// One RoPE row: the pairs `(x0, x1)` (adjacent, or half a rotation
/// apart with `neox`) turned by `sc`'s `(sin, cos)`, as ggml does it (one
/// fused multiply-add each); the elements past the pairs are copied.
pub fn rope_row(x: &[f32], sc: &[(f32, f32)], neox: bool, out: &mut [f32]) {
    with_fma! {
        // The pairs cover the first 2 · sc.len() elements either way.
        let half = sc.len();
        out[2 * half..].copy_from_slice(&x[2 * half..]);
        for (i, &(sin, cos)) in sc.iter().enumerate() {
            let (j0, j1) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
            let (x0, x1) = (x[j0], x[j1]);
            out[j0] = x0.mul_add(cos, -(x1 * sin));
            out[j1] = x0.mul_add(sin, x1 * cos);
        }
    }
}

/// GELU (tanh form) over a row as ggml's CPU backend computes it, to the
/// bit: 0 at or below −10, the identity at or above 10, and otherwise its
/// table from f16 inputs to f16 outputs ([`gelu_f16`] of every f16 value,
/// built once: 128 KiB). The f16 roundings both ways go eight values an
/// instruction where the CPU has F16C (`half`'s slice conversions, the
/// same rounding).
pub fn gelu_row(x: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 64;
    let table = gelu_table();
    let mut h = [f16::ZERO; CHUNK];
    for (x, out) in x.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
        let h = &mut h[..x.len()];
        h.convert_from_f32_slice(x);
        for v in h.iter_mut() {
            *v = f16::from_bits(table[v.to_bits() as usize]);
        }
        h.convert_to_f32_slice(out);
        for (o, &v) in out.iter_mut().zip(x) {
            if v <= -10.0 {
                *o = 0.0;
            } else if v >= 10.0 {
                *o = v;
            }
        }
    }
}

/// The entry of ggml's GELU table for `x`: the f32 formula with the one
/// FMA its compiler contracts and the C library's `tanhf`, rounded to f16
/// (all 65,536 entries checked against a llama.cpp build's table).
pub fn gelu_f16(x: f16) -> f16 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_560_802_865_4_f64 as f32;
    let x = x.to_f32();
    let inner = (0.044715f32 * x).mul_add(x, 1.0);
    f16::from_f32(0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * inner).tanh()))
}

/// [`gelu_f16`] of every f16 value, by bits.
fn gelu_table() -> &'static [u16; 1 << 16] {
    static TABLE: OnceLock<Box<[u16; 1 << 16]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0u16; 1 << 16]);
        for (bits, e) in t.iter_mut().enumerate() {
            *e = gelu_f16(f16::from_bits(bits as u16)).to_bits();
        }
        t
    })
}

/// [`silu`] over a row.
pub fn silu_row(x: &[f32], out: &mut [f32]) {
    with_fma! {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = silu(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f64, b: f64) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut worst = 0;
        for i in 0..200_000 {
            // Softmax's range (x ≤ 0) densely, the rest of the finite range sparsely.
            let x = if i % 4 == 0 {
                rng.f64() * 1400.0 - 700.0
            } else {
                -rng.f64() * 40.0
            };
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(f64::INFINITY), f64::INFINITY);
        assert!(exp(f64::NAN).is_nan());
        assert_eq!(exp(-800.0), 0.0);
        assert_eq!(exp(710.0), f64::INFINITY);
        // Subnormal results, and the last finite ones.
        for x in [-745.0, -740.5, -708.5, 709.0, 709.78] {
            assert!(
                ulps(exp(x), x.exp()) <= 2,
                "exp({x}) = {} vs {}",
                exp(x),
                x.exp()
            );
        }
    }

    #[test]
    fn softmax_row_sums_to_one_and_masks() {
        let x = [
            1.0f32,
            f32::NEG_INFINITY,
            -2.0,
            0.5,
            f32::NEG_INFINITY,
            3.0,
            0.0,
            -1.0,
            2.0,
        ];
        let mut e = [0f64; 9];
        let mut out = [0f32; 9];
        softmax_row(&x, &mut e, &mut out);
        assert_eq!(out[1], 0.0);
        assert_eq!(out[4], 0.0);
        let want: Vec<f64> = x.iter().map(|&v| ((v - 3.0) as f64).exp()).collect();
        let total: f64 = want.iter().sum();
        for (o, w) in out.iter().zip(&want) {
            assert!((*o as f64 - w / total).abs() < 1e-7, "{o} vs {}", w / total);
        }
        softmax_row(&[f32::NEG_INFINITY; 3], &mut e[..3], &mut out[..3]);
        assert_eq!(out[..3], [0.0; 3]);
    }

    /// GELU value by value: the clamps, the f16 rounding, the formula.
    fn gelu_one(x: f32) -> f32 {
        if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x
        } else {
            gelu_f16(f16::from_f32(x)).to_f32()
        }
    }

    #[test]
    fn gelu_rows_give_the_formula_value_by_value() {
        // Every f16 value, the midpoints between neighbours (ties round to
        // even), the clamps and what lies around them, in rows whose
        // lengths cross the chunks at different places.
        let mut x: Vec<f32> = (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect();
        x.extend((0..u16::MAX).map(|b| {
            let (a, c) = (f16::from_bits(b).to_f32(), f16::from_bits(b + 1).to_f32());
            a + (c - a) / 2.0
        }));
        x.extend([-10.0, 10.0, 9.999_999, -9.999_999, 10.000_001, -10.000_001]);
        x.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            0.0,
            -0.0,
        ]);
        for len in [1, 63, 64, 65, 200, x.len()] {
            for row in x.chunks(len) {
                let mut out = vec![f32::NAN; row.len()];
                gelu_row(row, &mut out);
                for (&v, &o) in row.iter().zip(&out) {
                    let want = gelu_one(v);
                    if want.is_nan() {
                        assert!(o.is_nan(), "gelu({v}) = {o}, want NaN");
                    } else {
                        assert_eq!(o.to_bits(), want.to_bits(), "gelu({v}) = {o}, want {want}");
                    }
                }
            }
        }
        // And the function it stands for, to f16's precision.
        for (v, want) in [(1.0f32, 0.841_192), (-1.0, -0.158_808), (3.0, 2.996_363)] {
            let mut o = [0f32];
            gelu_row(&[v], &mut o);
            assert!((o[0] - want).abs() < 2e-3, "gelu({v}) = {}", o[0]);
        }
    }

    #[test]
    fn silu_matches_its_definition() {
        for x in [-100.0f32, -3.5, -0.0, 0.0, 0.25, 2.0, 50.0, 1e30, -1e30] {
            let want = x as f64 / (1.0 + (-x as f64).exp());
            let got = silu(x) as f64;
            // (−100's e^100 is past f32's range: 0 for a value under it.)
            let close = (got - want).abs() <= 3e-7 * want.abs() + 1e-38;
            assert!(close, "silu({x}) = {got}, not {want}");
        }
        assert_eq!(silu(-200.0), -0.0);
        assert_eq!(silu(f32::INFINITY), f32::INFINITY);
        assert!(silu(f32::NAN).is_nan());
    }

    #[test]
    fn expf_is_within_an_ulp_of_exp_over_its_whole_range() {
        let ulp = |v: f32| f32::from_bits(v.to_bits() + 1) - v;
        let mut worst = 0f64;
        let mut x = -104.5f32;
        while x < 89.5 {
            let (got, want) = (expf(x), (x as f64).exp());
            if want > f32::MAX as f64 {
                assert_eq!(got, f32::INFINITY, "expf({x})");
            } else if want < f32::MIN_POSITIVE as f64 {
                // Subnormal: within an ulp of the smallest ones.
                assert!((got as f64 - want).abs() <= 1.5e-45, "expf({x}) = {got}");
            } else {
                let err = (got as f64 - want).abs() / ulp(want as f32) as f64;
                worst = worst.max(err);
                assert!(err <= 1.0, "expf({x}) = {got}, {err} ulp from {want}");
            }
            x += 0.000_731;
        }
        assert!(worst > 0.0);
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(f32::INFINITY), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
    }
}
