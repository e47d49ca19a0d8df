"""llama.cpp (llama-cpp-python) at a long context, measured as `kiln bench`
measures it: one PROMPT-token prompt (random ids, in batches of 512), then
DECODE greedy tokens one per call at that depth; flash attention on (it
is what llama.cpp needs for a quantized V cache), K and V of TYPE (f16,
q8_0, q4_0). 2 threads. Prints one JSON line.

usage: llama_long.py MODEL.gguf PROMPT DECODE TYPE
"""
import json
import sys
import time

import llama_cpp as L
import numpy as np
from llama_cpp import Llama

path, n_prompt, n_decode, kv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ggml_type = {"f16": 1, "q8_0": 8, "q4_0": 2}[kv]
llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_batch=512, n_ubatch=512,
            n_ctx=n_prompt + n_decode + 16, flash_attn=True, type_k=ggml_type, type_v=ggml_type,
            verbose=False)
ctx, nv = llm.ctx, llm.n_vocab()
batch = L.llama_batch_init(512, 0, 1)
rng = np.random.default_rng(0)


def run(toks, pos0, last):
    batch.n_tokens = len(toks)
    for i, tok in enumerate(toks):
        batch.token[i] = tok
        batch.pos[i] = pos0 + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 0
    batch.logits[len(toks) - 1] = 1 if last else 0
    assert L.llama_decode(ctx, batch) == 0
    if last:
        return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(nv,))))
    return None


prompt = rng.integers(259, nv, n_prompt).tolist()
t = time.perf_counter()
tok = None
for i in range(0, n_prompt, 512):
    part = prompt[i:i + 512]
    tok = run(part, i, i + 512 >= n_prompt)
pp = n_prompt / (time.perf_counter() - t)
t = time.perf_counter()
for i in range(n_decode):
    tok = run([tok], n_prompt + i, True)
decode = n_decode / (time.perf_counter() - t)
print(json.dumps({"kv_type": kv, "prompt_tokens_per_s": pp, "decode_after_prompt_tokens_per_s": decode}))
