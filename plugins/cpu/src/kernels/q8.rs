//! Activations quantized to Q8_0 blocks, and the integer dot products of
//! Q4_0, Q5_0 and Q8_0 weight rows with them: portable, AVX2 and AVX-512
//! VNNI.
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
const Q5_0_BYTES: usize = 22;
const Q8_0_BYTES: usize = 34;

/// One activation row as ggml's `block_q8_0`s, split into scales and codes.
pub struct Q8Row {
    /// Per block: the scale (an f16 value, widened).
    pub d: Vec<f32>,
    /// The codes, 32 per block.
    pub qs: Vec<i8>,
    /// The sum of each block's codes (for unsigned weight codes' offset).
    pub sums: Vec<i32>,
}

impl Q8Row {
    pub fn new(k: usize) -> Q8Row {
        Q8Row {
            d: vec![0.0; k / QK],
            qs: vec![0; k],
            sums: vec![0; k / QK],
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
                // Round half to even, as `round_ties_even` (inlined: |v·id| ≤ 127).
                *q = crate::quant::nearest_int(v * id) as i8;
            }
        }
        for (s, q) in self.sums.iter_mut().zip(self.qs.chunks_exact(QK)) {
            *s = q.iter().map(|&v| v as i32).sum();
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `out[r] = w · xs[r]` for up to four activation rows (the weight row is
/// unpacked once for all of them).
pub fn dot_rows(isa: Isa, dtype: DType, w: &[u8], xs: &[&Q8Row], out: &mut [f32]) {
    assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
    let blocks = xs[0].d.len();
    assert!(xs.iter().all(|x| x.d.len() == blocks));
    match dtype {
        DType::Q4_0 => assert_eq!(w.len(), blocks * Q4_0_BYTES),
        DType::Q5_0 => assert_eq!(w.len(), blocks * Q5_0_BYTES),
        DType::Q8_0 => assert_eq!(w.len(), blocks * Q8_0_BYTES),
        _ => unreachable!("no Q8_0 dot product for {dtype}"),
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Isa` only names paths the CPU has (`Isa::detect`), and
        // the lengths were checked above.
        Isa::Avx512 => unsafe {
            return match xs.len() {
                1 => x86::dot_vnni::<1>(dtype, w, xs, out),
                2 => x86::dot_vnni::<2>(dtype, w, xs, out),
                3 => x86::dot_vnni::<3>(dtype, w, xs, out),
                _ => x86::dot_vnni::<4>(dtype, w, xs, out),
            };
        },
        // SAFETY: as above.
        Isa::Avx2 => unsafe {
            return match xs.len() {
                1 => x86::dot_avx2::<1>(dtype, w, xs, out),
                2 => x86::dot_avx2::<2>(dtype, w, xs, out),
                3 => x86::dot_avx2::<3>(dtype, w, xs, out),
                _ => x86::dot_avx2::<4>(dtype, w, xs, out),
            };
        },
        Isa::Scalar | Isa::Reference => {}
    }
    let _ = isa;
    for (o, x) in out.iter_mut().zip(xs) {
        *o = dot_scalar(dtype, w, x);
    }
}

/// Weight rows per [`gemm16`] group.
pub const GEMM_ROWS: usize = 16;

/// Scratch for [`gemm16`], reused across calls on one thread.
#[derive(Default)]
pub struct GemmScratch {
    codes: Vec<u8>,
    dw: Vec<f64>,
}

/// `out(n, m) = w[n] · xs[m]` for up to 16 weight rows and any number of
/// activation rows, on AVX-512 VNNI with the weights laid out lane-wise:
/// lane `n` of a 512-bit register holds 4 codes of weight row `n`, so one
/// `vpdpbusd` against 4 broadcast activation codes advances 16 dot
/// products, and a block's integer sums land in 16 lanes with no
/// horizontal reduction. The codes are unpacked into that layout once per
/// call and reused for every activation row (worth it from about 4 rows).
/// Sums are scaled and accumulated in f64 block by block, in the
/// reference's order, so the results are the reference's bits.
///
/// Returns `false` (and does nothing) when the CPU lacks AVX-512 VNNI.
pub fn gemm16(
    isa: Isa,
    dtype: DType,
    ws: &[&[u8]],
    xs: &[&Q8Row],
    scratch: &mut GemmScratch,
    mut out: impl FnMut(usize, usize, f32),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && matches!(dtype, DType::Q4_0 | DType::Q5_0 | DType::Q8_0) {
        assert!(!ws.is_empty() && ws.len() <= GEMM_ROWS && !xs.is_empty());
        let nb = xs[0].d.len();
        let bytes = match dtype {
            DType::Q4_0 => Q4_0_BYTES,
            DType::Q5_0 => Q5_0_BYTES,
            _ => Q8_0_BYTES,
        };
        assert!(ws.iter().all(|w| w.len() == nb * bytes));
        assert!(xs.iter().all(|x| x.d.len() == nb));
        // SAFETY: the path is only chosen when the CPU has AVX-512 VNNI
        // (`Isa::detect`); the lengths were checked above.
        unsafe { x86::gemm16_vnni(dtype, ws, xs, scratch, &mut out) };
        return true;
    }
    let _ = (isa, dtype, ws, xs, scratch, &mut out);
    false
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
            DType::Q5_0 => {
                let blk = &w[b * Q5_0_BYTES..][..Q5_0_BYTES];
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let mut s = 0i32;
                for j in 0..16 {
                    let q = blk[6 + j];
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    s += (((q & 0x0f) as u32 | h0) as i32 - 16) * xq[j] as i32;
                    s += (((q >> 4) as u32 | h1) as i32 - 16) * xq[j + 16] as i32;
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
    use super::{GEMM_ROWS, GemmScratch, Q4_0_BYTES, Q5_0_BYTES, Q8_0_BYTES, Q8Row, QK};
    use core::arch::x86_64::*;
    use kiln_plugin_api::DType;

    /// Block `b`'s 32 weight codes as unsigned bytes (Q4_0: the nibbles;
    /// Q5_0: the nibbles with their fifth bits; Q8_0: the code + 128) and
    /// its f16 scale's bits. The offset (8, 16 or 128) times the
    /// activations' code sum is subtracted later.
    ///
    /// # Safety
    /// Block `b` is inside `w`; AVX2 is enabled by the caller.
    #[inline(always)]
    unsafe fn codes(dtype: DType, w: &[u8], b: usize) -> (__m256i, u16) {
        // SAFETY: the block is inside `w`; the loads are unaligned ones.
        unsafe {
            if dtype == DType::Q4_0 {
                let p = w.as_ptr().add(b * Q4_0_BYTES);
                let q = _mm_loadu_si128(p.add(2).cast());
                let m4 = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(q, m4);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
                (_mm256_set_m128i(hi, lo), p.cast::<u16>().read_unaligned())
            } else if dtype == DType::Q5_0 {
                let p = w.as_ptr().add(b * Q5_0_BYTES);
                let q = _mm_loadu_si128(p.add(6).cast());
                let m4 = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(q, m4);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
                // Bit i of qh becomes 0x10 in byte i: broadcast qh, give
                // each byte its own qh byte, keep one bit per byte.
                let qh = p.add(2).cast::<i32>().read_unaligned();
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh),
                    _mm256_set_epi64x(
                        0x0303030303030303,
                        0x0202020202020202,
                        0x0101010101010101,
                        0,
                    ),
                );
                let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                let high = _mm256_and_si256(set, _mm256_set1_epi8(0x10));
                (
                    _mm256_or_si256(_mm256_set_m128i(hi, lo), high),
                    p.cast::<u16>().read_unaligned(),
                )
            } else {
                let p = w.as_ptr().add(b * Q8_0_BYTES);
                let v = _mm256_loadu_si256(p.add(2).cast());
                (
                    _mm256_xor_si256(v, _mm256_set1_epi8(-128)),
                    p.cast::<u16>().read_unaligned(),
                )
            }
        }
    }

    /// The shared loop over one weight row and up to four activation
    /// rows (the weight codes unpacked once for all): four blocks at a
    /// time, their integer sums reduced to one lane each, offset-corrected,
    /// scaled and summed in f64.
    macro_rules! dot_q8 {
        ($name:ident, $features:literal, $q8_offset:expr, $prod:expr) => {
            /// # Safety
            /// The CPU has the features named; `w` and every row of `xs`
            /// hold the same number of blocks; `xs.len() <= 4 == out.len()`
            /// at most.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize>(
                dtype: DType,
                w: &[u8],
                xs: &[&Q8Row],
                out: &mut [f32],
            ) {
                // R is a constant so that the per-row sums stay in registers.
                let xs: &[&Q8Row; R] = xs[..R].try_into().expect("R rows");
                let prod = $prod;
                let q8 = dtype == DType::Q8_0;
                let offset: i32 = match dtype {
                    DType::Q8_0 => $q8_offset,
                    DType::Q5_0 => 16,
                    _ => 8,
                };
                let nb = xs[0].d.len();
                let mut acc = [_mm256_setzero_pd(); R];
                let mut b = 0;
                while b + 4 <= nb {
                    let mut u = [_mm256_setzero_si256(); 4];
                    let mut bits = [0u16; 4];
                    for j in 0..4 {
                        // SAFETY: blocks b..b+4 are inside `w`.
                        (u[j], bits[j]) = unsafe { codes(dtype, w, b + j) };
                    }
                    let dw = _mm256_cvtps_pd(_mm_cvtph_ps(_mm_set_epi16(
                        0,
                        0,
                        0,
                        0,
                        bits[3] as i16,
                        bits[2] as i16,
                        bits[1] as i16,
                        bits[0] as i16,
                    )));
                    for (x, acc) in xs.iter().zip(&mut acc) {
                        let mut p = [_mm256_setzero_si256(); 4];
                        for (j, pj) in p.iter_mut().enumerate() {
                            let at = (b + j) * QK;
                            // SAFETY: blocks b..b+4 are inside `x.qs`.
                            let xv = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(at).cast()) };
                            *pj = prod(u[j], xv, q8);
                        }
                        let h = _mm256_hadd_epi32(
                            _mm256_hadd_epi32(p[0], p[1]),
                            _mm256_hadd_epi32(p[2], p[3]),
                        );
                        let s = _mm_add_epi32(
                            _mm256_castsi256_si128(h),
                            _mm256_extracti128_si256(h, 1),
                        );
                        // SAFETY: four code sums and scales from b are inside x.
                        let (sums, dx) = unsafe {
                            (
                                _mm_loadu_si128(x.sums.as_ptr().add(b).cast()),
                                _mm_loadu_ps(x.d.as_ptr().add(b)),
                            )
                        };
                        let s = _mm_sub_epi32(s, _mm_mullo_epi32(sums, _mm_set1_epi32(offset)));
                        let scale = _mm256_mul_pd(dw, _mm256_cvtps_pd(dx));
                        *acc = _mm256_fmadd_pd(scale, _mm256_cvtepi32_pd(s), *acc);
                    }
                    b += 4;
                }
                for ((x, acc), o) in xs.iter().zip(&acc).zip(out.iter_mut()) {
                    let s =
                        _mm_add_pd(_mm256_castpd256_pd128(*acc), _mm256_extractf128_pd(*acc, 1));
                    let mut total = _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
                    for b in b..nb {
                        // SAFETY: block b is inside `w` and `x.qs`.
                        let (u, d) = unsafe { codes(dtype, w, b) };
                        // SAFETY: as above.
                        let xv = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(b * QK).cast()) };
                        let p = prod(u, xv, q8);
                        let s = _mm_add_epi32(
                            _mm256_castsi256_si128(p),
                            _mm256_extracti128_si256(p, 1),
                        );
                        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                        let sumi = _mm_cvtsi128_si32(s) - x.sums[b] * offset;
                        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)));
                        total += dw as f64 * x.d[b] as f64 * sumi as f64;
                    }
                    *o = total as f32;
                }
            }
        };
    }

    /// See [`super::gemm16`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; every row of
    /// `ws` holds as many blocks of `dtype` as every row of `xs`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn gemm16_vnni(
        dtype: DType,
        ws: &[&[u8]],
        xs: &[&Q8Row],
        scratch: &mut GemmScratch,
        out: &mut dyn FnMut(usize, usize, f32),
    ) {
        let nb = xs[0].d.len();
        let offset: i32 = match dtype {
            DType::Q8_0 => 128,
            DType::Q5_0 => 16,
            _ => 8,
        };
        // Codes of block b: 8 groups of 4 codes; group j of row n at
        // ((b * 8 + j) * 16 + n) * 4. Missing rows stay zero.
        scratch.codes.clear();
        scratch.codes.resize(nb * 8 * GEMM_ROWS * 4, 0);
        scratch.dw.clear();
        scratch.dw.resize(nb * GEMM_ROWS, 0.0);
        let mut row = [0u8; QK];
        for (n, w) in ws.iter().enumerate() {
            for b in 0..nb {
                // SAFETY: block b is inside `w` (checked by the caller).
                let (u, bits) = unsafe { codes(dtype, w, b) };
                // SAFETY: `row` holds 32 bytes.
                unsafe { _mm256_storeu_si256(row.as_mut_ptr().cast(), u) };
                crate::kernels::lanes::scatter(&mut scratch.codes, &row, b, n);
                scratch.dw[b * GEMM_ROWS + n] =
                    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) as f64;
            }
        }
        let rows = ws.len();
        // SAFETY: the scratch holds nb blocks for 16 rows; the caller's
        // contract covers the activation rows.
        unsafe {
            in_groups_of_four!(xs.len(), m0 => gemm_rows(scratch, &xs[m0..], nb, offset, rows, m0, out))
        };
    }

    /// `R` activation rows against the unpacked 16 weight rows. The rows'
    /// dot products run as `R` independent chains (one `vpdpbusd` chain
    /// alone would wait on its own latency).
    ///
    /// # Safety
    /// As [`gemm16_vnni`]; `xs` has at least `R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_rows<const R: usize>(
        scratch: &GemmScratch,
        xs: &[&Q8Row],
        nb: usize,
        offset: i32,
        rows: usize,
        m0: usize,
        out: &mut dyn FnMut(usize, usize, f32),
    ) {
        let xs: &[&Q8Row; R] = xs[..R].try_into().expect("R rows");
        let codes_p = scratch.codes.as_ptr();
        let dw_p = scratch.dw.as_ptr();
        let mut acc = [[_mm512_setzero_pd(); 2]; R];
        for b in 0..nb {
            let mut sum = [_mm512_setzero_si512(); R];
            for (r, x) in xs.iter().enumerate() {
                sum[r] = _mm512_set1_epi32(-offset * x.sums[b]);
            }
            for j in 0..8 {
                // SAFETY: group j of block b is inside the scratch.
                let wj = unsafe { _mm512_loadu_si512(codes_p.add((b * 8 + j) * 64).cast()) };
                for (r, x) in xs.iter().enumerate() {
                    // SAFETY: codes 4j..4j+4 of block b are inside the row.
                    let xv = unsafe {
                        x.qs.as_ptr()
                            .add(b * QK + 4 * j)
                            .cast::<i32>()
                            .read_unaligned()
                    };
                    sum[r] = _mm512_dpbusd_epi32(sum[r], wj, _mm512_set1_epi32(xv));
                }
            }
            // SAFETY: the 16 scales of block b are inside the scratch.
            let (dw_lo, dw_hi) = unsafe {
                (
                    _mm512_loadu_pd(dw_p.add(b * GEMM_ROWS)),
                    _mm512_loadu_pd(dw_p.add(b * GEMM_ROWS + 8)),
                )
            };
            for (r, x) in xs.iter().enumerate() {
                let dx = _mm512_set1_pd(x.d[b] as f64);
                let lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(sum[r]));
                let hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(sum[r], 1));
                acc[r][0] = _mm512_fmadd_pd(_mm512_mul_pd(dw_lo, dx), lo, acc[r][0]);
                acc[r][1] = _mm512_fmadd_pd(_mm512_mul_pd(dw_hi, dx), hi, acc[r][1]);
            }
        }
        // SAFETY: AVX-512 F is enabled here.
        unsafe { crate::kernels::lanes::emit(&acc, rows, m0, out) };
    }

    // AVX2 multiplies u8 by i8 into saturating i16 pairs: fine for Q4_0's
    // and Q5_0's codes (at most 2·31·128), not for Q8_0's code + 128, which takes the sign trick
    // (|w| times x with w's sign) and so needs no offset.
    dot_q8!(dot_avx2, "avx2,fma,f16c", 0, |u, xv, q8: bool| {
        let (a, b) = if q8 {
            let w = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
            (_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w))
        } else {
            (u, xv)
        };
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    });
    dot_q8!(
        dot_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
        128,
        |u, xv, _q8: bool| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, xv)
    );
}
