"""Tokenizes a corpus with Hugging Face `tokenizers` (on tokenizer.json)
and with llama.cpp (on a GGUF, vocabulary only), for tokenizer parity.

usage: tokenize_corpus.py TOKENIZER.json MODEL.gguf CORPUS.json
Prints {"hf": [[ids], ...], "llama": [[ids], ...]}: no BOS/EOS added,
special tokens written in the text parsed as tokens.
"""
import json
import sys

from llama_cpp import Llama
from tokenizers import Tokenizer

tok_path, gguf_path, corpus_path = sys.argv[1:4]
corpus = json.load(open(corpus_path, encoding="utf-8"))
hf = Tokenizer.from_file(tok_path)
llm = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
out = {
    "hf": [hf.encode(s, add_special_tokens=False).ids for s in corpus],
    "llama": [llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) for s in corpus],
}
print(json.dumps(out))
