#!/usr/bin/env bash
# kiln against llama.cpp on the same GGUF files, in the same run: load
# time, prompt-processing and decode speed, one table with the ratios.
#
# usage: benches/model_vs_llama.sh MODELS... [-- PROMPT DECODE]
#   e.g. benches/model_vs_llama.sh big-f16.gguf big-q8_0.gguf big-q4_0.gguf big-q4_k_m.gguf -- 64 16
# TinyLlama-shaped files: ../shared/peers/gen_model.py OUT big, then
# ../shared/peers/quantize.py. Needs llama-cpp-python (KILN_PYTHON, or the
# venv .ci/run makes) and a release build of kiln (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
models=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do models+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
prompt=${1:-64}
decode=${2:-16}
python=${KILN_PYTHON:-target/python-venv/bin/python}
cargo build --release -q -p kiln
kiln=target/release/kiln
export KILN_HOME=${KILN_HOME:-$(mktemp -d)}

printf '| file | MiB | load ms kiln / llama.cpp | prompt-%d tok/s kiln / llama.cpp (ratio) | decode tok/s kiln / llama.cpp (ratio) |\n' "$prompt"
printf '|---|---|---|---|---|\n'
for m in "${models[@]}"; do
  k=$("$kiln" bench "$m" --prompt-tokens "$prompt" --decode-tokens "$decode" --json 2>/dev/null)
  l=$("$python" benches/llama_bench.py "$m" "$prompt" "$decode")
  "$python" - "$m" "$k" "$l" <<'PY'
import json, os, sys
m, k, l = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
mib = os.path.getsize(m) / 2**20
r = lambda a, b: a / b if b else float("nan")
print(f"| {os.path.basename(m)} | {mib:.0f} | {k['load_ms']:.0f} / {l['load_ms']:.0f} "
      f"| {k['prompt_tokens_per_s']:.2f} / {l['prompt_tokens_per_s']:.1f} ({r(k['prompt_tokens_per_s'], l['prompt_tokens_per_s']):.3f}x) "
      f"| {k['decode_tokens_per_s']:.2f} / {l['decode_tokens_per_s']:.1f} ({r(k['decode_tokens_per_s'], l['decode_tokens_per_s']):.3f}x) |")
PY
done
