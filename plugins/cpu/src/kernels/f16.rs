//! Dot products of F16 weight rows with activations rounded to f16 (the
//! reference's `round_activations` for F16 weights), and of BF16 rows with
//! bf16-rounded activations: portable (F16), AVX2 and AVX-512 (both). An
//! f16 × f16 or bf16 × bf16 product is exact in f32; products are summed
//! in f64, so a row's result is the reference's, rounded the same way.

use super::Isa;
use half::f16;

/// Activations as the dot product sees them: each value rounded to f16
/// (to nearest, ties to even; F16C's conversion rounds the same way).
pub fn round_row(isa: Isa, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: AVX2 paths imply F16C (`Isa::detect`); lengths checked.
        return unsafe { x86::round_row_f16c(x, out) };
    }
    let _ = isa;
    for (o, v) in out.iter_mut().zip(x) {
        *o = f16::from_f32(*v).to_f32();
    }
}

/// `out[r] = w · xs[r]` for up to four activation rows (the weight row is
/// converted once for all on AVX2 and AVX-512). `bf16`: the weights are
/// BF16 and the activations rounded to bf16 (AVX2 and AVX-512 only; a
/// BF16 × BF16 product is exact in f32 too).
pub fn dot_rows(isa: Isa, bf16: bool, w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
    assert!(xs.iter().all(|x| w.len() == 2 * x.len()));
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! rows {
            ($kernel:ident) => {
                // SAFETY: `Isa` only names paths the CPU has; lengths
                // checked above.
                unsafe {
                    match (xs.len(), bf16) {
                        (1, false) => x86::$kernel::<1, false>(w, xs, out),
                        (2, false) => x86::$kernel::<2, false>(w, xs, out),
                        (3, false) => x86::$kernel::<3, false>(w, xs, out),
                        (_, false) => x86::$kernel::<4, false>(w, xs, out),
                        (1, true) => x86::$kernel::<1, true>(w, xs, out),
                        (2, true) => x86::$kernel::<2, true>(w, xs, out),
                        (3, true) => x86::$kernel::<3, true>(w, xs, out),
                        (_, true) => x86::$kernel::<4, true>(w, xs, out),
                    }
                }
            };
        }
        match isa {
            Isa::Avx512 => return rows!(dot_rows_avx512),
            Isa::Avx2 | Isa::AvxVnni => return rows!(dot_rows_avx2),
            Isa::Scalar | Isa::Reference => {}
        }
    }
    assert!(!bf16, "BF16 rows have kernels on AVX2 and AVX-512 only");
    for (x, o) in xs.iter().zip(out) {
        *o = dot_scalar(false, w, x, 0, 0.0);
    }
}

/// Weight rows per [`gemm16`] call.
pub const GEMM_ROWS: usize = 16;

/// `out(n, m) = w[n] · xs[m]` for up to 16 F16 (or, `bf16`, BF16) weight
/// rows and any number of activation rows, in tiles of 4 weight rows × 4
/// activation rows on AVX-512 (16 accumulators of eight f64 lanes) and 4
/// × 2 on AVX2 (8 of four lanes, what 16 registers hold beside the
/// converted values): each weight and activation vector converted once
/// per tile step and used for the whole tile (products exact, as in
/// [`dot_rows`]; each FMA rounds once, as the reference's addition does).
/// Partial tiles repeat their last row and drop its results.
///
/// Returns `false` (and does nothing) where [`has_gemm`] says no.
pub fn gemm16(
    isa: Isa,
    bf16: bool,
    ws: &[&[u8]],
    xs: &[&[f32]],
    mut out: impl FnMut(usize, usize, &[f32]),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    return gemm16_x86(isa, bf16, ws, xs, &mut out);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, bf16, ws, xs, &mut out);
        false
    }
}

/// Whether [`gemm16`] runs on `isa` (F16 and BF16 alike).
pub fn has_gemm(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && isa >= Isa::Avx2
}

/// [`gemm16`] on x86-64.
#[cfg(target_arch = "x86_64")]
fn gemm16_x86(
    isa: Isa,
    bf16: bool,
    ws: &[&[u8]],
    xs: &[&[f32]],
    out: &mut impl FnMut(usize, usize, &[f32]),
) -> bool {
    assert!(!ws.is_empty() && ws.len() <= GEMM_ROWS && !xs.is_empty());
    let k = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == k) && ws.iter().all(|w| w.len() == 2 * k));
    // Each tile's SAFETY: the CPU has the path (`Isa`); every row is as
    // long as the first (asserted above).
    match (isa, bf16) {
        (Isa::Avx512, false) => tiled(ws, xs, out, |w, x: &[_; 4]| {
            // SAFETY: as above.
            unsafe { x86::tile_avx512::<false>(w, x) }
        }),
        (Isa::Avx512, true) => tiled(ws, xs, out, |w, x: &[_; 4]| {
            // SAFETY: as above.
            unsafe { x86::tile_avx512::<true>(w, x) }
        }),
        (Isa::Avx2 | Isa::AvxVnni, false) => tiled(ws, xs, out, |w, x: &[_; 2]| {
            // SAFETY: as above.
            unsafe { x86::tile_avx2::<false>(w, x) }
        }),
        (Isa::Avx2 | Isa::AvxVnni, true) => tiled(ws, xs, out, |w, x: &[_; 2]| {
            // SAFETY: as above.
            unsafe { x86::tile_avx2::<true>(w, x) }
        }),
        (Isa::Scalar | Isa::Reference, _) => return false,
    }
    true
}

/// [`gemm16`]'s walk over tiles of 4 weight rows × `M` activation rows.
#[cfg(target_arch = "x86_64")]
fn tiled<const M: usize>(
    ws: &[&[u8]],
    xs: &[&[f32]],
    out: &mut impl FnMut(usize, usize, &[f32]),
    tile: impl Fn(&[&[u8]; 4], &[&[f32]; M]) -> [[f32; M]; 4],
) {
    for m0 in (0..xs.len()).step_by(M) {
        let x: [&[f32]; M] = std::array::from_fn(|i| xs[(m0 + i).min(xs.len() - 1)]);
        for n0 in (0..ws.len()).step_by(4) {
            let w: [&[u8]; 4] = std::array::from_fn(|i| ws[(n0 + i).min(ws.len() - 1)]);
            let tile = tile(&w, &x);
            let rows = (ws.len() - n0).min(4);
            let columns: [[f32; 4]; M] = std::array::from_fn(|m| tile.map(|row| row[m]));
            for (m, column) in columns.iter().enumerate().take(xs.len() - m0) {
                out(n0, m0 + m, &column[..rows]);
            }
        }
    }
}

/// Rows at most this long take [`gemm16_lanes`] (attention's rows: the
/// head size, or the positions so far); longer ones [`gemm16`]'s tiles.
pub const LANES_MAX_K: usize = 512;

/// `out(n, m) = w[n] · xs[m]` for up to 16 F16 weight rows of at most
/// [`LANES_MAX_K`] values, lane-wise: the rows are widened once per call
/// into `scratch` so that lane `n` of a register holds row `n`'s value at
/// each position, and one FMA with a broadcast activation (`xs`, the
/// f16-rounded activations widened to f64) advances 8 dot products, with
/// no horizontal sums. Each dot product adds its exact products in the
/// reference's order, so the results are its bits.
///
/// Returns `false` (and does nothing) without AVX-512.
pub fn gemm16_lanes(
    isa: Isa,
    ws: &[&[u8]],
    xs: &[&[f64]],
    scratch: &mut Vec<f64>,
    mut out: impl FnMut(usize, usize, &[f32]),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        assert!(!ws.is_empty() && ws.len() <= GEMM_ROWS && !xs.is_empty());
        let k = xs[0].len();
        assert!(k <= LANES_MAX_K);
        assert!(xs.iter().all(|x| x.len() == k) && ws.iter().all(|w| w.len() == 2 * k));
        scratch.clear();
        scratch.resize(k * GEMM_ROWS, 0.0);
        // SAFETY: the CPU has AVX-512 (`Isa`); the scratch holds k × 16.
        unsafe { x86::widen_lanes(ws, scratch) };
        let rows = ws.len();
        // SAFETY: the CPU has AVX-512 (`Isa`); the scratch holds k × 16
        // values and every row of `xs` k.
        unsafe {
            in_groups_of_four!(xs.len(), m0 => lanes_rows(scratch, &xs[m0..], rows, m0, &mut out))
        };
        return true;
    }
    let _ = (isa, ws, xs, scratch, &mut out);
    false
}

/// `R` activation rows of [`gemm16_lanes`].
///
/// # Safety
/// AVX-512 F is present; `scratch` holds `16 · k` values, `xs` at least
/// `R` rows of `k`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn lanes_rows<const R: usize>(
    scratch: &[f64],
    xs: &[&[f64]],
    rows: usize,
    m0: usize,
    out: &mut dyn FnMut(usize, usize, &[f32]),
) {
    use core::arch::x86_64::*;
    let xs: &[&[f64]; R] = xs[..R].try_into().expect("R rows");
    let k = xs[0].len();
    assert!(scratch.len() >= k * GEMM_ROWS);
    // The rows as plain pointers (lengths asserted): no bounds check per value.
    let mut xp = [std::ptr::null::<f64>(); R];
    for (p, x) in xp.iter_mut().zip(xs) {
        assert_eq!(x.len(), k);
        *p = x.as_ptr();
    }
    let mut acc = [[_mm512_setzero_pd(); 2]; R];
    let w = scratch.as_ptr();
    for i in 0..k {
        // SAFETY: position i's 16 values are inside the scratch.
        let (lo, hi) = unsafe {
            (
                _mm512_loadu_pd(w.add(i * GEMM_ROWS)),
                _mm512_loadu_pd(w.add(i * GEMM_ROWS + 8)),
            )
        };
        for (acc, x) in acc.iter_mut().zip(&xp) {
            // SAFETY: i < k, each row's length.
            let xv = _mm512_set1_pd(unsafe { *x.add(i) });
            acc[0] = _mm512_fmadd_pd(lo, xv, acc[0]);
            acc[1] = _mm512_fmadd_pd(hi, xv, acc[1]);
        }
    }
    // SAFETY: AVX-512 F is enabled here.
    unsafe { crate::kernels::lanes::emit(&acc, rows, m0, out) };
}

/// Sums `w[from..] · x[from..]` onto `acc`; `bf16`: the weights are BF16.
fn dot_scalar(bf16: bool, w: &[u8], x: &[f32], from: usize, mut acc: f64) -> f32 {
    for (c, v) in w[2 * from..].chunks_exact(2).zip(&x[from..]) {
        acc += widen(bf16, [c[0], c[1]]) as f64 * *v as f64;
    }
    acc as f32
}

/// One little-endian f16 (or, `bf16`, bf16) value as f32.
fn widen(bf16: bool, b: [u8; 2]) -> f32 {
    if bf16 {
        half::bf16::from_le_bytes(b).to_f32()
    } else {
        f16::from_le_bytes(b).to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    /// # Safety
    /// AVX2 and F16C are present; `x.len() == out.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn round_row_f16c(x: &[f32], out: &mut [f32]) {
        let full = x.len() / 8 * 8;
        for i in (0..full).step_by(8) {
            // SAFETY: elements i..i+8 are inside both.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for i in full..x.len() {
            out[i] = half::f16::from_f32(x[i]).to_f32();
        }
    }

    /// The four lanes' sum.
    #[inline(always)]
    unsafe fn hsum(v: __m256d) -> f64 {
        // SAFETY: register operations only (the caller's AVX).
        unsafe {
            let s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
            _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
        }
    }

    /// [`super::dot_rows`] on AVX2: each step's eight weights converted
    /// once for the `R` rows.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are present; `w.len() == 2 * x.len()` for each
    /// of the first `R` rows of `xs`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx2<const R: usize, const BF: bool>(
        w: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let xs: &[&[f32]; R] = xs[..R].try_into().expect("R rows");
        let full = xs[0].len() / 8 * 8;
        assert!(w.len() >= 2 * full && xs.iter().all(|x| x.len() >= full));
        let mut acc = [[_mm256_setzero_pd(); 2]; R];
        for i in (0..full).step_by(8) {
            crate::kernels::prefetch(w.as_ptr().wrapping_add(2 * i), 16);
            // SAFETY: elements i..i+8 are inside every row (asserted).
            let wv = unsafe { widen8::<BF>(_mm_loadu_si128(w.as_ptr().add(2 * i).cast())) };
            for (x, acc) in xs.iter().zip(&mut acc) {
                // SAFETY: as above.
                let p = _mm256_mul_ps(wv, unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) });
                acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
                acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(p)));
            }
        }
        for ((o, acc), x) in out.iter_mut().zip(&acc).zip(xs) {
            // SAFETY: AVX is enabled here.
            let s = unsafe { hsum(_mm256_add_pd(acc[0], acc[1])) };
            *o = super::dot_scalar(BF, w, x, full, s);
        }
    }

    /// A 4 × 2 tile of [`super::gemm16`] on AVX2: `out[n][m] = w[n] ·
    /// x[m]`, eight values a step (the activations' two halves widened once
    /// for the four weight rows, each weight row's for the two activations).
    ///
    /// # Safety
    /// AVX2, FMA and F16C are present; every `w` row holds `2 *
    /// x[0].len()` bytes and every `x` row as many values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2<const BF: bool>(w: &[&[u8]; 4], x: &[&[f32]; 2]) -> [[f32; 2]; 4] {
        let len = x[0].len();
        let full = len / 8 * 8;
        assert!(x.iter().all(|x| x.len() == len) && w.iter().all(|w| w.len() == 2 * len));
        let mut acc = [[_mm256_setzero_pd(); 2]; 4];
        for i in (0..full).step_by(8) {
            // SAFETY: elements i..i+8 are inside every row (asserted).
            unsafe {
                let mut xv = [[_mm256_setzero_pd(); 2]; 2];
                for (xv, row) in xv.iter_mut().zip(x) {
                    let v = _mm256_loadu_ps(row.as_ptr().add(i));
                    xv[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
                    xv[1] = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
                }
                for (row, acc) in w.iter().zip(&mut acc) {
                    let wv = widen8::<BF>(_mm_loadu_si128(row.as_ptr().add(2 * i).cast()));
                    let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(wv));
                    let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(wv));
                    for (acc, xv) in acc.iter_mut().zip(&xv) {
                        *acc = _mm256_fmadd_pd(hi, xv[1], _mm256_fmadd_pd(lo, xv[0], *acc));
                    }
                }
            }
        }
        let mut out = [[0.0; 2]; 4];
        for ((out, acc), row) in out.iter_mut().zip(&acc).zip(w) {
            for ((o, acc), x) in out.iter_mut().zip(acc).zip(x) {
                // SAFETY: AVX is enabled here.
                *o = super::dot_scalar(BF, row, x, full, unsafe { hsum(*acc) });
            }
        }
        out
    }

    /// # Safety
    /// AVX-512 F/BW/VL, AVX2, FMA and F16C are present; `w.len() == 2 *
    /// x.len()` for each of the first `R` rows of `xs`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot_rows_avx512<const R: usize, const BF: bool>(
        w: &[u8],
        xs: &[&[f32]],
        out: &mut [f32],
    ) {
        let xs: &[&[f32]; R] = xs[..R].try_into().expect("R rows");
        let len = xs[0].len();
        let mut acc = [[_mm512_setzero_pd(); 2]; R];
        let mut i = 0;
        while i < len {
            crate::kernels::prefetch(w.as_ptr().wrapping_add(2 * i), 32);
            let mask = if len - i >= 16 {
                u16::MAX
            } else {
                ((1u32 << (len - i)) - 1) as u16
            };
            // Whole steps load plainly (masked loads are much slower on
            // some CPUs); only the tail is masked.
            let whole = mask == u16::MAX;
            // SAFETY: the loads touch only elements i..len.
            let wv = unsafe {
                widen16::<BF>(if whole {
                    _mm256_loadu_si256(w.as_ptr().add(2 * i).cast())
                } else {
                    _mm256_maskz_loadu_epi16(mask, w.as_ptr().add(2 * i).cast())
                })
            };
            for (x, acc) in xs.iter().zip(&mut acc) {
                // SAFETY: as above.
                let xv = unsafe {
                    if whole {
                        _mm512_loadu_ps(x.as_ptr().add(i))
                    } else {
                        _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i))
                    }
                };
                let p = _mm512_castps_pd(_mm512_mul_ps(wv, xv));
                let lo = _mm256_castpd_ps(_mm512_castpd512_pd256(p));
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(p, 1));
                acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(lo));
                acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(hi));
            }
            i += 16;
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            *o = _mm512_reduce_add_pd(_mm512_add_pd(acc[0], acc[1])) as f32;
        }
    }

    /// Row `n`'s value at position `i` to `scratch[16 i + n]`, as f64
    /// (F16C's conversion, 16 values at a time).
    ///
    /// # Safety
    /// AVX-512 F/BW and F16C are present; `scratch` holds 16 values for
    /// each position of the rows (all of one length).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn widen_lanes(ws: &[&[u8]], scratch: &mut [f64]) {
        let k = ws[0].len() / 2;
        let mut v = [0f32; 16];
        for (n, w) in ws.iter().enumerate() {
            for i in (0..k).step_by(16) {
                let left = (k - i).min(16);
                // SAFETY: the masked load touches values i..i+left of the
                // row; `v` holds 16 f32s.
                unsafe {
                    let h = _mm256_maskz_loadu_epi16(
                        ((1u32 << left) - 1) as u16,
                        w.as_ptr().add(2 * i).cast(),
                    );
                    _mm512_storeu_ps(v.as_mut_ptr(), _mm512_cvtph_ps(h));
                }
                for (j, &x) in v.iter().enumerate().take(left) {
                    scratch[(i + j) * super::GEMM_ROWS + n] = x as f64;
                }
            }
        }
    }

    /// Sixteen f16 (or, `BF`, bf16) values to f32 (exact either way).
    ///
    /// # Safety
    /// AVX-512 F and F16C are enabled by the caller.
    #[inline(always)]
    unsafe fn widen16<const BF: bool>(h: __m256i) -> __m512 {
        // SAFETY: register operations only (the caller's features).
        unsafe {
            if BF {
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            } else {
                _mm512_cvtph_ps(h)
            }
        }
    }

    /// Eight f16 (or bf16) values to f32.
    ///
    /// # Safety
    /// AVX2 and F16C are enabled by the caller.
    #[inline(always)]
    unsafe fn widen8<const BF: bool>(h: __m128i) -> __m256 {
        // SAFETY: register operations only (the caller's features).
        unsafe {
            if BF {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                _mm256_cvtph_ps(h)
            }
        }
    }

    /// A 4 × 4 tile of [`super::gemm16`]: `out[n][m] = w[n] · x[m]`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, AVX2, FMA and F16C are present; every `w` row
    /// holds `2 * x[0].len()` bytes and every `x` row as many values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn tile_avx512<const BF: bool>(w: &[&[u8]; 4], x: &[&[f32]; 4]) -> [[f32; 4]; 4] {
        let len = x[0].len();
        let mut acc = [[_mm512_setzero_pd(); 4]; 4];
        let mut i = 0;
        while i < len {
            let left = len - i;
            // Whole steps load plainly; only the tail is masked.
            let mask = if left >= 8 { 0xff } else { (1u8 << left) - 1 };
            // SAFETY: the loads touch only elements i..len of each row.
            unsafe {
                // A loop, not `from_fn`: a closure would be compiled
                // without this function's target features, and not inlined.
                let mut xv = [_mm512_setzero_pd(); 4];
                for (xv, row) in xv.iter_mut().zip(x) {
                    let p = row.as_ptr().add(i);
                    *xv = _mm512_cvtps_pd(if left >= 8 {
                        _mm256_loadu_ps(p)
                    } else {
                        _mm256_maskz_loadu_ps(mask, p)
                    });
                }
                for (row, acc) in w.iter().zip(&mut acc) {
                    let p = row.as_ptr().add(2 * i);
                    let wv = _mm512_cvtps_pd(widen8::<BF>(if left >= 8 {
                        _mm_loadu_si128(p.cast())
                    } else {
                        _mm_maskz_loadu_epi16(mask, p.cast())
                    }));
                    for (acc, xv) in acc.iter_mut().zip(&xv) {
                        *acc = _mm512_fmadd_pd(wv, *xv, *acc);
                    }
                }
            }
            i += 8;
        }
        let mut out = [[0.0; 4]; 4];
        for (out, acc) in out.iter_mut().zip(&acc) {
            // SAFETY: AVX-512 F is enabled here.
            *out = unsafe { reduce4(acc) };
        }
        out
    }

    /// The four sums of eight lanes each, in one tree (11 operations
    /// instead of four reductions' 24).
    ///
    /// # Safety
    /// AVX-512 F is present.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce4(a: &[__m512d; 4]) -> [f32; 4] {
        // Neighbouring lanes: [a0 a1 a0 a1 …] and [a2 a3 a2 a3 …].
        let s01 = _mm512_add_pd(
            _mm512_unpacklo_pd(a[0], a[1]),
            _mm512_unpackhi_pd(a[0], a[1]),
        );
        let s23 = _mm512_add_pd(
            _mm512_unpacklo_pd(a[2], a[3]),
            _mm512_unpackhi_pd(a[2], a[3]),
        );
        // 128-bit quarters 0+2 and 1+3: [s01 s01 s23 s23] as pairs.
        let w = _mm512_add_pd(
            _mm512_shuffle_f64x2::<0b01_00_01_00>(s01, s23),
            _mm512_shuffle_f64x2::<0b11_10_11_10>(s01, s23),
        );
        // Quarters 0+1 and 2+3.
        let y = _mm512_add_pd(w, _mm512_shuffle_f64x2::<0b10_11_00_01>(w, w));
        let mut v = [0f64; 8];
        // SAFETY: `v` holds 8 f64s.
        unsafe { _mm512_storeu_pd(v.as_mut_ptr(), y) };
        [v[0] as f32, v[1] as f32, v[4] as f32, v[5] as f32]
    }
}
