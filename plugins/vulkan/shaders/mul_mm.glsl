// MUL_MAT for prompts: dst[n, m] = sum_k src0[k, n] * src1[k, m] in tiles.
// mul_mat.glsl reads each weight row once per 8 activation columns, which
// suits decode; a prompt of hundreds of columns would read the weights
// that many times over. Here a workgroup computes a tile of BN weight rows
// by BM columns: for each chunk of K it decodes the tile's weights into
// shared memory once (8-bit codes, four to a word, with their scales; or
// floats), copies the columns' rounded activations beside them, and each
// invocation then takes the dot products of RN rows with RM columns from
// shared memory. Weights are read once per BM columns, activations once
// per BN rows.
//
// The arithmetic is mul_mat.glsl's (units.glsl: exact integer dot
// products, per-block scales), summed in ACC: double where the device has
// shaderFloat64 (the CPU's result), float otherwise. A chunk is 64 words
// of codes a row: 256 elements of a quantized type (eight 32-element
// blocks or one K-quant block) or 64 of a float type; a partial last chunk
// is padded with zero codes and scales.
#include "common.glsl"
#include "act.glsl"
#include "units.glsl"

// Four 8-bit codes a word: mul_mm_dot.comp takes their dot products with
// the device's packed instruction (SPV_KHR_integer_dot_product, OpSDot;
// Debian's glslc has no GLSL name for it yet), the others unpack them.
#ifdef DOT
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6018, 6019], id = 4450)
int sdot_4x8(uint a, uint b, spirv_literal int packed_format);
#define CODES uint
#define UNPACK(w) (w)
#define DOT4(a, b) sdot_4x8(a, b, 0)
#else
#define CODES ivec4
#define UNPACK(w) i8x4(w)
#define DOT4(a, b) idot(a, b)
#endif

// F16 weights in mul_mm_f16.comp: their activations are rounded to F16 as
// well (quantize.comp), so the tiles hold packed halves, two a word, and
// the products and runs of 8 sums are f16 arithmetic (two a lane), each
// run added to the float sums. A run that overflows f16 is summed again
// in float from the same tiles: never an inf the CPU would not give.

#define BN 32u
#define BM 32u
#define RN 4u
#define RM 4u
#define WG 64u
// Words a row of the shared tiles: 64, and one more so that rows fall in
// different banks.
#define STRIDE 65u

layout(local_size_x = 64) in;

// Codes (4 to a word) or floats, per weight row and activation column.
shared uint wq[BN * STRIDE];
shared uint xq[BM * STRIDE];
// Per weight row, 16 slots: the 32-element types' d per block (0..7) and
// mn (8..15); the K-quants' w_i; and their m_i.
shared float ws[BN * 16u];
shared float wm[BN * 16u];
// Per column: dx per block (one for a K-quant), and the rounded sums per
// block (sx) or the integer sums per 16 elements (b_i).
shared float xd[BM * 8u];
shared float xs[BM * 16u];

// The integer dot products of code words w0..w0+n-1 of the invocation's
// rows tn + 8i and columns tm + 8j of the tiles.
void tile_dots(uint tn, uint tm, uint w0, uint n, out int s[RN * RM]) {
    [[unroll]] for (uint i = 0u; i < RN * RM; i++) s[i] = 0;
    for (uint w = w0; w < w0 + n; w++) {
        CODES a[RN], x[RM];
        [[unroll]] for (uint i = 0u; i < RN; i++) a[i] = UNPACK(wq[(tn + 8u * i) * STRIDE + w]);
        [[unroll]] for (uint j = 0u; j < RM; j++) x[j] = UNPACK(xq[(tm + 8u * j) * STRIDE + w]);
        [[unroll]] for (uint i = 0u; i < RN; i++)
            [[unroll]] for (uint j = 0u; j < RM; j++) s[i * RM + j] += DOT4(a[i], x[j]);
    }
}

void main() {
    uint t = gl_LocalInvocationID.x;
    uint g = flat_group();
    uint n_tiles = (op.d.ne0 + BN - 1u) / BN, m_tiles = (op.d.ne1 + BM - 1u) / BM;
    // The whole workgroup returns, or none of it.
    if (g >= n_tiles * m_tiles * op.d.ne2 * op.d.ne3) return;
    uint n0 = (g % n_tiles) * BN;
    g /= n_tiles;
    uint m0 = (g % m_tiles) * BM;
    g /= m_tiles;
    uint c2 = g % op.d.ne2, c3 = g / op.d.ne2;
    uint w2 = c2 / (op.s1.ne2 / op.s0.ne2), w3 = c3 / (op.s1.ne3 / op.s0.ne3);
    uint rows = min(BN, op.d.ne0 - n0), cols = min(BM, op.d.ne1 - m0);
    // Activation row of column m0, weight row n0.
    uint r0 = m0 + op.s1.ne1 * (c2 + op.s1.ne2 * c3);
    uint row0 = op.s0.base + n0 * op.s0.nb1 + w2 * op.s0.nb2 + w3 * op.s0.nb3;
    uint wt = op.s0.dtype;
    uint k_len = op.s0.ne0;
    uint kind = act_kind(wt);
    // This invocation's rows tn + 8i and columns tm + 8j of the tile.
    uint tn = t & 7u, tm = t >> 3;

    ACC acc[RN * RM];
    [[unroll]] for (uint i = 0u; i < RN * RM; i++) acc[i] = ACC(0.0);

    uint chunk = kind == ACT_FLOAT ? 64u : 256u;
    for (uint k0 = 0u; k0 < k_len; k0 += chunk) {
#ifdef FP16
        if (wt == T_F16) {
            for (uint e = t; e < BN * 32u; e += WG) {
                uint r = e >> 5, k = k0 + 2u * (e & 31u);
                uint a = row0 + r * op.s0.nb1 + k * op.s0.nb0;
                uint lo = r < rows && k < k_len ? u16_0(a) : 0u;
                uint hi = r < rows && k + 1u < k_len ? u16_0(a + op.s0.nb0) : 0u;
                wq[r * STRIDE + (e & 31u)] = lo | (hi << 16);
            }
            for (uint e = t; e < BM * 32u; e += WG) {
                uint c = e >> 5, k = k0 + 2u * (e & 31u);
                uint x = act_block(wt, k_len, r0 + c, 0u) + k;
                float lo = c < cols && k < k_len ? uintBitsToFloat(scratch[x]) : 0.0;
                float hi = c < cols && k + 1u < k_len ? uintBitsToFloat(scratch[x + 1u]) : 0.0;
                xq[c * STRIDE + (e & 31u)] = packHalf2x16(vec2(lo, hi));
            }
        } else
#endif
        if (kind == ACT_FLOAT) {
            for (uint e = t; e < BN * 64u; e += WG) {
                uint r = e >> 6, k = k0 + (e & 63u);
                float v = 0.0;
                if (r < rows && k < k_len) {
                    uint a = row0 + r * op.s0.nb1 + k * op.s0.nb0;
                    v = wt == T_F16 ? f16_0(a) : wt == T_BF16 ? bf16_0(a) : f32_0(a);
                }
                wq[r * STRIDE + (e & 63u)] = floatBitsToUint(v);
            }
            for (uint e = t; e < BM * 64u; e += WG) {
                uint c = e >> 6, k = k0 + (e & 63u);
                bool ok = c < cols && k < k_len;
                xq[c * STRIDE + (e & 63u)] = ok ? scratch[act_block(wt, k_len, r0 + c, 0u) + k] : 0u;
            }
        } else if (kind == ACT_Q8_0) {
            uint bb = block_bytes(wt), nb = k_len / 32u, b0 = k0 / 32u;
            // 8 blocks of 4 units a row.
            for (uint e = t; e < BN * 32u; e += WG) {
                uint r = e >> 5, blk = (e >> 2) & 7u, b = b0 + blk;
                uint at = r * STRIDE + 8u * blk;
                if (r < rows && b < nb) {
                    uint wb = row0 + r * op.s0.nb1 + b * bb, a0, a1;
                    ivec4 c0, c1;
                    unit_32(wt, wb, e & 3u, c0, c1, a0, a1);
                    wq[at + a0] = pack_i8x4(c0);
                    wq[at + a1] = pack_i8x4(c1);
                    if ((e & 3u) == 0u) {
                        vec2 dm = scale_32(wt, wb);
                        ws[r * 16u + blk] = dm.x;
                        ws[r * 16u + 8u + blk] = dm.y;
                    }
                } else if ((e & 3u) == 0u) {
                    [[unroll]] for (uint w = 0u; w < 8u; w++) wq[at + w] = 0u;
                    ws[r * 16u + blk] = 0.0;
                    ws[r * 16u + 8u + blk] = 0.0;
                }
            }
            // 8 blocks of 8 code words, a scale and a sum, a column.
            for (uint e = t; e < BM * 64u; e += WG) {
                uint c = e >> 6, blk = (e >> 3) & 7u, w = e & 7u, b = b0 + blk;
                bool ok = c < cols && b < nb;
                uint x = ok ? act_block(wt, k_len, r0 + c, b) : 0u;
                xq[c * STRIDE + 8u * blk + w] = ok ? scratch[x + w] : 0u;
                if (w == 0u) {
                    xd[c * 8u + blk] = ok ? uintBitsToFloat(scratch[x + 8u]) : 0.0;
                    xs[c * 16u + blk] = ok ? uintBitsToFloat(scratch[x + 9u]) : 0.0;
                }
            }
        } else {
            uint kb = kblock_bytes(wt), b = k0 / 256u;
            // 32 units a row, then 16 scales a row.
            for (uint e = t; e < BN * 32u; e += WG) {
                uint r = e >> 5;
                if (r >= rows) {
                    wq[r * STRIDE + 2u * (e & 31u)] = 0u;
                    wq[r * STRIDE + 2u * (e & 31u) + 1u] = 0u;
                    continue;
                }
                uint wb = row0 + r * op.s0.nb1 + b * kb, a0, a1;
                ivec4 c0, c1;
                unit_k(wt, wb, e & 31u, c0, c1, a0, a1);
                wq[r * STRIDE + a0] = pack_i8x4(c0);
                wq[r * STRIDE + a1] = pack_i8x4(c1);
            }
            for (uint e = t; e < BN * 16u; e += WG) {
                uint r = e >> 4;
                vec2 f = r < rows ? scale_k(wt, row0 + r * op.s0.nb1 + b * kb, e & 15u) : vec2(0.0);
                ws[e] = f.x;
                wm[e] = f.y;
            }
            for (uint e = t; e < BM * 64u; e += WG) {
                uint c = e >> 6, w = e & 63u;
                bool ok = c < cols;
                uint x = ok ? act_block(wt, k_len, r0 + c, b) : 0u;
                xq[c * STRIDE + w] = ok ? scratch[x + w] : 0u;
                if (w < 16u) xs[c * 16u + w] = ok ? float(int(scratch[x + 65u + w])) : 0.0;
                if (w == 0u) xd[c * 8u] = ok ? uintBitsToFloat(scratch[x + 64u]) : 0.0;
            }
        }
        barrier();

#ifdef FP16
        if (wt == T_F16) {
            for (uint p0 = 0u; p0 < 32u; p0 += 4u) {
                f16vec2 s[RN * RM];
                [[unroll]] for (uint i = 0u; i < RN * RM; i++) s[i] = f16vec2(0.0);
                [[unroll]] for (uint p = p0; p < p0 + 4u; p++) {
                    f16vec2 w[RN], x[RM];
                    [[unroll]] for (uint i = 0u; i < RN; i++) w[i] = unpackFloat2x16(wq[(tn + 8u * i) * STRIDE + p]);
                    [[unroll]] for (uint j = 0u; j < RM; j++) x[j] = unpackFloat2x16(xq[(tm + 8u * j) * STRIDE + p]);
                    [[unroll]] for (uint i = 0u; i < RN; i++)
                        [[unroll]] for (uint j = 0u; j < RM; j++) s[i * RM + j] = fma(w[i], x[j], s[i * RM + j]);
                }
                [[unroll]] for (uint i = 0u; i < RN; i++) {
                    [[unroll]] for (uint j = 0u; j < RM; j++) {
                        vec2 f = vec2(s[i * RM + j]);
                        float v = f.x + f.y;
                        if (isinf(v)) {
                            v = 0.0;
                            for (uint p = p0; p < p0 + 4u; p++) {
                                vec2 a = unpackHalf2x16(wq[(tn + 8u * i) * STRIDE + p]);
                                vec2 b = unpackHalf2x16(xq[(tm + 8u * j) * STRIDE + p]);
                                v += a.x * b.x + a.y * b.y;
                            }
                        }
                        acc[i * RM + j] += ACC(v);
                    }
                }
            }
        } else
#endif
        if (kind == ACT_FLOAT) {
            for (uint k = 0u; k < 64u; k++) {
                float w[RN], x[RM];
                [[unroll]] for (uint i = 0u; i < RN; i++) w[i] = uintBitsToFloat(wq[(tn + 8u * i) * STRIDE + k]);
                [[unroll]] for (uint j = 0u; j < RM; j++) x[j] = uintBitsToFloat(xq[(tm + 8u * j) * STRIDE + k]);
                [[unroll]] for (uint i = 0u; i < RN; i++)
                    [[unroll]] for (uint j = 0u; j < RM; j++) acc[i * RM + j] += ACC(w[i]) * ACC(x[j]);
            }
        } else if (kind == ACT_Q8_0) {
            for (uint blk = 0u; blk < 8u; blk++) {
                int s[RN * RM];
                tile_dots(tn, tm, 8u * blk, 8u, s);
                [[unroll]] for (uint i = 0u; i < RN; i++) {
                    uint r = tn + 8u * i;
                    ACC d = ACC(ws[r * 16u + blk]), mn = ACC(ws[r * 16u + 8u + blk]);
                    [[unroll]] for (uint j = 0u; j < RM; j++) {
                        uint c = tm + 8u * j;
                        acc[i * RM + j] += d * ACC(xd[c * 8u + blk]) * ACC(s[i * RM + j]) + mn * ACC(xs[c * 16u + blk]);
                    }
                }
            }
        } else {
            for (uint sub = 0u; sub < 16u; sub++) {
                int s[RN * RM];
                tile_dots(tn, tm, 4u * sub, 4u, s);
                [[unroll]] for (uint i = 0u; i < RN; i++) {
                    uint r = tn + 8u * i;
                    ACC w = ACC(ws[r * 16u + sub]), m = ACC(wm[r * 16u + sub]);
                    [[unroll]] for (uint j = 0u; j < RM; j++) {
                        uint c = tm + 8u * j;
                        acc[i * RM + j] += ACC(xd[c * 8u]) * (w * ACC(s[i * RM + j]) + m * ACC(xs[c * 16u + sub]));
                    }
                }
            }
        }
        barrier();
    }

    [[unroll]] for (uint i = 0u; i < RN; i++) {
        [[unroll]] for (uint j = 0u; j < RM; j++) {
            uint r = tn + 8u * i, c = tm + 8u * j;
            if (r < rows && c < cols) store(dst_addr(n0 + r, m0 + c, c2, c3), float(acc[i * RM + j]));
        }
    }
}
