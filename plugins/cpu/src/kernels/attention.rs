//! Fused attention ([`OpKind::Attention`](kiln_plugin_api::OpKind)): the
//! keys and values of a KV head are converted to f32 a tile of
//! [`TILE`] positions at a time, and each query row keeps a running
//! maximum, sum and weighted sum of values (an online softmax), so no
//! query × position matrix is ever stored, and tiles that every query
//! of a unit masks (the causal future, positions out of a sliding
//! window) are never read.
//!
//! Work is split in units of (KV head, heads of its group, queries):
//! one unit converts each tile once for all of its rows. Decoding has
//! one query, so its units are split by head instead where the KV heads
//! alone would leave threads idle.
//!
//! Q is rounded as the reference rounds it (to f16 for an F16 K);
//! sums are f32 in lanes, so the results differ from the reference (f64)
//! by rounding only (tested).

use super::Isa;
use super::threads::{self, threads};
use crate::ops::View;
use crate::scratch::{self, Row};
use kiln_plugin_api::DType;

/// Positions per tile.
const TILE: usize = 32;

/// Queries per unit at most (prompt batches).
const QUERIES: usize = 16;

/// Converts one contiguous K or V row (`head_dim` elements) to f32.
type RowLoad = fn(&[u8], &mut [f32]);

fn load_generic(dtype: DType) -> RowLoad {
    match dtype {
        DType::F32 => |src, dst| {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        },
        DType::F16 => |src, dst| kiln_blocks::dequantize_row(DType::F16, src, dst),
        DType::Q8_0 => |src, dst| kiln_blocks::dequantize_row(DType::Q8_0, src, dst),
        _ => |src, dst| kiln_blocks::dequantize_row(DType::Q4_0, src, dst),
    }
}

fn loader(isa: Isa, dtype: DType) -> RowLoad {
    #[cfg(target_arch = "x86_64")]
    if dtype == DType::F16 && isa >= Isa::Avx2 {
        return |src, dst| {
            assert!(Isa::detect() >= Isa::Avx2);
            // SAFETY: the CPU has F16C (part of the AVX2 path's features).
            unsafe { x86::f16_row(src, dst) }
        };
    }
    let _ = isa;
    load_generic(dtype)
}

/// e^x in f32 for x ≤ 0 (a score minus the running maximum): 2^k · p(r)
/// with a degree-6 polynomial on |r| ≤ ln 2 / 2 (relative error about
/// 2e-7); below −87 it is 0. Branch-free, so loops over it vectorize.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Rounds to the nearest integer (1.5 · 2^23 pushes the fraction out).
    const ROUND: f32 = 12_582_912.0;
    let y = x.max(-87.0);
    let k = (y * LOG2E + ROUND) - ROUND;
    let r = y - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { p * scale }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (a16.remainder(), b16.remainder());
    for (x, y) in a16.zip(b16) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    for (i, (x, y)) in ra.iter().zip(rb).enumerate() {
        lanes[i] += x * y;
    }
    let mut half = [0f32; 8];
    for i in 0..8 {
        half[i] = lanes[i] + lanes[i + 8];
    }
    (half[0] + half[4]) + (half[1] + half[5]) + ((half[2] + half[6]) + (half[3] + half[7]))
}

/// One unit's rows: `heads` (of KV head `g`) × `queries`.
struct Unit {
    g: usize,
    heads: std::ops::Range<usize>,
    queries: std::ops::Range<usize>,
    /// The positions it covers (tile-aligned), and, when the positions
    /// are split between units, which part this is: its rows' running
    /// state then goes to the partials, merged after every unit ran.
    positions: std::ops::Range<usize>,
    part: Option<usize>,
}

/// Positions per part at least, when a short batch's positions are split.
const PART: usize = 8 * TILE;

/// The op's operands, shared with the pool's threads.
#[derive(Clone, Copy)]
struct Operands {
    q: View,
    k: View,
    v: View,
    mask: Option<View>,
    dst: View,
    scale: f32,
    load_k: RowLoad,
    load_v: RowLoad,
    /// Per part, head and query: maximum, sum and `head_dim` sums, for
    /// units with a `part` (null otherwise).
    partials: *mut f32,
}

// SAFETY: the views point at memory the op's caller keeps alive and
// unchanged (sources) or that the threads write in disjoint rows (dst).
unsafe impl Send for Operands {}
// SAFETY: as above.
unsafe impl Sync for Operands {}

/// Runs the op. `None` for layouts this kernel does not take (the caller
/// runs the reference): Q, the mask and dst need contiguous f32 rows.
///
/// # Safety
/// As for [`crate::ops::run`], after [`crate::ops::check`] accepted the op.
pub unsafe fn run(isa: Isa, src: &[View], dst: &View, scale: f32) -> Option<()> {
    let (q, k, v, mask) = (src[0], src[1], src[2], src.get(3).copied());
    let dense_f32 = |t: &View| t.desc.nb[0] == 4;
    if !dense_f32(&q) || !dense_f32(dst) || !mask.as_ref().is_none_or(dense_f32) {
        return None;
    }
    let [hd, n_q, n_head, _] = q.desc.ne;
    let (n_kv, n_head_kv) = (k.desc.ne[1], k.desc.ne[2]);
    let group = n_head / n_head_kv;
    // Units: per KV head, its whole group and up to QUERIES queries. A
    // short batch (decoding) that would leave threads idle has its
    // positions split in parts instead, each unit a KV head's group over
    // one part (flash-decoding), merged after; or, with too few positions
    // to split, one head per unit.
    let all = 0..n_kv;
    let idle = n_head_kv * n_q.div_ceil(QUERIES) < 2 * threads();
    let n_parts = if idle && n_q <= QUERIES {
        (2 * threads()).div_ceil(n_head_kv).min(n_kv / PART).max(1)
    } else {
        1
    };
    let per_head = idle && n_parts == 1;
    // Kept from op to op on this thread (taken for the op): a decode
    // step's attention allocates nothing.
    let mut units = UNITS.with(|u| u.take());
    units.clear();
    let part_len = n_kv.div_ceil(n_parts).div_ceil(TILE) * TILE;
    for g in 0..n_head_kv {
        for q0 in (0..n_q).step_by(QUERIES) {
            let queries = q0..(q0 + QUERIES).min(n_q);
            if n_parts > 1 {
                for p in 0..n_parts {
                    units.push(Unit {
                        g,
                        heads: g * group..(g + 1) * group,
                        queries: queries.clone(),
                        positions: p * part_len..((p + 1) * part_len).min(n_kv),
                        part: Some(p),
                    });
                }
            } else if per_head {
                for h in g * group..(g + 1) * group {
                    units.push(Unit {
                        g,
                        heads: h..h + 1,
                        queries: queries.clone(),
                        positions: all.clone(),
                        part: None,
                    });
                }
            } else {
                units.push(Unit {
                    g,
                    heads: g * group..(g + 1) * group,
                    queries,
                    positions: all.clone(),
                    part: None,
                });
            }
        }
    }
    let stride = hd + 2;
    let mut partials = scratch::f32s(if n_parts > 1 {
        n_parts * n_head * n_q * stride
    } else {
        0
    });
    let ops = Operands {
        q,
        k,
        v,
        mask,
        dst: *dst,
        scale,
        load_k: loader(isa, k.desc.dtype),
        load_v: loader(isa, v.desc.dtype),
        partials: partials.as_mut_ptr(),
    };
    let work = 2 * hd * n_kv * n_q * n_head;
    threads::parallel_for(units.len(), work, &|range| {
        let mut scratch = Scratch::new(hd, group.min(n_head) * QUERIES);
        for unit in &units[range] {
            // SAFETY: the caller's contract; each unit writes its own rows.
            unsafe { run_unit(isa, &ops, unit, &mut scratch) };
        }
    });
    if n_parts > 1 {
        // Each row's parts, rescaled to the largest maximum and summed.
        let mut out = scratch::f32s(hd);
        for h in 0..n_head {
            for qi in 0..n_q {
                let at = |p: usize| &partials[((p * n_head + h) * n_q + qi) * stride..][..stride];
                let max = (0..n_parts)
                    .map(|p| at(p)[0])
                    .fold(f32::NEG_INFINITY, f32::max);
                out.fill(0.0);
                if max > f32::NEG_INFINITY {
                    let mut sum = 0f32;
                    for p in 0..n_parts {
                        let part = at(p);
                        if part[0] == f32::NEG_INFINITY {
                            continue;
                        }
                        let c = exp_neg(part[0] - max);
                        sum += c * part[1];
                        for (o, a) in out.iter_mut().zip(&part[2..]) {
                            *o += c * a;
                        }
                    }
                    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                    out.iter_mut().for_each(|o| *o *= inv);
                }
                // SAFETY: row (qi, h) of dst is inside it, rows dense f32.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        out.as_ptr().cast::<u8>(),
                        dst.data.add(qi * dst.desc.nb[1] + h * dst.desc.nb[2]),
                        4 * hd,
                    )
                };
            }
        }
    }
    UNITS.with(|u| *u.borrow_mut() = units);
    Some(())
}

thread_local! {
    static UNITS: std::cell::RefCell<Vec<Unit>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread's work space: a tile of keys and values as f32, and each
/// row's query, scores and running state; rows kept by the thread
/// ([`scratch`]).
struct Scratch {
    keys: Row<f32>,
    values: Row<f32>,
    queries: Row<f32>,
    acc: Row<f32>,
    /// Per row: running maximum and sum.
    max: Row<f32>,
    sum: Row<f32>,
    /// Per query of the unit: the first and last position its mask lets through.
    seen: [(usize, usize); QUERIES],
    scores: [f32; TILE],
    /// The blocked path's scores (then weights) of a block of rows, and
    /// the factor each row's state is rescaled by.
    block: [[f32; TILE]; BLOCK],
    rescale: [f32; BLOCK],
}

/// Rows per block of the blocked path at most: the rows of a unit's
/// work space are rounded up to it (the extra rows are computed and
/// never read).
const BLOCK: usize = 8;

impl Scratch {
    fn new(hd: usize, rows: usize) -> Scratch {
        let rows = rows.next_multiple_of(BLOCK);
        Scratch {
            keys: scratch::f32s(TILE * hd),
            values: scratch::f32s(TILE * hd),
            queries: scratch::f32s(rows * hd),
            acc: scratch::f32s(rows * hd),
            max: scratch::f32s(rows),
            sum: scratch::f32s(rows),
            seen: [(0, 0); QUERIES],
            scores: [0.0; TILE],
            block: [[0.0; TILE]; BLOCK],
            rescale: [1.0; BLOCK],
        }
    }
}

/// # Safety
/// As for [`run`]; the CPU has `isa`.
unsafe fn run_unit(isa: Isa, ops: &Operands, unit: &Unit, s: &mut Scratch) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the caller's contract; the CPU has the features.
        Isa::Avx512 => return unsafe { x86::unit_avx512(ops, unit, s) },
        // SAFETY: as above.
        Isa::Avx2 | Isa::AvxVnni => return unsafe { x86::unit_avx2(ops, unit, s) },
        _ => {}
    }
    let _ = isa;
    // SAFETY: the caller's contract.
    unsafe { unit_body(ops, unit, s) }
}

/// Reads `len` f32 at `p` (unaligned).
///
/// # Safety
/// `p` is valid for `4 * len` bytes.
#[inline(always)]
unsafe fn read_f32s(p: *const u8, out: &mut [f32]) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().cast::<u8>(), 4 * out.len()) }
}

/// One unit in portable loops (CPUs without AVX2, and head sizes that
/// are not whole vectors).
///
/// # Safety
/// As for [`run`].
#[inline(always)]
unsafe fn unit_body(ops: &Operands, unit: &Unit, s: &mut Scratch) {
    // SAFETY: the caller's contract.
    let Some((first, last)) = (unsafe { begin(ops, unit, s) }) else {
        // SAFETY: as above.
        return unsafe { finish(ops, unit, s) };
    };
    // SAFETY: as above.
    unsafe {
        rowwise(ops, unit, s, first, last);
        finish(ops, unit, s);
    }
}

/// A unit's start: which positions each of its queries sees
/// (`s.seen`), its rows' queries (rounded as the reference rounds them)
/// and running state. Returns the span of positions any query sees,
/// `None` if none sees any.
///
/// # Safety
/// As for [`run`].
#[inline(always)]
unsafe fn begin(ops: &Operands, unit: &Unit, s: &mut Scratch) -> Option<(usize, usize)> {
    let hd = ops.q.desc.ne[0];
    let n_kv = ops.k.desc.ne[1];
    let nq = unit.queries.len();
    let rows = unit.heads.len() * nq;
    // Which positions each query sees: the span of its mask's finite
    // entries (a query that sees none gives zeros).
    let mut first = n_kv;
    let mut last = 0;
    for (i, qi) in unit.queries.clone().enumerate() {
        s.seen[i] = match &ops.mask {
            None => (0, n_kv),
            Some(m) => {
                // SAFETY: row qi of the mask is inside it (checked shapes).
                let row = unsafe {
                    std::slice::from_raw_parts(m.data.add(qi * m.desc.nb[1]).cast_const(), 4 * n_kv)
                };
                let finite = |j: &usize| {
                    f32::from_le_bytes(row[4 * j..4 * j + 4].try_into().unwrap())
                        != f32::NEG_INFINITY
                };
                match (0..n_kv).find(finite) {
                    Some(a) => (a, (0..n_kv).rev().find(finite).unwrap() + 1),
                    None => (0, 0),
                }
            }
        };
        // Only this unit's positions.
        let (a, b) = s.seen[i];
        s.seen[i] = (a.max(unit.positions.start), b.min(unit.positions.end));
        if s.seen[i].0 < s.seen[i].1 {
            first = first.min(s.seen[i].0);
            last = last.max(s.seen[i].1);
        }
    }
    // Row r = (head index within the unit) * nq + query index.
    for (hi, h) in unit.heads.clone().enumerate() {
        for (i, qi) in unit.queries.clone().enumerate() {
            let r = hi * nq + i;
            let q = &ops.q;
            // SAFETY: row (qi, h) of Q is inside it, rows dense f32.
            unsafe {
                read_f32s(
                    q.data.add(qi * q.desc.nb[1] + h * q.desc.nb[2]),
                    &mut s.queries[r * hd..][..hd],
                )
            };
            if ops.k.desc.dtype == DType::F16 {
                kiln_blocks::round_activations(DType::F16, &mut s.queries[r * hd..][..hd]);
            }
        }
    }
    // The rows a blocked path pads with too (queries of zeros).
    let padded = rows.next_multiple_of(BLOCK);
    s.queries[rows * hd..padded * hd].fill(0.0);
    s.max[..padded].fill(f32::NEG_INFINITY);
    s.sum[..padded].fill(0.0);
    s.acc[..padded * hd].fill(0.0);
    (first < last).then_some((first, last))
}

/// Converts positions `j0..j0 + nt` of the unit's KV head to f32 rows of
/// `s.keys` and `s.values`.
///
/// # Safety
/// As for [`run`]; those positions are inside K and V.
#[inline(always)]
unsafe fn load_tile(ops: &Operands, g: usize, j0: usize, nt: usize, s: &mut Scratch) {
    let hd = ops.q.desc.ne[0];
    let (k, v) = (&ops.k, &ops.v);
    let (k_row, v_row) = (
        k.desc.dtype.row_bytes(hd).expect("checked"),
        v.desc.dtype.row_bytes(hd).expect("checked"),
    );
    for jj in 0..nt {
        let j = j0 + jj;
        // SAFETY: position j of KV head g is inside K and V.
        unsafe {
            let kp = k.data.add(j * k.desc.nb[1] + g * k.desc.nb[2]);
            (ops.load_k)(
                std::slice::from_raw_parts(kp, k_row),
                &mut s.keys[jj * hd..][..hd],
            );
            let vp = v.data.add(j * v.desc.nb[1] + g * v.desc.nb[2]);
            (ops.load_v)(
                std::slice::from_raw_parts(vp, v_row),
                &mut s.values[jj * hd..][..hd],
            );
        }
    }
}

/// The tiles `first..last` of a unit one row at a time, in portable
/// loops: each row's scores, softmax and weighted sum of values.
///
/// # Safety
/// As for [`run`].
#[inline(always)]
unsafe fn rowwise(ops: &Operands, unit: &Unit, s: &mut Scratch, first: usize, last: usize) {
    let hd = ops.q.desc.ne[0];
    let n_kv = ops.k.desc.ne[1];
    let nq = unit.queries.len();
    let mut j0 = first - first % TILE;
    while j0 < last {
        let nt = TILE.min(n_kv - j0);
        // SAFETY: the caller's contract; j0 + nt <= n_kv.
        unsafe { load_tile(ops, unit.g, j0, nt, s) };
        for i in 0..nq {
            let (a, b) = s.seen[i];
            if b <= j0 || a >= j0 + nt {
                continue;
            }
            let qi = unit.queries.start + i;
            // This query's mask over the tile: f32s, maybe unaligned.
            let mask_row = ops.mask.as_ref().map(|m| {
                // SAFETY: row qi, positions j0..j0 + nt, inside the mask.
                unsafe { m.data.add(qi * m.desc.nb[1] + 4 * j0).cast_const() }
            });
            for hi in 0..unit.heads.len() {
                let r = hi * nq + i;
                let query = &s.queries[r * hd..][..hd];
                let mut tile_max = f32::NEG_INFINITY;
                for jj in 0..nt {
                    let m = match mask_row {
                        // SAFETY: jj < nt; unaligned f32 reads.
                        Some(p) => unsafe { p.add(4 * jj).cast::<f32>().read_unaligned() },
                        None => 0.0,
                    };
                    let score = if m == f32::NEG_INFINITY {
                        f32::NEG_INFINITY
                    } else {
                        ops.scale * dot(query, &s.keys[jj * hd..][..hd]) + m
                    };
                    s.scores[jj] = score;
                    tile_max = tile_max.max(score);
                }
                if tile_max == f32::NEG_INFINITY {
                    continue;
                }
                let max = s.max[r].max(tile_max);
                let acc = &mut s.acc[r * hd..][..hd];
                if s.max[r] != max {
                    let c = exp_neg(s.max[r] - max);
                    s.sum[r] *= c;
                    for x in acc.iter_mut() {
                        *x *= c;
                    }
                    s.max[r] = max;
                }
                let mut sum = 0f32;
                for jj in 0..nt {
                    let score = s.scores[jj];
                    let p = if score == f32::NEG_INFINITY {
                        0.0
                    } else {
                        exp_neg(score - max)
                    };
                    s.scores[jj] = p;
                    sum += p;
                }
                s.sum[r] += sum;
                for jj in 0..nt {
                    let p = s.scores[jj];
                    if p != 0.0 {
                        let value = &s.values[jj * hd..][..hd];
                        for (x, y) in acc.iter_mut().zip(value) {
                            *x += p * y;
                        }
                    }
                }
            }
        }
        j0 += TILE;
    }
}

/// Whether a unit has rows enough to go a block of several at a time
/// (prompts); decoding's few rows go one at a time, each block one row.
fn many_rows(unit: &Unit) -> bool {
    unit.heads.len() * unit.queries.len() >= 2 * BLOCK
}

/// A unit with the AVX2 tile loops, a block of `R` rows at a time:
/// `scores` writes a block's `query · key` for the tile's positions
/// (as the row-by-row path sums them, to the bit), `weigh` rescales a block's sums by
/// `s.rescale` and adds the weighted values (`s.block` over `s.values`).
/// Rows that do not see a position get weight 0; the unit's rows are
/// padded to [`BLOCK`].
///
/// # Safety
/// As for [`run`]; the CPU has AVX2 and FMA; `R` divides [`BLOCK`]; the
/// head size is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn blocked<const R: usize>(
    ops: &Operands,
    unit: &Unit,
    s: &mut Scratch,
    scores: impl Fn(&mut Scratch, usize),
    weigh: impl Fn(&mut Scratch, usize, usize),
) {
    // SAFETY: the caller's contract.
    if let Some(span) = unsafe { begin(ops, unit, s) } {
        // SAFETY: as above.
        unsafe { blocked_tiles::<R>(ops, unit, s, span, scores, weigh) };
    }
    // SAFETY: as above.
    unsafe { finish(ops, unit, s) };
}

/// The tiles `first..last` of [`blocked`].
///
/// # Safety
/// As for [`blocked`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn blocked_tiles<const R: usize>(
    ops: &Operands,
    unit: &Unit,
    s: &mut Scratch,
    (first, last): (usize, usize),
    scores: impl Fn(&mut Scratch, usize),
    weigh: impl Fn(&mut Scratch, usize, usize),
) {
    let n_kv = ops.k.desc.ne[1];
    let nq = unit.queries.len();
    let rows = unit.heads.len() * nq;
    let seen = s.seen;
    let mut j0 = first - first % TILE;
    while j0 < last {
        let nt = TILE.min(n_kv - j0);
        // SAFETY: the caller's contract; j0 + nt <= n_kv; hd is whole vectors.
        unsafe { load_tile(ops, unit.g, j0, nt, s) };
        for r0 in (0..rows).step_by(R) {
            let sees = |r: usize| {
                let (a, b) = seen[r % nq];
                r < rows && a < j0 + nt && b > j0
            };
            if !(r0..r0 + R).any(sees) {
                continue;
            }
            scores(s, r0);
            for r in 0..R {
                let row = r0 + r;
                s.rescale[r] = 1.0;
                if !sees(row) {
                    s.block[r] = [0.0; TILE];
                    continue;
                }
                let (a, b) = seen[row % nq];
                let qi = unit.queries.start + row % nq;
                let mask = ops.mask.as_ref().map(|m| {
                    // SAFETY: row qi, positions j0..j0 + nt, inside the mask.
                    unsafe { m.data.add(qi * m.desc.nb[1] + 4 * j0).cast_const() }
                });
                let seen = a.saturating_sub(j0)..(b - j0).min(nt);
                // SAFETY: the CPU has AVX2 and FMA; the mask row has nt f32s.
                let tile_max =
                    unsafe { x86::finish_scores(&mut s.block[r], ops.scale, mask, seen) };
                if tile_max == f32::NEG_INFINITY {
                    s.block[r] = [0.0; TILE];
                    continue;
                }
                let max = s.max[row].max(tile_max);
                let c = exp_neg(s.max[row] - max);
                s.rescale[r] = c;
                // SAFETY: as above.
                let sum = unsafe { x86::exp_in_place(&mut s.block[r], max, nt) };
                s.sum[row] = s.sum[row] * c + sum;
                s.max[row] = max;
            }
            weigh(s, r0, nt);
        }
        j0 += TILE;
    }
}

/// A unit's end: its rows' running state to the partials (a part of the
/// positions), or each row's weighted sum over its sum to dst.
///
/// # Safety
/// As for [`run`].
#[inline(always)]
unsafe fn finish(ops: &Operands, unit: &Unit, s: &mut Scratch) {
    let hd = ops.q.desc.ne[0];
    let nq = unit.queries.len();
    if let Some(p) = unit.part {
        // The running state, for the merge.
        let (n_head, n_q) = (ops.q.desc.ne[2], ops.q.desc.ne[1]);
        for (hi, h) in unit.heads.clone().enumerate() {
            for (i, qi) in unit.queries.clone().enumerate() {
                let r = hi * nq + i;
                // SAFETY: the partials hold every part, head and query;
                // this unit alone writes this part's rows.
                let row = unsafe {
                    std::slice::from_raw_parts_mut(
                        ops.partials.add(((p * n_head + h) * n_q + qi) * (hd + 2)),
                        hd + 2,
                    )
                };
                row[0] = s.max[r];
                row[1] = s.sum[r];
                row[2..].copy_from_slice(&s.acc[r * hd..][..hd]);
            }
        }
        return;
    }
    let dst = &ops.dst;
    let mut out = [0f32; 512];
    for (hi, h) in unit.heads.clone().enumerate() {
        for (i, qi) in unit.queries.clone().enumerate() {
            let r = hi * nq + i;
            let inv = if s.sum[r] > 0.0 { 1.0 / s.sum[r] } else { 0.0 };
            for c0 in (0..hd).step_by(512) {
                let n = 512.min(hd - c0);
                for (o, a) in out[..n].iter_mut().zip(&s.acc[r * hd + c0..][..n]) {
                    *o = a * inv;
                }
                // SAFETY: row (qi, h) of dst is inside it, rows dense f32;
                // this unit alone writes it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        out.as_ptr().cast::<u8>(),
                        dst.data
                            .add(qi * dst.desc.nb[1] + h * dst.desc.nb[2] + 4 * c0),
                        4 * n,
                    )
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Operands, Scratch, TILE, Unit, blocked, many_rows, unit_body};
    use std::arch::x86_64::*;

    /// # Safety
    /// As for `unit_body`; the CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn unit_avx2(ops: &Operands, unit: &Unit, s: &mut Scratch) {
        let hd = ops.q.desc.ne[0];
        // SAFETY: the caller's contract; the CPU has AVX2 and FMA, the
        // blocked paths take whole vectors, and the blocks' rows are
        // inside the padded work space.
        unsafe {
            if !hd.is_multiple_of(8) {
                unit_body(ops, unit, s)
            } else if many_rows(unit) {
                blocked::<2>(
                    ops,
                    unit,
                    s,
                    |s, r0| block_scores::<2, 4>(s, r0, 0, hd),
                    |s, r0, nt| weigh_avx2::<2>(s, r0, 0, nt, hd),
                )
            } else {
                one_row_at_a_time(ops, unit, s)
            }
        }
    }

    /// # Safety
    /// As for `unit_body`; the CPU has AVX-512 F/BW/VL, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub unsafe fn unit_avx512(ops: &Operands, unit: &Unit, s: &mut Scratch) {
        let hd = ops.q.desc.ne[0];
        // SAFETY: as in `unit_avx2`, and the CPU has AVX-512 F/VL: 8 rows
        // a block, their scores 4 at a time in AVX-512's 32 vector
        // registers (256 bits wide: the same sums).
        unsafe {
            if !hd.is_multiple_of(8) {
                unit_body(ops, unit, s)
            } else if many_rows(unit) {
                blocked::<8>(
                    ops,
                    unit,
                    s,
                    |s, r0| {
                        block_scores::<4, 4>(s, r0, 0, hd);
                        block_scores::<4, 4>(s, r0, 4, hd);
                    },
                    |s, r0, nt| {
                        weigh_avx512(s, r0, 0, nt, hd);
                        weigh_avx512(s, r0, 4, nt, hd);
                    },
                )
            } else {
                one_row_at_a_time(ops, unit, s)
            }
        }
    }

    /// A unit of few rows (decoding): blocks of one row, eight keys a
    /// reduction.
    ///
    /// # Safety
    /// As for `blocked`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn one_row_at_a_time(ops: &Operands, unit: &Unit, s: &mut Scratch) {
        let hd = ops.q.desc.ne[0];
        // SAFETY: the caller's contract.
        unsafe {
            blocked::<1>(
                ops,
                unit,
                s,
                |s, r0| block_scores::<1, 8>(s, r0, 0, hd),
                |s, r0, nt| weigh_avx2::<1>(s, r0, 0, nt, hd),
            )
        }
    }

    /// Rows `r0 + h..r0 + h + R` of the block: each row's `query · key`
    /// for the tile's keys into `s.block[h..h + R]`, `KEYS` keys at a time
    /// (`R · KEYS` a multiple of 8), the rows sharing each load of them.
    /// Each key is summed the same way whatever the block (eight lanes
    /// over the head's dimensions, then [`sum_each`]'s tree), so a
    /// prompt's scores have the bits of decode's one-row blocks.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the rows are in `s.queries`; `hd` is a
    /// multiple of 8.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_scores<const R: usize, const KEYS: usize>(
        s: &mut Scratch,
        r0: usize,
        h: usize,
        hd: usize,
    ) {
        assert!(
            8 % KEYS == 0 && (R * KEYS).is_multiple_of(8) && s.queries.len() >= (r0 + h + R) * hd
        );
        assert!(s.keys.len() >= TILE * hd && hd.is_multiple_of(8));
        let (q, k) = (s.queries.as_ptr(), s.keys.as_ptr());
        for j0 in (0..TILE).step_by(KEYS) {
            let mut acc = [[_mm256_setzero_ps(); KEYS]; R];
            for d in (0..hd).step_by(8) {
                // SAFETY: d + 8 <= hd; rows j0..j0 + KEYS of the keys and
                // the block's rows of the queries (asserted).
                unsafe {
                    let keys: [__m256; KEYS] =
                        std::array::from_fn(|j| _mm256_loadu_ps(k.add((j0 + j) * hd + d)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let x = _mm256_loadu_ps(q.add((r0 + h + r) * hd + d));
                        for (a, key) in acc.iter_mut().zip(keys) {
                            *a = _mm256_fmadd_ps(x, key, *a);
                        }
                    }
                }
            }
            // Eight (row, key) sums a reduction, rows in order.
            for c in 0..R * KEYS / 8 {
                let eight: [__m256; 8] = std::array::from_fn(|i| {
                    let at = 8 * c + i;
                    acc[at / KEYS][at % KEYS]
                });
                let mut dots = [0f32; 8];
                // SAFETY: eight f32s.
                unsafe { _mm256_storeu_ps(dots.as_mut_ptr(), sum_each(eight)) };
                for (t, row) in dots.chunks_exact(KEYS).enumerate() {
                    s.block[h + 8 * c / KEYS + t][j0..j0 + KEYS].copy_from_slice(row);
                }
            }
        }
    }

    /// A row of the block to its scores: `scale · dot + mask`, −∞ outside
    /// `seen` (positions in the tile); returns the largest.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `mask`, if any, holds `seen.end` f32s.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn finish_scores(
        row: &mut [f32; TILE],
        scale: f32,
        mask: Option<*const u8>,
        seen: std::ops::Range<usize>,
    ) -> f32 {
        let (lo, hi) = (
            _mm256_set1_epi32(seen.start as i32),
            _mm256_set1_epi32(seen.end as i32),
        );
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut max = ninf;
        for j0 in (0..TILE).step_by(8) {
            // SAFETY: eight f32s of the row; the mask's j0.. inside it up to seen.end.
            unsafe {
                let p = row.as_mut_ptr().add(j0);
                let mut v = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_loadu_ps(p));
                if let Some(m) = mask {
                    let n = seen.end.saturating_sub(j0).min(8);
                    let add = if n == 8 {
                        _mm256_loadu_ps(m.add(4 * j0).cast())
                    } else {
                        let mut part = [0f32; 8];
                        std::ptr::copy_nonoverlapping(
                            m.add(4 * j0),
                            part.as_mut_ptr().cast(),
                            4 * n,
                        );
                        _mm256_loadu_ps(part.as_ptr())
                    };
                    v = _mm256_add_ps(v, add);
                }
                let j = _mm256_add_epi32(
                    _mm256_set1_epi32(j0 as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                );
                // Inside: not before lo, before hi.
                let inside =
                    _mm256_andnot_si256(_mm256_cmpgt_epi32(lo, j), _mm256_cmpgt_epi32(hi, j));
                v = _mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(inside));
                _mm256_storeu_ps(p, v);
                max = _mm256_max_ps(max, v);
            }
        }
        let mut m = [0f32; 8];
        // SAFETY: eight f32s.
        unsafe { _mm256_storeu_ps(m.as_mut_ptr(), max) };
        m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }

    /// Rows `r0 + h..r0 + h + R` of the block: each row's sums times its
    /// `s.rescale`, plus its weights (`s.block`) times the tile's `nt`
    /// values, 32 columns at a time in registers, then 8.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the rows are in `s.acc`; `hd` is a
    /// multiple of 8.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weigh_avx2<const R: usize>(
        s: &mut Scratch,
        r0: usize,
        h: usize,
        nt: usize,
        hd: usize,
    ) {
        assert!(
            s.acc.len() >= (r0 + h + R) * hd && s.values.len() >= nt * hd && hd.is_multiple_of(8)
        );
        let mut c0 = 0;
        while c0 + 32 <= hd {
            // SAFETY: columns c0..c0 + 32 (asserted above).
            unsafe { weigh_columns::<R, 4>(s, r0, h, nt, hd, c0) };
            c0 += 32;
        }
        while c0 < hd {
            // SAFETY: columns c0..c0 + 8.
            unsafe { weigh_columns::<R, 1>(s, r0, h, nt, hd, c0) };
            c0 += 8;
        }
    }

    /// `weigh_columns!(name, vector type, lanes, zero, set1, load, store,
    /// mul, fmadd)` defines `name::<R, W>(s, r0, h, nt, hd, c0)`: rows
    /// `r0 + h..r0 + h + R` of the block on columns `c0..c0 + lanes · W`,
    /// as [`weigh_avx2`] describes, the sums in registers.
    macro_rules! weigh_columns {
        ($name:ident, $v:ty, $lanes:literal, $zero:ident, $set1:ident, $load:ident,
         $store:ident, $mul:ident, $fmadd:ident) => {
            /// See `weigh_columns!`.
            ///
            /// # Safety
            /// As for [`weigh_avx2`]; the caller has the vectors' features;
            /// those columns are inside a row.
            #[inline(always)]
            unsafe fn $name<const R: usize, const W: usize>(
                s: &mut Scratch,
                r0: usize,
                h: usize,
                nt: usize,
                hd: usize,
                c0: usize,
            ) {
                let (acc, v) = (s.acc.as_mut_ptr(), s.values.as_ptr());
                // SAFETY: the caller's contract.
                unsafe {
                    let mut o = [[$zero(); W]; R];
                    for (r, o) in o.iter_mut().enumerate() {
                        let c = $set1(s.rescale[h + r]);
                        for (w, o) in o.iter_mut().enumerate() {
                            *o = $mul(c, $load(acc.add((r0 + h + r) * hd + c0 + $lanes * w)));
                        }
                    }
                    for j in 0..nt {
                        let x: [$v; W] =
                            std::array::from_fn(|w| $load(v.add(j * hd + c0 + $lanes * w)));
                        for (r, o) in o.iter_mut().enumerate() {
                            let p = $set1(s.block[h + r][j]);
                            for (o, x) in o.iter_mut().zip(x) {
                                *o = $fmadd(p, x, *o);
                            }
                        }
                    }
                    for (r, o) in o.iter().enumerate() {
                        for (w, o) in o.iter().enumerate() {
                            $store(acc.add((r0 + h + r) * hd + c0 + $lanes * w), *o);
                        }
                    }
                }
            }
        };
    }
    weigh_columns!(
        weigh_columns,
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_mul_ps,
        _mm256_fmadd_ps
    );
    weigh_columns!(
        weigh_columns512,
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_mul_ps,
        _mm512_fmadd_ps
    );

    /// [`weigh_avx2`] for 4 rows with 512-bit vectors: 64 columns at a
    /// time, then 16, then the AVX2 step for a last 8.
    ///
    /// # Safety
    /// As for [`weigh_avx2`]; the CPU has AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn weigh_avx512(s: &mut Scratch, r0: usize, h: usize, nt: usize, hd: usize) {
        const R: usize = 4;
        assert!(
            s.acc.len() >= (r0 + h + R) * hd && s.values.len() >= nt * hd && hd.is_multiple_of(8)
        );
        let mut c0 = 0;
        while c0 + 64 <= hd {
            // SAFETY: columns c0..c0 + 64 (asserted above).
            unsafe { weigh_columns512::<R, 4>(s, r0, h, nt, hd, c0) };
            c0 += 64;
        }
        while c0 + 16 <= hd {
            // SAFETY: columns c0..c0 + 16.
            unsafe { weigh_columns512::<R, 1>(s, r0, h, nt, hd, c0) };
            c0 += 16;
        }
        if c0 < hd {
            // SAFETY: columns c0..c0 + 8, the last.
            unsafe { weigh_columns::<R, 1>(s, r0, h, nt, hd, c0) };
        }
    }

    /// The eight sums of `a`'s vectors, as one vector.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum_each(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    /// e^x on eight lanes, as [`super::exp_neg`]: 0 below −87.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let set = _mm256_set1_ps;
        let y = _mm256_max_ps(x, set(-87.0));
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(y, set(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(
            k,
            set(1.428_606_8e-6),
            _mm256_fnmadd_ps(k, set(0.693_145_75), y),
        );
        let mut p = set(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, set(c));
        }
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(k),
            _mm256_set1_epi32(127),
        )));
        let e = _mm256_mul_ps(p, scale);
        _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, set(-87.0)), e)
    }

    /// `s[j] = e^(s[j] − max)` over the whole tile (−∞ gives 0); returns
    /// the sum of the first `nt`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(s: &mut [f32; TILE], max: f32, nt: usize) -> f32 {
        let mut sum = _mm256_setzero_ps();
        for j0 in (0..TILE).step_by(8) {
            // SAFETY: eight f32s inside the tile.
            unsafe {
                let p = s.as_mut_ptr().add(j0);
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), _mm256_set1_ps(max)));
                _mm256_storeu_ps(p, e);
                sum = _mm256_add_ps(sum, e);
            }
        }
        debug_assert!(s[nt..].iter().all(|&x| x == 0.0));
        let mut v = [0f32; 8];
        // SAFETY: eight f32s.
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), sum) };
        v.iter().sum()
    }

    /// An f16 row to f32, eight at a time.
    ///
    /// # Safety
    /// The CPU has F16C and AVX.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_row(src: &[u8], dst: &mut [f32]) {
        let n = dst.len().min(src.len() / 2);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: elements i..i + 8 are inside both slices.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = half::f16::from_le_bytes([src[2 * j], src[2 * j + 1]]).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::exp_neg;

    #[test]
    fn exp_neg_is_close_to_exp_down_to_its_floor() {
        let mut x = 0.0f32;
        while x > -90.0 {
            let (want, got) = ((x as f64).exp(), exp_neg(x) as f64);
            if x < -87.0 {
                assert_eq!(got, 0.0, "{x}");
            } else {
                assert!((got - want).abs() <= 1e-6 * want, "{x}: {got} vs {want}");
            }
            x -= 0.0137;
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
    }
}
