//! Activations quantized to Q8_0 blocks, and the integer dot products of
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL weight rows with them: portable,
//! NEON (the block sums, `neon.rs`), AVX2 and AVX-512 VNNI.
//!
//! Q4_1 and Q5_1 blocks add their minimum times the activations' Q8_1
//! block sum `s` (ggml's `vec_dot_q4_1_q8_1`): the same codes as Q8_0, and
//! per block `s`, an f16 of `d · Σ codes` ([`kiln_blocks::q8_1_sums`]).
//! IQ4_NL's codes index a table of 16 signed values.
//!
//! Block sums are exact integers, and every path adds the blocks' terms
//! in one order, [`kiln_blocks::q8_dot`]'s: block `b`'s `fma(d_w·d_x, sum,
//! ·)` into f32 partial `b mod 4`, the partials added `(0 + 2) + (1 + 3)`.
//! So every kernel gives the reference's bits, and a prompt (the GEMMs)
//! and decode (the row kernels) give the same ones for the same row. That
//! matters more than it seems: K and V are rounded to f16 in the cache,
//! and a last-bit difference there can flip a rounding that sharp
//! attention then amplifies. (These sums were once in f64, exact term by
//! term; scaling in f64 took two conversions, two products and two FMAs
//! per 8 lanes and block where f32 takes one of each, which held the
//! GEMMs at about 0.75 of ik_llama.cpp's prompt speed.)

use super::{GEMM_GROUP, Isa};
use half::f16;
use kiln_plugin_api::{DType, interleave};

const QK: usize = 32;
const Q4_0_BYTES: usize = DType::Q4_0.block_bytes();
const Q4_1_BYTES: usize = DType::Q4_1.block_bytes();
const Q5_0_BYTES: usize = DType::Q5_0.block_bytes();
const Q5_1_BYTES: usize = DType::Q5_1.block_bytes();
const Q8_0_BYTES: usize = DType::Q8_0.block_bytes();

/// Whether these kernels take weights of `dtype` (the types whose
/// activations are Q8_0 blocks, Q8_1 for Q4_1/Q5_1).
pub const fn takes(dtype: DType) -> bool {
    // A list of what `codes` unpacks, not "every 32-element type": a type
    // added to the ABI falls back to the portable path until it has a case.
    matches!(
        dtype,
        DType::Q4_0
            | DType::Q4_0X16
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q5_0X16
            | DType::Q8_0
            | DType::IQ4_NL
    )
}

/// Whether blocks of `dtype` carry a minimum (Q4_1, Q5_1).
const fn has_min(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_1 | DType::Q5_1)
}

/// One activation row as ggml's `block_q8_0`s, split into scales and codes.
pub struct Q8Row {
    /// Per block: the scale (an f16 value, widened).
    pub d: Vec<f32>,
    /// The codes, 32 per block.
    pub qs: Vec<i8>,
    /// The sum of each block's codes (for unsigned weight codes' offset).
    pub sums: Vec<i32>,
    /// Per block: minus the weights' code offset (8, 16 or 128, from
    /// [`Q8Row::new`]'s type) times the code sum: what the GEMM starts
    /// each block's integer sum from.
    pub offset_sums: Vec<i32>,
    /// Per block, for Q4_1/Q5_1 weights: Q8_1's `s` ([`kiln_blocks::q8_1_sums`]);
    /// empty for other weights.
    pub s: Vec<f32>,
    offset: i32,
    with_s: bool,
    /// The codes again, lane-major, for the decode kernels that give each
    /// block of a weight row its own lane ([`Q8Row::fill_lanes`]): per
    /// group of 16 blocks, 8 vectors of 64 bytes; lane `i` of vector `j`
    /// holds codes `4j..4j+4` of the group's block `i`. Empty until filled.
    pub lanes: Vec<u8>,
}

impl Q8Row {
    /// A row for products with `weights` (Q4_0, Q5_0 or Q8_0) of `k` columns.
    pub fn new(k: usize, weights: DType) -> Q8Row {
        Q8Row {
            d: vec![0.0; k / QK],
            qs: vec![0; k],
            sums: vec![0; k / QK],
            offset_sums: vec![0; k / QK],
            s: Vec::new(),
            offset: code_offset(weights),
            with_s: has_min(weights),
            lanes: Vec::new(),
        }
    }

    /// Makes this a row as [`Q8Row::new`] makes one, in the buffers it has
    /// (which grow only past the largest `k` they held).
    pub fn reset(&mut self, k: usize, weights: DType) {
        self.d.resize(k / QK, 0.0);
        self.qs.resize(k, 0);
        self.sums.resize(k / QK, 0);
        self.offset_sums.resize(k / QK, 0);
        self.s.clear();
        self.offset = code_offset(weights);
        self.with_s = has_min(weights);
        self.lanes.clear();
    }

    /// Block `b`'s [`Q8Row::offset_sums`] entry from its code sum, and for
    /// Q4_1/Q5_1 its [`Q8Row::s`]: the unrounded scale `amax / 127` of the
    /// block (`amax`: its largest magnitude) times its code sum, to f16,
    /// as ggml's x86 `quantize_row_q8_1` (whose codes are Q8_0's) and
    /// [`kiln_blocks::q8_1_sums`] compute it. Each quantizer calls it per
    /// block, with the `amax` it found.
    #[inline(always)]
    fn finish_block(&mut self, b: usize, amax: f32) {
        let sum = self.sums[b];
        if self.with_s {
            self.s[b] = f16::from_f32(amax / 127.0 * sum as f32).to_f32();
        }
        self.offset_sums[b] = -self.offset * sum;
    }

    /// Fills [`Q8Row::lanes`] from the codes (whole groups of 16 blocks).
    pub fn fill_lanes(&mut self) {
        let groups = self.d.len() / LANE_BLOCKS;
        self.lanes.resize(groups * LANE_BLOCKS * QK, 0);
        for (b, block) in self
            .qs
            .chunks_exact(QK)
            .take(groups * LANE_BLOCKS)
            .enumerate()
        {
            let codes: &[u8; QK] = bytemuck_i8(block);
            crate::kernels::lanes::scatter(
                &mut self.lanes,
                codes,
                b / LANE_BLOCKS,
                b % LANE_BLOCKS,
            );
        }
    }

    /// Quantizes `x` (a whole number of blocks) exactly as the reference's
    /// `round_activations` rounds it: `qs * d` is that rounded value.
    pub fn quantize(&mut self, isa: Isa, x: &[f32]) {
        assert_eq!(x.len(), self.qs.len());
        self.s
            .resize(if self.with_s { self.sums.len() } else { 0 }, 0.0);
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            // SAFETY: the CPU has AVX-512 (`Isa`); lengths checked above.
            unsafe { x86::quantize_q8_0(self, x) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 {
            // SAFETY: the CPU has AVX2 and F16C (`Isa`); lengths checked above.
            unsafe { x86::quantize_q8_0_avx2(self, x) };
            return;
        }
        let _ = isa;
        for (b, block) in x.chunks_exact(QK).enumerate() {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            self.d[b] = f16::from_f32(amax / 127.0).to_f32();
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let q = &mut self.qs[b * QK..][..QK];
            for (q, v) in q.iter_mut().zip(block) {
                // Round half to even, as `round_ties_even` (inlined: |v·id| ≤ 127).
                *q = kiln_blocks::nearest_int(v * id) as i8;
            }
            self.sums[b] = q.iter().map(|&v| v as i32).sum();
            self.finish_block(b, amax);
        }
    }
}

/// What the kernels add to a weight code to make it unsigned.
fn code_offset(weights: DType) -> i32 {
    match interleave::plain(weights) {
        DType::Q8_0 | DType::IQ4_NL => 128,
        DType::Q5_0 => 16,
        DType::Q4_1 | DType::Q5_1 => 0,
        _ => 8,
    }
}

/// Blocks per group in the lane-major decode kernels: one per lane.
const LANE_BLOCKS: usize = 16;

/// One block's codes as bytes.
fn bytemuck_i8(block: &[i8]) -> &[u8; QK] {
    let block: &[i8; QK] = block.try_into().expect("one block");
    // SAFETY: i8 and u8 have the same size and alignment, every bit
    // pattern is valid for both.
    unsafe { &*(block as *const [i8; QK]).cast::<[u8; QK]>() }
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
    assert_eq!(w.len(), blocks * dtype.block_bytes(), "{dtype} row");
    assert!(
        xs.iter()
            .all(|x| x.s.len() == if has_min(dtype) { blocks } else { x.s.len() })
    );
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Isa` only names paths the CPU has (`Isa::detect`), and
        // the lengths were checked above.
        Isa::Avx512 => unsafe {
            if xs.iter().all(|x| takes_lanes(dtype, x)) {
                // The lane kernels, by rows and by fifth bits (Q5).
                macro_rules! lanes {
                    ($kernel:ident) => {
                        match (xs.len(), interleave::plain(dtype) == DType::Q5_0) {
                            (1, false) => x86::$kernel::<1, false>(w, xs, out),
                            (2, false) => x86::$kernel::<2, false>(w, xs, out),
                            (3, false) => x86::$kernel::<3, false>(w, xs, out),
                            (_, false) => x86::$kernel::<4, false>(w, xs, out),
                            (1, true) => x86::$kernel::<1, true>(w, xs, out),
                            (2, true) => x86::$kernel::<2, true>(w, xs, out),
                            (3, true) => x86::$kernel::<3, true>(w, xs, out),
                            (_, true) => x86::$kernel::<4, true>(w, xs, out),
                        }
                    };
                }
                return if interleave::is_interleaved(dtype) {
                    lanes!(dot_lanes_x16)
                } else {
                    lanes!(dot_lanes)
                };
            }
            return match xs.len() {
                1 => x86::dot_vnni::<1>(dtype, w, xs, out),
                2 => x86::dot_vnni::<2>(dtype, w, xs, out),
                3 => x86::dot_vnni::<3>(dtype, w, xs, out),
                _ => x86::dot_vnni::<4>(dtype, w, xs, out),
            };
        },
        // SAFETY: as above.
        Isa::Avx2 | Isa::AvxVnni => unsafe {
            return if isa == Isa::AvxVnni {
                by_rows!(xs.len() => dot_avxvnni[](dtype, w, xs, out))
            } else {
                by_rows!(xs.len() => dot_avx2[](dtype, w, xs, out))
            };
        },
        Isa::Scalar | Isa::Reference => {}
    }
    if interleave::is_interleaved(dtype) {
        let plain = interleave::plain(dtype);
        return with_plain(dtype, w, |p| dot_rows(isa, plain, p, xs, out));
    }
    let sums = block_sums(isa, dtype);
    for (o, x) in out.iter_mut().zip(xs) {
        *o = dot_blocks(dtype, w, x, sums);
    }
}

/// Runs `f` on the plain blocks of the interleaved (`layout`) row `w`,
/// unpacked into a buffer of this thread's: the paths without an
/// interleaved kernel.
fn with_plain<T>(layout: DType, w: &[u8], f: impl FnOnce(&[u8]) -> T) -> T {
    thread_local! {
        static PLAIN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PLAIN.with_borrow_mut(|plain| {
        plain.resize(w.len(), 0);
        interleave::unpack(layout, w, plain);
        f(plain)
    })
}

/// A one-row dot product kernel: `out[0] = w · xs[0]` for weights of
/// the given type.
type RowKernel = fn(DType, &[u8], &[&Q8Row], &mut [f32]);

/// Whether the lane-wise decode kernels ([`x86::dot_lanes`]) take `x`
/// against `dtype` weights: Q4_0 or Q5_0 (plain or interleaved), a group
/// of 16 blocks or more, and the row's lanes filled.
fn takes_lanes(dtype: DType, x: &Q8Row) -> bool {
    let groups = x.d.len() / LANE_BLOCKS;
    groups > 0
        && matches!(interleave::plain(dtype), DType::Q4_0 | DType::Q5_0)
        && x.lanes.len() == groups * LANE_BLOCKS * QK
}

/// Whether the decode kernels on `isa` read activations lane-major
/// ([`Q8Row::fill_lanes`]) against `dtype` weights: AVX-512's for Q4_0
/// and Q5_0 in either layout, AVX2's for interleaved Q4_0.
pub fn wants_lanes(isa: Isa, dtype: DType) -> bool {
    match isa {
        Isa::Avx512 => matches!(interleave::plain(dtype), DType::Q4_0 | DType::Q5_0),
        Isa::Avx2 | Isa::AvxVnni => dtype == DType::Q4_0X16,
        _ => false,
    }
}

/// `out(n, w(n) · x)` for the weight rows `n` in `rows` (in the order
/// given) against one activation row: decode's loop, with the checks and
/// the kernel chosen once for all rows rather than per row (a row of
/// 2048 Q4_0 weights takes about 50 ns, so per-row overhead showed in
/// decode).
pub fn dot_row_range<'w>(
    isa: Isa,
    dtype: DType,
    x: &Q8Row,
    rows: impl Iterator<Item = usize>,
    w: impl Fn(usize) -> &'w [u8],
    mut out: impl FnMut(usize, f32),
) {
    let bytes = x.d.len() * dtype.block_bytes();
    if has_min(dtype) {
        assert_eq!(x.s.len(), x.d.len(), "Q8_1 sums for {dtype}");
    }
    // Each closure is safe to call: `Isa` only names paths the CPU has,
    // every weight row's length is checked below, and `takes_lanes` that
    // the lanes are filled.
    #[cfg(target_arch = "x86_64")]
    let kernel: Option<RowKernel> = match isa {
        Isa::Avx512 if interleave::is_interleaved(dtype) && takes_lanes(dtype, x) => {
            Some(|d, w, xs, out| {
                // SAFETY: as above.
                unsafe {
                    if d == DType::Q5_0X16 {
                        x86::dot_lanes_x16::<1, true>(w, xs, out)
                    } else {
                        x86::dot_lanes_x16::<1, false>(w, xs, out)
                    }
                }
            })
        }
        Isa::Avx512 if takes_lanes(dtype, x) => Some(|d, w, xs, out| {
            // SAFETY: as above.
            unsafe {
                if d == DType::Q5_0 {
                    x86::dot_lanes::<1, true>(w, xs, out)
                } else {
                    x86::dot_lanes::<1, false>(w, xs, out)
                }
            }
        }),
        Isa::Avx512 => Some(|d, w, xs, out| {
            // SAFETY: as above.
            unsafe { x86::dot_vnni::<1>(d, w, xs, out) }
        }),
        Isa::Avx2 => Some(|d, w, xs, out| {
            // SAFETY: as above.
            unsafe { x86::dot_avx2::<1>(d, w, xs, out) }
        }),
        Isa::AvxVnni => Some(|d, w, xs, out| {
            // SAFETY: as above.
            unsafe { x86::dot_avxvnni::<1>(d, w, xs, out) }
        }),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let kernel: Option<RowKernel> = None;
    let xs = [x];
    let mut o = [0f32];
    for n in rows {
        let wr = w(n);
        assert_eq!(wr.len(), bytes, "weight row {n} of {dtype}");
        match kernel {
            Some(k) => k(dtype, wr, &xs, &mut o),
            None => dot_rows(isa, dtype, wr, &xs, &mut o),
        }
        out(n, o[0]);
    }
}

/// Scratch for [`gemm16`], reused across calls on one thread.
#[derive(Default)]
pub struct GemmScratch {
    codes: Vec<u8>,
    dw: Vec<f32>,
    /// Q4_1/Q5_1: each block's minimum, laid out as `dw`.
    dm: Vec<f32>,
}

impl GemmScratch {
    /// `codes` and `dw` (and `dm` for weights with minimums, else empty)
    /// at these lengths, with whatever the last call left in them: the
    /// kernels write every byte, missing rows as zeros (zero-filling them
    /// first was half of the kernels' `memset`, 0.4 % of a prompt).
    fn size(&mut self, codes: usize, scales: usize, with_min: bool) {
        fn size<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
            if v.len() != n {
                v.clear();
                v.resize(n, T::default());
            }
        }
        size(&mut self.codes, codes);
        size(&mut self.dw, scales);
        size(&mut self.dm, if with_min { scales } else { 0 });
    }
}

/// `out.row(m)[n] = w[n] · xs[m]` for up to 16 weight rows and any number of
/// activation rows, on AVX-512 VNNI with the weights laid out lane-wise:
/// lane `n` of a 512-bit register holds 4 codes of weight row `n`, so one
/// `vpdpbusd` against 4 broadcast activation codes advances 16 dot
/// products, and a block's integer sums land in 16 lanes with no
/// horizontal reduction. The codes are unpacked into that layout once per
/// call and reused for every activation row (worth it from about 4 rows).
/// Sums are scaled in f32 block by block into four partials per
/// activation row, in [`kiln_blocks::q8_dot`]'s order, so the results are
/// the reference's bits.
///
/// On AVX2 the same at 8 rows a register ([`x86::gemm16_avx2`]; not
/// Q5_0X16, which only AVX-512 CPUs are given). Returns `false` (and does
/// nothing) where [`has_gemm`] says no.
pub fn gemm16(
    isa: Isa,
    dtype: DType,
    ws: &[&[u8]],
    xs: &[&Q8Row],
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
    assert!(!has_min(dtype) || xs.iter().all(|x| x.s.len() == nb));
    // The rows' offset sums are for these weights' codes.
    assert!(xs.iter().all(|x| x.offset == code_offset(dtype)));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `has_gemm` names only paths the CPU has (`Isa::detect`:
    // AVX-512 VNNI, or AVX2 with FMA and F16C); lengths checked above.
    unsafe {
        match isa {
            Isa::Avx512 => x86::gemm16_vnni(dtype, ws, xs, scratch, out),
            Isa::AvxVnni => x86::gemm16_avx2::<true>(dtype, ws, xs, scratch, out),
            _ => x86::gemm16_avx2::<false>(dtype, ws, xs, scratch, out),
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (scratch, out);
    true
}

/// Whether [`gemm16`] runs `dtype` on `isa`.
pub fn has_gemm(isa: Isa, dtype: DType) -> bool {
    cfg!(target_arch = "x86_64")
        && takes(dtype)
        && (isa == Isa::Avx512 || (isa >= Isa::Avx2 && dtype != DType::Q5_0X16))
}

/// `Σ q_w · q_x` per block of 32 codes (exact): weights of whole blocks,
/// their activation codes, one sum per block.
type BlockSums = fn(&[u8], &[i8], &mut [i32]);

/// The block sums for `dtype` on `isa`: NEON's on aarch64, else the
/// portable loops.
fn block_sums(isa: Isa, dtype: DType) -> BlockSums {
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        match dtype {
            DType::Q4_0 => return super::neon::block_sums_q4_0,
            DType::Q4_1 => return super::neon::block_sums_q4_1,
            DType::Q5_0 => return super::neon::block_sums_q5_0,
            DType::Q5_1 => return super::neon::block_sums_q5_1,
            DType::Q8_0 => return super::neon::block_sums_q8_0,
            DType::IQ4_NL => return super::neon::block_sums_iq4_nl,
            _ => {}
        }
    }
    let _ = isa;
    match dtype {
        DType::Q4_0 => sums_q4_0,
        DType::Q4_1 => sums_q4_1,
        DType::Q5_0 => sums_q5_0,
        DType::Q5_1 => sums_q5_1,
        DType::IQ4_NL => sums_iq4_nl,
        _ => sums_q8_0,
    }
}

fn sums_q4_1(w: &[u8], x: &[i8], out: &mut [i32]) {
    for ((blk, xq), o) in w.chunks_exact(Q4_1_BYTES).zip(x.chunks_exact(QK)).zip(out) {
        let mut s = 0i32;
        for j in 0..16 {
            let q = blk[4 + j];
            s += (q & 0x0f) as i32 * xq[j] as i32;
            s += (q >> 4) as i32 * xq[j + 16] as i32;
        }
        *o = s;
    }
}

fn sums_q5_1(w: &[u8], x: &[i8], out: &mut [i32]) {
    for ((blk, xq), o) in w.chunks_exact(Q5_1_BYTES).zip(x.chunks_exact(QK)).zip(out) {
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        let mut s = 0i32;
        for j in 0..16 {
            let q = blk[8 + j];
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            s += ((q & 0x0f) as u32 | h0) as i32 * xq[j] as i32;
            s += ((q >> 4) as u32 | h1) as i32 * xq[j + 16] as i32;
        }
        *o = s;
    }
}

fn sums_iq4_nl(w: &[u8], x: &[i8], out: &mut [i32]) {
    const V: [i8; 16] = kiln_blocks::IQ4_VALUES;
    for ((blk, xq), o) in w.chunks_exact(Q4_0_BYTES).zip(x.chunks_exact(QK)).zip(out) {
        let mut s = 0i32;
        for j in 0..16 {
            let q = blk[2 + j];
            s += V[(q & 0x0f) as usize] as i32 * xq[j] as i32;
            s += V[(q >> 4) as usize] as i32 * xq[j + 16] as i32;
        }
        *o = s;
    }
}

fn sums_q4_0(w: &[u8], x: &[i8], out: &mut [i32]) {
    for ((blk, xq), o) in w.chunks_exact(Q4_0_BYTES).zip(x.chunks_exact(QK)).zip(out) {
        let mut s = 0i32;
        for j in 0..16 {
            let q = blk[2 + j];
            s += ((q & 0x0f) as i32 - 8) * xq[j] as i32;
            s += ((q >> 4) as i32 - 8) * xq[j + 16] as i32;
        }
        *o = s;
    }
}

fn sums_q5_0(w: &[u8], x: &[i8], out: &mut [i32]) {
    for ((blk, xq), o) in w.chunks_exact(Q5_0_BYTES).zip(x.chunks_exact(QK)).zip(out) {
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let mut s = 0i32;
        for j in 0..16 {
            let q = blk[6 + j];
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            s += (((q & 0x0f) as u32 | h0) as i32 - 16) * xq[j] as i32;
            s += (((q >> 4) as u32 | h1) as i32 - 16) * xq[j + 16] as i32;
        }
        *o = s;
    }
}

fn sums_q8_0(w: &[u8], x: &[i8], out: &mut [i32]) {
    for ((blk, xq), o) in w.chunks_exact(Q8_0_BYTES).zip(x.chunks_exact(QK)).zip(out) {
        *o = blk[2..]
            .iter()
            .zip(xq)
            .map(|(&q, &y)| q as i8 as i32 * y as i32)
            .sum();
    }
}

/// `w · x` from the blocks' integer sums, each scaled as `d_w · d_x · sum`
/// and added in [`kiln_blocks::q8_dot`]'s order.
fn dot_blocks(dtype: DType, w: &[u8], x: &Q8Row, sums: BlockSums) -> f32 {
    const CHUNK: usize = 64;
    let bytes = dtype.block_bytes();
    let with_min = has_min(dtype);
    let terms = w
        .chunks(CHUNK * bytes)
        .zip(x.qs.chunks(CHUNK * QK))
        .enumerate()
        .flat_map(move |(c, (wc, xc))| {
            // A chunk's integer sums at a time, on the stack.
            let n = xc.len() / QK;
            let mut s = [0i32; CHUNK];
            sums(wc, xc, &mut s[..n]);
            (0..n).map(move |i| (c * CHUNK + i, s[i]))
        })
        .map(|(b, sum)| kiln_blocks::Q8Term {
            d: f16_at(w, b * bytes) * x.d[b],
            sum,
            min: with_min.then(|| f16_at(w, b * bytes + 2) * x.s[b]),
        });
    kiln_blocks::q8_dot(terms)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{
        GEMM_GROUP, GemmScratch, LANE_BLOCKS, Q4_0_BYTES, Q5_0_BYTES, Q8_0_BYTES, Q8Row, QK,
    };
    use core::arch::x86_64::*;
    use half::f16;
    use kiln_plugin_api::{DType, interleave};

    /// [`Q8Row::quantize`] on AVX-512, to the same bits (codes round half
    /// to even: `vcvtps2dq` in the default rounding mode).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and F16C are present; `x.len() == row.qs.len()`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
    pub unsafe fn quantize_q8_0(row: &mut Q8Row, x: &[f32]) {
        let abs_mask = _mm512_set1_epi32(0x7fff_ffff);
        for (b, block) in x.chunks_exact(QK).enumerate() {
            // SAFETY: the block holds 32 values.
            let v = unsafe {
                [
                    _mm512_loadu_ps(block.as_ptr()),
                    _mm512_loadu_ps(block.as_ptr().add(16)),
                ]
            };
            // No closures here: a closure handed to `map` would be
            // compiled without this function's target features, and not
            // inlined.
            let abs = [
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[0]), abs_mask)),
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[1]), abs_mask)),
            ];
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs[0], abs[1]));
            row.d[b] = f16::from_f32(amax / 127.0).to_f32();
            let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let c = [
                _mm512_cvtps_epi32(_mm512_mul_ps(v[0], id)),
                _mm512_cvtps_epi32(_mm512_mul_ps(v[1], id)),
            ];
            // SAFETY: codes 32b..32b+32 are inside the row.
            unsafe {
                let q = row.qs.as_mut_ptr().add(b * QK);
                _mm_storeu_si128(q.cast(), _mm512_cvtepi32_epi8(c[0]));
                _mm_storeu_si128(q.add(16).cast(), _mm512_cvtepi32_epi8(c[1]));
            }
            row.sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(c[0], c[1]));
            row.finish_block(b, amax);
        }
    }

    /// [`Q8Row::quantize`] on AVX2, to the same bits as the AVX-512 one.
    ///
    /// # Safety
    /// AVX2 and F16C are present; `x.len() == row.qs.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_q8_0_avx2(row: &mut Q8Row, x: &[f32]) {
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (b, block) in x.chunks_exact(QK).enumerate() {
            let mut v = [_mm256_setzero_ps(); 4];
            let mut top = _mm256_setzero_ps();
            for (i, v) in v.iter_mut().enumerate() {
                // SAFETY: the block holds 32 values.
                *v = unsafe { _mm256_loadu_ps(block.as_ptr().add(8 * i)) };
                top = _mm256_max_ps(top, _mm256_and_ps(*v, abs_mask));
            }
            let top = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps::<1>(top));
            let top = _mm_max_ps(top, _mm_movehl_ps(top, top));
            let amax = _mm_cvtss_f32(_mm_max_ss(top, _mm_movehdup_ps(top)));
            row.d[b] = f16::from_f32(amax / 127.0).to_f32();
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let mut c = [_mm256_setzero_si256(); 4];
            for (c, v) in c.iter_mut().zip(v) {
                *c = _mm256_cvtps_epi32(_mm256_mul_ps(v, id));
            }
            // Packing interleaves the 128-bit lanes; `order` puts the
            // codes back in place.
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(c[0], c[1]),
                _mm256_packs_epi32(c[2], c[3]),
            );
            // SAFETY: codes 32b..32b+32 are inside the row.
            unsafe {
                _mm256_storeu_si256(
                    row.qs.as_mut_ptr().add(b * QK).cast(),
                    _mm256_permutevar8x32_epi32(bytes, order),
                )
            };
            let sum = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
            let sum = _mm_add_epi32(
                _mm256_castsi256_si128(sum),
                _mm256_extracti128_si256::<1>(sum),
            );
            let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
            row.sums[b] = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<1>(sum)));
            row.finish_block(b, amax);
        }
    }

    /// Block `b`'s 32 weight codes as unsigned bytes (Q4_0: the nibbles;
    /// Q5_0 and Q5_0X16: the nibbles with their fifth bits; Q8_0: the
    /// code + 128) and
    /// its f16 scale's bits. The offset (8, 16 or 128) times the
    /// activations' code sum is subtracted later.
    ///
    /// # Safety
    /// Block `b` is inside `w`; AVX2 is enabled by the caller.
    #[inline(always)]
    unsafe fn codes(dtype: DType, w: &[u8], b: usize) -> (__m256i, u16) {
        // SAFETY: the block is inside `w`; the loads are unaligned ones.
        unsafe {
            if matches!(
                dtype,
                DType::Q4_0 | DType::Q4_0X16 | DType::Q4_1 | DType::IQ4_NL
            ) {
                const GROUP: usize = interleave::Q4_0_GROUP_BYTES;
                let (g, i) = (b / LANE_BLOCKS, b % LANE_BLOCKS);
                if dtype == DType::Q4_0X16 && (g + 1) * GROUP <= w.len() {
                    // Block i of an interleaved group: its 4-byte pieces
                    // of the four code vectors.
                    let p = w.as_ptr().add(g * GROUP);
                    let piece =
                        |k: usize| p.add(32 + 64 * k + 4 * i).cast::<i32>().read_unaligned();
                    let q = _mm_set_epi32(piece(3), piece(2), piece(1), piece(0));
                    let m4 = _mm_set1_epi8(0x0f);
                    let lo = _mm_and_si128(q, m4);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
                    return (
                        _mm256_set_m128i(hi, lo),
                        p.add(2 * i).cast::<u16>().read_unaligned(),
                    );
                }
                // Plain blocks, or an interleaved row's tail.
                let bytes = dtype.block_bytes();
                let p = w.as_ptr().add(b * bytes);
                let q = _mm_loadu_si128(p.add(bytes - 16).cast());
                let m4 = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(q, m4);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
                let (lo, hi) = if dtype == DType::IQ4_NL {
                    // The table's values + 128, as unsigned bytes.
                    let t = _mm_loadu_si128(IQ4_UNSIGNED.as_ptr().cast());
                    (_mm_shuffle_epi8(t, lo), _mm_shuffle_epi8(t, hi))
                } else {
                    (lo, hi)
                };
                (_mm256_set_m128i(hi, lo), p.cast::<u16>().read_unaligned())
            } else if matches!(dtype, DType::Q5_0 | DType::Q5_0X16 | DType::Q5_1) {
                const GROUP: usize = interleave::Q5_0_GROUP_BYTES;
                let (g, i) = (b / LANE_BLOCKS, b % LANE_BLOCKS);
                let (q, qh, d) = if dtype == DType::Q5_0X16 && (g + 1) * GROUP <= w.len() {
                    // Block i of an interleaved group: its 4-byte pieces
                    // of the four code vectors, its nibble of each mask.
                    let p = w.as_ptr().add(g * GROUP);
                    let piece =
                        |k: usize| p.add(96 + 64 * k + 4 * i).cast::<i32>().read_unaligned();
                    let q = _mm_set_epi32(piece(3), piece(2), piece(1), piece(0));
                    let masks = p.add(32).cast::<u64>();
                    let mut qh = 0u32;
                    for j in 0..8 {
                        let nib = (masks.add(j).read_unaligned() >> (4 * i)) as u32 & 0xf;
                        qh |= nib << (16 * (j % 2) + 4 * (j / 2));
                    }
                    (q, qh as i32, p.add(2 * i).cast::<u16>().read_unaligned())
                } else {
                    // Q5_0 or Q5_1 (with its minimum before the mask), or
                    // an interleaved row's plain tail.
                    let bytes = dtype.block_bytes();
                    let p = w.as_ptr().add(b * bytes);
                    (
                        _mm_loadu_si128(p.add(bytes - 16).cast()),
                        p.add(bytes - 20).cast::<i32>().read_unaligned(),
                        p.cast::<u16>().read_unaligned(),
                    )
                };
                let m4 = _mm_set1_epi8(0x0f);
                let lo = _mm_and_si128(q, m4);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m4);
                // Bit i of qh becomes 0x10 in byte i: broadcast qh, give
                // each byte its own qh byte, keep one bit per byte.
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
                (_mm256_or_si256(_mm256_set_m128i(hi, lo), high), d)
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

    /// IQ4_NL's code values + 128, indexed by nibble.
    static IQ4_UNSIGNED: [u8; 16] = {
        let mut t = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            t[i] = (kiln_blocks::IQ4_VALUES[i] as i32 + 128) as u8;
            i += 1;
        }
        t
    };

    /// The f16 minimum of block `b` of a Q4_1/Q5_1 row, widened.
    ///
    /// # Safety
    /// Block `b` is inside `w`.
    #[inline(always)]
    unsafe fn min_at(w: &[u8], bytes: usize, b: usize) -> u16 {
        // SAFETY: the caller's contract.
        unsafe { w.as_ptr().add(b * bytes + 2).cast::<u16>().read_unaligned() }
    }

    /// The shared loop over one weight row and up to four activation
    /// rows (the weight codes unpacked once for all): four blocks at a
    /// time, their integer sums reduced to one lane each, offset-corrected,
    /// scaled and added to a row's four partials of [`kiln_blocks::q8_dot`]
    /// (one lane each).
    ///
    /// Generated once per weight type (`D`, its raw number): the type's
    /// choices (code layout, block size, minimum) are then constants, not
    /// branches taken per block.
    macro_rules! dot_q8 {
        ($name:ident, $typed:ident, $lanes:ident, $eight:ident, $features:literal, $q8_offset:expr, $prod:expr) => {
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
                const Q4_0: u32 = DType::Q4_0.raw();
                const Q4_0X16: u32 = DType::Q4_0X16.raw();
                const Q4_1: u32 = DType::Q4_1.raw();
                const Q5_0: u32 = DType::Q5_0.raw();
                const Q5_0X16: u32 = DType::Q5_0X16.raw();
                const Q5_1: u32 = DType::Q5_1.raw();
                const Q8_0: u32 = DType::Q8_0.raw();
                const IQ4_NL: u32 = DType::IQ4_NL.raw();
                // SAFETY: the caller's contract.
                unsafe {
                    match dtype.raw() {
                        Q4_0 => $typed::<R, Q4_0>(w, xs, out),
                        Q4_0X16 => $typed::<R, Q4_0X16>(w, xs, out),
                        Q4_1 => $typed::<R, Q4_1>(w, xs, out),
                        Q5_0 => $typed::<R, Q5_0>(w, xs, out),
                        Q5_0X16 => $typed::<R, Q5_0X16>(w, xs, out),
                        Q5_1 => $typed::<R, Q5_1>(w, xs, out),
                        Q8_0 => $typed::<R, Q8_0>(w, xs, out),
                        IQ4_NL => $typed::<R, IQ4_NL>(w, xs, out),
                        _ => unreachable!("{dtype} is not a q8 kernel type"),
                    }
                }
            }

            /// [`$name`] for the weight type numbered `D`.
            ///
            /// # Safety
            /// As for [`$name`].
            #[target_feature(enable = $features)]
            unsafe fn $typed<const R: usize, const D: u32>(
                w: &[u8],
                xs: &[&Q8Row],
                out: &mut [f32],
            ) {
                let dtype = match DType::from_raw(D) {
                    Some(d) => d,
                    None => unreachable!(),
                };
                // R is a constant so that the per-row sums stay in registers.
                let xs: &[&Q8Row; R] = xs[..R].try_into().expect("R rows");
                let prod = $prod;
                // Signed weight codes (stored + 128 by `codes`).
                let q8 = matches!(dtype, DType::Q8_0 | DType::IQ4_NL);
                let with_min = super::has_min(dtype);
                let bytes_per_block = dtype.block_bytes();
                let offset: i32 = if q8 {
                    $q8_offset
                } else {
                    super::code_offset(dtype)
                };
                let nb = xs[0].d.len();
                // Per row, the four partials of `kiln_blocks::q8_dot`.
                let mut acc = [_mm_setzero_ps(); R];
                let mut b = 0;
                if D == DType::Q4_0X16.raw() && xs.iter().all(|x| super::takes_lanes(dtype, x)) {
                    // SAFETY: the caller's contract; the lanes are filled.
                    b = unsafe { $lanes(w, xs, &mut acc) };
                }
                if D == DType::Q8_0.raw() {
                    // SAFETY: the caller's contract.
                    b = unsafe { $eight(w, xs, &mut acc) };
                }
                let bytes = w.len() / nb.max(1);
                while b + 4 <= nb {
                    crate::kernels::prefetch(w.as_ptr().wrapping_add(b * bytes), 4 * bytes);
                    let mut u = [_mm256_setzero_si256(); 4];
                    let mut bits = [0u16; 4];
                    for j in 0..4 {
                        // SAFETY: blocks b..b+4 are inside `w`.
                        (u[j], bits[j]) = unsafe { codes(dtype, w, b + j) };
                    }
                    // SAFETY: F16C is enabled here.
                    let dw = unsafe { half4(bits) };
                    // Q4_1/Q5_1: the blocks' minimums, once for all rows.
                    let mw = if with_min {
                        let mut mins = [0u16; 4];
                        for (j, m) in mins.iter_mut().enumerate() {
                            // SAFETY: blocks b..b+4 are inside `w`.
                            *m = unsafe { min_at(w, bytes_per_block, b + j) };
                        }
                        // SAFETY: F16C is enabled here.
                        Some(unsafe { half4(mins) })
                    } else {
                        None
                    };
                    for (x, acc) in xs.iter().zip(&mut acc) {
                        let mut p = [_mm256_setzero_si256(); 4];
                        for (j, pj) in p.iter_mut().enumerate() {
                            let at = (b + j) * QK;
                            // SAFETY: blocks b..b+4 are inside `x.qs`.
                            let xv = unsafe { _mm256_loadu_si256(x.qs.as_ptr().add(at).cast()) };
                            *pj = prod(u[j], xv, q8);
                        }
                        // SAFETY: four code sums, scales and (for a type
                        // with minimums) Q8_1 sums from b are inside x; the
                        // features are enabled here.
                        *acc = unsafe {
                            let sums = _mm_loadu_si128(x.sums.as_ptr().add(b).cast());
                            let dx = _mm_loadu_ps(x.d.as_ptr().add(b));
                            let sx = match mw {
                                Some(_) => _mm_loadu_ps(x.s.as_ptr().add(b)),
                                None => _mm_setzero_ps(),
                            };
                            add_terms(*acc, &p, offset, dw, mw, sums, dx, sx)
                        };
                    }
                    b += 4;
                }
                for ((x, acc), o) in xs.iter().zip(&acc).zip(out.iter_mut()) {
                    // SAFETY: blocks b.. are inside `w` and `x.qs`.
                    *o = unsafe { with_tail(*acc, dtype, w, x, b, offset, prod) };
                }
            }
        };
    }

    /// Defines `$name`: the whole groups of 16 blocks of a Q4_0X16 row
    /// against `R` activation rows, lane-major ([`Q8Row::lanes`]): one
    /// block a 32-bit lane, 8 blocks a register, so the codes of a group
    /// are four loads and no block needs a horizontal sum. `$acc(s, w, x)`
    /// adds the products of unsigned codes `w` and activations `x` into
    /// the running sums `s`, `$widen(s)` turns those into one i32 sum a
    /// lane. The scaled sums go into `acc` exactly as the four-block loop
    /// of [`dot_avx2`] adds them (lane `j`: the blocks `≡ j (mod 4)`, in
    /// order), so a row gives the bits it gives as Q4_0. Returns the
    /// blocks done.
    macro_rules! x16_lanes {
        ($name:ident, $features:literal, $acc:expr, $widen:expr) => {
            /// # Safety
            /// The features named are enabled by the caller; `w` and every
            /// row hold the same number of blocks, and the rows' lanes are
            /// filled.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $name<const R: usize>(
                w: &[u8],
                xs: &[&Q8Row; R],
                acc: &mut [__m128; R],
            ) -> usize {
                const GROUP: usize = interleave::Q4_0_GROUP_BYTES;
                const CODES: usize = interleave::codes_at(DType::Q4_0X16);
                let groups = xs[0].d.len() / LANE_BLOCKS;
                let m4 = _mm256_set1_epi8(0x0f);
                let (add, widen) = ($acc, $widen);
                for g in 0..groups {
                    // SAFETY: group g's bytes are inside `w`, and its
                    // lanes, sums and scales inside every row (the
                    // caller's contract).
                    unsafe {
                        let p = w.as_ptr().add(g * GROUP);
                        crate::kernels::prefetch(p, GROUP);
                        for h in 0..2 {
                            // Blocks 8h..8h + 8.
                            let mut s = [_mm256_setzero_si256(); R];
                            for k in 0..4 {
                                let v = _mm256_loadu_si256(p.add(CODES + 64 * k + 32 * h).cast());
                                let low = _mm256_and_si256(v, m4);
                                let high = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                                for (s, x) in s.iter_mut().zip(xs) {
                                    let xl = x.lanes.as_ptr().add((g * 8 + k) * 64 + 32 * h);
                                    let xh = xl.add(256);
                                    *s = add(*s, low, _mm256_loadu_si256(xl.cast()));
                                    *s = add(*s, high, _mm256_loadu_si256(xh.cast()));
                                }
                            }
                            let dw = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * h).cast()));
                            for ((s, x), acc) in s.iter().zip(xs).zip(acc.iter_mut()) {
                                let at = g * LANE_BLOCKS + 8 * h;
                                let sums = _mm256_loadu_si256(x.sums.as_ptr().add(at).cast());
                                let sum = _mm256_sub_epi32(widen(*s), _mm256_slli_epi32::<3>(sums));
                                let sum = _mm256_cvtepi32_ps(sum);
                                // d_w·d_x: exact in f32.
                                let scale =
                                    _mm256_mul_ps(dw, _mm256_loadu_ps(x.d.as_ptr().add(at)));
                                // Blocks 8h..8h + 4, then 8h + 4..8h + 8.
                                *acc = _mm_fmadd_ps(
                                    _mm256_castps256_ps128(scale),
                                    _mm256_castps256_ps128(sum),
                                    *acc,
                                );
                                *acc = _mm_fmadd_ps(
                                    _mm256_extractf128_ps::<1>(scale),
                                    _mm256_extractf128_ps::<1>(sum),
                                    *acc,
                                );
                            }
                        }
                    }
                }
                groups * LANE_BLOCKS
            }
        };
    }
    // Eight products of 4-bit codes (at most 2·15·127 a pair) fit an i16.
    x16_lanes!(
        x16_lanes_avx2,
        "avx2,fma,f16c",
        |s, w, x| _mm256_add_epi16(s, _mm256_maddubs_epi16(w, x)),
        |s| _mm256_madd_epi16(s, _mm256_set1_epi16(1))
    );
    x16_lanes!(
        x16_lanes_avxvnni,
        "avx2,fma,f16c,avxvnni",
        |s, w, x| _mm256_dpbusd_avx_epi32(s, w, x),
        |s| s
    );

    /// The paths without an eight-block Q8_0 step: no blocks done.
    ///
    /// # Safety
    /// None; `unsafe` to match [`q8_0_by_eight`].
    #[inline(always)]
    unsafe fn no_eight<const R: usize>(_: &[u8], _: &[&Q8Row; R], _: &mut [__m128; R]) -> usize {
        0
    }

    /// Q8_0 decode's step on AVX-512: eight blocks of `w` against `R`
    /// rows, two blocks a 512-bit `vpdpbusd`, the eight blocks' sums
    /// gathered into one vector by shuffles, where the four-block step
    /// takes three `vphaddd` (three micro-ops each) per four blocks. Each
    /// block's integer sum is the same, and its term goes into partial
    /// `b mod 4` as [`add_terms`] adds it (blocks `b..b + 4` first), so a
    /// row gives the same bits. Returns the blocks done (a multiple of 8).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C are enabled by the caller;
    /// `w` and every row hold the same number of Q8_0 blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    unsafe fn q8_0_by_eight<const R: usize>(
        w: &[u8],
        xs: &[&Q8Row; R],
        acc: &mut [__m128; R],
    ) -> usize {
        const BYTES: usize = Q8_0_BYTES;
        let nb = xs[0].d.len();
        let flip = _mm512_set1_epi8(-128);
        // Lane j of the result: block j, from [b0 b2 b4 b6 | b1 b3 b5 b7].
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut b = 0;
        while b + 8 <= nb {
            // SAFETY: blocks b..b + 8 are inside `w` and every row (the
            // caller's contract); the loads are unaligned ones.
            unsafe {
                let p = w.as_ptr().add(b * BYTES);
                crate::kernels::prefetch(p, 8 * BYTES);
                // Blocks 2i and 2i + 1's codes, + 128 (unsigned).
                let mut u = [_mm512_setzero_si512(); 4];
                for (i, u) in u.iter_mut().enumerate() {
                    let lo = _mm256_loadu_si256(p.add(2 * i * BYTES + 2).cast());
                    let hi = _mm256_loadu_si256(p.add((2 * i + 1) * BYTES + 2).cast());
                    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    *u = _mm512_xor_si512(both, flip);
                }
                let d = |j: usize| p.add(j * BYTES).cast::<i16>().read_unaligned();
                let dw = _mm256_cvtph_ps(_mm_setr_epi16(
                    d(0),
                    d(1),
                    d(2),
                    d(3),
                    d(4),
                    d(5),
                    d(6),
                    d(7),
                ));
                for (x, acc) in xs.iter().zip(acc.iter_mut()) {
                    let xq = x.qs.as_ptr().add(b * QK);
                    let mut s = [_mm512_setzero_si512(); 4];
                    for (i, s) in s.iter_mut().enumerate() {
                        let xv = _mm512_loadu_si512(xq.add(64 * i).cast());
                        *s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[i], xv);
                    }
                    // Per 128-bit lane L of a pair (L = 0, 1: its first
                    // block; 2, 3: its second): two sums a block, then one.
                    let t0 = _mm512_add_epi32(
                        _mm512_unpacklo_epi32(s[0], s[1]),
                        _mm512_unpackhi_epi32(s[0], s[1]),
                    );
                    let t1 = _mm512_add_epi32(
                        _mm512_unpacklo_epi32(s[2], s[3]),
                        _mm512_unpackhi_epi32(s[2], s[3]),
                    );
                    // Lane L: blocks (0, 2, 4, 6) for L < 2, (1, 3, 5, 7)
                    // for L ≥ 2, one part of each.
                    let t = _mm512_add_epi32(
                        _mm512_unpacklo_epi64(t0, t1),
                        _mm512_unpackhi_epi64(t0, t1),
                    );
                    let (l01, l23) = (_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64::<1>(t));
                    let even_odd = _mm256_add_epi32(
                        _mm256_permute2x128_si256::<0x20>(l01, l23),
                        _mm256_permute2x128_si256::<0x31>(l01, l23),
                    );
                    let sums = _mm256_permutevar8x32_epi32(even_odd, order);
                    // The weights' offset of 128: 128 times the
                    // activations' code sums.
                    let xsum = _mm256_loadu_si256(x.sums.as_ptr().add(b).cast());
                    let v =
                        _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, _mm256_slli_epi32::<7>(xsum)));
                    // d_w·d_x: exact in f32.
                    let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d.as_ptr().add(b)));
                    let a = _mm_fmadd_ps(
                        _mm256_castps256_ps128(scale),
                        _mm256_castps256_ps128(v),
                        *acc,
                    );
                    *acc = _mm_fmadd_ps(
                        _mm256_extractf128_ps::<1>(scale),
                        _mm256_extractf128_ps::<1>(v),
                        a,
                    );
                }
            }
            b += 8;
        }
        b
    }

    /// Four f16 values (their bits) as f32.
    ///
    /// # Safety
    /// F16C is enabled by the caller.
    #[inline(always)]
    unsafe fn half4(bits: [u16; 4]) -> __m128 {
        // SAFETY: register operations only (the caller's F16C).
        unsafe {
            _mm_cvtph_ps(_mm_set_epi16(
                0,
                0,
                0,
                0,
                bits[3] as i16,
                bits[2] as i16,
                bits[1] as i16,
                bits[0] as i16,
            ))
        }
    }

    /// Four blocks' terms of [`kiln_blocks::q8_dot`] added to their
    /// partials `acc` (lane `j`: block `j`) as [`kiln_blocks::q8_add`]
    /// adds each: `p` holds the blocks' products (eight i32 sums each),
    /// `dw` the weights' scales and `mw` their minimums (Q4_1, Q5_1),
    /// `sums`, `dx` and `sx` the activations' code sums, scales and
    /// Q8_1 sums (`sx` read only with minimums). The decode kernels'
    /// steps and [`with_tail`]'s last one share it, so they add alike.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are enabled by the caller.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn add_terms(
        acc: __m128,
        p: &[__m256i; 4],
        offset: i32,
        dw: __m128,
        mw: Option<__m128>,
        sums: __m128i,
        dx: __m128,
        sx: __m128,
    ) -> __m128 {
        // SAFETY: register operations only (the caller's features).
        unsafe {
            let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            let s = _mm_cvtepi32_ps(_mm_sub_epi32(
                s,
                _mm_mullo_epi32(sums, _mm_set1_epi32(offset)),
            ));
            // d_w·d_x: exact in f32.
            let scale = _mm_mul_ps(dw, dx);
            match mw {
                // Each block's fma(d, sum, m·s), then the sum.
                Some(m) => _mm_add_ps(acc, _mm_fmadd_ps(scale, s, _mm_mul_ps(m, sx))),
                None => _mm_fmadd_ps(scale, s, acc),
            }
        }
    }

    /// A row's result from its four partials `acc` of
    /// [`kiln_blocks::q8_dot`] (blocks `..from`, `from` a multiple of
    /// four) and the blocks `from..` left after the kernel's steps: up to
    /// four at a time in the partials' lanes, the last group's missing
    /// lanes kept as they are (one block at a time, through the stack,
    /// these had taken 4 of 10 parts of a decode product at SmolLM2's 18
    /// blocks a row).
    ///
    /// # Safety
    /// AVX2, FMA, F16C and whatever `prod` uses are enabled by the
    /// caller; `w` and `x` hold the same number of blocks.
    #[inline(always)]
    unsafe fn with_tail(
        acc: __m128,
        dtype: DType,
        w: &[u8],
        x: &Q8Row,
        from: usize,
        offset: i32,
        prod: impl Fn(__m256i, __m256i, bool) -> __m256i,
    ) -> f32 {
        debug_assert!(from.is_multiple_of(4));
        let nb = x.d.len();
        let mut acc = acc;
        let mut b = from;
        while b < nb {
            let n = (nb - b).min(4);
            // SAFETY: the caller's contract; blocks b..b + n are inside
            // both.
            acc = unsafe { partial_group(acc, dtype, w, x, b, n, offset, &prod) };
            b += n;
        }
        let mut partials = [0f32; 4];
        // SAFETY: four f32s into an array of four (SSE is baseline).
        unsafe { _mm_storeu_ps(partials.as_mut_ptr(), acc) };
        kiln_blocks::q8_sum(partials)
    }

    /// Blocks `b..b + n` (`n` ≤ 4) of `w` against `x`, each block's
    /// term of [`kiln_blocks::q8_dot`] added to its partial (lane `j`
    /// for block `b + j`) as [`kiln_blocks::q8_add`] adds it; the lanes
    /// from `n` on unchanged.
    ///
    /// # Safety
    /// As [`with_tail`], for blocks `b..b + n`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn partial_group(
        acc: __m128,
        dtype: DType,
        w: &[u8],
        x: &Q8Row,
        b: usize,
        n: usize,
        offset: i32,
        prod: impl Fn(__m256i, __m256i, bool) -> __m256i,
    ) -> __m128 {
        let q8 = matches!(dtype, DType::Q8_0 | DType::IQ4_NL);
        let with_min = super::has_min(dtype);
        // SAFETY: AVX is enabled by the caller.
        let mut p = [unsafe { _mm256_setzero_si256() }; 4];
        let (mut bits, mut mins) = ([0u16; 4], [0u16; 4]);
        let (mut sums, mut dx, mut sx) = ([0i32; 4], [0f32; 4], [0f32; 4]);
        for j in 0..n {
            // SAFETY: block b + j is inside `w` and `x` (the caller's).
            unsafe {
                let (u, d) = codes(dtype, w, b + j);
                let xv = _mm256_loadu_si256(x.qs.as_ptr().add((b + j) * QK).cast());
                p[j] = prod(u, xv, q8);
                bits[j] = d;
                if with_min {
                    mins[j] = min_at(w, dtype.block_bytes(), b + j);
                    sx[j] = x.s[b + j];
                }
            }
            sums[j] = x.sums[b + j];
            dx[j] = x.d[b + j];
        }
        // SAFETY: register operations and loads of the arrays above (the
        // caller's features).
        unsafe {
            let mw = if with_min { Some(half4(mins)) } else { None };
            let added = add_terms(
                acc,
                &p,
                offset,
                half4(bits),
                mw,
                _mm_loadu_si128(sums.as_ptr().cast()),
                _mm_loadu_ps(dx.as_ptr()),
                _mm_loadu_ps(sx.as_ptr()),
            );
            let kept = _mm_cmplt_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32(n as i32));
            _mm_blendv_ps(acc, added, _mm_castsi128_ps(kept))
        }
    }

    /// Where one 4-byte field of each of 16 consecutive blocks lies in
    /// the windows [`dot_lanes`] loads: window `w` is 128 bytes from
    /// [`window_start`]; `idx[w]` picks lane `i`'s two 16-bit words from
    /// it for the lanes `mask[w]` marks (two bits a lane).
    pub struct Gather {
        idx: [[u16; 32]; MAX_WINDOWS],
        mask: [u32; MAX_WINDOWS],
    }

    /// Windows for the widest block (Q5_0, 22 bytes: five blocks each).
    const MAX_WINDOWS: usize = 4;

    /// Window `w`'s first byte for 16 blocks of `s` bytes: whole blocks,
    /// `128 / s` a window, the last window ending at the last block's end
    /// (so no load leaves the 16 blocks).
    const fn window_start(s: usize, w: usize) -> usize {
        let at = w * (128 / s) * s;
        let last = LANE_BLOCKS * s - 128;
        if at < last { at } else { last }
    }

    /// The gather of the 4 bytes at `off` in each of 16 blocks of `s` bytes.
    const fn gather_table(s: usize, off: usize) -> Gather {
        let mut t = Gather {
            idx: [[0; 32]; MAX_WINDOWS],
            mask: [0; MAX_WINDOWS],
        };
        let mut i = 0;
        while i < LANE_BLOCKS {
            let w = i / (128 / s);
            let word = (s * i + off - window_start(s, w)) / 2;
            assert!(off.is_multiple_of(2) && s.is_multiple_of(2) && word < 63 && w < MAX_WINDOWS);
            t.idx[w][2 * i] = word as u16;
            t.idx[w][2 * i + 1] = word as u16 + 1;
            t.mask[w] |= 3 << (2 * i);
            i += 1;
        }
        t
    }

    /// Q4_0: the scale, then the four steps of codes.
    static Q4_0_FIELDS: [Gather; 5] = [
        gather_table(Q4_0_BYTES, 0),
        gather_table(Q4_0_BYTES, 2),
        gather_table(Q4_0_BYTES, 6),
        gather_table(Q4_0_BYTES, 10),
        gather_table(Q4_0_BYTES, 14),
    ];
    /// Q5_0: the scale, the fifth bits, then the four steps of codes.
    static Q5_0_FIELDS: [Gather; 6] = [
        gather_table(Q5_0_BYTES, 0),
        gather_table(Q5_0_BYTES, 2),
        gather_table(Q5_0_BYTES, 6),
        gather_table(Q5_0_BYTES, 10),
        gather_table(Q5_0_BYTES, 14),
        gather_table(Q5_0_BYTES, 18),
    ];

    /// Lane `i` of the result: the 4 bytes `t` locates in block `i`.
    ///
    /// # Safety
    /// AVX-512 F/BW are enabled by the caller.
    #[inline(always)]
    unsafe fn gather<const W: usize>(win: &[[__m512i; 2]; W], t: &Gather) -> __m512i {
        // SAFETY: each index row holds 32 u16s; AVX-512 BW (the caller's).
        unsafe {
            let mut v = _mm512_permutex2var_epi16(
                win[0][0],
                _mm512_loadu_si512(t.idx[0].as_ptr().cast()),
                win[0][1],
            );
            // Indexed, not zipped: the zipped form was not unrolled (Q5_0
            // decode lost a quarter of its speed).
            #[allow(clippy::needless_range_loop)]
            for w in 1..W {
                let p = _mm512_permutex2var_epi16(
                    win[w][0],
                    _mm512_loadu_si512(t.idx[w].as_ptr().cast()),
                    win[w][1],
                );
                v = _mm512_mask_mov_epi16(v, t.mask[w], p);
            }
            v
        }
    }

    /// Q5_0's fifth bits for 4 codes a lane: byte `b` of lane `i` is 0x10
    /// when bit `shift + b` of lane `i`'s `qh` is set.
    ///
    /// # Safety
    /// AVX-512 F/BW are enabled by the caller.
    #[inline(always)]
    unsafe fn fifth_bits(qh: __m512i, shift: i32) -> __m512i {
        // SAFETY: register operations only (the caller's features).
        unsafe {
            let t = _mm512_srl_epi32(qh, _mm_cvtsi32_si128(shift));
            // Each lane's low byte into all four of its bytes; byte b keeps bit b.
            let t = _mm512_shuffle_epi8(
                t,
                _mm512_set4_epi32(0x0c0c_0c0c, 0x0808_0808, 0x0404_0404, 0),
            );
            let set = _mm512_test_epi8_mask(t, _mm512_set1_epi32(0x0804_0201));
            _mm512_maskz_mov_epi8(set, _mm512_set1_epi8(0x10))
        }
    }

    /// Q4_0 or Q5_0 (`Q5`) weight row against `R` activation rows, for
    /// decode: each of 16 consecutive blocks gets its own lane of a
    /// 512-bit register (their fields gathered from the row with word
    /// permutes, the activations already lane-major in [`Q8Row::lanes`]),
    /// so 8 `vpdpbusd` finish 16 blocks' integer sums with no horizontal
    /// reduction; one conversion and product per 16 blocks scale them,
    /// and four FMAs of 4 lanes add them to the row's partials of
    /// [`kiln_blocks::q8_dot`], blocks in order.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI, FMA and F16C; `w` and every row
    /// of `xs` hold the same number of blocks, at least 16, and the rows'
    /// lanes are filled; `xs.len() >= R == out.len()`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn dot_lanes<const R: usize, const Q5: bool>(
        w: &[u8],
        xs: &[&Q8Row],
        out: &mut [f32],
    ) {
        let xs: &[&Q8Row; R] = xs[..R].try_into().expect("R rows");
        let (dtype, s) = if Q5 {
            (DType::Q5_0, Q5_0_BYTES)
        } else {
            (DType::Q4_0, Q4_0_BYTES)
        };
        let nb = xs[0].d.len();
        let groups = nb / LANE_BLOCKS;
        let mut acc = [_mm_setzero_ps(); R];
        for g in 0..groups {
            // SAFETY: group g's blocks are inside `w`; the lanes and sums
            // of group g are inside every row (the caller's contract).
            unsafe {
                let p = w.as_ptr().add(g * LANE_BLOCKS * s);
                crate::kernels::prefetch(p, LANE_BLOCKS * s);
                if Q5 {
                    group::<R, 4, true>(p, &Q5_0_FIELDS, xs, g, &mut acc)
                } else {
                    group::<R, 3, false>(p, &Q4_0_FIELDS, xs, g, &mut acc)
                }
            }
        }
        // SAFETY: the caller's contract.
        unsafe { finish(dtype, w, xs, &acc, out) };
    }

    /// Each row's result: its partials, with the blocks after the last
    /// whole group of 16 (plain `dtype` blocks, as in any row) added.
    ///
    /// # Safety
    /// As [`dot_lanes`]; `dtype` is Q4_0 or Q5_0.
    #[inline(always)]
    unsafe fn finish<const R: usize>(
        dtype: DType,
        w: &[u8],
        xs: &[&Q8Row; R],
        acc: &[__m128; R],
        out: &mut [f32],
    ) {
        let nb = xs[0].d.len();
        let offset = super::code_offset(dtype);
        // SAFETY: the caller's contract (features, blocks inside `w`, `x`).
        unsafe {
            let prod = |u, xv, _q8: bool| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, xv);
            for ((x, acc), o) in xs.iter().zip(acc).zip(out.iter_mut()) {
                *o = with_tail(
                    *acc,
                    dtype,
                    w,
                    x,
                    nb / LANE_BLOCKS * LANE_BLOCKS,
                    offset,
                    prod,
                );
            }
        }
    }

    /// Each row's integer sums for group `g` start from −offset·Σx (the
    /// codes are unsigned: offset 8 or 16, `1 << shift`).
    ///
    /// # Safety
    /// AVX-512 F is enabled by the caller; group `g` is inside every row.
    #[inline(always)]
    unsafe fn offset_sums<const R: usize>(xs: &[&Q8Row; R], g: usize, shift: i32) -> [__m512i; R] {
        // SAFETY: the caller's contract.
        unsafe {
            let mut lo = [_mm512_setzero_si512(); R];
            for (lo, x) in lo.iter_mut().zip(xs) {
                let sums = _mm512_loadu_si512(x.sums.as_ptr().add(g * LANE_BLOCKS).cast());
                *lo = _mm512_sub_epi32(
                    _mm512_setzero_si512(),
                    _mm512_sll_epi32(sums, _mm_cvtsi32_si128(shift)),
                );
            }
            lo
        }
    }

    /// One group of 16 blocks for [`dot_lanes`], in `W` windows.
    ///
    /// # Safety
    /// As [`dot_lanes`]; `p` is the group's first byte.
    #[inline(always)]
    unsafe fn group<const R: usize, const W: usize, const Q5: bool>(
        p: *const u8,
        fields: &[Gather],
        xs: &[&Q8Row; R],
        g: usize,
        acc: &mut [__m128; R],
    ) {
        let s = if Q5 { Q5_0_BYTES } else { Q4_0_BYTES };
        // SAFETY: every window lies inside the group's 16 blocks
        // (`window_start`); the caller's contract covers the rest.
        unsafe {
            let mut win = [[_mm512_setzero_si512(); 2]; W];
            for (w, pair) in win.iter_mut().enumerate() {
                let at = p.add(window_start(s, w));
                *pair = [
                    _mm512_loadu_si512(at.cast()),
                    _mm512_loadu_si512(at.add(64).cast()),
                ];
            }
            let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(gather(&win, &fields[0])));
            let (qh, first_code, shift) = if Q5 {
                (gather(&win, &fields[1]), 2, 4)
            } else {
                (_mm512_setzero_si512(), 1, 3)
            };
            let mut lo = offset_sums(xs, g, shift);
            let mut hi = [_mm512_setzero_si512(); R];
            let m4 = _mm512_set1_epi8(0x0f);
            for k in 0..4 {
                let v = gather(&win, &fields[first_code + k]);
                let mut low = _mm512_and_si512(v, m4);
                let mut high = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                if Q5 {
                    low = _mm512_or_si512(low, fifth_bits(qh, 4 * k as i32));
                    high = _mm512_or_si512(high, fifth_bits(qh, 16 + 4 * k as i32));
                }
                for r in 0..R {
                    let xl = xs[r].lanes.as_ptr().add((g * 8 + k) * 64);
                    lo[r] = _mm512_dpbusd_epi32(lo[r], low, _mm512_loadu_si512(xl.cast()));
                    hi[r] =
                        _mm512_dpbusd_epi32(hi[r], high, _mm512_loadu_si512(xl.add(256).cast()));
                }
            }
            for ((acc, x), (lo, hi)) in acc.iter_mut().zip(xs).zip(lo.iter().zip(&hi)) {
                scale_group(acc, x, g, dw, _mm512_add_epi32(*lo, *hi));
            }
        }
    }

    /// [`dot_lanes`] for Q5_0X16 (`Q5`) and Q4_0X16 rows
    /// ([`kiln_plugin_api::interleave`]): the same lanes, sums and
    /// order, so the same bits as Q5_0 and Q4_0 (a test holds them to
    /// it), with each field of a group loaded whole (scales, the codes'
    /// four vectors) or as a mask register (fifth bits) instead of
    /// gathered with word permutes: about a third of the instructions per
    /// group.
    ///
    /// # Safety
    /// As [`dot_lanes`], for a Q5_0X16 or Q4_0X16 row.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn dot_lanes_x16<const R: usize, const Q5: bool>(
        w: &[u8],
        xs: &[&Q8Row],
        out: &mut [f32],
    ) {
        let layout = if Q5 { DType::Q5_0X16 } else { DType::Q4_0X16 };
        let group = interleave::group_bytes(layout);
        let xs: &[&Q8Row; R] = xs[..R].try_into().expect("R rows");
        let nb = xs[0].d.len();
        let groups = nb / LANE_BLOCKS;
        let mut acc = [_mm_setzero_ps(); R];
        for g in 0..groups {
            // SAFETY: group g's bytes are inside `w`; the lanes, sums
            // and scales of group g are inside every row (the caller's
            // contract).
            unsafe {
                let p = w.as_ptr().add(g * group);
                crate::kernels::prefetch(p, group);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
                let mut lo = offset_sums(xs, g, if Q5 { 4 } else { 3 });
                let mut hi = [_mm512_setzero_si512(); R];
                for k in 0..4 {
                    let (low, high) = x16_codes::<Q5>(p, k);
                    for r in 0..R {
                        let xl = xs[r].lanes.as_ptr().add((g * 8 + k) * 64);
                        lo[r] = _mm512_dpbusd_epi32(lo[r], low, _mm512_loadu_si512(xl.cast()));
                        hi[r] = _mm512_dpbusd_epi32(
                            hi[r],
                            high,
                            _mm512_loadu_si512(xl.add(256).cast()),
                        );
                    }
                }
                for ((acc, x), (lo, hi)) in acc.iter_mut().zip(xs).zip(lo.iter().zip(&hi)) {
                    scale_group(acc, x, g, dw, _mm512_add_epi32(*lo, *hi));
                }
            }
        }
        // SAFETY: the caller's contract; the row's tail blocks are plain
        // blocks at their usual place.
        unsafe { finish(interleave::plain(layout), w, xs, &acc, out) };
    }

    /// Adds a group's 16 integer block sums (lane `i`: block `i`), scaled
    /// by `dw · dx` (exact in f32), to a row's four partials of
    /// [`kiln_blocks::q8_dot`]: blocks 0..4, then 4..8, 8..12, 12..16.
    ///
    /// # Safety
    /// AVX-512 F is enabled by the caller; group `g` is inside `x`.
    #[inline(always)]
    unsafe fn scale_group(acc: &mut __m128, x: &Q8Row, g: usize, dw: __m512, sum: __m512i) {
        // SAFETY: the caller's contract.
        unsafe {
            let dx = _mm512_loadu_ps(x.d.as_ptr().add(g * LANE_BLOCKS));
            let scale = _mm512_mul_ps(dw, dx);
            let sum = _mm512_cvtepi32_ps(sum);
            *acc = _mm_fmadd_ps(
                _mm512_castps512_ps128(scale),
                _mm512_castps512_ps128(sum),
                *acc,
            );
            *acc = _mm_fmadd_ps(
                _mm512_extractf32x4_ps::<1>(scale),
                _mm512_extractf32x4_ps::<1>(sum),
                *acc,
            );
            *acc = _mm_fmadd_ps(
                _mm512_extractf32x4_ps::<2>(scale),
                _mm512_extractf32x4_ps::<2>(sum),
                *acc,
            );
            *acc = _mm_fmadd_ps(
                _mm512_extractf32x4_ps::<3>(scale),
                _mm512_extractf32x4_ps::<3>(sum),
                *acc,
            );
        }
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
        out: &mut crate::kernels::Tile,
    ) {
        let nb = xs[0].d.len();
        // Codes of block b: 8 groups of 4 codes; group j of row n at
        // ((b * 8 + j) * 16 + n) * 4. Missing rows are written as zeros.
        let with_min = super::has_min(dtype);
        scratch.size(nb * 8 * GEMM_GROUP * 4, nb * GEMM_GROUP, with_min);
        let bytes = ws[0].len() / nb;
        let (codes_p, dw_p) = (scratch.codes.as_mut_ptr(), scratch.dw.as_mut_ptr());
        let dm_p = scratch.dm.as_mut_ptr();
        // Q5_0X16, Q4_0X16: whole groups of 16 blocks at once, the rest
        // per block.
        let first = if interleave::is_interleaved(dtype) {
            for g in 0..nb / LANE_BLOCKS {
                // SAFETY: group g is inside every row and the scratch.
                unsafe {
                    if dtype == DType::Q5_0X16 {
                        x16_group::<true>(ws, g, codes_p, dw_p)
                    } else {
                        x16_group::<false>(ws, g, codes_p, dw_p)
                    }
                };
            }
            nb / LANE_BLOCKS * LANE_BLOCKS
        } else {
            0
        };
        for b in first..nb {
            // Block b of the 16 rows (missing rows: zero codes, zero
            // scales), then a 16 × 8 transpose of their 4-code groups.
            let mut u = [_mm256_setzero_si256(); GEMM_GROUP];
            let mut bits = [0u16; GEMM_GROUP];
            let mut mins = [0u16; GEMM_GROUP];
            for (n, w) in ws.iter().enumerate() {
                // Each row is its own stream: ask for its next lines early.
                crate::kernels::prefetch(w.as_ptr().wrapping_add(b * bytes), bytes);
                // SAFETY: block b is inside `w` (checked by the caller).
                (u[n], bits[n]) = unsafe { codes(dtype, w, b) };
                if with_min {
                    // SAFETY: as above.
                    mins[n] = unsafe { min_at(w, bytes, b) };
                }
            }
            // SAFETY: `bits` holds 16 f16s; block b's 8 groups and 16
            // scales (and minimums) are inside the scratch.
            unsafe {
                crate::kernels::lanes::store_transposed(codes_p, b * 8, &u);
                crate::kernels::lanes::store_scales_ps(dw_p, b, &bits);
                if with_min {
                    crate::kernels::lanes::store_scales_ps(dm_p, b, &mins);
                }
            }
        }
        let ahead = &mut crate::kernels::AskAhead::new(ws, xs.len().div_ceil(4));
        // SAFETY: the scratch holds nb blocks for 16 rows; the caller's
        // contract covers the activation rows.
        unsafe {
            in_groups_of_four!(xs.len(), m0 => gemm_rows(scratch, &xs[m0..], nb, m0, out); ahead)
        };
    }

    /// Vector `k` of the Q5_0X16 (`Q5`) or Q4_0X16 group at `p`: codes
    /// `4k..4k + 4` and `16 + 4k..20 + 4k` of each of its 16 blocks, one
    /// block a lane, as unsigned bytes (the nibbles, plus 16 under the
    /// group's fifth-bit masks).
    ///
    /// # Safety
    /// The group is readable at `p`; AVX-512 F/BW are enabled by the
    /// caller.
    #[inline(always)]
    unsafe fn x16_codes<const Q5: bool>(p: *const u8, k: usize) -> (__m512i, __m512i) {
        // SAFETY: inside the group (the caller's contract); register
        // operations otherwise.
        unsafe {
            let m4 = _mm512_set1_epi8(0x0f);
            let fifth = _mm512_set1_epi8(0x10);
            let layout = if Q5 { DType::Q5_0X16 } else { DType::Q4_0X16 };
            let v = _mm512_loadu_si512(p.add(interleave::codes_at(layout) + 64 * k).cast());
            let low = _mm512_and_si512(v, m4);
            let high = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
            if !Q5 {
                return (low, high);
            }
            let masks = p.add(32).cast::<u64>();
            (
                _mm512_mask_add_epi8(low, masks.add(2 * k).read_unaligned(), low, fifth),
                _mm512_mask_add_epi8(high, masks.add(2 * k + 1).read_unaligned(), high, fifth),
            )
        }
    }

    /// Group `g` (blocks `16g..16g + 16`) of up to 16 Q5_0X16 (`Q5`) or
    /// Q4_0X16 weight rows into [`gemm16_vnni`]'s scratch: each row's four
    /// code vectors give eight registers whose lane `i` holds 4 codes of
    /// block `i` (nibbles plus any fifth bits, as [`dot_lanes_x16`] makes them);
    /// a 16 × 16 transpose per register turns them into the scratch's
    /// lane `n` = row `n`. About a quarter of the work of unpacking block
    /// by block.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and F16C; group `g` is inside every
    /// row of `ws` (at most 16) and the scratch holds its blocks.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
    unsafe fn x16_group<const Q5: bool>(ws: &[&[u8]], g: usize, codes_p: *mut u8, dw_p: *mut f32) {
        let group = interleave::group_bytes(if Q5 { DType::Q5_0X16 } else { DType::Q4_0X16 });
        // r[j][n]: codes 4j..4j + 4 (j < 4: low nibbles of vector j; else
        // high nibbles of vector j - 4) of row n, block i in lane i.
        let mut r = [[_mm512_setzero_si512(); GEMM_GROUP]; 8];
        let mut bits = [[0u16; GEMM_GROUP]; LANE_BLOCKS];
        for (n, w) in ws.iter().enumerate() {
            // SAFETY: the group's bytes are inside the row.
            unsafe {
                let p = w.as_ptr().add(g * group);
                crate::kernels::prefetch(p, group);
                for k in 0..4 {
                    (r[k][n], r[4 + k][n]) = x16_codes::<Q5>(p, k);
                }
                for (i, b) in bits.iter_mut().enumerate() {
                    b[n] = p.add(2 * i).cast::<u16>().read_unaligned();
                }
            }
        }
        for (j, r) in r.iter_mut().enumerate() {
            // SAFETY: the features are this function's.
            unsafe { transpose_16x16(r) };
            for (i, v) in r.iter().enumerate() {
                let b = g * LANE_BLOCKS + i;
                // SAFETY: block b's group j is inside the scratch.
                unsafe {
                    _mm512_storeu_si512(codes_p.add((b * 8 + j) * GEMM_GROUP * 4).cast(), *v)
                };
            }
        }
        for (i, bits) in bits.iter().enumerate() {
            let b = g * LANE_BLOCKS + i;
            // SAFETY: block b's 16 scales are inside the scratch.
            unsafe {
                crate::kernels::lanes::store_scales_ps(dw_p, b, bits);
            }
        }
    }

    /// Transposes 16 registers of 16 dwords in place (lane `c` of
    /// register `r` to lane `r` of register `c`): off-diagonal blocks of
    /// 8, 4, 2 and 1 lanes swapped in turn, two permutes per pair.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose_16x16(r: &mut [__m512i; 16]) {
        /// Lane l of the first of a pair takes its own lane l when l is
        /// in the lower d of its 2d-chunk, else the second's lane l - d;
        /// the second takes the first's lane l + d, or its own lane l.
        const fn idx(d: usize, second: bool) -> [i32; 16] {
            let mut t = [0i32; 16];
            let mut l = 0;
            while l < 16 {
                let low_half = l % (2 * d) < d;
                t[l] = match (second, low_half) {
                    (false, true) => l,
                    (false, false) => 16 + l - d,
                    (true, true) => l + d,
                    (true, false) => 16 + l,
                } as i32;
                l += 1;
            }
            t
        }
        static IDX: [[[i32; 16]; 2]; 4] = [
            [idx(8, false), idx(8, true)],
            [idx(4, false), idx(4, true)],
            [idx(2, false), idx(2, true)],
            [idx(1, false), idx(1, true)],
        ];
        for (s, d) in [8usize, 4, 2, 1].into_iter().enumerate() {
            // SAFETY: 16 i32s each.
            let (lo, hi) = unsafe {
                (
                    _mm512_loadu_si512(IDX[s][0].as_ptr().cast()),
                    _mm512_loadu_si512(IDX[s][1].as_ptr().cast()),
                )
            };
            for a in 0..16 {
                if a % (2 * d) < d {
                    let (x, y) = (r[a], r[a + d]);
                    r[a] = _mm512_permutex2var_epi32(x, lo, y);
                    r[a + d] = _mm512_permutex2var_epi32(x, hi, y);
                }
            }
        }
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
        m0: usize,
        out: &mut crate::kernels::Tile,
    ) {
        let xs: &[&Q8Row; R] = xs[..R].try_into().expect("R rows");
        (0..R).for_each(|r| out.prefetch(m0 + r, 0));
        let codes_p = scratch.codes.as_ptr();
        let dw_p = scratch.dw.as_ptr();
        // Q4_1/Q5_1: the blocks' minimums, and the rows' Q8_1 sums.
        let with_min = !scratch.dm.is_empty();
        let dm_p = scratch.dm.as_ptr();
        // The rows' arrays as plain pointers, read once (not per block).
        let mut qs = [std::ptr::null::<i8>(); R];
        let mut offs = [std::ptr::null::<i32>(); R];
        let mut dxs = [std::ptr::null::<f32>(); R];
        let mut ss = [std::ptr::null::<f32>(); R];
        for (r, x) in xs.iter().enumerate() {
            assert!(x.qs.len() >= nb * QK && x.offset_sums.len() >= nb && x.d.len() >= nb);
            assert!(!with_min || x.s.len() >= nb);
            (qs[r], offs[r], dxs[r]) = (x.qs.as_ptr(), x.offset_sums.as_ptr(), x.d.as_ptr());
            ss[r] = x.s.as_ptr();
        }
        // Block `$b` into `$acc`, its partial of `kiln_blocks::q8_dot` for
        // every activation row (16 weight rows a register), for
        // `in_four_partials!`.
        macro_rules! block {
            ($b:expr, $acc:ident) => {{
                let b = $b;
                let mut sum = [_mm512_setzero_si512(); R];
                for (s, o) in sum.iter_mut().zip(&offs) {
                    // SAFETY: block b's offset sum is inside the row (asserted).
                    *s = _mm512_set1_epi32(unsafe { *o.add(b) });
                }
                for j in 0..8 {
                    // SAFETY: group j of block b is inside the scratch.
                    let wj = unsafe { _mm512_loadu_si512(codes_p.add((b * 8 + j) * 64).cast()) };
                    for (s, q) in sum.iter_mut().zip(&qs) {
                        // SAFETY: codes 4j..4j+4 of block b are inside the row.
                        let xv = unsafe { q.add(b * QK + 4 * j).cast::<i32>().read_unaligned() };
                        *s = _mm512_dpbusd_epi32(*s, wj, _mm512_set1_epi32(xv));
                    }
                }
                // SAFETY: the 16 scales of block b are inside the scratch.
                let dw = unsafe { _mm512_loadu_ps(dw_p.add(b * GEMM_GROUP)) };
                for (r, dxp) in dxs.iter().enumerate() {
                    // d_w·d_x: exact in f32.
                    // SAFETY: block b's scale is inside the row (asserted).
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(unsafe { *dxp.add(b) }));
                    let sum = _mm512_cvtepi32_ps(sum[r]);
                    $acc[r] = if with_min {
                        // Each block's fma(d, sum, m·s), then the sum (as
                        // the reference and the row kernels add them).
                        // SAFETY: block b's minimums and Q8_1 sum are
                        // inside the scratch and the row (asserted).
                        let (m, sx) = unsafe {
                            (
                                _mm512_loadu_ps(dm_p.add(b * GEMM_GROUP)),
                                _mm512_set1_ps(*ss[r].add(b)),
                            )
                        };
                        let term = _mm512_fmadd_ps(scale, sum, _mm512_mul_ps(m, sx));
                        _mm512_add_ps($acc[r], term)
                    } else {
                        _mm512_fmadd_ps(scale, sum, $acc[r])
                    };
                }
            }};
        }
        let [mut a0, mut a1, mut a2, mut a3] = [[_mm512_setzero_ps(); R]; 4];
        in_four_partials!(nb, block, [a0, a1, a2, a3]);
        let total: [__m512; R] = std::array::from_fn(|r| {
            _mm512_add_ps(_mm512_add_ps(a0[r], a2[r]), _mm512_add_ps(a1[r], a3[r]))
        });
        // SAFETY: AVX-512 F is enabled here.
        unsafe { crate::kernels::lanes::emit_ps(&total, m0, out) };
    }

    /// [`super::gemm16`] on AVX2: the 16 weight rows as two halves of 8,
    /// lane `n` of a 256-bit register holding 4 codes of row `n` (an 8 × 8
    /// transpose of each block's 32-bit groups, once per call); per
    /// activation row, each group of 4 codes broadcast against the 8 rows
    /// (`vpmaddubsw`, then `vpmaddwd` by ones), so a block's 8 sums land
    /// in 8 lanes with no horizontal reduction. Q8_0 and IQ4_NL codes are
    /// kept signed and multiplied by the sign trick (`vpmaddubsw` of the
    /// offset codes would saturate); the others are offset-corrected from
    /// the rows' `offset_sums`. With `VNNI` (AVX-VNNI, which the caller
    /// checked) one `vpdpbusd` takes a group straight to i32 sums, every
    /// type's codes unsigned and offset-corrected ([`gemm8_vnni`]). Scaled
    /// into four partials per activation row as the AVX-512 GEMM does, so
    /// the bits are the same.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; every row of `ws` holds as many
    /// blocks of `dtype` as every row of `xs`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm16_avx2<const VNNI: bool>(
        dtype: DType,
        ws: &[&[u8]],
        xs: &[&Q8Row],
        scratch: &mut GemmScratch,
        out: &mut crate::kernels::Tile,
    ) {
        const HALF: usize = GEMM_GROUP / 2;
        let nb = xs[0].d.len();
        let halves = ws.len().div_ceil(HALF);
        // Codes of half h, block b: 8 vectors of 32 bytes; vector j holds
        // group j (codes 4j..4j+4) of the half's rows, one a lane.
        let with_min = super::has_min(dtype);
        scratch.size(halves * nb * 8 * 32, halves * nb * HALF, with_min);
        let signed = matches!(dtype, DType::Q8_0 | DType::IQ4_NL);
        let bytes = ws[0].len() / nb;
        let (codes_p, dw_p, dm_p) = (
            scratch.codes.as_mut_ptr(),
            scratch.dw.as_mut_ptr(),
            scratch.dm.as_mut_ptr(),
        );
        for (h, half) in ws.chunks(HALF).enumerate() {
            for b in 0..nb {
                let mut u = [_mm256_setzero_si256(); HALF];
                let mut bits = [0u16; HALF];
                let mut mins = [0u16; HALF];
                for (n, w) in half.iter().enumerate() {
                    crate::kernels::prefetch(w.as_ptr().wrapping_add(b * bytes), bytes);
                    // SAFETY: block b is inside `w` (the caller's contract).
                    (u[n], bits[n]) = unsafe { codes(dtype, w, b) };
                    if signed && !VNNI {
                        u[n] = _mm256_xor_si256(u[n], _mm256_set1_epi8(-128));
                    }
                    if with_min {
                        // SAFETY: as above.
                        mins[n] = unsafe { min_at(w, bytes, b) };
                    }
                }
                let t = crate::kernels::lanes::transpose_8x8(&u);
                let at = h * nb + b;
                // SAFETY: block b of half h is inside the scratch.
                unsafe {
                    for (j, v) in t.iter().enumerate() {
                        _mm256_storeu_si256(codes_p.add((at * 8 + j) * 32).cast(), *v);
                    }
                    crate::kernels::lanes::store_scales8(dw_p, at, &bits);
                    if with_min {
                        crate::kernels::lanes::store_scales8(dm_p, at, &mins);
                    }
                }
            }
        }
        let ahead = &mut crate::kernels::AskAhead::new(ws, halves * xs.len().div_ceil(4));
        // SAFETY: the scratch holds nb blocks of every half; the caller's
        // contract covers the activation rows.
        unsafe {
            if VNNI {
                in_each_half!(ws.len(), xs => gemm8_vnni(scratch, nb, out); ahead)
            } else if signed {
                in_each_half!(ws.len(), xs => gemm8_signed(scratch, nb, out); ahead)
            } else if matches!(dtype, DType::Q4_0 | DType::Q4_0X16 | DType::Q4_1) {
                in_each_half!(ws.len(), xs => gemm8_nibbles(scratch, nb, out); ahead)
            } else {
                in_each_half!(ws.len(), xs => gemm8_five_bits(scratch, nb, out); ahead)
            }
        };
    }

    gemm_kinds! {
        GemmScratch, Q8Row;
        /// Signed codes (Q8_0, IQ4_NL) by the sign trick, one group at a
        /// time (two products of up to 128·127 fill an i16).
        gemm8_signed: "avx2,fma,f16c" => gemm8_rows::<1, false, false>(fold_signed, scale_i16);
        /// 4-bit codes (Q4_0, Q4_1): eight groups' products fit an i16.
        gemm8_nibbles: "avx2,fma,f16c" => gemm8_rows::<8, true, false>(fold_i16, scale_i16);
        /// 5-bit codes (Q5_0, Q5_1): four groups fit.
        gemm8_five_bits: "avx2,fma,f16c" => gemm8_rows::<4, true, false>(fold_i16, scale_i16);
        /// AVX-VNNI: every type's codes unsigned (signed ones stay + 128;
        /// `vpdpbusd` does not saturate), a block's 8 groups straight to
        /// i32 sums.
        gemm8_vnni: "avx2,fma,f16c,avxvnni" => gemm8_rows::<8, true, true>(dpbusd, sum_i32);
    }

    /// `R` activation rows against half `h` (8 weight rows, zeros past
    /// the real ones) of the unpacked weights: per block, runs of `FOLD`
    /// groups' products summed by `step` and added to the block's i32
    /// sums by `scale` (with ones for scales), or (`DIRECT`: `step`
    /// accumulates i32s, as `vpdpbusd` does) summed into them; the sums
    /// start from the rows' offset sums where the codes are `OFFSET`
    /// (stored unsigned).
    ///
    /// # Safety
    /// As [`gemm16_avx2`]; `xs` has at least `R` rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm8_rows<
        const R: usize,
        const FOLD: usize,
        const OFFSET: bool,
        const DIRECT: bool,
    >(
        scratch: &GemmScratch,
        xs: &[&Q8Row],
        nb: usize,
        h: usize,
        m0: usize,
        out: &mut crate::kernels::Tile,
        step: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
        scale: impl Fn(__m256i, __m256i, __m256i, __m256i) -> __m256i,
    ) {
        const HALF: usize = GEMM_GROUP / 2;
        let xs: &[&Q8Row; R] = xs[..R].try_into().expect("R rows");
        let p = Rows8::new(scratch, xs, nb);
        (0..R).for_each(|r| out.prefetch(m0 + r, h * HALF));
        let (ones, zero) = (_mm256_set1_epi16(1), _mm256_setzero_si256());
        // The four partials of `kiln_blocks::q8_dot` (block b into partial
        // b mod 4), per activation row, 8 weight rows a register.
        // Block `$b` into `$acc`, its partial of `kiln_blocks::q8_dot` for
        // every activation row, for `in_four_partials!`.
        macro_rules! block {
            ($b:expr, $acc:ident) => {{
                let b = $b;
                let at = h * nb + b;
                let mut sum = [zero; R];
                if OFFSET {
                    for (s, o) in sum.iter_mut().zip(&p.offs) {
                        // SAFETY: block b's offset sum is inside the row (asserted).
                        *s = _mm256_set1_epi32(unsafe { *o.add(b) });
                    }
                }
                for j0 in (0..8).step_by(FOLD) {
                    let mut run = if DIRECT { sum } else { [zero; R] };
                    for j in j0..j0 + FOLD {
                        let wj = p.codes.wrapping_add((at * 8 + j) * 32);
                        // SAFETY: group j of block b of half h is inside the
                        // scratch.
                        let wj = unsafe { _mm256_loadu_si256(wj.cast()) };
                        for (r, q) in run.iter_mut().zip(&p.qs) {
                            // SAFETY: codes 4j..4j+4 of block b are inside the
                            // row.
                            let xv = _mm256_set1_epi32(unsafe {
                                q.add(b * QK + 4 * j).cast::<i32>().read_unaligned()
                            });
                            *r = step(*r, wj, xv);
                        }
                    }
                    if DIRECT {
                        sum = run;
                    } else {
                        for (s, r) in sum.iter_mut().zip(run) {
                            *s = scale(*s, r, zero, ones);
                        }
                    }
                }
                // SAFETY: block b of half h is inside the scratch and the rows.
                unsafe { p.scale(&mut $acc, &sum, at, b) };
            }};
        }
        let [mut a0, mut a1, mut a2, mut a3] = [[_mm256_setzero_ps(); R]; 4];
        in_four_partials!(nb, block, [a0, a1, a2, a3]);
        let total: [__m256; R] = std::array::from_fn(|r| {
            _mm256_add_ps(_mm256_add_ps(a0[r], a2[r]), _mm256_add_ps(a1[r], a3[r]))
        });
        crate::kernels::lanes::emit8_ps(&total, h * HALF, m0, out);
    }

    /// What [`gemm8_rows`] reads: the unpacked half's
    /// codes, scales and minimums, and per activation row its codes,
    /// offset sums, scales and Q8_1 sums.
    struct Rows8<const R: usize> {
        codes: *const u8,
        dw: *const f32,
        dm: Option<*const f32>,
        qs: [*const i8; R],
        offs: [*const i32; R],
        dxs: [*const f32; R],
        ss: [*const f32; R],
    }

    impl<const R: usize> Rows8<R> {
        fn new(scratch: &GemmScratch, xs: &[&Q8Row; R], nb: usize) -> Self {
            let with_min = !scratch.dm.is_empty();
            let mut p = Rows8 {
                codes: scratch.codes.as_ptr(),
                dw: scratch.dw.as_ptr(),
                dm: with_min.then_some(scratch.dm.as_ptr()),
                qs: [std::ptr::null(); R],
                offs: [std::ptr::null(); R],
                dxs: [std::ptr::null(); R],
                ss: [std::ptr::null(); R],
            };
            for (r, x) in xs.iter().enumerate() {
                assert!(x.qs.len() >= nb * QK && x.offset_sums.len() >= nb && x.d.len() >= nb);
                assert!(!with_min || x.s.len() >= nb);
                (p.qs[r], p.offs[r], p.dxs[r]) =
                    (x.qs.as_ptr(), x.offset_sums.as_ptr(), x.d.as_ptr());
                p.ss[r] = x.s.as_ptr();
            }
            p
        }

        /// Adds block `b`'s integer sums `sum` (8 weight rows a register,
        /// one register per activation row), scaled, to `acc`, the
        /// block's partial of [`kiln_blocks::q8_dot`] for each row:
        /// `fma(d, sum, acc)`, or `acc + fma(d, sum, m·s)` with minimums.
        ///
        /// # Safety
        /// Block `b` is inside every row, and scratch block `at` inside
        /// the scratch.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn scale(&self, acc: &mut [__m256; R], sum: &[__m256i; R], at: usize, b: usize) {
            const HALF: usize = GEMM_GROUP / 2;
            // SAFETY: the 8 scales of block `at` are inside the scratch.
            let dw = unsafe { _mm256_loadu_ps(self.dw.add(at * HALF)) };
            for (r, dxp) in self.dxs.iter().enumerate() {
                // d_w·d_x: exact in f32.
                // SAFETY: block b's scale is inside the row.
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(unsafe { *dxp.add(b) }));
                let s = _mm256_cvtepi32_ps(sum[r]);
                acc[r] = if let Some(dm) = self.dm {
                    // SAFETY: block at's minimums and block b's Q8_1 sum
                    // are inside the scratch and the row.
                    let (m, sx) = unsafe {
                        (
                            _mm256_loadu_ps(dm.add(at * HALF)),
                            _mm256_set1_ps(*self.ss[r].add(b)),
                        )
                    };
                    _mm256_add_ps(acc[r], _mm256_fmadd_ps(scale, s, _mm256_mul_ps(m, sx)))
                } else {
                    _mm256_fmadd_ps(scale, s, acc[r])
                };
            }
        }
    }

    // AVX2 multiplies u8 by i8 into saturating i16 pairs: fine for Q4_0's
    // and Q5_0's codes (at most 2·31·128), not for Q8_0's code + 128, which takes the sign trick
    // (|w| times x with w's sign) and so needs no offset.
    dot_q8!(
        dot_avx2,
        dot_avx2_typed,
        x16_lanes_avx2,
        no_eight,
        "avx2,fma,f16c",
        0,
        |u, xv, q8: bool| {
            let (a, b) = if q8 {
                let w = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
                (_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w))
            } else {
                (u, xv)
            };
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
        }
    );
    dot_q8!(
        dot_avxvnni,
        dot_avxvnni_typed,
        x16_lanes_avxvnni,
        no_eight,
        "avx2,fma,f16c,avxvnni",
        128,
        |u, xv, _q8: bool| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, xv)
    );
    dot_q8!(
        dot_vnni,
        dot_vnni_typed,
        x16_lanes_avx2,
        q8_0_by_eight,
        "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni",
        128,
        |u, xv, _q8: bool| _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, xv)
    );
}
