#version 450
// ADD, MUL (src1 broadcast), SCALE, SILU, GELU and CPY (any source type to
// F32, F16 or BF16): one invocation per destination element.
#include "common.glsl"

layout(local_size_x = 256) in;

float gelu(float x) {
    // At f16 precision, as ggml's CPU table (kiln_backend.h).
    x = round_f16(x);
    if (x <= -10.0) return 0.0;
    if (x >= 10.0) return x;
    const float c = 0.7978845608028654; // sqrt(2 / pi)
    float y = 0.5 * x * (1.0 + tanh(c * x * (1.0 + 0.044715 * x * x)));
    return round_f16(y);
}

void main() {
    uint i = flat_group() * 256u + gl_LocalInvocationID.x;
    if (i >= dst_count()) return;
    uvec4 at = dst_index(i);
    float x = element_0(at.x, at.y, at.z, at.w);
    float y;
    if (op.kind == OP_ADD || op.kind == OP_MUL) {
        float b = element_1(at.x % op.s1.ne0, at.y % op.s1.ne1, at.z % op.s1.ne2, at.w % op.s1.ne3);
        y = op.kind == OP_ADD ? x + b : x * b;
    } else if (op.kind == OP_SCALE) {
        y = x * param_f32(0u);
    } else if (op.kind == OP_SILU) {
        y = x / (1.0 + exp(-x));
    } else if (op.kind == OP_GELU) {
        y = gelu(x);
    } else {
        y = x;
    }
    store(dst_addr(at.x, at.y, at.z, at.w), y);
}
