#version 450
// The first half of MUL_MAT: src1's activations rounded once, as kiln's CPU
// reference rounds them for src0's type, into the scratch binding, where
// mul_mat.comp reads them for every weight row. Layouts per activation row
// r (src1's rows in dimension order; see act.glsl):
//   F32/F16/BF16 weights: K floats, rounded to the weights' type;
//   32-element types: per block of 32, 10 words: the codes as Q8_0 (8
//     words of 4 signed bytes), the scale rounded to f16 (as a float) and,
//     for the types with a minimum, Q8_1's sum (scale * sum of codes,
//     rounded to f16);
//   K-quants: per block of 256, 81 words: the codes as Q8_K (64 words), the
//     scale (1 / iscale, from the signed maximum) and the sums of the codes
//     per 16 elements (16 ints).
// One invocation per block (32 elements of float types).
#include "common.glsl"
#include "act.glsl"

layout(local_size_x = 64) in;

// Activation k of src1's row (m, c2, c3): src1 is F32 (src/ops.rs). A
// plain load, not element_1: decoding every type there, inlined at each
// call, made this shader take minutes to compile on lavapipe.
float act_in(uint k, uint m, uint c2, uint c3) {
    return f32_1(op.s1.base + k * op.s1.nb0 + m * op.s1.nb1 + c2 * op.s1.nb2 + c3 * op.s1.nb3);
}

uint pack4(ivec4 q) {
    return (uint(q.x) & 0xffu) | ((uint(q.y) & 0xffu) << 8) | ((uint(q.z) & 0xffu) << 16) |
           (uint(q.w) << 24);
}

void main() {
    uint wt = op.s0.dtype;
    uint k_len = op.s0.ne0;
    uint per_row = act_blocks(wt, k_len);
    uint i = flat_group() * 64u + gl_LocalInvocationID.x;
    uint rows = op.s1.ne1 * op.s1.ne2 * op.s1.ne3;
    if (i >= rows * per_row) return;
    uint r = i / per_row, b = i % per_row;
    uint m = r % op.s1.ne1, c2 = (r / op.s1.ne1) % op.s1.ne2, c3 = r / (op.s1.ne1 * op.s1.ne2);
    uint at = act_block(wt, k_len, r, b);
    if (act_kind(wt) == ACT_FLOAT) {
        uint end = min(32u * b + 32u, k_len);
        for (uint k = 32u * b; k < end; k++) {
            float x = act_in(k, m, c2, c3);
            if (wt == T_F16) x = round_f16(x);
            if (wt == T_BF16) x = uintBitsToFloat(bf16_bits(x) << 16);
            scratch[at + k - 32u * b] = floatBitsToUint(x);
        }
    } else if (act_kind(wt) == ACT_Q8_0) {
        float x[32];
        float amax = 0.0;
        [[unroll]] for (uint j = 0u; j < 32u; j++) {
            x[j] = act_in(32u * b + j, m, c2, c3);
            amax = max(amax, abs(x[j]));
        }
        float d = amax / 127.0;
        float id = amax != 0.0 ? 127.0 / amax : 0.0;
        int sum = 0;
        [[unroll]] for (uint w = 0u; w < 8u; w++) {
            ivec4 q = ivec4(roundEven(vec4(x[4u * w], x[4u * w + 1u], x[4u * w + 2u], x[4u * w + 3u]) * id));
            sum += q.x + q.y + q.z + q.w;
            scratch[at + w] = pack4(q);
        }
        scratch[at + 8u] = floatBitsToUint(round_f16(d));
        scratch[at + 9u] = floatBitsToUint(round_f16(d * float(sum)));
    } else {
        float amax = 0.0, mx = 0.0;
        for (uint j = 0u; j < 256u; j++) {
            float v = act_in(256u * b + j, m, c2, c3);
            if (abs(v) > amax) {
                amax = abs(v);
                mx = v;
            }
        }
        float iscale = amax != 0.0 ? -127.0 / mx : 0.0;
        for (uint g = 0u; g < 16u; g++) {
            int sum = 0;
            for (uint w = 0u; w < 4u; w++) {
                uint k = 256u * b + 16u * g + 4u * w;
                vec4 v = vec4(act_in(k, m, c2, c3), act_in(k + 1u, m, c2, c3),
                              act_in(k + 2u, m, c2, c3), act_in(k + 3u, m, c2, c3));
                ivec4 q = ivec4(min(roundEven(v * iscale), vec4(127.0)));
                sum += q.x + q.y + q.z + q.w;
                scratch[at + 4u * g + w] = pack4(q);
            }
            scratch[at + 65u + g] = uint(sum);
        }
        scratch[at + 64u] = floatBitsToUint(amax != 0.0 ? 1.0 / iscale : 0.0);
    }
}
