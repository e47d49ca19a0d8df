#!/usr/bin/env bash
# Long windows: prompt speed, decode speed at the prompt's depth and KV
# cache memory for each KV cache type, kiln against llama.cpp (flash
# attention, the same K and V type) in the same run, on one model.
#
# usage: benches/long_context.sh MODEL.gguf [PROMPT_TOKENS=8192] [DECODE=16]
# Needs a release build (`cargo build --release -p kiln`) and llama.cpp's
# Python binding (`tests/provision.sh` installs it; KILN_PYTHON names it).
# Needle retrieval per KV type at these depths is
# `cargo bench -p kiln-benches --bench needles`.
set -euo pipefail
model=$1
n=${2:-8192}
decode=${3:-16}
root=$(cd "$(dirname "$0")/.." && pwd)
kiln=${KILN:-$root/target/release/kiln}
python=${KILN_PYTHON:-python3}
printf '%-6s %14s %14s %10s %16s %16s %8s\n' kv "kiln pp t/s" "llama pp t/s" "pp ratio" "kiln decode t/s" "llama decode t/s" "KV MiB"
for kv in f16 q8_0 q4_0; do
  k=$("$kiln" bench "$model" --prompt-tokens "$n" --decode-tokens "$decode" --kv-type "$kv" --json)
  l=$("$python" "$root/benches/llama_long.py" "$model" "$n" "$decode" "$kv")
  "$python" - "$k" "$l" "$kv" <<'PY'
import json, sys
k, l, kv = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
print(f"{kv:<6} {k['prompt_tokens_per_s']:14.1f} {l['prompt_tokens_per_s']:14.1f} "
      f"{k['prompt_tokens_per_s'] / l['prompt_tokens_per_s']:10.2f} "
      f"{k['decode_after_prompt_tokens_per_s']:16.1f} {l['decode_after_prompt_tokens_per_s']:16.1f} "
      f"{k['kv_bytes'] / 2**20:8.0f}")
PY
done
