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
#include "units.glsl"

#define TM 8u
#define WG 64u

layout(local_size_x = 64) in;

shared ACC part[TM * WG];

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
        for (uint u = t; u < 4u * (k_len / 32u); u += WG) {
            uint b = u >> 2, wb = row + b * bb, a0, a1;
            ivec4 c0, c1;
            unit_32(wt, wb, u & 3u, c0, c1, a0, a1);
            vec2 dm = scale_32(wt, wb);
            [[unroll]] for (uint i = 0u; i < TM; i++) {
                if (i >= cols) break;
                uint x = act_block(wt, k_len, r0 + i, b);
                int s = idot(c0, i8x4(scratch[x + a0])) + idot(c1, i8x4(scratch[x + a1]));
                acc[i] += ACC(dm.x) * ACC(uintBitsToFloat(scratch[x + 8u])) * ACC(s);
                if (a0 == 0u) acc[i] += ACC(dm.y) * ACC(uintBitsToFloat(scratch[x + 9u]));
            }
        }
    } else {
        uint kb = kblock_bytes(wt);
        for (uint u = t; u < 32u * (k_len / 256u); u += WG) {
            uint b = u >> 5, wb = row + b * kb, a0, a1;
            ivec4 c0, c1;
            unit_k(wt, wb, u & 31u, c0, c1, a0, a1);
            vec2 f0 = scale_k(wt, wb, a0 >> 2), f1 = scale_k(wt, wb, a1 >> 2);
            [[unroll]] for (uint i = 0u; i < TM; i++) {
                if (i >= cols) break;
                uint x = act_block(wt, k_len, r0 + i, b);
                ACC s = ACC(f0.x) * ACC(idot(c0, i8x4(scratch[x + a0])))
                      + ACC(f1.x) * ACC(idot(c1, i8x4(scratch[x + a1])));
                // The activations' sums meet the minimums once per 16.
                if ((a0 & 3u) == 0u) s += ACC(f0.y) * ACC(int(scratch[x + 65u + (a0 >> 2)]));
                if ((a1 & 3u) == 0u) s += ACC(f1.y) * ACC(int(scratch[x + 65u + (a1 >> 2)]));
                acc[i] += ACC(uintBitsToFloat(scratch[x + 64u])) * s;
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
