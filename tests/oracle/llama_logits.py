"""Runs llama.cpp (llama-cpp-python) on token ids, for parity tests.

usage: llama_logits.py MODEL.gguf OUT.bin TOKENS N_GREEDY [--flash-attn] [--lora=ADAPTER.gguf]
TOKENS is comma-separated ids. Evaluates them in one batch (flash
attention off, f16 KV cache, as kiln lays it out; --flash-attn: llama.cpp's
other attention path, whose sums run in another order), writes the logits
of every prompt position to OUT.bin (f32, row by row), then decodes
N_GREEDY tokens greedily, one at a time, and prints them as JSON.
--lora applies a LoRA adapter (llama.cpp's format) at scale 1.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

model, out, tokens, n_greedy = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")], int(sys.argv[4])
lora = next((a.split("=", 1)[1] for a in sys.argv[5:] if a.startswith("--lora=")), None)
llm = Llama(model_path=model, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2, logits_all=True,
            flash_attn="--flash-attn" in sys.argv[5:], lora_path=lora, verbose=False)
llm.eval(tokens)
np.asarray(llm.scores[: len(tokens)], dtype="<f4").tofile(out)
greedy = []
for _ in range(n_greedy):
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    greedy.append(nxt)
    llm.eval([nxt])
print(json.dumps({"greedy": greedy, "n_vocab": llm.n_vocab()}))
