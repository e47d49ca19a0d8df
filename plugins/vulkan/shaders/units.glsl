// The quantized weight formats as the matmul kernels read them (mul_mat.glsl
// for decode, mul_mm.glsl for prompts): in units of 8 codes.
//
// A unit is 8 of a block's codes as two ivec4, c0 and c1, and the words
// of the block's rounded activations they meet, a0 and a1 (word j holds
// elements 4j..4j+3, Q8_0's layout). A 32-element block has 4 units and
// one scale d (and a minimum mn for Q4_1/Q5_1): its part of a dot product
// is d·dx·Σ c·x + mn·sx (dx and sx: the activations' scale and rounded
// sum). A K-quant block of 256 has 32 units and, per 16 elements i, a
// weight scale w_i and a coefficient m_i of the activations' integer sum
// b_i over them: its part is dx·Σ_i (w_i·Σ c·x + m_i·b_i). Both w_i and
// m_i are products of an f16 and a small integer, exact in f32, and every
// Σ c·x is an exact integer dot product.

// The kernels' sums: double in the _f64 variants, float in the others.
#ifdef ACC_F64
#define ACC double
#else
#define ACC float
#endif

ivec4 i8x4(uint w) { return ivec4(int(w << 24) >> 24, int(w << 16) >> 24, int(w << 8) >> 24, int(w) >> 24); }
uint pack_i8x4(ivec4 c) { return uint(c.x & 255) | (uint(c.y & 255) << 8) | (uint(c.z & 255) << 16) | (uint(c.w) << 24); }
ivec4 lo4(uint w) { return ivec4(w & 15u, (w >> 8) & 15u, (w >> 16) & 15u, (w >> 24) & 15u); }
ivec4 hi4(uint w) { return ivec4((w >> 4) & 15u, (w >> 12) & 15u, (w >> 20) & 15u, w >> 28); }
// Bit `shift` of each byte of w, as bit 4.
ivec4 bit4(uint w, uint shift) {
    return ivec4(((w >> shift) & 1u) << 4, ((w >> (8u + shift)) & 1u) << 4,
                 ((w >> (16u + shift)) & 1u) << 4, ((w >> (24u + shift)) & 1u) << 4);
}
// Bits 0..3 of w, each as bit 4 of one lane.
ivec4 low4_as_bit4(uint w) { return ivec4((w & 1u) << 4, ((w >> 1) & 1u) << 4, ((w >> 2) & 1u) << 4, ((w >> 3) & 1u) << 4); }
int idot(ivec4 a, ivec4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
ivec4 iq4nl(ivec4 q) { return ivec4(IQ4_NL_VALUES[q.x], IQ4_NL_VALUES[q.y], IQ4_NL_VALUES[q.z], IQ4_NL_VALUES[q.w]); }

// Unit q (0..3) of the 32-element block at byte wb.
void unit_32(uint wt, uint wb, uint q, out ivec4 c0, out ivec4 c1, out uint a0, out uint a1) {
    // Elements 4q..4q+3 and 16+4q..16+4q+3, or 8q..8q+7 (Q8_0).
    a0 = q;
    a1 = 4u + q;
    if (wt == T_Q8_0) {
        c0 = i8x4(u32_0(wb + 2u + 8u * q));
        c1 = i8x4(u32_0(wb + 6u + 8u * q));
        a0 = 2u * q;
        a1 = 2u * q + 1u;
    } else if (wt == T_Q4_0 || wt == T_IQ4_NL) {
        uint w = u32_0(wb + 2u + 4u * q);
        if (wt == T_Q4_0) {
            c0 = lo4(w) - 8;
            c1 = hi4(w) - 8;
        } else {
            c0 = iq4nl(lo4(w));
            c1 = iq4nl(hi4(w));
        }
    } else if (wt == T_Q4_1) {
        uint w = u32_0(wb + 4u + 4u * q);
        c0 = lo4(w);
        c1 = hi4(w);
    } else {
        // Q5_0, Q5_1: the fifth bits of the block in one word.
        uint off = wt == T_Q5_0 ? 2u : 4u;
        uint qh = u32_0(wb + off) >> (4u * q);
        uint w = u32_0(wb + off + 4u + 4u * q);
        c0 = lo4(w) | low4_as_bit4(qh);
        c1 = hi4(w) | low4_as_bit4(qh >> 16);
        if (wt == T_Q5_0) {
            c0 -= 16;
            c1 -= 16;
        }
    }
}

// The 32-element block's scale d and minimum mn (0 where it has none).
vec2 scale_32(uint wt, uint wb) {
    bool with_min = wt == T_Q4_1 || wt == T_Q5_1;
    return vec2(f16_0(wb), with_min ? f16_0(wb + 2u) : 0.0);
}

// Unit v (0..31) of the K-quant block at byte wb.
void unit_k(uint wt, uint wb, uint v, out ivec4 c0, out ivec4 c1, out uint a0, out uint a1) {
    if (wt == T_Q2_K || wt == T_Q3_K) {
        // Elements 8v..8v+7: their codes in bytes 32n + l0.. at shift 2j.
        uint n = v >> 4, sh = 2u * ((v >> 2) & 3u), l0 = (v & 3u) * 8u;
        uint qs = wb + (wt == T_Q2_K ? 16u : 32u) + 32u * n + l0;
        c0 = lo4(u32_0(qs) >> sh) & 3;
        c1 = lo4(u32_0(qs + 4u) >> sh) & 3;
        if (wt == T_Q3_K) {
            uint hb = 4u * n + (sh >> 1);
            c0 += ((lo4(u32_0(wb + l0) >> hb) & 1) << 2) - 4;
            c1 += ((lo4(u32_0(wb + l0 + 4u) >> hb) & 1) << 2) - 4;
        }
        a0 = 2u * v;
        a1 = 2u * v + 1u;
    } else if (wt == T_IQ4_XS) {
        // Sub-block ib of 32, bytes 4q..4q+3 of its codes.
        uint ib = v >> 2, q = v & 3u;
        uint w = u32_0(wb + 8u + 16u * ib + 4u * q);
        c0 = iq4nl(lo4(w));
        c1 = iq4nl(hi4(w));
        a0 = 8u * ib + q;
        a1 = 8u * ib + 4u + q;
    } else if (wt == T_Q6_K) {
        // Elements 128h + 32p + l0 .. +7.
        uint h = v >> 4, p = (v >> 2) & 3u, l0 = (v & 3u) * 8u;
        uint ql = wb + 64u * h + 32u * (p & 1u) + l0, qh = wb + 128u + 32u * h + l0;
        uint sl = 4u * (p >> 1), sh = 2u * p;
        c0 = ivec4((uvec4(lo4(u32_0(ql) >> sl)) & 15u) | ((uvec4(lo4(u32_0(qh) >> sh)) & 3u) << 4)) - 32;
        c1 = ivec4((uvec4(lo4(u32_0(ql + 4u) >> sl)) & 15u) | ((uvec4(lo4(u32_0(qh + 4u) >> sh)) & 3u) << 4)) - 32;
        a0 = (128u * h + 32u * p + l0) >> 2;
        a1 = a0 + 1u;
    } else {
        // Q4_K, Q5_K: chunk c of 64 elements, bytes 4w..4w+3 of its codes:
        // elements 64c + 4w.. (low nibbles) and 64c + 32 + 4w.. (high).
        uint c = v >> 3, w = v & 7u;
        uint codes = u32_0(wb + (wt == T_Q5_K ? 48u : 16u) + 32u * c + 4u * w);
        c0 = lo4(codes);
        c1 = hi4(codes);
        if (wt == T_Q5_K) {
            uint qh = u32_0(wb + 16u + 4u * w);
            c0 |= bit4(qh, 2u * c);
            c1 |= bit4(qh, 2u * c + 1u);
        }
        a0 = 16u * c + w;
        a1 = a0 + 8u;
    }
}

// Sixteen elements i (0..15) of the K-quant block at byte wb: the weight
// scale w_i and the coefficient m_i of the activations' sum over them.
vec2 scale_k(uint wt, uint wb, uint i) {
    if (wt == T_Q2_K) {
        uint sc = byte_0(wb + i);
        return vec2(f16_0(wb + 80u) * float(sc & 15u), -f16_0(wb + 82u) * float(sc >> 4));
    }
    if (wt == T_Q3_K) return vec2(f16_0(wb + 108u) * float(q3_k_scale_0(wb + 96u, i)), 0.0);
    if (wt == T_IQ4_XS) return vec2(f16_0(wb) * float(iq4_xs_scale_0(wb, i >> 1)), 0.0);
    if (wt == T_Q6_K) return vec2(f16_0(wb + 208u) * float(i8_0(wb + 192u + i)), 0.0);
    // Q4_K, Q5_K: a scale and a minimum per 32 elements.
    uvec2 sm = scale_min_0(wb + 4u, i >> 1);
    return vec2(f16_0(wb) * float(sm.x), -f16_0(wb + 2u) * float(sm.y));
}
