//! Softmax and SiLU rows with a vector `exp` (f64) and `expf` (f32):
//! [`crate::math`]'s algorithms lane by lane, so the bits are the
//! reference's (tested).

use super::Isa;
use crate::ops::{REFERENCE_ROWS, RowFns};

/// The row loops for `isa`.
pub fn row_fns(isa: Isa) -> &'static RowFns {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => &x86::AVX512_ROWS,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni => &x86::AVX2_ROWS,
        _ => &REFERENCE_ROWS,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::Isa;
    use crate::math::{EXP_HI, EXP_LO, EXP_POLY, LANES, LN2_HI, LN2_LO, LOG2E};
    use crate::math::{EXPF_HI, EXPF_LO, EXPF_POLY, LN2_HI_F32, LN2_LO_F32, LOG2E_F32};
    use crate::ops::RowFns;
    use std::arch::x86_64::*;

    /// The row loops of one instruction set, each checking that the CPU
    /// has it (`row_fns` hands them out only then).
    macro_rules! rows_for {
        ($isa:expr, $softmax:ident, $silu:ident) => {
            RowFns {
                softmax: |x, e, out| {
                    assert!(Isa::detect() >= $isa);
                    // SAFETY: the CPU has the instruction set (checked above).
                    unsafe { $softmax(x, e, out) }
                },
                silu: |x, out| {
                    assert!(Isa::detect() >= $isa);
                    // SAFETY: as above.
                    unsafe { $silu(x, out) }
                },
            }
        };
    }

    pub static AVX512_ROWS: RowFns = rows_for!(Isa::Avx512, softmax_row_avx512, silu_row_avx512);
    pub static AVX2_ROWS: RowFns = rows_for!(Isa::Avx2, softmax_row_avx2, silu_row_avx2);

    /// 2^k for four integer-valued lanes, as two factors (`math::exp`).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn pow2_halves(k: __m256d) -> (__m256d, __m256d) {
        let k = _mm256_cvtpd_epi32(k);
        let k1 = _mm_srai_epi32::<1>(k);
        let k2 = _mm_sub_epi32(k, k1);
        let bias = _mm_set1_epi32(1023);
        let s1 = _mm256_slli_epi64::<52>(_mm256_cvtepi32_epi64(_mm_add_epi32(k1, bias)));
        let s2 = _mm256_slli_epi64::<52>(_mm256_cvtepi32_epi64(_mm_add_epi32(k2, bias)));
        (_mm256_castsi256_pd(s1), _mm256_castsi256_pd(s2))
    }

    /// `math::exp` on four lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp4(x: __m256d) -> __m256d {
        let set = _mm256_set1_pd;
        let k = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_pd(x, set(LOG2E)),
        );
        let r = _mm256_fnmadd_pd(k, set(LN2_LO), _mm256_fnmadd_pd(k, set(LN2_HI), x));
        let mut p = set(EXP_POLY[13]);
        for i in (0..13).rev() {
            p = _mm256_fmadd_pd(p, r, set(EXP_POLY[i]));
        }
        let (s1, s2) = pow2_halves(k);
        let y = _mm256_mul_pd(_mm256_mul_pd(p, s1), s2);
        let y = _mm256_blendv_pd(
            y,
            set(f64::INFINITY),
            _mm256_cmp_pd::<_CMP_GT_OQ>(x, set(EXP_HI)),
        );
        _mm256_blendv_pd(y, set(0.0), _mm256_cmp_pd::<_CMP_LT_OQ>(x, set(EXP_LO)))
    }

    /// `math::exp` on eight lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn exp8(x: __m512d) -> __m512d {
        let set = _mm512_set1_pd;
        let k = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_pd(x, set(LOG2E)),
        );
        let r = _mm512_fnmadd_pd(k, set(LN2_LO), _mm512_fnmadd_pd(k, set(LN2_HI), x));
        let mut p = set(EXP_POLY[13]);
        for i in (0..13).rev() {
            p = _mm512_fmadd_pd(p, r, set(EXP_POLY[i]));
        }
        let k = _mm512_cvtpd_epi32(k);
        let k1 = _mm256_srai_epi32::<1>(k);
        let k2 = _mm256_sub_epi32(k, k1);
        let bias = _mm256_set1_epi32(1023);
        let s1 = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_cvtepi32_epi64(
            _mm256_add_epi32(k1, bias),
        )));
        let s2 = _mm512_castsi512_pd(_mm512_slli_epi64::<52>(_mm512_cvtepi32_epi64(
            _mm256_add_epi32(k2, bias),
        )));
        let y = _mm512_mul_pd(_mm512_mul_pd(p, s1), s2);
        let y = _mm512_mask_blend_pd(
            _mm512_cmp_pd_mask::<_CMP_GT_OQ>(x, set(EXP_HI)),
            y,
            set(f64::INFINITY),
        );
        _mm512_mask_blend_pd(
            _mm512_cmp_pd_mask::<_CMP_LT_OQ>(x, set(EXP_LO)),
            y,
            set(0.0),
        )
    }

    /// Eight f32 from `x[i..]`, the ones past the end `fill`.
    #[inline]
    fn eight(x: &[f32], i: usize, fill: f32) -> [f32; 8] {
        let mut v = [fill; 8];
        let n = (x.len() - i).min(8);
        v[..n].copy_from_slice(&x[i..i + n]);
        v
    }

    /// The first `len` (1..=8) of eight lanes.
    #[inline]
    fn mask8(len: usize) -> __mmask8 {
        (0xffu16 >> (8 - len)) as __mmask8
    }

    /// The row's maximum, NaNs ignored (as `f32::max` does).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn max_avx2(x: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            // SAFETY: `c` holds eight f32. `max_ps(v, m)` returns `m`
            // where `v` is NaN.
            m = _mm256_max_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, m);
        }
        if !chunks.remainder().is_empty() {
            let v = eight(chunks.remainder(), 0, f32::NEG_INFINITY);
            // SAFETY: `v` holds eight f32.
            m = _mm256_max_ps(unsafe { _mm256_loadu_ps(v.as_ptr()) }, m);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let mut max = f32::NEG_INFINITY;
        for v in lanes {
            max = max.max(v);
        }
        max
    }

    /// `math::softmax_row` with AVX2: the eight partial sums are two
    /// registers, lanes 0–3 and 4–7.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax_row_avx2(x: &[f32], e: &mut [f64], out: &mut [f32]) {
        let n = x.len();
        assert!(e.len() >= n && out.len() >= n);
        let max = max_avx2(x);
        if max == f32::NEG_INFINITY {
            out[..n].fill(0.0);
            return;
        }
        let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
        let inf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut ex = [0f64; 8];
        for i in (0..n).step_by(LANES) {
            let len = (n - i).min(8);
            // Whole chunks straight from `x` into `e`, the last one
            // through `v` and `ex`.
            let v = eight(x, i, f32::NEG_INFINITY);
            let (src, dst) = if len == 8 {
                (x[i..].as_ptr(), e[i..].as_mut_ptr())
            } else {
                (v.as_ptr(), ex.as_mut_ptr())
            };
            // SAFETY: `src` and `dst` hold eight values.
            unsafe {
                let v = _mm256_loadu_ps(src);
                if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, inf)) == 0xff {
                    // Masked (causal attention's upper half): e^−∞ is 0,
                    // and 0 added to the sums changes nothing.
                    _mm256_storeu_pd(dst, _mm256_setzero_pd());
                    _mm256_storeu_pd(dst.add(4), _mm256_setzero_pd());
                } else {
                    let d = _mm256_sub_ps(v, _mm256_set1_ps(max));
                    let a = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(d)));
                    let b = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(d)));
                    lo = _mm256_add_pd(lo, a);
                    hi = _mm256_add_pd(hi, b);
                    _mm256_storeu_pd(dst, a);
                    _mm256_storeu_pd(dst.add(4), b);
                }
            }
            if len < 8 {
                e[i..i + len].copy_from_slice(&ex[..len]);
            }
        }
        let s = _mm256_add_pd(lo, hi);
        let t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
        let sum = _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
        let sum4 = _mm256_set1_pd(sum);
        let mut chunks = out[..n].chunks_exact_mut(4);
        for (o, v) in (&mut chunks).zip(e.chunks_exact(4)) {
            // SAFETY: `v` and `o` hold four values.
            unsafe {
                let q = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_loadu_pd(v.as_ptr()), sum4));
                _mm_storeu_ps(o.as_mut_ptr(), q);
            }
        }
        let done = n - chunks.into_remainder().len();
        for (o, v) in out[done..n].iter_mut().zip(&e[done..n]) {
            *o = (v / sum) as f32;
        }
    }

    /// `math::softmax_row` with AVX-512: the eight partial sums are one
    /// register.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn softmax_row_avx512(x: &[f32], e: &mut [f64], out: &mut [f32]) {
        let n = x.len();
        assert!(e.len() >= n && out.len() >= n);
        let max = max_avx2(x);
        if max == f32::NEG_INFINITY {
            out[..n].fill(0.0);
            return;
        }
        let mut acc = _mm512_setzero_pd();
        let mut i = 0;
        while i < n {
            let len = (n - i).min(8);
            let m = mask8(len);
            // SAFETY: the mask covers `x[i..i + len]` and `e[i..i + len]`.
            unsafe {
                let v =
                    _mm256_mask_loadu_ps(_mm256_set1_ps(f32::NEG_INFINITY), m, x.as_ptr().add(i));
                let inf = _mm256_set1_ps(f32::NEG_INFINITY);
                if _mm256_cmp_ps_mask::<_CMP_EQ_OQ>(v, inf) == 0xff {
                    // Masked (causal attention's upper half): e^−∞ is 0,
                    // and 0 added to the sums changes nothing.
                    _mm512_mask_storeu_pd(e.as_mut_ptr().add(i), m, _mm512_setzero_pd());
                    i += 8;
                    continue;
                }
                let d = _mm256_sub_ps(v, _mm256_set1_ps(max));
                let ex = exp8(_mm512_cvtps_pd(d));
                acc = _mm512_add_pd(acc, ex);
                _mm512_mask_storeu_pd(e.as_mut_ptr().add(i), m, ex);
            }
            i += 8;
        }
        let s = _mm256_add_pd(
            _mm512_castpd512_pd256(acc),
            _mm512_extractf64x4_pd::<1>(acc),
        );
        let t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd::<1>(s));
        let sum = _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
        let sum8 = _mm512_set1_pd(sum);
        let mut i = 0;
        while i < n {
            let len = (n - i).min(8);
            let m = mask8(len);
            // SAFETY: as above, for `out`.
            unsafe {
                let v = _mm512_maskz_loadu_pd(m, e.as_ptr().add(i));
                if _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(v, _mm512_setzero_pd()) == 0xff {
                    _mm256_mask_storeu_ps(out.as_mut_ptr().add(i), m, _mm256_setzero_ps());
                    i += 8;
                    continue;
                }
                let q = _mm512_cvtpd_ps(_mm512_div_pd(v, sum8));
                _mm256_mask_storeu_ps(out.as_mut_ptr().add(i), m, q);
            }
            i += 8;
        }
    }

    /// `math::expf` on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn expf8(x: __m256) -> __m256 {
        let set = _mm256_set1_ps;
        // The bound first: `max`/`min` return their second operand where
        // either is NaN, so a NaN stays one, as in `math::expf`.
        let t = _mm256_min_ps(set(EXPF_HI), _mm256_max_ps(set(EXPF_LO), x));
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(t, set(LOG2E_F32)),
        );
        let r = _mm256_fnmadd_ps(k, set(LN2_LO_F32), _mm256_fnmadd_ps(k, set(LN2_HI_F32), t));
        let mut p = set(EXPF_POLY[7]);
        for i in (0..7).rev() {
            p = _mm256_fmadd_ps(p, r, set(EXPF_POLY[i]));
        }
        let k = _mm256_cvtps_epi32(k);
        let k1 = _mm256_srai_epi32::<1>(k);
        let k2 = _mm256_sub_epi32(k, k1);
        let bias = _mm256_set1_epi32(127);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k1, bias)));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k2, bias)));
        _mm256_mul_ps(_mm256_mul_ps(p, s1), s2)
    }

    /// `math::silu` on eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn silu8(v: __m256) -> __m256 {
        let e = expf8(_mm256_xor_ps(v, _mm256_set1_ps(-0.0)));
        _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }

    /// `math::silu_row` with AVX2.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn silu_row_avx2(x: &[f32], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let whole = n - n % 8;
        for i in (0..whole).step_by(8) {
            // SAFETY: values i..i + 8 are inside `x` and `out`.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), silu8(v));
            }
        }
        if whole < n {
            let (mut v, mut y) = ([0f32; 8], [0f32; 8]);
            v[..n - whole].copy_from_slice(&x[whole..n]);
            // SAFETY: `v` and `y` hold eight f32.
            unsafe { _mm256_storeu_ps(y.as_mut_ptr(), silu8(_mm256_loadu_ps(v.as_ptr()))) };
            out[whole..n].copy_from_slice(&y[..n - whole]);
        }
    }

    /// `math::expf` on sixteen lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn expf16(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        // NaN stays NaN, as in `expf8`.
        let t = _mm512_min_ps(set(EXPF_HI), _mm512_max_ps(set(EXPF_LO), x));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(t, set(LOG2E_F32)),
        );
        let r = _mm512_fnmadd_ps(k, set(LN2_LO_F32), _mm512_fnmadd_ps(k, set(LN2_HI_F32), t));
        let mut p = set(EXPF_POLY[7]);
        for i in (0..7).rev() {
            p = _mm512_fmadd_ps(p, r, set(EXPF_POLY[i]));
        }
        let k = _mm512_cvtps_epi32(k);
        let k1 = _mm512_srai_epi32::<1>(k);
        let k2 = _mm512_sub_epi32(k, k1);
        let bias = _mm512_set1_epi32(127);
        let s1 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(k1, bias)));
        let s2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(k2, bias)));
        _mm512_mul_ps(_mm512_mul_ps(p, s1), s2)
    }

    /// `math::silu_row` with AVX-512.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn silu_row_avx512(x: &[f32], out: &mut [f32]) {
        let n = x.len().min(out.len());
        let (one, sign) = (_mm512_set1_ps(1.0), _mm512_set1_ps(-0.0));
        let mut i = 0;
        while i < n {
            let m = (u16::MAX >> (16 - (n - i).min(16))) as __mmask16;
            // SAFETY: the mask covers `x[i..i + 16]` and `out[i..i + 16]`
            // where they are inside the slices.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
                let e = expf16(_mm512_xor_ps(v, sign));
                let y = _mm512_div_ps(v, _mm512_add_ps(one, e));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, y);
            }
            i += 16;
        }
    }
}
