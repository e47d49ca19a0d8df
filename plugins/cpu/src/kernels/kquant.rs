//! Q4_K and Q6_K weight rows against activations quantized to Q8_K
//! (ggml's `vec_dot_type` for the K-quants): portable and AVX2 (which the
//! AVX-512 path uses too).
//!
//! Sums are integers per block, scaled in f64. The reference multiplies
//! by the f32-rounded activation `q·d` where this uses `q` and `d` apart
//! (as ggml does), so the two can differ in the last bits; tests bound it.

use super::Isa;
use crate::quant::nearest_int;
use half::f16;

const QK_K: usize = 256;
const BLOCK: usize = 210;
const Q4_K_BLOCK: usize = 144;

/// One activation row as ggml's `block_q8_K`s (without the sums).
pub struct Q8KRow {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    /// The sum of the codes of each 32, for the K-quants' minimums.
    pub sums32: Vec<i32>,
}

impl Q8KRow {
    pub fn new(k: usize) -> Q8KRow {
        Q8KRow {
            d: vec![0.0; k / QK_K],
            qs: vec![0; k],
            sums32: vec![0; k / 32],
        }
    }

    /// As the reference's `round_activations` for K-quant weights: `qs·d`
    /// is its rounded value (before that product's own f32 rounding).
    pub fn quantize(&mut self, x: &[f32]) {
        for ((block, q), d) in x
            .chunks_exact(QK_K)
            .zip(self.qs.chunks_exact_mut(QK_K))
            .zip(&mut self.d)
        {
            let (mut amax, mut max) = (0.0f32, 0.0f32);
            for &v in block {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                *d = 0.0;
                q.fill(0);
                continue;
            }
            let iscale = -127.0 / max;
            *d = 1.0 / iscale;
            for (q, &v) in q.iter_mut().zip(block) {
                *q = nearest_int(iscale * v).min(127) as i8;
            }
        }
        for (s, q) in self.sums32.iter_mut().zip(self.qs.chunks_exact(32)) {
            *s = q.iter().map(|&v| v as i32).sum();
        }
    }
}

/// `out[r] = w · xs[r]` for one Q4_K row and up to four activation rows
/// (each block's scales decoded once for all): per block,
/// `d·Σ sc_j (q·x)_j − dmin·Σ m_j Σx_j`.
pub fn dot_q4_k(isa: Isa, w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
    assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
    assert!(xs.iter().all(|x| w.len() == x.d.len() * Q4_K_BLOCK));
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `Isa` only names paths the CPU has; lengths checked above.
        return unsafe {
            match xs.len() {
                1 => x86::dot_q4_k_avx2::<1>(w, xs, out),
                2 => x86::dot_q4_k_avx2::<2>(w, xs, out),
                3 => x86::dot_q4_k_avx2::<3>(w, xs, out),
                _ => x86::dot_q4_k_avx2::<4>(w, xs, out),
            }
        };
    }
    let _ = isa;
    for (x, o) in xs.iter().zip(out.chunks_exact_mut(1)) {
        dot_q4_k_with::<1>(w, &[x], o, q4_k_block, |bits| f16::from_bits(bits).to_f32());
    }
}

/// The Q4_K loop around a block kernel and an f16 conversion, inlined
/// into each path so that both compile with that path's features.
/// `R` rows at once (a constant, so that the per-row sums stay in registers).
#[inline(always)]
fn dot_q4_k_with<const R: usize>(
    w: &[u8],
    xs: &[&Q8KRow],
    out: &mut [f32],
    block: impl Fn(&[u8], &[&Q8KRow; R], usize, &[i32; 8], &mut [i32; R]),
    to_f32: impl Fn(u16) -> f32,
) {
    let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
    let mut acc = [0.0f64; R];
    for (b, blk) in w.chunks_exact(Q4_K_BLOCK).enumerate() {
        let scales = &blk[4..16];
        let mut sc = [0i32; 8];
        let mut mins = [0i32; 8];
        for j in 0..8 {
            let (scale, min) = crate::quant::scale_min_k4(j, scales);
            sc[j] = scale as i32;
            mins[j] = min as i32;
        }
        let mut totals = [0i32; R];
        block(&blk[16..144], xs, b, &sc, &mut totals);
        let d = to_f32(u16::from_le_bytes([blk[0], blk[1]])) as f64;
        let dmin = to_f32(u16::from_le_bytes([blk[2], blk[3]])) as f64;
        for ((x, acc), &total) in xs.iter().zip(&mut acc).zip(&totals) {
            let total_m: i32 = (0..8).map(|j| mins[j] * x.sums32[b * 8 + j]).sum();
            *acc += x.d[b] as f64 * (d * total as f64 - dmin * total_m as f64);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a as f32;
    }
}

/// `totals[r] = Σ_j sc_j Σ_{i in j} q_i x_i` over block `b` of each row.
fn q4_k_block(q: &[u8], xs: &[&Q8KRow; 1], b: usize, sc: &[i32; 8], totals: &mut [i32; 1]) {
    for (x, total) in xs.iter().zip(totals.iter_mut()) {
        let xq = &x.qs[b * QK_K..][..QK_K];
        for (j, q32) in q.chunks_exact(32).enumerate() {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                lo += (q32[l] & 0x0f) as i32 * xq[64 * j + l] as i32;
                hi += (q32[l] >> 4) as i32 * xq[64 * j + 32 + l] as i32;
            }
            *total += sc[2 * j] * lo + sc[2 * j + 1] * hi;
        }
    }
}

/// `out[r] = w · xs[r]` for one Q6_K row and up to four activation rows
/// (each block's codes unpacked once for all).
pub fn dot_q6_k(isa: Isa, w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
    assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
    assert!(xs.iter().all(|x| w.len() == x.d.len() * BLOCK));
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `Isa` only names paths the CPU has; lengths checked above.
        return unsafe {
            match xs.len() {
                1 => x86::dot_q6_k_avx2::<1>(w, xs, out),
                2 => x86::dot_q6_k_avx2::<2>(w, xs, out),
                3 => x86::dot_q6_k_avx2::<3>(w, xs, out),
                _ => x86::dot_q6_k_avx2::<4>(w, xs, out),
            }
        };
    }
    let _ = isa;
    for (x, o) in xs.iter().zip(out) {
        *o = dot_q6_k_one(w, x);
    }
}

fn dot_q6_k_one(w: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = 0.0f64;
    for (b, blk) in w.chunks_exact(BLOCK).enumerate() {
        let xq = &x.qs[b * QK_K..][..QK_K];
        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        let mut total = 0i32;
        for n in 0..2 {
            let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
            let xq = &xq[128 * n..];
            let mut sums = [0i32; 8];
            for l in 0..32 {
                let is = l / 16;
                let [q1, q2, q3, q4] = crate::quant::q6_k_codes(ql, qh, l);
                sums[is] += q1 * xq[l] as i32;
                sums[is + 2] += q2 * xq[l + 32] as i32;
                sums[is + 4] += q3 * xq[l + 64] as i32;
                sums[is + 6] += q4 * xq[l + 96] as i32;
            }
            for (s, &c) in sums.iter().zip(sc) {
                total += s * (c as i8) as i32;
            }
        }
        let dw = f16::from_le_bytes([blk[208], blk[209]]).to_f32();
        acc += dw as f64 * x.d[b] as f64 * total as f64;
    }
    acc as f32
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, Q8KRow, QK_K};
    use core::arch::x86_64::*;

    /// F16C's conversion of one f16.
    #[inline(always)]
    fn f16_to_f32(bits: u16) -> f32 {
        // SAFETY: inlined only into functions that enable F16C.
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    /// # Safety
    /// AVX2, FMA and F16C are present; `w` holds as many blocks as each row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_k_avx2<const R: usize>(w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
        super::dot_q4_k_with::<R>(
            w,
            xs,
            out,
            // SAFETY: the loop passes whole blocks; AVX2 is enabled here.
            |q, xs, b, sc, totals| unsafe { q4_k_block(q, xs, b, sc, totals) },
            f16_to_f32,
        )
    }

    /// Horizontal sum of eight i32 lanes.
    #[inline(always)]
    fn hsum(v: __m256i) -> i32 {
        // SAFETY: inlined only into functions that enable AVX2.
        unsafe {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }
    }

    /// As `super::q4_k_block`: the nibbles are split once for every row.
    ///
    /// # Safety
    /// AVX2 is enabled by the caller; `q` holds 128 bytes and each row's
    /// block `b` exists.
    #[inline(always)]
    unsafe fn q4_k_block<const R: usize>(
        q: &[u8],
        xs: &[&Q8KRow; R],
        b: usize,
        sc: &[i32; 8],
        totals: &mut [i32; R],
    ) {
        // SAFETY: the caller enables AVX2 and passes whole blocks: the 32
        // code bytes at 32j and each row's 64 activations at 64j exist.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0f);
            let mut sums = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let qv = _mm256_loadu_si256(q.as_ptr().add(32 * j).cast());
                let (lo4, hi4) = (
                    _mm256_and_si256(qv, m4),
                    _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4),
                );
                let (s_lo, s_hi) = (
                    _mm256_set1_epi16(sc[2 * j] as i16),
                    _mm256_set1_epi16(sc[2 * j + 1] as i16),
                );
                for (x, sum) in xs.iter().zip(&mut sums) {
                    let xq = x.qs.as_ptr().add(b * QK_K + 64 * j);
                    let x0 = _mm256_loadu_si256(xq.cast());
                    let x1 = _mm256_loadu_si256(xq.add(32).cast());
                    let lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo4, x0), s_lo);
                    let hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi4, x1), s_hi);
                    *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(lo, hi));
                }
            }
            for (t, s) in totals.iter_mut().zip(sums) {
                *t = hsum(s);
            }
        }
    }

    /// # Safety
    /// AVX2 is present; `w` holds as many blocks as each row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6_k_avx2<const R: usize>(w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        let m4 = _mm256_set1_epi8(0x0f);
        let m30 = _mm256_set1_epi8(0x30);
        let m32 = _mm256_set1_epi8(32);
        let mut acc = [0.0f64; R];
        for (b, blk) in w.chunks_exact(BLOCK).enumerate() {
            let p = blk.as_ptr();
            // SAFETY: the 16 scale bytes are inside the block.
            let sc = unsafe { std::slice::from_raw_parts(p.add(192).cast::<i8>(), 16) };
            let mut sums = [_mm256_setzero_si256(); R];
            for n in 0..2 {
                // SAFETY: ql (128 bytes at 0) and qh (64 at 128) are inside
                // the block.
                let (ql0, ql1, qh) = unsafe {
                    (
                        _mm256_loadu_si256(p.add(64 * n).cast()),
                        _mm256_loadu_si256(p.add(64 * n + 32).cast()),
                        _mm256_loadu_si256(p.add(128 + 32 * n).cast()),
                    )
                };
                let codes = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(qh, m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                    ),
                ];
                for (j, c) in codes.into_iter().enumerate() {
                    let wv = _mm256_sub_epi8(c, m32);
                    let wabs = _mm256_sign_epi8(wv, wv);
                    let s = 8 * n + 2 * j;
                    let scales = _mm256_set_m128i(
                        _mm_set1_epi16(sc[s + 1] as i16),
                        _mm_set1_epi16(sc[s] as i16),
                    );
                    for (x, sum) in xs.iter().zip(&mut sums) {
                        // SAFETY: codes 32j..32j+32 of this half of block b
                        // are inside the row.
                        let xv = unsafe {
                            _mm256_loadu_si256(
                                x.qs.as_ptr().add(b * QK_K + 128 * n + 32 * j).cast(),
                            )
                        };
                        let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
                        *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p16, scales));
                    }
                }
            }
            let dw = f16_to_f32(u16::from_le_bytes([blk[208], blk[209]])) as f64;
            for ((x, acc), s) in xs.iter().zip(&mut acc).zip(sums) {
                *acc += dw * x.d[b] as f64 * hsum(s) as f64;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
}
