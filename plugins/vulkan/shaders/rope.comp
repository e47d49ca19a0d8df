#version 450
// ROPE: one invocation per destination element; src1 holds the positions.
// Computed as kiln's CPU reference (and ggml) computes it, step for step in
// f32: the angle advanced from the position by repeated multiplication with
// the step the host computed (op.aux), sine and cosine to within about an
// ulp (a GPU's built-in ones are far coarser), one fused multiply-add per
// output. K is rounded to f16 right after: a last-bit difference here flips
// roundings in the KV cache and, in time, a token.
#include "common.glsl"

layout(local_size_x = 256) in;

// sin and cos of x: reduced by multiples of pi/2 (pi/2 in three parts,
// the first exact in 8 bits: exact products for |x| < 2^16) and cephes'
// minimax polynomials on [-pi/4, pi/4].
vec2 sin_cos(float x) {
    precise float j = roundEven(x * 0.636619772367581343);
    precise float r = x - j * 1.5703125;
    r = r - j * 4.837512969970703125e-4;
    r = r - j * 7.54978995489188216e-8;
    precise float z = r * r;
    precise float s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4));
    precise float c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5));
    uint q = uint(int(j)) & 3u;
    if (q == 0u) return vec2(s, c);
    if (q == 1u) return vec2(c, -s);
    if (q == 2u) return vec2(-s, -c);
    return vec2(-c, s);
}

void main() {
    uint i = flat_group() * 256u + gl_LocalInvocationID.x;
    if (i >= dst_count()) return;
    uvec4 at = dst_index(i);
    uint n_rot = uint(op.params[0]);
    bool neox = op.params[1] == 2;
    float freq_scale = param_f32(3u);
    uint d = at.x;
    if (d >= n_rot) {
        store(dst_addr(at.x, at.y, at.z, at.w), element_0(at.x, at.y, at.z, at.w));
        return;
    }
    // The pair (a, b) this element belongs to, and its index in the pair.
    uint half_rot = n_rot / 2u;
    uint pair = neox ? d % half_rot : d / 2u;
    uint a = neox ? pair : 2u * pair;
    uint b = neox ? pair + half_rot : 2u * pair + 1u;
    precise float theta = float(int(u32_1(op.s1.base + at.z * op.s1.nb0)));
    for (uint k = 0u; k < pair; k++) theta = theta * op.aux;
    vec2 sc = sin_cos(freq_scale * theta);
    float x0 = element_0(a, at.y, at.z, at.w), x1 = element_0(b, at.y, at.z, at.w);
    precise float y = d == a ? fma(x0, sc.y, -(x1 * sc.x)) : fma(x0, sc.x, x1 * sc.y);
    store(dst_addr(at.x, at.y, at.z, at.w), y);
}
