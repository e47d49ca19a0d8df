//! llama.cpp's reference K-quant quantizers (`quantize_row_q{2..6}_K_ref`,
//! which `llama_model_quantize` uses when no importance matrix is given),
//! one 256-element block at a time, bit for bit.
//!
//! They live in ggml-base, which llama.cpp builds for baseline x86-64, so
//! nothing there is fused: every multiply and add below is a plain f32
//! operation in llama.cpp's order, and C's integer conversions are spelled
//! out where they truncate. The loops keep llama.cpp's indices, so that
//! each line can be read against its C.
#![allow(clippy::needless_range_loop)]

use crate::{QK_K, nearest_int, signed_absmax};
use half::f16;

const GROUP_MAX_EPS: f32 = 1e-15;

fn f16_round(v: f32) -> (f16, f32) {
    let h = f16::from_f32(v);
    (h, h.to_f32())
}

/// `make_qx_quants` with `rmse_type = 1` and no importance weights: a
/// symmetric scale for `x` with codes in [-nmax, nmax), refined by trying
/// 18 nearby scales and keeping the one with the best weighted error.
/// Codes come back offset by `nmax`.
fn make_qx_quants(nmax: i32, x: &[f32], codes: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        codes.iter_mut().for_each(|c| *c = 0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = clamp(nearest_int(iscale * v)) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nmaxf / max;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (clamp(nearest_int(iscale * v)) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = (clamp(nearest_int(iscale * v)) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants` with `do_rmse`: a symmetric scale with codes in
/// [-nmax, nmax), improved one code at a time (up to 5 passes) while the
/// weighted error drops. Codes come back offset by `nmax`.
fn make_q3_quants(nmax: i32, x: &[f32], codes: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        codes.iter_mut().for_each(|c| *c = 0);
        return 0.0;
    }
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (c, &v) in codes.iter_mut().zip(x) {
        let l = clamp(nearest_int(iscale * v));
        *c = l as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (c, &v) in codes.iter_mut().zip(x) {
            let w = v * v;
            let old = *c as f32;
            let mut slx = sumlx - w * v * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new = clamp(nearest_int(v * sl2 / slx));
                if new != *c as i32 {
                    let newf = new as f32;
                    slx += w * v * newf;
                    sl2 += w * newf * newf;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *c = new as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    codes.iter_mut().for_each(|c| *c += nmax as i8);
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// `make_qkx2_quants`: an asymmetric scale and min (returned as the
/// positive amount to subtract) for `x` with codes in [0, nmax], searched
/// over `nstep + 1` scales around the range's, each error weighted by
/// `weights` (absolute with `use_mad`, else squared).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    codes: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.iter_mut().for_each(|c| *c = 0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        codes[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut aux = [0u8; 32];
    let aux = &mut aux[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                codes.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Four 2-bit codes per byte: element `l` of each 32-wide quarter of a
/// 128-element half in bits 0-1, 2-3, 4-5, 6-7.
fn pack_2bit(codes: &[u8; QK_K], qs: &mut [u8]) {
    for (half, q) in qs.chunks_exact_mut(32).enumerate() {
        let c = &codes[128 * half..];
        for l in 0..32 {
            q[l] = c[l] | (c[l + 32] << 2) | (c[l + 64] << 4) | (c[l + 96] << 6);
        }
    }
}

/// Q2_K: `scales[16]` (4-bit scale | 4-bit min), `qs[64]`, `d`, `dmin`.
pub(crate) fn quantize_block_q2_k(x: &[f32], b: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut codes = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|l| xs[l].abs());
        let c = &mut codes[16 * j..16 * j + 16];
        (scales[j], mins[j]) = make_qkx2_quants(3, xs, &weights, c, -0.5, 0.1, 15, true);
        max_scale = max_scale.max_c(scales[j]);
        max_min = max_min.max_c(mins[j]);
    }
    let (sc, rest) = b.split_at_mut(16);
    let (qs, dd) = rest.split_at_mut(64);
    let d = if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for (s, &scale) in sc.iter_mut().zip(&scales) {
            *s = nearest_int(iscale * scale) as u8;
        }
        f16_round(max_scale / Q4SCALE)
    } else {
        sc.iter_mut().for_each(|s| *s = 0);
        f16_round(0.0)
    };
    let dmin = if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for (s, &min) in sc.iter_mut().zip(&mins) {
            *s |= (nearest_int(iscale * min) << 4) as u8;
        }
        f16_round(max_min / Q4SCALE)
    } else {
        f16_round(0.0)
    };
    dd[0..2].copy_from_slice(&d.0.to_le_bytes());
    dd[2..4].copy_from_slice(&dmin.0.to_le_bytes());
    for j in 0..16 {
        let dj = d.1 * (sc[j] & 0x0f) as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.1 * (sc[j] >> 4) as f32;
        for i in 16 * j..16 * j + 16 {
            codes[i] = nearest_int((x[i] + dm) / dj).clamp(0, 3) as u8;
        }
    }
    pack_2bit(&codes, qs);
}

/// Q3_K: `hmask[32]`, `qs[64]`, `scales[12]` (16 signed 6-bit scales),
/// `d`.
pub(crate) fn quantize_block_q3_k(x: &[f32], b: &mut [u8]) {
    let mut codes = [0i8; QK_K];
    let scales: [f32; 16] = std::array::from_fn(|j| {
        make_q3_quants(4, &x[16 * j..16 * j + 16], &mut codes[16 * j..16 * j + 16])
    });
    let max_scale = signed_absmax(&scales);
    let (hmask, rest) = b.split_at_mut(32);
    let (qs, rest) = rest.split_at_mut(64);
    let (sc, dd) = rest.split_at_mut(12);
    sc.iter_mut().for_each(|s| *s = 0);
    let d = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &scale) in scales.iter().enumerate() {
            // C stores nearest_int's result in an int8_t first.
            let l = (nearest_int(iscale * scale) as i8).clamp(-32, 31) + 32;
            let l = l as u8;
            if j < 8 {
                sc[j] = l & 0x0f;
            } else {
                sc[j - 8] |= (l & 0x0f) << 4;
            }
            sc[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
        }
        f16_round(1.0 / iscale)
    } else {
        f16_round(0.0)
    };
    dd[0..2].copy_from_slice(&d.0.to_le_bytes());
    let six = crate::q3_k_scales(sc);
    for j in 0..16 {
        let dj = d.1 * (six[j] as i32 - 32) as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            codes[i] = (nearest_int(x[i] / dj).clamp(-4, 3) + 4) as i8;
        }
    }
    hmask.iter_mut().for_each(|h| *h = 0);
    let mut low = [0u8; QK_K];
    for (j, (&c, lo)) in codes.iter().zip(low.iter_mut()).enumerate() {
        let mut c = c as u8;
        if c > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            c -= 4;
        }
        *lo = c;
    }
    pack_2bit(&low, qs);
}

/// The Q4_K/Q5_K search for one block: per 32-element sub-block a scale
/// and a min with codes in [0, nmax], packed into 6-bit pairs; returns the
/// final codes, requantized against the rounded scales.
fn k_scales_mins(x: &[f32], nmax: i32, rmin: f32, nstep: i32, b: &mut [u8]) -> [u8; QK_K] {
    let mut codes = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + xs[l].abs());
        let c = &mut codes[32 * j..32 * j + 32];
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &weights, c, rmin, 0.1, nstep, false);
        max_scale = max_scale.max_c(scales[j]);
        max_min = max_min.max_c(mins[j]);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut b[4..16];
    for j in 0..8 {
        // C stores nearest_int's result in a uint8_t before the MIN.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16_round(max_scale / 63.0);
    let dmin = f16_round(max_min / 63.0);
    b[0..2].copy_from_slice(&d.0.to_le_bytes());
    b[2..4].copy_from_slice(&dmin.0.to_le_bytes());
    for j in 0..8 {
        let (s, m) = crate::scale_min_k4(j, &b[4..16]);
        let dj = d.1 * s as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.1 * m as f32;
        for i in 32 * j..32 * j + 32 {
            codes[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    codes
}

/// Q4_K: `d`, `dmin`, `scales[12]`, `qs[128]` (element `l` of each
/// 64-element pair of sub-blocks in the low nibble, `l + 32` in the high).
pub(crate) fn quantize_block_q4_k(x: &[f32], b: &mut [u8]) {
    let codes = k_scales_mins(x, 15, -1.0, 20, b);
    for (q, c) in b[16..144].chunks_exact_mut(32).zip(codes.chunks_exact(64)) {
        for l in 0..32 {
            q[l] = c[l] | (c[l + 32] << 4);
        }
    }
}

/// Q5_K: `d`, `dmin`, `scales[12]`, `qh[32]`, `qs[128]`; the fifth bit of
/// element `l` of sub-block `j` is bit `j` of `qh[l]`.
pub(crate) fn quantize_block_q5_k(x: &[f32], b: &mut [u8]) {
    let codes = k_scales_mins(x, 31, -0.5, 15, b);
    let (qh, qs) = b[16..176].split_at_mut(32);
    qh.iter_mut().for_each(|h| *h = 0);
    for (pair, (q, c)) in qs
        .chunks_exact_mut(32)
        .zip(codes.chunks_exact(64))
        .enumerate()
    {
        for l in 0..32 {
            let (mut l1, mut l2) = (c[l], c[l + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[l] |= 1 << (2 * pair);
            }
            if l2 > 15 {
                l2 -= 16;
                qh[l] |= 2 << (2 * pair);
            }
            q[l] = l1 | (l2 << 4);
        }
    }
}

/// Q6_K: `ql[128]`, `qh[64]`, `scales[16]` (signed 8-bit), `d`.
pub(crate) fn quantize_block_q6_k(x: &[f32], b: &mut [u8]) {
    let mut codes = [0i8; QK_K];
    let scales: [f32; QK_K / 16] = std::array::from_fn(|j| {
        make_qx_quants(32, &x[16 * j..16 * j + 16], &mut codes[16 * j..16 * j + 16])
    });
    let max_scale = signed_absmax(&scales);
    b.iter_mut().for_each(|v| *v = 0);
    if max_scale.abs() < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0f32 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    b[208..210].copy_from_slice(&d.to_le_bytes());
    let sc = &mut b[192..208];
    for (s, &scale) in sc.iter_mut().zip(&scales) {
        *s = nearest_int(iscale * scale).min(127) as i8 as u8;
    }
    let d = d.to_f32();
    let sc: [i8; 16] = std::array::from_fn(|j| b[192 + j] as i8);
    for (j, (xs, cs)) in x
        .chunks_exact(16)
        .zip(codes.chunks_exact_mut(16))
        .enumerate()
    {
        let dj = d * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for (c, &v) in cs.iter_mut().zip(xs) {
            *c = (nearest_int(v / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let codes: [u8; QK_K] = std::array::from_fn(|i| codes[i] as u8);
    for half in 0..2 {
        let (j, ql, qh) = (128 * half, 64 * half, 128 + 32 * half);
        for l in 0..32 {
            let q = |o: usize| codes[j + l + o];
            b[ql + l] = (q(0) & 0x0f) | ((q(64) & 0x0f) << 4);
            b[ql + l + 32] = (q(32) & 0x0f) | ((q(96) & 0x0f) << 4);
            b[qh + l] =
                (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
        }
    }
}

/// C's `if (v > m) m = v;` (NaN never replaces `m`), unlike `f32::max`.
trait MaxC {
    fn max_c(self, v: f32) -> f32;
}

impl MaxC for f32 {
    #[inline(always)]
    fn max_c(self, v: f32) -> f32 {
        if v > self { v } else { self }
    }
}
