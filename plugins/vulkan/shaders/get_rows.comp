#version 450
// GET_ROWS: dst[:, i] = src0[:, src1[i]] as f32, one invocation per element.
#include "common.glsl"

layout(local_size_x = 256) in;

void main() {
    uint i = flat_group() * 256u + gl_LocalInvocationID.x;
    if (i >= dst_count()) return;
    uvec4 at = dst_index(i);
    uint row = uint(int(u32_1(op.s1.base + at.y * op.s1.nb0 + at.z * op.s1.nb1 + at.w * op.s1.nb2)));
    store(dst_addr(at.x, at.y, at.z, at.w), element_0(at.x, row, at.z, at.w));
}
