/*
 * A locality ranker in C: snippets from the file being edited, close to
 * the cursor, rank first; then the definitions of the names used near the
 * cursor (ABI 1.2) and import-related files; BM25 and the host's Jaccard
 * estimate break the rest. Two weights are parameters (ABI 1.4), set by
 * [policies.params.proximity] in kiln's config.toml and searched by
 * `kiln tune --objective quality`: what a definition is worth, and how
 * many lines from the cursor the nearby bonus is halved.
 */
#include "kiln_policy.h"

KILN_POLICY_METADATA("{\"abi\":\"1.4\",\"kind\":\"rank\",\"name\":\"proximity\",\"version\":\"1.2.0\",\"params\":["
                     "{\"name\":\"definition\",\"default\":8,\"min\":0,\"max\":64,\"doc\":\"a definition of a name used near the cursor\"},"
                     "{\"name\":\"reach\",\"default\":20,\"min\":1,\"max\":2000,\"log\":true,\"doc\":\"lines from the cursor after which the nearby bonus is halved\"}]}")
KILN_DEFINE_ALLOC

KILN_EXPORT(kiln_rank) int64_t kiln_rank(int32_t ptr, int32_t len) {
    kiln_rank_input in;
    if (!kiln_rank_input_parse((const uint8_t *)(uintptr_t)ptr, (uint32_t)len, &in)) return 0;
    float definition = (float)kiln_param(&in, 0, 8.0);
    float reach = (float)kiln_param(&in, 1, 20.0);
    uint8_t *out = kiln_scores_begin(in.n);
    if (!out) return 0;
    for (uint32_t i = 0; i < in.n; i++) {
        const uint8_t *c = kiln_candidate(&in, i);
        uint32_t flags = kiln_cand_flags(c);
        float score = 0.5f * kiln_cand_bm25(c) + kiln_cand_jaccard(c);
        /* ABI 1.2: the definitions of the names used near the cursor. */
        score += definition * kiln_cand_definition(&in, c);
        if (flags & KILN_SAME_FILE) {
            int32_t d = kiln_cand_line_distance(c);
            score += 2.0f;
            if (d >= 0) score += 2.0f / (1.0f + (float)d / reach);
        }
        if (flags & KILN_IMPORT_RELATED) score += 0.5f;
        kiln_scores_set(out, i, score);
    }
    return kiln_scores_end(out, in.n);
}
