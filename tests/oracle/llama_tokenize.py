"""Tokenizes texts with llama.cpp (llama-cpp-python) on a GGUF's vocabulary.

usage: llama_tokenize.py MODEL.gguf TEXTS.json
Prints [[ids], ...]: a BOS where the vocabulary asks for one
(tokenizer.ggml.add_bos_token), special tokens in the text parsed.
"""
import json
import sys

from llama_cpp import Llama

gguf_path, texts_path = sys.argv[1:3]
texts = json.load(open(texts_path, encoding="utf-8"))
llm = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true")
print(json.dumps([llm.tokenize(t.encode("utf-8"), add_bos=add_bos, special=True) for t in texts]))
