//! Q4_K, Q5_K and Q6_K weight rows against activations quantized to Q8_K
//! (ggml's `vec_dot_type` for the K-quants): portable, AVX2 and AVX-512
//! VNNI, with lane-wise GEMMs for batches (AVX-512 and AVX2); Q2_K, Q3_K and IQ4_XS on AVX2 (which AVX-512 CPUs
//! run too); every type on NEON (block sums in `neon.rs`) and portable.
//!
//! Sums are integers per block, scaled in f64. The reference multiplies
//! by the f32-rounded activation `q·d` where this uses `q` and `d` apart
//! (as ggml does), so the two can differ in the last bits; tests bound it.

use super::{GEMM_GROUP, Isa};
use half::f16;
use kiln_blocks::nearest_int;
use kiln_plugin_api::DType;

const QK_K: usize = 256;

const BLOCK: usize = 210;
const Q4_K_BLOCK: usize = 144;
const Q5_K_BLOCK: usize = 176;
const Q2_K_BLOCK: usize = 84;
const Q3_K_BLOCK: usize = 110;
const IQ4_XS_BLOCK: usize = 136;

/// Returns [`portable`]`(isum, $term, $bytes, w, xs, out)` with NEON's
/// block sums `neon::$neon` as `isum` where `$isa` is NEON, else with
/// the portable `$isum`: a row kernel's last resort, every path the same
/// bits (exact integer block sums, one f64 scaling).
macro_rules! neon_or_portable {
    ($isa:expr, $neon:ident, $isum:expr, $term:expr, $bytes:expr, $w:expr, $xs:expr, $out:expr) => {{
        #[cfg(target_arch = "aarch64")]
        if $isa == Isa::Neon {
            let neon = |blk: &[u8], xq: &[i8]| {
                let mut isum = [0];
                super::neon::$neon(blk, xq, &mut isum);
                isum[0]
            };
            return portable(neon, $term, $bytes, $w, $xs, $out);
        }
        let _ = $isa;
        portable($isum, $term, $bytes, $w, $xs, $out)
    }};
}

/// One activation row as ggml's `block_q8_K`s (without the sums).
pub struct Q8KRow {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    /// The sum of the codes of each 32, for the K-quants' minimums.
    pub sums32: Vec<i32>,
    /// The sum of the codes of each 16 (Q6_K's sub-blocks, for the GEMM's
    /// offset of its unsigned codes).
    pub sums16: Vec<i32>,
    /// `sums32` in pairs of i16 (each sum is at most 32 · 128), for the
    /// Q4_K GEMM's `vpdpwssd` against pairs of minimums.
    pub sums_pairs: Vec<i32>,
    /// `sums16` in pairs of i16, for the Q6_K GEMM's `vpdpwssd` against
    /// pairs of scales (its codes' offset).
    pub sums16_pairs: Vec<i32>,
}

impl Q8KRow {
    pub fn new(k: usize) -> Q8KRow {
        Q8KRow {
            d: vec![0.0; k / QK_K],
            qs: vec![0; k],
            sums32: vec![0; k / 32],
            sums16: vec![0; k / 16],
            sums_pairs: vec![0; k / 64],
            sums16_pairs: vec![0; k / 32],
        }
    }

    /// Makes this a row as [`Q8KRow::new`] makes one, in the buffers it
    /// has (which grow only past the largest `k` they held).
    pub fn reset(&mut self, k: usize) {
        self.d.resize(k / QK_K, 0.0);
        self.qs.resize(k, 0);
        self.sums32.resize(k / 32, 0);
        self.sums16.resize(k / 16, 0);
        self.sums_pairs.resize(k / 64, 0);
        self.sums16_pairs.resize(k / 32, 0);
    }

    /// Fills [`Q8KRow::sums_pairs`] from `sums32` and
    /// [`Q8KRow::sums16_pairs`] from `sums16`.
    fn pair_sums(&mut self) {
        for (pairs, sums) in [
            (&mut self.sums_pairs, &self.sums32),
            (&mut self.sums16_pairs, &self.sums16),
        ] {
            for (p, two) in pairs.iter_mut().zip(sums.chunks_exact(2)) {
                *p = (two[0] as i16 as u16 as i32) | (two[1] << 16);
            }
        }
    }

    /// As the reference's `round_activations` for K-quant weights: `qs·d`
    /// is its rounded value (before that product's own f32 rounding).
    pub fn quantize(&mut self, isa: Isa, x: &[f32]) {
        assert_eq!(x.len(), self.qs.len());
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            // SAFETY: the CPU has AVX-512 (`Isa`); lengths checked above.
            unsafe { x86::quantize_q8_k(self, x) };
            self.pair_sums();
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY: the CPU has AVX2 (`Isa`); lengths checked above.
            unsafe { x86::quantize_q8_k_avx2(self, x) };
            self.pair_sums();
            return;
        }
        let _ = isa;
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
        for (s, q) in self.sums16.iter_mut().zip(self.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| v as i32).sum();
        }
        for (s, pair) in self.sums32.iter_mut().zip(self.sums16.chunks_exact(2)) {
            *s = pair[0] + pair[1];
        }
        self.pair_sums();
    }
}

/// The row kernel for `dtype`'s weights (Q4_K, Q5_K or Q6_K).
pub fn row_dot(dtype: DType) -> fn(Isa, &[u8], &[&Q8KRow], &mut [f32]) {
    match dtype {
        DType::Q4_K => dot_q4_k,
        DType::Q5_K => dot_q5_k,
        DType::Q6_K => dot_q6_k,
        DType::Q2_K => dot_q2_k,
        DType::Q3_K => dot_q3_k,
        DType::IQ4_XS => dot_iq4_xs,
        _ => unreachable!("no Q8_K dot product for {dtype}"),
    }
}

/// Q2_K, Q3_K and IQ4_XS rows: AVX2 on x86-64 (AVX-512 CPUs run it too),
/// NEON block sums on aarch64, else the portable kernels; every path gives
/// the portable kernel's bits (exact integer sums, the same f64 order).
macro_rules! simd_or_portable {
    ($name:ident, $avx2:ident, $vnni:ident, $neon:ident, $isum:ident, $term:expr, $bytes:expr) => {
        fn $name(isa: Isa, w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
            assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
            assert!(xs.iter().all(|x| w.len() == x.d.len() * $bytes));
            #[cfg(target_arch = "x86_64")]
            if isa >= Isa::Avx2 {
                // SAFETY: `Isa` only names paths the CPU has; lengths
                // checked above.
                return unsafe {
                    if isa == Isa::AvxVnni {
                        by_rows!(xs.len() => $vnni[](w, xs, out))
                    } else {
                        by_rows!(xs.len() => $avx2[](w, xs, out))
                    }
                };
            }
            neon_or_portable!(isa, $neon, $isum, $term, $bytes, w, xs, out)
        }
    };
}

simd_or_portable!(
    dot_q2_k,
    dot_q2_k_avx2,
    dot_q2_k_avxvnni,
    block_sums_q2_k,
    q2_k_isum,
    q2_k_term,
    Q2_K_BLOCK
);
simd_or_portable!(
    dot_q3_k,
    dot_q3_k_avx2,
    dot_q3_k_avxvnni,
    block_sums_q3_k,
    q3_k_isum,
    d_term::<108>,
    Q3_K_BLOCK
);
simd_or_portable!(
    dot_iq4_xs,
    dot_iq4_xs_avx2,
    dot_iq4_xs_avxvnni,
    block_sums_iq4_xs,
    iq4_xs_isum,
    d_term::<0>,
    IQ4_XS_BLOCK
);

/// `out[r] = w · xs[r]`, block by block: `isum` is a block's exact
/// integer sum against its 256 activation codes, `term` that block's
/// share of the dot product from it (the same for every path).
fn portable(
    isum: fn(&[u8], &[i8]) -> i32,
    term: fn(&[u8], &Q8KRow, usize, i32) -> f64,
    bytes: usize,
    w: &[u8],
    xs: &[&Q8KRow],
    out: &mut [f32],
) {
    for (x, o) in xs.iter().zip(out) {
        let mut acc = 0.0f64;
        for (b, blk) in w.chunks_exact(bytes).enumerate() {
            acc += term(blk, x, b, isum(blk, &x.qs[b * QK_K..][..QK_K]));
        }
        *o = acc as f32;
    }
}

fn f16_at(blk: &[u8], at: usize) -> f64 {
    f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32() as f64
}

/// Q2_K (ggml's `vec_dot_q2_K_q8_K`): per block of 256, sixteen 2-bit
/// sub-blocks of 16 with 4-bit scales and minimums; this is
/// `Σ sc_j (q·x)_j`, [`q2_k_term`] makes
/// `d·d_x·Σ sc_j (q·x)_j − dmin·d_x·Σ m_j Σx_j`.
fn q2_k_isum(blk: &[u8], xq: &[i8]) -> i32 {
    let (scales, q) = (&blk[0..16], &blk[16..80]);
    let mut isum = 0i32;
    for (i, &sc) in scales.iter().enumerate() {
        // Sub-block i: half n, shift 2j, the 16 bytes at 16·(i % 2).
        let (n, j, h) = (i / 8, (i % 8) / 2, i % 2);
        let mut s = 0i32;
        for l in 0..16 {
            let code = (q[32 * n + 16 * h + l] >> (2 * j)) & 3;
            s += code as i32 * xq[16 * i + l] as i32;
        }
        isum += (sc & 0x0f) as i32 * s;
    }
    isum
}

fn q2_k_term(blk: &[u8], x: &Q8KRow, b: usize, isum: i32) -> f64 {
    let mut summs = 0i32;
    for (&sc, &s16) in blk[0..16].iter().zip(&x.sums16[b * 16..][..16]) {
        summs += (sc >> 4) as i32 * s16;
    }
    q2_k_scaled(f16_at(blk, 80), f16_at(blk, 82), x.d[b], isum, summs)
}

/// A Q2_K block's term from its scales `d`, `dmin` and two integer sums
/// (scales, minimums).
#[inline(always)]
fn q2_k_scaled(d: f64, dmin: f64, dx: f32, isum: i32, summs: i32) -> f64 {
    let dx = dx as f64;
    d * dx * isum as f64 - dmin * dx * summs as f64
}

/// Q3_K: codes in [−4, 3] (two low bits and a high-bit mask), sixteen
/// 6-bit scales less 32: `Σ sc_j (q·x)_j`, times `d·d_x` ([`d_term`]).
fn q3_k_isum(blk: &[u8], xq: &[i8]) -> i32 {
    let (hm, q) = (&blk[0..32], &blk[32..96]);
    let scales = kiln_blocks::q3_k_scales(&blk[96..108]);
    let mut isum = 0i32;
    for (i, &sc) in scales.iter().enumerate() {
        let (n, j, h) = (i / 8, (i % 8) / 2, i % 2);
        let m = 1u8 << (4 * n + j);
        let mut s = 0i32;
        for l in 0..16 {
            let at = 16 * h + l;
            let low = ((q[32 * n + at] >> (2 * j)) & 3) as i32;
            let code = low - if hm[at] & m != 0 { 0 } else { 4 };
            s += code * xq[16 * i + l] as i32;
        }
        isum += (sc as i32 - 32) * s;
    }
    isum
}

/// `d·d_x·isum` for the types whose scale `d` is the block's last f16
/// (Q3_K) or first (IQ4_XS).
fn d_term<const AT: usize>(blk: &[u8], x: &Q8KRow, b: usize, isum: i32) -> f64 {
    d_scaled(f16_at(blk, AT), x.d[b], isum)
}

#[inline(always)]
fn d_scaled(d: f64, dx: f32, isum: i32) -> f64 {
    d * dx as f64 * isum as f64
}

/// IQ4_XS: eight sub-blocks of 32 codes from IQ4_NL's table, 6-bit scales
/// less 32: `Σ sc_j (v·x)_j`, times `d·d_x`.
fn iq4_xs_isum(blk: &[u8], xq: &[i8]) -> i32 {
    const V: [i8; 16] = kiln_blocks::IQ4_VALUES;
    let scales_h = u16::from_le_bytes([blk[2], blk[3]]);
    let mut isum = 0i32;
    for (ib, qs) in blk[8..136].chunks_exact(16).enumerate() {
        let xs = &xq[32 * ib..][..32];
        let mut s = 0i32;
        for (j, &q) in qs.iter().enumerate() {
            s += V[(q & 0x0f) as usize] as i32 * xs[j] as i32;
            s += V[(q >> 4) as usize] as i32 * xs[j + 16] as i32;
        }
        isum += (kiln_blocks::iq4_xs_scale(&blk[4..8], scales_h, ib) - 32) * s;
    }
    isum
}

/// `out[r] = w · xs[r]` for one Q4_K row and up to four activation rows
/// (each block's scales decoded once for all): per block,
/// `d·Σ sc_j (q·x)_j − dmin·Σ m_j Σx_j`.
pub fn dot_q4_k(isa: Isa, w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
    assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
    assert!(xs.iter().all(|x| w.len() == x.d.len() * Q4_K_BLOCK));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `Isa` only names paths the CPU has; lengths checked above.
        return unsafe {
            match xs.len() {
                1 => x86::dot_q4_k_vnni::<1, false>(w, xs, out),
                2 => x86::dot_q4_k_vnni::<2, false>(w, xs, out),
                3 => x86::dot_q4_k_vnni::<3, false>(w, xs, out),
                _ => x86::dot_q4_k_vnni::<4, false>(w, xs, out),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `Isa` only names paths the CPU has; lengths checked above.
        return unsafe {
            if isa == Isa::AvxVnni {
                by_rows!(xs.len() => dot_q4_k_avxvnni[false](w, xs, out))
            } else {
                by_rows!(xs.len() => dot_q4_k_avx2[false](w, xs, out))
            }
        };
    }
    neon_or_portable!(
        isa,
        block_sums_q4_k,
        q4_k_isum,
        q45_k_term,
        Q4_K_BLOCK,
        w,
        xs,
        out
    )
}

/// `out[r] = w · xs[r]` for one Q5_K row and up to four activation rows:
/// Q4_K's arithmetic with a fifth bit per code (from `qh`): kernels on
/// AVX-512 VNNI and AVX2 (Q4_K's, with AVX-VNNI where present), NEON's
/// block sums on aarch64, else the portable loop.
pub fn dot_q5_k(isa: Isa, w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
    assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
    assert!(xs.iter().all(|x| w.len() == x.d.len() * Q5_K_BLOCK));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `Isa` only names paths the CPU has; lengths checked above.
        return unsafe {
            match xs.len() {
                1 => x86::dot_q4_k_vnni::<1, true>(w, xs, out),
                2 => x86::dot_q4_k_vnni::<2, true>(w, xs, out),
                3 => x86::dot_q4_k_vnni::<3, true>(w, xs, out),
                _ => x86::dot_q4_k_vnni::<4, true>(w, xs, out),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `Isa` only names paths the CPU has; lengths checked above.
        return unsafe {
            if isa == Isa::AvxVnni {
                by_rows!(xs.len() => dot_q4_k_avxvnni[true](w, xs, out))
            } else {
                by_rows!(xs.len() => dot_q4_k_avx2[true](w, xs, out))
            }
        };
    }
    neon_or_portable!(
        isa,
        block_sums_q5_k,
        q5_k_isum,
        q45_k_term,
        Q5_K_BLOCK,
        w,
        xs,
        out
    )
}

/// Q5_K's `Σ sc_j (q·x)_j` over a block: Q4_K's with 5-bit codes (the
/// fifth bit of code `l` of sub-block `j` is bit `j` of `qh[l]`).
fn q5_k_isum(blk: &[u8], xq: &[i8]) -> i32 {
    let (qh, qs) = (&blk[16..48], &blk[48..176]);
    let mut total = 0i32;
    for j in 0..8 {
        let (sc, _) = kiln_blocks::scale_min_k4(j, &blk[4..16]);
        let mut sum = 0i32;
        for l in 0..32 {
            let byte = qs[32 * (j / 2) + l];
            let nibble = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            let code = nibble as i32 | (((qh[l] >> j) & 1) as i32) << 4;
            sum += code * xq[32 * j + l] as i32;
        }
        total += sc as i32 * sum;
    }
    total
}

/// Q4_K's `Σ sc_j (q·x)_j` over a block (eight sub-blocks of 32, 6-bit
/// scales; each 32 code bytes hold two, low nibbles first).
fn q4_k_isum(blk: &[u8], xq: &[i8]) -> i32 {
    let mut total = 0i32;
    for (j, q32) in blk[16..144].chunks_exact(32).enumerate() {
        let (sc_lo, _) = kiln_blocks::scale_min_k4(2 * j, &blk[4..16]);
        let (sc_hi, _) = kiln_blocks::scale_min_k4(2 * j + 1, &blk[4..16]);
        let (mut lo, mut hi) = (0i32, 0i32);
        for l in 0..32 {
            lo += (q32[l] & 0x0f) as i32 * xq[64 * j + l] as i32;
            hi += (q32[l] >> 4) as i32 * xq[64 * j + 32 + l] as i32;
        }
        total += sc_lo as i32 * lo + sc_hi as i32 * hi;
    }
    total
}

/// A Q4_K or Q5_K block's term from its `Σ sc_j (q·x)_j`: `x.d · (d ·
/// isum − dmin · Σ m_j Σx_j)` in f64, as every path computes it.
fn q45_k_term(blk: &[u8], x: &Q8KRow, b: usize, isum: i32) -> f64 {
    let mut total_m = 0i32;
    for j in 0..8 {
        let (_, m) = kiln_blocks::scale_min_k4(j, &blk[4..16]);
        total_m += m as i32 * x.sums32[b * 8 + j];
    }
    x.d[b] as f64 * (f16_at(blk, 0) * isum as f64 - f16_at(blk, 2) * total_m as f64)
}

/// Scratch for [`gemm16`], reused across calls on one thread.
#[derive(Default)]
pub struct GemmScratch {
    codes: Vec<u8>,
    sc: Vec<i32>,
    mins: Vec<i32>,
    d: Vec<f64>,
    dmin: Vec<f64>,
}

impl GemmScratch {
    /// Sizes (and zeroes) the AVX2 GEMMs' layout for `blocks` blocks of
    /// halves of 8 rows with `subs` sub-blocks each: per block 64 groups
    /// of 32 code bytes, `subs` scales and `subs / 2` pairs a row, `d` and
    /// `dmin` a row.
    #[cfg(target_arch = "x86_64")]
    fn reset(&mut self, blocks: usize, subs: usize) {
        const HALF: usize = GEMM_GROUP / 2;
        for (v, len) in [
            (&mut self.sc, blocks * subs * HALF),
            (&mut self.mins, blocks * subs / 2 * HALF),
        ] {
            v.clear();
            v.resize(len, 0);
        }
        self.codes.clear();
        self.codes.resize(blocks * 64 * 32, 0);
        for v in [&mut self.d, &mut self.dmin] {
            v.clear();
            v.resize(blocks * HALF, 0.0);
        }
    }

    /// Sub-block `i` (block-major: `at·subs + j`) of row `n`: its scale,
    /// as an i32 for the VNNI kernels or twice as i16s for `vpmaddwd`,
    /// and `m`, what the activations' sums are weighted by, into its pair.
    #[cfg(target_arch = "x86_64")]
    fn put_scale(&mut self, vnni: bool, i: usize, n: usize, sc: i32, m: i32) {
        const HALF: usize = GEMM_GROUP / 2;
        let sc16 = sc as i16 as u16 as i32;
        self.sc[i * HALF + n] = if vnni { sc } else { sc16 | (sc16 << 16) };
        self.mins[i / 2 * HALF + n] |= (m as i16 as u16 as i32) << (16 * (i % 2));
    }
}

/// `out.row(m)[n] = w[n] · xs[m]` for up to 16 Q4_K, Q5_K or Q6_K weight rows
/// and any number of activation rows, on AVX-512 VNNI, lane-wise as
/// `q8::gemm16`: the codes are unpacked once per call so that lane `n` of
/// a register holds 4 codes of row `n`; each sub-block's sums are scaled
/// per lane and a block is scaled in f64 exactly as the row kernels do it
/// (same results). Q4_K/Q5_K: the minimums' part comes from the
/// activations' sums of 32. Q6_K: codes unsigned, the offset of 32 taken
/// off with the activations' sums of 16, one scale per 16 codes.
///
/// On AVX2, the same at 8 rows a register ([`x86::gemm16_q4_k_avx2`],
/// [`x86::gemm16_k16_avx2`]). Returns `false` (and does nothing) where
/// [`has_gemm`] says no.
pub fn gemm16(
    isa: Isa,
    dtype: DType,
    ws: &[&[u8]],
    xs: &[&Q8KRow],
    scratch: &mut GemmScratch,
    out: &mut crate::kernels::Tile,
) -> bool {
    if !has_gemm(isa, dtype) {
        return false;
    }
    assert!(!ws.is_empty() && ws.len() <= GEMM_GROUP && !xs.is_empty());
    let nb = xs[0].d.len();
    assert!(ws.iter().all(|w| w.len() == nb * dtype.block_bytes()));
    assert!(xs.iter().all(|x| x.d.len() == nb));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `has_gemm` names only paths the CPU has (`Isa::detect`:
    // AVX-512 VNNI, or AVX2 with FMA and F16C); lengths checked above.
    unsafe {
        const Q2: u32 = DType::Q2_K.raw();
        const Q3: u32 = DType::Q3_K.raw();
        const Q6: u32 = DType::Q6_K.raw();
        // AVX-512 CPUs run the AVX2 GEMMs of Q2_K, Q3_K and IQ4_XS, with
        // AVX-VNNI where they have it too (Sapphire Rapids, Zen 5).
        let vnni = isa == Isa::AvxVnni || (isa == Isa::Avx512 && super::has_avx_vnni());
        match (isa, dtype) {
            (_, DType::IQ4_XS) if vnni => x86::gemm16_iq4_xs_avx2::<true>(ws, xs, scratch, out),
            (_, DType::IQ4_XS) => x86::gemm16_iq4_xs_avx2::<false>(ws, xs, scratch, out),
            (_, DType::Q2_K) if vnni => x86::gemm16_k16_avx2::<Q2, true>(ws, xs, scratch, out),
            (_, DType::Q3_K) if vnni => x86::gemm16_k16_avx2::<Q3, true>(ws, xs, scratch, out),
            (Isa::AvxVnni, DType::Q4_K) => {
                x86::gemm16_q4_k_avx2::<false, true>(ws, xs, scratch, out)
            }
            (Isa::AvxVnni, DType::Q5_K) => {
                x86::gemm16_q4_k_avx2::<true, true>(ws, xs, scratch, out)
            }
            (_, DType::Q2_K) => x86::gemm16_k16_avx2::<Q2, false>(ws, xs, scratch, out),
            (_, DType::Q3_K) => x86::gemm16_k16_avx2::<Q3, false>(ws, xs, scratch, out),
            (Isa::Avx512, DType::Q4_K) => x86::gemm16_q4_k_vnni::<false>(ws, xs, scratch, out),
            (Isa::Avx512, DType::Q5_K) => x86::gemm16_q4_k_vnni::<true>(ws, xs, scratch, out),
            (Isa::Avx512, _) => x86::gemm16_q6_k_vnni(ws, xs, scratch, out),
            (Isa::AvxVnni, _) => x86::gemm16_k16_avx2::<Q6, true>(ws, xs, scratch, out),
            (_, DType::Q4_K) => x86::gemm16_q4_k_avx2::<false, false>(ws, xs, scratch, out),
            (_, DType::Q5_K) => x86::gemm16_q4_k_avx2::<true, false>(ws, xs, scratch, out),
            _ => x86::gemm16_k16_avx2::<Q6, false>(ws, xs, scratch, out),
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (scratch, out);
    true
}

/// Whether [`gemm16`] runs `dtype` on `isa`: Q2_K…Q6_K and IQ4_XS on
/// AVX-512 and AVX2 (with or without AVX-VNNI).
pub fn has_gemm(isa: Isa, dtype: DType) -> bool {
    cfg!(target_arch = "x86_64")
        && isa >= Isa::Avx2
        && matches!(
            dtype,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS
        )
}

/// `out[r] = w · xs[r]` for one Q6_K row and up to four activation rows
/// (each block's codes unpacked once for all).
pub fn dot_q6_k(isa: Isa, w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
    assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
    assert!(xs.iter().all(|x| w.len() == x.d.len() * BLOCK));
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `Isa` only names paths the CPU has; lengths checked above.
        return unsafe {
            match xs.len() {
                1 => x86::dot_q6_k_vnni::<1>(w, xs, out),
                2 => x86::dot_q6_k_vnni::<2>(w, xs, out),
                3 => x86::dot_q6_k_vnni::<3>(w, xs, out),
                _ => x86::dot_q6_k_vnni::<4>(w, xs, out),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `Isa` only names paths the CPU has; lengths checked above.
        return unsafe {
            if isa == Isa::AvxVnni {
                by_rows!(xs.len() => dot_q6_k_avxvnni[](w, xs, out))
            } else {
                by_rows!(xs.len() => dot_q6_k_avx2[](w, xs, out))
            }
        };
    }
    neon_or_portable!(
        isa,
        block_sums_q6_k,
        q6_k_isum,
        q6_k_term,
        BLOCK,
        w,
        xs,
        out
    )
}

/// Q6_K's `Σ sc_j (q·x)_j` over a block (sixteen sub-blocks of 16,
/// signed 8-bit scales).
fn q6_k_isum(blk: &[u8], xq: &[i8]) -> i32 {
    let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
    let mut total = 0i32;
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let xq = &xq[128 * n..];
        let mut sums = [0i32; 8];
        for l in 0..32 {
            let is = l / 16;
            let [q1, q2, q3, q4] = kiln_blocks::q6_k_codes(ql, qh, l);
            sums[is] += q1 * xq[l] as i32;
            sums[is + 2] += q2 * xq[l + 32] as i32;
            sums[is + 4] += q3 * xq[l + 64] as i32;
            sums[is + 6] += q4 * xq[l + 96] as i32;
        }
        for (s, &c) in sums.iter().zip(sc) {
            total += s * (c as i8) as i32;
        }
    }
    total
}

/// A Q6_K block's term from its `Σ sc_j (q·x)_j`: `d · x.d · isum` in
/// f64, as every path computes it.
fn q6_k_term(blk: &[u8], x: &Q8KRow, b: usize, isum: i32) -> f64 {
    f16_at(blk, 208) * x.d[b] as f64 * isum as f64
}

/// `out(n, w(n) · x)` for the weight rows `n` in `rows` (in the order
/// given) against one activation row: decode's loop, the same bits as
/// [`row_dot`]'s kernels row by row. Q4_K, Q5_K and Q6_K run it inside one kernel function on
/// x86 (see `x86::rows!`); the other types and paths call [`row_dot`]'s
/// kernel per row.
pub fn dot_row_range<'w>(
    isa: Isa,
    dtype: DType,
    x: &Q8KRow,
    rows: impl Iterator<Item = usize>,
    w: impl Fn(usize) -> &'w [u8],
    mut out: impl FnMut(usize, f32),
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(bytes) = dtype.row_bytes(x.qs.len()) {
        // SAFETY: `Isa` only names paths the CPU has (AVX2 ones with FMA
        // and F16C); the kernels check each row's length against `bytes`,
        // which holds as many blocks as `x`.
        unsafe {
            match (isa, dtype) {
                (Isa::Avx512, DType::Q4_K) => return x86::rows_q4_k_vnni(x, rows, bytes, w, out),
                (Isa::Avx512, DType::Q5_K) => return x86::rows_q5_k_vnni(x, rows, bytes, w, out),
                (Isa::Avx512, DType::Q6_K) => return x86::rows_q6_k_vnni(x, rows, bytes, w, out),
                (Isa::AvxVnni, DType::Q4_K) => {
                    return x86::rows_q4_k_avxvnni(x, rows, bytes, w, out);
                }
                (Isa::AvxVnni, DType::Q5_K) => {
                    return x86::rows_q5_k_avxvnni(x, rows, bytes, w, out);
                }
                (Isa::AvxVnni, DType::Q6_K) => {
                    return x86::rows_q6_k_avxvnni(x, rows, bytes, w, out);
                }
                (Isa::Avx2, DType::Q4_K) => return x86::rows_q4_k_avx2(x, rows, bytes, w, out),
                (Isa::Avx2, DType::Q5_K) => return x86::rows_q5_k_avx2(x, rows, bytes, w, out),
                (Isa::Avx2, DType::Q6_K) => return x86::rows_q6_k_avx2(x, rows, bytes, w, out),
                _ => {}
            }
        }
    }
    let dot = row_dot(dtype);
    let mut o = [0f32];
    for n in rows {
        dot(isa, w(n), &[x], &mut o);
        out(n, o[0]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{
        BLOCK, DType, GEMM_GROUP, GemmScratch, IQ4_XS_BLOCK, Q2_K_BLOCK, Q3_K_BLOCK, Q4_K_BLOCK,
        Q5_K_BLOCK, Q8KRow, QK_K,
    };
    use core::arch::x86_64::*;

    /// A Q5_K (`q5`) or Q4_K block's bytes and where its codes start.
    const fn q45_layout(q5: bool) -> (usize, usize) {
        if q5 {
            (Q5_K_BLOCK, 48)
        } else {
            (Q4_K_BLOCK, 16)
        }
    }

    /// F16C's conversion of one f16.
    #[inline(always)]
    fn f16_to_f32(bits: u16) -> f32 {
        // SAFETY: inlined only into functions that enable F16C.
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) }
    }

    // Adding i16 products times i16 scales, pairwise, into i32 sums:
    // `vpmaddwd` and an add, or AVX-VNNI's `vpdpwssd` (the same exact
    // integers). Closures written inside the `#[target_feature]` wrappers,
    // so they have the wrappers' features and are inlined into the kernels.
    macro_rules! madd_i16 {
        () => {
            |s, p, sc| _mm256_add_epi32(s, _mm256_madd_epi16(p, sc))
        };
    }
    macro_rules! dpwssd {
        () => {
            |s, p, sc| _mm256_dpwssd_avx_epi32(s, p, sc)
        };
    }

    /// `pub` AVX2 and AVX-VNNI entry points of a row kernel body
    /// `body(w, xs, out, madd)`: `$avx2` with `vpmaddwd` and an add,
    /// `$vnni` with `vpdpwssd` (the same integers).
    macro_rules! avx2_and_vnni {
        ($($body:ident => $avx2:ident, $vnni:ident;)*) => {$(
            /// The AVX2 entry point of [`$body`].
            ///
            /// # Safety
            /// As [`$body`].
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $avx2<const R: usize>(w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
                // SAFETY: the caller's contract.
                unsafe { $body::<R>(w, xs, out, madd_i16!()) }
            }

            /// The AVX-VNNI entry point of [`$body`].
            ///
            /// # Safety
            /// As [`$body`], and the CPU has AVX-VNNI.
            #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
            pub unsafe fn $vnni<const R: usize>(w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
                // SAFETY: the caller's contract.
                unsafe { $body::<R>(w, xs, out, dpwssd!()) }
            }
        )*};
    }
    avx2_and_vnni! {
        dot_q2_k_by => dot_q2_k_avx2, dot_q2_k_avxvnni;
        dot_q3_k_by => dot_q3_k_avx2, dot_q3_k_avxvnni;
        dot_iq4_xs_by => dot_iq4_xs_avx2, dot_iq4_xs_avxvnni;
        dot_q6_k_by => dot_q6_k_avx2, dot_q6_k_avxvnni;
    }

    /// Q4_K (and, with `Q5`, Q5_K: a fifth bit per code from `qh`, bit
    /// `j` of `qh[l]` for sub-block `j`) rows on AVX2 for `R` activation
    /// rows: per block the scales
    /// and minimums unpacked once for every row ([`q4_k_scales`]), each
    /// sub-block's scale spread over its lanes with one `vpshufb`, the
    /// minimums' part one `vpmaddwd` against the activations' sums in
    /// pairs, and the codes' and the minimums' sums reduced together;
    /// the block scaled in f64 as the portable kernel does it (exact
    /// integers, so the same results).
    ///
    /// # Safety
    /// AVX2, FMA and F16C are present; `w` holds as many blocks as each row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_k_avx2<const R: usize, const Q5: bool>(
        w: &[u8],
        xs: &[&Q8KRow],
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { dot_q4_k_by::<R, Q5>(w, xs, out, madd_i16!()) }
    }

    /// [`dot_q4_k_avx2`] with AVX-VNNI's `vpdpwssd` taking each run of
    /// products times its scales into the sums in one instruction.
    ///
    /// # Safety
    /// As [`dot_q4_k_avx2`], and the CPU has AVX-VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub unsafe fn dot_q4_k_avxvnni<const R: usize, const Q5: bool>(
        w: &[u8],
        xs: &[&Q8KRow],
        out: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe { dot_q4_k_by::<R, Q5>(w, xs, out, dpwssd!()) }
    }

    /// [`dot_q4_k_avx2`]'s body: `madd(sums, p, scales)` adds the i16
    /// products `p` times the scales, pairwise, into the i32 sums.
    ///
    /// # Safety
    /// As [`dot_q4_k_avx2`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_k_by<const R: usize, const Q5: bool>(
        w: &[u8],
        xs: &[&Q8KRow],
        out: &mut [f32],
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let (block, codes_at) = q45_layout(Q5);
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        let m4 = _mm256_set1_epi8(0x0f);
        let fifth = _mm256_set1_epi8(0x10);
        let mut acc = [0.0f64; R];
        for (b, blk) in w.chunks_exact(block).enumerate() {
            crate::kernels::prefetch(blk.as_ptr(), block);
            let (sc8, m8) = q4_k_scales(&blk[4..16]);
            let sc = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc8 as i64));
            let sc = _mm256_set_m128i(sc, sc);
            let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(m8 as i64));
            // [d, dmin] in f64.
            let dd = _mm_cvtps_pd(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                blk[0], blk[1], blk[2], blk[3],
            ]))));
            let qh = if Q5 {
                // SAFETY: qh's 32 bytes at 16 are inside the block.
                unsafe { _mm256_loadu_si256(blk.as_ptr().add(16).cast()) }
            } else {
                _mm256_setzero_si256()
            };
            let mut sums = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                // SAFETY: code bytes 32j..32j+32 are inside the block.
                let qv = unsafe { _mm256_loadu_si256(blk.as_ptr().add(codes_at + 32 * j).cast()) };
                let (mut lo4, mut hi4) = (
                    _mm256_and_si256(qv, m4),
                    _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4),
                );
                if Q5 {
                    let (b_lo, b_hi) = (
                        _mm256_set1_epi8(1 << (2 * j)),
                        _mm256_set1_epi8((1u32 << (2 * j + 1)) as u8 as i8),
                    );
                    let set = |bit: __m256i| {
                        _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), fifth)
                    };
                    lo4 = _mm256_or_si256(lo4, set(b_lo));
                    hi4 = _mm256_or_si256(hi4, set(b_hi));
                }
                let (s_lo, s_hi) = (
                    _mm256_shuffle_epi8(sc, spread16(2 * j as i16)),
                    _mm256_shuffle_epi8(sc, spread16(2 * j as i16 + 1)),
                );
                for (x, sum) in xs.iter().zip(&mut sums) {
                    // SAFETY: activations 64j..64j+64 of block b are inside the row.
                    let (x0, x1) = unsafe {
                        let xq = x.qs.as_ptr().add(b * QK_K + 64 * j);
                        (
                            _mm256_loadu_si256(xq.cast()),
                            _mm256_loadu_si256(xq.add(32).cast()),
                        )
                    };
                    *sum = madd(*sum, _mm256_maddubs_epi16(lo4, x0), s_lo);
                    *sum = madd(*sum, _mm256_maddubs_epi16(hi4, x1), s_hi);
                }
            }
            for ((x, acc), sum) in xs.iter().zip(&mut acc).zip(sums) {
                // SAFETY: the 4 pairs of sums of block b are inside the row.
                let pairs = unsafe { _mm_loadu_si128(x.sums_pairs.as_ptr().add(4 * b).cast()) };
                // The codes' and the minimums' sums reduced together (exact
                // integers: the order does not matter).
                let t4 = _mm_add_epi32(
                    _mm256_castsi256_si128(sum),
                    _mm256_extracti128_si256::<1>(sum),
                );
                let h = _mm_hadd_epi32(t4, _mm_madd_epi16(mins, pairs));
                let h = _mm_hadd_epi32(h, h);
                // [d · total, dmin · total_m], then their difference.
                let p = _mm_mul_pd(dd, _mm_cvtepi32_pd(h));
                let diff = _mm_cvtsd_f64(_mm_sub_sd(p, _mm_unpackhi_pd(p, p)));
                *acc += x.d[b] as f64 * diff;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }

    /// [`Q8KRow::quantize`] on AVX-512, to the same bits: the first value
    /// of largest magnitude sets the scale, codes round half to even
    /// (`vcvtps2dq` in the default rounding mode, as `nearest_int`).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are present; `x.len() == row.qs.len()`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
    pub unsafe fn quantize_q8_k(row: &mut Q8KRow, x: &[f32]) {
        for (b, block) in x.chunks_exact(QK_K).enumerate() {
            let p = block.as_ptr();
            let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
            // Plain loops: a closure handed to `map` or `fold` would be
            // compiled without this function's target features, and not
            // inlined.
            let mut v = [_mm512_setzero_ps(); 16];
            let mut abs = [_mm512_setzero_ps(); 16];
            let mut top = _mm512_setzero_ps();
            for i in 0..16 {
                // SAFETY: the block holds 256 values: 16 vectors.
                v[i] = unsafe { _mm512_loadu_ps(p.add(16 * i)) };
                abs[i] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[i]), abs_mask));
                top = _mm512_max_ps(top, abs[i]);
            }
            let amax = _mm512_reduce_max_ps(top);
            let q = &mut row.qs[b * QK_K..][..QK_K];
            if amax == 0.0 || amax.is_nan() {
                row.d[b] = 0.0;
                q.fill(0);
            } else {
                // The first value whose magnitude is the largest.
                let mut i = 0;
                while _mm512_cmpeq_ps_mask(abs[i], _mm512_set1_ps(amax)) == 0 {
                    i += 1;
                }
                let lane =
                    _mm512_cmpeq_ps_mask(abs[i], _mm512_set1_ps(amax)).trailing_zeros() as usize;
                let max = block[16 * i + lane];
                let iscale = -127.0 / max;
                row.d[b] = 1.0 / iscale;
                let scale = _mm512_set1_ps(iscale);
                for (i, v) in v.iter().enumerate() {
                    let c = _mm512_min_epi32(
                        _mm512_cvtps_epi32(_mm512_mul_ps(scale, *v)),
                        _mm512_set1_epi32(127),
                    );
                    // SAFETY: codes 16i..16i+16 are inside the block.
                    unsafe {
                        _mm_storeu_si128(q.as_mut_ptr().add(16 * i).cast(), _mm512_cvtepi32_epi8(c))
                    };
                }
            }
            for (i, s) in row.sums16[b * 16..][..16].iter_mut().enumerate() {
                // SAFETY: codes 16i..16i+16 are inside the block.
                let c = unsafe { _mm_loadu_si128(q.as_ptr().add(16 * i).cast()) };
                *s = _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(c));
            }
        }
        for (s, pair) in row.sums32.iter_mut().zip(row.sums16.chunks_exact(2)) {
            *s = pair[0] + pair[1];
        }
    }

    /// [`Q8KRow::quantize`] on AVX2, to the same bits as the AVX-512
    /// one: the first value of largest magnitude sets the scale, codes
    /// round half to even; the sums of 16 from `vpsadbw` of the codes
    /// offset by 128.
    ///
    /// # Safety
    /// AVX2 is present; `x.len() == row.qs.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_q8_k_avx2(row: &mut Q8KRow, x: &[f32]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (b, block) in x.chunks_exact(QK_K).enumerate() {
            let p = block.as_ptr();
            let mut top = _mm256_setzero_ps();
            for i in 0..32 {
                // SAFETY: the block holds 256 values: 32 vectors.
                let v = unsafe { _mm256_loadu_ps(p.add(8 * i)) };
                top = _mm256_max_ps(top, _mm256_and_ps(v, abs_mask));
            }
            let top = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps::<1>(top));
            let top = _mm_max_ps(top, _mm_movehl_ps(top, top));
            let amax = _mm_cvtss_f32(_mm_max_ss(top, _mm_movehdup_ps(top)));
            let q = &mut row.qs[b * QK_K..][..QK_K];
            if amax == 0.0 || amax.is_nan() {
                row.d[b] = 0.0;
                q.fill(0);
            } else {
                let max = block[block
                    .iter()
                    .position(|v| v.abs() == amax)
                    .expect("amax is a magnitude")];
                let iscale = -127.0 / max;
                row.d[b] = 1.0 / iscale;
                let scale = _mm256_set1_ps(iscale);
                let (limit, order) = (
                    _mm256_set1_epi32(127),
                    _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
                );
                for i in 0..8 {
                    let mut c = [_mm256_setzero_si256(); 4];
                    for (k, c) in c.iter_mut().enumerate() {
                        // SAFETY: values 32i + 8k.. are inside the block.
                        let v = unsafe { _mm256_loadu_ps(p.add(32 * i + 8 * k)) };
                        *c = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(scale, v)), limit);
                    }
                    let bytes = _mm256_packs_epi16(
                        _mm256_packs_epi32(c[0], c[1]),
                        _mm256_packs_epi32(c[2], c[3]),
                    );
                    // SAFETY: codes 32i..32i+32 are inside the block.
                    unsafe {
                        _mm256_storeu_si256(
                            q.as_mut_ptr().add(32 * i).cast(),
                            _mm256_permutevar8x32_epi32(bytes, order),
                        )
                    };
                }
            }
            let flip = _mm256_set1_epi8(-128);
            for i in 0..8 {
                // SAFETY: codes 32i..32i+32 are inside the block.
                let c = unsafe { _mm256_loadu_si256(q.as_ptr().add(32 * i).cast()) };
                // Sums of 8 codes, each offset by 128.
                let s = _mm256_sad_epu8(_mm256_xor_si256(c, flip), _mm256_setzero_si256());
                let mut eights = [0i64; 4];
                // SAFETY: four i64s.
                unsafe { _mm256_storeu_si256(eights.as_mut_ptr().cast(), s) };
                row.sums16[b * 16 + 2 * i] = (eights[0] + eights[1]) as i32 - 16 * 128;
                row.sums16[b * 16 + 2 * i + 1] = (eights[2] + eights[3]) as i32 - 16 * 128;
            }
        }
        for (s, pair) in row.sums32.iter_mut().zip(row.sums16.chunks_exact(2)) {
            *s = pair[0] + pair[1];
        }
    }

    /// Q4_K's 12 scale bytes unpacked as llama.cpp does: the 8 six-bit
    /// scales as the bytes of the first value, the 8 minimums of the
    /// second (`kiln_blocks::scale_min_k4`, 4 bytes at a time).
    #[inline(always)]
    fn q4_k_scales(s: &[u8]) -> (u64, u64) {
        const LOW6: u32 = 0x3f3f_3f3f;
        const LOW4: u32 = 0x0f0f_0f0f;
        const LOW2: u32 = 0x0303_0303;
        // One bounds check, then three plain loads (indexing byte by byte
        // had the compiler load and shift twelve bytes).
        let s: &[u8; 12] = s[..12].try_into().expect("12 scale bytes");
        let word =
            |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
        let (u0, u1, u2) = (word(0), word(1), word(2));
        let sc_hi = (u2 & LOW4) | (((u0 >> 6) & LOW2) << 4);
        let m_hi = ((u2 >> 4) & LOW4) | (((u1 >> 6) & LOW2) << 4);
        (
            (u0 & LOW6) as u64 | (sc_hi as u64) << 32,
            (u1 & LOW6) as u64 | (m_hi as u64) << 32,
        )
    }

    /// One Q4_K row against `R` activation rows on AVX-512 BW/VNNI: the
    /// 32 code bytes of sub-blocks `2p` (low nibbles) and `2p + 1` (high
    /// nibbles) side by side in one register line up with activations
    /// `64p..64p + 64`; `vpmaddubsw` takes their products in i16 pairs
    /// and `vpdpwssd` multiplies those by the sub-block's scale (spread
    /// over its lanes with one `vpshufb`) into 16 i32 sums. The minimums'
    /// part is one `vpmaddwd` of their pairs against the activations'
    /// pair sums; two blocks' sums are reduced and scaled together, each
    /// lane as [`super::dot_q4_k`]'s other paths scale a block in f64
    /// (same bits). Multiplying `vpdpbusd`'s sums by the scales in i32
    /// instead (`vpmulld`: two micro-ops on the port `vpdpbusd` needs),
    /// one block at a time, ran at about 0.8 of this speed in
    /// `benches/gemm.rs` (m = 1), and a TinyLlama-shaped Q4_K_M decoded
    /// at 25.8 tok/s instead of 28.5.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI, AVX2 and F16C; `w` holds as many
    /// blocks as each of the first `R` rows of `xs`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn dot_q4_k_vnni<const R: usize, const Q5: bool>(
        w: &[u8],
        xs: &[&Q8KRow],
        out: &mut [f32],
    ) {
        let (block, codes_at) = q45_layout(Q5);
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        let m4 = _mm256_set1_epi8(0x0f);
        // `vpshufb` controls on the eight scale bytes (in every 128-bit
        // lane): i16 lanes of the low half take byte `lo`, the high
        // half's byte `hi`, each zero-extended (0x80 selects a zero).
        let spread = |lo: i32, hi: i32| {
            let word = |b: i32| (0x8000 | b) as i16;
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi16(word(lo))),
                _mm256_set1_epi16(word(hi)),
            )
        };
        let pick = [spread(0, 1), spread(2, 3), spread(4, 5), spread(6, 7)];
        // A block's codes, spread scales, minimums (8 i16) and the bits of
        // d and dmin, made once for every row.
        let prep = |b: usize| {
            let blk = &w[b * block..][..block];
            crate::kernels::prefetch(blk.as_ptr(), block);
            // SAFETY: the 16 bytes at 4 are inside the block.
            let sm = unsafe { q4_k_scales_x(blk.as_ptr().add(4)) };
            let sc = _mm512_broadcast_i32x4(sm);
            let mins = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
            // Q5_K: qh's 32 bytes in both halves (bit s of qh[l] is code
            // l's fifth bit in sub-block s).
            let qh = if Q5 {
                // SAFETY: qh's 32 bytes at 16 are inside the block.
                unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.as_ptr().add(16).cast())) }
            } else {
                _mm512_setzero_si512()
            };
            let mut codes = [_mm512_setzero_si512(); 4];
            let mut scales = [_mm512_setzero_si512(); 4];
            for p in 0..4 {
                // SAFETY: code bytes 32p..32p+32 are inside the block.
                let v = unsafe { _mm256_loadu_si256(blk.as_ptr().add(codes_at + 32 * p).cast()) };
                let lo = _mm256_and_si256(v, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                let mut c = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                if Q5 {
                    let bits = _mm512_inserti64x4::<1>(
                        _mm512_set1_epi8(1 << (2 * p)),
                        _mm256_set1_epi8((1u32 << (2 * p + 1)) as u8 as i8),
                    );
                    let set = _mm512_test_epi8_mask(qh, bits);
                    c = _mm512_mask_add_epi8(c, set, c, _mm512_set1_epi8(0x10));
                }
                codes[p] = c;
                scales[p] = _mm512_shuffle_epi8(sc, pick[p]);
            }
            // SAFETY: the block starts with the two f16s.
            let d = unsafe { blk.as_ptr().cast::<i32>().read_unaligned() };
            (codes, scales, mins, d)
        };
        // A row's sums for a prepared block: 16 lanes of the codes' (with
        // their scales), 4 of the minimums'.
        let sums = |x: &Q8KRow, b: usize, codes: &[__m512i; 4], scales: &[__m512i; 4]| {
            let mut s = _mm512_setzero_si512();
            for (p, (c, sc)) in codes.iter().zip(scales).enumerate() {
                // SAFETY: activations 64p..64p+64 of block b are inside the row.
                let xv = unsafe { _mm512_loadu_si512(x.qs.as_ptr().add(b * QK_K + 64 * p).cast()) };
                // Pairs of products (at most 2 · 31 · 128) fit an i16.
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(*c, xv), *sc);
            }
            s
        };
        let min_sums = |x: &Q8KRow, b: usize, mins: __m128i| {
            // SAFETY: the 4 sum pairs of block b are inside the row.
            _mm_madd_epi16(mins, unsafe {
                _mm_loadu_si128(x.sums_pairs.as_ptr().add(4 * b).cast())
            })
        };
        let nb = w.len() / block;
        let mut acc = [0.0f64; R];
        let mut b = 0;
        // Two blocks at a time: their sums reduced and scaled together
        // (each lane as one block alone would be, so the same bits).
        while b + 2 <= nb {
            let (ca, sa, ma, da) = prep(b);
            let (cb, sb, mb, db) = prep(b + 1);
            // [d, dmin] of both blocks, widened (exactly) to f64.
            let dd = _mm256_cvtps_pd(_mm_cvtph_ps(_mm_set_epi32(0, 0, db, da)));
            for (x, acc) in xs.iter().zip(&mut acc) {
                let (s_a, s_b) = (sums(x, b, &ca, &sa), sums(x, b + 1, &cb, &sb));
                // 128-bit lanes [a0 + a2, a1 + a3, b0 + b2, b1 + b3], then
                // [a (4 lanes), b (4 lanes)].
                let u = _mm512_add_epi32(
                    _mm512_shuffle_i64x2::<0x44>(s_a, s_b),
                    _mm512_shuffle_i64x2::<0xee>(s_a, s_b),
                );
                let v = _mm512_castsi512_si256(_mm512_add_epi32(
                    _mm512_shuffle_i64x2::<0x08>(u, u),
                    _mm512_shuffle_i64x2::<0x0d>(u, u),
                ));
                let m = _mm256_set_m128i(min_sums(x, b + 1, mb), min_sums(x, b, ma));
                // Per 128-bit lane [total, total_m, total, total_m]: the
                // codes' and the minimums' sums reduced together (exact
                // integers: the order does not matter).
                let h = _mm256_hadd_epi32(v, m);
                let h = _mm256_hadd_epi32(h, h);
                let t = _mm256_cvtepi32_pd(_mm_unpacklo_epi64(
                    _mm256_castsi256_si128(h),
                    _mm256_extracti128_si256::<1>(h),
                ));
                // d · total − dmin · total_m of each block, times its x.d.
                let t = _mm256_hsub_pd(_mm256_mul_pd(t, dd), _mm256_setzero_pd());
                let t = _mm_unpacklo_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd::<1>(t));
                add_two(acc, _mm_mul_pd(t, two_scales(x, b)));
            }
            b += 2;
        }
        if b < nb {
            let (c, sc, mins, d) = prep(b);
            let dd = _mm_cvtps_pd(_mm_cvtph_ps(_mm_cvtsi32_si128(d)));
            for (x, acc) in xs.iter().zip(&mut acc) {
                let s = sums(x, b, &c, &sc);
                let s8 =
                    _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64::<1>(s));
                let s4 = _mm_add_epi32(
                    _mm256_castsi256_si128(s8),
                    _mm256_extracti128_si256::<1>(s8),
                );
                let h = _mm_hadd_epi32(s4, min_sums(x, b, mins));
                let h = _mm_hadd_epi32(h, h);
                let t = _mm_mul_pd(_mm_cvtepi32_pd(h), dd);
                let t = _mm_sub_sd(t, _mm_unpackhi_pd(t, t));
                *acc += x.d[b] as f64 * _mm_cvtsd_f64(t);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }

    /// The activation row's scales of blocks `b` and `b + 1`, widened
    /// (exactly) to f64: the two-block steps of the AVX-512 row kernels.
    /// Panics unless the row has both.
    #[inline(always)]
    fn two_scales(x: &Q8KRow, b: usize) -> __m128d {
        let d = &x.d[b..b + 2];
        // SAFETY: two f32s at `d` (checked above); SSE2 is baseline.
        unsafe { _mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd(d.as_ptr().cast()))) }
    }

    /// Adds two blocks' terms (lane 0: the first block's) to a row's sum,
    /// in block order, as every path adds them.
    #[inline(always)]
    fn add_two(acc: &mut f64, t: __m128d) {
        // SAFETY: register operations only (SSE2 is baseline).
        unsafe {
            *acc += _mm_cvtsd_f64(t);
            *acc += _mm_cvtsd_f64(_mm_unpackhi_pd(t, t));
        }
    }

    /// [`q4_k_scales`] in a register: the 12 scale bytes at `p` (16 read)
    /// unpacked into the 8 six-bit scales (bytes 0..8) and the 8
    /// minimums (bytes 8..16), with two shuffles instead of a dozen
    /// scalar shifts and masks.
    ///
    /// # Safety
    /// 16 bytes are readable at `p`; SSSE3 is enabled by the caller.
    #[inline(always)]
    unsafe fn q4_k_scales_x(p: *const u8) -> __m128i {
        // SAFETY: the caller's contract.
        unsafe {
            let v = _mm_loadu_si128(p.cast());
            // Low bits: scales 0..4 = s[0..4] & 63, 4..8 = s[8..12] & 15;
            // minimums 0..4 = s[4..8] & 63, 4..8 = s[8..12] >> 4.
            let a = _mm_shuffle_epi8(
                v,
                _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11),
            );
            let a_hi = _mm_srli_epi16::<4>(a);
            let low = _mm_or_si128(
                _mm_and_si128(
                    a,
                    _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0),
                ),
                _mm_and_si128(
                    a_hi,
                    _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15),
                ),
            );
            // High bits of scales and minimums 4..8: the top two bits of
            // s[0..4] and s[4..8], as bits 4 and 5.
            let z = -128i8;
            let h = _mm_shuffle_epi8(
                v,
                _mm_setr_epi8(z, z, z, z, 0, 1, 2, 3, z, z, z, z, 4, 5, 6, 7),
            );
            let high = _mm_and_si128(_mm_srli_epi16::<2>(h), _mm_set1_epi8(0x30));
            _mm_or_si128(low, high)
        }
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

    /// The `vpshufb` control that spreads i16 number `k` of each lane over
    /// that lane.
    #[inline(always)]
    fn spread16(k: i16) -> __m256i {
        // SAFETY: register-only; inlined into functions that enable AVX2.
        unsafe { _mm256_set1_epi16(((2 * k + 1) << 8) | (2 * k)) }
    }

    /// The `vpshufb` control that spreads the 16-bit scales of sub-blocks
    /// `2i` (low lane) and `2i + 1` (high lane) of a register holding
    /// eight scales in each lane over that lane's eight i16s.
    #[inline(always)]
    fn scale_pair(i: i16) -> __m256i {
        // SAFETY: register-only; inlined into functions that enable AVX2.
        unsafe {
            _mm256_set_m128i(
                _mm_set1_epi16(((4 * i + 3) << 8) | (4 * i + 2)),
                _mm_set1_epi16(((4 * i + 1) << 8) | (4 * i)),
            )
        }
    }

    /// Sixteen i16 scales as two registers of eight, each repeated in both
    /// lanes (sub-blocks 0..8 and 8..16), for [`scale_pair`].
    #[inline(always)]
    fn halves(scales: __m256i) -> [__m256i; 2] {
        // SAFETY: register-only; inlined into functions that enable AVX2.
        unsafe {
            let (l, h) = (
                _mm256_castsi256_si128(scales),
                _mm256_extracti128_si256(scales, 1),
            );
            [_mm256_set_m128i(l, l), _mm256_set_m128i(h, h)]
        }
    }

    /// `Σ_i s_i · x.sums16[16b + i]` for sixteen u8/i8 weights `s` (zero-
    /// or sign-extended by the caller into i32: `lo` for 0..8, `hi` 8..16).
    ///
    /// # Safety
    /// AVX2 is enabled by the caller; block `b` of `x` exists.
    #[inline(always)]
    unsafe fn weighted_sums16(lo: __m256i, hi: __m256i, x: &Q8KRow, b: usize) -> i32 {
        // SAFETY: the 16 sums of block b are inside the row.
        unsafe {
            let p = x.sums16.as_ptr().add(16 * b);
            let s0 = _mm256_loadu_si256(p.cast());
            let s1 = _mm256_loadu_si256(p.add(8).cast());
            hsum(_mm256_add_epi32(
                _mm256_mullo_epi32(lo, s0),
                _mm256_mullo_epi32(hi, s1),
            ))
        }
    }

    /// Q2_K's and Q3_K's four runs of 32 unsigned codes (half `n` of a
    /// block, codes `at..at + 128` of each row) against `R` rows, each run
    /// by the scales of its two sub-blocks ([`scale_pair`]), into `sums`.
    ///
    /// # Safety
    /// AVX2 is enabled by the caller; codes `at..at + 128` exist in every
    /// row.
    #[inline(always)]
    unsafe fn runs_by_scales<const R: usize>(
        codes: [__m256i; 4],
        scales: __m256i,
        xs: &[&Q8KRow; R],
        at: usize,
        sums: &mut [__m256i; R],
        madd: &impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        for (j, c) in codes.into_iter().enumerate() {
            // SAFETY: register-only, and codes at + 32j.. +32 are inside
            // each row (the caller's contract).
            unsafe {
                let sc = _mm256_shuffle_epi8(scales, scale_pair(j as i16));
                for (x, sum) in xs.iter().zip(sums.iter_mut()) {
                    let xv = _mm256_loadu_si256(x.qs.as_ptr().add(at + 32 * j).cast());
                    *sum = madd(*sum, _mm256_maddubs_epi16(c, xv), sc);
                }
            }
        }
    }

    /// Q2_K on AVX2, for one weight row and `R` activation rows (as
    /// ggml's AVX2 kernel): the 16 scales and minimums widened once a
    /// block, each 32 code bytes four runs of 32 codes by shifting,
    /// `vpmaddubsw` (the codes are unsigned) and `vpmaddwd` by the scales
    /// of the run's two sub-blocks (a `vpshufb` of the widened scales);
    /// the minimums' term from the rows' sums of 16. Integer sums per
    /// block, scaled in f64 as the portable kernel does: the same bits.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are present; `w` holds as many blocks as each row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q2_k_by<const R: usize>(
        w: &[u8],
        xs: &[&Q8KRow],
        out: &mut [f32],
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        let (m3, m4) = (_mm256_set1_epi8(3), _mm_set1_epi8(0x0f));
        let mut acc = [0.0f64; R];
        for (b, blk) in w.chunks_exact(Q2_K_BLOCK).enumerate() {
            let p = blk.as_ptr();
            crate::kernels::prefetch(p, Q2_K_BLOCK);
            // SAFETY: the 16 scale bytes are at 0..16 of the block.
            let packed = unsafe { _mm_loadu_si128(p.cast()) };
            let scales = halves(_mm256_cvtepu8_epi16(_mm_and_si128(packed, m4)));
            let mins = _mm_and_si128(_mm_srli_epi16(packed, 4), m4);
            let (mins_lo, mins_hi) = (
                _mm256_cvtepu8_epi32(mins),
                _mm256_cvtepu8_epi32(_mm_srli_si128(mins, 8)),
            );
            let mut sums = [_mm256_setzero_si256(); R];
            for (n, scales) in scales.into_iter().enumerate() {
                // SAFETY: the 64 code bytes are at 16..80 of the block.
                let q = unsafe { _mm256_loadu_si256(p.add(16 + 32 * n).cast()) };
                let codes = [
                    _mm256_and_si256(q, m3),
                    _mm256_and_si256(_mm256_srli_epi16(q, 2), m3),
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), m3),
                    _mm256_and_si256(_mm256_srli_epi16(q, 6), m3),
                ];
                // SAFETY: codes 128n.. +128 of block b are inside each row.
                unsafe { runs_by_scales(codes, scales, xs, b * QK_K + 128 * n, &mut sums, &madd) };
            }
            let d = f16_to_f32(u16::from_le_bytes([blk[80], blk[81]])) as f64;
            let dmin = f16_to_f32(u16::from_le_bytes([blk[82], blk[83]])) as f64;
            for ((x, acc), s) in xs.iter().zip(&mut acc).zip(sums) {
                // SAFETY: block b of the row exists.
                let summs = unsafe { weighted_sums16(mins_lo, mins_hi, x, b) };
                *acc += super::q2_k_scaled(d, dmin, x.d[b], hsum(s), summs);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }

    /// Q3_K on AVX2: the two low bits as Q2_K's, the high bit from the
    /// mask (one shift a run) makes an unsigned code `u = q + 4` in 0..8;
    /// `Σ sc (q·x) = Σ sc (u·x) − 4 Σ sc Σx` with the rows' sums of 16.
    /// The scales are unpacked as ggml does, four words at once. Exact
    /// integers, the portable kernel's bits.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are present; `w` holds as many blocks as each row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q3_k_by<const R: usize>(
        w: &[u8],
        xs: &[&Q8KRow],
        out: &mut [f32],
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        let (m3, m1) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
        let mut acc = [0.0f64; R];
        for (b, blk) in w.chunks_exact(Q3_K_BLOCK).enumerate() {
            let p = blk.as_ptr();
            crate::kernels::prefetch(p, Q3_K_BLOCK);
            let word = |i: usize| {
                u32::from_le_bytes([
                    blk[96 + 4 * i],
                    blk[97 + 4 * i],
                    blk[98 + 4 * i],
                    blk[99 + 4 * i],
                ])
            };
            let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
            let (a0, a1, t) = (word(0), word(1), word(2));
            let packed = _mm_setr_epi32(
                ((a0 & k2) | ((t & k1) << 4)) as i32,
                ((a1 & k2) | (((t >> 2) & k1) << 4)) as i32,
                (((a0 >> 4) & k2) | (((t >> 4) & k1) << 4)) as i32,
                (((a1 >> 4) & k2) | (((t >> 6) & k1) << 4)) as i32,
            );
            let sc16 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(packed), _mm256_set1_epi16(32));
            let (sc_lo, sc_hi) = (
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sc16)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256(sc16, 1)),
            );
            let scales = halves(sc16);
            // SAFETY: the 32 mask bytes are at 0..32 of the block.
            let hm = unsafe { _mm256_loadu_si256(p.cast()) };
            let mut sums = [_mm256_setzero_si256(); R];
            for (n, scales) in scales.into_iter().enumerate() {
                // SAFETY: the 64 low-bit bytes are at 32..96 of the block.
                let q = unsafe { _mm256_loadu_si256(p.add(32 + 32 * n).cast()) };
                let hm = if n == 0 { hm } else { _mm256_srli_epi16(hm, 4) };
                // Run j: low bits 2j, mask bit 4n + j, moved to bit 2.
                let codes = [
                    _mm256_or_si256(
                        _mm256_and_si256(q, m3),
                        _mm256_slli_epi16(_mm256_and_si256(hm, m1), 2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(q, 2), m3),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 1), m1), 2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(q, 4), m3),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 2), m1), 2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(q, 6), m3),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 3), m1), 2),
                    ),
                ];
                // SAFETY: codes 128n.. +128 of block b are inside each row.
                unsafe { runs_by_scales(codes, scales, xs, b * QK_K + 128 * n, &mut sums, &madd) };
            }
            let d = f16_to_f32(u16::from_le_bytes([blk[108], blk[109]])) as f64;
            for ((x, acc), s) in xs.iter().zip(&mut acc).zip(sums) {
                // SAFETY: block b of the row exists.
                let offset = unsafe { weighted_sums16(sc_lo, sc_hi, x, b) };
                *acc += super::d_scaled(d, x.d[b], hsum(s) - 4 * offset);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }

    /// IQ4_XS on AVX2: 32 code bytes (two sub-blocks) split into nibbles,
    /// looked up in IQ4_NL's table by `vpshufb`, lanes regrouped so each
    /// register holds one sub-block's 32 codes in the activations' order;
    /// signed products by the sign trick (no activation code is −128).
    ///
    /// # Safety
    /// AVX2, FMA and F16C are present; `w` holds as many blocks as each row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_iq4_xs_by<const R: usize>(
        w: &[u8],
        xs: &[&Q8KRow],
        out: &mut [f32],
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        let m4 = _mm256_set1_epi8(0x0f);
        // SAFETY: the table holds the 16 bytes loaded.
        let table = _mm256_broadcastsi128_si256(unsafe {
            _mm_loadu_si128(kiln_blocks::IQ4_VALUES.as_ptr().cast())
        });
        let mut acc = [0.0f64; R];
        for (b, blk) in w.chunks_exact(IQ4_XS_BLOCK).enumerate() {
            let p = blk.as_ptr();
            crate::kernels::prefetch(p, IQ4_XS_BLOCK);
            let scales_h = u16::from_le_bytes([blk[2], blk[3]]);
            let mut sums = [_mm256_setzero_si256(); R];
            for pair in 0..4 {
                // SAFETY: the 128 code bytes are at 8..136 of the block.
                let q = unsafe { _mm256_loadu_si256(p.add(8 + 32 * pair).cast()) };
                let lo = _mm256_shuffle_epi8(table, _mm256_and_si256(q, m4));
                let hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(q, 4), m4));
                let runs = [
                    _mm256_permute2x128_si256(lo, hi, 0x20),
                    _mm256_permute2x128_si256(lo, hi, 0x31),
                ];
                for (h, v) in runs.into_iter().enumerate() {
                    let ib = 2 * pair + h;
                    let scale = _mm256_set1_epi16(
                        (kiln_blocks::iq4_xs_scale(&blk[4..8], scales_h, ib) - 32) as i16,
                    );
                    let vabs = _mm256_sign_epi8(v, v);
                    for (x, sum) in xs.iter().zip(&mut sums) {
                        // SAFETY: codes 32ib..32ib+32 of block b are inside
                        // the row.
                        let xv = unsafe {
                            _mm256_loadu_si256(x.qs.as_ptr().add(b * QK_K + 32 * ib).cast())
                        };
                        let p16 = _mm256_maddubs_epi16(vabs, _mm256_sign_epi8(xv, v));
                        *sum = madd(*sum, p16, scale);
                    }
                }
            }
            let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])) as f64;
            for ((x, acc), s) in xs.iter().zip(&mut acc).zip(sums) {
                *acc += super::d_scaled(d, x.d[b], hsum(s));
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }

    /// [`dot_q6_k_avx2`]'s body, `madd` as in [`dot_q4_k_by`].
    ///
    /// # Safety
    /// As [`dot_q6_k_avx2`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q6_k_by<const R: usize>(
        w: &[u8],
        xs: &[&Q8KRow],
        out: &mut [f32],
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        let m4 = _mm256_set1_epi8(0x0f);
        let m30 = _mm256_set1_epi8(0x30);
        let m32 = _mm256_set1_epi8(32);
        let mut acc = [0.0f64; R];
        for (b, blk) in w.chunks_exact(BLOCK).enumerate() {
            let p = blk.as_ptr();
            crate::kernels::prefetch(p, BLOCK);
            // The 16 signed scales as i16s, eight a register in both lanes:
            // sub-block s's is picked with one `vpshufb` ([`scale_pair`]).
            // SAFETY: the 16 scale bytes are inside the block.
            let sc = halves(_mm256_cvtepi8_epi16(unsafe {
                _mm_loadu_si128(p.add(192).cast())
            }));
            let mut sums = [_mm256_setzero_si256(); R];
            for (n, sc) in sc.iter().enumerate() {
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
                    // Sub-blocks 8n + 2j (low lane) and 8n + 2j + 1.
                    let scales = _mm256_shuffle_epi8(*sc, scale_pair(j as i16));
                    for (x, sum) in xs.iter().zip(&mut sums) {
                        // SAFETY: codes 32j..32j+32 of this half of block b
                        // are inside the row.
                        let xv = unsafe {
                            _mm256_loadu_si256(
                                x.qs.as_ptr().add(b * QK_K + 128 * n + 32 * j).cast(),
                            )
                        };
                        let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
                        *sum = madd(*sum, p16, scales);
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

    /// A Q6_K block's 256 codes, unsigned (code + 32), in the
    /// activations' order, 64 a register: ql's 64 bytes of each half, low
    /// then high nibbles, with qh's bit pairs shifted into bits 4 and 5.
    ///
    /// # Safety
    /// AVX-512 F/BW are enabled by the caller; `p` points at a whole block.
    #[inline(always)]
    unsafe fn q6_k_codes_512(p: *const u8) -> [__m512i; 4] {
        // SAFETY: the block's 128 ql and 64 qh bytes (the caller's contract).
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            let m30 = _mm512_set1_epi8(0x30);
            let mut codes = [_mm512_setzero_si512(); 4];
            for n in 0..2 {
                let ql = _mm512_loadu_si512(p.add(64 * n).cast());
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n).cast());
                // qh's bit pairs 0, 1, 2, 3 belong to codes l, l + 32,
                // l + 64, l + 96: moved to bits 4 and 5.
                let h01 = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_slli_epi16::<4>(qh)),
                    _mm256_slli_epi16::<2>(qh),
                );
                let h23 =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
                codes[2 * n] =
                    _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(h01, m30));
                codes[2 * n + 1] = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                    _mm512_and_si512(h23, m30),
                );
            }
            codes
        }
    }

    /// One Q6_K row against `R` activation rows on AVX-512 BW/VNNI. The
    /// codes of each half block (128) are built unsigned in two 512-bit
    /// registers whose bytes follow the activations' order (ql's 64 bytes,
    /// low then high nibbles, with qh's bits shifted into place), so each
    /// 128-bit lane of a `vpmaddubsw` product lies in one 16-code
    /// sub-block, and `vpdpwssd` multiplies it by that sub-block's scale
    /// (spread with one `vpermw`); the offset of 32 comes off as
    /// 32·Σ scale·Σx per block (one `vpmaddwd` of the scales against the
    /// activations' sums in pairs). Two blocks' sums are reduced together.
    /// Scaled in f64 as [`super::dot_q6_k`]'s other paths do it (same
    /// bits). Multiplying `vpdpbusd`'s sums by the scales in i32
    /// (`vpmulld`) instead ran at about 0.8 of this speed (a
    /// TinyLlama-shaped Q6_K decoded at 21.7 tok/s instead of 23.6).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI, AVX2 and F16C; `w` holds as many
    /// blocks as each of the first `R` rows of `xs`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn dot_q6_k_vnni<const R: usize>(w: &[u8], xs: &[&Q8KRow], out: &mut [f32]) {
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        // Word `first + lane / 8` (a 128-bit lane's sub-block) for each of
        // the 32 i16 lanes.
        let quarter = |first: i16| {
            let mut idx = [0i16; 32];
            for (i, v) in idx.iter_mut().enumerate() {
                *v = first + i as i16 / 8;
            }
            // SAFETY: 32 i16s.
            unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
        };
        let pick = [quarter(0), quarter(4), quarter(8), quarter(12)];
        // A block's codes, spread scales, scales as 16 i16 and the bits of
        // its d, made once for every row.
        let prep = |b: usize| {
            let blk = &w[b * BLOCK..][..BLOCK];
            let p = blk.as_ptr();
            crate::kernels::prefetch(p, BLOCK);
            // SAFETY: the block's 128 ql, 64 qh and 16 scale bytes.
            let (sc, codes) = unsafe {
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast())),
                    q6_k_codes_512(p),
                )
            };
            let wide = _mm512_castsi256_si512(sc);
            let mut scales = [_mm512_setzero_si512(); 4];
            for (s, i) in scales.iter_mut().zip(&pick) {
                *s = _mm512_permutexvar_epi16(*i, wide);
            }
            (codes, scales, sc, u16::from_le_bytes([blk[208], blk[209]]))
        };
        // A row's sums for a prepared block, its offset taken off: 8 lanes.
        let sums = |x: &Q8KRow, b: usize, codes: &[__m512i; 4], scales: &[__m512i; 4], sc| {
            let mut s = _mm512_setzero_si512();
            for (q, (c, sc)) in codes.iter().zip(scales).enumerate() {
                // SAFETY: activations 64q..64q+64 of block b are inside the row.
                let xv = unsafe { _mm512_loadu_si512(x.qs.as_ptr().add(b * QK_K + 64 * q).cast()) };
                // Pairs of products (at most 2 · 63 · 128) fit an i16.
                s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(*c, xv), *sc);
            }
            // SAFETY: the 8 pairs of sums of 16 of block b are inside the row.
            let pairs = unsafe { _mm256_loadu_si256(x.sums16_pairs.as_ptr().add(8 * b).cast()) };
            let offset = _mm256_madd_epi16(sc, pairs);
            let s8 = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64::<1>(s));
            _mm256_sub_epi32(s8, _mm256_slli_epi32::<5>(offset))
        };
        let nb = w.len() / BLOCK;
        let mut acc = [0.0f64; R];
        let mut b = 0;
        while b + 2 <= nb {
            let (ca, sa, sca, da) = prep(b);
            let (cb, sb, scb, db) = prep(b + 1);
            // Both blocks' d, widened (exactly) to f64.
            let dw = _mm_cvtps_pd(_mm_cvtph_ps(_mm_cvtsi32_si128(
                (da as u32 | (db as u32) << 16) as i32,
            )));
            for (x, acc) in xs.iter().zip(&mut acc) {
                let h = _mm256_hadd_epi32(sums(x, b, &ca, &sa, sca), sums(x, b + 1, &cb, &sb, scb));
                let h = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
                // [total_a, total_b, ..]: exact integers, any order.
                let t = _mm_cvtepi32_pd(_mm_hadd_epi32(h, h));
                add_two(acc, _mm_mul_pd(_mm_mul_pd(dw, two_scales(x, b)), t));
            }
            b += 2;
        }
        if b < nb {
            let (c, scales, sc, d) = prep(b);
            let dw = f16_to_f32(d) as f64;
            for (x, acc) in xs.iter().zip(&mut acc) {
                let s = sums(x, b, &c, &scales, sc);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
                let s = _mm_hadd_epi32(s, s);
                let total = _mm_cvtsi128_si32(_mm_hadd_epi32(s, s));
                *acc += dw * x.d[b] as f64 * total as f64;
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }

    /// See [`super::gemm16`].
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; every row of
    /// `ws` holds as many Q4_K blocks as every row of `xs`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn gemm16_q4_k_vnni<const Q5: bool>(
        ws: &[&[u8]],
        xs: &[&Q8KRow],
        scratch: &mut GemmScratch,
        out: &mut crate::kernels::Tile,
    ) {
        let nb = xs[0].d.len();
        let (block, codes_at) = q45_layout(Q5);
        // Group g (4 codes) of block b, row n at ((b * 64 + g) * 16 + n) * 4;
        // sub-block j's scale and minimum of row n at (b * 8 + j) * 16 + n.
        scratch.codes.clear();
        scratch.codes.resize(nb * 64 * GEMM_GROUP * 4, 0);
        scratch.sc.clear();
        scratch.sc.resize(nb * 8 * GEMM_GROUP, 0);
        // Minimums in pairs of i16: pair p of block b, row n at (b * 4 + p) * 16 + n.
        scratch.mins.clear();
        scratch.mins.resize(nb * 4 * GEMM_GROUP, 0);
        for v in [&mut scratch.d, &mut scratch.dmin] {
            v.clear();
            v.resize(nb * GEMM_GROUP, 0.0);
        }
        let m4 = _mm256_set1_epi8(0x0f);
        // Scales, minimums and block scales: per block, the 16 rows' values
        // gathered, then spread lane-wise with vector shifts (missing
        // rows: zeros).
        let (sc_p, mins_p) = (scratch.sc.as_mut_ptr(), scratch.mins.as_mut_ptr());
        let (d_p, dmin_p) = (scratch.d.as_mut_ptr(), scratch.dmin.as_mut_ptr());
        let low8 = _mm512_set1_epi64(0xff);
        for b in 0..nb {
            let (mut sc8, mut m8) = ([0u64; GEMM_GROUP], [0u64; GEMM_GROUP]);
            let (mut d, mut dmin) = ([0u16; GEMM_GROUP], [0u16; GEMM_GROUP]);
            for (n, w) in ws.iter().enumerate() {
                // Each row is its own stream: ask for its next lines early.
                crate::kernels::prefetch(w.as_ptr().wrapping_add(b * block), block);
                let blk = &w[b * block..][..16];
                (sc8[n], m8[n]) = q4_k_scales(&blk[4..16]);
                d[n] = u16::from_le_bytes([blk[0], blk[1]]);
                dmin[n] = u16::from_le_bytes([blk[2], blk[3]]);
            }
            // SAFETY: the arrays hold 16 values; block b's 8 scale rows,
            // 4 minimum rows and 16 + 16 block scales are inside the scratch.
            unsafe {
                let halves = |v: &[u64; GEMM_GROUP]| {
                    [
                        _mm512_loadu_si512(v.as_ptr().cast()),
                        _mm512_loadu_si512(v.as_ptr().add(8).cast()),
                    ]
                };
                let (sc8, m8) = (halves(&sc8), halves(&m8));
                for j in 0..8 {
                    // Byte j of each row's 8 scales.
                    let shift = _mm_cvtsi32_si128(8 * j as i32);
                    let lo = _mm512_cvtepi64_epi8(_mm512_srl_epi64(sc8[0], shift));
                    let hi = _mm512_cvtepi64_epi8(_mm512_srl_epi64(sc8[1], shift));
                    let bytes = _mm_unpacklo_epi64(lo, hi);
                    _mm512_storeu_si512(
                        sc_p.add((b * 8 + j) * GEMM_GROUP).cast(),
                        _mm512_cvtepu8_epi32(bytes),
                    );
                }
                for p in 0..4 {
                    // Minimums 2p and 2p + 1 as the two i16 of each lane.
                    let shift = _mm_cvtsi32_si128(16 * p as i32);
                    let mut pairs = [_mm256_setzero_si256(); 2];
                    for (pair, m) in pairs.iter_mut().zip(&m8) {
                        let v = _mm512_srl_epi64(*m, shift);
                        let two = _mm512_or_si512(
                            _mm512_and_si512(v, low8),
                            _mm512_slli_epi64::<8>(_mm512_and_si512(v, _mm512_set1_epi64(0xff00))),
                        );
                        *pair = _mm512_cvtepi64_epi32(two);
                    }
                    _mm512_storeu_si512(
                        mins_p.add((b * 4 + p) * GEMM_GROUP).cast(),
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(pairs[0]), pairs[1]),
                    );
                }
                for (bits, to) in [(&d, d_p), (&dmin, dmin_p)] {
                    crate::kernels::lanes::store_scales(to, b, bits);
                }
            }
        }
        // The codes: per block, 8 chunks of 32 (the low, then the high
        // nibbles of each 32 code bytes), each transposed across the 16
        // rows into groups 8c..8c+8 (missing rows: zero codes).
        let codes_p = scratch.codes.as_mut_ptr();
        for b in 0..nb {
            for c in 0..8 {
                let mut u = [_mm256_setzero_si256(); GEMM_GROUP];
                for (n, w) in ws.iter().enumerate() {
                    // SAFETY: code bytes 32(c/2).. of block b are inside the row.
                    let qv = unsafe {
                        _mm256_loadu_si256(
                            w.as_ptr().add(b * block + codes_at + 32 * (c / 2)).cast(),
                        )
                    };
                    u[n] = if c % 2 == 0 {
                        _mm256_and_si256(qv, m4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4)
                    };
                    if Q5 {
                        // Sub-block c's fifth bits: bit c of qh[l].
                        // SAFETY: qh's 32 bytes at 16 are inside the block.
                        let qh =
                            unsafe { _mm256_loadu_si256(w.as_ptr().add(b * block + 16).cast()) };
                        let set = _mm256_test_epi8_mask(qh, _mm256_set1_epi8(1 << c));
                        u[n] = _mm256_or_si256(
                            u[n],
                            _mm256_maskz_mov_epi8(set, _mm256_set1_epi8(0x10)),
                        );
                    }
                }
                // SAFETY: groups 8c..8c+8 of block b are inside the scratch.
                unsafe { crate::kernels::lanes::store_transposed(codes_p, b * 64 + 8 * c, &u) };
            }
        }
        let ahead = &mut crate::kernels::AskAhead::new(ws, xs.len().div_ceil(4));
        // SAFETY: the scratch holds nb blocks for 16 rows; the caller's
        // contract covers the activation rows.
        unsafe {
            in_groups_of_four!(xs.len(), m0 => q4_k_rows(scratch, &xs[m0..], nb, m0, out); ahead)
        };
    }

    gemm_kinds! {
        GemmScratch, Q8KRow;
        q4_k_rows8: "avx2,fma,f16c" => k_rows8::<8, 1>(fold_i16, scale_i16);
        q5_k_rows8: "avx2,fma,f16c" => k_rows8::<4, 1>(fold_i16, scale_i16);
        /// IQ4_XS's signed values, one group at a time by the sign trick.
        iq4_xs_rows8: "avx2,fma,f16c" => k_rows8::<1, 1>(fold_signed, scale_i16);
        /// Q4_K and Q5_K alike with AVX-VNNI: a sub-block's 8 groups each
        /// one `vpdpbusd` into i32 sums (no i16 to overflow), multiplied
        /// by the lanes' scales (stored as plain i32s for it).
        q45_k_rows8_vnni: "avx2,fma,f16c,avxvnni" => k_rows8::<8, 2>(dpbusd, scale_i32);
        q6_k_rows8_i16: "avx2,fma,f16c" => q6_k_rows8::<2, 1, 5, false>(fold_i16, scale_i16);
        q6_k_rows8_vnni: "avx2,fma,f16c,avxvnni" => q6_k_rows8::<4, 2, 5, false>(dpbusd, scale_i32);
        /// Q3_K: codes + 4 (at most 7: a sub-block's four groups fit an
        /// i16), the offset 4.
        q3_k_rows8_i16: "avx2,fma,f16c" => q6_k_rows8::<4, 1, 2, false>(fold_i16, scale_i16);
        q3_k_rows8_vnni: "avx2,fma,f16c,avxvnni" => q6_k_rows8::<4, 2, 2, false>(dpbusd, scale_i32);
        /// Q2_K: codes at most 3, no offset; the activations' sums of 16
        /// weighted by the minimums, scaled by `dmin`.
        q2_k_rows8_i16: "avx2,fma,f16c" => q6_k_rows8::<4, 1, 0, true>(fold_i16, scale_i16);
        q2_k_rows8_vnni: "avx2,fma,f16c,avxvnni" => q6_k_rows8::<4, 2, 0, true>(dpbusd, scale_i32);
    }

    /// [`super::gemm16`] for Q4_K and Q5_K on AVX2: the 16 weight rows as
    /// two halves of 8, lane `n` of a register holding 4 codes of row `n`
    /// (an 8 × 8 transpose per 32 codes, once per call); per sub-block of
    /// 32, each group of 4 activation codes broadcast against the 8 rows
    /// (`vpmaddubsw`, added as i16s: eight groups for 4-bit codes, four
    /// for 5-bit), then `vpmaddwd` by the rows' scales; the minimums' part
    /// by `vpmaddwd` of each lane's pairs of minimums against the
    /// activations' pairs of sums of 32. Per block, lane by lane,
    /// `x.d · (d · total − dmin · total_m)` in f64, as the row kernels:
    /// the same bits.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; every row of `ws` holds as many
    /// blocks as every row of `xs`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm16_q4_k_avx2<const Q5: bool, const VNNI: bool>(
        ws: &[&[u8]],
        xs: &[&Q8KRow],
        scratch: &mut GemmScratch,
        out: &mut crate::kernels::Tile,
    ) {
        const HALF: usize = GEMM_GROUP / 2;
        let nb = xs[0].d.len();
        let (block, codes_at) = q45_layout(Q5);
        let halves = ws.len().div_ceil(HALF);
        // Half h, block b (at = h·nb + b): group g (of 64) of the 8 rows
        // at (at·64 + g)·32 bytes; sub-block j's scales, each twice as
        // i16s, at (at·8 + j)·8; the minimums' pairs p at (at·4 + p)·8;
        // d and dmin at at·8.
        scratch.reset(halves * nb, 8);
        let m4 = _mm256_set1_epi8(0x0f);
        pack_blocks(ws, nb, scratch, |scratch, at, n, b, w, chunks| {
            crate::kernels::prefetch(w.as_ptr().wrapping_add(b * block), block);
            let blk = &w[b * block..][..16];
            for j in 0..8 {
                let (s, m) = kiln_blocks::scale_min_k4(j, &blk[4..16]);
                scratch.put_scale(VNNI, at * 8 + j, n, s as i32, m as i32);
            }
            scratch.d[at * HALF + n] = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])) as f64;
            scratch.dmin[at * HALF + n] = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]])) as f64;
            for (c, u) in chunks.iter_mut().enumerate() {
                // SAFETY: code bytes 32(c/2).. of block b are inside the
                // row.
                let qv = unsafe {
                    _mm256_loadu_si256(w.as_ptr().add(b * block + codes_at + 32 * (c / 2)).cast())
                };
                u[n] = if c % 2 == 0 {
                    _mm256_and_si256(qv, m4)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4)
                };
                if Q5 {
                    // Sub-block c's fifth bits: bit c of qh[l].
                    // SAFETY: qh's 32 bytes at 16 are inside the block.
                    let qh = unsafe { _mm256_loadu_si256(w.as_ptr().add(b * block + 16).cast()) };
                    let bit = _mm256_set1_epi8(1 << c);
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                    u[n] = _mm256_or_si256(u[n], _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
                }
            }
        });
        let calls = ws.len().div_ceil(GEMM_GROUP / 2) * xs.len().div_ceil(4);
        let ahead = &mut crate::kernels::AskAhead::new(ws, calls);
        // SAFETY: the scratch holds nb blocks of every half; the caller's
        // contract covers the activation rows.
        unsafe {
            if VNNI {
                in_each_half!(ws.len(), xs => q45_k_rows8_vnni(scratch, nb, out); ahead)
            } else if Q5 {
                in_each_half!(ws.len(), xs => q5_k_rows8(scratch, nb, out); ahead)
            } else {
                in_each_half!(ws.len(), xs => q4_k_rows8(scratch, nb, out); ahead)
            }
        };
    }

    /// [`super::gemm16`] for IQ4_XS on AVX2, through [`k_rows8`] (8
    /// sub-blocks of 32, as Q4_K): each code its IQ4_NL value (a `vpshufb`
    /// of the table), each sub-block's scale less 32. Without VNNI the
    /// values stay signed and take the sign trick one group at a time
    /// (two products of up to 127·127 fill an i16); with VNNI they are
    /// stored + 128 and the offset goes through Q4_K's minimums' term:
    /// the scales' pairs against the activations' sums of 32, `dmin` =
    /// 128·`d`. `d·total − 128d·total_m` is exact in f64 (both terms are
    /// multiples of `d` well inside 53 bits), so the one rounding left,
    /// by `x.d`, is the row kernel's `(d·x.d)·isum`: the same bits.
    ///
    /// # Safety
    /// As [`gemm16_q4_k_avx2`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm16_iq4_xs_avx2<const VNNI: bool>(
        ws: &[&[u8]],
        xs: &[&Q8KRow],
        scratch: &mut GemmScratch,
        out: &mut crate::kernels::Tile,
    ) {
        const HALF: usize = GEMM_GROUP / 2;
        let nb = xs[0].d.len();
        let halves = ws.len().div_ceil(HALF);
        // The layout of [`gemm16_q4_k_avx2`]'s scratch.
        scratch.reset(halves * nb, 8);
        let m4 = _mm_set1_epi8(0x0f);
        // SAFETY: the table holds the 16 bytes loaded.
        let table = unsafe { _mm_loadu_si128(kiln_blocks::IQ4_VALUES.as_ptr().cast()) };
        pack_blocks(ws, nb, scratch, |scratch, at, n, b, w, chunks| {
            let blk = &w[b * IQ4_XS_BLOCK..][..IQ4_XS_BLOCK];
            crate::kernels::prefetch(blk.as_ptr(), IQ4_XS_BLOCK);
            let scales_h = u16::from_le_bytes([blk[2], blk[3]]);
            for (j, chunk) in chunks.iter_mut().enumerate() {
                let sc = kiln_blocks::iq4_xs_scale(&blk[4..8], scales_h, j) - 32;
                // With VNNI the offset's weights are the scales.
                scratch.put_scale(VNNI, at * 8 + j, n, sc, if VNNI { sc } else { 0 });
                // Sub-block j: the low nibbles of its 16 bytes are codes
                // 0..16, the high ones 16..32.
                // SAFETY: bytes 8 + 16j.. +16 are inside the block.
                let q = unsafe { _mm_loadu_si128(blk.as_ptr().add(8 + 16 * j).cast()) };
                let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, m4));
                let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), m4));
                let v = _mm256_set_m128i(hi, lo);
                chunk[n] = if VNNI {
                    _mm256_xor_si256(v, _mm256_set1_epi8(-128))
                } else {
                    v
                };
            }
            let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])) as f64;
            scratch.d[at * HALF + n] = d;
            scratch.dmin[at * HALF + n] = if VNNI { 128.0 * d } else { 0.0 };
        });
        let calls = ws.len().div_ceil(GEMM_GROUP / 2) * xs.len().div_ceil(4);
        let ahead = &mut crate::kernels::AskAhead::new(ws, calls);
        // SAFETY: the scratch holds nb blocks of every half; the caller's
        // contract covers the activation rows.
        unsafe {
            if VNNI {
                in_each_half!(ws.len(), xs => q45_k_rows8_vnni(scratch, nb, out); ahead)
            } else {
                in_each_half!(ws.len(), xs => iq4_xs_rows8(scratch, nb, out); ahead)
            }
        };
    }

    /// `R` activation rows against half `h` of the unpacked Q4_K/Q5_K
    /// rows; runs of `FOLD` groups' products summed by `step`, then scaled
    /// into the totals by `scale` (as i16s: at most 2·15·127 a pair for
    /// 4-bit codes, eight fit; 2·31·127 for 5-bit, four fit).
    ///
    /// # Safety
    /// As [`gemm16_q4_k_avx2`]; `xs` has at least `R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn k_rows8<const R: usize, const FOLD: usize, const CHAINS: usize>(
        scratch: &GemmScratch,
        xs: &[&Q8KRow],
        nb: usize,
        h: usize,
        m0: usize,
        out: &mut crate::kernels::Tile,
        step: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
        scale: impl Fn(__m256i, __m256i, __m256i, __m256i) -> __m256i,
    ) {
        const HALF: usize = GEMM_GROUP / 2;
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        (0..R).for_each(|r| out.prefetch(m0 + r, h * HALF));
        let mut qs = [std::ptr::null::<i8>(); R];
        let mut pairs = [std::ptr::null::<i32>(); R];
        for (r, x) in xs.iter().enumerate() {
            assert!(x.qs.len() >= nb * QK_K && x.sums_pairs.len() >= nb * 4 && x.d.len() >= nb);
            (qs[r], pairs[r]) = (x.qs.as_ptr(), x.sums_pairs.as_ptr());
        }
        let codes_p = scratch.codes.as_ptr();
        let (sc_p, mins_p) = (scratch.sc.as_ptr(), scratch.mins.as_ptr());
        let (d_p, dmin_p) = (scratch.d.as_ptr(), scratch.dmin.as_ptr());
        let mut acc = [[_mm256_setzero_pd(); 2]; R];
        for b in 0..nb {
            let at = h * nb + b;
            let mut total = [_mm256_setzero_si256(); R];
            for j in 0..8 {
                // SAFETY: sub-block j's scales of block b are inside the
                // scratch.
                let sc = unsafe { _mm256_loadu_si256(sc_p.add((at * 8 + j) * HALF).cast()) };
                for g0 in (0..8).step_by(FOLD) {
                    let mut p16 = [[_mm256_setzero_si256(); R]; 2];
                    for g in g0..g0 + FOLD {
                        // SAFETY: group 8j + g of block b is inside the
                        // scratch.
                        let wv = unsafe {
                            _mm256_loadu_si256(codes_p.add((at * 64 + 8 * j + g) * 32).cast())
                        };
                        for (p, q) in p16[g % CHAINS].iter_mut().zip(&qs) {
                            // SAFETY: codes 32j + 4g.. of block b are inside
                            // the row (asserted).
                            let xv = _mm256_set1_epi32(unsafe {
                                q.add(b * QK_K + 32 * j + 4 * g)
                                    .cast::<i32>()
                                    .read_unaligned()
                            });
                            *p = step(*p, wv, xv);
                        }
                    }
                    for ((t, a), b) in total.iter_mut().zip(p16[0]).zip(p16[1]) {
                        *t = scale(*t, a, b, sc);
                    }
                }
            }
            let mut total_m = [_mm256_setzero_si256(); R];
            for p in 0..4 {
                // SAFETY: the minimums' pair p of block b is inside the
                // scratch.
                let m = unsafe { _mm256_loadu_si256(mins_p.add((at * 4 + p) * HALF).cast()) };
                for (t, s) in total_m.iter_mut().zip(&pairs) {
                    // SAFETY: the pair of sums p of block b is inside the
                    // row (asserted).
                    let sv = _mm256_set1_epi32(unsafe { *s.add(b * 4 + p) });
                    *t = _mm256_add_epi32(*t, _mm256_madd_epi16(m, sv));
                }
            }
            // SAFETY: the 8 scales of block b of half h are inside the
            // scratch.
            let (d, dmin) = unsafe {
                (
                    [
                        _mm256_loadu_pd(d_p.add(at * HALF)),
                        _mm256_loadu_pd(d_p.add(at * HALF + 4)),
                    ],
                    [
                        _mm256_loadu_pd(dmin_p.add(at * HALF)),
                        _mm256_loadu_pd(dmin_p.add(at * HALF + 4)),
                    ],
                )
            };
            for (r, x) in xs.iter().enumerate() {
                let dx = _mm256_set1_pd(x.d[b] as f64);
                let t = [
                    _mm256_cvtepi32_pd(_mm256_castsi256_si128(total[r])),
                    _mm256_cvtepi32_pd(_mm256_extracti128_si256(total[r], 1)),
                ];
                let tm = [
                    _mm256_cvtepi32_pd(_mm256_castsi256_si128(total_m[r])),
                    _mm256_cvtepi32_pd(_mm256_extracti128_si256(total_m[r], 1)),
                ];
                for k in 0..2 {
                    // x.d · (d · total − dmin · total_m), rounded as the
                    // row kernels round it (no fused steps).
                    let inner =
                        _mm256_sub_pd(_mm256_mul_pd(d[k], t[k]), _mm256_mul_pd(dmin[k], tm[k]));
                    acc[r][k] = _mm256_add_pd(acc[r][k], _mm256_mul_pd(dx, inner));
                }
            }
        }
        crate::kernels::lanes::emit8(&acc, h * HALF, m0, out);
    }

    /// Stores one block of a half of the AVX2 GEMMs' scratch: chunk `c`'s
    /// 32 codes of each of the 8 rows (`chunks[c][n]`), transposed so that
    /// group `8c + g` (codes `32c + 4g..`) of all 8 rows is one register
    /// at `(at·64 + 8c + g)·32`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn store_chunks(codes: &mut [u8], at: usize, chunks: &[[__m256i; 8]; 8]) {
        let block = &mut codes[at * 64 * 32..][..64 * 32];
        for (c, u) in chunks.iter().enumerate() {
            let t = crate::kernels::lanes::transpose_8x8(u);
            for (g, v) in t.iter().enumerate() {
                // SAFETY: group 8c + g is inside `block` (64 groups of 32
                // bytes, bounds-checked above).
                unsafe { _mm256_storeu_si256(block.as_mut_ptr().add((8 * c + g) * 32).cast(), *v) };
            }
        }
    }

    /// The packing loop of the AVX2 K-quant GEMMs: for each half of the
    /// rows and each block (`at = h·nb + b`), `unpack(scratch, at, n, b,
    /// row, chunks)` puts row `n`'s scales, `d` and `dmin` into the scratch
    /// and its codes into `chunks[c][n]` (chunk `c`: codes `32c..32c +
    /// 32`); then the block's chunks are stored lane-wise
    /// ([`store_chunks`]).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pack_blocks(
        ws: &[&[u8]],
        nb: usize,
        scratch: &mut GemmScratch,
        mut unpack: impl FnMut(&mut GemmScratch, usize, usize, usize, &[u8], &mut [[__m256i; 8]; 8]),
    ) {
        const HALF: usize = GEMM_GROUP / 2;
        for (h, half) in ws.chunks(HALF).enumerate() {
            for b in 0..nb {
                let at = h * nb + b;
                let mut chunks = [[_mm256_setzero_si256(); HALF]; 8];
                for (n, w) in half.iter().enumerate() {
                    unpack(scratch, at, n, b, w, &mut chunks);
                }
                store_chunks(&mut scratch.codes, at, &chunks);
            }
        }
    }

    /// One block of a K-quant with 16 sub-blocks of 16 codes, as the
    /// AVX2 GEMM packs it: each sub-block's scale, what the activations'
    /// sums of 16 are weighted by (Q2_K: its minimum; Q3_K and Q6_K: its
    /// scale again, for the codes' offset), `d`, `dmin` (Q2_K), and the
    /// unsigned codes in 8 chunks of 32 (chunk `c`: codes `32c..32c + 32`).
    struct Unpacked16 {
        scales: [i32; 16],
        mins: [i32; 16],
        d: f64,
        dmin: f64,
        codes: [__m256i; 8],
    }

    /// A Q2_K block: 4-bit scales and minimums, 2-bit codes.
    ///
    /// # Safety
    /// AVX2 is enabled by the caller; `blk` is one whole Q2_K block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q2_k_unpacked(blk: &[u8]) -> Unpacked16 {
        assert_eq!(blk.len(), Q2_K_BLOCK);
        let scales = std::array::from_fn(|s| (blk[s] & 0x0f) as i32);
        let mins = std::array::from_fn(|s| (blk[s] >> 4) as i32);
        let m3 = _mm256_set1_epi8(3);
        let mut codes = [_mm256_setzero_si256(); 8];
        for n in 0..2 {
            // SAFETY: the 64 code bytes are at 16..80 of the block
            // (asserted).
            let mut q = unsafe { _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * n).cast()) };
            // Chunk 4n + j: bits 2j.
            for j in 0..4 {
                codes[4 * n + j] = _mm256_and_si256(q, m3);
                q = _mm256_srli_epi16(q, 2);
            }
        }
        Unpacked16 {
            scales,
            mins,
            d: f16_to_f32(u16::from_le_bytes([blk[80], blk[81]])) as f64,
            dmin: f16_to_f32(u16::from_le_bytes([blk[82], blk[83]])) as f64,
            codes,
        }
    }

    /// A Q6_K block's 16 scales, `d`, and codes + 32 in 8 chunks of 32
    /// (chunk `c`: codes `32c..32c + 32`, as the row kernel unpacks them).
    ///
    /// # Safety
    /// AVX2 is enabled by the caller; `blk` is one whole Q6_K block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_unpacked(blk: &[u8]) -> Unpacked16 {
        assert_eq!(blk.len(), BLOCK);
        let scales = std::array::from_fn(|s| blk[192 + s] as i8 as i32);
        let d = f16_to_f32(u16::from_le_bytes([blk[208], blk[209]])) as f64;
        let (m4, m30) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
        let mut codes = [_mm256_setzero_si256(); 8];
        let p = blk.as_ptr();
        for k in 0..2 {
            // SAFETY: ql (128 bytes at 0) and qh (64 at 128) are inside
            // the block (asserted).
            let (ql0, ql1, qh) = unsafe {
                (
                    _mm256_loadu_si256(p.add(64 * k).cast()),
                    _mm256_loadu_si256(p.add(64 * k + 32).cast()),
                    _mm256_loadu_si256(p.add(128 + 32 * k).cast()),
                )
            };
            // Codes 128k + 32j.. (chunk 4k + j).
            codes[4 * k] = _mm256_or_si256(
                _mm256_and_si256(ql0, m4),
                _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
            );
            codes[4 * k + 1] = _mm256_or_si256(
                _mm256_and_si256(ql1, m4),
                _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
            );
            codes[4 * k + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                _mm256_and_si256(qh, m30),
            );
            codes[4 * k + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
            );
        }
        Unpacked16 {
            scales,
            mins: scales,
            d,
            dmin: 0.0,
            codes,
        }
    }

    /// A Q3_K block's 16 scales (less 32), `d`, and codes + 4 (two low
    /// bits and the mask's bit as bit 2) in 8 chunks of 32, as
    /// [`q6_k_unpacked`] and the Q3_K row kernel.
    ///
    /// # Safety
    /// AVX2 is enabled by the caller; `blk` is one whole Q3_K block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q3_k_unpacked(blk: &[u8]) -> Unpacked16 {
        assert_eq!(blk.len(), Q3_K_BLOCK);
        let packed = kiln_blocks::q3_k_scales(&blk[96..108]);
        let scales = std::array::from_fn(|s| packed[s] as i32 - 32);
        let d = f16_to_f32(u16::from_le_bytes([blk[108], blk[109]])) as f64;
        let (m3, m1) = (_mm256_set1_epi8(3), _mm256_set1_epi8(1));
        let mut codes = [_mm256_setzero_si256(); 8];
        let p = blk.as_ptr();
        // SAFETY: the 32 mask bytes are at 0..32 of the block (asserted).
        let mut hm = unsafe { _mm256_loadu_si256(p.cast()) };
        for n in 0..2 {
            // SAFETY: the 64 low-bit bytes are at 32..96 of the block.
            let mut q = unsafe { _mm256_loadu_si256(p.add(32 + 32 * n).cast()) };
            // Chunk 4n + j: low bits 2j, mask bit 4n + j, moved to bit 2.
            for j in 0..4 {
                codes[4 * n + j] = _mm256_or_si256(
                    _mm256_and_si256(q, m3),
                    _mm256_slli_epi16(_mm256_and_si256(hm, m1), 2),
                );
                q = _mm256_srli_epi16(q, 2);
                hm = _mm256_srli_epi16(hm, 1);
            }
        }
        Unpacked16 {
            scales,
            mins: scales,
            d,
            dmin: 0.0,
            codes,
        }
    }

    /// [`super::gemm16`] on AVX2 for the K-quants with 16 sub-blocks of
    /// 16 (the type numbered `D`: Q6_K, Q3_K or Q2_K), as
    /// [`gemm16_q4_k_avx2`]: the codes unsigned (Q6_K's code + 32, at
    /// most 63: two groups' products added as i16s; Q3_K's + 4, at most
    /// 7, and Q2_K's, at most 3: four), `vpmaddwd` by each lane's scale
    /// per sub-block of 16, the offset (Q2_K: the minimums) from
    /// `vpmaddwd` of each lane's pairs of scales (minimums) against the
    /// activations' pairs of sums of 16; per block in f64, as the row
    /// kernels round it.
    ///
    /// # Safety
    /// As [`gemm16_q4_k_avx2`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm16_k16_avx2<const D: u32, const VNNI: bool>(
        ws: &[&[u8]],
        xs: &[&Q8KRow],
        scratch: &mut GemmScratch,
        out: &mut crate::kernels::Tile,
    ) {
        const HALF: usize = GEMM_GROUP / 2;
        let nb = xs[0].d.len();
        let halves = ws.len().div_ceil(HALF);
        // Half h, block b (at = h·nb + b): group g (of 64) at
        // (at·64 + g)·32 bytes; sub-block s's scale, twice as i16s, at
        // (at·16 + s)·8; the scales' pairs p at (at·8 + p)·8; d at at·8.
        scratch.reset(halves * nb, 16);
        const Q2: u32 = DType::Q2_K.raw();
        const Q3: u32 = DType::Q3_K.raw();
        let bytes = match D {
            Q2 => Q2_K_BLOCK,
            Q3 => Q3_K_BLOCK,
            _ => BLOCK,
        };
        pack_blocks(ws, nb, scratch, |scratch, at, n, b, w, chunks| {
            let blk = &w[b * bytes..][..bytes];
            crate::kernels::prefetch(blk.as_ptr(), bytes);
            // SAFETY: `blk` is one whole block of the type.
            let u = unsafe {
                match D {
                    Q2 => q2_k_unpacked(blk),
                    Q3 => q3_k_unpacked(blk),
                    _ => q6_k_unpacked(blk),
                }
            };
            for (s, (&sc, &m)) in u.scales.iter().zip(&u.mins).enumerate() {
                scratch.put_scale(VNNI, at * 16 + s, n, sc, m);
            }
            scratch.d[at * HALF + n] = u.d;
            scratch.dmin[at * HALF + n] = u.dmin;
            for (chunk, c) in chunks.iter_mut().zip(u.codes) {
                chunk[n] = c;
            }
        });
        let calls = ws.len().div_ceil(GEMM_GROUP / 2) * xs.len().div_ceil(4);
        let ahead = &mut crate::kernels::AskAhead::new(ws, calls);
        // SAFETY: the scratch holds nb blocks of every half; the caller's
        // contract covers the activation rows.
        unsafe {
            match (D, VNNI) {
                (Q2, true) => {
                    in_each_half!(ws.len(), xs => q2_k_rows8_vnni(scratch, nb, out); ahead)
                }
                (Q2, false) => {
                    in_each_half!(ws.len(), xs => q2_k_rows8_i16(scratch, nb, out); ahead)
                }
                (Q3, true) => {
                    in_each_half!(ws.len(), xs => q3_k_rows8_vnni(scratch, nb, out); ahead)
                }
                (Q3, false) => {
                    in_each_half!(ws.len(), xs => q3_k_rows8_i16(scratch, nb, out); ahead)
                }
                (_, true) => {
                    in_each_half!(ws.len(), xs => q6_k_rows8_vnni(scratch, nb, out); ahead)
                }
                (_, false) => {
                    in_each_half!(ws.len(), xs => q6_k_rows8_i16(scratch, nb, out); ahead)
                }
            }
        };
    }

    /// `R` activation rows against half `h` of the unpacked Q6_K rows;
    /// runs of `FOLD` groups' products summed by `step` and scaled into
    /// the totals by `scale`, as [`k_rows8`] (as i16s two groups fit: the
    /// codes are at most 63).
    ///
    /// # Safety
    /// As [`gemm16_k16_avx2`]; `xs` has at least `R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q6_k_rows8<
        const R: usize,
        const FOLD: usize,
        const CHAINS: usize,
        const SHIFT: i32,
        const Q2: bool,
    >(
        scratch: &GemmScratch,
        xs: &[&Q8KRow],
        nb: usize,
        h: usize,
        m0: usize,
        out: &mut crate::kernels::Tile,
        step: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
        scale: impl Fn(__m256i, __m256i, __m256i, __m256i) -> __m256i,
    ) {
        const HALF: usize = GEMM_GROUP / 2;
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        (0..R).for_each(|r| out.prefetch(m0 + r, h * HALF));
        let (qs, pairs16) = row_pointers(xs, nb);
        let codes_p = scratch.codes.as_ptr();
        let (sc_p, pairs_p, d_p, dmin_p) = (
            scratch.sc.as_ptr(),
            scratch.mins.as_ptr(),
            scratch.d.as_ptr(),
            scratch.dmin.as_ptr(),
        );
        let mut acc = [[_mm256_setzero_pd(); 2]; R];
        for b in 0..nb {
            let at = h * nb + b;
            let mut total = [_mm256_setzero_si256(); R];
            for s in 0..16 {
                // SAFETY: sub-block s's scales of block b are inside the
                // scratch.
                let sc = unsafe { _mm256_loadu_si256(sc_p.add((at * 16 + s) * HALF).cast()) };
                for g0 in (4 * s..4 * s + 4).step_by(FOLD) {
                    let mut p16 = [[_mm256_setzero_si256(); R]; 2];
                    for g in g0..g0 + FOLD {
                        // SAFETY: group g of block b is inside the scratch.
                        let wv =
                            unsafe { _mm256_loadu_si256(codes_p.add((at * 64 + g) * 32).cast()) };
                        for (p, q) in p16[g % CHAINS].iter_mut().zip(&qs) {
                            // SAFETY: codes 4g.. of block b are inside the
                            // row (`row_pointers` checked the lengths).
                            let xv = _mm256_set1_epi32(unsafe {
                                q.add(b * QK_K + 4 * g).cast::<i32>().read_unaligned()
                            });
                            *p = step(*p, wv, xv);
                        }
                    }
                    for ((t, a), b) in total.iter_mut().zip(p16[0]).zip(p16[1]) {
                        *t = scale(*t, a, b, sc);
                    }
                }
            }
            let mut offset = [_mm256_setzero_si256(); R];
            for p in 0..8 {
                // SAFETY: the scales' pair p of block b is inside the
                // scratch.
                let sp = unsafe { _mm256_loadu_si256(pairs_p.add((at * 8 + p) * HALF).cast()) };
                for (o, s) in offset.iter_mut().zip(&pairs16) {
                    // SAFETY: pair p of block b is inside the row (asserted).
                    let sv = _mm256_set1_epi32(unsafe { *s.add(b * 8 + p) });
                    *o = _mm256_add_epi32(*o, _mm256_madd_epi16(sp, sv));
                }
            }
            // SAFETY: the 8 scales of block b of half h are inside the
            // scratch.
            let (d, dmin) = unsafe {
                (
                    [
                        _mm256_loadu_pd(d_p.add(at * HALF)),
                        _mm256_loadu_pd(d_p.add(at * HALF + 4)),
                    ],
                    [
                        _mm256_loadu_pd(dmin_p.add(at * HALF)),
                        _mm256_loadu_pd(dmin_p.add(at * HALF + 4)),
                    ],
                )
            };
            for (r, x) in xs.iter().enumerate() {
                let dx = _mm256_set1_pd(x.d[b] as f64);
                if Q2 {
                    // d·x.d·total − dmin·x.d·minimums, rounded as
                    // `q2_k_scaled` rounds it.
                    let (t, m) = (total[r], offset[r]);
                    for k in 0..2 {
                        let (t, m) = if k == 0 {
                            (_mm256_castsi256_si128(t), _mm256_castsi256_si128(m))
                        } else {
                            (
                                _mm256_extracti128_si256(t, 1),
                                _mm256_extracti128_si256(m, 1),
                            )
                        };
                        let term = _mm256_sub_pd(
                            _mm256_mul_pd(_mm256_mul_pd(d[k], dx), _mm256_cvtepi32_pd(t)),
                            _mm256_mul_pd(_mm256_mul_pd(dmin[k], dx), _mm256_cvtepi32_pd(m)),
                        );
                        acc[r][k] = _mm256_add_pd(acc[r][k], term);
                    }
                    continue;
                }
                let t = _mm256_sub_epi32(total[r], _mm256_slli_epi32::<SHIFT>(offset[r]));
                let t = [
                    _mm256_cvtepi32_pd(_mm256_castsi256_si128(t)),
                    _mm256_cvtepi32_pd(_mm256_extracti128_si256(t, 1)),
                ];
                for k in 0..2 {
                    // d · x.d · total, rounded as the row kernels round it.
                    acc[r][k] =
                        _mm256_add_pd(acc[r][k], _mm256_mul_pd(_mm256_mul_pd(d[k], dx), t[k]));
                }
            }
        }
        crate::kernels::lanes::emit8(&acc, h * HALF, m0, out);
    }

    /// Each row's codes and its sums of 16 in pairs (`sums16_pairs`) as
    /// plain pointers, their lengths checked for `nb` blocks once (the
    /// GEMMs' inner loops then index without bounds checks).
    #[inline(always)]
    fn row_pointers<const R: usize>(
        xs: &[&Q8KRow; R],
        nb: usize,
    ) -> ([*const i8; R], [*const i32; R]) {
        let mut qs = [std::ptr::null(); R];
        let mut pairs16 = [std::ptr::null(); R];
        for (r, x) in xs.iter().enumerate() {
            assert!(x.qs.len() >= nb * QK_K && x.sums16_pairs.len() >= nb * 8);
            (qs[r], pairs16[r]) = (x.qs.as_ptr(), x.sums16_pairs.as_ptr());
        }
        (qs, pairs16)
    }

    /// `R` activation rows against the unpacked 16 weight rows.
    ///
    /// # Safety
    /// As [`gemm16_q4_k_vnni`]; `xs` has at least `R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    unsafe fn q4_k_rows<const R: usize>(
        scratch: &GemmScratch,
        xs: &[&Q8KRow],
        nb: usize,
        m0: usize,
        out: &mut crate::kernels::Tile,
    ) {
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        (0..R).for_each(|r| out.prefetch(m0 + r, 0));
        let codes = scratch.codes.as_ptr();
        let mut acc = [[_mm512_setzero_pd(); 2]; R];
        // The rows' arrays as plain pointers, read once (not per block).
        let (qs, _) = row_pointers(xs, nb);
        for b in 0..nb {
            let mut total = [_mm512_setzero_si512(); R];
            // Σ_j m_j · Σx_j, two sub-blocks per `vpdpwssd`.
            let mut total_m = [_mm512_setzero_si512(); R];
            for p in 0..4 {
                // SAFETY: pair p of block b's minimums is inside the scratch.
                let mins = unsafe {
                    _mm512_loadu_si512(scratch.mins.as_ptr().add((b * 4 + p) * GEMM_GROUP).cast())
                };
                for (t, x) in total_m.iter_mut().zip(xs) {
                    *t = _mm512_dpwssd_epi32(*t, mins, _mm512_set1_epi32(x.sums_pairs[b * 4 + p]));
                }
            }
            for j in 0..8 {
                // Two `vpdpbusd` chains per row (groups by parity), as on
                // AVX-VNNI.
                let mut sum = [[_mm512_setzero_si512(); R]; 2];
                for g in 0..8 {
                    // SAFETY: group 8j + g of block b is inside the scratch.
                    let w = unsafe {
                        _mm512_loadu_si512(
                            codes.add(((b * 64 + 8 * j + g) * GEMM_GROUP) * 4).cast(),
                        )
                    };
                    for (s, q) in sum[g % 2].iter_mut().zip(&qs) {
                        // SAFETY: codes 32j + 4g.. of block b are inside the row.
                        let xv = unsafe {
                            q.add(b * QK_K + 32 * j + 4 * g)
                                .cast::<i32>()
                                .read_unaligned()
                        };
                        *s = _mm512_dpbusd_epi32(*s, w, _mm512_set1_epi32(xv));
                    }
                }
                let at = (b * 8 + j) * GEMM_GROUP;
                // SAFETY: the 16 scales of sub-block j are inside.
                let sc = unsafe { _mm512_loadu_si512(scratch.sc.as_ptr().add(at).cast()) };
                for ((t, s), o) in total.iter_mut().zip(sum[0]).zip(sum[1]) {
                    *t = _mm512_add_epi32(*t, _mm512_mullo_epi32(_mm512_add_epi32(s, o), sc));
                }
            }
            let at = b * GEMM_GROUP;
            // SAFETY: the 16 scales of block b are inside the scratch.
            let (d_lo, d_hi, m_lo, m_hi) = unsafe {
                (
                    _mm512_loadu_pd(scratch.d.as_ptr().add(at)),
                    _mm512_loadu_pd(scratch.d.as_ptr().add(at + 8)),
                    _mm512_loadu_pd(scratch.dmin.as_ptr().add(at)),
                    _mm512_loadu_pd(scratch.dmin.as_ptr().add(at + 8)),
                )
            };
            for (r, x) in xs.iter().enumerate() {
                let dx = _mm512_set1_pd(x.d[b] as f64);
                let half = |v: __m512i, hi: bool| {
                    if hi {
                        _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(v, 1))
                    } else {
                        _mm512_cvtepi32_pd(_mm512_castsi512_si256(v))
                    }
                };
                // As dot_q4_k: x.d · (d · total − dmin · total_m), added
                // on. (Written out twice: a loop over an array of the
                // pairs became a 256-byte memcpy per block.)
                let lo = _mm512_sub_pd(
                    _mm512_mul_pd(d_lo, half(total[r], false)),
                    _mm512_mul_pd(m_lo, half(total_m[r], false)),
                );
                let hi = _mm512_sub_pd(
                    _mm512_mul_pd(d_hi, half(total[r], true)),
                    _mm512_mul_pd(m_hi, half(total_m[r], true)),
                );
                acc[r][0] = _mm512_add_pd(acc[r][0], _mm512_mul_pd(dx, lo));
                acc[r][1] = _mm512_add_pd(acc[r][1], _mm512_mul_pd(dx, hi));
            }
        }
        // SAFETY: AVX-512 F is enabled here.
        unsafe { crate::kernels::lanes::emit(&acc, m0, out) };
    }

    /// See [`super::gemm16`].
    ///
    /// # Safety
    /// As [`gemm16_q4_k_vnni`], for Q6_K rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn gemm16_q6_k_vnni(
        ws: &[&[u8]],
        xs: &[&Q8KRow],
        scratch: &mut GemmScratch,
        out: &mut crate::kernels::Tile,
    ) {
        let nb = xs[0].d.len();
        // Group g (4 codes) of block b, row n at ((b * 64 + g) * 16 + n) * 4;
        // the scale of 16 codes j at (b * 16 + j) * 16 + n.
        scratch.codes.clear();
        scratch.codes.resize(nb * 64 * GEMM_GROUP * 4, 0);
        scratch.sc.clear();
        scratch.sc.resize(nb * 16 * GEMM_GROUP, 0);
        // The codes' offset: −32 times the scales, in pairs of i16 (at
        // most 32 · 128): pair p of block b, row n at (b * 8 + p) * 16 + n.
        scratch.mins.clear();
        scratch.mins.resize(nb * 8 * GEMM_GROUP, 0);
        scratch.d.clear();
        scratch.d.resize(nb * GEMM_GROUP, 0.0);
        for (n, w) in ws.iter().enumerate() {
            for (b, blk) in w.chunks_exact(BLOCK).enumerate() {
                for j in 0..16 {
                    let sc = blk[192 + j] as i8 as i32;
                    scratch.sc[(b * 16 + j) * GEMM_GROUP + n] = sc;
                    scratch.mins[(b * 8 + j / 2) * GEMM_GROUP + n] |=
                        ((-32 * sc) as i16 as u16 as i32) << (16 * (j % 2));
                }
                scratch.d[b * GEMM_GROUP + n] =
                    f16_to_f32(u16::from_le_bytes([blk[208], blk[209]])) as f64;
            }
        }
        // The codes: each row's block built in registers, then per 32
        // codes a transpose across the 16 rows (missing rows: zero codes).
        let codes_p = scratch.codes.as_mut_ptr();
        let mut rows_codes = [[_mm512_setzero_si512(); 4]; GEMM_GROUP];
        for b in 0..nb {
            for (n, w) in ws.iter().enumerate() {
                crate::kernels::prefetch(w.as_ptr().wrapping_add(b * BLOCK), BLOCK);
                // SAFETY: block b is inside the row.
                rows_codes[n] = unsafe { q6_k_codes_512(w.as_ptr().add(b * BLOCK)) };
            }
            for c in 0..8 {
                let mut u = [_mm256_setzero_si256(); GEMM_GROUP];
                for (u, codes) in u.iter_mut().zip(&rows_codes).take(ws.len()) {
                    let z = codes[c / 2];
                    *u = if c % 2 == 0 {
                        _mm512_castsi512_si256(z)
                    } else {
                        _mm512_extracti64x4_epi64::<1>(z)
                    };
                }
                // SAFETY: groups 8c..8c+8 of block b are inside the scratch.
                unsafe { crate::kernels::lanes::store_transposed(codes_p, b * 64 + 8 * c, &u) };
            }
        }
        let ahead = &mut crate::kernels::AskAhead::new(ws, xs.len().div_ceil(4));
        // SAFETY: the scratch holds nb blocks for 16 rows; the caller's
        // contract covers the activation rows.
        unsafe {
            in_groups_of_four!(xs.len(), m0 => q6_k_rows(scratch, &xs[m0..], nb, m0, out); ahead)
        };
    }

    /// `R` activation rows against the unpacked 16 Q6_K weight rows.
    ///
    /// # Safety
    /// As [`gemm16_q6_k_vnni`]; `xs` has at least `R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    unsafe fn q6_k_rows<const R: usize>(
        scratch: &GemmScratch,
        xs: &[&Q8KRow],
        nb: usize,
        m0: usize,
        out: &mut crate::kernels::Tile,
    ) {
        let xs: &[&Q8KRow; R] = xs[..R].try_into().expect("R rows");
        (0..R).for_each(|r| out.prefetch(m0 + r, 0));
        let codes = scratch.codes.as_ptr();
        // The rows' arrays as plain pointers, read once (not per block).
        let (qs, pairs16) = row_pointers(xs, nb);
        let mut acc = [[_mm512_setzero_pd(); 2]; R];
        for b in 0..nb {
            // The codes' offset first, once a block: Σ_j −32 · sc_j · Σx_j,
            // two sub-blocks per `vpdpwssd`.
            let mut total = [_mm512_setzero_si512(); R];
            for p in 0..8 {
                // SAFETY: pair p of block b's scales is inside the scratch.
                let sc2 = unsafe {
                    _mm512_loadu_si512(scratch.mins.as_ptr().add((b * 8 + p) * GEMM_GROUP).cast())
                };
                for (t, s) in total.iter_mut().zip(&pairs16) {
                    // SAFETY: pair p of block b is inside the row (asserted).
                    let s2 = unsafe { *s.add(b * 8 + p) };
                    *t = _mm512_dpwssd_epi32(*t, sc2, _mm512_set1_epi32(s2));
                }
            }
            for j in 0..16 {
                let mut sum = [_mm512_setzero_si512(); R];
                for g in 0..4 {
                    // SAFETY: group 4j + g of block b is inside the scratch.
                    let w = unsafe {
                        _mm512_loadu_si512(
                            codes.add(((b * 64 + 4 * j + g) * GEMM_GROUP) * 4).cast(),
                        )
                    };
                    for (s, q) in sum.iter_mut().zip(&qs) {
                        // SAFETY: codes 16j + 4g.. of block b are inside the row.
                        let xv = unsafe {
                            q.add(b * QK_K + 16 * j + 4 * g)
                                .cast::<i32>()
                                .read_unaligned()
                        };
                        *s = _mm512_dpbusd_epi32(*s, w, _mm512_set1_epi32(xv));
                    }
                }
                // SAFETY: the 16 scales of these 16 codes are inside.
                let sc = unsafe {
                    _mm512_loadu_si512(scratch.sc.as_ptr().add((b * 16 + j) * GEMM_GROUP).cast())
                };
                for r in 0..R {
                    total[r] = _mm512_add_epi32(total[r], _mm512_mullo_epi32(sum[r], sc));
                }
            }
            let at = b * GEMM_GROUP;
            // SAFETY: the 16 scales of block b are inside the scratch.
            let (d_lo, d_hi) = unsafe {
                (
                    _mm512_loadu_pd(scratch.d.as_ptr().add(at)),
                    _mm512_loadu_pd(scratch.d.as_ptr().add(at + 8)),
                )
            };
            for (r, x) in xs.iter().enumerate() {
                // As dot_q6_k: (d · x.d) · total, added on.
                let dx = _mm512_set1_pd(x.d[b] as f64);
                let lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(total[r]));
                let hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(total[r], 1));
                acc[r][0] = _mm512_add_pd(acc[r][0], _mm512_mul_pd(_mm512_mul_pd(d_lo, dx), lo));
                acc[r][1] = _mm512_add_pd(acc[r][1], _mm512_mul_pd(_mm512_mul_pd(d_hi, dx), hi));
            }
        }
        // SAFETY: AVX-512 F is enabled here.
        unsafe { crate::kernels::lanes::emit(&acc, m0, out) };
    }

    /// Defines `$name`: decode's loop over a range of weight rows around
    /// a one-row kernel (`$call`, with `$w`, `$xs` and `$out` bound to the
    /// row, the activation row and the result), in one function with the
    /// kernel's features so that the kernel inlines into it: the call,
    /// the checks and the kernel's constants come once per range instead
    /// of once per row (a Q4_K row of 2048 weights is only 8 blocks, and
    /// rows four times longer ran about 10 % faster per weight in
    /// `benches/gemm.rs`).
    macro_rules! rows {
        ($name:ident, $features:literal, |$w:ident, $xs:ident, $out:ident| $call:expr) => {
            /// # Safety
            /// The CPU has the features named; every row `w(n)` holds as
            /// many blocks as `x` (`bytes` bytes: checked).
            #[target_feature(enable = $features)]
            pub unsafe fn $name<'w>(
                x: &Q8KRow,
                rows: impl Iterator<Item = usize>,
                bytes: usize,
                w: impl Fn(usize) -> &'w [u8],
                mut out: impl FnMut(usize, f32),
            ) {
                for n in rows {
                    let $w = w(n);
                    assert_eq!($w.len(), bytes, "weight row {n}");
                    let $xs: [&Q8KRow; 1] = [x];
                    let mut o = [0f32];
                    let $out = &mut o[..];
                    // SAFETY: the caller's contract; the row's length was
                    // checked.
                    unsafe { $call };
                    out(n, o[0]);
                }
            }
        };
    }
    rows!(
        rows_q4_k_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
        |w, xs, out| dot_q4_k_vnni::<1, false>(w, &xs, out)
    );
    rows!(
        rows_q5_k_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
        |w, xs, out| dot_q4_k_vnni::<1, true>(w, &xs, out)
    );
    rows!(
        rows_q6_k_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
        |w, xs, out| dot_q6_k_vnni::<1>(w, &xs, out)
    );
    rows!(rows_q4_k_avx2, "avx2,fma,f16c", |w, xs, out| {
        dot_q4_k_by::<1, false>(w, &xs, out, madd_i16!())
    });
    rows!(rows_q5_k_avx2, "avx2,fma,f16c", |w, xs, out| {
        dot_q4_k_by::<1, true>(w, &xs, out, madd_i16!())
    });
    rows!(rows_q6_k_avx2, "avx2,fma,f16c", |w, xs, out| {
        dot_q6_k_by::<1>(w, &xs, out, madd_i16!())
    });
    rows!(rows_q4_k_avxvnni, "avx2,fma,f16c,avxvnni", |w, xs, out| {
        dot_q4_k_by::<1, false>(w, &xs, out, dpwssd!())
    });
    rows!(rows_q5_k_avxvnni, "avx2,fma,f16c,avxvnni", |w, xs, out| {
        dot_q4_k_by::<1, true>(w, &xs, out, dpwssd!())
    });
    rows!(rows_q6_k_avxvnni, "avx2,fma,f16c,avxvnni", |w, xs, out| {
        dot_q6_k_by::<1>(w, &xs, out, dpwssd!())
    });
}
