// What every kiln Vulkan shader shares: the op record, the three tensor
// bindings, byte-addressed loads, and the weight formats (ggml's blocks).
//
// Tensors are bound as windows of 32-bit words (see src/graph.rs): each
// record gives the byte offset of element 0 inside its window (`base`),
// the type, extents and byte strides, so views (transposes, cache slices)
// need no copies.

#extension GL_EXT_control_flow_attributes : enable

struct Tensor {
    uint base;
    uint dtype;
    uint ne0, ne1, ne2, ne3;
    uint nb0, nb1, nb2, nb3;
};

layout(std430, binding = 0) readonly buffer Record {
    Tensor s0;
    Tensor s1;
    Tensor d;
    uint kind;
    uint n_src;
    int params[8];
    // The rows [lo, hi) of src0 this dispatch holds, when an op's weights
    // are split over several (src/graph.rs); src0's row lo is its row 0.
    uint rows[2];
    // What the host side computes for the shader: ROPE's angle step.
    float aux;
} op;

layout(std430, binding = 1) readonly buffer Src0 { uint src0[]; };
layout(std430, binding = 2) readonly buffer Src1 { uint src1[]; };
layout(std430, binding = 3) buffer Dst { uint dst[]; };
// The device's scratch, kept between graphs: MUL_MAT's rounded activations.
layout(std430, binding = 4) buffer Scratch { uint scratch[]; };

// ABI numbers (kiln_backend.h).
const uint T_F32 = 0u;
const uint T_F16 = 1u;
const uint T_Q4_0 = 2u;
const uint T_Q4_1 = 3u;
const uint T_Q5_0 = 6u;
const uint T_Q5_1 = 7u;
const uint T_Q8_0 = 8u;
const uint T_Q2_K = 10u;
const uint T_Q3_K = 11u;
const uint T_Q4_K = 12u;
const uint T_Q5_K = 13u;
const uint T_Q6_K = 14u;
const uint T_IQ4_NL = 20u;
const uint T_IQ4_XS = 23u;
const uint T_I32 = 26u;
const uint T_BF16 = 30u;

const uint OP_MUL_MAT = 1u;
const uint OP_ADD = 2u;
const uint OP_MUL = 3u;
const uint OP_SCALE = 4u;
const uint OP_RMS_NORM = 5u;
const uint OP_ROPE = 6u;
const uint OP_SOFT_MAX = 7u;
const uint OP_SILU = 8u;
const uint OP_GELU = 9u;
const uint OP_GET_ROWS = 10u;
const uint OP_CPY = 11u;
const uint OP_NORM = 12u;

float param_f32(uint i) { return intBitsToFloat(op.params[i]); }

// The invocation's index in a dispatch of up to 65535 × 65535 groups of
// `size` invocations (src/graph.rs splits large counts over y).
uint flat_group() { return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; }

// Loads from one binding, by byte address inside its window. BUF is the
// word array; the functions get the binding's suffix.
#define LOADS(BUF, S)                                                                        \
    uint byte_##S(uint a) { return (BUF[a >> 2] >> ((a & 3u) * 8u)) & 0xffu; }               \
    uint u16_##S(uint a) {                                                                   \
        return (a & 1u) == 0u ? (BUF[a >> 2] >> ((a & 2u) * 8u)) & 0xffffu                   \
                              : byte_##S(a) | (byte_##S(a + 1u) << 8);                       \
    }                                                                                        \
    uint u32_##S(uint a) {                                                                   \
        return (a & 3u) == 0u ? BUF[a >> 2] : u16_##S(a) | (u16_##S(a + 2u) << 16);          \
    }                                                                                        \
    float f16_##S(uint a) { return unpackHalf2x16(u16_##S(a)).x; }                           \
    float bf16_##S(uint a) { return uintBitsToFloat(u16_##S(a) << 16); }                     \
    float f32_##S(uint a) { return uintBitsToFloat(u32_##S(a)); }                            \
    int i8_##S(uint a) { return (int(byte_##S(a)) << 24) >> 24; }                            \
    /* Element j of the block at byte address b (32 elements a block). */                    \
    float block_##S(uint t, uint b, uint j) {                                                \
        uint lo = j & 15u, high = j >> 4;                                                    \
        if (t == T_Q8_0) return float(i8_##S(b + 2u + j)) * f16_##S(b);                      \
        if (t == T_Q4_0) {                                                                   \
            uint q = (byte_##S(b + 2u + lo) >> (high * 4u)) & 15u;                           \
            return (float(q) - 8.0) * f16_##S(b);                                            \
        }                                                                                    \
        if (t == T_Q4_1) {                                                                   \
            uint q = (byte_##S(b + 4u + lo) >> (high * 4u)) & 15u;                           \
            return float(q) * f16_##S(b) + f16_##S(b + 2u);                                  \
        }                                                                                    \
        if (t == T_Q5_0) {                                                                   \
            uint q = (byte_##S(b + 6u + lo) >> (high * 4u)) & 15u;                           \
            q |= ((u32_##S(b + 2u) >> j) & 1u) << 4;                                         \
            return (float(q) - 16.0) * f16_##S(b);                                           \
        }                                                                                    \
        if (t == T_Q5_1) {                                                                   \
            uint q = (byte_##S(b + 8u + lo) >> (high * 4u)) & 15u;                           \
            q |= ((u32_##S(b + 4u) >> j) & 1u) << 4;                                         \
            return float(q) * f16_##S(b) + f16_##S(b + 2u);                                 \
        }                                                                                    \
        /* IQ4_NL */                                                                         \
        uint q = (byte_##S(b + 2u + lo) >> (high * 4u)) & 15u;                               \
        return float(IQ4_NL_VALUES[q]) * f16_##S(b);                                         \
    }

// K-quants: 256-element blocks.
#define KQUANT_LOADS(S)                                                                      \
    /* Sub-block is (0..7)'s 6-bit scale and minimum, Q4_K/Q5_K packing. */                 \
    uvec2 scale_min_##S(uint sc, uint is) {                                                  \
        if (is < 4u) return uvec2(byte_##S(sc + is) & 63u, byte_##S(sc + is + 4u) & 63u);    \
        uint a = byte_##S(sc + is + 4u), lo = byte_##S(sc + is - 4u), hi = byte_##S(sc + is); \
        return uvec2((a & 15u) | ((lo >> 6) << 4), (a >> 4) | ((hi >> 6) << 4));             \
    }                                                                                        \
    /* Q3_K's sub-block i (0..15) scale, less 32. */                                         \
    int q3_k_scale_##S(uint sc, uint i) {                                                    \
        uint low = i < 8u ? byte_##S(sc + i) & 15u : byte_##S(sc + i - 8u) >> 4;              \
        uint high = (byte_##S(sc + 8u + (i & 3u)) >> (2u * (i >> 2))) & 3u;                  \
        return int(low | (high << 4)) - 32;                                                  \
    }                                                                                        \
    /* IQ4_XS's sub-block ib (0..7) scale, less 32. */                                       \
    int iq4_xs_scale_##S(uint b, uint ib) {                                                  \
        uint low = (byte_##S(b + 4u + (ib >> 1)) >> (4u * (ib & 1u))) & 15u;                 \
        uint high = (u16_##S(b + 2u) >> (2u * ib)) & 3u;                                     \
        return int(low | (high << 4)) - 32;                                                  \
    }                                                                                        \
    /* Element j (0..255) of the 256-element block at byte address b. */                     \
    float kblock_##S(uint t, uint b, uint j) {                                               \
        if (t == T_Q2_K || t == T_Q3_K) {                                                    \
            /* Sub-block j / 16; the code's byte 32n + j % 32, shift 2·((j % 128) / 32). */  \
            uint n = j >> 7, sh = 2u * ((j >> 5) & 3u), r = j & 31u, i = j >> 4;             \
            uint qs = t == T_Q2_K ? b + 16u : b + 32u;                                       \
            int q = int((byte_##S(qs + 32u * n + r) >> sh) & 3u);                            \
            if (t == T_Q2_K) {                                                               \
                uint sc = byte_##S(b + i);                                                   \
                precise float v = f16_##S(b + 80u) * float(sc & 15u) * float(q)              \
                                - f16_##S(b + 82u) * float(sc >> 4);                         \
                return v;                                                                    \
            }                                                                                \
            if (((byte_##S(b + r) >> (4u * n + (sh >> 1))) & 1u) == 0u) q -= 4;              \
            return f16_##S(b + 108u) * float(q3_k_scale_##S(b + 96u, i)) * float(q);         \
        }                                                                                    \
        if (t == T_IQ4_XS) {                                                                 \
            uint ib = j >> 5, r = j & 31u;                                                   \
            uint q = (byte_##S(b + 8u + 16u * ib + (r & 15u)) >> (4u * (r >> 4))) & 15u;     \
            return f16_##S(b) * float(iq4_xs_scale_##S(b, ib)) * float(IQ4_NL_VALUES[q]);    \
        }                                                                                    \
        uint c = j >> 6, l = j & 31u, high = (j >> 5) & 1u;                                  \
        if (t == T_Q6_K) {                                                                   \
            uint n = j >> 7, r = j & 127u, quarter = r >> 5;                                 \
            uint lo = (byte_##S(b + 64u * n + l + 32u * (quarter & 1u)) >> (4u * (quarter >> 1))) & 15u; \
            uint hi = (byte_##S(b + 128u + 32u * n + l) >> (2u * quarter)) & 3u;             \
            float sc = float(i8_##S(b + 192u + 8u * n + (l >> 4) + 2u * quarter));           \
            return f16_##S(b + 208u) * sc * float(int(lo | (hi << 4)) - 32);                 \
        }                                                                                    \
        uvec2 sm = scale_min_##S(b + 4u, 2u * c + high);                                     \
        float d = f16_##S(b), dmin = f16_##S(b + 2u);                                        \
        uint qs = t == T_Q5_K ? b + 48u : b + 16u;                                           \
        uint q = (byte_##S(qs + 32u * c + l) >> (4u * high)) & 15u;                          \
        if (t == T_Q5_K) q |= ((byte_##S(b + 16u + l) >> (2u * c + high)) & 1u) << 4;        \
        return d * float(sm.x) * float(q) - dmin * float(sm.y);                              \
    }

// Bytes of one 256-element block of a K-quant; 0 for the others.
uint kblock_bytes(uint t) {
    if (t == T_Q2_K) return 84u;
    if (t == T_Q3_K) return 110u;
    if (t == T_IQ4_XS) return 136u;
    if (t == T_Q4_K) return 144u;
    if (t == T_Q5_K) return 176u;
    if (t == T_Q6_K) return 210u;
    return 0u;
}

const int IQ4_NL_VALUES[16] = int[16](-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);

// Bytes of one block (32 elements) of a 32-element type; 0 for the others.
uint block_bytes(uint t) {
    if (t == T_Q4_0 || t == T_IQ4_NL) return 18u;
    if (t == T_Q4_1) return 20u;
    if (t == T_Q5_0) return 22u;
    if (t == T_Q5_1) return 24u;
    if (t == T_Q8_0) return 34u;
    return 0u;
}

LOADS(src0, 0)
LOADS(src1, 1)
LOADS(dst, d)
KQUANT_LOADS(0)
KQUANT_LOADS(1)

// Element (i0, i1, i2, i3) of a tensor as f32, whatever its type.
#define ELEMENT(S, T)                                                                        \
    float element_##S(uint i0, uint i1, uint i2, uint i3) {                                  \
        uint row = T.base + i1 * T.nb1 + i2 * T.nb2 + i3 * T.nb3;                            \
        uint bb = block_bytes(T.dtype);                                                      \
        if (bb != 0u) return block_##S(T.dtype, row + (i0 >> 5) * bb, i0 & 31u);             \
        uint kb = kblock_bytes(T.dtype);                                                     \
        if (kb != 0u) return kblock_##S(T.dtype, row + (i0 >> 8) * kb, i0 & 255u);           \
        uint a = row + i0 * T.nb0;                                                           \
        if (T.dtype == T_F16) return f16_##S(a);                                             \
        if (T.dtype == T_BF16) return bf16_##S(a);                                           \
        return f32_##S(a);                                                                   \
    }

ELEMENT(0, op.s0)
ELEMENT(1, op.s1)

// v as F16 bits, and v rounded to F16.
uint f16_bits(float v) { return packHalf2x16(vec2(v, 0.0)) & 0xffffu; }
float round_f16(float v) { return unpackHalf2x16(f16_bits(v)).x; }

// v as BF16 bits, rounded to nearest even (NaN stays NaN).
uint bf16_bits(float v) {
    uint u = floatBitsToUint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 64u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Stores v as the destination's type at byte address a. Half-words share
// their word with a neighbour another invocation may write: atomics.
void store(uint a, float v) {
    uint t = op.d.dtype;
    if (t == T_F32) {
        dst[a >> 2] = floatBitsToUint(v);
        return;
    }
    uint bits = t == T_F16 ? f16_bits(v) : bf16_bits(v);
    uint shift = (a & 2u) * 8u;
    atomicAnd(dst[a >> 2], ~(0xffffu << shift));
    atomicOr(dst[a >> 2], bits << shift);
}

uint dst_addr(uint i0, uint i1, uint i2, uint i3) {
    return op.d.base + i0 * op.d.nb0 + i1 * op.d.nb1 + i2 * op.d.nb2 + i3 * op.d.nb3;
}

// Destination element `i` in dimension order.
uvec4 dst_index(uint i) {
    uint i0 = i % op.d.ne0;
    i /= op.d.ne0;
    uint i1 = i % op.d.ne1;
    i /= op.d.ne1;
    uint i2 = i % op.d.ne2;
    return uvec4(i0, i1, i2, i / op.d.ne2);
}

uint dst_count() { return op.d.ne0 * op.d.ne1 * op.d.ne2 * op.d.ne3; }
