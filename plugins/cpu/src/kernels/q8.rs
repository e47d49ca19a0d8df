//! Activations quantized to Q8_0 blocks, and the integer dot products of
//! Q4_0 and Q8_0 weight rows with them: portable, AVX2 and AVX-512 VNNI.
//!
//! Block sums are exact integers, and the scaled sums accumulate in f64
//! lanes: every term `d_w·d_x·sum` is exact in f64, so a row's result is
//! the reference's (which sums exact products in f64) rounded the same
//! way, bit for bit in practice. That matters more than it seems: K and V
//! are rounded to f16 in the cache, and a last-bit difference there can
//! flip a rounding that sharp attention then amplifies.

use super::Isa;
use half::f16;
use kiln_plugin_api::DType;

const QK: usize = 32;
const Q4_0_BYTES: usize = 18;
const Q8_0_BYTES: usize = 34;

/// One activation row as ggml's `block_q8_0`s, split into scales and codes.
pub struct Q8Row {
    /// Per block: the scale (an f16 value, widened).
    pub d: Vec<f32>,
    /// The codes, 32 per block.
    pub qs: Vec<i8>,
}

impl Q8Row {
    pub fn new(k: usize) -> Q8Row {
        Q8Row {
            d: vec![0.0; k / QK],
            qs: vec![0; k],
        }
    }

    /// Quantizes `x` (a whole number of blocks) exactly as the reference's
    /// `round_activations` rounds it: `qs * d` is that rounded value.
    pub fn quantize(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len(), self.qs.len());
        for ((block, q), d) in x
            .chunks_exact(QK)
            .zip(self.qs.chunks_exact_mut(QK))
            .zip(&mut self.d)
        {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            *d = f16::from_f32(amax / 127.0).to_f32();
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            for (q, v) in q.iter_mut().zip(block) {
                *q = (v * id).round_ties_even() as i8;
            }
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `w · x` for one weight row of `dtype` (Q4_0 or Q8_0).
pub fn dot(isa: Isa, dtype: DType, w: &[u8], x: &Q8Row) -> f32 {
    let blocks = x.d.len();
    match dtype {
        DType::Q4_0 => assert_eq!(w.len(), blocks * Q4_0_BYTES),
        DType::Q8_0 => assert_eq!(w.len(), blocks * Q8_0_BYTES),
        _ => unreachable!("no Q8_0 dot product for {dtype}"),
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Isa` only names paths the CPU has (`Isa::detect`), and
        // the lengths were checked above.
        Isa::Avx512 => return unsafe { x86::dot_vnni(dtype, w, x) },
        // SAFETY: as above.
        Isa::Avx2 => return unsafe { x86::dot_avx2(dtype, w, x) },
        Isa::Scalar | Isa::Reference => {}
    }
    let _ = isa;
    dot_scalar(dtype, w, x)
}

fn dot_scalar(dtype: DType, w: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f64;
    for (b, (&dx, xq)) in x.d.iter().zip(x.qs.chunks_exact(QK)).enumerate() {
        let (dw, sumi) = match dtype {
            DType::Q4_0 => {
                let blk = &w[b * Q4_0_BYTES..][..Q4_0_BYTES];
                let mut s = 0i32;
                for j in 0..16 {
                    let q = blk[2 + j];
                    s += ((q & 0x0f) as i32 - 8) * xq[j] as i32;
                    s += ((q >> 4) as i32 - 8) * xq[j + 16] as i32;
                }
                (f16_at(blk, 0), s)
            }
            _ => {
                let blk = &w[b * Q8_0_BYTES..][..Q8_0_BYTES];
                let s = blk[2..]
                    .iter()
                    .zip(xq)
                    .map(|(&q, &y)| q as i8 as i32 * y as i32)
                    .sum();
                (f16_at(blk, 0), s)
            }
        };
        acc += dw as f64 * dx as f64 * sumi as f64;
    }
    acc as f32
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Q4_0_BYTES, Q8_0_BYTES, Q8Row, QK};
    use core::arch::x86_64::*;
    use kiln_plugin_api::DType;

    /// The 32 weight codes of block `b` as signed bytes.
    ///
    /// # Safety
    /// Block `b` is inside `w` (whose length the caller checked).
    #[inline(always)]
    unsafe fn codes(dtype: DType, w: &[u8], b: usize) -> (__m256i, f32) {
        // SAFETY: the block is inside `w`; the loads are unaligned ones, and
        // these intrinsics need only AVX2 + F16C, which every caller enables.
        unsafe {
            if dtype == DType::Q4_0 {
                let p = w.as_ptr().add(b * Q4_0_BYTES);
                let q = _mm_loadu_si128(p.add(2).cast());
                let m4 = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(q, m4);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
                let v = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
                (v, f16_to_f32(p.cast::<u16>().read_unaligned()))
            } else {
                let p = w.as_ptr().add(b * Q8_0_BYTES);
                (
                    _mm256_loadu_si256(p.add(2).cast()),
                    f16_to_f32(p.cast::<u16>().read_unaligned()),
                )
            }
        }
    }

    #[inline(always)]
    fn f16_to_f32(bits: u16) -> f32 {
        // SAFETY: callers enable F16C; register-only operations.
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    #[inline(always)]
    fn hsum_pd(v: __m256d) -> f64 {
        // SAFETY: callers enable AVX; these are register-only operations.
        unsafe {
            let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
            _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C are present; `w` holds `x.d.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(dtype: DType, w: &[u8], x: &Q8Row) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_pd(); 2];
        for b in 0..x.d.len() {
            // SAFETY: the caller's contract.
            let (wv, dw) = unsafe { codes(dtype, w, b) };
            // SAFETY: block b of the codes is inside `x.qs`.
            let xv = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(b * QK).cast()) };
            // |w| · (y with w's sign): u8 × i8 pairs, then pairs of i16.
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            let p = _mm256_madd_epi16(p, ones);
            let s = _mm256_set1_pd(dw as f64 * x.d[b] as f64);
            let lo = _mm256_cvtepi32_pd(_mm256_castsi256_si128(p));
            let hi = _mm256_cvtepi32_pd(_mm256_extracti128_si256(p, 1));
            acc[0] = _mm256_fmadd_pd(s, lo, acc[0]);
            acc[1] = _mm256_fmadd_pd(s, hi, acc[1]);
        }
        hsum_pd(_mm256_add_pd(acc[0], acc[1])) as f32
    }

    /// # Safety
    /// AVX-512 F/VL/VNNI, AVX2, FMA and F16C are present; `w` holds
    /// `x.d.len()` blocks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn dot_vnni(dtype: DType, w: &[u8], x: &Q8Row) -> f32 {
        let mut acc = _mm512_setzero_pd();
        for b in 0..x.d.len() {
            // SAFETY: the caller's contract.
            let (wv, dw) = unsafe { codes(dtype, w, b) };
            // SAFETY: block b of the codes is inside `x.qs`.
            let xv = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(b * QK).cast()) };
            let p = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_sign_epi8(wv, wv),
                _mm256_sign_epi8(xv, wv),
            );
            let s = _mm512_set1_pd(dw as f64 * x.d[b] as f64);
            acc = _mm512_fmadd_pd(s, _mm512_cvtepi32_pd(p), acc);
        }
        _mm512_reduce_add_pd(acc) as f32
    }
}
