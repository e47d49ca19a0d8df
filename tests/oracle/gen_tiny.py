"""Writes a small random-weight llama, qwen2, qwen3, gemma3 or starcoder2 GGUF with llama.cpp's own
writer (the `gguf` package), for kiln's format, quantization and parity
tests. The vocabulary is a synthetic SentencePiece one (byte tokens plus
unique pieces), so llama.cpp loads the file.

usage: gen_tiny.py OUT.gguf --arch llama|qwen2|qwen3|gemma3|starcoder2 --dtype f32|f16|bf16
       [--embd 64] [--layers 2] [--heads 4] [--kv-heads 2] [--ff 160]
       [--vocab 512] [--ctx 256] [--std 0.2] [--seed 1] [--tied]
       [--head-dim N] [--window N]
qwen3 and gemma3 get per-head Q/K norms; gemma3 also post-norms and, with
--window, sliding-window layers (five local, then a global one).
starcoder2 has LayerNorms with biases, biases on every projection and a
plain GELU feed-forward (no gate).
"""
import argparse

import numpy as np
import gguf


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "gemma3", "starcoder2"])
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--embd", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ff", type=int, default=160)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--std", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--head-dim", type=int, default=0)
    p.add_argument("--window", type=int, default=0)
    # RoPE scaling: a type and factor (and YaRN's original context), and
    # Llama 3-style per-dimension frequency factors (random, in [0.5, 8]).
    p.add_argument("--rope-scaling", default="", choices=["", "none", "linear", "yarn"])
    p.add_argument("--rope-factor", type=float, default=0.0)
    p.add_argument("--rope-orig-ctx", type=int, default=0)
    p.add_argument("--rope-freqs", action="store_true")
    a = p.parse_args()

    E, L, H, HKV, FF, V = a.embd, a.layers, a.heads, a.kv_heads, a.ff, a.vocab
    hd = a.head_dim or E // H
    QD = H * hd
    qk_norm = a.arch in ("qwen3", "gemma3")
    rng = np.random.default_rng(a.seed)
    w = gguf.GGUFWriter(a.out, a.arch)
    w.add_name(f"tiny-{a.arch}")
    w.add_context_length(a.ctx)
    w.add_embedding_length(E)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_rope_freq_base(10000.0)
    sc2 = a.arch == "starcoder2"
    if sc2:
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-5 if a.arch == "llama" else 1e-6)
    if a.arch == "llama":
        w.add_rope_dimension_count(hd)
    if qk_norm or a.head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if a.arch == "gemma3" and a.window:
        w.add_sliding_window(a.window)
    if a.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(a.rope_scaling))
    if a.rope_factor:
        w.add_rope_scaling_factor(a.rope_factor)
    if a.rope_orig_ctx:
        w.add_rope_scaling_orig_ctx_len(a.rope_orig_ctx)
    w.add_vocab_size(V)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[a.dtype]
    w.add_file_type(ftype)

    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    i = 0
    while len(toks) < V:
        toks.append(f"\u2581t{i}")
        types.append(gguf.TokenType.NORMAL)
        i += 1
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * 259 + [-float(k) for k in range(V - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def weight(*shape):  # numpy shape = reversed ggml ne
        x = rng.standard_normal(shape, dtype=np.float32) * a.std
        if a.dtype == "f16":
            return x.astype(np.float16)
        if a.dtype == "bf16":
            # Round to bfloat16 (nearest even) and store the raw 16 bits.
            u = x.view(np.uint32)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            return u
        return x

    def add(name, arr):
        if a.dtype == "bf16" and arr.dtype == np.uint16:
            w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, arr)

    norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
    bias = lambda n: (0.1 * rng.standard_normal(n)).astype(np.float32)

    add("token_embd.weight", weight(V, E))
    if a.rope_freqs:
        add("rope_freqs.weight", rng.uniform(0.5, 8.0, hd // 2).astype(np.float32))
    for l in range(L):
        b = f"blk.{l}."
        add(b + "attn_norm.weight", norm(E))
        if sc2:
            add(b + "attn_norm.bias", bias(E))
        add(b + "attn_q.weight", weight(QD, E))
        add(b + "attn_k.weight", weight(HKV * hd, E))
        add(b + "attn_v.weight", weight(HKV * hd, E))
        if a.arch in ("qwen2", "starcoder2"):
            add(b + "attn_q.bias", bias(QD))
            add(b + "attn_k.bias", bias(HKV * hd))
            add(b + "attn_v.bias", bias(HKV * hd))
        if qk_norm:
            add(b + "attn_q_norm.weight", norm(hd))
            add(b + "attn_k_norm.weight", norm(hd))
        add(b + "attn_output.weight", weight(E, QD))
        if sc2:
            add(b + "attn_output.bias", bias(E))
        if a.arch == "gemma3":
            add(b + "post_attention_norm.weight", norm(E))
            add(b + "post_ffw_norm.weight", norm(E))
        add(b + "ffn_norm.weight", norm(E))
        if sc2:
            add(b + "ffn_norm.bias", bias(E))
        else:
            add(b + "ffn_gate.weight", weight(FF, E))
        add(b + "ffn_up.weight", weight(FF, E))
        if sc2:
            add(b + "ffn_up.bias", bias(FF))
        add(b + "ffn_down.weight", weight(E, FF))
        if sc2:
            add(b + "ffn_down.bias", bias(E))
    add("output_norm.weight", norm(E))
    if sc2:
        add("output_norm.bias", bias(E))
    if not a.tied:
        add("output.weight", weight(V, E))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
