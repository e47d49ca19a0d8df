// MUL_MAT: dst[n, m] = sum_k src0[k, n] * src1[k, m], the second half:
// quantize.comp has left src1 rounded as kiln's CPU reference rounds it
// (F16/BF16 for those weights, Q8_0 with Q8_1's sum for the 32-element
// types, Q8_K for the K-quants) in the scratch binding. A workgroup takes
// one weight row and up to TM activation columns: its invocations stride
// over units of 8 weights (a word of 4-bit codes, two of 8-bit ones),
// decode each unit once and take its integer dot product with every
// column, scaled per block; shared memory sums the invocations. The
// weights' batch dimensions broadcast over src1's.
//
// Sums are of type ACC: double in mul_mat_f64.comp (devices with
// shaderFloat64), where every product and sum is exact or within 2^-53, as
// in kiln's CPU kernels, so the result is theirs to the last bit (the
// integer dot products are exact); float in mul_mat.comp, a few ulps off.
// The _sg variants sum the invocations with subgroup operations where the
// device has them, the others through shared memory.
#include "common.glsl"
#include "act.glsl"

#define TM 8u
#define WG 64u

layout(local_size_x = 64) in;

#ifdef ACC_F64
#define ACC double
#else
#define ACC float
#endif

shared ACC part[TM * WG];

ivec4 i8x4(uint w) { return ivec4(int(w << 24) >> 24, int(w << 16) >> 24, int(w << 8) >> 24, int(w) >> 24); }
ivec4 lo4(uint w) { return ivec4(w & 15u, (w >> 8) & 15u, (w >> 16) & 15u, (w >> 24) & 15u); }
ivec4 hi4(uint w) { return ivec4((w >> 4) & 15u, (w >> 12) & 15u, (w >> 20) & 15u, w >> 28); }
// Bit `shift` of each byte of w, as bit 4.
ivec4 bit4(uint w, uint shift) {
    return ivec4(((w >> shift) & 1u) << 4, ((w >> (8u + shift)) & 1u) << 4,
                 ((w >> (16u + shift)) & 1u) << 4, ((w >> (24u + shift)) & 1u) << 4);
}
int idot(ivec4 a, ivec4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
ivec4 iq4nl(ivec4 q) { return ivec4(IQ4_NL_VALUES[q.x], IQ4_NL_VALUES[q.y], IQ4_NL_VALUES[q.z], IQ4_NL_VALUES[q.w]); }

void main() {
    uint t = gl_LocalInvocationID.x;
    uint g = flat_group();
    uint n_out = op.d.ne0, m_tiles = (op.d.ne1 + TM - 1u) / TM;
    if (g >= n_out * m_tiles * op.d.ne2 * op.d.ne3) return;
    uint n = g % n_out;
    g /= n_out;
    uint m0 = (g % m_tiles) * TM;
    g /= m_tiles;
    uint c2 = g % op.d.ne2, c3 = g / op.d.ne2;
    uint w2 = c2 / (op.s1.ne2 / op.s0.ne2), w3 = c3 / (op.s1.ne3 / op.s0.ne3);
    uint cols = min(TM, op.d.ne1 - m0);
    // Activation row of column m0.
    uint r0 = m0 + op.s1.ne1 * (c2 + op.s1.ne2 * c3);
    uint wt = op.s0.dtype;
    uint k_len = op.s0.ne0;
    uint row = op.s0.base + n * op.s0.nb1 + w2 * op.s0.nb2 + w3 * op.s0.nb3;
    uint kind = act_kind(wt);

    ACC acc[TM];
    [[unroll]] for (uint i = 0u; i < TM; i++) acc[i] = ACC(0.0);

    if (kind == ACT_FLOAT) {
        for (uint k0 = 8u * t; k0 < k_len; k0 += 8u * WG) {
            uint len = min(8u, k_len - k0);
            float w[8];
            [[unroll]] for (uint j = 0u; j < 8u; j++) {
                uint a = row + (k0 + j) * op.s0.nb0;
                w[j] = j >= len ? 0.0 : wt == T_F16 ? f16_0(a) : wt == T_BF16 ? bf16_0(a) : f32_0(a);
            }
            [[unroll]] for (uint i = 0u; i < TM; i++) {
                if (i >= cols) break;
                uint x = act_block(wt, k_len, r0 + i, 0u) + k0;
                ACC s = ACC(0.0);
                [[unroll]] for (uint j = 0u; j < 8u; j++) {
                    if (j < len) s += ACC(w[j]) * ACC(uintBitsToFloat(scratch[x + j]));
                }
                acc[i] += s;
            }
        }
    } else if (kind == ACT_Q8_0) {
        uint bb = block_bytes(wt);
        uint nb = k_len / 32u;
        bool with_min = wt == T_Q4_1 || wt == T_Q5_1;
        for (uint u = t; u < 4u * nb; u += WG) {
            uint b = u >> 2, q = u & 3u;
            uint wb = row + b * bb;
            // The unit's 8 codes, centred, and which activation words they
            // meet: elements 4q..4q+3 and 16+4q..16+4q+3, or 8q..8q+7 (Q8_0).
            ivec4 c0, c1;
            uint a0 = q, a1 = 4u + q;
            float d = f16_0(wb), mn = 0.0;
            if (wt == T_Q8_0) {
                c0 = i8x4(u32_0(wb + 2u + 8u * q));
                c1 = i8x4(u32_0(wb + 6u + 8u * q));
                a0 = 2u * q;
                a1 = 2u * q + 1u;
            } else if (wt == T_Q4_0 || wt == T_IQ4_NL) {
                uint w = u32_0(wb + 2u + 4u * q);
                if (wt == T_Q4_0) {
                    c0 = lo4(w) - 8;
                    c1 = hi4(w) - 8;
                } else {
                    c0 = iq4nl(lo4(w));
                    c1 = iq4nl(hi4(w));
                }
            } else if (wt == T_Q4_1) {
                uint w = u32_0(wb + 4u + 4u * q);
                c0 = lo4(w);
                c1 = hi4(w);
                mn = f16_0(wb + 2u);
            } else {
                // Q5_0, Q5_1: the fifth bits of the block in one word.
                uint off = wt == T_Q5_0 ? 2u : 4u;
                uint qh = u32_0(wb + off) >> (4u * q);
                uint w = u32_0(wb + off + 4u + 4u * q);
                ivec4 h0 = ivec4((qh & 1u) << 4, ((qh >> 1) & 1u) << 4, ((qh >> 2) & 1u) << 4, ((qh >> 3) & 1u) << 4);
                uint qh1 = qh >> 16;
                ivec4 h1 = ivec4((qh1 & 1u) << 4, ((qh1 >> 1) & 1u) << 4, ((qh1 >> 2) & 1u) << 4, ((qh1 >> 3) & 1u) << 4);
                c0 = lo4(w) | h0;
                c1 = hi4(w) | h1;
                if (wt == T_Q5_0) {
                    c0 -= 16;
                    c1 -= 16;
                } else {
                    mn = f16_0(wb + 2u);
                }
            }
            [[unroll]] for (uint i = 0u; i < TM; i++) {
                if (i >= cols) break;
                uint x = act_block(wt, k_len, r0 + i, b);
                int s = idot(c0, i8x4(scratch[x + a0])) + idot(c1, i8x4(scratch[x + a1]));
                acc[i] += ACC(d) * ACC(uintBitsToFloat(scratch[x + 8u])) * ACC(s);
                if (with_min && q == 0u) acc[i] += ACC(mn) * ACC(uintBitsToFloat(scratch[x + 9u]));
            }
        }
    } else {
        uint kb = kblock_bytes(wt);
        uint nb = k_len / 256u;
        for (uint u = t; u < 32u * nb; u += WG) {
            uint b = u >> 5, v = u & 31u;
            uint wb = row + b * kb;
            if (wt == T_Q2_K || wt == T_Q3_K) {
                // Elements 8v..8v+7: sub-block v / 2, their codes in bytes
                // 32n + l0.. at shift 2j.
                uint n = v >> 4, sh = 2u * ((v >> 2) & 3u), l0 = (v & 3u) * 8u, i = v >> 1;
                uint qs = wb + (wt == T_Q2_K ? 16u : 32u) + 32u * n + l0;
                ivec4 c0 = lo4(u32_0(qs) >> sh) & 3, c1 = lo4(u32_0(qs + 4u) >> sh) & 3;
                if (wt == T_Q3_K) {
                    uint hb = 4u * n + (sh >> 1);
                    c0 += ((lo4(u32_0(wb + l0) >> hb) & 1) << 2) - 4;
                    c1 += ((lo4(u32_0(wb + l0 + 4u) >> hb) & 1) << 2) - 4;
                }
                uint sc = wt == T_Q2_K ? byte_0(wb + i) : 0u;
                int scale = wt == T_Q2_K ? int(sc & 15u) : q3_k_scale_0(wb + 96u, i);
                float d = f16_0(wt == T_Q2_K ? wb + 80u : wb + 108u);
                float dmin = wt == T_Q2_K ? f16_0(wb + 82u) : 0.0;
                [[unroll]] for (uint j = 0u; j < TM; j++) {
                    if (j >= cols) break;
                    uint x = act_block(wt, k_len, r0 + j, b);
                    int s = idot(c0, i8x4(scratch[x + 2u * v])) + idot(c1, i8x4(scratch[x + 2u * v + 1u]));
                    ACC dx = ACC(uintBitsToFloat(scratch[x + 64u]));
                    acc[j] += ACC(d) * dx * ACC(scale * s);
                    if (wt == T_Q2_K && (v & 1u) == 0u) {
                        acc[j] -= ACC(dmin) * dx * ACC(int(sc >> 4) * int(scratch[x + 65u + i]));
                    }
                }
            } else if (wt == T_IQ4_XS) {
                // Sub-block ib of 32, bytes 4q..4q+3 of its codes.
                uint ib = v >> 2, q = v & 3u;
                uint w = u32_0(wb + 8u + 16u * ib + 4u * q);
                ivec4 c0 = iq4nl(lo4(w)), c1 = iq4nl(hi4(w));
                int scale = iq4_xs_scale_0(wb, ib);
                float d = f16_0(wb);
                [[unroll]] for (uint j = 0u; j < TM; j++) {
                    if (j >= cols) break;
                    uint x = act_block(wt, k_len, r0 + j, b);
                    int s = idot(c0, i8x4(scratch[x + 8u * ib + q])) + idot(c1, i8x4(scratch[x + 8u * ib + 4u + q]));
                    acc[j] += ACC(d) * ACC(uintBitsToFloat(scratch[x + 64u])) * ACC(scale * s);
                }
            } else if (wt == T_Q6_K) {
                // Elements 128h + 32p + l0 .. +7.
                uint h = v >> 4, p = (v >> 2) & 3u, l0 = (v & 3u) * 8u;
                uint ql = wb + 64u * h + 32u * (p & 1u) + l0, qh = wb + 128u + 32u * h + l0;
                uint sl = 4u * (p >> 1), sh = 2u * p;
                ivec4 c0 = ivec4((uvec4(lo4(u32_0(ql) >> sl)) & 15u) | ((uvec4(lo4(u32_0(qh) >> sh)) & 3u) << 4)) - 32;
                ivec4 c1 = ivec4((uvec4(lo4(u32_0(ql + 4u) >> sl)) & 15u) | ((uvec4(lo4(u32_0(qh + 4u) >> sh)) & 3u) << 4)) - 32;
                float d = f16_0(wb + 208u);
                int sc = i8_0(wb + 192u + 8u * h + (l0 >> 4) + 2u * p);
                uint a = (128u * h + 32u * p + l0) >> 2;
                [[unroll]] for (uint i = 0u; i < TM; i++) {
                    if (i >= cols) break;
                    uint x = act_block(wt, k_len, r0 + i, b);
                    int s = idot(c0, i8x4(scratch[x + a])) + idot(c1, i8x4(scratch[x + a + 1u]));
                    acc[i] += ACC(d) * ACC(uintBitsToFloat(scratch[x + 64u])) * ACC(sc * s);
                }
            } else {
                // Q4_K, Q5_K: chunk c of 64 elements, bytes 4w..4w+3 of its
                // codes: elements 64c + 4w.. (low nibbles, sub-block 2c) and
                // 64c + 32 + 4w.. (high nibbles, sub-block 2c + 1).
                uint c = v >> 3, w = v & 7u;
                uint qs = wb + (wt == T_Q5_K ? 48u : 16u) + 32u * c + 4u * w;
                uint codes = u32_0(qs);
                ivec4 c0 = lo4(codes), c1 = hi4(codes);
                if (wt == T_Q5_K) {
                    uint qh = u32_0(wb + 16u + 4u * w);
                    c0 |= bit4(qh, 2u * c);
                    c1 |= bit4(qh, 2u * c + 1u);
                }
                uvec2 sm0 = scale_min_0(wb + 4u, 2u * c), sm1 = scale_min_0(wb + 4u, 2u * c + 1u);
                float d = f16_0(wb), dmin = f16_0(wb + 2u);
                [[unroll]] for (uint i = 0u; i < TM; i++) {
                    if (i >= cols) break;
                    uint x = act_block(wt, k_len, r0 + i, b);
                    int s0 = idot(c0, i8x4(scratch[x + 16u * c + w]));
                    int s1 = idot(c1, i8x4(scratch[x + 16u * c + 8u + w]));
                    ACC s = ACC(d) * ACC(int(sm0.x) * s0 + int(sm1.x) * s1);
                    if (w == 0u) {
                        int b0 = int(scratch[x + 65u + 4u * c]) + int(scratch[x + 66u + 4u * c]);
                        int b1 = int(scratch[x + 67u + 4u * c]) + int(scratch[x + 68u + 4u * c]);
                        s -= ACC(dmin) * ACC(int(sm0.y) * b0 + int(sm1.y) * b1);
                    }
                    acc[i] += ACC(uintBitsToFloat(scratch[x + 64u])) * s;
                }
            }
        }
    }

#ifdef SUBGROUPS
    // Each subgroup sums its partials; one barrier; invocation i adds
    // column i's subgroup sums.
    [[unroll]] for (uint i = 0u; i < TM; i++) {
        if (i >= cols) break;
        ACC v = subgroupAdd(acc[i]);
        if (subgroupElect()) part[i * WG + gl_SubgroupID] = v;
    }
    barrier();
    uint partials = gl_NumSubgroups;
#else
    // One barrier, then invocation i sums column i's partials (a tree of
    // barriers costs more than it saves at this width).
    [[unroll]] for (uint i = 0u; i < TM; i++) part[i * WG + t] = acc[i];
    barrier();
    uint partials = WG;
#endif
    if (t < cols) {
        ACC sum = ACC(0.0);
        for (uint j = 0u; j < partials; j++) sum += part[t * WG + j];
        store(dst_addr(n, m0 + t, c2, c3), float(sum));
    }
}
