"""A greedy chat completion by llama.cpp (llama-cpp-python), with the
model's own chat template (its Jinja2ChatFormatter).

usage: llama_chat.py MODEL.gguf REQUEST.json
REQUEST.json: {"messages": [...], "max_tokens": N}
Prints {"text", "prompt_tokens", "completion_tokens", "finish_reason"}.
"""
import json
import sys

from llama_cpp import Llama

model, request = sys.argv[1:3]
req = json.load(open(request, encoding="utf-8"))
llm = Llama(model_path=model, n_ctx=1024, n_threads=1, verbose=False)
r = llm.create_chat_completion(
    messages=req["messages"],
    max_tokens=req["max_tokens"],
    temperature=0.0,
    repeat_penalty=1.0,
)
c = r["choices"][0]
print(json.dumps({
    "text": c["message"]["content"],
    "prompt_tokens": r["usage"]["prompt_tokens"],
    "completion_tokens": r["usage"]["completion_tokens"],
    "finish_reason": c["finish_reason"],
}, ensure_ascii=False))
