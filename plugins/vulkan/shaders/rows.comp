#version 450
// RMS_NORM, NORM and SOFT_MAX: one workgroup per row of ne[0], sums in
// shared memory.
#include "common.glsl"

layout(local_size_x = 256) in;

shared float part[256];

float reduce_sum(float v) {
    uint t = gl_LocalInvocationID.x;
    part[t] = v;
    barrier();
    [[unroll]] for (uint s = 128u; s > 0u; s >>= 1) {
        if (t < s) part[t] += part[t + s];
        barrier();
    }
    float r = part[0];
    barrier();
    return r;
}

float reduce_max(float v) {
    uint t = gl_LocalInvocationID.x;
    part[t] = v;
    barrier();
    [[unroll]] for (uint s = 128u; s > 0u; s >>= 1) {
        if (t < s) part[t] = max(part[t], part[t + s]);
        barrier();
    }
    float r = part[0];
    barrier();
    return r;
}

void main() {
    uint row = flat_group();
    uint rows = op.d.ne1 * op.d.ne2 * op.d.ne3;
    if (row >= rows) return;
    uint i1 = row % op.d.ne1, i2 = (row / op.d.ne1) % op.d.ne2, i3 = row / (op.d.ne1 * op.d.ne2);
    uint n = op.d.ne0, t = gl_LocalInvocationID.x;
    if (op.kind == OP_SOFT_MAX) {
        float scale = param_f32(0u);
        bool masked = op.n_src > 1u;
        float m = -1.0 / 0.0;
        for (uint i = t; i < n; i += 256u) {
            float v = element_0(i, i1, i2, i3) * scale;
            if (masked) v += element_1(i, i1 % op.s1.ne1, i2 % op.s1.ne2, i3 % op.s1.ne3);
            m = max(m, v);
        }
        m = reduce_max(m);
        if (isinf(m) && m < 0.0) {
            // Every position masked: zeros.
            for (uint i = t; i < n; i += 256u) store(dst_addr(i, i1, i2, i3), 0.0);
            return;
        }
        float s = 0.0;
        for (uint i = t; i < n; i += 256u) {
            float v = element_0(i, i1, i2, i3) * scale;
            if (masked) v += element_1(i, i1 % op.s1.ne1, i2 % op.s1.ne2, i3 % op.s1.ne3);
            float e = exp(v - m);
            s += e;
            store(dst_addr(i, i1, i2, i3), e);
        }
        s = reduce_sum(s);
        memoryBarrierBuffer();
        barrier();
        for (uint i = t; i < n; i += 256u) {
            uint a = dst_addr(i, i1, i2, i3);
            store(a, f32_d(a) / s);
        }
        return;
    }
    float eps = param_f32(0u);
    float mean = 0.0;
    if (op.kind == OP_NORM) {
        float s = 0.0;
        for (uint i = t; i < n; i += 256u) s += element_0(i, i1, i2, i3);
        mean = reduce_sum(s) / float(n);
    }
    float sq = 0.0;
    for (uint i = t; i < n; i += 256u) {
        float v = element_0(i, i1, i2, i3) - mean;
        sq += v * v;
    }
    float scale = 1.0 / sqrt(reduce_sum(sq) / float(n) + eps);
    for (uint i = t; i < n; i += 256u) {
        store(dst_addr(i, i1, i2, i3), (element_0(i, i1, i2, i3) - mean) * scale);
    }
}
