//! Dot products of float weight rows: F16 with activations rounded to
//! f16 (the reference's `round_activations` for F16 weights), BF16 with
//! bf16-rounded activations, F32 with the activations as they are;
//! portable, NEON (`neon::float_tile`), AVX2 and AVX-512 (the AVX2 row
//! kernel; prompts against the group's weights widened once into a
//! panel whose 512-bit registers hold two weight rows' lanes). Every
//! path sums in `kiln_blocks::fused_dot`'s order (eight f32 lanes, fused
//! multiply-adds, one reduction tree), so every path gives the
//! reference's bits.

use super::{GEMM_GROUP, Isa};
use half::f16;
use kiln_plugin_api::DType;

/// The weight types these kernels take. The kernels are generic over
/// one of the `u8` codes below (a const generic cannot be an enum).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Float {
    F16,
    Bf16,
    F32,
}

/// [`Float::F16`]'s code in the kernels' const generic.
pub const F16: u8 = 0;
/// [`Float::Bf16`]'s code.
pub const BF16: u8 = 1;
/// [`Float::F32`]'s code.
pub const F32: u8 = 2;

impl Float {
    /// The kernels' type for weights of `dtype`, if they take it.
    pub fn of(dtype: DType) -> Option<Float> {
        match dtype {
            DType::F16 => Some(Float::F16),
            DType::BF16 => Some(Float::Bf16),
            DType::F32 => Some(Float::F32),
            _ => None,
        }
    }

    /// Bytes per weight.
    pub const fn bytes(self) -> usize {
        match self {
            Float::F32 => 4,
            Float::F16 | Float::Bf16 => 2,
        }
    }

    /// Bytes per weight of the type coded `T`.
    const fn bytes_of(t: u8) -> usize {
        if t == F32 { 4 } else { 2 }
    }

    /// Activations as the dot product sees them: rounded to f16 or bf16
    /// for those weights, as they are for F32 ones.
    pub fn round_row(self, isa: Isa, x: &[f32], out: &mut [f32]) {
        match self {
            Float::F16 => round_row(isa, x, out),
            Float::Bf16 => {
                for (o, x) in out.iter_mut().zip(x) {
                    *o = half::bf16::from_f32(*x).to_f32();
                }
            }
            Float::F32 => out.copy_from_slice(x),
        }
    }
}

/// `$f!(T)` with `T` the const generic code of the [`Float`] `$float`.
macro_rules! by_float {
    ($float:expr, $t:ident => $call:expr) => {
        match $float {
            Float::F16 => {
                const $t: u8 = F16;
                $call
            }
            Float::Bf16 => {
                const $t: u8 = BF16;
                $call
            }
            Float::F32 => {
                const $t: u8 = F32;
                $call
            }
        }
    };
}

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
/// converted once for all on AVX2 and AVX-512, which share the kernel),
/// the activations rounded for `float` ([`Float::round_row`]).
pub fn dot_rows(isa: Isa, float: Float, w: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    assert!(!xs.is_empty() && xs.len() <= 4 && out.len() == xs.len());
    assert!(xs.iter().all(|x| w.len() == float.bytes() * x.len()));
    macro_rules! rows {
        ($r:literal) => {{
            let x: &[&[f32]; $r] = xs[..$r].try_into().expect("rows");
            match small_tile::<1, $r>(isa, float, &[w], x) {
                Some(o) => out.copy_from_slice(&o[0]),
                None => {
                    for (x, o) in x.iter().zip(out) {
                        *o = portable(float, w, x);
                    }
                }
            }
        }};
    }
    match xs.len() {
        1 => rows!(1),
        2 => rows!(2),
        3 => rows!(3),
        _ => rows!(4),
    }
}

/// Weight rows per [`dot_weight_rows`] call.
pub const DECODE_ROWS: usize = 4;

/// `out[n] = ws[n] · x` for up to [`DECODE_ROWS`] weight rows and one
/// activation row: decode. Each sum is a chain of dependent FMAs (eight
/// lanes, in [`kiln_blocks::fused_dot`]'s order), so one row at a time
/// waits on the FMA's latency; four rows keep four chains in flight.
pub fn dot_weight_rows(isa: Isa, float: Float, ws: &[&[u8]], x: &[f32], out: &mut [f32]) {
    assert!(!ws.is_empty() && ws.len() <= DECODE_ROWS && out.len() == ws.len());
    // Short groups repeat their last row and drop its results.
    let w: [&[u8]; DECODE_ROWS] = std::array::from_fn(|i| ws[i.min(ws.len() - 1)]);
    match small_tile::<DECODE_ROWS, 1>(isa, float, &w, &[x]) {
        Some(o) => {
            for (out, o) in out.iter_mut().zip(o) {
                *out = o[0];
            }
        }
        None => {
            for (w, o) in ws.iter().zip(out) {
                *o = portable(float, w, x);
            }
        }
    }
}

/// `out[n][m] = w[n] · x[m]` on this CPU's vector path for few rows
/// (AVX2's tile, which AVX-512 CPUs run too, or NEON's); `None` where
/// there is none. Panics unless every row has `x[0].len()` values.
fn small_tile<const N: usize, const M: usize>(
    isa: Isa,
    float: Float,
    w: &[&[u8]; N],
    x: &[&[f32]; M],
) -> Option<[[f32; M]; N]> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `Isa` only names paths the CPU has (AVX2 ones imply FMA
        // and F16C); the tile checks the rows' lengths.
        return Some(by_float!(float, T => unsafe { x86::tile_avx2::<T, N, M>(w, x) }));
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        return Some(by_float!(float, T => super::neon::float_tile::<T, N, M>(w, x)));
    }
    let _ = (isa, float, w, x);
    None
}

/// `w · x` on the portable path: [`kiln_blocks::fused_dot`] itself
/// ([`kiln_blocks::float_dot`], its sums without a library call per
/// product, for F16 and BF16).
fn portable(float: Float, w: &[u8], x: &[f32]) -> f32 {
    assert_eq!(w.len(), float.bytes() * x.len());
    match float {
        Float::F32 => kiln_blocks::fused_dot(
            w.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            x,
        ),
        Float::F16 | Float::Bf16 => {
            kiln_blocks::float_dot(w.chunks_exact(2).map(|c| widen(float, [c[0], c[1]])), x)
        }
    }
}

/// `out.row(m)[n] = w[n] · xs[m]` for up to 16 float weight
/// rows and any number of activation rows. On x86 the group's weights
/// are widened once into a panel of f32 runs: AVX-512 takes tiles of 8
/// weight rows × 6 activation rows (`x86::gemm16_avx512`, two rows'
/// lanes a register), AVX2 tiles of 2 × 6 a chunk of the rows' length at
/// a time (`x86::gemm16_avx2`); NEON converts in its 2 × 4 tiles. Each
/// sum in [`kiln_blocks::fused_dot`]'s order. Partial tiles repeat their
/// last row and drop its results.
///
/// Returns `false` (and does nothing) where [`has_gemm`] says no.
pub fn gemm16(
    isa: Isa,
    float: Float,
    ws: &[&[u8]],
    xs: &[&[f32]],
    scratch: &mut GemmScratch,
    out: &mut crate::kernels::Tile,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    return gemm16_x86(isa, float, ws, xs, scratch, out);
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        assert!(!ws.is_empty() && ws.len() <= GEMM_GROUP && !xs.is_empty());
        // 2 × 4 tiles: 16 accumulators of two registers' lanes, beside
        // the activations' eight and the weights' two, in 32 registers.
        by_float!(float, T => tiled(ws, xs, out, super::neon::float_tile::<T, 2, 4>));
        return true;
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, float, ws, xs, scratch, out);
        false
    }
}

/// Scratch for [`gemm16`], reused across calls on one thread: the x86
/// paths' weights widened to f32 in runs of the group's rows, and AVX2's
/// sums carried from one chunk of the rows' length to the next.
#[derive(Default)]
pub struct GemmScratch {
    #[cfg(target_arch = "x86_64")]
    panel: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    sums: Vec<x86::Sums2x6>,
}

/// Whether [`gemm16`] runs on `isa` (every [`Float`] alike).
pub fn has_gemm(isa: Isa) -> bool {
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        return true;
    }
    cfg!(target_arch = "x86_64") && isa >= Isa::Avx2
}

/// [`gemm16`] on x86-64.
#[cfg(target_arch = "x86_64")]
fn gemm16_x86(
    isa: Isa,
    float: Float,
    ws: &[&[u8]],
    xs: &[&[f32]],
    scratch: &mut GemmScratch,
    out: &mut crate::kernels::Tile,
) -> bool {
    assert!(!ws.is_empty() && ws.len() <= GEMM_GROUP && !xs.is_empty());
    let k = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == k) && ws.iter().all(|w| w.len() == float.bytes() * k));
    // Each tile's SAFETY: the CPU has the path (`Isa`); every row is as
    // long as the first (asserted above).
    match isa {
        // SAFETY: as above.
        Isa::Avx512 => by_float!(float, T => unsafe {
            x86::gemm16_avx512::<T>(ws, xs, &mut scratch.panel, out)
        }),
        Isa::Avx2 | Isa::AvxVnni => by_float!(float, T => unsafe {
            // SAFETY: as above.
            x86::gemm16_avx2::<T>(ws, xs, &mut scratch.panel, &mut scratch.sums, out)
        }),
        Isa::Scalar | Isa::Reference => return false,
    }
    true
}

/// [`gemm16`]'s walk over tiles of `N` weight rows × `M` activation rows
/// (NEON's: the x86 paths widen the weights into a panel first).
#[cfg(target_arch = "aarch64")]
fn tiled<const N: usize, const M: usize>(
    ws: &[&[u8]],
    xs: &[&[f32]],
    out: &mut crate::kernels::Tile,
    tile: impl Fn(&[&[u8]; N], &[&[f32]; M]) -> [[f32; M]; N],
) {
    for m0 in (0..xs.len()).step_by(M) {
        let x: [&[f32]; M] = std::array::from_fn(|i| xs[(m0 + i).min(xs.len() - 1)]);
        for n0 in (0..ws.len()).step_by(N) {
            let w: [&[u8]; N] = std::array::from_fn(|i| ws[(n0 + i).min(ws.len() - 1)]);
            let tile = tile(&w, &x);
            let rows = (ws.len() - n0).min(N);
            let columns: [[f32; N]; M] = std::array::from_fn(|m| tile.map(|row| row[m]));
            for (m, column) in columns.iter().enumerate().take(xs.len() - m0) {
                out.row(m0 + m)[n0..][..rows].copy_from_slice(&column[..rows]);
            }
        }
    }
}

/// One little-endian f16 (or bf16) value as f32.
fn widen(float: Float, b: [u8; 2]) -> f32 {
    if float == Float::Bf16 {
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

    /// The eight lanes' sum, in [`kiln_blocks::sum_lanes`]' order.
    ///
    /// # Safety
    /// AVX is present.
    #[inline(always)]
    unsafe fn sum8(v: __m256) -> f32 {
        // SAFETY: register operations only (the caller's AVX).
        unsafe {
            // Lanes j + (j + 4), then j + (j + 2), then 0 + 1.
            let a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let c = _mm_add_ps(a, _mm_movehl_ps(a, a));
            _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)))
        }
    }

    /// Four registers' sums ([`sum8`] of each, the same additions), in
    /// one tree.
    ///
    /// # Safety
    /// AVX is present.
    #[inline(always)]
    unsafe fn sum8x4(v: [__m256; 4]) -> [f32; 4] {
        // SAFETY: register operations only (the caller's AVX).
        unsafe {
            // [v0 lanes j + (j + 4) | v1's], and v2's and v3's.
            let a01 = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
                _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
            );
            let a23 = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(v[2], v[3]),
                _mm256_permute2f128_ps::<0x31>(v[2], v[3]),
            );
            // j + (j + 2): [v0's two, v2's two | v1's two, v3's two].
            let (a01, a23) = (_mm256_castps_pd(a01), _mm256_castps_pd(a23));
            let c = _mm256_add_ps(
                _mm256_castpd_ps(_mm256_unpacklo_pd(a01, a23)),
                _mm256_castpd_ps(_mm256_unpackhi_pd(a01, a23)),
            );
            // 0 + 1: [v0, v2, v0, v2 | v1, v3, v1, v3].
            let h = _mm256_hadd_ps(c, c);
            let mut l = [0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), h);
            [l[0], l[4], l[1], l[5]]
        }
    }

    /// Eight weights of the type coded `T` (f16, bf16 or f32) as f32
    /// (exact every way).
    ///
    /// # Safety
    /// AVX2 and F16C are enabled by the caller; `p` points at 8 values.
    #[inline(always)]
    unsafe fn widen8<const T: u8>(p: *const u8) -> __m256 {
        // SAFETY: the caller's features and pointer.
        unsafe {
            if T == super::F32 {
                return _mm256_loadu_ps(p.cast());
            }
            let h = _mm_loadu_si128(p.cast());
            if T == super::BF16 {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                _mm256_cvtph_ps(h)
            }
        }
    }

    /// The last `len % 8` values of a weight row (`e` bytes a value) and
    /// of activation rows, zero-filled to eight (the padding of
    /// [`kiln_blocks::fused_dot`]).
    struct Tail<const N: usize, const M: usize> {
        w: [[u8; 32]; N],
        x: [[f32; 8]; M],
    }

    impl<const N: usize, const M: usize> Tail<N, M> {
        fn new(e: usize, full: usize, w: &[&[u8]], x: &[&[f32]]) -> Tail<N, M> {
            let mut t = Tail {
                w: [[0; 32]; N],
                x: [[0.0; 8]; M],
            };
            for (t, w) in t.w.iter_mut().zip(w) {
                t[..w.len() - e * full].copy_from_slice(&w[e * full..]);
            }
            for (t, x) in t.x.iter_mut().zip(x) {
                t[..x.len() - full].copy_from_slice(&x[full..]);
            }
            t
        }
    }

    /// Calls `step` with pointers at each run of eight values of the rows
    /// (all of one length, checked; `e` bytes a weight), the last run
    /// zero-filled to eight ([`kiln_blocks::fused_dot`]'s padding); decode
    /// (`M` = 1) prefetches each weight row's lines ahead into L2, as it
    /// streams the weights once.
    #[inline(always)]
    fn walk<const N: usize, const M: usize>(
        e: usize,
        w: &[&[u8]; N],
        x: &[&[f32]; M],
        mut step: impl FnMut([*const u8; N], [*const f32; M]),
    ) {
        let len = x[0].len();
        let full = len / 8 * 8;
        assert!(x.iter().all(|x| x.len() == len) && w.iter().all(|w| w.len() == e * len));
        // Decode's rows of a group lie one after another (a thread's rows
        // of one matrix): each asks for its line one group on, the same
        // place in the next group's row, so the next group arrives whole
        // while this one is read. A fixed lead past each row instead
        // (`prefetch`'s 8 KiB) lands inside this group's own later rows
        // where rows are shorter than it, and half the next group was
        // never asked for: a TinyLlama-shaped F16 model decoded at
        // 10.9-11.4 tok/s, and at 12.1-12.6 with this (27.5 GB/s of the
        // 29.5 measured); two or three groups on were slower again. One
        // row alone keeps the fixed lead.
        let ahead = if N > 1 {
            N * w[0].len()
        } else {
            crate::kernels::PREFETCH_AHEAD
        };
        for i in (0..full).step_by(8) {
            if M == 1 && (e * i).is_multiple_of(64) {
                for w in w {
                    crate::kernels::prefetch_line(w.as_ptr().wrapping_add(e * i + ahead));
                }
            }
            // In bounds: i + 8 <= full.
            step(
                std::array::from_fn(|n| w[n][e * i..].as_ptr()),
                std::array::from_fn(|m| x[m][i..].as_ptr()),
            );
        }
        if full < len {
            let t = Tail::<N, M>::new(e, full, w, x);
            step(
                std::array::from_fn(|n| t.w[n].as_ptr()),
                std::array::from_fn(|m| t.x[m].as_ptr()),
            );
        }
    }

    /// `out[n][m] = w[n] · x[m]` for `N` weight rows × `M` activation
    /// rows, the weights converted as they are read: [`super::dot_rows`]'
    /// (`N` = 1) and decode's ([`super::dot_weight_rows`], `M` = 1).
    ///
    /// # Safety
    /// The CPU has the enabled features; every `w` row holds `x[0].len()`
    /// weights of the type coded `T` and every `x` row as many values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2<const T: u8, const N: usize, const M: usize>(
        w: &[&[u8]; N],
        x: &[&[f32]; M],
    ) -> [[f32; M]; N] {
        let mut acc = [[_mm256_setzero_ps(); M]; N];
        let step = |w: [*const u8; N], x: [*const f32; M]| {
            // SAFETY: each pointer is at 8 values ([`walk`], which checks
            // the lengths).
            unsafe {
                let mut xv = [_mm256_setzero_ps(); M];
                for (v, x) in xv.iter_mut().zip(x) {
                    *v = _mm256_loadu_ps(x);
                }
                for (acc, w) in acc.iter_mut().zip(w) {
                    let wv = widen8::<T>(w);
                    for (acc, xv) in acc.iter_mut().zip(&xv) {
                        *acc = _mm256_fmadd_ps(wv, *xv, *acc);
                    }
                }
            }
        };
        walk(super::Float::bytes_of(T), w, x, step);
        let mut out = [[0.0; M]; N];
        for m in 0..M {
            let mut n = 0;
            while n + 4 <= N {
                // SAFETY: AVX is enabled here.
                let s = unsafe { sum8x4([acc[n][m], acc[n + 1][m], acc[n + 2][m], acc[n + 3][m]]) };
                for (i, s) in s.into_iter().enumerate() {
                    out[n + i][m] = s;
                }
                n += 4;
            }
            for n in n..N {
                // SAFETY: AVX is enabled here.
                out[n][m] = unsafe { sum8(acc[n][m]) };
            }
        }
        out
    }

    /// [`gemm16_avx2`]'s sums for one tile: 2 weight rows × 6 activation
    /// rows.
    pub type Sums2x6 = [[__m256; 6]; 2];

    /// [`super::gemm16`] on AVX2: the group's weights widened into the
    /// panel ([`fill_panel`]), then tiles of 2 weight rows × 6 activation
    /// rows (12 accumulators, the two weight vectors and one activation
    /// vector: 15 registers), a chunk of `CHUNK` runs of eight values at
    /// a time over every tile of the group and every activation row, the
    /// sums kept in `sums` from one chunk to the next (each lane still
    /// adds its products in order, so the bits are the same). A chunk's
    /// panel (16 KiB) stays in L1 while every activation row passes it.
    /// Walking each tile's whole rows instead (2 × 5 tiles converting the
    /// f16 weights as they went, the activations read from L2 again for
    /// every tile) ran at about 0.9 of this speed in `benches/gemm.rs`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are present; every `ws` row holds
    /// `xs[0].len()` weights of the type coded `T` and every `xs` row as
    /// many values; at most 16 rows in `ws`; `out` holds `xs.len() × 16`
    /// values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm16_avx2<const T: u8>(
        ws: &[&[u8]],
        xs: &[&[f32]],
        panel: &mut Vec<f32>,
        sums: &mut Vec<Sums2x6>,
        out: &mut crate::kernels::Tile,
    ) {
        const GROUP: usize = crate::kernels::GEMM_GROUP;
        const RUN: usize = GROUP * 8;
        const M: usize = 6;
        const TILES: usize = GROUP / 2;
        const CHUNK: usize = 32;
        let k = xs[0].len();
        assert!(out.rows() >= xs.len() && xs.iter().all(|x| x.len() == k));
        // SAFETY: the caller's features and rows.
        unsafe { fill_panel::<T>(ws, k, panel) };
        let (full, runs) = (k / 8, k.div_ceil(8));
        let tiles = ws.len().div_ceil(2);
        let m_tiles = xs.len().div_ceil(M);
        let zero = [[_mm256_setzero_ps(); M]; 2];
        sums.resize(m_tiles * TILES, zero);
        // A partial tile repeats its last row and drops its results.
        let rows =
            |m0: usize| -> [&[f32]; M] { std::array::from_fn(|i| xs[(m0 + i).min(xs.len() - 1)]) };
        for c0 in (0..full).step_by(CHUNK) {
            let len = CHUNK.min(full - c0);
            for mt in 0..m_tiles {
                let x = rows(mt * M).map(|r| r.as_ptr().wrapping_add(8 * c0));
                for (t, acc) in sums[mt * TILES..][..tiles].iter_mut().enumerate() {
                    if c0 == 0 {
                        *acc = zero;
                    }
                    // SAFETY: runs c0..c0 + len < full are inside the
                    // panel and every activation row.
                    unsafe { rows2_tile(acc, panel.as_ptr().add(c0 * RUN + 16 * t), x, len) };
                }
            }
        }
        for mt in 0..m_tiles {
            let m0 = mt * M;
            (m0..m0 + M).for_each(|m| out.prefetch(m, 0));
            let mut tail = [[0f32; 8]; M];
            for (t, x) in tail.iter_mut().zip(rows(m0)) {
                t[..k - 8 * full].copy_from_slice(&x[8 * full..]);
            }
            for (t, acc) in sums[mt * TILES..][..tiles].iter_mut().enumerate() {
                if full == 0 {
                    *acc = zero;
                }
                if full < runs {
                    // SAFETY: the panel holds the last run, zero-filled
                    // past k, as the tail is.
                    unsafe {
                        rows2_tile(
                            acc,
                            panel.as_ptr().add(full * RUN + 16 * t),
                            tail.each_ref().map(|r| r.as_ptr()),
                            1,
                        )
                    };
                }
                // Two activation rows' pairs of sums in one tree.
                const { assert!(M.is_multiple_of(2)) };
                for m in (0..M).step_by(2) {
                    // SAFETY: AVX is enabled here.
                    let s = unsafe { sum8x4([acc[0][m], acc[1][m], acc[0][m + 1], acc[1][m + 1]]) };
                    for (i, s) in s.into_iter().enumerate() {
                        let (m, n) = (m + i / 2, 2 * t + i % 2);
                        if m0 + m < xs.len() && n < ws.len() {
                            out.row(m0 + m)[n] = s;
                        }
                    }
                }
            }
        }
    }

    /// [`gemm16_avx2`]'s tile: adds to `acc` a pair of weight rows from
    /// the panel (their first run at `w`, runs 128 values apart) against
    /// 6 activation rows (from `x`, eight values a run), `runs` runs.
    ///
    /// # Safety
    /// AVX2 and FMA are enabled by the caller; the panel and every `x`
    /// row hold the runs read.
    #[inline(always)]
    unsafe fn rows2_tile(acc: &mut Sums2x6, w: *const f32, x: [*const f32; 6], runs: usize) {
        const RUN: usize = crate::kernels::GEMM_GROUP * 8;
        // A local copy, which stays in registers.
        let mut a = *acc;
        for r in 0..runs {
            // SAFETY: the caller's reads and features.
            unsafe {
                let w0 = _mm256_loadu_ps(w.add(r * RUN));
                let w1 = _mm256_loadu_ps(w.add(r * RUN + 8));
                for m in 0..6 {
                    let xv = _mm256_loadu_ps(x[m].add(8 * r));
                    a[0][m] = _mm256_fmadd_ps(w0, xv, a[0][m]);
                    a[1][m] = _mm256_fmadd_ps(w1, xv, a[1][m]);
                }
            }
        }
        *acc = a;
    }

    /// The x86 GEMMs' panel: widens the (at most 16) weight rows
    /// `ws` of `k` values of the type coded `T` to f32 in `panel`, run by
    /// run of eight values: row `n`'s run `r` at `(r · 16 + n) · 8`, so
    /// that a 512-bit register holds a pair of rows' run; the last run
    /// zero-filled past `k`, and a short group's missing rows zero. Written run by run, each run's 512
    /// bytes whole, one after another (row by row, each cache line of a
    /// pair was written twice, the second time after it had left L1).
    ///
    /// # Safety
    /// AVX2 and F16C are present; every row holds `k` weights.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fill_panel<const T: u8>(ws: &[&[u8]], k: usize, panel: &mut Vec<f32>) {
        const GROUP: usize = crate::kernels::GEMM_GROUP;
        let e = super::Float::bytes_of(T);
        assert!(ws.len() <= GROUP && ws.iter().all(|w| w.len() == e * k));
        let (full, runs) = (k / 8, k.div_ceil(8));
        if panel.len() < runs * GROUP * 8 {
            panel.resize(runs * GROUP * 8, 0.0);
        }
        if ws.len() < GROUP {
            for run in panel[..runs * GROUP * 8].chunks_exact_mut(GROUP * 8) {
                run[ws.len() * 8..].fill(0.0);
            }
        }
        for r in 0..full {
            for (n, w) in ws.iter().enumerate() {
                // SAFETY: values 8r..8r + 8 of the row are inside it, and
                // the panel holds run r of row n (sized above).
                unsafe {
                    let v = widen8::<T>(w.as_ptr().add(e * 8 * r));
                    _mm256_storeu_ps(panel.as_mut_ptr().add((r * GROUP + n) * 8), v);
                }
            }
        }
        if full < runs {
            for (n, w) in ws.iter().enumerate() {
                let mut tail = [0u8; 32];
                tail[..w.len() - e * 8 * full].copy_from_slice(&w[e * 8 * full..]);
                // SAFETY: as above, the tail zero-filled to 8 values.
                unsafe {
                    let v = widen8::<T>(tail.as_ptr());
                    _mm256_storeu_ps(panel.as_mut_ptr().add((full * GROUP + n) * 8), v);
                }
            }
        }
    }

    /// Pairs of weight rows in a 512-bit register ([`gemm16_avx512`]).
    const PAIRS: usize = 4;
    /// Activation rows in a [`gemm16_avx512`] tile.
    const TILE_ROWS: usize = 6;

    /// [`super::gemm16`] on AVX-512. The group's weights are widened to
    /// f32 once per call into `panel`, two rows to a 512-bit register
    /// (row `2p`'s eight values of a run of eight, then row `2p + 1`'s;
    /// missing rows and the last run's tail zero), so that a tile of 4
    /// pairs × 6 activation rows takes per run of eight values 4 loads of
    /// weights, 6 broadcasts of an activation row's eight from memory
    /// (load-port only) and 24 FMAs: no conversion, shuffle or insert on
    /// the FMA ports. Each lane adds its products in
    /// [`kiln_blocks::fused_dot`]'s order (lane `j` of a half: values `j`,
    /// `j + 8`, …), the halves summed by [`sum8`], so the results are
    /// [`tile_avx2`]'s bits.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL, AVX2, FMA and F16C are present; every `ws` row
    /// holds `xs[0].len()` weights of the type coded `T` and every `xs`
    /// row as many values; at most 16 rows in `ws`; `out` holds
    /// `xs.len() × 16` values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn gemm16_avx512<const T: u8>(
        ws: &[&[u8]],
        xs: &[&[f32]],
        panel: &mut Vec<f32>,
        out: &mut crate::kernels::Tile,
    ) {
        let k = xs[0].len();
        assert!(out.rows() >= xs.len() && xs.iter().all(|x| x.len() == k));
        // SAFETY: the caller's features and rows.
        unsafe { fill_panel::<T>(ws, k, panel) };
        let (full, runs) = (k / 8, k.div_ceil(8));
        let pairs = ws.len().div_ceil(2);
        // The next group's weights asked for while this one computes, a
        // share per tile: widening them into the panel next call would
        // otherwise wait on memory with nothing to overlap.
        let tiles = xs.len().div_ceil(TILE_ROWS) * pairs.div_ceil(PAIRS);
        let mut ahead = crate::kernels::AskAhead::new(ws, tiles);
        for m0 in (0..xs.len()).step_by(TILE_ROWS) {
            // A partial tile repeats its last row and drops its results.
            let x: [&[f32]; TILE_ROWS] = std::array::from_fn(|i| xs[(m0 + i).min(xs.len() - 1)]);
            (m0..m0 + TILE_ROWS).for_each(|m| out.prefetch(m, 0));
            let mut tail = [[0f32; 8]; TILE_ROWS];
            for (t, x) in tail.iter_mut().zip(&x) {
                t[..k - 8 * full].copy_from_slice(&x[8 * full..]);
            }
            for p0 in (0..pairs).step_by(PAIRS) {
                ahead.step();
                let mut acc = [[_mm512_setzero_ps(); TILE_ROWS]; PAIRS];
                // SAFETY: the panel holds every run of pairs p0..p0 + 4
                // (16 rows, zero past `ws`); each row holds `full` whole
                // runs, the tail copied.
                unsafe {
                    pairs_tile(
                        &mut acc,
                        panel.as_ptr().add(2 * p0 * 8),
                        x.map(|r| r.as_ptr()),
                        full,
                        (full < runs).then_some(&tail),
                    )
                };
                for (p, acc) in acc.iter().enumerate() {
                    for (m, a) in acc.iter().enumerate().take(xs.len() - m0) {
                        let pd = _mm512_castps_pd(*a);
                        let halves = [
                            _mm256_castpd_ps(_mm512_castpd512_pd256(pd)),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(pd)),
                        ];
                        for (h, v) in halves.into_iter().enumerate() {
                            let n = 2 * (p0 + p) + h;
                            if n < ws.len() {
                                // SAFETY: AVX is enabled here.
                                out.row(m0 + m)[n] = unsafe { sum8(v) };
                            }
                        }
                    }
                }
            }
        }
    }

    /// [`gemm16_avx512`]'s tile: adds to `acc` 4 pairs of weight rows
    /// from `panel` (pair 0 of the first run at `panel`, runs 128 values
    /// apart) against 6 activation rows, `whole` runs of eight from `x`
    /// and then, if given, the zero-filled `tail`'s. (Blocking the rows'
    /// length into chunks of 256 values, the sums carried between them,
    /// kept a chunk's panel and activations in L1 but made a 256-token
    /// F16 prompt about a fifth slower: more loop overhead, no gain.)
    ///
    /// # Safety
    /// As [`gemm16_avx512`]; `panel` holds the runs read, each `x` row
    /// `8 · whole` values.
    #[inline(always)]
    unsafe fn pairs_tile(
        acc: &mut [[__m512; TILE_ROWS]; PAIRS],
        panel: *const f32,
        x: [*const f32; TILE_ROWS],
        whole: usize,
        tail: Option<&[[f32; 8]; TILE_ROWS]>,
    ) {
        const RUN: usize = crate::kernels::GEMM_GROUP * 8;
        // SAFETY: register operations, and reads the caller vouches for.
        unsafe {
            let step = |acc: &mut [[__m512; TILE_ROWS]; PAIRS],
                        w: *const f32,
                        x: [*const f32; TILE_ROWS]| {
                let mut wv = [_mm512_setzero_ps(); PAIRS];
                for (p, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(w.add(16 * p));
                }
                for (m, x) in x.iter().enumerate() {
                    let xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(x.cast())));
                    for (acc, wv) in acc.iter_mut().zip(&wv) {
                        acc[m] = _mm512_fmadd_ps(*wv, xv, acc[m]);
                    }
                }
            };
            // A local copy, which stays in registers (through `acc`
            // itself, the sums went to the stack and back every run).
            let mut sums = *acc;
            for r in 0..whole {
                step(&mut sums, panel.add(r * RUN), x.map(|x| x.add(8 * r)));
            }
            if let Some(tail) = tail {
                step(
                    &mut sums,
                    panel.add(whole * RUN),
                    std::array::from_fn(|m| tail[m].as_ptr()),
                );
            }
            *acc = sums;
        }
    }
}
