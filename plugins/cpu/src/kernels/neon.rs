//! NEON (aarch64) integer block sums of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
//! IQ4_NL weights against Q8_0 activation codes: `Σ q_w · q_x` per 32-code block, exact,
//! which `q8::dot_rows` then scales and adds as the portable path does, in
//! `kiln_blocks::q8_dot`'s order (so the results are the reference's
//! bits); and of Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and
//! IQ4_XS against Q8_K codes, `Σ sc_j (q·x)_j` per 256-code block, which
//! `kquant` scales as its portable kernels do. And F16/BF16 weights
//! against activations rounded to their type, in f32 lanes in kiln's one
//! order for those products ([`float_tile`]).
//!
//! NEON is part of the aarch64 base instruction set. The integer
//! products take the ARMv8.2 dot-product extension's `sdot` (16 products
//! into four int32 lanes in one instruction) where the CPU has it,
//! detected at run time ([`has_dotprod`], [`with_dotprod!`]); else
//! `vmull_s8` (int8 × int8 → int16, exact) folded into int32 lanes by
//! `vpadalq_s16`. Both are exact, so both give the same sums.
//!
//! The file stands alone: no paths into the crate, and only what rustc
//! 1.63 knows. The toolchain kiln builds with here has no aarch64
//! standard library, so the `neon` test (`tests/tests/neon.rs`) compiles
//! this file for aarch64 with Debian's rustc and runs its tests under
//! qemu; CI requires that test.

#![allow(unused_unsafe)]

use core::arch::aarch64::*;

/// Codes per block.
pub const QK: usize = 32;
// Block sizes written out: this file also builds alone (rustc 1.63 for
// aarch64, in tests/tests/neon.rs), without kiln-plugin-api's `DType`.
pub const Q4_0_BYTES: usize = 18;
pub const Q4_1_BYTES: usize = 20;
pub const Q5_0_BYTES: usize = 22;
pub const Q5_1_BYTES: usize = 24;
pub const Q8_0_BYTES: usize = 34;
pub const IQ4_NL_BYTES: usize = 18;

/// IQ4_NL's code values (ggml's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Adds the products of 16 codes `w` and `x` to `acc`'s four lanes:
/// with `DOT`, by the dot-product extension's `sdot` (each lane adds four
/// products; only inside a function with `dotprod` enabled, see
/// [`with_dotprod!`]), else by `vmull_s8` and `vpadalq_s16` (pairs).
/// Either way every product is exact and the lanes' total is the same.
#[inline(always)]
unsafe fn mul_add16<const DOT: bool>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    // SAFETY: register-only NEON operations (NEON is baseline on aarch64;
    // `sdot` is reached only with `dotprod` enabled).
    unsafe {
        if DOT {
            let mut acc = acc;
            core::arch::asm!(
                "sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
                acc = inout(vreg) acc,
                w = in(vreg) w,
                x = in(vreg) x,
                options(pure, nomem, nostack),
            );
            acc
        } else {
            let acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(x)));
            vpadalq_s16(acc, vmull_high_s8(w, x))
        }
    }
}

/// Whether the CPU has the dot-product extension (`sdot`; ARMv8.2's
/// optional `dotprod`, in every Apple M-series and most ARM cores since
/// the Cortex-A75). Detected once by the standard library.
pub fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `pub fn $name(w, x, out)`: the block sums of `$body`, by `sdot` where
/// the CPU has it ([`has_dotprod`]), else by baseline NEON; and
/// `$dot`, the `sdot` path alone (for the tests).
macro_rules! with_dotprod {
    ($($(#[$doc:meta])* $name:ident, $dot:ident => $body:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(w: &[u8], x: &[i8], out: &mut [i32]) {
            if has_dotprod() {
                // SAFETY: the CPU has the dot-product extension.
                unsafe { $dot(w, x, out) }
            } else {
                $body::<false>(w, x, out)
            }
        }

        /// # Safety
        /// The CPU has the dot-product extension ([`has_dotprod`]).
        #[target_feature(enable = "dotprod")]
        unsafe fn $dot(w: &[u8], x: &[i8], out: &mut [i32]) {
            $body::<true>(w, x, out)
        }
    )*};
}

fn check(w: &[u8], block_bytes: usize, x: &[i8], out: &[i32]) {
    assert!(
        w.len() == out.len() * block_bytes && x.len() == out.len() * QK,
        "{} weight bytes and {} codes for {} blocks",
        w.len(),
        x.len(),
        out.len()
    );
}

/// Q4_0: codes `(nibble − 8)`, low nibbles first.
#[inline(always)]
fn sums_q4_0<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, Q4_0_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        // SAFETY: block b's 16 code bytes and 32 activation codes are in
        // bounds (checked above).
        unsafe {
            let q = vld1q_u8(w.as_ptr().add(b * Q4_0_BYTES + 2));
            let eight = vdupq_n_s8(8);
            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))), eight);
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)), eight);
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16::<DOT>(vdupq_n_s32(0), lo, vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16::<DOT>(acc, hi, vld1q_s8(xp.add(16))));
        }
    }
}

/// The fifth bits of 16 codes, bits `first..first + 16` of `qh`, as 0 or
/// 0x10 per byte.
#[inline(always)]
unsafe fn fifth_bits(qh: u32, first: u32) -> uint8x16_t {
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    // SAFETY: `BIT` holds the 16 bytes loaded; the rest is register-only.
    unsafe {
        let bits = qh >> first;
        let bytes = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
        vandq_u8(vtstq_u8(bytes, vld1q_u8(BIT.as_ptr())), vdupq_n_u8(0x10))
    }
}

/// Q5_0: codes `(nibble | fifth bit << 4) − 16`; bit `j` of the 32-bit
/// field goes to code `j`.
#[inline(always)]
fn sums_q5_0<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, Q5_0_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        let blk = &w[b * Q5_0_BYTES..][..Q5_0_BYTES];
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        // SAFETY: as for Q4_0.
        unsafe {
            let q = vld1q_u8(blk.as_ptr().add(6));
            let sixteen = vdupq_n_s8(16);
            let lo = vorrq_u8(vandq_u8(q, vdupq_n_u8(0x0f)), fifth_bits(qh, 0));
            let hi = vorrq_u8(vshrq_n_u8::<4>(q), fifth_bits(qh, 16));
            let lo = vsubq_s8(vreinterpretq_s8_u8(lo), sixteen);
            let hi = vsubq_s8(vreinterpretq_s8_u8(hi), sixteen);
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16::<DOT>(vdupq_n_s32(0), lo, vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16::<DOT>(acc, hi, vld1q_s8(xp.add(16))));
        }
    }
}

/// Q4_1: codes are the nibbles themselves (0..15), low nibbles first;
/// the caller adds the block's minimum times the activations' sum.
#[inline(always)]
fn sums_q4_1<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, Q4_1_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        // SAFETY: as for Q4_0.
        unsafe {
            let q = vld1q_u8(w.as_ptr().add(b * Q4_1_BYTES + 4));
            let lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f)));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16::<DOT>(vdupq_n_s32(0), lo, vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16::<DOT>(acc, hi, vld1q_s8(xp.add(16))));
        }
    }
}

/// Q5_1: codes `nibble | fifth bit << 4` (0..31), the mask after the
/// minimum.
#[inline(always)]
fn sums_q5_1<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, Q5_1_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        let blk = &w[b * Q5_1_BYTES..][..Q5_1_BYTES];
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        // SAFETY: as for Q4_0.
        unsafe {
            let q = vld1q_u8(blk.as_ptr().add(8));
            let lo = vorrq_u8(vandq_u8(q, vdupq_n_u8(0x0f)), fifth_bits(qh, 0));
            let hi = vorrq_u8(vshrq_n_u8::<4>(q), fifth_bits(qh, 16));
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16::<DOT>(vdupq_n_s32(0), vreinterpretq_s8_u8(lo), vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16::<DOT>(
                acc,
                vreinterpretq_s8_u8(hi),
                vld1q_s8(xp.add(16)),
            ));
        }
    }
}

/// IQ4_NL: each nibble indexes [`IQ4_VALUES`] (a table lookup).
#[inline(always)]
fn sums_iq4_nl<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, IQ4_NL_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        // SAFETY: as for Q4_0; the table holds the 16 bytes loaded.
        unsafe {
            let table = vld1q_s8(IQ4_VALUES.as_ptr());
            let q = vld1q_u8(w.as_ptr().add(b * IQ4_NL_BYTES + 2));
            let lo = vqtbl1q_s8(table, vandq_u8(q, vdupq_n_u8(0x0f)));
            let hi = vqtbl1q_s8(table, vshrq_n_u8::<4>(q));
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16::<DOT>(vdupq_n_s32(0), lo, vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16::<DOT>(acc, hi, vld1q_s8(xp.add(16))));
        }
    }
}

/// Q8_0: the codes are the bytes.
#[inline(always)]
fn sums_q8_0<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, Q8_0_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        // SAFETY: as for Q4_0.
        unsafe {
            let wp = w.as_ptr().add(b * Q8_0_BYTES + 2).cast::<i8>();
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16::<DOT>(vdupq_n_s32(0), vld1q_s8(wp), vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16::<DOT>(
                acc,
                vld1q_s8(wp.add(16)),
                vld1q_s8(xp.add(16)),
            ));
        }
    }
}

/// Codes per K-quant block (Q2_K, Q3_K, IQ4_XS).
pub const QK_K: usize = 256;
pub const Q2_K_BYTES: usize = 84;
pub const Q3_K_BYTES: usize = 110;
pub const IQ4_XS_BYTES: usize = 136;

fn check_k(w: &[u8], block_bytes: usize, x: &[i8], out: &[i32]) {
    assert!(
        w.len() == out.len() * block_bytes && x.len() == out.len() * QK_K,
        "{} weight bytes and {} codes for {} K-quant blocks",
        w.len(),
        x.len(),
        out.len()
    );
}

/// `Σ q·x` of 16 codes.
#[inline(always)]
unsafe fn dot16<const DOT: bool>(w: int8x16_t, x: *const i8) -> i32 {
    // SAFETY: the caller's `x` points at 16 codes.
    unsafe { vaddvq_s32(mul_add16::<DOT>(vdupq_n_s32(0), w, vld1q_s8(x))) }
}

/// Q2_K: `Σ_j sc_j (q·x)_j` over the sixteen sub-blocks of 16 (4-bit
/// scales; the minimums' term needs only the activations' sums and is
/// the caller's). Each 32 code bytes hold four runs of 32 codes, two bits
/// apart.
#[inline(always)]
fn sums_q2_k<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check_k(w, Q2_K_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        let blk = &w[b * Q2_K_BYTES..][..Q2_K_BYTES];
        let xp = x[b * QK_K..].as_ptr();
        let mut isum = 0i32;
        // SAFETY: the block's 64 code bytes (16..80) and its 256 codes are
        // in bounds (checked above).
        unsafe {
            for n in 0..2 {
                let mut q0 = vld1q_u8(blk.as_ptr().add(16 + 32 * n));
                let mut q1 = vld1q_u8(blk.as_ptr().add(32 + 32 * n));
                for j in 0..4 {
                    let i = 8 * n + 2 * j;
                    let c0 = vreinterpretq_s8_u8(vandq_u8(q0, vdupq_n_u8(3)));
                    let c1 = vreinterpretq_s8_u8(vandq_u8(q1, vdupq_n_u8(3)));
                    isum += (blk[i] & 0x0f) as i32 * dot16::<DOT>(c0, xp.add(16 * i));
                    isum += (blk[i + 1] & 0x0f) as i32 * dot16::<DOT>(c1, xp.add(16 * i + 16));
                    q0 = vshrq_n_u8::<2>(q0);
                    q1 = vshrq_n_u8::<2>(q1);
                }
            }
        }
        *o = isum;
    }
}

/// Q3_K's sixteen 6-bit scales less 32, from the block's 12 packed bytes.
fn q3_k_scales(packed: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0f
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

/// Q3_K: `Σ_j sc_j (q·x)_j`, codes `(two low bits | mask bit << 2) − 4`,
/// the mask's bits taken in order, one a run of 32.
#[inline(always)]
fn sums_q3_k<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check_k(w, Q3_K_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        let blk = &w[b * Q3_K_BYTES..][..Q3_K_BYTES];
        let sc = q3_k_scales(&blk[96..108]);
        let xp = x[b * QK_K..].as_ptr();
        let mut isum = 0i32;
        // SAFETY: the block's mask (0..32) and code bytes (32..96) and its
        // 256 codes are in bounds (checked above).
        unsafe {
            let mut h0 = vld1q_u8(blk.as_ptr());
            let mut h1 = vld1q_u8(blk.as_ptr().add(16));
            let (m1, m3, four) = (vdupq_n_u8(1), vdupq_n_u8(3), vdupq_n_s8(4));
            for n in 0..2 {
                let mut q0 = vld1q_u8(blk.as_ptr().add(32 + 32 * n));
                let mut q1 = vld1q_u8(blk.as_ptr().add(48 + 32 * n));
                for j in 0..4 {
                    let i = 8 * n + 2 * j;
                    let u0 = vorrq_u8(vandq_u8(q0, m3), vshlq_n_u8::<2>(vandq_u8(h0, m1)));
                    let u1 = vorrq_u8(vandq_u8(q1, m3), vshlq_n_u8::<2>(vandq_u8(h1, m1)));
                    let c0 = vsubq_s8(vreinterpretq_s8_u8(u0), four);
                    let c1 = vsubq_s8(vreinterpretq_s8_u8(u1), four);
                    isum += sc[i] * dot16::<DOT>(c0, xp.add(16 * i));
                    isum += sc[i + 1] * dot16::<DOT>(c1, xp.add(16 * i + 16));
                    q0 = vshrq_n_u8::<2>(q0);
                    q1 = vshrq_n_u8::<2>(q1);
                    h0 = vshrq_n_u8::<1>(h0);
                    h1 = vshrq_n_u8::<1>(h1);
                }
            }
        }
        *o = isum;
    }
}

/// IQ4_XS: `Σ_j sc_j (v·x)_j` over eight sub-blocks of 32, each nibble
/// an index into [`IQ4_VALUES`], 6-bit scales less 32.
#[inline(always)]
fn sums_iq4_xs<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check_k(w, IQ4_XS_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        let blk = &w[b * IQ4_XS_BYTES..][..IQ4_XS_BYTES];
        let scales_h = u16::from_le_bytes([blk[2], blk[3]]);
        let xp = x[b * QK_K..].as_ptr();
        let mut isum = 0i32;
        for ib in 0..8 {
            let low = (blk[4 + ib / 2] >> (4 * (ib % 2))) & 0x0f;
            let sc = (low as u16 | (((scales_h >> (2 * ib)) & 3) << 4)) as i32 - 32;
            // SAFETY: sub-block ib's 16 code bytes and 32 codes are in
            // bounds (checked above); the table holds the 16 bytes loaded.
            let s = unsafe {
                let table = vld1q_s8(IQ4_VALUES.as_ptr());
                let q = vld1q_u8(blk.as_ptr().add(8 + 16 * ib));
                let lo = vqtbl1q_s8(table, vandq_u8(q, vdupq_n_u8(0x0f)));
                let hi = vqtbl1q_s8(table, vshrq_n_u8::<4>(q));
                let acc = mul_add16::<DOT>(vdupq_n_s32(0), lo, vld1q_s8(xp.add(32 * ib)));
                vaddvq_s32(mul_add16::<DOT>(acc, hi, vld1q_s8(xp.add(32 * ib + 16))))
            };
            isum += sc * s;
        }
        *o = isum;
    }
}

pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;

/// Q4_K's and Q5_K's sub-block `j` (of 8) scale and minimum, 6 bits each,
/// from the block's 12 packed bytes (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
    let (d, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (d as i32, m as i32)
}

/// Q4_K (`Q5` false) and Q5_K: `Σ_j sc_j (q·x)_j` over the eight
/// sub-blocks of 32, codes the nibbles (0..15; Q5_K: with a fifth bit
/// from `qh`, 0..31), 6-bit scales; the minimums' term needs only the
/// activations' sums and is the caller's. Each 32 code bytes hold two
/// sub-blocks, low nibbles first; Q5_K's bit `j` of `qh[l]` is code `l`
/// of sub-block `j`'s fifth.
#[inline(always)]
fn sums_q45_k<const DOT: bool, const Q5: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    let (bytes, codes) = if Q5 {
        (Q5_K_BYTES, 48)
    } else {
        (Q4_K_BYTES, 16)
    };
    check_k(w, bytes, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        let blk = &w[b * bytes..][..bytes];
        let xp = x[b * QK_K..].as_ptr();
        // SAFETY: the block's code bytes (and Q5_K's 32 high-bit bytes at
        // 16..48) and its 256 codes are in bounds (checked above).
        let total = unsafe {
            let mut total = vdupq_n_s32(0);
            let (m1, m4) = (vdupq_n_u8(1), vdupq_n_u8(0x0f));
            let mut h = [vdupq_n_u8(0); 2];
            if Q5 {
                h = [
                    vld1q_u8(blk.as_ptr().add(16)),
                    vld1q_u8(blk.as_ptr().add(32)),
                ];
            }
            for pair in 0..4 {
                let q = [
                    vld1q_u8(blk.as_ptr().add(codes + 32 * pair)),
                    vld1q_u8(blk.as_ptr().add(codes + 32 * pair + 16)),
                ];
                for half in 0..2 {
                    let j = 2 * pair + half;
                    let mut acc = vdupq_n_s32(0);
                    for (v, (&q, hv)) in q.iter().zip(h.iter_mut()).enumerate() {
                        let mut c = if half == 0 {
                            vandq_u8(q, m4)
                        } else {
                            vshrq_n_u8::<4>(q)
                        };
                        if Q5 {
                            c = vorrq_u8(c, vshlq_n_u8::<4>(vandq_u8(*hv, m1)));
                            *hv = vshrq_n_u8::<1>(*hv);
                        }
                        let xv = vld1q_s8(xp.add(32 * j + 16 * v));
                        acc = mul_add16::<DOT>(acc, vreinterpretq_s8_u8(c), xv);
                    }
                    total = vmlaq_n_s32(total, acc, scale_min_k4(j, &blk[4..16]).0);
                }
            }
            vaddvq_s32(total)
        };
        *o = total;
    }
}

#[inline(always)]
fn sums_q4_k<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    sums_q45_k::<DOT, false>(w, x, out)
}

#[inline(always)]
fn sums_q5_k<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    sums_q45_k::<DOT, true>(w, x, out)
}

/// Q6_K: `Σ_j sc_j (q·x)_j` over the sixteen sub-blocks of 16, codes
/// `(four low bits from ql | two high bits from qh << 4) − 32`, signed
/// 8-bit scales. Each half of the block (128 codes) takes 64 `ql` bytes
/// and 32 `qh` bytes: code `l` of its four runs of 32 is `ql[l]`'s low
/// nibble, `ql[l + 32]`'s low, `ql[l]`'s high, `ql[l + 32]`'s high, with
/// bits 0–1, 2–3, 4–5, 6–7 of `qh[l]`.
#[inline(always)]
fn sums_q6_k<const DOT: bool>(w: &[u8], x: &[i8], out: &mut [i32]) {
    check_k(w, Q6_K_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        let blk = &w[b * Q6_K_BYTES..][..Q6_K_BYTES];
        let xp = x[b * QK_K..].as_ptr();
        // SAFETY: the block's 128 `ql` bytes (0..128) and 64 `qh` bytes
        // (128..192) and its 256 codes are in bounds (checked above).
        let total = unsafe {
            let mut total = vdupq_n_s32(0);
            let (m3, m4, off) = (vdupq_n_u8(3), vdupq_n_u8(0x0f), vdupq_n_s8(32));
            for n in 0..2 {
                for h in 0..2 {
                    let ql = blk.as_ptr().add(64 * n + 16 * h);
                    let (qa, qb) = (vld1q_u8(ql), vld1q_u8(ql.add(32)));
                    let qh = vld1q_u8(blk.as_ptr().add(128 + 32 * n + 16 * h));
                    let runs = [
                        vorrq_u8(vandq_u8(qa, m4), vshlq_n_u8::<4>(vandq_u8(qh, m3))),
                        vorrq_u8(
                            vandq_u8(qb, m4),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<2>(qh), m3)),
                        ),
                        vorrq_u8(
                            vshrq_n_u8::<4>(qa),
                            vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(qh), m3)),
                        ),
                        vorrq_u8(vshrq_n_u8::<4>(qb), vshlq_n_u8::<4>(vshrq_n_u8::<6>(qh))),
                    ];
                    for (k, c) in runs.into_iter().enumerate() {
                        let c = vsubq_s8(vreinterpretq_s8_u8(c), off);
                        let xv = vld1q_s8(xp.add(128 * n + 32 * k + 16 * h));
                        let acc = mul_add16::<DOT>(vdupq_n_s32(0), c, xv);
                        let sc = blk[192 + 8 * n + h + 2 * k] as i8 as i32;
                        total = vmlaq_n_s32(total, acc, sc);
                    }
                }
            }
            vaddvq_s32(total)
        };
        *o = total;
    }
}

with_dotprod! {
    /// Q4_0's block sums ([`sums_q4_0`]).
    block_sums_q4_0, block_sums_q4_0_dot => sums_q4_0;
    /// Q5_0's block sums ([`sums_q5_0`]).
    block_sums_q5_0, block_sums_q5_0_dot => sums_q5_0;
    /// Q4_1's block sums ([`sums_q4_1`]).
    block_sums_q4_1, block_sums_q4_1_dot => sums_q4_1;
    /// Q5_1's block sums ([`sums_q5_1`]).
    block_sums_q5_1, block_sums_q5_1_dot => sums_q5_1;
    /// IQ4_NL's block sums ([`sums_iq4_nl`]).
    block_sums_iq4_nl, block_sums_iq4_nl_dot => sums_iq4_nl;
    /// Q8_0's block sums ([`sums_q8_0`]).
    block_sums_q8_0, block_sums_q8_0_dot => sums_q8_0;
    /// Q2_K's block sums ([`sums_q2_k`]).
    block_sums_q2_k, block_sums_q2_k_dot => sums_q2_k;
    /// Q3_K's block sums ([`sums_q3_k`]).
    block_sums_q3_k, block_sums_q3_k_dot => sums_q3_k;
    /// IQ4_XS's block sums ([`sums_iq4_xs`]).
    block_sums_iq4_xs, block_sums_iq4_xs_dot => sums_iq4_xs;
    /// Q4_K's block sums ([`sums_q45_k`]).
    block_sums_q4_k, block_sums_q4_k_dot => sums_q4_k;
    /// Q5_K's block sums ([`sums_q45_k`]).
    block_sums_q5_k, block_sums_q5_k_dot => sums_q5_k;
    /// Q6_K's block sums ([`sums_q6_k`]).
    block_sums_q6_k, block_sums_q6_k_dot => sums_q6_k;
}

/// Weight types of [`float_tile`]'s const generic, as `float.rs` codes
/// them (this file stands alone).
const BF16: u8 = 1;
const F32: u8 = 2;

/// Eight f16 (`T` = 0), bf16 (`BF16`) or f32 (`F32`) values at `p` to
/// f32, lanes 0–3 and 4–7 (exact every way). F16 through
/// `fcvtl`/`fcvtl2`: baseline aarch64, but Rust has no stable intrinsic
/// for them (its `float16x4_t` is not).
///
/// # Safety
/// `p` points at 8 readable values.
#[inline(always)]
unsafe fn widen8<const T: u8>(p: *const u8) -> [float32x4_t; 2] {
    // SAFETY: the caller's pointer; register-only operations otherwise.
    unsafe {
        if T == F32 {
            let p = p.cast::<f32>();
            return [vld1q_f32(p), vld1q_f32(p.add(4))];
        }
        let h = vreinterpretq_u16_u8(vld1q_u8(p));
        if T == BF16 {
            [
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_high_u16(h))),
            ]
        } else {
            let (lo, hi): (float32x4_t, float32x4_t);
            core::arch::asm!(
                "fcvtl {lo:v}.4s, {h:v}.4h",
                "fcvtl2 {hi:v}.4s, {h:v}.8h",
                h = in(vreg) h,
                lo = out(vreg) lo,
                hi = out(vreg) hi,
                options(pure, nomem, nostack),
            );
            [lo, hi]
        }
    }
}

/// The eight lanes' sum in kiln's order for F16/BF16 products
/// (`kiln_blocks::sum_lanes`): lanes `j + (j + 4)`, then `j + (j + 2)`,
/// then `0 + 1`.
#[inline(always)]
fn sum8(v: [float32x4_t; 2]) -> f32 {
    // SAFETY: register-only NEON operations.
    unsafe {
        let a = vaddq_f32(v[0], v[1]);
        let c = vadd_f32(vget_low_f32(a), vget_high_f32(a));
        vget_lane_f32::<0>(c) + vget_lane_f32::<1>(c)
    }
}

/// `out[n][m] = w[n] · x[m]` for `N` F16, BF16 or F32 weight rows (the
/// type coded `T`, see [`widen8`]) and `M` activation rows rounded to the
/// same type (F32: as they are), in the order every kiln kernel for these
/// types follows (`kiln_blocks::fused_dot`): product `i`
/// into f32 lane `i mod 8` by a fused multiply-add (`vfmaq_f32`), the rows
/// zero-padded to a multiple of 8, the lanes added by [`sum8`]. Each
/// weight vector is widened once for the `M` rows.
pub fn float_tile<const T: u8, const N: usize, const M: usize>(
    w: &[&[u8]; N],
    x: &[&[f32]; M],
) -> [[f32; M]; N] {
    let len = x[0].len();
    let e = if T == F32 { 4 } else { 2 };
    assert!(
        x.iter().all(|x| x.len() == len) && w.iter().all(|w| w.len() == e * len),
        "{} values per row, {} weight bytes",
        len,
        w[0].len()
    );
    let full = len / 8 * 8;
    // SAFETY: register-only NEON operations.
    let zero = unsafe { vdupq_n_f32(0.0) };
    let mut acc = [[[zero; 2]; M]; N];
    let mut step = |wp: [*const u8; N], xp: [*const f32; M]| {
        // SAFETY: each pointer is at 8 values (the callers below).
        unsafe {
            let mut xv = [[zero; 2]; M];
            for (v, p) in xv.iter_mut().zip(xp) {
                *v = [vld1q_f32(p), vld1q_f32(p.add(4))];
            }
            for (acc, p) in acc.iter_mut().zip(wp) {
                let wv = widen8::<T>(p);
                for (a, x) in acc.iter_mut().zip(&xv) {
                    a[0] = vfmaq_f32(a[0], wv[0], x[0]);
                    a[1] = vfmaq_f32(a[1], wv[1], x[1]);
                }
            }
        }
    };
    for i in (0..full).step_by(8) {
        // In bounds: i + 8 <= full.
        step(
            std::array::from_fn(|n| w[n][e * i..].as_ptr()),
            std::array::from_fn(|m| x[m][i..].as_ptr()),
        );
    }
    if full < len {
        // The tail zero-filled to eight values.
        let mut tw = [[0u8; 32]; N];
        let mut tx = [[0f32; 8]; M];
        for (t, w) in tw.iter_mut().zip(w) {
            t[..w.len() - e * full].copy_from_slice(&w[e * full..]);
        }
        for (t, x) in tx.iter_mut().zip(x) {
            t[..x.len() - full].copy_from_slice(&x[full..]);
        }
        step(
            std::array::from_fn(|n| tw[n].as_ptr()),
            std::array::from_fn(|m| tx[m].as_ptr()),
        );
    }
    let mut out = [[0.0; M]; N];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (o, a) in out.iter_mut().zip(acc) {
            *o = sum8(*a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar sums, as the reference's formulas (`q8::sums_q4_0` and its siblings).
    fn scalar(kind: usize, blk: &[u8], x: &[i8]) -> i32 {
        let mut s = 0i32;
        match kind {
            4 => {
                for j in 0..16 {
                    let q = blk[2 + j];
                    s += ((q & 0x0f) as i32 - 8) * x[j] as i32;
                    s += ((q >> 4) as i32 - 8) * x[j + 16] as i32;
                }
            }
            5 => {
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                for j in 0..16 {
                    let q = blk[6 + j];
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    s += (((q & 0x0f) as u32 | h0) as i32 - 16) * x[j] as i32;
                    s += (((q >> 4) as u32 | h1) as i32 - 16) * x[j + 16] as i32;
                }
            }
            41 => {
                for j in 0..16 {
                    let q = blk[4 + j];
                    s += (q & 0x0f) as i32 * x[j] as i32;
                    s += (q >> 4) as i32 * x[j + 16] as i32;
                }
            }
            51 => {
                let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
                for j in 0..16 {
                    let q = blk[8 + j];
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    s += ((q & 0x0f) as u32 | h0) as i32 * x[j] as i32;
                    s += ((q >> 4) as u32 | h1) as i32 * x[j + 16] as i32;
                }
            }
            14 => {
                for j in 0..16 {
                    let q = blk[2 + j];
                    s += IQ4_VALUES[(q & 0x0f) as usize] as i32 * x[j] as i32;
                    s += IQ4_VALUES[(q >> 4) as usize] as i32 * x[j + 16] as i32;
                }
            }
            _ => {
                for j in 0..32 {
                    s += blk[2 + j] as i8 as i32 * x[j] as i32;
                }
            }
        }
        s
    }

    /// A kind's block sums by baseline NEON and by `sdot`.
    type Paths = (
        fn(&[u8], &[i8], &mut [i32]),
        unsafe fn(&[u8], &[i8], &mut [i32]),
    );

    /// The sums of `blocks` blocks by each path the CPU has: baseline
    /// NEON, and `sdot` where it has the dot-product extension.
    fn each_path(
        (base, dot): Paths,
        w: &[u8],
        x: &[i8],
        blocks: usize,
    ) -> Vec<(&'static str, Vec<i32>)> {
        let mut out = vec![("neon", vec![0i32; blocks])];
        base(w, x, &mut out[0].1);
        if has_dotprod() {
            let mut got = vec![0i32; blocks];
            // SAFETY: the CPU has the dot-product extension.
            unsafe { dot(w, x, &mut got) };
            out.push(("sdot", got));
        }
        out
    }

    /// `tests/tests/neon.rs` runs these tests on an emulated CPU with the
    /// dot-product extension and on one without it, saying which in
    /// `KILN_EXPECT_DOTPROD`: both paths are checked, and the detection.
    #[test]
    fn the_dot_product_extension_is_detected() {
        if let Ok(v) = std::env::var("KILN_EXPECT_DOTPROD") {
            assert_eq!(has_dotprod(), v == "1", "KILN_EXPECT_DOTPROD={v}");
        }
        // The dispatching entry points agree with the baseline path.
        let w: Vec<u8> = (0..2 * Q6_K_BYTES).map(|i| (i * 37 % 251) as u8).collect();
        let x: Vec<i8> = (0..2 * QK_K).map(|i| (i * 53 % 255) as u8 as i8).collect();
        let (mut a, mut b) = ([0i32; 2], [0i32; 2]);
        block_sums_q6_k(&w, &x, &mut a);
        sums_q6_k::<false>(&w, &x, &mut b);
        assert_eq!(a, b);
    }

    /// A small deterministic generator (no crates here).
    struct Lcg(u64);
    impl Lcg {
        fn byte(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u8
        }
    }

    #[test]
    fn block_sums_match_the_scalar_formulas() {
        let mut rng = Lcg(7);
        // Kinds: 4 = Q4_0, 41 = Q4_1, 5 = Q5_0, 51 = Q5_1, 8 = Q8_0, 14 = IQ4_NL.
        let kinds: [(usize, usize, Paths); 6] = [
            (4, Q4_0_BYTES, (sums_q4_0::<false>, block_sums_q4_0_dot)),
            (41, Q4_1_BYTES, (sums_q4_1::<false>, block_sums_q4_1_dot)),
            (5, Q5_0_BYTES, (sums_q5_0::<false>, block_sums_q5_0_dot)),
            (51, Q5_1_BYTES, (sums_q5_1::<false>, block_sums_q5_1_dot)),
            (8, Q8_0_BYTES, (sums_q8_0::<false>, block_sums_q8_0_dot)),
            (
                14,
                IQ4_NL_BYTES,
                (sums_iq4_nl::<false>, block_sums_iq4_nl_dot),
            ),
        ];
        for (kind, bytes, paths) in kinds {
            for blocks in [1usize, 2, 7, 64] {
                for case in 0..4 {
                    // Random bytes, then the extremes: all 0x00, all 0xff,
                    // and codes of −128 against −128.
                    let fill = |rng: &mut Lcg| match case {
                        0 => rng.byte(),
                        1 => 0x00,
                        2 => 0xff,
                        _ => 0x80,
                    };
                    let w: Vec<u8> = (0..blocks * bytes).map(|_| fill(&mut rng)).collect();
                    let x: Vec<i8> = (0..blocks * QK).map(|_| fill(&mut rng) as i8).collect();
                    for (path, got) in each_path(paths, &w, &x, blocks) {
                        for b in 0..blocks {
                            let want = scalar(kind, &w[b * bytes..][..bytes], &x[b * QK..][..QK]);
                            assert_eq!(
                                got[b], want,
                                "Q{kind} ({path}) block {b} of {blocks}, case {case}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A K-quant block's sum as ggml's `dequantize_row_*` reads the
    /// block, one code at a time (kind 2 = Q2_K, 3 = Q3_K, 44 = IQ4_XS).
    fn scalar_k(kind: usize, blk: &[u8], x: &[i8]) -> i32 {
        let mut s = 0i32;
        match kind {
            2 => {
                // y = 0..256 walks 2 halves × 4 shifts × 2 runs of 16.
                for y in 0..256 {
                    let (n, rest) = (y / 128, y % 128);
                    let (shift, l) = (rest / 32, rest % 32);
                    let code = (blk[16 + 32 * n + l] >> (2 * shift)) & 3;
                    let sc = (blk[y / 16] & 0x0f) as i32;
                    s += sc * code as i32 * x[y] as i32;
                }
            }
            3 => {
                // ggml's kmask unpacking of the 12 scale bytes.
                let a = |i: usize| {
                    u32::from_le_bytes([
                        blk[96 + 4 * i],
                        blk[97 + 4 * i],
                        blk[98 + 4 * i],
                        blk[99 + 4 * i],
                    ])
                };
                let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
                let (a0, a1, tmp) = (a(0), a(1), a(2));
                let words = [
                    (a0 & k2) | ((tmp & k1) << 4),
                    (a1 & k2) | (((tmp >> 2) & k1) << 4),
                    ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                    ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
                ];
                let sc = |j: usize| ((words[j / 4] >> (8 * (j % 4))) & 0xff) as i32 - 32;
                for y in 0..256 {
                    let (n, rest) = (y / 128, y % 128);
                    let (shift, l) = (rest / 32, rest % 32);
                    let low = ((blk[32 + 32 * n + l] >> (2 * shift)) & 3) as i32;
                    let high = blk[l] & (1 << (4 * n + shift)) != 0;
                    let code = low - if high { 0 } else { 4 };
                    s += sc(y / 16) * code * x[y] as i32;
                }
            }
            104 | 105 => {
                // ggml's dequantize_row_q4_K / q5_K, the minimums left out.
                let q5 = kind == 105;
                let (qs, qh) = if q5 {
                    (&blk[48..176], &blk[16..48])
                } else {
                    (&blk[16..144], &blk[0..0])
                };
                let sc = &blk[4..16];
                for y in 0..256 {
                    let (j, l) = (y / 32, y % 32);
                    let byte = qs[32 * (j / 2) + l];
                    let mut code = (if j % 2 == 0 { byte & 15 } else { byte >> 4 }) as i32;
                    if q5 {
                        code += (((qh[l] >> j) & 1) as i32) << 4;
                    }
                    let scale = if j < 4 {
                        sc[j] & 63
                    } else {
                        (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4)
                    } as i32;
                    s += scale * code * x[y] as i32;
                }
            }
            106 => {
                // ggml's dequantize_row_q6_K.
                for y in 0..256 {
                    let (n, r) = (y / 128, y % 128);
                    let (k, l) = (r / 32, r % 32);
                    let ql = blk[64 * n + l + 32 * (k % 2)];
                    let low = if k < 2 { ql & 15 } else { ql >> 4 };
                    let high = (blk[128 + 32 * n + l] >> (2 * k)) & 3;
                    let code = (low | (high << 4)) as i32 - 32;
                    let scale = blk[192 + 8 * n + l / 16 + 2 * k] as i8 as i32;
                    s += scale * code * x[y] as i32;
                }
            }
            _ => {
                let scales_h = u16::from_le_bytes([blk[2], blk[3]]) as i32;
                for y in 0..256 {
                    let (ib, j) = (y / 32, y % 32);
                    let ls = ((blk[4 + ib / 2] as i32 >> (4 * (ib % 2))) & 0x0f)
                        | (((scales_h >> (2 * ib)) & 3) << 4);
                    let byte = blk[8 + 16 * ib + j % 16];
                    let nib = if j < 16 { byte & 0x0f } else { byte >> 4 };
                    s += (ls - 32) * IQ4_VALUES[nib as usize] as i32 * x[y] as i32;
                }
            }
        }
        s
    }

    #[test]
    fn k_quant_block_sums_match_the_scalar_formulas() {
        let mut rng = Lcg(11);
        // Kinds: 2 = Q2_K, 3 = Q3_K, 44 = IQ4_XS, 104 = Q4_K, 105 = Q5_K,
        // 106 = Q6_K.
        let kinds: [(usize, usize, Paths); 6] = [
            (2, Q2_K_BYTES, (sums_q2_k::<false>, block_sums_q2_k_dot)),
            (3, Q3_K_BYTES, (sums_q3_k::<false>, block_sums_q3_k_dot)),
            (
                44,
                IQ4_XS_BYTES,
                (sums_iq4_xs::<false>, block_sums_iq4_xs_dot),
            ),
            (104, Q4_K_BYTES, (sums_q4_k::<false>, block_sums_q4_k_dot)),
            (105, Q5_K_BYTES, (sums_q5_k::<false>, block_sums_q5_k_dot)),
            (106, Q6_K_BYTES, (sums_q6_k::<false>, block_sums_q6_k_dot)),
        ];
        for (kind, bytes, paths) in kinds {
            for blocks in [1usize, 3, 8] {
                for case in 0..4 {
                    // Activation codes stay in [−127, 127], as Q8_K's.
                    let fill = |rng: &mut Lcg| match case {
                        0 => rng.byte(),
                        1 => 0x00,
                        2 => 0xff,
                        _ => 0x81,
                    };
                    let w: Vec<u8> = (0..blocks * bytes).map(|_| fill(&mut rng)).collect();
                    let x: Vec<i8> = (0..blocks * QK_K)
                        .map(|_| (fill(&mut rng) as i8).max(-127))
                        .collect();
                    for (path, got) in each_path(paths, &w, &x, blocks) {
                        for b in 0..blocks {
                            let want =
                                scalar_k(kind, &w[b * bytes..][..bytes], &x[b * QK_K..][..QK_K]);
                            assert_eq!(
                                got[b], want,
                                "K kind {kind} ({path}) block {b} of {blocks}, case {case}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "weight bytes")]
    fn short_input_is_refused() {
        let mut out = [0i32; 2];
        block_sums_q8_0(&[0u8; Q8_0_BYTES], &[0i8; 2 * QK], &mut out);
    }

    /// An f16's bits as f32 (exact; the scalar conversion).
    fn f16_to_f32(h: u16) -> f32 {
        let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
        let e = ((h >> 10) & 0x1f) as i32;
        let m = (h & 0x3ff) as f32;
        sign * match e {
            0 => m * (2.0f32).powi(-24),
            31 if m == 0.0 => f32::INFINITY,
            31 => f32::NAN,
            _ => (1.0 + m / 1024.0) * (2.0f32).powi(e - 15),
        }
    }

    /// `kiln_blocks::float_dot` written out again (this file stands alone).
    fn float_dot(w: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        for (i, (w, x)) in w.iter().zip(x).enumerate() {
            acc[i % 8] = w.mul_add(*x, acc[i % 8]);
        }
        if w.len() % 8 != 0 {
            for a in &mut acc[w.len() % 8..] {
                *a += 0.0;
            }
        }
        let b = [
            acc[0] + acc[4],
            acc[1] + acc[5],
            acc[2] + acc[6],
            acc[3] + acc[7],
        ];
        (b[0] + b[2]) + (b[1] + b[3])
    }

    fn float_tiles_case<const T: u8>(rng: &mut Lcg, len: usize) {
        // Random f16 or bf16 bit patterns (infinities and NaNs among them
        // for f16: every exponent), activations rounded to the same type;
        // for F32, random f32 bit patterns of moderate exponents (some tiny
        // and huge), activations as they are.
        let widen = |h: u32| match T {
            F32 => f32::from_bits(h),
            BF16 => f32::from_bits(h << 16),
            _ => f16_to_f32(h as u16),
        };
        let bits = |rng: &mut Lcg| {
            let v = u16::from_le_bytes([rng.byte(), rng.byte()]);
            match T {
                F32 => {
                    let lo = u16::from_le_bytes([rng.byte(), rng.byte()]) as u32;
                    let hi = if v % 4 != 0 { (v & 0x80ff) | 0x3f00 } else { v };
                    (hi as u32) << 16 | lo
                }
                // bf16: mostly moderate exponents, some tiny and huge ones.
                BF16 if v % 4 != 0 => ((v & 0x80ff) | 0x3f00) as u32,
                _ => v as u32,
            }
        };
        let e = if T == F32 { 4 } else { 2 };
        let w: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                (0..len)
                    .flat_map(|_| bits(rng).to_le_bytes()[..e].to_vec())
                    .collect()
            })
            .collect();
        let x: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..len).map(|_| widen(bits(rng))).collect())
            .collect();
        let wf: Vec<Vec<f32>> = w
            .iter()
            .map(|r| {
                r.chunks(e)
                    .map(|c| {
                        let mut b = [0u8; 4];
                        b[..e].copy_from_slice(c);
                        widen(u32::from_le_bytes(b))
                    })
                    .collect()
            })
            .collect();
        let got = float_tile::<T, 2, 3>(&[&w[0], &w[1]], &[&x[0], &x[1], &x[2]]);
        for n in 0..2 {
            for m in 0..3 {
                let want = float_dot(&wf[n], &x[m]);
                let g = got[n][m];
                assert!(
                    want.to_bits() == g.to_bits() || want.is_nan() && g.is_nan(),
                    "type {} len {}: ({}, {}) kernel {:e}, reference {:e}",
                    T,
                    len,
                    n,
                    m,
                    g,
                    want
                );
            }
        }
        let one = float_tile::<T, 1, 1>(&[&w[1]], &[&x[2]]);
        assert!(one[0][0].to_bits() == got[1][2].to_bits() || one[0][0].is_nan());
    }

    #[test]
    fn float_tiles_follow_the_f32_lane_order() {
        let mut rng = Lcg(7);
        for len in [1, 7, 8, 9, 15, 16, 31, 64, 77, 200] {
            for _ in 0..4 {
                float_tiles_case::<0>(&mut rng, len);
                float_tiles_case::<BF16>(&mut rng, len);
                float_tiles_case::<F32>(&mut rng, len);
            }
        }
    }
}
