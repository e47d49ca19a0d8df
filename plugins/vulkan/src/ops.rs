//! What the shaders run, and the checks that keep each inside its tensors.
//! An op passes [`plan`] or the host runs it on the CPU.

use crate::vulkan::{Limits, Shader};
use kiln_plugin_api::{BackendError, DType, Desc, OpKind, Tensor, Tensors};

/// The weight types the shaders dequantize: all a model may hold.
pub fn weight_type(t: DType) -> bool {
    DType::WEIGHTS.contains(&t)
}

/// How an op runs: its shader, how many workgroups it needs, and, for a
/// weight matrix larger than one binding may span, how many of its rows
/// each dispatch takes (see [`crate::graph`]).
pub struct Plan {
    pub shader: Shader,
    pub groups: u64,
    pub split_rows: Option<usize>,
    /// A MUL_MAT's first half (quantize.comp): its workgroups and the
    /// scratch bytes it fills.
    pub activations: Option<(u64, u64)>,
}

/// Activation columns one MUL_MAT workgroup takes (`TM` in mul_mat.glsl).
const MUL_MAT_COLUMNS: u64 = 8;

/// Weight rows and activation columns of one tile of mul_mm.glsl.
const TILE: u64 = 32;

/// From this many activation columns on, a MUL_MAT runs in tiles
/// (mul_mm.glsl) where the device allows: below it, mul_mat.glsl reads
/// the weights as few times and wastes no part of a tile.
const TILED_FROM_COLUMNS: u64 = 16;

/// Words per block and blocks per row of MUL_MAT's rounded activations for
/// weights of type `wt` and rows of `k` (shaders/act.glsl): K floats in
/// blocks of 32 for float weights, Q8_0 with a sum (10 words per 32) for
/// the 32-element types, Q8_K with sums per 16 (81 words per 256) for the
/// K-quants.
fn activation_blocks(wt: DType, k: u64) -> (u64, u64) {
    match wt.block_len() {
        256 => (81, k / 256),
        32 => (10, k / 32),
        _ => (32, k.div_ceil(32)),
    }
}

/// Whether `t` fits one binding: its extent plus the slack of an aligned
/// window start, within the device's range and the shaders' 32-bit byte
/// addresses.
fn fits(t: &Desc, limits: &Limits) -> Result<bool, BackendError> {
    let extent = t
        .extent()
        .ok_or_else(|| BackendError::invalid("extent overflows"))? as u64;
    Ok(extent + limits.offset_align <= limits.max_range.min(u32::MAX as u64))
}

fn too_large(t: &Desc, limits: &Limits) -> BackendError {
    unsupported(format!(
        "a tensor of {} bytes exceeds the device's binding range ({} bytes)",
        t.extent().unwrap_or(usize::MAX),
        limits.max_range
    ))
}

/// Rows of a two-dimensional `t` that one binding holds, when all of it
/// does not; an error when not even one row does.
fn rows_per_binding(t: &Desc, limits: &Limits) -> Result<usize, BackendError> {
    if t.ne[2] != 1 || t.ne[3] != 1 || t.nb[1] == 0 {
        return Err(too_large(t, limits));
    }
    let room = limits
        .max_range
        .min(u32::MAX as u64)
        .saturating_sub(limits.offset_align);
    let row = Desc {
        ne: [t.ne[0], 1, 1, 1],
        ..*t
    }
    .extent()
    .ok_or_else(|| BackendError::invalid("extent overflows"))? as u64;
    if row > room {
        return Err(too_large(t, limits));
    }
    // Rows r fit when (r - 1) * nb1 + row <= room.
    Ok(((room - row) / t.nb[1] as u64 + 1) as usize)
}

/// The tensor as a checked [`Desc`].
pub fn desc<B>(t: &Tensor<'_, B>) -> Result<Desc, BackendError> {
    let mut ne = [1usize; 4];
    let mut nb = [0usize; 4];
    for d in 0..4 {
        ne[d] = usize::try_from(t.ne[d]).map_err(|_| BackendError::invalid("negative extent"))?;
        nb[d] = usize::try_from(t.nb[d]).map_err(|_| BackendError::invalid("stride overflows"))?;
    }
    let d = Desc {
        dtype: t.dtype,
        ne,
        nb,
    };
    d.validate().map_err(BackendError::invalid)?;
    Ok(d)
}

fn unsupported(why: String) -> BackendError {
    BackendError::unsupported(why)
}

/// Checks `op` against what the shaders do and the device allows.
pub fn plan<B>(
    op: &kiln_plugin_api::Op,
    tensors: &Tensors<'_, B>,
    limits: &Limits,
) -> Result<Plan, BackendError> {
    let srcs = op.srcs();
    let mut s = Vec::with_capacity(srcs.len());
    for &i in srcs {
        s.push(desc(&tensors.get(i)?)?);
    }
    let d = desc(&tensors.get(op.dst)?)?;
    plan_descs(op.kind, &op.params, &s, &d, limits)
}

/// [`plan`] for tensors given as descriptions (the parts of a split op).
pub fn plan_descs(
    kind: OpKind,
    params: &[i32; 8],
    s: &[Desc],
    d: &Desc,
    limits: &Limits,
) -> Result<Plan, BackendError> {
    // Byte addresses in the shaders are 32-bit and a binding spans at most
    // `max_range`: the weights of a matmul or a row lookup are split by
    // rows over several dispatches; any other tensor must fit. Dispatches
    // take at most max_groups² workgroups.
    let splits = matches!(kind, OpKind::MulMat | OpKind::GetRows);
    let mut split_rows = None;
    for (i, t) in s.iter().chain([d]).enumerate() {
        if fits(t, limits)? {
            continue;
        }
        if i == 0 && splits {
            split_rows = Some(rows_per_binding(t, limits)?);
            continue;
        }
        return Err(too_large(t, limits));
    }
    let f32_only = |t: &Desc| t.dtype == DType::F32;
    let same = |a: &Desc, b: &Desc| a.ne == b.ne;
    let n = d.n_elements() as u64;
    let (ok, (shader, groups)) = match kind {
        OpKind::Add | OpKind::Mul => {
            let ok = s.len() == 2
                && s.iter().all(f32_only)
                && f32_only(d)
                && same(&s[0], d)
                && (0..4).all(|i| s[0].ne[i].is_multiple_of(s[1].ne[i]));
            (ok, (Shader::Elementwise, n.div_ceil(256)))
        }
        OpKind::Scale | OpKind::Silu | OpKind::Gelu => {
            let ok = s.len() == 1 && f32_only(&s[0]) && f32_only(d) && same(&s[0], d);
            (ok, (Shader::Elementwise, n.div_ceil(256)))
        }
        OpKind::Cpy => {
            let src_ok = s.len() == 1
                && weight_type(s[0].dtype)
                && (!s[0].dtype.is_quantized() || s[0].nb[0] == s[0].dtype.block_bytes());
            let ok = src_ok && same(&s[0], d);
            match d.dtype {
                DType::F32 | DType::F16 | DType::BF16 => {
                    (ok, (Shader::Elementwise, n.div_ceil(256)))
                }
                // Whole blocks from a dense source, one invocation each.
                DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => (
                    ok && d.nb[0] == d.dtype.block_bytes()
                        && matches!(s[0].dtype, DType::F32 | DType::F16 | DType::BF16),
                    (Shader::CpyQuantized, (n / 32).div_ceil(64)),
                ),
                _ => (false, (Shader::Elementwise, 0)),
            }
        }
        // No fused attention shader yet: the host runs attention as
        // products and a softmax on this device instead.
        OpKind::Attention => (false, (Shader::Elementwise, 0)),
        OpKind::RmsNorm | OpKind::Norm => {
            let ok = s.len() == 1 && f32_only(&s[0]) && f32_only(d) && same(&s[0], d);
            (ok, (Shader::Rows, d.n_rows() as u64))
        }
        OpKind::SoftMax => {
            let ok = (s.len() == 1 || s.len() == 2)
                && s.iter().all(f32_only)
                && f32_only(d)
                && same(&s[0], d)
                && (s.len() == 1
                    || (s[1].ne[0] == s[0].ne[0]
                        && (1..4).all(|i| s[0].ne[i].is_multiple_of(s[1].ne[i]))));
            (ok, (Shader::Rows, d.n_rows() as u64))
        }
        OpKind::Rope => {
            let n_rot = params[0];
            let ok = s.len() == 2
                && f32_only(&s[0])
                && f32_only(d)
                && same(&s[0], d)
                && s[1].dtype == DType::I32
                && s[1].ne[0] == s[0].ne[2]
                && s[0].ne[3] == 1
                && n_rot > 0
                && n_rot % 2 == 0
                && n_rot as usize <= s[0].ne[0]
                && matches!(params[1], 0 | 2);
            (ok, (Shader::Rope, n.div_ceil(256)))
        }
        OpKind::GetRows => {
            let ok = s.len() == 2
                && weight_type(s[0].dtype)
                && s[1].dtype == DType::I32
                && f32_only(d)
                && s[0].ne[2] == 1
                && s[0].ne[3] == 1
                && s[1].ne[1..] == [1, 1, 1]
                && d.ne == [s[0].ne[0], s[1].ne[0], 1, 1];
            (ok, (Shader::GetRows, n.div_ceil(256)))
        }
        OpKind::MulMat => {
            let ok = s.len() == 2
                && weight_type(s[0].dtype)
                && (!s[0].dtype.is_quantized() || s[0].nb[0] == s[0].dtype.block_bytes())
                && f32_only(&s[1])
                && f32_only(d)
                && s[0].ne[0] == s[1].ne[0]
                && s[1].ne[2].is_multiple_of(s[0].ne[2])
                && s[1].ne[3].is_multiple_of(s[0].ne[3])
                && d.ne == [s[0].ne[1], s[1].ne[1], s[1].ne[2], s[1].ne[3]];
            let (rows, columns, batches) =
                (d.ne[0] as u64, d.ne[1] as u64, (d.ne[2] * d.ne[3]) as u64);
            if limits.tiles && columns >= TILED_FROM_COLUMNS {
                let groups = rows.div_ceil(TILE) * columns.div_ceil(TILE) * batches;
                let shader = if limits.f64 {
                    Shader::MulMmF64
                } else if limits.dot && s[0].dtype.is_quantized() {
                    Shader::MulMmDot
                } else if limits.fp16 && s[0].dtype == DType::F16 {
                    Shader::MulMmF16
                } else {
                    Shader::MulMm
                };
                (ok, (shader, groups))
            } else {
                let groups = rows * batches * columns.div_ceil(MUL_MAT_COLUMNS);
                let shader = match (limits.f64, limits.subgroups) {
                    (true, true) => Shader::MulMatF64Sg,
                    (true, false) => Shader::MulMatF64,
                    (false, true) => Shader::MulMatSg,
                    (false, false) => Shader::MulMat,
                };
                (ok, (shader, groups))
            }
        }
    };
    if !ok {
        return Err(unsupported(format!(
            "{}: these types or shapes are not supported on Vulkan yet",
            kind
        )));
    }
    let activations = (kind == OpKind::MulMat).then(|| {
        let (words, blocks) = activation_blocks(s[0].dtype, s[0].ne[0] as u64);
        let rows = s[1].n_rows() as u64;
        ((rows * blocks).div_ceil(64), rows * blocks * words * 4)
    });
    let max = u64::from(limits.max_groups);
    let most = groups.max(activations.map_or(0, |(g, _)| g));
    if most > max * max {
        return Err(unsupported(format!(
            "{kind}: {most} workgroups exceed the device's dispatch limit"
        )));
    }
    if let Some((_, bytes)) = activations
        && bytes + limits.offset_align > limits.max_range.min(u32::MAX as u64)
    {
        return Err(unsupported(format!(
            "{kind}: {bytes} bytes of rounded activations exceed the device's binding range"
        )));
    }
    Ok(Plan {
        shader,
        groups,
        split_rows,
        activations,
    })
}
