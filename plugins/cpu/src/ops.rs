//! The scalar reference of every op: the semantics that `kiln_backend.h`
//! documents, written for clarity, accumulating in f64 (F16, BF16 and F32
//! matmuls in f32 lanes, `kiln_blocks::fused_dot`). Every other
//! backend (and every SIMD kernel that later slots in beside these) is
//! checked against this file.
//!
//! Two halves: [`check`] validates types and shapes without touching memory
//! (it answers `supports_op`), and [`run`] computes over resolved memory.

use crate::{math, scratch};
use half::{bf16, f16};
use kiln_blocks::{can_quantize, dequantize_row, quantize_row, round_activations};
use kiln_plugin_api::types::param_f32;
use kiln_plugin_api::{DType, OpKind};

pub use kiln_plugin_api::Desc;

/// A tensor resolved to memory.
#[derive(Clone, Copy, Debug)]
pub struct View {
    pub data: *mut u8,
    pub desc: Desc,
}

fn need(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(msg()) }
}

/// `what` names the tensor ("src0", "dst", "mask", …); formatted only on failure.
fn need_dtype(kind: OpKind, what: &str, d: &Desc, dtype: DType) -> Result<(), String> {
    need(d.dtype == dtype, || {
        format!("{kind} {what} must be {dtype}, got {}", d.dtype)
    })
}

fn need_same_shape(a: &Desc, b: &Desc) -> Result<(), String> {
    need(a.ne == b.ne, || {
        format!("dst shape {:?} differs from src0 shape {:?}", b.ne, a.ne)
    })
}

fn need_broadcast(
    kind: OpKind,
    what: &str,
    big: &Desc,
    small: &Desc,
    from_dim: usize,
) -> Result<(), String> {
    for d in from_dim..4 {
        if !big.ne[d].is_multiple_of(small.ne[d]) {
            return Err(format!(
                "{kind} {what} extent {:?} does not divide {:?} in dimension {d}",
                small.ne, big.ne
            ));
        }
    }
    Ok(())
}

/// Whether `kind` over these tensors is well-formed; the error says why not.
pub fn check(kind: OpKind, src: &[Desc], dst: &Desc, params: &[i32; 8]) -> Result<(), String> {
    let arity = match kind {
        OpKind::MulMat | OpKind::Add | OpKind::Mul | OpKind::GetRows => 2..=2,
        OpKind::Rope => 2..=3,
        OpKind::SoftMax => 1..=2,
        OpKind::Attention => 3..=4,
        _ => 1..=1,
    };
    need(arity.contains(&src.len()), || {
        format!("{kind} takes {arity:?} sources, got {}", src.len())
    })?;
    for s in src {
        s.validate()?;
    }
    dst.validate()?;
    match kind {
        OpKind::MulMat => {
            let (w, x) = (&src[0], &src[1]);
            need(w.dtype != DType::I32, || {
                "mul_mat weights cannot be i32".into()
            })?;
            need_dtype(kind, "src1", x, DType::F32)?;
            need_dtype(kind, "dst", dst, DType::F32)?;
            need(w.ne[0] == x.ne[0], || {
                format!(
                    "mul_mat inner dimensions differ: {} vs {}",
                    w.ne[0], x.ne[0]
                )
            })?;
            need_broadcast(kind, "src0", x, w, 2)?;
            let want = [w.ne[1], x.ne[1], x.ne[2], x.ne[3]];
            need(dst.ne == want, || {
                format!("mul_mat dst must be {want:?}, got {:?}", dst.ne)
            })
        }
        OpKind::Add | OpKind::Mul => {
            need_dtype(kind, "src0", &src[0], DType::F32)?;
            need_dtype(kind, "src1", &src[1], DType::F32)?;
            need_dtype(kind, "dst", dst, DType::F32)?;
            need_same_shape(&src[0], dst)?;
            need_broadcast(kind, "src1", &src[0], &src[1], 0)
        }
        OpKind::Scale | OpKind::Silu | OpKind::Gelu | OpKind::RmsNorm | OpKind::Norm => {
            need_dtype(kind, "src0", &src[0], DType::F32)?;
            need_dtype(kind, "dst", dst, DType::F32)?;
            need_same_shape(&src[0], dst)?;
            if matches!(kind, OpKind::RmsNorm | OpKind::Norm) {
                let eps = param_f32(params[0]);
                need(eps.is_finite() && eps >= 0.0, || {
                    format!("{kind} eps must be finite and >= 0, got {eps}")
                })?;
            }
            Ok(())
        }
        OpKind::Rope => {
            let (x, pos) = (&src[0], &src[1]);
            need_dtype(kind, "src0", x, DType::F32)?;
            need_dtype(kind, "positions", pos, DType::I32)?;
            need_dtype(kind, "dst", dst, DType::F32)?;
            need_same_shape(x, dst)?;
            need(x.ne[3] == 1, || {
                "rope src0 must be [head_dim, n_head, n_tokens, 1]".into()
            })?;
            need(pos.ne == [x.ne[2], 1, 1, 1], || {
                format!("rope positions must be [{}], got {:?}", x.ne[2], pos.ne)
            })?;
            let n_rot = params[0];
            need(
                n_rot > 0 && n_rot % 2 == 0 && n_rot as usize <= x.ne[0],
                || format!("rope n_rot {n_rot} must be even and in 2..={}", x.ne[0]),
            )?;
            use kiln_plugin_api::abi::{KILN_ROPE_EXT, KILN_ROPE_NEOX, KILN_ROPE_NORMAL};
            let mode = params[1] & !KILN_ROPE_EXT;
            need(mode == KILN_ROPE_NORMAL || mode == KILN_ROPE_NEOX, || {
                format!("unknown rope mode {}", params[1])
            })?;
            let base = param_f32(params[2]);
            need(base.is_finite() && base > 0.0, || {
                format!("rope freq_base must be positive, got {base}")
            })?;
            let scale = param_f32(params[3]);
            need(scale.is_finite() && scale > 0.0, || {
                format!("rope freq_scale must be positive, got {scale}")
            })?;
            if params[1] & KILN_ROPE_EXT != 0 {
                let ext: Vec<f32> = params[4..8].iter().map(|&p| param_f32(p)).collect();
                need(ext.iter().all(|x| x.is_finite()), || {
                    format!("rope YaRN parameters must be finite, got {ext:?}")
                })?;
            }
            if let Some(f) = src.get(2) {
                need_dtype(kind, "frequency factors", f, DType::F32)?;
                need(f.ne == [n_rot as usize / 2, 1, 1, 1], || {
                    format!(
                        "rope frequency factors must be [{}], got {:?}",
                        n_rot / 2,
                        f.ne
                    )
                })?;
            }
            Ok(())
        }
        OpKind::SoftMax => {
            need_dtype(kind, "src0", &src[0], DType::F32)?;
            need_dtype(kind, "dst", dst, DType::F32)?;
            need_same_shape(&src[0], dst)?;
            if let Some(mask) = src.get(1) {
                need_dtype(kind, "mask", mask, DType::F32)?;
                need(mask.ne[0] == src[0].ne[0], || {
                    format!(
                        "soft_max mask rows have {} elements, need {}",
                        mask.ne[0], src[0].ne[0]
                    )
                })?;
                need_broadcast(kind, "mask", &src[0], mask, 1)?;
            }
            Ok(())
        }
        OpKind::GetRows => {
            let (table, idx) = (&src[0], &src[1]);
            need(table.ne[2] == 1 && table.ne[3] == 1, || {
                "get_rows table must be 2-D".into()
            })?;
            need_dtype(kind, "indices", idx, DType::I32)?;
            need(idx.ne[1] == 1 && idx.ne[2] == 1 && idx.ne[3] == 1, || {
                "get_rows indices must be 1-D".into()
            })?;
            need_dtype(kind, "dst", dst, DType::F32)?;
            let want = [table.ne[0], idx.ne[0], 1, 1];
            need(dst.ne == want, || {
                format!("get_rows dst must be {want:?}, got {:?}", dst.ne)
            })
        }
        OpKind::Attention => check_attention(src, dst, params),
        OpKind::Cpy => {
            need_same_shape(&src[0], dst)?;
            need(can_quantize(dst.dtype), || {
                format!("cpy cannot write {}", dst.dtype)
            })
        }
    }
}

/// The types a K or V cache may hold for [`OpKind::Attention`].
pub fn is_kv_type(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::Q8_0 | DType::Q4_0)
}

fn check_attention(src: &[Desc], dst: &Desc, params: &[i32; 8]) -> Result<(), String> {
    let kind = OpKind::Attention;
    let (q, k, v) = (&src[0], &src[1], &src[2]);
    need_dtype(kind, "q", q, DType::F32)?;
    need_dtype(kind, "dst", dst, DType::F32)?;
    for (what, t) in [("k", k), ("v", v)] {
        need(is_kv_type(t.dtype), || {
            format!(
                "attention {what} must be f32, f16, q8_0 or q4_0, got {}",
                t.dtype
            )
        })?;
        need(t.nb[0] == t.dtype.block_bytes(), || {
            format!("attention {what} rows must be contiguous")
        })?;
    }
    let (hd, n_q, n_head) = (q.ne[0], q.ne[1], q.ne[2]);
    need(q.ne[3] == 1 && dst.ne == q.ne, || {
        format!(
            "attention q and dst must be [head_dim, n_q, n_head, 1], got {:?} and {:?}",
            q.ne, dst.ne
        )
    })?;
    need(k.ne == v.ne && k.ne[0] == hd && k.ne[3] == 1, || {
        format!(
            "attention k and v must both be [{hd}, n_kv, n_head_kv, 1], got {:?} and {:?}",
            k.ne, v.ne
        )
    })?;
    need(n_head.is_multiple_of(k.ne[2]), || {
        format!(
            "attention n_head {n_head} is not a multiple of n_head_kv {}",
            k.ne[2]
        )
    })?;
    if let Some(mask) = src.get(3) {
        need_dtype(kind, "mask", mask, DType::F32)?;
        need(mask.ne == [k.ne[1], n_q, 1, 1], || {
            format!(
                "attention mask must be [{}, {n_q}, 1, 1], got {:?}",
                k.ne[1], mask.ne
            )
        })?;
    }
    let scale = param_f32(params[0]);
    need(scale.is_finite() && scale > 0.0, || {
        format!("attention scale must be positive, got {scale}")
    })
}

// ---- element and row access -------------------------------------------

/// # Safety
/// `v` is valid for its extent and `i` is inside its shape.
unsafe fn ptr(v: &View, i: [usize; 4]) -> *mut u8 {
    let off: usize = (0..4).map(|d| i[d] * v.desc.nb[d]).sum();
    // SAFETY: inside the extent by the caller's contract.
    unsafe { v.data.add(off) }
}

/// Reads row (i1, i2, i3) of any type as f32.
///
/// # Safety
/// `v` is valid for its extent and the row index is inside its shape.
unsafe fn read_row(v: &View, i1: usize, i2: usize, i3: usize, out: &mut [f32]) {
    let d = &v.desc;
    // SAFETY: the caller's contract; quantized rows are contiguous
    // (checked by `Desc::valid`), plain rows are read element by element.
    unsafe {
        let p = ptr(v, [0, i1, i2, i3]);
        if d.dtype.is_quantized() || d.nb[0] == d.dtype.block_bytes() {
            let bytes = d.dtype.row_bytes(d.ne[0]).expect("valid desc");
            dequantize_row(d.dtype, std::slice::from_raw_parts(p, bytes), out);
            return;
        }
        for (i0, o) in out.iter_mut().enumerate() {
            let q = p.add(i0 * d.nb[0]);
            *o = match d.dtype {
                DType::F32 => q.cast::<f32>().read_unaligned(),
                DType::F16 => f16::from_bits(q.cast::<u16>().read_unaligned()).to_f32(),
                DType::BF16 => bf16::from_bits(q.cast::<u16>().read_unaligned()).to_f32(),
                DType::I32 => q.cast::<i32>().read_unaligned() as f32,
                _ => unreachable!("quantized rows are contiguous"),
            };
        }
    }
}

/// Reads row (i1, i2, i3) of Q4_1/Q5_1 weights as `d · q` per weight and
/// the minimum per block ([`kiln_blocks::split_min_row`]).
///
/// # Safety
/// As for [`read_row`].
unsafe fn read_min_row(
    v: &View,
    i1: usize,
    i2: usize,
    i3: usize,
    out: &mut [f32],
    mins: &mut [f32],
) {
    let d = &v.desc;
    let bytes = d.dtype.row_bytes(d.ne[0]).expect("valid desc");
    // SAFETY: the caller's contract; quantized rows are contiguous.
    let row = unsafe { std::slice::from_raw_parts(ptr(v, [0, i1, i2, i3]), bytes) };
    kiln_blocks::split_min_row(d.dtype, row, out, mins);
}

/// Reads the f16 scale `d` of each block of row (i1, i2, i3) of weights
/// in 32-element blocks (Q4_0 … IQ4_NL, plain or interleaved), widened.
///
/// # Safety
/// As for [`read_row`].
unsafe fn read_scales(v: &View, i1: usize, i2: usize, i3: usize, out: &mut [f32]) {
    let d = &v.desc;
    let bytes = d.dtype.row_bytes(d.ne[0]).expect("valid desc");
    // SAFETY: the caller's contract; quantized rows are contiguous.
    let row = unsafe { std::slice::from_raw_parts(ptr(v, [0, i1, i2, i3]), bytes) };
    let plain = kiln_plugin_api::interleave::plain(d.dtype);
    let mut unpacked = Vec::new();
    let row = if plain != d.dtype {
        unpacked.resize(bytes, 0);
        kiln_plugin_api::interleave::unpack(d.dtype, row, &mut unpacked);
        &unpacked[..]
    } else {
        row
    };
    for (o, b) in out.iter_mut().zip(row.chunks_exact(plain.block_bytes())) {
        *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// The reference's dot product of a row of Q8-family weights (`a`, each
/// `d_w · q`, minimums apart for Q4_1/Q5_1) with rounded activations `x`
/// (each `d_x · q`), from block scales `dw` and `dx`: each block's products
/// summed in f64 (exact: every product is `d_w·d_x` times an integer, and
/// so is their sum), the integer recovered, and the terms added in
/// [`kiln_blocks::q8_dot`]'s order. `min`: each block's minimum and the
/// activations' Q8_1 sum.
fn q8_reference_dot(
    a: &[f32],
    x: &[f32],
    dw: &[f32],
    dx: &[f32],
    min: Option<(&[f32], &[f32])>,
) -> f32 {
    kiln_blocks::q8_dot(a.chunks_exact(32).zip(x.chunks_exact(32)).enumerate().map(
        |(b, (a, x))| {
            let d = dw[b] * dx[b];
            let exact: f64 = a.iter().zip(x).map(|(p, q)| *p as f64 * *q as f64).sum();
            let sum = if d == 0.0 {
                0
            } else {
                (exact / d as f64) as i32
            };
            kiln_blocks::Q8Term {
                d,
                sum,
                min: min.map(|(m, s)| m[b] * s[b]),
            }
        },
    ))
}

/// Writes row (i1, i2, i3) from f32, converting to the tensor's type.
///
/// # Safety
/// As for [`read_row`]; the type is one [`can_quantize`] accepts.
unsafe fn write_row(v: &View, i1: usize, i2: usize, i3: usize, src: &[f32]) {
    let d = &v.desc;
    // SAFETY: the caller's contract, as in `read_row`.
    unsafe {
        let p = ptr(v, [0, i1, i2, i3]);
        if d.dtype.is_quantized() || d.nb[0] == d.dtype.block_bytes() {
            let bytes = d.dtype.row_bytes(d.ne[0]).expect("valid desc");
            quantize_row(d.dtype, src, std::slice::from_raw_parts_mut(p, bytes));
            return;
        }
        for (i0, &x) in src.iter().enumerate() {
            let q = p.add(i0 * d.nb[0]);
            match d.dtype {
                DType::F32 => q.cast::<f32>().write_unaligned(x),
                DType::F16 => q.cast::<u16>().write_unaligned(f16::from_f32(x).to_bits()),
                DType::BF16 => q.cast::<u16>().write_unaligned(bf16::from_f32(x).to_bits()),
                _ => unreachable!("checked by `check`"),
            }
        }
    }
}

/// Row (i1, i2, i3) of `v` as f32s: the tensor's own memory where its
/// rows are dense, aligned f32 (no copy), else read into `buf`.
///
/// # Safety
/// As for [`read_row`]; the row's memory is not written while the slice
/// lives (the op's dst rows it is compared against in [`dst_row`]).
unsafe fn src_row<'a>(v: &View, i1: usize, i2: usize, i3: usize, buf: &'a mut [f32]) -> &'a [f32] {
    // SAFETY: the caller's contract.
    unsafe {
        match dense_f32(v, [i1, i2, i3], buf.len()) {
            Some(p) => std::slice::from_raw_parts(p, buf.len()),
            None => {
                read_row(v, i1, i2, i3, buf);
                buf
            }
        }
    }
}

/// Where row (i1, i2, i3) of `v` is, if its `n` elements are dense,
/// aligned f32.
///
/// # Safety
/// As for [`read_row`].
unsafe fn dense_f32(v: &View, [i1, i2, i3]: [usize; 3], n: usize) -> Option<*mut f32> {
    let d = &v.desc;
    // SAFETY: the caller's contract.
    let p = unsafe { ptr(v, [0, i1, i2, i3]) };
    (d.dtype == DType::F32 && d.nb[0] == 4 && d.ne[0] == n && p.cast::<f32>().is_aligned())
        .then_some(p.cast())
}

/// The row of dst an op writes (i1, i2, i3): its own memory where dense,
/// aligned f32 and apart from every source's memory (`srcs`: the rows the
/// op reads, none of which may alias a `&mut`), else `buf`, which
/// [`commit_row`] then writes back.
///
/// # Safety
/// As for [`write_row`].
unsafe fn dst_row<'a>(
    dst: &View,
    i: [usize; 3],
    srcs: &[&[f32]],
    buf: &'a mut [f32],
) -> &'a mut [f32] {
    // SAFETY: the caller's contract.
    if let Some(p) = unsafe { dense_f32(dst, i, buf.len()) } {
        let range = p as usize..p as usize + 4 * buf.len();
        let apart = srcs.iter().all(|s| {
            let s = s.as_ptr() as usize..s.as_ptr() as usize + 4 * s.len();
            s.end <= range.start || range.end <= s.start
        });
        if apart {
            // SAFETY: the row is inside dst, written by this thread only,
            // and overlaps no source row.
            return unsafe { std::slice::from_raw_parts_mut(p, buf.len()) };
        }
    }
    buf
}

/// Writes `row` to dst's row (i1, i2, i3) unless it is that row already
/// ([`dst_row`]).
///
/// # Safety
/// As for [`write_row`].
unsafe fn commit_row(dst: &View, [i1, i2, i3]: [usize; 3], row: &[f32]) {
    // SAFETY: the caller's contract.
    unsafe {
        if dense_f32(dst, [i1, i2, i3], row.len()) != Some(row.as_ptr().cast_mut()) {
            write_row(dst, i1, i2, i3, row);
        }
    }
}

/// Reads one i32 element.
///
/// # Safety
/// As for [`read_row`].
unsafe fn read_i32(v: &View, i: [usize; 4]) -> i32 {
    // SAFETY: the caller's contract.
    unsafe { ptr(v, i).cast::<i32>().read_unaligned() }
}

fn rows(ne: [usize; 4]) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..ne[3])
        .flat_map(move |i3| (0..ne[2]).flat_map(move |i2| (0..ne[1]).map(move |i1| (i1, i2, i3))))
}

/// The inner row loops that a SIMD kernel may take over, bit for bit
/// (`kernels::activations`); [`REFERENCE_ROWS`] are [`crate::math`]'s.
pub struct RowFns {
    /// A softmax row after its scale and mask: [`crate::math::softmax_row`].
    pub softmax: fn(&[f32], &mut [f64], &mut [f32]),
    /// [`crate::math::silu_row`].
    pub silu: fn(&[f32], &mut [f32]),
}

/// The reference's row loops.
pub const REFERENCE_ROWS: RowFns = RowFns {
    softmax: math::softmax_row,
    silu: math::silu_row,
};

/// Computes `kind` over resolved memory. Call [`check`] first.
///
/// # Safety
/// Every view's data pointer is valid for reads (sources) or writes (dst)
/// over its `Desc::extent`, and `dst` does not overlap a source except
/// element for element (in-place elementwise ops).
pub unsafe fn run(kind: OpKind, src: &[View], dst: &View, params: &[i32; 8]) -> Result<(), String> {
    // SAFETY: the caller's contract.
    unsafe { run_with(&REFERENCE_ROWS, kind, src, dst, params) }
}

/// [`run`], with `rows` for the loops that [`RowFns`] names.
///
/// # Safety
/// As for [`run`].
pub unsafe fn run_with(
    row_fns: &RowFns,
    kind: OpKind,
    src: &[View],
    dst: &View,
    params: &[i32; 8],
) -> Result<(), String> {
    let n0 = dst.desc.ne[0];
    let mut out = scratch::f32s(n0);
    let mut a = scratch::f32s(src[0].desc.ne[0]);
    // SAFETY: the caller's contract, and `check` guarantees that every row
    // index formed below is inside its tensor.
    unsafe {
        match kind {
            OpKind::MulMat => {
                let (w, x) = (&src[0], &src[1]);
                let (r2, r3) = (x.desc.ne[2] / w.desc.ne[2], x.desc.ne[3] / w.desc.ne[3]);
                let k = x.desc.ne[0];
                let m_count = x.desc.ne[1];
                let mut xs = scratch::f32s(k * m_count);
                let mut acc = scratch::f64s(w.desc.ne[1] * m_count);
                // Q4_1/Q5_1: a block's minimum times the activations'
                // Q8_1 block sum, apart from the codes' products (ggml's
                // vec_dot_q4_1_q8_1).
                let with_min = matches!(w.desc.dtype, DType::Q4_1 | DType::Q5_1);
                let float = matches!(w.desc.dtype, DType::F16 | DType::BF16 | DType::F32);
                // Weights whose activations are Q8_0 (Q8_1) blocks: summed
                // block by block in `kiln_blocks::q8_dot`'s order.
                let q8 = w.desc.dtype.is_quantized() && w.desc.dtype.block_len() == 32;
                let blocks = k / 32;
                let mut sums = Vec::new();
                let mut mins = scratch::f32s(if with_min { blocks } else { 0 });
                let mut dw = scratch::f32s(if q8 { blocks } else { 0 });
                let mut dx = scratch::f32s(if q8 { blocks * m_count } else { 0 });
                for i3 in 0..x.desc.ne[3] {
                    for i2 in 0..x.desc.ne[2] {
                        // Activations as the dot product sees them (ggml's
                        // vec_dot type for these weights).
                        sums.clear();
                        for (m, row) in xs.chunks_exact_mut(k).enumerate() {
                            read_row(x, m, i2, i3, row);
                            if with_min {
                                sums.push(kiln_blocks::q8_1_sums(row));
                            }
                            if q8 {
                                for (d, block) in dx[m * blocks..][..blocks]
                                    .iter_mut()
                                    .zip(row.chunks_exact(32))
                                {
                                    *d = kiln_blocks::q8_0_scale(block);
                                }
                            }
                            round_activations(w.desc.dtype, row);
                        }
                        for n in 0..w.desc.ne[1] {
                            if q8 {
                                if with_min {
                                    read_min_row(w, n, i2 / r2, i3 / r3, &mut a, &mut mins);
                                } else {
                                    read_row(w, n, i2 / r2, i3 / r3, &mut a);
                                }
                                read_scales(w, n, i2 / r2, i3 / r3, &mut dw);
                                for (m, row) in xs.chunks_exact(k).enumerate() {
                                    let dx = &dx[m * blocks..][..blocks];
                                    acc[m * n0 + n] = q8_reference_dot(
                                        &a,
                                        row,
                                        &dw,
                                        dx,
                                        with_min.then(|| (&mins[..], &sums[m][..])),
                                    ) as f64;
                                }
                                continue;
                            }
                            read_row(w, n, i2 / r2, i3 / r3, &mut a);
                            for (m, row) in xs.chunks_exact(k).enumerate() {
                                // Float weights in f32 lanes, in the order
                                // every kernel for them follows (F16 and
                                // BF16 products are exact: `float_dot`).
                                acc[m * n0 + n] = if w.desc.dtype == DType::F32 {
                                    kiln_blocks::fused_dot(a.iter().copied(), row) as f64
                                } else if float {
                                    kiln_blocks::float_dot(a.iter().copied(), row) as f64
                                } else {
                                    a.iter().zip(row).map(|(p, q)| *p as f64 * *q as f64).sum()
                                };
                            }
                        }
                        for m in 0..m_count {
                            for (o, v) in out.iter_mut().zip(&acc[m * n0..][..n0]) {
                                *o = *v as f32;
                            }
                            write_row(dst, m, i2, i3, &out);
                        }
                    }
                }
            }
            OpKind::Add | OpKind::Mul => {
                let b = &src[1];
                let mut bv = scratch::f32s(b.desc.ne[0]);
                for (i1, i2, i3) in rows(dst.desc.ne) {
                    let a = src_row(&src[0], i1, i2, i3, &mut a);
                    let bv = src_row(
                        b,
                        i1 % b.desc.ne[1],
                        i2 % b.desc.ne[2],
                        i3 % b.desc.ne[3],
                        &mut bv,
                    );
                    let out = dst_row(dst, [i1, i2, i3], &[a, bv], &mut out);
                    if bv.len() == out.len() {
                        // The common case, without a division per element.
                        for ((o, &x), &y) in out.iter_mut().zip(a).zip(bv) {
                            *o = if kind == OpKind::Add { x + y } else { x * y };
                        }
                    } else {
                        for (i0, o) in out.iter_mut().enumerate() {
                            let y = bv[i0 % bv.len()];
                            *o = if kind == OpKind::Add {
                                a[i0] + y
                            } else {
                                a[i0] * y
                            };
                        }
                    }
                    commit_row(dst, [i1, i2, i3], out);
                }
            }
            OpKind::Scale | OpKind::Silu | OpKind::Gelu => {
                let s = param_f32(params[0]);
                for (i1, i2, i3) in rows(dst.desc.ne) {
                    let a = src_row(&src[0], i1, i2, i3, &mut a);
                    let out = dst_row(dst, [i1, i2, i3], &[a], &mut out);
                    match kind {
                        OpKind::Silu => (row_fns.silu)(a, out),
                        OpKind::Gelu => math::gelu_row(a, out),
                        _ => {
                            for (o, &x) in out.iter_mut().zip(a) {
                                *o = x * s;
                            }
                        }
                    }
                    commit_row(dst, [i1, i2, i3], out);
                }
            }
            OpKind::RmsNorm => {
                // As ggml computes it, to the bit: each square rounded to
                // f32 and summed in f64 in order; the mean, the scale and
                // the product in f32. On real activations a last-bit
                // difference here moves an 8-bit rounding of the next
                // product's input (the largest activation sets a block's
                // scale), which moved Gemma 3's logits by a tenth of their
                // spread.
                let eps = param_f32(params[0]);
                for (i1, i2, i3) in rows(dst.desc.ne) {
                    let a = src_row(&src[0], i1, i2, i3, &mut a);
                    let mut sum = 0f64;
                    for &x in a.iter() {
                        sum += (x * x) as f64;
                    }
                    let mean = (sum / a.len() as f64) as f32;
                    let scale = 1.0f32 / (mean + eps).sqrt();
                    let out = dst_row(dst, [i1, i2, i3], &[a], &mut out);
                    for (o, &x) in out.iter_mut().zip(a) {
                        *o = x * scale;
                    }
                    commit_row(dst, [i1, i2, i3], out);
                }
            }
            OpKind::Norm => {
                // ggml's norm on its scalar path: the sum in f64, the mean
                // in f32, each deviation and its square in f32, the squares
                // summed in f64; the variance, scale and product in f32.
                // (ggml's SIMD builds sum the squares in f32 lanes first.)
                let eps = param_f32(params[0]);
                for (i1, i2, i3) in rows(dst.desc.ne) {
                    read_row(&src[0], i1, i2, i3, &mut a);
                    let sum: f64 = a.iter().map(|&x| x as f64).sum();
                    let mean = sum as f32 / a.len() as f32;
                    let mut sum2 = 0f64;
                    for (o, &x) in out.iter_mut().zip(&a) {
                        let v = x - mean;
                        *o = v;
                        sum2 += (v * v) as f64;
                    }
                    let variance = (sum2 / a.len() as f64) as f32;
                    let scale = 1.0f32 / (variance + eps).sqrt();
                    for o in out.iter_mut() {
                        *o *= scale;
                    }
                    write_row(dst, i1, i2, i3, &out);
                }
            }
            OpKind::Rope => {
                // Computed as ggml computes it, in f32 step for step (the
                // angle advanced by repeated multiplication, libm's
                // cosf/sinf, fused multiply-adds where clang fuses them),
                // because K is rounded to f16 right after: a last-bit
                // difference here flips f16 roundings in the KV cache.
                use kiln_plugin_api::abi::{KILN_ROPE_EXT, KILN_ROPE_NEOX};
                let n_rot = params[0] as usize;
                let neox = params[1] & !KILN_ROPE_EXT == KILN_ROPE_NEOX;
                let base = param_f32(params[2]);
                let freq_scale = param_f32(params[3]);
                let theta_scale = base.powf(-2.0 / n_rot as f32);
                // YaRN's mix and magnitude, off without the flag (ggml's
                // rope_yarn with ext_factor 0 and mscale 1).
                let [ext_factor, mscale, lo, hi] = if params[1] & KILN_ROPE_EXT != 0 {
                    [4, 5, 6, 7].map(|i| param_f32(params[i]))
                } else {
                    [0.0, 1.0, 0.0, 0.0]
                };
                let mut factors = scratch::f32s(n_rot / 2);
                factors.fill(1.0);
                if let Some(f) = src.get(2) {
                    read_row(f, 0, 0, 0, &mut factors);
                }
                let angles = |pos: i32, sc: &mut [(f32, f32)]| {
                    let mut theta = pos as f32;
                    for (i, (ff, sc)) in factors.iter().zip(sc.iter_mut()).enumerate() {
                        let extrap = theta / ff;
                        let interp = freq_scale * extrap;
                        let (angle, m) = if ext_factor != 0.0 {
                            let y = (i as f32 - lo) / (hi - lo).max(0.001);
                            let ramp = (1.0 - y.clamp(0.0, 1.0)) * ext_factor;
                            (
                                interp * (1.0 - ramp) + extrap * ramp,
                                mscale * (1.0 + 0.1 * (1.0 / freq_scale).ln()),
                            )
                        } else {
                            (interp, mscale)
                        };
                        *sc = (angle.sin() * m, angle.cos() * m);
                        theta *= theta_scale;
                    }
                };
                // Every layer turns the same positions by the same angles:
                // they are kept per thread for the next op with these
                // parameters (rows run through a token's heads first).
                let head = [n_rot as u32, base.to_bits(), freq_scale.to_bits()];
                let ext = [ext_factor, mscale, lo, hi].map(f32::to_bits);
                let key = head
                    .into_iter()
                    .chain(ext)
                    .chain(factors.iter().map(|f| f.to_bits()));
                RopeAngles::with(key, |kept| {
                    let mut at: Option<(i32, usize)> = None;
                    for (i1, i2, i3) in rows(dst.desc.ne) {
                        let a = src_row(&src[0], i1, i2, i3, &mut a);
                        let pos = read_i32(&src[1], [i2, 0, 0, 0]);
                        let start = match at {
                            Some((p, start)) if p == pos => start,
                            _ => kept.of(pos, &angles),
                        };
                        at = Some((pos, start));
                        let out = dst_row(dst, [i1, i2, i3], &[a], &mut out);
                        math::rope_row(a, &kept.pairs[start..][..n_rot / 2], neox, out);
                        commit_row(dst, [i1, i2, i3], out);
                    }
                });
            }
            OpKind::Attention => attention(src, dst, param_f32(params[0])),
            OpKind::SoftMax => {
                let scale = param_f32(params[0]);
                let mut mask = scratch::f32s(n0);
                let mut e = scratch::f64s(n0);
                for (i1, i2, i3) in rows(dst.desc.ne) {
                    read_row(&src[0], i1, i2, i3, &mut a);
                    if let Some(m) = src.get(1) {
                        let mne = m.desc.ne;
                        read_row(m, i1 % mne[1], i2 % mne[2], i3 % mne[3], &mut mask);
                    }
                    for (v, &m) in a.iter_mut().zip(&mask) {
                        *v = *v * scale + m;
                    }
                    (row_fns.softmax)(&a, &mut e, &mut out);
                    write_row(dst, i1, i2, i3, &out);
                }
            }
            OpKind::GetRows => {
                let (table, idx) = (&src[0], &src[1]);
                for i in 0..idx.desc.ne[0] {
                    let row = read_i32(idx, [i, 0, 0, 0]);
                    if row < 0 || row as usize >= table.desc.ne[1] {
                        return Err(format!(
                            "get_rows index {row} (position {i}) is outside the table's {} rows",
                            table.desc.ne[1]
                        ));
                    }
                    read_row(table, row as usize, 0, 0, &mut out);
                    write_row(dst, i, 0, 0, &out);
                }
            }
            OpKind::Cpy => {
                for (i1, i2, i3) in rows(dst.desc.ne) {
                    let a = src_row(&src[0], i1, i2, i3, &mut a);
                    write_row(dst, i1, i2, i3, a);
                }
            }
        }
    }
    Ok(())
}

/// RoPE's (sin, cos) pairs by position, kept per thread from op to op
/// while the parameters stay the same: libm's `sinf`/`cosf` for every
/// pair of every position in every layer's Q and K were 4 % of a
/// SmolLM2 prompt. The same function of the same inputs, so the same
/// bits. Direct-mapped by position ([`Self::SLOTS`] of them, a prompt
/// batch's worth), so that once made for a model it never allocates: a
/// decode step must not.
#[derive(Default)]
struct RopeAngles {
    /// The parameters they are for (bits), n_rot first.
    key: Vec<u32>,
    /// Pairs per position: n_rot / 2, set with `key`.
    n: usize,
    /// The position in each slot; `EMPTY` for none.
    tags: Vec<i64>,
    /// `SLOTS × n` pairs, slot by slot.
    pairs: Vec<(f32, f32)>,
}

impl RopeAngles {
    const SLOTS: usize = 512;
    const EMPTY: i64 = i64::MIN;

    /// Runs `f` with this thread's angles for the parameters `key`, which
    /// start with n_rot: kept from the last op if it had the same.
    fn with<R>(key: impl Iterator<Item = u32> + Clone, f: impl FnOnce(&mut RopeAngles) -> R) -> R {
        thread_local! {
            static KEPT: std::cell::RefCell<RopeAngles> = std::cell::RefCell::default();
        }
        KEPT.with_borrow_mut(|kept| {
            if !kept.key.iter().copied().eq(key.clone()) {
                kept.key.clear();
                kept.key.extend(key);
                let n = kept.key[0] as usize / 2;
                kept.n = n;
                kept.tags.clear();
                kept.tags.resize(Self::SLOTS, Self::EMPTY);
                kept.pairs.clear();
                kept.pairs.resize(Self::SLOTS * n, (0.0, 0.0));
            }
            f(kept)
        })
    }

    /// Where the pairs of `pos` start in `pairs`, made by `angles` unless
    /// its slot holds them.
    fn of(&mut self, pos: i32, angles: &impl Fn(i32, &mut [(f32, f32)])) -> usize {
        let slot = pos.rem_euclid(Self::SLOTS as i32) as usize;
        let start = slot * self.n;
        if self.tags[slot] != i64::from(pos) {
            angles(pos, &mut self.pairs[start..][..self.n]);
            self.tags[slot] = i64::from(pos);
        }
        start
    }
}

/// The reference of [`OpKind::Attention`], row by row: each head's
/// scores over every position in f64, the softmax as `SOFT_MAX` computes
/// it, and the weighted sum of V in f64. K and V are read as f32; with
/// an F16 K, Q is rounded to f16 first, as llama.cpp's two attention
/// paths round it (quantized keys meet Q as it is: rounding it to 8 bits
/// too, as llama.cpp does, would add its error to theirs).
///
/// # Safety
/// As for [`run`], after [`check`] accepted the op.
unsafe fn attention(src: &[View], dst: &View, scale: f32) {
    let (q, k, v) = (&src[0], &src[1], &src[2]);
    let [hd, n_q, n_head, _] = q.desc.ne;
    let (n_kv, n_head_kv) = (k.desc.ne[1], k.desc.ne[2]);
    let group = n_head / n_head_kv;
    let mut keys = scratch::f32s(hd * n_kv);
    let mut values = scratch::f32s(hd * n_kv);
    let mut q_row = scratch::f32s(hd);
    let mut mask = scratch::f32s(n_kv);
    let mut scores = scratch::f64s(n_kv);
    let mut out = scratch::f32s(hd);
    // SAFETY: the caller's contract; every row index is inside its view.
    unsafe {
        for h in 0..n_head {
            if h % group == 0 {
                for (j, (key, value)) in keys
                    .chunks_exact_mut(hd)
                    .zip(values.chunks_exact_mut(hd))
                    .enumerate()
                {
                    read_row(k, j, h / group, 0, key);
                    read_row(v, j, h / group, 0, value);
                }
            }
            for i in 0..n_q {
                read_row(q, i, h, 0, &mut q_row);
                if k.desc.dtype == DType::F16 {
                    round_activations(DType::F16, &mut q_row);
                }
                if let Some(m) = src.get(3) {
                    read_row(m, i, 0, 0, &mut mask);
                }
                let mut max = f64::NEG_INFINITY;
                for ((s, key), &m) in scores.iter_mut().zip(keys.chunks_exact(hd)).zip(&mask) {
                    *s = if m == f32::NEG_INFINITY {
                        f64::NEG_INFINITY
                    } else {
                        let dot: f64 = q_row
                            .iter()
                            .zip(key)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        scale as f64 * dot + m as f64
                    };
                    max = max.max(*s);
                }
                out.fill(0.0);
                if max > f64::NEG_INFINITY {
                    let mut sum = 0f64;
                    let mut acc = scratch::f64s(hd);
                    for (s, value) in scores.iter().zip(values.chunks_exact(hd)) {
                        if *s == f64::NEG_INFINITY {
                            continue;
                        }
                        let e = math::exp(s - max);
                        sum += e;
                        for (a, x) in acc.iter_mut().zip(value) {
                            *a += e * *x as f64;
                        }
                    }
                    for (o, a) in out.iter_mut().zip(&acc) {
                        *o = (a / sum) as f32;
                    }
                }
                write_row(dst, i, h, 0, &out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_plugin_api::types::f32_param;

    fn view(desc: Desc, data: &mut [u8]) -> View {
        assert!(desc.extent().unwrap() <= data.len());
        View {
            data: data.as_mut_ptr(),
            desc,
        }
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn to_f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn run1(kind: OpKind, srcs: Vec<(Desc, Vec<u8>)>, dst: Desc, params: [i32; 8]) -> Vec<f32> {
        let descs: Vec<Desc> = srcs.iter().map(|s| s.0).collect();
        check(kind, &descs, &dst, &params).unwrap();
        let mut bufs: Vec<Vec<u8>> = srcs.into_iter().map(|s| s.1).collect();
        let views: Vec<View> = descs
            .iter()
            .zip(bufs.iter_mut())
            .map(|(d, b)| view(*d, b))
            .collect();
        let mut out = vec![0u8; dst.extent().unwrap()];
        let dv = view(dst, &mut out);
        // SAFETY: every view covers its own Vec.
        unsafe { run(kind, &views, &dv, &params) }.unwrap();
        to_f32s(&out)
    }

    #[test]
    fn mul_mat_small_by_hand() {
        // W is [K=2, N=3]: rows (1,2), (3,4), (5,6); x is [K=2, M=1] = (1, -1).
        let w = Desc::contiguous(DType::F32, [2, 3, 1, 1]);
        let x = Desc::contiguous(DType::F32, [2, 1, 1, 1]);
        let dst = Desc::contiguous(DType::F32, [3, 1, 1, 1]);
        let y = run1(
            OpKind::MulMat,
            vec![(w, f32s(&[1., 2., 3., 4., 5., 6.])), (x, f32s(&[1., -1.]))],
            dst,
            [0; 8],
        );
        assert_eq!(y, vec![-1., -1., -1.]);
    }

    #[test]
    fn add_broadcasts_a_row() {
        let a = Desc::contiguous(DType::F32, [3, 2, 1, 1]);
        let b = Desc::contiguous(DType::F32, [3, 1, 1, 1]);
        let y = run1(
            OpKind::Add,
            vec![
                (a, f32s(&[1., 2., 3., 4., 5., 6.])),
                (b, f32s(&[10., 20., 30.])),
            ],
            a,
            [0; 8],
        );
        assert_eq!(y, vec![11., 22., 33., 14., 25., 36.]);
    }

    #[test]
    fn rms_norm_of_constant_row_is_one() {
        let d = Desc::contiguous(DType::F32, [4, 1, 1, 1]);
        let mut p = [0; 8];
        p[0] = f32_param(0.0);
        let y = run1(OpKind::RmsNorm, vec![(d, f32s(&[3., 3., 3., 3.]))], d, p);
        assert_eq!(y, vec![1., 1., 1., 1.]);
    }

    #[test]
    fn norm_centres_and_scales_each_row() {
        let d = Desc::contiguous(DType::F32, [4, 2, 1, 1]);
        let mut p = [0; 8];
        p[0] = f32_param(0.0);
        let y = run1(
            OpKind::Norm,
            vec![(d, f32s(&[1., 2., 3., 4., 5., 5., 5., 5.]))],
            d,
            p,
        );
        // Mean 2.5, variance 1.25: (x - 2.5) / sqrt(1.25); a constant row
        // has no variance and eps 0, so 0 / 0.
        let s = 1.25f32.sqrt();
        for (got, want) in y[..4].iter().zip([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]) {
            assert!((got - want).abs() < 1e-6, "{:?}", &y[..4]);
        }
        assert!(y[4..].iter().all(|v| v.is_nan()));
        p[0] = f32_param(-1.0);
        assert!(check(OpKind::Norm, &[d], &d, &p).is_err());
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        // head_dim 2, one head, two tokens at positions 0 and 1; base 1 so theta = pos.
        let x = Desc::contiguous(DType::F32, [2, 1, 2, 1]);
        let pos = Desc::contiguous(DType::I32, [2, 1, 1, 1]);
        let mut p = [0; 8];
        p[0] = 2;
        p[2] = f32_param(1.0);
        p[3] = f32_param(1.0);
        let positions: Vec<u8> = [0i32, 1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let y = run1(
            OpKind::Rope,
            vec![(x, f32s(&[1., 0., 1., 0.])), (pos, positions)],
            x,
            p,
        );
        assert_eq!(&y[..2], &[1.0, 0.0]);
        assert!((y[2] - 1f32.cos()).abs() < 1e-6 && (y[3] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn rope_angles_kept_between_ops_give_a_fresh_threads_bits() {
        // [head_dim 8 (6 turned), 2 heads, tokens]; the frequency factors
        // are the third source when given.
        let rope = |positions: &[i32], base: f32, factors: Option<&[f32]>| {
            let n = positions.len();
            let x = Desc::contiguous(DType::F32, [8, 2, n, 1]);
            let values: Vec<f32> = (0..16 * n).map(|i| (i as f32 * 0.37).sin()).collect();
            let pos = Desc::contiguous(DType::I32, [n, 1, 1, 1]);
            let mut p = [0; 8];
            p[0] = 6;
            p[2] = f32_param(base);
            p[3] = f32_param(1.0);
            let bytes: Vec<u8> = positions.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut srcs = vec![(x, f32s(&values)), (pos, bytes)];
            if let Some(f) = factors {
                srcs.push((Desc::contiguous(DType::F32, [3, 1, 1, 1]), f32s(f)));
            }
            run1(OpKind::Rope, srcs, x, p)
        };
        type Case<'a> = (&'a [i32], f32, Option<&'a [f32]>);
        let cases: [Case; 6] = [
            (&[0, 1, 2, 3], 10000.0, None),
            (&[3, 9, 1, 3, 70000], 10000.0, None),
            // Positions that share a slot (512 apart), in one op.
            (&[3, 515, 3, 1027, 9], 10000.0, None),
            (&[3, 9, 1], 500.0, None),
            (&[3, 9, 1], 10000.0, Some(&[1.0, 2.0, 8.0])),
            (&[9, 3, 0], 10000.0, None),
        ];
        // One thread runs them in turn (its angles kept from case to
        // case), each against a thread of its own.
        let kept: Vec<Vec<f32>> = cases.iter().map(|&(p, b, f)| rope(p, b, f)).collect();
        for (&(p, b, f), got) in cases.iter().zip(&kept) {
            let fresh = std::thread::scope(|s| s.spawn(|| rope(p, b, f)).join().unwrap());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(got),
                bits(&fresh),
                "positions {p:?}, base {b}, factors {f:?}"
            );
        }
        // The factors were applied (the case differs from the one without).
        assert_ne!(kept[3], rope(&[3, 9, 1], 10000.0, None));
    }

    #[test]
    fn soft_max_with_causal_mask() {
        let x = Desc::contiguous(DType::F32, [2, 2, 1, 1]);
        let mut p = [0; 8];
        p[0] = f32_param(1.0);
        let mask = f32s(&[0.0, f32::NEG_INFINITY, 0.0, 0.0]);
        let y = run1(
            OpKind::SoftMax,
            vec![(x, f32s(&[5., 7., 1., 1.])), (x, mask)],
            x,
            p,
        );
        assert_eq!(y, vec![1.0, 0.0, 0.5, 0.5]);
    }

    #[test]
    fn get_rows_rejects_out_of_range_index() {
        let table = Desc::contiguous(DType::F32, [2, 2, 1, 1]);
        let idx = Desc::contiguous(DType::I32, [1, 1, 1, 1]);
        let dst = Desc::contiguous(DType::F32, [2, 1, 1, 1]);
        let mut t = f32s(&[1., 2., 3., 4.]);
        let mut i = 5i32.to_le_bytes().to_vec();
        let mut o = vec![0u8; 8];
        let (tv, iv, ov) = (view(table, &mut t), view(idx, &mut i), view(dst, &mut o));
        check(OpKind::GetRows, &[table, idx], &dst, &[0; 8]).unwrap();
        // SAFETY: views cover their Vecs.
        let err = unsafe { run(OpKind::GetRows, &[tv, iv], &ov, &[0; 8]) }.unwrap_err();
        assert!(err.contains("index 5"), "{err}");
    }

    #[test]
    fn check_names_the_problem() {
        let w = Desc::contiguous(DType::Q4_0, [64, 2, 1, 1]);
        let x = Desc::contiguous(DType::F32, [32, 1, 1, 1]);
        let dst = Desc::contiguous(DType::F32, [2, 1, 1, 1]);
        let err = check(OpKind::MulMat, &[w, x], &dst, &[0; 8]).unwrap_err();
        assert!(err.contains("inner dimensions differ"), "{err}");
        let odd = Desc::contiguous(DType::Q4_0, [33, 1, 1, 1]);
        let err = check(OpKind::Cpy, &[x], &odd, &[0; 8]).unwrap_err();
        assert!(err.contains("multiple of 32"), "{err}");
    }

    #[test]
    fn cpy_transposed_view_into_f16() {
        // src is a 2x3 f32 matrix viewed transposed (strides swapped).
        let data = f32s(&[1., 2., 3., 4., 5., 6.]);
        let src = Desc {
            dtype: DType::F32,
            ne: [2, 3, 1, 1],
            nb: [12, 4, 24, 24],
        };
        let dst = Desc::contiguous(DType::F16, [2, 3, 1, 1]);
        check(OpKind::Cpy, &[src], &dst, &[0; 8]).unwrap();
        let mut d = data.clone();
        let mut o = vec![0u8; dst.extent().unwrap()];
        let (sv, ov) = (view(src, &mut d), view(dst, &mut o));
        // SAFETY: views cover their Vecs.
        unsafe { run(OpKind::Cpy, &[sv], &ov, &[0; 8]) }.unwrap();
        let got: Vec<f32> = o
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(got, vec![1., 4., 2., 5., 3., 6.]);
    }
}
