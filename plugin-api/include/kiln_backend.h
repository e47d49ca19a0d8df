/*
 * kiln_backend.h — the kiln backend ABI, version 1.2.
 *
 * A backend is a shared library that exports one function,
 * `kiln_backend_init`, and ships with a `kiln-plugin.toml` manifest. The
 * host checks the manifest (ABI major, CPU features, sha256) before it opens
 * the library, then calls `kiln_backend_init` once and talks to the plugin
 * only through the returned function table.
 *
 * Versioning
 *   - Different major: refused. Same major: compatible both ways.
 *   - A minor version only appends fields to the growable structs
 *     (KilnHostApi, KilnDeviceInfo, KilnBackendApi), each of which begins
 *     with `struct_size`. Read a field only when `struct_size` covers it.
 *   - KilnError, KilnTensor, KilnOp and KilnGraph are frozen for 1.x.
 *   - To build against an older minor, define KILN_ABI_TARGET_MINOR before
 *     including this header; the structs then lose the later fields and the
 *     fingerprint is that minor's.
 *   - KILN_LAYOUT_FINGERPRINT hashes the size and field offsets of every
 *     struct as *this copy of the header* lays them out. Put it in your table:
 *     a plugin built against an edited header is refused.
 *
 * Errors
 *   Every function returns KILN_STATUS_OK (0) or an error status, and on
 *   error fills the caller's KilnError (code, op index or -1, message).
 *
 * Threading contract
 *   - kiln_backend_init runs once per process, before any other call.
 *   - device_count, device_info, device_memory and supports_op may be called
 *     concurrently from any thread.
 *   - buffer_* calls may run concurrently on different buffers. The host
 *     never frees a buffer while another call uses it.
 *   - graph_compute and synchronize are serialised per device by the host
 *     (one submission stream per device); different devices may run at once.
 *     buffer_read/write/copy on a device are ordered after work already
 *     submitted to it and complete before they return.
 *   - The host services (log, report_error) are thread-safe and may be
 *     called from plugin-owned threads.
 *   - The library is never unloaded; it may keep threads alive.
 *
 * Ownership
 *   Buffers belong to the plugin and are freed by buffer_free. Graphs, ops,
 *   tensors and error structs belong to the host and live for the call.
 *   A buffer from buffer_wrap_host does not own the host memory it wraps.
 */
#ifndef KILN_BACKEND_H
#define KILN_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KILN_ABI_VERSION_MAJOR 1
#define KILN_ABI_VERSION_MINOR 3

#ifndef KILN_ABI_TARGET_MINOR
#define KILN_ABI_TARGET_MINOR KILN_ABI_VERSION_MINOR
#endif

#define KILN_BACKEND_ENTRY_SYMBOL "kiln_backend_init"

#define KILN_ERROR_MESSAGE_CAPACITY 512
#define KILN_DEVICE_NAME_CAPACITY 128
#define KILN_MAX_DIMS 4
#define KILN_MAX_SRC 4
#define KILN_OP_PARAM_COUNT 8

/* Status codes. */
#define KILN_STATUS_OK 0
#define KILN_STATUS_UNSUPPORTED 1
#define KILN_STATUS_INVALID_ARGUMENT 2
#define KILN_STATUS_OUT_OF_MEMORY 3
#define KILN_STATUS_DEVICE_ERROR 4
#define KILN_STATUS_ABI_MISMATCH 5
#define KILN_STATUS_PANIC 6
#define KILN_STATUS_INTERNAL 7

/* Log levels. */
#define KILN_LOG_ERROR 0
#define KILN_LOG_WARN 1
#define KILN_LOG_INFO 2
#define KILN_LOG_DEBUG 3

/* Device kinds. */
#define KILN_DEVICE_CPU 0
#define KILN_DEVICE_GPU 1
#define KILN_DEVICE_INTEGRATED_GPU 2
#define KILN_DEVICE_ACCELERATOR 3

/* Device capabilities. */
#define KILN_CAP_HOST_MEMORY (1ull << 0)    /* buffer_wrap_host works */
#define KILN_CAP_UNIFIED_MEMORY (1ull << 1) /* device memory is host memory */
#define KILN_CAP_ASYNC_COMPUTE (1ull << 2)  /* graph_compute may return early */

/* Data types (ggml's numbering, so GGUF tensor types map one to one).
 * Block layouts are ggml's: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL blocks hold 32
 * elements (18/20/22/24/34/18 bytes), Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS
 * blocks 256 (84/110/144/176/210/136 bytes). The list grows within 1.x
 * (Q4_1, Q5_1, Q2_K, Q3_K, IQ4_NL and IQ4_XS came after 1.2 was first
 * published): a backend answers supports_op with 0 for a type it does not
 * know, and the host never hands it one it did not accept. */
#define KILN_DTYPE_F32 0
#define KILN_DTYPE_F16 1
#define KILN_DTYPE_Q4_0 2
#define KILN_DTYPE_Q4_1 3
#define KILN_DTYPE_Q5_0 6
#define KILN_DTYPE_Q5_1 7
#define KILN_DTYPE_Q8_0 8
#define KILN_DTYPE_Q2_K 10
#define KILN_DTYPE_Q3_K 11
#define KILN_DTYPE_Q4_K 12
#define KILN_DTYPE_Q5_K 13
#define KILN_DTYPE_Q6_K 14
#define KILN_DTYPE_IQ4_NL 20
#define KILN_DTYPE_IQ4_XS 23
#define KILN_DTYPE_I32 26
#define KILN_DTYPE_BF16 30
/* kiln's own layouts, from 256 (the low byte names the ggml type they
 * rearrange). Q5_0_X16: a row of Q5_0 blocks where each whole group of 16
 * blocks (352 bytes) is stored as 16 f16 scales (32 bytes), 8 fifth-bit
 * masks (u64 j: bit 4i+b = bit 16(j%2)+4(j/2)+b of block i's qh), then 4
 * code vectors of 64 bytes (vector k, bytes 4i..4i+3 = block i's
 * qs[4k..4k+3]); the row's last (blocks % 16) blocks stay plain Q5_0.
 * Q4_0_X16: Q4_0 the same way without the masks (a group of 288 bytes is
 * the 16 scales, then the 4 code vectors from byte 32). Rows are packed
 * whole: views keep ne[0]. The host hands these types only to a backend
 * that asks for them (today the built-in CPU backend). */
#define KILN_DTYPE_Q4_0_X16 258
#define KILN_DTYPE_Q5_0_X16 262

/*
 * Operations. Shapes are in ggml order: ne[0] is the innermost dimension.
 * "f32 param" means the float's bit pattern stored in an int32 params word.
 *
 * MUL_MAT   src0 weights [K, N, B2, B3] (any dtype; rows contiguous),
 *           src1 f32 [K, M, C2, C3] with C2 % B2 == 0 and C3 % B3 == 0,
 *           dst f32 [N, M, C2, C3]: dst[n,m] = sum_k src0[k,n] * src1[k,m].
 *           M == 1 is a matrix-vector product.
 * ADD, MUL  dst = src0 (+|*) src1, all f32; src1 broadcasts: each of its
 *           extents divides src0's.
 * SCALE     dst = src0 * params[0] (f32 param).
 * RMS_NORM  per row of ne[0]: dst = x / sqrt(mean(x^2) + eps), eps = params[0] (f32);
 *           the reference rounds as ggml: squares in f32 summed in f64,
 *           mean, scale and x * scale in f32.
 * NORM      per row of ne[0]: dst = (x - mean(x)) / sqrt(var(x) + eps), eps =
 *           params[0] (f32): a LayerNorm without its weight and bias (they
 *           follow as MUL and ADD). The reference rounds as ggml's scalar
 *           path: the sum in f64, the mean in f32, x - mean in f32, its
 *           squares in f32 summed in f64, the variance, scale and product
 *           in f32.
 * ROPE      src0 f32 [head_dim, n_head, n_tokens, 1], src1 i32 positions [n_tokens].
 *           params[0] = n_rot (dimensions rotated, even, <= head_dim),
 *           params[1] = mode (KILN_ROPE_NORMAL: pairs (2i, 2i+1);
 *           KILN_ROPE_NEOX: pairs (i, i + n_rot/2)), params[2] = freq_base (f32),
 *           params[3] = freq_scale (f32). theta_i = pos * freq_scale * base^(-2i/n_rot).
 *           Dimensions past n_rot are copied.
 *           Optional src2 f32 [n_rot/2]: per-pair frequency factors
 *           (Llama 3's rope_freqs): theta_i is divided by factor i first.
 *           With KILN_ROPE_EXT in the mode (YaRN): params[4] = ext_factor,
 *           params[5] = mscale, params[6], params[7] = the correction
 *           dimensions lo, hi (all f32). With e = pos * base^(-2i/n_rot) /
 *           factor_i: ramp = (1 - clamp((i - lo) / max(0.001, hi - lo), 0, 1))
 *           * ext_factor, theta = freq_scale * e * (1 - ramp) + e * ramp,
 *           and sin and cos are multiplied by mscale * (1 + 0.1 ln(1 /
 *           freq_scale)) when ext_factor != 0, else by mscale (ggml's
 *           rope_yarn). Both came after 1.2 was first published: a backend
 *           that does not know them refuses the op (three sources, or a
 *           mode it does not know).
 * SOFT_MAX  per row: dst = softmax(src0 * scale + mask), scale = params[0] (f32);
 *           optional src1 f32 mask with ne0 equal to src0's, broadcast like ADD.
 *           A row that is all -inf gives zeros.
 * SILU      dst = x / (1 + exp(-x)).
 * GELU      dst = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), at f16
 *           precision as ggml's CPU table: x rounded to f16 and the result
 *           to f16; 0 for x <= -10, x for x >= 10.
 * GET_ROWS  src0 [ne0, rows] (any dtype), src1 i32 indices [n], dst f32 [ne0, n].
 * CPY       dst = convert(src0); same shape; any source type; destinations
 *           F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K,
 *           Q5_K, Q6_K (whole blocks per row).
 * ATTENTION fused scaled dot-product attention, one op per layer:
 *           src0 Q f32 [head_dim, n_q, n_head, 1], src1 K and src2 V
 *           [head_dim, n_kv, n_head_kv, 1] (F32, F16, Q8_0 or Q4_0; rows
 *           contiguous; n_head a multiple of n_head_kv, head h reads KV
 *           head h / (n_head / n_head_kv)), optional src3 f32 mask
 *           [n_kv, n_q] (0 or -inf, shared by every head), dst f32
 *           [head_dim, n_q, n_head, 1] (any strides: a view into the
 *           merged heads). params[0] = scale (f32). Per head and query:
 *           dst = softmax(scale * K q + mask) V, a row whose mask is all
 *           -inf gives zeros. A backend may compute it tile by tile with
 *           an online softmax (no n_q x n_kv matrix): the reference sums
 *           in f64, kernels in f32.
 *
 * The reference (kiln's CPU backend) computes as llama.cpp's CPU backend
 * does: MUL_MAT rounds src1 to the weights' dot-product type first (F16
 * for F16, BF16 for BF16, 8-bit blocks for the quantized types; Q4_1 and
 * Q5_1 add each block's minimum times the activation block's Q8_1 sum,
 * f16(amax / 127 * sum of codes)).
 */
#define KILN_OP_MUL_MAT 1
#define KILN_OP_ADD 2
#define KILN_OP_MUL 3
#define KILN_OP_SCALE 4
#define KILN_OP_RMS_NORM 5
#define KILN_OP_ROPE 6
#define KILN_OP_SOFT_MAX 7
#define KILN_OP_SILU 8
#define KILN_OP_GELU 9
#define KILN_OP_GET_ROWS 10
#define KILN_OP_CPY 11
/* Op kinds grow within 1.x (NORM came after 1.2 was first published): a
 * backend answers supports_op with 0 for a kind it does not know. */
#define KILN_OP_NORM 12
/* ATTENTION came after 1.2 was first published, as NORM did. */
#define KILN_OP_ATTENTION 13

#define KILN_ROPE_NORMAL 0
#define KILN_ROPE_NEOX 2
/* Or'ed into ROPE's mode: params[4..8] are set (YaRN). */
#define KILN_ROPE_EXT 0x100

typedef void *KilnBuffer;

/* Frozen for 1.x. */
typedef struct KilnError {
    int32_t code;
    int32_t op_index;
    char message[KILN_ERROR_MESSAGE_CAPACITY];
} KilnError;

typedef void (*KilnLogFn)(void *host_ctx, int32_t level, const char *message, size_t len);
typedef void (*KilnReportErrorFn)(void *host_ctx, int32_t code, const char *message, size_t len);

/* Growable. */
typedef struct KilnHostApi {
    uint32_t struct_size;
    uint16_t abi_major;
    uint16_t abi_minor;
    uint64_t layout_fingerprint;
    void *host_ctx;
    KilnLogFn log;
    KilnReportErrorFn report_error;
} KilnHostApi;

/* Growable. The host zeroes it and sets struct_size; write at most that. */
typedef struct KilnDeviceInfo {
    uint32_t struct_size;
    uint32_t kind;
    char name[KILN_DEVICE_NAME_CAPACITY];
    uint64_t total_memory;
    uint64_t free_memory;
    uint64_t capabilities;
    uint64_t max_buffer_size;
    uint32_t buffer_alignment;
    uint32_t reserved0;
#if KILN_ABI_TARGET_MINOR >= 1
    uint8_t uuid[16];
#endif
} KilnDeviceInfo;

/* Frozen for 1.x. */
typedef struct KilnTensor {
    KilnBuffer buffer; /* NULL in supports_op queries */
    uint64_t offset;
    uint32_t dtype;
    uint32_t n_dims;
    int64_t ne[KILN_MAX_DIMS];
    uint64_t nb[KILN_MAX_DIMS]; /* byte strides; nb[0] = block bytes */
} KilnTensor;

/* Frozen for 1.x. */
typedef struct KilnOp {
    uint32_t kind;
    uint32_t n_src;
    uint32_t src[KILN_MAX_SRC];
    uint32_t dst;
    uint32_t flags; /* zero in 1.x */
    int32_t params[KILN_OP_PARAM_COUNT];
} KilnOp;

/* Frozen for 1.x. `threads` (1.3; `reserved0` before, always 0): CPU
 * threads the backend may use for this graph, the caller's included; 0:
 * the backend's choice. A host sends non-zero only to a backend that
 * declared 1.3 or later. */
typedef struct KilnGraph {
    uint32_t struct_size;
    uint32_t n_tensors;
    const KilnTensor *tensors;
    uint32_t n_ops;
    union {
        uint32_t reserved0;
        uint32_t threads;
    };
    const KilnOp *ops;
} KilnGraph;

typedef int32_t (*KilnDeviceCountFn)(void *ctx, uint32_t *out_count, KilnError *err);
typedef int32_t (*KilnDeviceInfoFn)(void *ctx, uint32_t device, KilnDeviceInfo *out_info, KilnError *err);
typedef int32_t (*KilnBufferAllocFn)(void *ctx, uint32_t device, uint64_t size, KilnBuffer *out_buffer,
                                     KilnError *err);
typedef int32_t (*KilnBufferWrapHostFn)(void *ctx, uint32_t device, void *host_ptr, uint64_t size,
                                        KilnBuffer *out_buffer, KilnError *err);
typedef int32_t (*KilnBufferFreeFn)(void *ctx, KilnBuffer buffer, KilnError *err);
typedef int32_t (*KilnBufferWriteFn)(void *ctx, KilnBuffer buffer, uint64_t offset, const void *data,
                                     uint64_t size, KilnError *err);
typedef int32_t (*KilnBufferReadFn)(void *ctx, KilnBuffer buffer, uint64_t offset, void *data,
                                    uint64_t size, KilnError *err);
typedef int32_t (*KilnBufferCopyFn)(void *ctx, KilnBuffer src, uint64_t src_offset, KilnBuffer dst,
                                    uint64_t dst_offset, uint64_t size, KilnError *err);
typedef int32_t (*KilnSupportsOpFn)(void *ctx, uint32_t device, const KilnOp *op, const KilnTensor *tensors,
                                    uint32_t n_tensors, uint32_t *out_supported, KilnError *err);
typedef int32_t (*KilnGraphComputeFn)(void *ctx, uint32_t device, const KilnGraph *graph, KilnError *err);
typedef int32_t (*KilnSynchronizeFn)(void *ctx, uint32_t device, KilnError *err);
typedef int32_t (*KilnDeviceMemoryFn)(void *ctx, uint32_t device, uint64_t *out_free, uint64_t *out_total,
                                      KilnError *err);
/* 1.2: the layout `device` wants matrix weights of `dtype` in: a kiln layout
 * (KILN_DTYPE_Q5_0_X16, …) the host repacks them into at load time and
 * hands only to this backend, or `dtype` itself. */
typedef int32_t (*KilnWeightLayoutFn)(void *ctx, uint32_t device, uint32_t dtype, uint32_t *out_dtype,
                                      KilnError *err);

/* Growable. Must stay valid and unchanged for the life of the process. */
typedef struct KilnBackendApi {
    uint32_t struct_size; /* sizeof(KilnBackendApi) */
    uint16_t abi_major;   /* KILN_ABI_VERSION_MAJOR */
    uint16_t abi_minor;   /* KILN_ABI_TARGET_MINOR */
    uint64_t layout_fingerprint; /* KILN_LAYOUT_FINGERPRINT */
    uint32_t device_info_size;   /* sizeof(KilnDeviceInfo) */
    uint32_t reserved0;
    const char *name;    /* static, NUL-terminated */
    const char *version; /* static, NUL-terminated semver */
    KilnDeviceCountFn device_count;
    KilnDeviceInfoFn device_info;
    KilnBufferAllocFn buffer_alloc;
    KilnBufferWrapHostFn buffer_wrap_host; /* optional (NULL) */
    KilnBufferFreeFn buffer_free;
    KilnBufferWriteFn buffer_write;
    KilnBufferReadFn buffer_read;
    KilnBufferCopyFn buffer_copy;
    KilnSupportsOpFn supports_op;
    KilnGraphComputeFn graph_compute;
    KilnSynchronizeFn synchronize;
#if KILN_ABI_TARGET_MINOR >= 1
    KilnDeviceMemoryFn device_memory; /* optional (NULL) */
#endif
#if KILN_ABI_TARGET_MINOR >= 2
    KilnWeightLayoutFn weight_layout; /* optional (NULL): GGUF's layouts */
#endif
} KilnBackendApi;

/* The entry point. Called once per process. On success, store a table that
 * lives forever in *out_api and your instance pointer in *out_ctx. Refuse a
 * host whose abi_major differs from KILN_ABI_VERSION_MAJOR. */
typedef int32_t (*KilnBackendInitFn)(const KilnHostApi *host, const KilnBackendApi **out_api, void **out_ctx,
                                     KilnError *err);

/*
 * The layout table: every (name, value) the fingerprint folds, in order.
 * Same names and order as plugin-api/src/layout.rs; the test suite compiles
 * this header and compares the two tables entry by entry.
 */
#define KILN_LAYOUT_ENTRIES_1_0(X)                                                 \
    X("KilnError", sizeof(KilnError))                                              \
    X("KilnError.code", offsetof(KilnError, code))                                 \
    X("KilnError.op_index", offsetof(KilnError, op_index))                         \
    X("KilnError.message", offsetof(KilnError, message))                           \
    X("KilnHostApi.struct_size", offsetof(KilnHostApi, struct_size))               \
    X("KilnHostApi.abi_major", offsetof(KilnHostApi, abi_major))                   \
    X("KilnHostApi.abi_minor", offsetof(KilnHostApi, abi_minor))                   \
    X("KilnHostApi.layout_fingerprint", offsetof(KilnHostApi, layout_fingerprint)) \
    X("KilnHostApi.host_ctx", offsetof(KilnHostApi, host_ctx))                     \
    X("KilnHostApi.log", offsetof(KilnHostApi, log))                               \
    X("KilnHostApi.report_error", offsetof(KilnHostApi, report_error))             \
    X("KilnDeviceInfo.struct_size", offsetof(KilnDeviceInfo, struct_size))         \
    X("KilnDeviceInfo.kind", offsetof(KilnDeviceInfo, kind))                       \
    X("KilnDeviceInfo.name", offsetof(KilnDeviceInfo, name))                       \
    X("KilnDeviceInfo.total_memory", offsetof(KilnDeviceInfo, total_memory))       \
    X("KilnDeviceInfo.free_memory", offsetof(KilnDeviceInfo, free_memory))         \
    X("KilnDeviceInfo.capabilities", offsetof(KilnDeviceInfo, capabilities))       \
    X("KilnDeviceInfo.max_buffer_size", offsetof(KilnDeviceInfo, max_buffer_size)) \
    X("KilnDeviceInfo.buffer_alignment", offsetof(KilnDeviceInfo, buffer_alignment)) \
    X("KilnDeviceInfo.reserved0", offsetof(KilnDeviceInfo, reserved0))             \
    X("KilnTensor", sizeof(KilnTensor))                                            \
    X("KilnTensor.buffer", offsetof(KilnTensor, buffer))                           \
    X("KilnTensor.offset", offsetof(KilnTensor, offset))                           \
    X("KilnTensor.dtype", offsetof(KilnTensor, dtype))                             \
    X("KilnTensor.n_dims", offsetof(KilnTensor, n_dims))                           \
    X("KilnTensor.ne", offsetof(KilnTensor, ne))                                   \
    X("KilnTensor.nb", offsetof(KilnTensor, nb))                                   \
    X("KilnOp", sizeof(KilnOp))                                                    \
    X("KilnOp.kind", offsetof(KilnOp, kind))                                       \
    X("KilnOp.n_src", offsetof(KilnOp, n_src))                                     \
    X("KilnOp.src", offsetof(KilnOp, src))                                         \
    X("KilnOp.dst", offsetof(KilnOp, dst))                                         \
    X("KilnOp.flags", offsetof(KilnOp, flags))                                     \
    X("KilnOp.params", offsetof(KilnOp, params))                                   \
    X("KilnGraph", sizeof(KilnGraph))                                              \
    X("KilnGraph.struct_size", offsetof(KilnGraph, struct_size))                   \
    X("KilnGraph.n_tensors", offsetof(KilnGraph, n_tensors))                       \
    X("KilnGraph.tensors", offsetof(KilnGraph, tensors))                           \
    X("KilnGraph.n_ops", offsetof(KilnGraph, n_ops))                               \
    X("KilnGraph.reserved0", offsetof(KilnGraph, reserved0))                       \
    X("KilnGraph.ops", offsetof(KilnGraph, ops))                                   \
    X("KilnBackendApi.struct_size", offsetof(KilnBackendApi, struct_size))         \
    X("KilnBackendApi.abi_major", offsetof(KilnBackendApi, abi_major))             \
    X("KilnBackendApi.abi_minor", offsetof(KilnBackendApi, abi_minor))             \
    X("KilnBackendApi.layout_fingerprint", offsetof(KilnBackendApi, layout_fingerprint)) \
    X("KilnBackendApi.device_info_size", offsetof(KilnBackendApi, device_info_size)) \
    X("KilnBackendApi.reserved0", offsetof(KilnBackendApi, reserved0))             \
    X("KilnBackendApi.name", offsetof(KilnBackendApi, name))                       \
    X("KilnBackendApi.version", offsetof(KilnBackendApi, version))                 \
    X("KilnBackendApi.device_count", offsetof(KilnBackendApi, device_count))       \
    X("KilnBackendApi.device_info", offsetof(KilnBackendApi, device_info))         \
    X("KilnBackendApi.buffer_alloc", offsetof(KilnBackendApi, buffer_alloc))       \
    X("KilnBackendApi.buffer_wrap_host", offsetof(KilnBackendApi, buffer_wrap_host)) \
    X("KilnBackendApi.buffer_free", offsetof(KilnBackendApi, buffer_free))         \
    X("KilnBackendApi.buffer_write", offsetof(KilnBackendApi, buffer_write))       \
    X("KilnBackendApi.buffer_read", offsetof(KilnBackendApi, buffer_read))         \
    X("KilnBackendApi.buffer_copy", offsetof(KilnBackendApi, buffer_copy))         \
    X("KilnBackendApi.supports_op", offsetof(KilnBackendApi, supports_op))         \
    X("KilnBackendApi.graph_compute", offsetof(KilnBackendApi, graph_compute))     \
    X("KilnBackendApi.synchronize", offsetof(KilnBackendApi, synchronize))

#if KILN_ABI_TARGET_MINOR >= 1
#define KILN_LAYOUT_ENTRIES_1_1(X)                                 \
    X("KilnDeviceInfo.uuid", offsetof(KilnDeviceInfo, uuid))       \
    X("KilnBackendApi.device_memory", offsetof(KilnBackendApi, device_memory))
#else
#define KILN_LAYOUT_ENTRIES_1_1(X)
#endif

#if KILN_ABI_TARGET_MINOR >= 2
#define KILN_LAYOUT_ENTRIES_1_2(X) \
    X("KilnBackendApi.weight_layout", offsetof(KilnBackendApi, weight_layout))
#else
#define KILN_LAYOUT_ENTRIES_1_2(X)
#endif

#if KILN_ABI_TARGET_MINOR >= 3
#define KILN_LAYOUT_ENTRIES_1_3(X) \
    X("KilnGraph.threads", offsetof(KilnGraph, threads))
#else
#define KILN_LAYOUT_ENTRIES_1_3(X)
#endif

/* Sizes of the growable structs come last: they differ per minor. */
#define KILN_LAYOUT_ENTRIES(X)                \
    KILN_LAYOUT_ENTRIES_1_0(X)                \
    KILN_LAYOUT_ENTRIES_1_1(X)                \
    KILN_LAYOUT_ENTRIES_1_2(X)                \
    KILN_LAYOUT_ENTRIES_1_3(X)                \
    X("KilnHostApi", sizeof(KilnHostApi))     \
    X("KilnDeviceInfo", sizeof(KilnDeviceInfo)) \
    X("KilnBackendApi", sizeof(KilnBackendApi))

/* FNV-1a over the layout values; the compiler folds it to a constant. */
static inline uint64_t kiln_layout_fingerprint(void) {
    uint64_t h = 0xcbf29ce484222325ull;
#define KILN_FP_STEP_(name, value) h = (h ^ (uint64_t)(value)) * 0x00000100000001b3ull;
    KILN_LAYOUT_ENTRIES(KILN_FP_STEP_)
#undef KILN_FP_STEP_
    return h;
}
#define KILN_LAYOUT_FINGERPRINT (kiln_layout_fingerprint())

#if defined(_WIN32)
#define KILN_EXPORT __declspec(dllexport)
#else
#define KILN_EXPORT __attribute__((visibility("default")))
#endif

/* Every backend library defines this function. */
KILN_EXPORT int32_t kiln_backend_init(const KilnHostApi *host, const KilnBackendApi **out_api, void **out_ctx,
                                      KilnError *err);

#ifdef __cplusplus
}
#endif

#endif /* KILN_BACKEND_H */
