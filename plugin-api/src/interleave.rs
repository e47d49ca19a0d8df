//! kiln's interleaved weight layouts: the same blocks as a ggml type,
//! rearranged within a row so that a vector unit loads each field of 16
//! blocks with one aligned-size load instead of gathering it.
//!
//! [`DType::Q5_0X16`] is Q5_0 (22 bytes per block of 32 weights: an f16
//! scale, 32 fifth bits, 16 bytes of nibbles) with each whole group of 16
//! blocks of a row (352 bytes) stored as
//!
//! | bytes | field |
//! |---|---|
//! | 0..32 | the 16 scales (f16), block `i` at `2i` |
//! | 32..96 | 8 fifth-bit masks (u64, little-endian): mask `j`, bit `4i + b` = bit `16·(j % 2) + 4·(j / 2) + b` of block `i`'s `qh` |
//! | 96..352 | 4 code vectors of 64 bytes: vector `k`, bytes `4i..4i+4` = block `i`'s `qs[4k..4k+4]` |
//!
//! so vector `k`'s low nibbles are codes `4k..4k+4` of every block, its
//! high nibbles codes `16 + 4k..`, and masks `2k` and `2k + 1` their fifth
//! bits, byte for byte. [`DType::Q4_0X16`] is Q4_0 (18 bytes: the scale,
//! 16 bytes of nibbles) the same way without the masks: each group of 16
//! blocks (288 bytes) is the 16 scales, then the 4 code vectors from byte
//! 32. The row's last `blocks % 16` blocks stay plain. A row takes the
//! same bytes in either layout, and rows are packed whole: a view of part
//! of a row would cut groups apart.

use crate::DType;

/// Blocks per interleaved group.
pub const GROUP: usize = 16;
/// Bytes of one interleaved group of Q5_0 blocks.
pub const Q5_0_GROUP_BYTES: usize = group_bytes(DType::Q5_0X16);
/// Bytes of one interleaved group of Q4_0 blocks.
pub const Q4_0_GROUP_BYTES: usize = group_bytes(DType::Q4_0X16);

/// The ggml type whose blocks `layout` rearranges (`layout` itself for a
/// ggml type).
pub const fn plain(layout: DType) -> DType {
    match layout {
        DType::Q4_0X16 => DType::Q4_0,
        DType::Q5_0X16 => DType::Q5_0,
        t => t,
    }
}

/// Whether `dtype` is one of kiln's interleaved layouts.
pub const fn is_interleaved(dtype: DType) -> bool {
    plain(dtype) as u32 != dtype as u32
}

/// Bytes of nibbles a block ends with (Q4_0's and Q5_0's `qs`): the 4
/// pieces of 4 that go to a group's 4 code vectors.
const CODE_BYTES: usize = 16;

/// Bytes of one group of 16 blocks of `layout`.
pub const fn group_bytes(layout: DType) -> usize {
    GROUP * layout.block_bytes()
}

/// Where a group's code vectors start: after the scales, and the fifth-bit
/// masks where the type has them.
pub const fn codes_at(layout: DType) -> usize {
    match layout {
        DType::Q5_0X16 => 2 * GROUP + 8 * 8,
        _ => 2 * GROUP,
    }
}

/// Rewrites one row of `plain(layout)` blocks in place as `layout`.
///
/// Panics if `layout` is not interleaved or the row is not a whole number
/// of blocks.
pub fn pack(layout: DType, row: &mut [u8]) {
    let block = layout.block_bytes();
    assert!(is_interleaved(layout), "{layout} is no interleaved layout");
    assert!(
        row.len().is_multiple_of(block),
        "a {} row of {} bytes",
        plain(layout).name().to_uppercase(),
        row.len()
    );
    let masked = codes_at(layout) > 2 * GROUP;
    let mut plain = [0u8; Q5_0_GROUP_BYTES];
    let plain = &mut plain[..group_bytes(layout)];
    for group in row.chunks_exact_mut(group_bytes(layout)) {
        plain.copy_from_slice(group);
        let (scales, rest) = group.split_at_mut(2 * GROUP);
        let (masks, codes) = rest.split_at_mut(codes_at(layout) - 2 * GROUP);
        let mut m = [0u64; 8];
        for (i, b) in plain.chunks_exact(block).enumerate() {
            scales[2 * i..2 * i + 2].copy_from_slice(&b[0..2]);
            if masked {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for (j, m) in m.iter_mut().enumerate() {
                    let nib = (qh >> (16 * (j % 2) + 4 * (j / 2))) & 0xf;
                    *m |= (nib as u64) << (4 * i);
                }
            }
            let qs = &b[block - CODE_BYTES..];
            for k in 0..4 {
                codes[64 * k + 4 * i..][..4].copy_from_slice(&qs[4 * k..][..4]);
            }
        }
        for (out, m) in masks.chunks_exact_mut(8).zip(m) {
            out.copy_from_slice(&m.to_le_bytes());
        }
    }
}

/// Writes the plain blocks of a `layout` row `src` into `dst` (as long as
/// `src`).
///
/// Panics if `layout` is not interleaved, or the lengths differ or are not
/// a whole number of blocks.
pub fn unpack(layout: DType, src: &[u8], dst: &mut [u8]) {
    let block = layout.block_bytes();
    assert!(is_interleaved(layout), "{layout} is no interleaved layout");
    assert!(
        src.len() == dst.len() && src.len().is_multiple_of(block),
        "{layout} row of {} bytes into {}",
        src.len(),
        dst.len()
    );
    let masked = codes_at(layout) > 2 * GROUP;
    let gb = group_bytes(layout);
    let whole = src.len() / gb * gb;
    for (group, out) in src[..whole].chunks_exact(gb).zip(dst.chunks_exact_mut(gb)) {
        let (scales, rest) = group.split_at(2 * GROUP);
        let (masks, codes) = rest.split_at(codes_at(layout) - 2 * GROUP);
        let mut m = [0u64; 8];
        for (m, c) in m.iter_mut().zip(masks.chunks_exact(8)) {
            *m = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        for (i, b) in out.chunks_exact_mut(block).enumerate() {
            b[0..2].copy_from_slice(&scales[2 * i..2 * i + 2]);
            if masked {
                let mut qh = 0u32;
                for (j, m) in m.iter().enumerate() {
                    let nib = ((m >> (4 * i)) & 0xf) as u32;
                    qh |= nib << (16 * (j % 2) + 4 * (j / 2));
                }
                b[2..6].copy_from_slice(&qh.to_le_bytes());
            }
            let qs = &mut b[block - CODE_BYTES..];
            for k in 0..4 {
                qs[4 * k..][..4].copy_from_slice(&codes[64 * k + 4 * i..][..4]);
            }
        }
    }
    dst[whole..].copy_from_slice(&src[whole..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn packing_round_trips_for_any_number_of_blocks() {
        for layout in [DType::Q4_0X16, DType::Q5_0X16] {
            let block = layout.block_bytes();
            for blocks in [0, 1, 15, 16, 17, 32, 33, 64, 70] {
                let plain = bytes(blocks * block, blocks as u64);
                let mut row = plain.clone();
                pack(layout, &mut row);
                let whole = blocks / GROUP * group_bytes(layout);
                // Whole groups move; the tail stays as it was.
                assert_eq!(row[whole..], plain[whole..], "{layout} {blocks} blocks");
                if blocks >= GROUP {
                    assert_ne!(row[..whole], plain[..whole], "{layout} {blocks} blocks");
                }
                let mut back = vec![0u8; row.len()];
                unpack(layout, &row, &mut back);
                assert_eq!(back, plain, "{layout} {blocks} blocks");
            }
        }
    }

    #[test]
    fn q4_0_fields_land_where_the_layout_says() {
        const BLOCK: usize = 18;
        let plain = bytes(GROUP * BLOCK, 5);
        let mut row = plain.clone();
        pack(DType::Q4_0X16, &mut row);
        for i in 0..GROUP {
            let b = &plain[i * BLOCK..][..BLOCK];
            assert_eq!(row[2 * i..2 * i + 2], b[0..2]);
            for c in 0..16 {
                // Byte c of the block's nibbles: vector c / 4, lane i.
                assert_eq!(row[32 + 64 * (c / 4) + 4 * i + c % 4], b[2 + c]);
            }
        }
    }

    #[test]
    fn q5_0_fields_land_where_the_layout_says() {
        const BLOCK: usize = 22;
        let plain = bytes(GROUP * BLOCK, 7);
        let mut row = plain.clone();
        pack(DType::Q5_0X16, &mut row);
        for i in 0..GROUP {
            let b = &plain[i * BLOCK..][..BLOCK];
            assert_eq!(row[2 * i..2 * i + 2], b[0..2]);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for code in 0..32 {
                // Code c < 16 is the low nibble of qs[c], else the high
                // nibble of qs[c - 16]; vector k = (c % 16) / 4.
                let (half, c) = (code / 16, code % 16);
                let j = 2 * (c / 4) + half;
                let mask = u64::from_le_bytes(row[32 + 8 * j..][..8].try_into().unwrap());
                let bit = 4 * i + c % 4;
                assert_eq!((mask >> bit) & 1, ((qh >> code) & 1) as u64);
                let q = row[96 + 64 * (c / 4) + 4 * i + c % 4];
                let nibble = if half == 0 { q & 0xf } else { q >> 4 };
                let want = if half == 0 {
                    b[6 + c] & 0xf
                } else {
                    b[6 + c] >> 4
                };
                assert_eq!(nibble, want);
            }
        }
    }

    #[test]
    #[should_panic(expected = "a Q5_0 row of 23 bytes")]
    fn packing_refuses_partial_blocks() {
        pack(DType::Q5_0X16, &mut [0u8; 23]);
    }

    #[test]
    #[should_panic(expected = "q4_0 is no interleaved layout")]
    fn packing_refuses_plain_types() {
        pack(DType::Q4_0, &mut [0u8; 18]);
    }
}
