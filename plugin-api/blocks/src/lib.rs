//! Block formats, shared by the host (quantization, conversion, the
//! conformance gate, the CPU fallback's dequantization) and every backend:
//! scalar dequantization of every weight type and the reference
//! quantizers that llama.cpp's `quantize_row_*_ref` define (F16, BF16,
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), bit for
//! bit.
//!
//! Layouts are ggml's. A row is a whole number of blocks.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use kiln_plugin_api::{DType, interleave};

mod kquant;

const QK: usize = 32;
const QK_K: usize = 256;

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes one row: `src` holds exactly the blocks of `dst.len()` elements.
///
/// Panics if the lengths disagree (callers check shapes first).
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) {
    let bytes = dtype
        .row_bytes(dst.len())
        .expect("row length is a whole number of blocks");
    assert_eq!(src.len(), bytes, "{dtype} row of {} elements", dst.len());
    match dtype {
        DType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        DType::F16 => {
            // As in `quantize_row`: eight values an instruction with F16C.
            let mut h = [f16::ZERO; 64];
            for (d, s) in dst.chunks_mut(64).zip(src.chunks(128)) {
                let h = &mut h[..d.len()];
                for (h, s) in h.iter_mut().zip(s.chunks_exact(2)) {
                    *h = f16::from_le_bytes([s[0], s[1]]);
                }
                h.convert_to_f32_slice(d);
            }
        }
        DType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
        DType::I32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = i32::from_le_bytes([s[0], s[1], s[2], s[3]]) as f32;
            }
        }
        DType::Q4_0 => {
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        DType::Q5_0 => {
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(22)) {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((qs[j] & 0x0f) as u32 | xh0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((qs[j] >> 4) as u32 | xh1) as i32 - 16) as f32 * d;
                }
            }
        }
        DType::Q4_1 => {
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0f) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        DType::Q5_1 => {
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(24)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = &b[8..24];
                for j in 0..16 {
                    let xh0 = ((qh >> j) << 4) & 0x10;
                    let xh1 = (qh >> (j + 12)) & 0x10;
                    y[j] = ((qs[j] & 0x0f) as u32 | xh0) as f32 * d + m;
                    y[j + 16] = ((qs[j] >> 4) as u32 | xh1) as f32 * d + m;
                }
            }
        }
        DType::IQ4_NL => {
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..18].iter().enumerate() {
                    y[j] = d * IQ4_VALUES[(q & 0x0f) as usize] as f32;
                    y[j + 16] = d * IQ4_VALUES[(q >> 4) as usize] as f32;
                }
            }
        }
        DType::IQ4_XS => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(136)) {
                let d = f16_at(b, 0);
                let scales_h = u16::from_le_bytes([b[2], b[3]]);
                let scales_l = &b[4..8];
                for (ib, (y32, qs)) in y
                    .chunks_exact_mut(32)
                    .zip(b[8..136].chunks_exact(16))
                    .enumerate()
                {
                    let dl = d * (iq4_xs_scale(scales_l, scales_h, ib) - 32) as f32;
                    for (j, &q) in qs.iter().enumerate() {
                        y32[j] = dl * IQ4_VALUES[(q & 0x0f) as usize] as f32;
                        y32[j + 16] = dl * IQ4_VALUES[(q >> 4) as usize] as f32;
                    }
                }
            }
        }
        DType::Q2_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(84)) {
                let (scales, q) = (&b[0..16], &b[16..80]);
                let (d, min) = (f16_at(b, 80), f16_at(b, 82));
                for (i, y16) in y.chunks_exact_mut(16).enumerate() {
                    // Sub-block i: half n of the block, shift 2j, bytes
                    // 16·(i % 2) of that half's 32.
                    let (n, j, h) = (i / 8, (i % 8) / 2, i % 2);
                    let sc = scales[i];
                    let (dl, ml) = (d * (sc & 0x0f) as f32, min * (sc >> 4) as f32);
                    for (l, v) in y16.iter_mut().enumerate() {
                        *v = dl * ((q[32 * n + 16 * h + l] >> (2 * j)) & 3) as f32 - ml;
                    }
                }
            }
        }
        DType::Q3_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(110)) {
                let (hm, q) = (&b[0..32], &b[32..96]);
                let scales = q3_k_scales(&b[96..108]);
                let d = f16_at(b, 108);
                for (i, y16) in y.chunks_exact_mut(16).enumerate() {
                    let (n, j, h) = (i / 8, (i % 8) / 2, i % 2);
                    let dl = d * (scales[i] as i32 - 32) as f32;
                    let m = 1u8 << (4 * n + j);
                    for (l, v) in y16.iter_mut().enumerate() {
                        let at = 16 * h + l;
                        let low = ((q[32 * n + at] >> (2 * j)) & 3) as i32;
                        let high = if hm[at] & m != 0 { 0 } else { 4 };
                        *v = dl * (low - high) as f32;
                    }
                }
            }
        }
        DType::Q4_0X16 | DType::Q5_0X16 => {
            let mut plain = vec![0u8; src.len()];
            interleave::unpack(dtype, src, &mut plain);
            dequantize_row(interleave::plain(dtype), &plain, dst);
        }
        DType::Q8_0 => {
            for (y, b) in dst.chunks_exact_mut(QK).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (v, &q) in y.iter_mut().zip(&b[2..34]) {
                    *v = (q as i8) as f32 * d;
                }
            }
        }
        DType::Q4_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(144)) {
                let d = f16_at(b, 0);
                let min = f16_at(b, 2);
                let scales = &b[4..16];
                let q = &b[16..144];
                for (j, (y64, q32)) in y.chunks_exact_mut(64).zip(q.chunks_exact(32)).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * j, scales);
                    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                    for l in 0..32 {
                        y64[l] = d1 * (q32[l] & 0x0f) as f32 - m1;
                        y64[l + 32] = d2 * (q32[l] >> 4) as f32 - m2;
                    }
                }
            }
        }
        DType::Q5_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(176)) {
                let d = f16_at(b, 0);
                let min = f16_at(b, 2);
                let scales = &b[4..16];
                let qh = &b[16..48];
                let ql = &b[48..176];
                let (mut u1, mut u2) = (1u8, 2u8);
                for (j, (y64, q32)) in y.chunks_exact_mut(64).zip(ql.chunks_exact(32)).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * j, scales);
                    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                    for l in 0..32 {
                        let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        y64[l] = d1 * ((q32[l] & 0x0f) + h1) as f32 - m1;
                        y64[l + 32] = d2 * ((q32[l] >> 4) + h2) as f32 - m2;
                    }
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
        }
        DType::Q6_K => {
            for (y, b) in dst.chunks_exact_mut(QK_K).zip(src.chunks_exact(210)) {
                let ql = &b[0..128];
                let qh = &b[128..192];
                let sc = &b[192..208];
                let d = f16_at(b, 208);
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let y = &mut y[128 * n..];
                    for l in 0..32 {
                        let is = l / 16;
                        let [q1, q2, q3, q4] = q6_k_codes(ql, qh, l);
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// IQ4_NL's and IQ4_XS's sixteen code values (ggml's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The 6-bit scale (before the −32) of sub-block `ib` of an IQ4_XS block.
#[inline(always)]
pub fn iq4_xs_scale(scales_l: &[u8], scales_h: u16, ib: usize) -> i32 {
    (((scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0f) as u16 | (((scales_h >> (2 * ib)) & 3) << 4))
        as i32
}

/// The sixteen 6-bit scales (before the −32) of a Q3_K block, from its 12
/// packed bytes: low nibbles in bytes 0..8, high bit pairs in 8..12.
#[inline(always)]
pub fn q3_k_scales(packed: &[u8]) -> [u8; 16] {
    std::array::from_fn(|i| {
        let low = if i < 8 {
            packed[i] & 0x0f
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        low | (high << 4)
    })
}

/// The codes of elements l, l+32, l+64 and l+96 of a Q6_K half-block
/// (`ql` from byte 64n, `qh` from byte 32n), each in [-32, 31].
#[inline(always)]
pub fn q6_k_codes(ql: &[u8], qh: &[u8], l: usize) -> [i32; 4] {
    [
        ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32,
        ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
        ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
        ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
    ]
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Whether [`quantize_row`] can write this type.
pub const fn can_quantize(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::F32
            | DType::F16
            | DType::BF16
            | DType::Q4_0
            | DType::Q4_1
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q8_0
            | DType::Q2_K
            | DType::Q3_K
            | DType::Q4_K
            | DType::Q5_K
            | DType::Q6_K
    )
}

/// llama.cpp's `nearest_int`: round half to even through the float
/// mantissa trick (valid for |v| <= 4194303).
#[inline(always)]
pub fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// The signed value of largest magnitude (the first one on ties), as
/// llama.cpp's Q4_0/Q5_0 reference picks it.
pub(crate) fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Quantizes one row with llama.cpp's reference algorithm. `dst` holds
/// exactly the blocks of `src.len()` elements.
///
/// Panics for types [`can_quantize`] rejects or mismatched lengths.
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) {
    let bytes = dtype
        .row_bytes(src.len())
        .expect("row length is a whole number of blocks");
    assert_eq!(dst.len(), bytes, "{dtype} row of {} elements", src.len());
    match dtype {
        DType::F32 => {
            for (d, s) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&s.to_le_bytes());
            }
        }
        DType::F16 => {
            // Through `half`'s slice conversion: eight values an
            // instruction where the CPU has F16C, the same rounding as
            // `f16::from_f32` (a KV cache's rows are written this way).
            let mut h = [f16::ZERO; 64];
            for (d, s) in dst.chunks_mut(128).zip(src.chunks(64)) {
                let h = &mut h[..s.len()];
                h.convert_from_f32_slice(s);
                for (d, h) in d.chunks_exact_mut(2).zip(h.iter()) {
                    d.copy_from_slice(&h.to_le_bytes());
                }
            }
        }
        DType::BF16 => {
            for (d, s) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&bf16::from_f32(*s).to_le_bytes());
            }
        }
        DType::Q4_0 => {
            for (b, x) in dst.chunks_exact_mut(18).zip(src.chunks_exact(QK)) {
                let d = signed_absmax(x) / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..16 {
                    let x0 = x[j] * id;
                    let x1 = x[j + 16] * id;
                    let q0 = ((x0 + 8.5) as i8).min(15) as u8;
                    let q1 = ((x1 + 8.5) as i8).min(15) as u8;
                    b[2 + j] = q0 | (q1 << 4);
                }
            }
        }
        DType::Q5_0 => {
            for (b, x) in dst.chunks_exact_mut(22).zip(src.chunks_exact(QK)) {
                let d = signed_absmax(x) / -16.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                let mut qh = 0u32;
                for j in 0..16 {
                    let x0 = x[j] * id;
                    let x1 = x[j + 16] * id;
                    let q0 = ((x0 + 16.5) as i8).min(31) as u8;
                    let q1 = ((x1 + 16.5) as i8).min(31) as u8;
                    b[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
                    qh |= (((q0 & 0x10) >> 4) as u32) << j;
                    qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
                }
                b[2..6].copy_from_slice(&qh.to_le_bytes());
            }
        }
        DType::Q4_1 | DType::Q5_1 => {
            let five = dtype == DType::Q5_1;
            let (bytes, levels) = if five { (24, 31.0f32) } else { (20, 15.0) };
            for (b, x) in dst.chunks_exact_mut(bytes).zip(src.chunks_exact(QK)) {
                let (min, max) = x
                    .iter()
                    .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let d = (max - min) / levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                b[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
                // C's (int8_t)/(uint8_t) casts truncate, as `as` does here.
                let code = |v: f32| {
                    let q = (v - min) * id + 0.5;
                    if five {
                        q as u8
                    } else {
                        (q as i8).min(15) as u8
                    }
                };
                let qs_at = if five { 8 } else { 4 };
                let mut qh = 0u32;
                for j in 0..16 {
                    let (q0, q1) = (code(x[j]), code(x[j + 16]));
                    b[qs_at + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
                    qh |= (((q0 & 0x10) >> 4) as u32) << j;
                    qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
                }
                if five {
                    b[4..8].copy_from_slice(&qh.to_le_bytes());
                }
            }
        }
        DType::Q8_0 => {
            for (b, x) in dst.chunks_exact_mut(34).zip(src.chunks_exact(QK)) {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                for (q, v) in b[2..34].iter_mut().zip(x) {
                    *q = (v * id).round() as i8 as u8;
                }
            }
        }
        DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K => {
            let block: fn(&[f32], &mut [u8]) = match dtype {
                DType::Q2_K => kquant::quantize_block_q2_k,
                DType::Q3_K => kquant::quantize_block_q3_k,
                DType::Q4_K => kquant::quantize_block_q4_k,
                DType::Q5_K => kquant::quantize_block_q5_k,
                _ => kquant::quantize_block_q6_k,
            };
            let bytes = dtype.block_bytes();
            for (b, x) in dst.chunks_exact_mut(bytes).zip(src.chunks_exact(QK_K)) {
                block(x, b);
            }
        }
        other => panic!("no reference quantizer for {other}"),
    }
}

/// Rounds activations the way llama.cpp's CPU backend does before a dot
/// product with weights of type `weights` (its `vec_dot_type`): to F16 for
/// F16 weights, BF16 for BF16, 8-bit blocks of 32 (Q8_0) for Q4_0, Q5_0,
/// Q8_0 and IQ4_NL, the same values for Q4_1/Q5_1 (Q8_1, whose per-block
/// code sum [`q8_1_sums`] gives), 8-bit blocks of 256 with an f32 scale
/// (Q8_K) for the K-quants and IQ4_XS; F32 weights see the activations as
/// they are. Matching this is what makes kiln's logits agree with
/// llama.cpp's.
pub fn round_activations(weights: DType, x: &mut [f32]) {
    match weights {
        DType::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        DType::BF16 => x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        // Every type of 32-element blocks.
        d if d.block_len() == QK => {
            for block in x.chunks_mut(QK) {
                // As ggml's x86 quantize_row_q8_0: id = 127/amax, round
                // half to even, the scale stored as f16.
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = q8_0_scale_of(amax);
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                for v in block.iter_mut() {
                    *v = (*v * id).round_ties_even() * d;
                }
            }
        }
        // Every type of 256-element blocks (the K-quants, IQ4_XS).
        d if d.block_len() == QK_K => {
            for block in x.chunks_mut(QK_K) {
                // ggml's quantize_row_q8_K: signed max, iscale = -127/max.
                let max = signed_absmax(block);
                if max == 0.0 {
                    continue;
                }
                let iscale = -127.0 / max;
                let d = 1.0 / iscale;
                for v in block.iter_mut() {
                    *v = nearest_int(iscale * *v).min(127) as f32 * d;
                }
            }
        }
        _ => {}
    }
}

/// The scale `d` (an f16 value) that [`round_activations`] gives a block
/// of 32 activations for Q8_0: `amax / 127`, rounded to f16.
pub fn q8_0_scale(block: &[f32]) -> f32 {
    q8_0_scale_of(block.iter().fold(0.0f32, |m, v| m.max(v.abs())))
}

/// [`q8_0_scale`] from the block's largest magnitude.
fn q8_0_scale_of(amax: f32) -> f32 {
    f16::from_f32(amax / 127.0).to_f32()
}

/// The `s` of each Q8_1 block of `x` (unrounded activations, whole blocks
/// of 32): `d · Σ codes` rounded to f16, with `d = amax / 127` before its
/// own rounding, as ggml's x86 `quantize_row_q8_1` computes it. Q4_1 and
/// Q5_1 dot products take a block's minimum times this.
pub fn q8_1_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(QK)
        .map(|block| {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let sum: i32 = block.iter().map(|v| nearest_int(v * id)).sum();
            f16::from_f32(amax / 127.0 * sum as f32).to_f32()
        })
        .collect()
}

/// Lanes of [`float_dot`]'s sums: an AVX2 register of f32.
pub const FLOAT_DOT_LANES: usize = 8;

/// The dot product of F16 or BF16 weights `w` (widened to f32) with
/// activations `x` rounded to the same type ([`round_activations`]), in
/// the one order every kiln kernel for float weights follows, so that each
/// gives these bits: [`fused_dot`]'s. Two f16 or bf16 values' product is
/// exact in f32 (save a bf16 one below f32's normal range or beyond its
/// largest value), so here most products are added as they are, which
/// rounds as a fused multiply-add does, without `mul_add`'s library call
/// on CPUs built without FMA.
/// llama.cpp sums these products in f32 lanes too, in an order of its own
/// per ISA.
pub fn float_dot(w: impl IntoIterator<Item = f32>, x: &[f32]) -> f32 {
    lanes_dot::<true>(w, x)
}

/// The dot product of float weights `w` with activations `x`, in the one
/// order every kiln kernel for F16, BF16 and F32 weights follows: the rows
/// zero-padded to a multiple of [`FLOAT_DOT_LANES`]; product `i` added to
/// lane `i mod 8` by a fused multiply-add (one rounding), each lane's
/// products in order; then the lanes added as [`sum_lanes`] does. F32
/// weights (whose products with f32 activations are not exact) take this
/// one; F16 and BF16 the same sums through [`float_dot`].
pub fn fused_dot(w: impl IntoIterator<Item = f32>, x: &[f32]) -> f32 {
    lanes_dot::<false>(w, x)
}

/// [`fused_dot`]; `EXACT`: the products of these values are exact in f32
/// where they are normal and finite, so those are added as they are.
fn lanes_dot<const EXACT: bool>(w: impl IntoIterator<Item = f32>, x: &[f32]) -> f32 {
    let mut acc = [0f32; FLOAT_DOT_LANES];
    let mut n = 0;
    for (i, (w, &x)) in w.into_iter().zip(x).enumerate() {
        let lane = i % FLOAT_DOT_LANES;
        acc[lane] = if EXACT {
            let p = w * x;
            // `mul_add` is a library call without FMA; the product is
            // exact (so the sum rounds once, as a fused one does) unless
            // it is nonzero and below the normal range, or beyond the
            // largest f32.
            let exact = (p.abs() >= f32::MIN_POSITIVE && p.is_finite()) || w == 0.0 || x == 0.0;
            if exact {
                acc[lane] + p
            } else {
                w.mul_add(x, acc[lane])
            }
        } else {
            w.mul_add(x, acc[lane])
        };
        n = i + 1;
    }
    assert_eq!(n, x.len(), "as many weights as activations");
    // A short last chunk's lanes add the padding's product, +0.0 (which
    // turns a −0.0 lane into +0.0, as a vector kernel's zero-filled load
    // does).
    if n % FLOAT_DOT_LANES != 0 {
        for a in &mut acc[n % FLOAT_DOT_LANES..] {
            *a += 0.0;
        }
    }
    sum_lanes(acc)
}

/// [`float_dot`]'s last step: lanes `j` and `j + 4` added, then `j` and
/// `j + 2` of those, then the two left.
pub fn sum_lanes(a: [f32; FLOAT_DOT_LANES]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// Partial sums of [`q8_dot`]: block `b`'s term goes to partial `b mod 4`.
pub const Q8_DOT_LANES: usize = 4;

/// One block's term of a dot product of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or
/// IQ4_NL weights with activations in Q8_0 (Q8_1) blocks: `d = d_w · d_x`
/// (two f16 values: exact in f32), `sum` the block's integer sum of code
/// products (at most 32 · 128 · 128: exact in f32), and for Q4_1/Q5_1 the
/// minimum's term `m_w · s_x` (two f16 values again: exact).
#[derive(Clone, Copy, Debug)]
pub struct Q8Term {
    pub d: f32,
    pub sum: i32,
    pub min: Option<f32>,
}

/// The dot product of a row of Q8-family weights with Q8_0 activations
/// from its blocks' terms, in the one order every kiln kernel for these
/// types follows, so that each gives these bits: block `b`'s term goes to
/// f32 partial `b mod 4` as `fma(d, sum, partial)` (one rounding), or, with
/// a minimum, as `partial + fma(d, sum, min)` (ggml's per-block order for
/// Q4_1/Q5_1); then the partials are added `(0 + 2) + (1 + 3)`. llama.cpp
/// sums these in f32 too, in an order of its own per ISA. Four partials
/// suit every kernel: the decode kernels that give each block a lane take
/// 4 blocks a step, and the GEMMs that give each weight row a lane keep 4
/// accumulators per activation row.
pub fn q8_dot(terms: impl IntoIterator<Item = Q8Term>) -> f32 {
    let mut acc = [0f32; Q8_DOT_LANES];
    for (b, t) in terms.into_iter().enumerate() {
        q8_add(&mut acc, b, t);
    }
    q8_sum(acc)
}

/// [`q8_dot`]'s step: block `b`'s term into its partial.
#[inline]
pub fn q8_add(partials: &mut [f32; Q8_DOT_LANES], b: usize, t: Q8Term) {
    let p = &mut partials[b % Q8_DOT_LANES];
    *p = match t.min {
        None => t.d.mul_add(t.sum as f32, *p),
        Some(m) => *p + t.d.mul_add(t.sum as f32, m),
    };
}

/// [`q8_dot`]'s last step: the partials added `(0 + 2) + (1 + 3)`.
#[inline]
pub fn q8_sum(p: [f32; Q8_DOT_LANES]) -> f32 {
    (p[0] + p[2]) + (p[1] + p[3])
}

/// A Q4_1 or Q5_1 row as the dot product uses it: each weight's `d · q`
/// (exact in f32) in `scaled`, each block's minimum in `mins`.
pub fn split_min_row(dtype: DType, src: &[u8], scaled: &mut [f32], mins: &mut [f32]) {
    let bytes = dtype.block_bytes();
    assert!(matches!(dtype, DType::Q4_1 | DType::Q5_1));
    assert_eq!(src.len(), scaled.len() / QK * bytes);
    for ((b, y), m) in src
        .chunks_exact(bytes)
        .zip(scaled.chunks_exact_mut(QK))
        .zip(mins.iter_mut())
    {
        let mut plain = [0u8; 24];
        plain[..bytes].copy_from_slice(b);
        // The minimum apart: dequantize the block with a zero minimum.
        plain[2..4].copy_from_slice(&[0, 0]);
        dequantize_row(dtype, &plain[..bytes], y);
        *m = f16_at(b, 2);
    }
}

/// A random row of `n` elements of `dtype`, for conformance runs and
/// benchmarks. Plain and reference-quantizable types quantize uniform
/// values in [-1, 1); K-quant blocks get random codes with sane scales.
pub fn random_row(dtype: DType, n: usize, rng: &mut fastrand::Rng) -> Vec<u8> {
    let bytes = dtype.row_bytes(n).expect("whole blocks");
    let mut out = vec![0u8; bytes];
    if can_quantize(dtype) {
        let values: Vec<f32> = (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect();
        quantize_row(dtype, &values, &mut out);
        return out;
    }
    if interleave::is_interleaved(dtype) {
        let mut row = random_row(interleave::plain(dtype), n, rng);
        interleave::pack(dtype, &mut row);
        return row;
    }
    if dtype == DType::I32 {
        for c in out.chunks_exact_mut(4) {
            c.copy_from_slice(&rng.i32(-1000..1000).to_le_bytes());
        }
        return out;
    }
    rng.fill(&mut out);
    let scale = |rng: &mut fastrand::Rng, lo: f32, hi: f32| {
        f16::from_f32(lo + rng.f32() * (hi - lo)).to_le_bytes()
    };
    for b in out.chunks_exact_mut(dtype.block_bytes()) {
        match dtype {
            DType::Q4_K | DType::Q5_K => {
                b[0..2].copy_from_slice(&scale(rng, 0.001, 0.01));
                b[2..4].copy_from_slice(&scale(rng, 0.001, 0.01));
            }
            DType::Q2_K => {
                b[80..82].copy_from_slice(&scale(rng, 0.001, 0.01));
                b[82..84].copy_from_slice(&scale(rng, 0.001, 0.01));
            }
            DType::Q3_K => b[108..110].copy_from_slice(&scale(rng, 0.0005, 0.005)),
            DType::IQ4_NL => b[0..2].copy_from_slice(&scale(rng, 0.0005, 0.005)),
            DType::IQ4_XS => b[0..2].copy_from_slice(&scale(rng, 0.00005, 0.0005)),
            _ => unreachable!("{dtype} is handled above"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(dtype: DType, x: &[f32]) -> Vec<f32> {
        let mut q = vec![0u8; dtype.row_bytes(x.len()).unwrap()];
        quantize_row(dtype, x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row(dtype, &q, &mut y);
        y
    }

    #[test]
    fn q8_0_matches_hand_computed_block() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let mut q = [0u8; 34];
        quantize_row(DType::Q8_0, &x, &mut q);
        // amax 16 -> d = 16/127 (as f16), codes = round(x * 127/16).
        assert_eq!(f16_at(&q, 0), f16::from_f32(16.0 / 127.0).to_f32());
        assert_eq!(q[2] as i8, -127);
        assert_eq!(q[2 + 8] as i8, (-8.0f32 * 127.0 / 16.0).round() as i8);
        assert_eq!(q[2 + 16] as i8, 0);
    }

    #[test]
    fn q4_0_uses_signed_max_and_clamps() {
        let mut x = vec![0.5f32; 32];
        x[3] = -2.0; // the signed max: d = -2 / -8 = 0.25
        let mut q = [0u8; 18];
        quantize_row(DType::Q4_0, &x, &mut q);
        assert_eq!(f16_at(&q, 0), 0.25);
        // x[3] * (1/d) = -8 -> -8 + 8.5 = 0.5 -> 0
        assert_eq!(q[2 + 3] & 0x0f, 0);
        // 0.5 * 4 = 2 -> 10.5 -> 10
        assert_eq!(q[2] & 0x0f, 10);
        let y = round_trip(DType::Q4_0, &x);
        assert_eq!(y[3], -2.0);
        assert_eq!(y[0], 0.5);
    }

    #[test]
    fn round_trip_errors_stay_within_half_a_step() {
        let mut rng = fastrand::Rng::with_seed(7);
        for dtype in [
            DType::Q4_0,
            DType::Q5_0,
            DType::Q8_0,
            DType::F16,
            DType::BF16,
        ] {
            let x: Vec<f32> = (0..96).map(|_| rng.f32() * 2.0 - 1.0).collect();
            let y = round_trip(dtype, &x);
            for blk in 0..3 {
                let xs = &x[blk * 32..][..32];
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = match dtype {
                    DType::Q4_0 => amax / 8.0,
                    DType::Q5_0 => amax / 16.0,
                    DType::Q8_0 => amax / 127.0,
                    DType::F16 => amax / 1024.0,
                    _ => amax / 128.0,
                };
                // Q4_0/Q5_0 scale by the signed max, so the opposite
                // extreme clamps to the last code: up to one whole step.
                let slack = if matches!(dtype, DType::Q4_0 | DType::Q5_0) {
                    1.01
                } else {
                    0.51
                };
                for i in 0..32 {
                    let (a, b) = (xs[i], y[blk * 32 + i]);
                    // Plus the f16 rounding of the scale.
                    assert!(
                        (a - b).abs() <= step * slack + 1e-3 * amax,
                        "{dtype} {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn q5_0_high_bits_survive() {
        // Values spanning the full 5-bit range exercise qh.
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) / 16.0).collect();
        let y = round_trip(DType::Q5_0, &x);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 0.07, "{a} vs {b}");
        }
    }

    #[test]
    fn k_quant_blocks_dequantize_from_their_fields() {
        // A Q4_K block with d = 1, dmin = 0, sub-block scales j+1, codes 0..15.
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        for j in 0..4 {
            b[4 + j] = (j + 1) as u8; // scales 0..3
            b[12 + j] = (j + 5) as u8 & 0x0f; // low nibbles of scales 4..7
        }
        for (i, q) in b[16..].iter_mut().enumerate() {
            *q = (i % 16) as u8 | (((i + 1) % 16) as u8) << 4;
        }
        let mut y = vec![0f32; 256];
        dequantize_row(DType::Q4_K, &b, &mut y);
        assert_eq!(y[0], 0.0); // scale 1 * code 0
        assert_eq!(y[1], 1.0); // scale 1 * code 1
        // Sub-block 1 (elements 32..64) uses the high nibbles with scale 2.
        assert_eq!(y[32], 2.0 * 1.0);
        assert_eq!(y[33], 2.0 * 2.0);
        // Sub-block 4 (elements 128..160) uses scale 5.
        assert_eq!(y[128 + 2], 5.0 * ((64 + 2) % 16) as f32);
    }

    #[test]
    fn q6_k_round_trip_is_close() {
        let mut rng = fastrand::Rng::with_seed(3);
        let x: Vec<f32> = (0..512).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let y = round_trip(DType::Q6_K, &x);
        let err: f32 = x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / 512.0;
        // 6-bit codes with per-16 scales: RMS error well under 1% of the range.
        assert!(err.sqrt() < 0.01, "rmse {}", err.sqrt());
        assert_eq!(round_trip(DType::Q6_K, &[0.0; 256]), vec![0.0; 256]);
    }

    #[test]
    fn k_quant_round_trips_shrink_with_the_bits() {
        // Uniform values in [-1, 1): the error of each K-quant stays under
        // its step's bound and falls as the bits grow; zeros stay zeros and
        // a constant block comes back close.
        let mut rng = fastrand::Rng::with_seed(4);
        let x: Vec<f32> = (0..1024).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let mut last = f32::MAX;
        for (dtype, bound) in [
            (DType::Q2_K, 0.25),
            (DType::Q3_K, 0.12),
            (DType::Q4_K, 0.06),
            (DType::Q5_K, 0.03),
            (DType::Q6_K, 0.01),
        ] {
            let y = round_trip(dtype, &x);
            let rmse = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
                / x.len() as f32)
                .sqrt();
            assert!(rmse < bound && rmse < last, "{dtype}: rmse {rmse}");
            last = rmse;
            assert_eq!(round_trip(dtype, &[0.0; 256]), vec![0.0; 256], "{dtype}");
            let c = round_trip(dtype, &[0.75; 256]);
            assert!(c.iter().all(|v| (v - 0.75).abs() < 0.05), "{dtype}: {c:?}");
        }
    }

    #[test]
    fn activations_round_to_the_dot_product_type() {
        let mut x: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 100.0).collect();
        let orig = x.clone();
        round_activations(DType::F32, &mut x);
        assert_eq!(x, orig);
        round_activations(DType::Q8_0, &mut x);
        // Each 32-block has at most 255 distinct levels and stays close.
        for (a, b) in orig.iter().zip(&x) {
            assert!((a - b).abs() <= 1.28 / 127.0, "{a} {b}");
        }
        let mut y = orig.clone();
        round_activations(DType::F16, &mut y);
        assert!(
            y.iter()
                .zip(&orig)
                .all(|(a, b)| (a - b).abs() <= b.abs() / 1024.0)
        );
        let mut z = orig.clone();
        round_activations(DType::Q6_K, &mut z);
        assert!(
            z.iter()
                .zip(&orig)
                .all(|(a, b)| (a - b).abs() <= 1.28 / 127.0 * 0.51 + 1e-6)
        );
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [
                nearest_int(0.5),
                nearest_int(1.5),
                nearest_int(-2.5),
                nearest_int(2.6)
            ],
            [0, 2, -2, 3]
        );
    }

    #[test]
    fn f16_rows_convert_as_each_value_does() {
        // The slice conversions (F16C eight at a time) against `half`'s
        // one-value ones, at lengths around their chunks of 64, with
        // ties, subnormals, overflow, infinities and NaN.
        let mut rng = fastrand::Rng::with_seed(3);
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            6e-8,
            3e-8,
            1e-10,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.000_488_3,
            2049.0,
            2051.0,
        ];
        for n in [1, 7, 63, 64, 65, 128, 200] {
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 3 == 0 {
                        specials[i % specials.len()]
                    } else {
                        (rng.f32() - 0.5) * 10f32.powi(rng.i32(-9..6))
                    }
                })
                .collect();
            let mut row = vec![0u8; 2 * n];
            quantize_row(DType::F16, &x, &mut row);
            for (i, v) in x.iter().enumerate() {
                let want = f16::from_f32(*v).to_bits();
                let got = u16::from_le_bytes([row[2 * i], row[2 * i + 1]]);
                assert!(
                    got == want || v.is_nan() && f16::from_bits(got).is_nan(),
                    "n={n} value {i} ({v:e}): {got:#06x} against {want:#06x}"
                );
            }
            let mut back = vec![0f32; n];
            dequantize_row(DType::F16, &row, &mut back);
            for (i, b) in back.iter().enumerate() {
                let want = f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32();
                assert!(
                    b.to_bits() == want.to_bits() || b.is_nan() && want.is_nan(),
                    "n={n} value {i}: {b:e} against {want:e}"
                );
            }
        }
    }

    #[test]
    fn random_rows_are_finite() {
        let mut rng = fastrand::Rng::with_seed(1);
        for dtype in DType::WEIGHTS {
            let n = 512;
            let row = random_row(dtype, n, &mut rng);
            let mut y = vec![0f32; n];
            dequantize_row(dtype, &row, &mut y);
            assert!(y.iter().all(|v| v.is_finite()), "{dtype}");
            assert!(y.iter().any(|v| *v != 0.0), "{dtype}");
        }
    }
}
