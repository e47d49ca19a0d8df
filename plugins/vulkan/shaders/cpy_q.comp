#version 450
// CPY from F32, F16 or BF16 into a 32-element quantized type (Q4_0, Q4_1,
// Q5_0, Q5_1, Q8_0), as kiln's CPU reference (llama.cpp's reference
// quantizers) writes it: one invocation per destination block. A block's bytes share their first and
// last words with its neighbours', which other invocations write: those
// words are written with atomics, the rest plainly.
#include "common.glsl"

layout(local_size_x = 64) in;

// Rust's `f32::round` (half away from zero): exact, unlike round().
float round_away(float x) {
    float t = trunc(x);
    return abs(x - t) >= 0.5 ? t + sign(x) : t;
}

// Rust's `as i8` on a float: truncation, saturated.
int to_i8(float x) { return int(clamp(trunc(x), -128.0, 127.0)); }

uint bytes[34];

void put16(uint at, uint v) {
    bytes[at] = v & 0xffu;
    bytes[at + 1u] = (v >> 8) & 0xffu;
}

void main() {
    uint t = op.d.dtype;
    uint bb = block_bytes(t);
    uint per_row = op.d.ne0 / 32u;
    uint i = flat_group() * 64u + gl_LocalInvocationID.x;
    if (i >= per_row * op.d.ne1 * op.d.ne2 * op.d.ne3) return;
    uint blk = i % per_row;
    i /= per_row;
    uint i1 = i % op.d.ne1, i2 = (i / op.d.ne1) % op.d.ne2, i3 = i / (op.d.ne1 * op.d.ne2);

    // The source is dense (F32, F16, BF16): element j of the block.
    uint src = op.s0.base + 32u * blk * op.s0.nb0 + i1 * op.s0.nb1 + i2 * op.s0.nb2 + i3 * op.s0.nb3;
    float x[32];
    for (uint j = 0u; j < 32u; j++) {
        uint at = src + j * op.s0.nb0;
        x[j] = op.s0.dtype == T_F16 ? f16_0(at) : op.s0.dtype == T_BF16 ? bf16_0(at) : f32_0(at);
    }

    // The header, and each element's code: the bytes, 8 bits each (Q8_0),
    // or nibbles with the fifth bits in a word after the header (qs is
    // where the nibbles start).
    uint q[32];
    uint qs;
    bool five = t == T_Q5_0 || t == T_Q5_1;
    if (t == T_Q8_0) {
        float amax = 0.0;
        for (uint j = 0u; j < 32u; j++) amax = max(amax, abs(x[j]));
        precise float d = amax / 127.0;
        precise float id = d != 0.0 ? 1.0 / d : 0.0;
        put16(0u, f16_bits(d));
        for (uint j = 0u; j < 32u; j++) {
            precise float v = x[j] * id;
            bytes[2u + j] = uint(int(round_away(v))) & 0xffu;
        }
        qs = 0u;
    } else if (t == T_Q4_0 || t == T_Q5_0) {
        // The signed value of largest magnitude, the first on ties.
        float amax = 0.0, mx = 0.0;
        for (uint j = 0u; j < 32u; j++) {
            if (amax < abs(x[j])) {
                amax = abs(x[j]);
                mx = x[j];
            }
        }
        precise float d = mx / (five ? -16.0 : -8.0);
        precise float id = d != 0.0 ? 1.0 / d : 0.0;
        put16(0u, f16_bits(d));
        for (uint j = 0u; j < 32u; j++) {
            precise float v = x[j] * id;
            precise float y = v + (five ? 16.5 : 8.5);
            q[j] = uint(min(to_i8(y), five ? 31 : 15)) & 0xffu;
        }
        qs = five ? 6u : 2u;
    } else {
        // Q4_1, Q5_1.
        float lo = 3.402823466e38, hi = -3.402823466e38;
        for (uint j = 0u; j < 32u; j++) {
            lo = min(lo, x[j]);
            hi = max(hi, x[j]);
        }
        precise float d = (hi - lo) / (five ? 31.0 : 15.0);
        precise float id = d != 0.0 ? 1.0 / d : 0.0;
        put16(0u, f16_bits(d));
        put16(2u, f16_bits(lo));
        for (uint j = 0u; j < 32u; j++) {
            precise float y = (x[j] - lo) * id + 0.5;
            // `as u8` (truncation, saturated) for Q5_1; `as i8`, then at
            // most 15, for Q4_1.
            q[j] = five ? uint(clamp(trunc(y), 0.0, 255.0)) : uint(min(to_i8(y), 15)) & 0xffu;
        }
        qs = five ? 8u : 4u;
    }
    if (t != T_Q8_0) {
        // Element j's low nibble in byte j (j < 16) or its high nibble in
        // byte j - 16; its fifth bit is bit j of the word before qs.
        uint qh = 0u;
        for (uint j = 0u; j < 16u; j++) {
            bytes[qs + j] = (q[j] & 15u) | ((q[j + 16u] & 15u) << 4);
            qh |= ((q[j] >> 4) & 1u) << j;
            qh |= ((q[j + 16u] >> 4) & 1u) << (j + 16u);
        }
        if (five) {
            put16(qs - 4u, qh);
            put16(qs - 2u, qh >> 16);
        }
    }

    uint a = op.d.base + blk * op.d.nb0 + i1 * op.d.nb1 + i2 * op.d.nb2 + i3 * op.d.nb3;
    uint first = a >> 2, last = (a + bb - 1u) >> 2;
    for (uint w = first; w <= last; w++) {
        uint value = 0u, mask = 0u;
        [[unroll]] for (uint k = 0u; k < 4u; k++) {
            uint at = 4u * w + k;
            if (at >= a && at < a + bb) {
                value |= bytes[at - a] << (8u * k);
                mask |= 0xffu << (8u * k);
            }
        }
        if (mask == 0xffffffffu) {
            dst[w] = value;
        } else {
            atomicAnd(dst[w], ~mask);
            atomicOr(dst[w], value);
        }
    }
}
