/* The same policy in C. Build and try it: see plugins/policies/README.md. */
#include "kiln_policy.h"

KILN_POLICY_METADATA("{\"abi\":\"1.1\",\"kind\":\"rank\",\"name\":\"fresh-first-c\",\"version\":\"0.1.0\"}")
KILN_DEFINE_ALLOC

KILN_EXPORT(kiln_rank) int64_t kiln_rank(int32_t ptr, int32_t len) {
    kiln_rank_input in;
    if (!kiln_rank_input_parse((const uint8_t *)(uintptr_t)ptr, (uint32_t)len, &in)) return 0;
    uint8_t *out = kiln_scores_begin(in.n);
    if (!out) return 0;
    for (uint32_t i = 0; i < in.n; i++) {
        const uint8_t *c = kiln_candidate(&in, i);
        float edited = kiln_cand_edit_recency_s(c);
        float fresh = (edited >= 0.0f && edited < 600.0f) ? 2.0f : 0.0f;
        float here = (kiln_cand_flags(c) & KILN_SAME_FILE) ? 3.0f : 0.0f;
        kiln_scores_set(out, i, kiln_cand_bm25(c) + fresh + here + 3.0f * kiln_cand_symbol_overlap(&in, c));
    }
    return kiln_scores_end(out, in.n);
}
