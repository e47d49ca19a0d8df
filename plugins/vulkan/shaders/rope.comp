#version 450
// ROPE: one invocation per destination element; src1 holds the positions.
#include "common.glsl"

layout(local_size_x = 256) in;

void main() {
    uint i = flat_group() * 256u + gl_LocalInvocationID.x;
    if (i >= dst_count()) return;
    uvec4 at = dst_index(i);
    uint n_rot = uint(op.params[0]);
    bool neox = op.params[1] == 2;
    float base = param_f32(2u), freq_scale = param_f32(3u);
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
    float pos = float(int(u32_1(op.s1.base + at.z * op.s1.nb0)));
    float theta = pos * freq_scale * pow(base, -2.0 * float(pair) / float(n_rot));
    float c = cos(theta), s = sin(theta);
    float x0 = element_0(a, at.y, at.z, at.w), x1 = element_0(b, at.y, at.z, at.w);
    float y = d == a ? x0 * c - x1 * s : x0 * s + x1 * c;
    store(dst_addr(at.x, at.y, at.z, at.w), y);
}
