/*
 * kiln_policy.h — write a kiln policy in C (clang --target=wasm32).
 *
 * Policy ABI 1.4; the contract is sandbox/ABI.md. A ranking policy:
 *
 *   #include "kiln_policy.h"
 *   KILN_POLICY_METADATA("{\"abi\":\"1.4\",\"kind\":\"rank\",\"name\":\"mine\",\"version\":\"1.0.0\"}")
 *   KILN_DEFINE_ALLOC
 *   KILN_EXPORT(kiln_rank) int64_t kiln_rank(int32_t ptr, int32_t len) {
 *       kiln_rank_input in;
 *       if (!kiln_rank_input_parse((const uint8_t *)(uintptr_t)ptr, (uint32_t)len, &in)) return 0;
 *       uint8_t *out = kiln_scores_begin(in.n);
 *       for (uint32_t i = 0; i < in.n; i++) kiln_scores_set(out, i, kiln_cand_bm25(kiln_candidate(&in, i)));
 *       return kiln_scores_end(out, in.n);
 *   }
 *
 * Build: clang --target=wasm32 -O2 -nostdlib -fuse-ld=lld -Wl,--no-entry -I include -o mine.wasm mine.c
 * No libc: memory comes from the bump allocator below (the instance lives
 * for one call). Imports: none needed; `kiln.log` is the only one allowed.
 */
#ifndef KILN_POLICY_H
#define KILN_POLICY_H

#include <stddef.h>
#include <stdint.h>

#define KILN_POLICY_ABI_MAJOR 1
#define KILN_POLICY_ABI_MINOR 4

/* Candidate flags. */
#define KILN_SAME_FILE 1u
#define KILN_IMPORT_RELATED 2u
#define KILN_OPEN_IN_EDITOR 4u

#define KILN_EXPORT(name) __attribute__((export_name(#name)))

/* The metadata custom section (JSON, without a trailing NUL). clang puts
 * data in data segments whatever its section attribute says, so the bytes
 * are emitted with the assembler: `#json` is the literal, escapes and all,
 * which `.ascii` reads back to the JSON text. */
#define KILN_POLICY_METADATA(json) \
    __asm__(".section .custom_section.kiln_policy,\"\",@\n.ascii " #json "\n.text\n");

/* A bump allocator over the memory after the data segment. */
extern unsigned char __heap_base;
static uintptr_t kiln_heap_top;

static inline void *kiln_malloc(size_t n) {
    if (!kiln_heap_top) kiln_heap_top = (uintptr_t)&__heap_base;
    uintptr_t p = (kiln_heap_top + 15) & ~(uintptr_t)15;
    uintptr_t end = p + n;
    uintptr_t have = (uintptr_t)__builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        size_t pages = (size_t)((end - have + 65535u) / 65536u);
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return 0;
    }
    kiln_heap_top = end;
    return (void *)p;
}

#define KILN_DEFINE_ALLOC \
    KILN_EXPORT(kiln_alloc) int32_t kiln_alloc(int32_t size) { return (int32_t)(uintptr_t)kiln_malloc((size_t)size); }

static inline uint32_t kiln_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline float kiln_f32(const uint8_t *p) {
    uint32_t u = kiln_u32(p);
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
static inline void kiln_put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void kiln_put_f32(uint8_t *p, float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    kiln_put_u32(p, u);
}

/* A ranking input, read in place. */
typedef struct {
    const uint8_t *base;
    uint32_t n;
    uint32_t candidates;     /* offset of the first candidate record */
    uint32_t candidate_size; /* bytes per record (48 in 1.0, 56 in 1.1, 72 since 1.2) */
    uint32_t strings;        /* offset of the string table */
    uint32_t cursor;         /* offset of the cursor record */
    uint32_t abi_minor;      /* the host's */
    uint32_t params;         /* 1.4: offset of the parameter values (f64 each) */
    uint32_t n_params;       /* 1.4: how many (the declared ones); 0 from an older host */
} kiln_rank_input;

static inline int kiln_rank_input_parse(const uint8_t *p, uint32_t len, kiln_rank_input *in) {
    if (len < 32 || p[0] != 'K' || p[1] != 'R' || p[2] != 'N' || p[3] != 'K') return 0;
    if ((p[4] | p[5] << 8) != KILN_POLICY_ABI_MAJOR) return 0;
    in->base = p;
    in->cursor = kiln_u32(p + 12);
    in->candidates = kiln_u32(p + 16);
    in->candidate_size = kiln_u32(p + 20);
    in->n = kiln_u32(p + 24);
    in->strings = kiln_u32(p + 28);
    in->abi_minor = (uint32_t)(p[6] | p[7] << 8);
    int has_params = kiln_u32(p + 8) >= 40 && len >= 40;
    in->params = has_params ? kiln_u32(p + 32) : 0;
    in->n_params = has_params ? kiln_u32(p + 36) : 0;
    return 1;
}

/* ABI 1.4: the value of the i-th parameter the policy declares in its
 * metadata ("params": the user's from config.toml, else the declared
 * default); `fallback` when the host sent none. */
static inline double kiln_param(const kiln_rank_input *in, uint32_t i, double fallback) {
    if (i >= in->n_params) return fallback;
    const uint8_t *p = in->base + in->params + 8 * i;
    uint64_t u = (uint64_t)kiln_u32(p) | (uint64_t)kiln_u32(p + 4) << 32;
    double d;
    __builtin_memcpy(&d, &u, 8);
    return d;
}

static inline const uint8_t *kiln_candidate(const kiln_rank_input *in, uint32_t i) {
    return in->base + in->candidates + i * in->candidate_size;
}

static inline uint32_t kiln_cand_id(const uint8_t *c) { return kiln_u32(c); }
static inline uint32_t kiln_cand_token_count(const uint8_t *c) { return kiln_u32(c + 4); }
static inline float kiln_cand_bm25(const uint8_t *c) { return kiln_f32(c + 8); }
static inline float kiln_cand_jaccard(const uint8_t *c) { return kiln_f32(c + 12); }
static inline float kiln_cand_edit_recency_s(const uint8_t *c) { return kiln_f32(c + 16); }
static inline float kiln_cand_open_recency_s(const uint8_t *c) { return kiln_f32(c + 20); }
static inline int32_t kiln_cand_line_distance(const uint8_t *c) { return (int32_t)kiln_u32(c + 24); }
static inline uint32_t kiln_cand_flags(const uint8_t *c) { return kiln_u32(c + 28); }
/* ABI 1.1: share of the identifiers near the cursor that the snippet
 * defines; 0 from a 1.0 host (whose records end before it). */
static inline float kiln_cand_symbol_overlap(const kiln_rank_input *in, const uint8_t *c) {
    return in->candidate_size >= 52 ? kiln_f32(c + 48) : 0.0f;
}
/* ABI 1.2: how near the cursor the nearest name the snippet defines is
 * used (1 on the cursor's line, 1/2 sixteen lines away); 0 when it defines
 * none, and from an older host. */
static inline float kiln_cand_definition(const kiln_rank_input *in, const uint8_t *c) {
    return in->candidate_size >= 60 ? kiln_f32(c + 56) : 0.0f;
}
#define KILN_RESOLUTION_LINES 0u
#define KILN_RESOLUTION_SIGNATURE 1u
#define KILN_RESOLUTION_BODY 2u
#define KILN_RESOLUTION_EDIT 3u /* 1.3: lines of another open document edited lately */
/* ABI 1.2: KILN_RESOLUTION_LINES, _SIGNATURE or _BODY. */
static inline uint32_t kiln_cand_resolution(const kiln_rank_input *in, const uint8_t *c) {
    return in->candidate_size >= 64 ? kiln_u32(c + 60) : KILN_RESOLUTION_LINES;
}
/* ABI 1.2: folders between its file's and the cursor's; -1 when unknown. */
static inline int32_t kiln_cand_path_distance(const kiln_rank_input *in, const uint8_t *c) {
    return in->candidate_size >= 68 ? (int32_t)kiln_u32(c + 64) : -1;
}
/* ABI 1.3: 1 when the cursor's file imports the snippet's file, 2 when a
 * file it imports does; 0 neither, unknown, or an older host. */
static inline uint32_t kiln_cand_import_hops(const kiln_rank_input *in, const uint8_t *c) {
    return in->candidate_size >= 72 && in->abi_minor >= 3 ? kiln_u32(c + 68) : 0;
}

/* A string field (path, text): a pointer and a length in bytes. */
static inline const char *kiln_string(const kiln_rank_input *in, const uint8_t *field, uint32_t *len) {
    *len = kiln_u32(field + 4);
    return (const char *)(in->base + in->strings + kiln_u32(field));
}
static inline const char *kiln_cand_path(const kiln_rank_input *in, const uint8_t *c, uint32_t *len) {
    return kiln_string(in, c + 32, len);
}
static inline const char *kiln_cand_text(const kiln_rank_input *in, const uint8_t *c, uint32_t *len) {
    return kiln_string(in, c + 40, len);
}

/* The output: a count and one f32 score per candidate, in input order. */
static inline uint8_t *kiln_scores_begin(uint32_t n) {
    uint8_t *out = (uint8_t *)kiln_malloc(4 + 4 * (size_t)n);
    if (out) kiln_put_u32(out, n);
    return out;
}
static inline void kiln_scores_set(uint8_t *out, uint32_t i, float score) { kiln_put_f32(out + 4 + 4 * i, score); }
static inline int64_t kiln_scores_end(uint8_t *out, uint32_t n) {
    if (!out) return 0;
    return (int64_t)((uint64_t)(uintptr_t)out << 32 | (uint64_t)(4 + 4 * n));
}

#endif /* KILN_POLICY_H */
