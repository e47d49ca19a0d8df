#!/usr/bin/env python3
"""The PyTorch peer of `kiln finetune train` in benches/finetune_vs_peers.sh.

LoRA training of a llama-architecture GGUF model with PyTorch's autograd on
the CPU, on the sequences `kiln finetune prepare` wrote: the frozen base
weights dequantized to f32 at load (the `gguf` package), RMS norm, rotary
positions on adjacent pairs (GGUF's layout), grouped-query causal attention
through `scaled_dot_product_attention` (PyTorch's fused CPU kernel, forward
and backward), SwiGLU, a rank-r pair (A, B; B zero at the start, scale
alpha/r) on q, k, v, o, gate, up and down, AdamW on the pairs only.

usage: finetune_torch.py MODEL.gguf DATA STEPS [rank=8] [alpha=16] [seq_len=256] [accumulate=1]
Prints one JSON line per step and a summary with the tokens/s of the steps
after the first. Threads: torch's default (one per core) unless
OMP_NUM_THREADS says otherwise.
"""
import json
import math
import resource
import sys
import time

import gguf
import numpy as np
import torch
import torch.nn.functional as F


def meta(reader, key, default=None):
    field = reader.get_field(key)
    if field is None:
        if default is None:
            raise SystemExit(f"{key} is missing")
        return default
    return field.contents()


class Lora(torch.nn.Module):
    def __init__(self, w, rank, alpha):
        super().__init__()
        out, inp = w.shape
        self.w = w
        bound = 1.0 / math.sqrt(inp)
        self.a = torch.nn.Parameter(torch.empty(rank, inp).uniform_(-bound, bound))
        self.b = torch.nn.Parameter(torch.zeros(out, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return x @ self.w.T + (x @ self.a.T) @ self.b.T * self.scale


def main():
    a = sys.argv
    if len(a) < 4:
        raise SystemExit(__doc__)
    steps = int(a[3])
    rank = int(a[4]) if len(a) > 4 else 8
    alpha = float(a[5]) if len(a) > 5 else 16.0
    seq_len = int(a[6]) if len(a) > 6 else 256
    acc = int(a[7]) if len(a) > 7 else 1
    torch.manual_seed(1)
    t0 = time.perf_counter()
    reader = gguf.GGUFReader(a[1])
    if meta(reader, "general.architecture") != "llama":
        raise SystemExit("only llama models")
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        t = tensors[name]
        v = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = [int(d) for d in reversed(t.shape)]
        return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(shape))

    n_layer = int(meta(reader, "llama.block_count"))
    nh = int(meta(reader, "llama.attention.head_count"))
    nkv = int(meta(reader, "llama.attention.head_count_kv"))
    dim = int(meta(reader, "llama.embedding_length"))
    eps = float(meta(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    base = float(meta(reader, "llama.rope.freq_base", 10000.0))
    hd = dim // nh
    embd = get("token_embd.weight")
    head = get("output.weight") if "output.weight" in tensors else embd
    norm = get("output_norm.weight")
    layers = []
    for i in range(n_layer):
        lo = {k: Lora(get(f"blk.{i}.{n}.weight"), rank, alpha) for k, n in [
            ("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output"),
            ("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")]}
        lo["attn_norm"] = get(f"blk.{i}.attn_norm.weight")
        lo["ffn_norm"] = get(f"blk.{i}.ffn_norm.weight")
        layers.append(lo)
    params = [p for lo in layers for k in ("q", "k", "v", "o", "gate", "up", "down")
              for p in lo[k].parameters()]
    load_s = time.perf_counter() - t0

    seqs = []
    with open(f"{a[2]}/train.jsonl") as f:
        for line in f:
            toks = json.loads(line)["tokens"][:seq_len]
            if len(toks) >= 2:
                seqs.append(toks)
    if not seqs:
        raise SystemExit(f"no training sequences in {a[2]}")

    inv = 1.0 / base ** (torch.arange(0, hd // 2, dtype=torch.float32) * 2 / hd)

    def rope(x, cos, sin):
        # x: (1, h, t, hd), rotating adjacent pairs.
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)

    def loss_of(tokens):
        t = len(tokens)
        ids = torch.tensor(tokens)
        ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        x = embd[ids]
        for lo in layers:
            h = F.rms_norm(x, (dim,), lo["attn_norm"], eps)
            q = rope(lo["q"](h).view(t, nh, hd).transpose(0, 1)[None], cos, sin)
            k = rope(lo["k"](h).view(t, nkv, hd).transpose(0, 1)[None], cos, sin)
            v = lo["v"](h).view(t, nkv, hd).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + lo["o"](o[0].transpose(0, 1).reshape(t, dim))
            h = F.rms_norm(x, (dim,), lo["ffn_norm"], eps)
            x = x + lo["down"](F.silu(lo["gate"](h)) * lo["up"](h))
        h = F.rms_norm(x[:-1], (dim,), norm, eps)
        return F.cross_entropy(h @ head.T, ids[1:])

    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    tokens = nxt = 0
    timed_tokens, timed_s = 0, 0.0
    for step in range(1, steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        n = 0
        total = 0.0
        for _ in range(acc):
            s = seqs[nxt % len(seqs)]
            nxt += 1
            n += len(s)
            loss = loss_of(s) / acc
            loss.backward()
            total += loss.item()
        opt.step()
        s = time.perf_counter() - t
        tokens += n
        if step > 1:
            timed_tokens += n
            timed_s += s
        print(json.dumps({"step": step, "loss": total, "tokens": tokens, "seconds": s}), flush=True)
    print(json.dumps({
        "summary": True,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in params),
        "tokens_per_s": timed_tokens / timed_s if timed_s > 0 else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
