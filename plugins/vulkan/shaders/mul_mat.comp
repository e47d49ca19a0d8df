#version 450
// MUL_MAT: dst[n, m] = sum_k src0[k, n] * src1[k, m]. One workgroup per
// destination element, its invocations striding over k in blocks of 32,
// summed in shared memory; the weights' batch dimensions broadcast over
// src1's. Activations are rounded first as kiln's CPU reference does (and
// llama.cpp's CPU backend): to F16 or BF16 for those weights, to Q8_0
// blocks (scale rounded to f16) for the quantized types, with Q8_1's
// rounded sum for the types with a minimum (Q4_1, Q5_1), so the results
// track the CPU's closely; to Q8_K (256 elements, an f32 scale from the
// signed maximum) for the K-quants.
#include "common.glsl"

layout(local_size_x = 64) in;

shared float part[64];

float to_f16(float x) { return unpackHalf2x16(packHalf2x16(vec2(x, 0.0))).x; }

void main() {
    uint g = flat_group();
    if (g >= dst_count()) return;
    uvec4 at = dst_index(g);
    uint n = at.x, m = at.y, c2 = at.z, c3 = at.w;
    uint w2 = c2 / (op.s1.ne2 / op.s0.ne2), w3 = c3 / (op.s1.ne3 / op.s0.ne3);
    uint t = gl_LocalInvocationID.x;
    uint wt = op.s0.dtype;
    uint bb = block_bytes(wt);
    uint k_len = op.s0.ne0;
    float s = 0.0;
    if (bb == 0u && kblock_bytes(wt) == 0u) {
        // Floats: one element at a time; x rounded to the weights' type.
        for (uint k = t; k < k_len; k += 64u) {
            float x = element_1(k, m, c2, c3);
            if (wt == T_F16) x = to_f16(x);
            if (wt == T_BF16) x = uintBitsToFloat(bf16_bits(x) << 16);
            s += element_0(k, n, w2, w3) * x;
        }
    } else if (kblock_bytes(wt) != 0u) {
        uint kb = kblock_bytes(wt);
        uint row = op.s0.base + n * op.s0.nb1 + w2 * op.s0.nb2 + w3 * op.s0.nb3;
        for (uint b = t; b < k_len / 256u; b += 64u) {
            float amax = 0.0, mx = 0.0;
            for (uint j = 0u; j < 256u; j++) {
                float v = element_1(256u * b + j, m, c2, c3);
                if (abs(v) > amax) {
                    amax = abs(v);
                    mx = v;
                }
            }
            if (amax == 0.0) continue;
            float iscale = -127.0 / mx;
            uint wb = row + b * kb;
            float dot = 0.0;
            for (uint j = 0u; j < 256u; j++) {
                float q = min(roundEven(iscale * element_1(256u * b + j, m, c2, c3)), 127.0);
                dot += kblock_0(wt, wb, j) * q;
            }
            s += dot * (1.0 / iscale);
        }
    } else {
        uint row = op.s0.base + n * op.s0.nb1 + w2 * op.s0.nb2 + w3 * op.s0.nb3;
        bool with_min = wt == T_Q4_1 || wt == T_Q5_1;
        for (uint b = t; b < k_len / 32u; b += 64u) {
            float amax = 0.0;
            for (uint j = 0u; j < 32u; j++) amax = max(amax, abs(element_1(32u * b + j, m, c2, c3)));
            float d = amax / 127.0;
            float id = amax != 0.0 ? 127.0 / amax : 0.0;
            float dh = to_f16(d);
            uint wb = row + b * bb;
            float dot = 0.0, qsum = 0.0;
            for (uint j = 0u; j < 32u; j++) {
                float q = roundEven(element_1(32u * b + j, m, c2, c3) * id);
                qsum += q;
                if (with_min) {
                    // The code times the scale; the minimum comes below.
                    dot += (block_0(wt, wb, j) - f16_0(wb + 2u)) * q;
                } else {
                    dot += block_0(wt, wb, j) * q;
                }
            }
            s += dot * dh;
            if (with_min) s += f16_0(wb + 2u) * to_f16(d * qsum);
        }
    }
    part[t] = s;
    barrier();
    [[unroll]] for (uint h = 32u; h > 0u; h >>= 1) {
        if (t < h) part[t] += part[t + h];
        barrier();
    }
    if (t == 0u) store(dst_addr(n, m, c2, c3), part[0]);
}
