#version 450
// GET_ROWS: dst[:, i] = src0[:, src1[i]] as f32, one invocation per element.
// An index outside src0 writes nothing; a part of a split lookup (see
// common.glsl) writes the rows it holds.
#include "common.glsl"

layout(local_size_x = 256) in;

void main() {
    uint i = flat_group() * 256u + gl_LocalInvocationID.x;
    if (i >= dst_count()) return;
    uvec4 at = dst_index(i);
    uint row = uint(int(u32_1(op.s1.base + at.y * op.s1.nb0 + at.z * op.s1.nb1 + at.w * op.s1.nb2)));
    if (row < op.rows[0] || row >= op.rows[1]) return;
    store(dst_addr(at.x, at.y, at.z, at.w), element_0(at.x, row - op.rows[0], at.z, at.w));
}
