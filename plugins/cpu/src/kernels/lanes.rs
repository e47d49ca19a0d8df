//! What the lane-wise kernels share: 16 weight rows (or, in decode, 16
//! blocks of one row), one per lane of a 512-bit register, each activation
//! row's results in two registers of eight f64s (the K-quants) or one of
//! sixteen f32s (the Q8 family: [`emit_ps`]); on AVX2, 8 rows a 256-bit
//! register ([`transpose_8x8`], [`emit8`], [`emit8_ps`]).

#[cfg(target_arch = "x86_64")]
use super::Tile;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// Weight rows per lane-wise group.
pub const ROWS: usize = 16;

/// Writes weight row `n`'s unpacked codes of block `b` (`row`, a multiple
/// of 4 bytes) into the lane-wise layout: group `g` of 4 codes lands at
/// `((b · groups + g) · 16 + n) · 4`, `groups = row.len() / 4`.
pub fn scatter(codes: &mut [u8], row: &[u8], b: usize, n: usize) {
    let groups = row.len() / 4;
    for (g, four) in row.chunks_exact(4).enumerate() {
        let at = ((b * groups + g) * ROWS + n) * 4;
        codes[at..at + 4].copy_from_slice(four);
    }
}

#[cfg(target_arch = "x86_64")]
/// Stores each activation row's 16 results in its row of `out`: row
/// `m0 + r` from `acc[r]`, every lane (those past the group's real rows
/// are never read).
///
/// # Safety
/// AVX-512 F is present.
#[target_feature(enable = "avx512f")]
pub unsafe fn emit(acc: &[[__m512d; 2]], m0: usize, out: &mut Tile) {
    for (r, acc) in acc.iter().enumerate() {
        let to = out.row(m0 + r).as_mut_ptr();
        // SAFETY: the row holds 16 f32s.
        unsafe {
            _mm256_storeu_ps(to, _mm512_cvtpd_ps(acc[0]));
            _mm256_storeu_ps(to.add(8), _mm512_cvtpd_ps(acc[1]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// [`emit`] for results summed in f32: each activation row's 16 results
/// (one register) to its row of `out`.
///
/// # Safety
/// AVX-512 F is present.
#[target_feature(enable = "avx512f")]
pub unsafe fn emit_ps(acc: &[__m512], m0: usize, out: &mut Tile) {
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: the row holds 16 f32s.
        unsafe { _mm512_storeu_ps(out.row(m0 + r).as_mut_ptr(), *acc) };
    }
}

#[cfg(target_arch = "x86_64")]
/// Sixteen rows of eight 32-bit groups to eight registers of sixteen
/// lanes: group `j` of row `n` to lane `n` of register `j`.
///
/// # Safety
/// AVX-512 F is present.
#[inline]
#[target_feature(enable = "avx2,avx512f")]
unsafe fn transpose_16x8(u: &[__m256i; 16]) -> [__m512i; 8] {
    // z[n]: row n in the low half, row n + 8 in the high half.
    let mut z = [_mm512_setzero_si512(); 8];
    for (n, z) in z.iter_mut().enumerate() {
        *z = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(u[n]), u[n + 8]);
    }
    let t = [
        _mm512_unpacklo_epi32(z[0], z[1]),
        _mm512_unpackhi_epi32(z[0], z[1]),
        _mm512_unpacklo_epi32(z[2], z[3]),
        _mm512_unpackhi_epi32(z[2], z[3]),
        _mm512_unpacklo_epi32(z[4], z[5]),
        _mm512_unpackhi_epi32(z[4], z[5]),
        _mm512_unpacklo_epi32(z[6], z[7]),
        _mm512_unpackhi_epi32(z[6], z[7]),
    ];
    // s[j] (j < 4): group j of rows 0–3 (group j + 4 in the odd
    // quarters), rows 8–11 in the upper half; s[j + 4]: rows 4–7, 12–15.
    let s = [
        _mm512_unpacklo_epi64(t[0], t[2]),
        _mm512_unpackhi_epi64(t[0], t[2]),
        _mm512_unpacklo_epi64(t[1], t[3]),
        _mm512_unpackhi_epi64(t[1], t[3]),
        _mm512_unpacklo_epi64(t[4], t[6]),
        _mm512_unpackhi_epi64(t[4], t[6]),
        _mm512_unpacklo_epi64(t[5], t[7]),
        _mm512_unpackhi_epi64(t[5], t[7]),
    ];
    let even = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    let odd = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    let mut out = [_mm512_setzero_si512(); 8];
    for j in 0..4 {
        out[j] = _mm512_permutex2var_epi64(s[j], even, s[j + 4]);
        out[j + 4] = _mm512_permutex2var_epi64(s[j], odd, s[j + 4]);
    }
    out
}

#[cfg(target_arch = "x86_64")]
/// [`transpose_16x8`] of `u`, stored as the lane-wise groups `first..first
/// + 8` of `codes` (64 bytes each).
///
/// # Safety
/// AVX-512 F is present; `codes` holds groups `first..first + 8`.
#[inline]
#[target_feature(enable = "avx2,avx512f")]
pub unsafe fn store_transposed(codes: *mut u8, first: usize, u: &[__m256i; 16]) {
    // SAFETY: the caller's contract.
    unsafe {
        for (j, g) in transpose_16x8(u).iter().enumerate() {
            _mm512_storeu_si512(codes.add((first + j) * 64).cast(), *g);
        }
    }
}

/// Sixteen f32s as two registers of eight f64s (lanes 0..8, 8..16).
///
/// # Safety
/// AVX-512 F is enabled by the caller.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn widen_ps(v: __m512) -> [__m512d; 2] {
    // SAFETY: register operations only (the caller's features).
    unsafe {
        [
            _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            ))),
        ]
    }
}

/// Block `b`'s 16 weight scales (f16 bits, row `n` at `bits[n]`) into a
/// GEMM scratch of f64s, 16 a block.
///
/// # Safety
/// AVX-512 F and F16C are enabled by the caller; block `b`'s 16
/// scales are inside the scratch at `dw_p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn store_scales(dw_p: *mut f64, b: usize, bits: &[u16; ROWS]) {
    // SAFETY: the caller's contract.
    unsafe {
        let dw = widen_ps(_mm512_cvtph_ps(_mm256_loadu_si256(bits.as_ptr().cast())));
        _mm512_storeu_pd(dw_p.add(b * ROWS), dw[0]);
        _mm512_storeu_pd(dw_p.add(b * ROWS + 8), dw[1]);
    }
}

/// [`store_scales`] into a GEMM scratch of f32s (the Q8-family GEMMs').
///
/// # Safety
/// As [`store_scales`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn store_scales_ps(dw_p: *mut f32, b: usize, bits: &[u16; ROWS]) {
    // SAFETY: the caller's contract.
    unsafe {
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(bits.as_ptr().cast()));
        _mm512_storeu_ps(dw_p.add(b * ROWS), dw);
    }
}

/// [`store_scales_ps`] on AVX2: block `at`'s 8 weight scales (f16 bits,
/// row `n` at `bits[n]`) into a GEMM scratch of f32s, 8 a block.
///
/// # Safety
/// AVX2 and F16C are enabled by the caller; block `at`'s 8 scales are
/// inside the scratch at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn store_scales8(p: *mut f32, at: usize, bits: &[u16; 8]) {
    // SAFETY: the caller's contract.
    unsafe {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(bits.as_ptr().cast()));
        _mm256_storeu_ps(p.add(at * 8), v);
    }
}

#[cfg(target_arch = "x86_64")]
/// Eight rows of eight 32-bit groups to eight registers: group `j` of
/// row `n` to lane `n` of register `j`.
#[inline(always)]
pub fn transpose_8x8(r: &[__m256i; 8]) -> [__m256i; 8] {
    // SAFETY: register-only; inlined into functions that enable AVX2.
    unsafe {
        let t = [
            _mm256_unpacklo_epi32(r[0], r[1]),
            _mm256_unpackhi_epi32(r[0], r[1]),
            _mm256_unpacklo_epi32(r[2], r[3]),
            _mm256_unpackhi_epi32(r[2], r[3]),
            _mm256_unpacklo_epi32(r[4], r[5]),
            _mm256_unpackhi_epi32(r[4], r[5]),
            _mm256_unpacklo_epi32(r[6], r[7]),
            _mm256_unpackhi_epi32(r[6], r[7]),
        ];
        // s[j] (j < 4): group j of rows 0–3 (group j + 4 in the high
        // lane); s[j + 4]: rows 4–7.
        let s = [
            _mm256_unpacklo_epi64(t[0], t[2]),
            _mm256_unpackhi_epi64(t[0], t[2]),
            _mm256_unpacklo_epi64(t[1], t[3]),
            _mm256_unpackhi_epi64(t[1], t[3]),
            _mm256_unpacklo_epi64(t[4], t[6]),
            _mm256_unpackhi_epi64(t[4], t[6]),
            _mm256_unpacklo_epi64(t[5], t[7]),
            _mm256_unpackhi_epi64(t[5], t[7]),
        ];
        [
            _mm256_permute2x128_si256(s[0], s[4], 0x20),
            _mm256_permute2x128_si256(s[1], s[5], 0x20),
            _mm256_permute2x128_si256(s[2], s[6], 0x20),
            _mm256_permute2x128_si256(s[3], s[7], 0x20),
            _mm256_permute2x128_si256(s[0], s[4], 0x31),
            _mm256_permute2x128_si256(s[1], s[5], 0x31),
            _mm256_permute2x128_si256(s[2], s[6], 0x31),
            _mm256_permute2x128_si256(s[3], s[7], 0x31),
        ]
    }
}

#[cfg(target_arch = "x86_64")]
/// The AVX2 GEMMs' [`emit`]: each activation row's 8 results (two
/// registers of four f64s) to lanes `n0..n0 + 8` of its row of `out`.
#[inline(always)]
pub fn emit8(acc: &[[__m256d; 2]], n0: usize, m0: usize, out: &mut Tile) {
    for (r, acc) in acc.iter().enumerate() {
        let to = out.row(m0 + r)[n0..n0 + 8].as_mut_ptr();
        // SAFETY: `to` holds 8 f32s; inlined into functions that enable
        // AVX.
        unsafe {
            _mm_storeu_ps(to, _mm256_cvtpd_ps(acc[0]));
            _mm_storeu_ps(to.add(4), _mm256_cvtpd_ps(acc[1]));
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// [`emit8`] for results summed in f32: each activation row's 8 results
/// (one register) to lanes `n0..n0 + 8` of its row of `out`.
#[inline(always)]
pub fn emit8_ps(acc: &[__m256], n0: usize, m0: usize, out: &mut Tile) {
    for (r, acc) in acc.iter().enumerate() {
        let to = out.row(m0 + r)[n0..n0 + 8].as_mut_ptr();
        // SAFETY: `to` holds 8 f32s; inlined into functions that enable
        // AVX.
        unsafe { _mm256_storeu_ps(to, *acc) };
    }
}
