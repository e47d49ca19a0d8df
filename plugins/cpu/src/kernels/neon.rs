//! NEON (aarch64) integer block sums of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
//! IQ4_NL weights against Q8_0 activation codes: `Σ q_w · q_x` per 32-code block, exact,
//! which `q8::dot_rows` then scales in f64 exactly as the portable path
//! does (so the results are the reference's bits).
//!
//! NEON is part of the aarch64 base instruction set, so no detection is
//! needed. Products are `vmull_s8` (int8 × int8 → int16, exact) folded
//! into int32 lanes by `vpadalq_s16`: baseline NEON, without the ARMv8.2
//! dot-product extension.
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

/// Adds the products of two 16-code halves to `acc`'s four lanes.
#[inline(always)]
unsafe fn mul_add16(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    // SAFETY: register-only NEON operations (NEON is baseline on aarch64).
    unsafe {
        let acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(x)));
        vpadalq_s16(acc, vmull_high_s8(w, x))
    }
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
pub fn block_sums_q4_0(w: &[u8], x: &[i8], out: &mut [i32]) {
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
            let acc = mul_add16(vdupq_n_s32(0), lo, vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16(acc, hi, vld1q_s8(xp.add(16))));
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
pub fn block_sums_q5_0(w: &[u8], x: &[i8], out: &mut [i32]) {
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
            let acc = mul_add16(vdupq_n_s32(0), lo, vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16(acc, hi, vld1q_s8(xp.add(16))));
        }
    }
}

/// Q4_1: codes are the nibbles themselves (0..15), low nibbles first;
/// the caller adds the block's minimum times the activations' sum.
pub fn block_sums_q4_1(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, Q4_1_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        // SAFETY: as for Q4_0.
        unsafe {
            let q = vld1q_u8(w.as_ptr().add(b * Q4_1_BYTES + 4));
            let lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f)));
            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16(vdupq_n_s32(0), lo, vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16(acc, hi, vld1q_s8(xp.add(16))));
        }
    }
}

/// Q5_1: codes `nibble | fifth bit << 4` (0..31), the mask after the
/// minimum.
pub fn block_sums_q5_1(w: &[u8], x: &[i8], out: &mut [i32]) {
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
            let acc = mul_add16(vdupq_n_s32(0), vreinterpretq_s8_u8(lo), vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16(
                acc,
                vreinterpretq_s8_u8(hi),
                vld1q_s8(xp.add(16)),
            ));
        }
    }
}

/// IQ4_NL: each nibble indexes [`IQ4_VALUES`] (a table lookup).
pub fn block_sums_iq4_nl(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, IQ4_NL_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        // SAFETY: as for Q4_0; the table holds the 16 bytes loaded.
        unsafe {
            let table = vld1q_s8(IQ4_VALUES.as_ptr());
            let q = vld1q_u8(w.as_ptr().add(b * IQ4_NL_BYTES + 2));
            let lo = vqtbl1q_s8(table, vandq_u8(q, vdupq_n_u8(0x0f)));
            let hi = vqtbl1q_s8(table, vshrq_n_u8::<4>(q));
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16(vdupq_n_s32(0), lo, vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16(acc, hi, vld1q_s8(xp.add(16))));
        }
    }
}

/// Q8_0: the codes are the bytes.
pub fn block_sums_q8_0(w: &[u8], x: &[i8], out: &mut [i32]) {
    check(w, Q8_0_BYTES, x, out);
    for (b, o) in out.iter_mut().enumerate() {
        // SAFETY: as for Q4_0.
        unsafe {
            let wp = w.as_ptr().add(b * Q8_0_BYTES + 2).cast::<i8>();
            let xp = x.as_ptr().add(b * QK);
            let acc = mul_add16(vdupq_n_s32(0), vld1q_s8(wp), vld1q_s8(xp));
            *o = vaddvq_s32(mul_add16(acc, vld1q_s8(wp.add(16)), vld1q_s8(xp.add(16))));
        }
    }
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
        type Sums = fn(&[u8], &[i8], &mut [i32]);
        // Kinds: 4 = Q4_0, 41 = Q4_1, 5 = Q5_0, 51 = Q5_1, 8 = Q8_0, 14 = IQ4_NL.
        let kinds: [(usize, usize, Sums); 6] = [
            (4, Q4_0_BYTES, block_sums_q4_0),
            (41, Q4_1_BYTES, block_sums_q4_1),
            (5, Q5_0_BYTES, block_sums_q5_0),
            (51, Q5_1_BYTES, block_sums_q5_1),
            (8, Q8_0_BYTES, block_sums_q8_0),
            (14, IQ4_NL_BYTES, block_sums_iq4_nl),
        ];
        for (kind, bytes, sums) in kinds {
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
                    let mut got = vec![0i32; blocks];
                    sums(&w, &x, &mut got);
                    for b in 0..blocks {
                        let want = scalar(kind, &w[b * bytes..][..bytes], &x[b * QK..][..QK]);
                        assert_eq!(got[b], want, "Q{kind} block {b} of {blocks}, case {case}");
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
}
