//! What the lane-wise kernels share: 16 weight rows (or, in decode, 16
//! blocks of one row), one per lane of a 512-bit register, each activation
//! row's results in two registers of eight f64s.

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
/// Hands each row's 16 results (the first `rows` of them) to `out` as
/// `(first weight row, activation row m0 + r, values)`.
///
/// # Safety
/// AVX-512 F is present.
#[target_feature(enable = "avx512f")]
pub unsafe fn emit(
    acc: &[[__m512d; 2]],
    rows: usize,
    m0: usize,
    out: &mut dyn FnMut(usize, usize, &[f32]),
) {
    for (r, acc) in acc.iter().enumerate() {
        let mut v = [0f32; ROWS];
        // SAFETY: `v` holds 16 f32s.
        unsafe {
            _mm256_storeu_ps(v.as_mut_ptr(), _mm512_cvtpd_ps(acc[0]));
            _mm256_storeu_ps(v.as_mut_ptr().add(8), _mm512_cvtpd_ps(acc[1]));
        }
        out(0, m0 + r, &v[..rows]);
    }
}
