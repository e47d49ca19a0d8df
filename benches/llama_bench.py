"""llama.cpp (llama-cpp-python) on one GGUF, measured as `kiln bench` measures:
load time; decode of DECODE tokens after a 16-token prompt (greedy, one
token per call); one PROMPT-token prompt in a single batch. 2 threads.
Prints one JSON line.

usage: llama_bench.py MODEL.gguf PROMPT DECODE
"""
import json
import resource
import sys
import time

import llama_cpp as L
import numpy as np
from llama_cpp import Llama

path, n_prompt, n_decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
llm = Llama(model_path=path, n_threads=2, n_threads_batch=2, n_batch=512, n_ubatch=512,
            n_ctx=1024, flash_attn=False, verbose=False)
load_ms = (time.perf_counter() - t) * 1e3
ctx, nv = llm.ctx, llm.n_vocab()
mem = L.llama_get_memory(ctx)
batch = L.llama_batch_init(512, 0, 1)
rng = np.random.default_rng(0)


def run(toks, pos0):
    batch.n_tokens = len(toks)
    for i, tok in enumerate(toks):
        batch.token[i] = tok
        batch.pos[i] = pos0 + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 0
    batch.logits[len(toks) - 1] = 1
    assert L.llama_decode(ctx, batch) == 0
    return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(nv,))))


L.llama_memory_clear(mem, True)
tok = run(rng.integers(259, nv, 16).tolist(), 0)
t = time.perf_counter()
for i in range(n_decode):
    tok = run([tok], 16 + i)
decode = n_decode / (time.perf_counter() - t)
L.llama_memory_clear(mem, True)
prompt = rng.integers(259, nv, n_prompt).tolist()
t = time.perf_counter()
run(prompt, 0)
pp = n_prompt / (time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_ms": load_ms, "prompt_tokens_per_s": pp, "decode_tokens_per_s": decode,
                  "peak_rss_bytes": peak}))
