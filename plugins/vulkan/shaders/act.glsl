// Where quantize.comp leaves src1's rounded activations for mul_mat.comp
// (the scratch binding), by src0's type. Must match `act_words` in
// src/ops.rs.

const uint ACT_FLOAT = 0u;
const uint ACT_Q8_0 = 1u;
const uint ACT_Q8_K = 2u;

uint act_kind(uint wt) {
    if (kblock_bytes(wt) != 0u) return ACT_Q8_K;
    if (block_bytes(wt) != 0u) return ACT_Q8_0;
    return ACT_FLOAT;
}

// Blocks per activation row (of 32 elements for floats, whatever K).
uint act_blocks(uint wt, uint k_len) {
    uint kind = act_kind(wt);
    if (kind == ACT_Q8_K) return k_len / 256u;
    return (k_len + 31u) / 32u;
}

// Word index of block b of activation row r.
uint act_block(uint wt, uint k_len, uint r, uint b) {
    uint kind = act_kind(wt);
    if (kind == ACT_FLOAT) return r * k_len + 32u * b;
    if (kind == ACT_Q8_0) return (r * (k_len / 32u) + b) * 10u;
    return (r * (k_len / 256u) + b) * 81u;
}
