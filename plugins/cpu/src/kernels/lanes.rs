//! What the lane-wise GEMMs share: 16 weight rows, one per lane of a
//! 512-bit register, each activation row's results in two registers of
//! eight f64s.

use core::arch::x86_64::*;

/// Weight rows per lane-wise group.
pub const ROWS: usize = 16;

/// Hands each row's 16 results (the first `rows` of them) to `out` as
/// `(weight row, activation row m0 + r, value)`.
///
/// # Safety
/// AVX-512 F is present.
#[target_feature(enable = "avx512f")]
pub unsafe fn emit(
    acc: &[[__m512d; 2]],
    rows: usize,
    m0: usize,
    out: &mut dyn FnMut(usize, usize, f32),
) {
    for (r, acc) in acc.iter().enumerate() {
        let mut v = [0f64; ROWS];
        // SAFETY: `v` holds 16 f64s.
        unsafe {
            _mm512_storeu_pd(v.as_mut_ptr(), acc[0]);
            _mm512_storeu_pd(v.as_mut_ptr().add(8), acc[1]);
        }
        for (n, &value) in v.iter().enumerate().take(rows) {
            out(n, m0 + r, value as f32);
        }
    }
}
