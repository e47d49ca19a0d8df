#!/usr/bin/env bash
# `kiln finetune train` against candle's and PyTorch's autograd: LoRA
# training tokens/s and peak memory on the same model, the same sequences
# and the same settings, in the same run.
#
# usage: benches/finetune_vs_peers.sh MODEL.gguf SOURCE_DIR [STEPS]
#   e.g. benches/finetune_vs_peers.sh target/models/smollm2-135m-instruct-q4_1.gguf ~/src/some-repo 12
# The sequences are `kiln finetune prepare SOURCE_DIR --seq-len 256`'s
# (plain text for a model without FIM tokens); every engine trains rank 8,
# alpha 16 on q, k, v, o, gate, up and down, one 256-token sequence a step,
# AdamW, 2 threads, and is timed over steps 2 to STEPS−1 (default 12): the
# first step has one-time allocation, and kiln's last one evaluates the
# held-out set. llama-architecture models only (the peers' model code).
#
# Peers, each skipped with a line saying how to get it when missing:
# - candle (candle-core/candle-nn 0.11, `rms_norm_slow`/`rope_i_slow`/
#   `softmax`, the autograd-capable ops): benches/candle_lora, built here
#   into target/candle_lora.
# - PyTorch (eager, `scaled_dot_product_attention`, F.rms_norm):
#   benches/finetune_torch.py with KILN_TORCH_PYTHON, a Python with `torch`
#   and `gguf` (`python3 -m venv V && V/bin/pip install torch gguf`).
# Both hold the base weights dequantized to f32 (their quantized products
# have no backward pass); kiln keeps them in the file's type for the
# forward pass (its inference kernels) and an f32 copy for the backward
# pass within its memory budget (see host/finetune/src/train/model.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: $0 MODEL.gguf SOURCE_DIR [STEPS]}
src=${2:?usage: $0 MODEL.gguf SOURCE_DIR [STEPS]}
steps=${3:-12}
[ "$steps" -ge 4 ] || { echo "STEPS must be 4 or more" >&2; exit 2; }
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 KILN_THREADS=2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo build --release --locked -p kiln >&2
kiln=target/release/kiln
"$kiln" finetune prepare "$src" --model "$model" --out "$work/data" --seq-len 256 >&2

# rate FILE: tokens/s over steps 2..STEPS-1 of an engine's JSON lines
# (kiln's: tokens and elapsed_s so far; the peers': tokens so far and the
# step's own seconds).
rate() {
  python3 - "$1" "$steps" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
steps = {d["step"]: d for d in lines if "step" in d and d.get("event", "step") == "step"}
last = int(sys.argv[2]) - 1
if "elapsed_s" in steps[1]:
    toks = steps[last]["tokens"] - steps[1]["tokens"]
    secs = steps[last]["elapsed_s"] - steps[1]["elapsed_s"]
else:
    toks = steps[last]["tokens"] - steps[1]["tokens"]
    secs = sum(steps[i]["seconds"] for i in range(2, last + 1))
peak = [d.get("peak_rss_bytes") for d in lines if "peak_rss_bytes" in d]
print(f"{toks / secs:.1f} {(peak[-1] or 0) / 2**20:.0f}")
EOF
}

printf '%-10s %10s %10s %14s\n' engine "tokens/s" "peak MiB" "kiln ÷ engine"
"$kiln" finetune train "$work/data" --model "$model" --out "$work/kiln.gguf" \
  --steps "$steps" --accumulate 1 --rank 8 --alpha 16 --eval-every 0 --json \
  > "$work/kiln.jsonl" 2> "$work/kiln.err" || { cat "$work/kiln.err" >&2; exit 1; }
read -r kiln_rate kiln_peak < <(rate "$work/kiln.jsonl")
printf '%-10s %10s %10s %14s\n' kiln "$kiln_rate" "$kiln_peak" 1.00

peer() { # NAME COMMAND...
  local name=$1; shift
  if "$@" > "$work/$name.jsonl" 2> "$work/$name.err"; then
    read -r r p < <(rate "$work/$name.jsonl")
    printf '%-10s %10s %10s %14s\n' "$name" "$r" "$p" \
      "$(python3 -c "print(f'{$kiln_rate / $r:.2f}')")"
  else
    echo "$name: failed (tail of its stderr follows)" >&2
    tail -5 "$work/$name.err" >&2
  fi
}

if (cd benches/candle_lora && CARGO_TARGET_DIR=../../target/candle_lora cargo build --release >&2); then
  peer candle target/candle_lora/release/candle_lora "$model" "$work/data" "$steps" 8 16 256 1
else
  echo "candle: benches/candle_lora did not build (crates.io reachable?)" >&2
fi
if [ -n "${KILN_TORCH_PYTHON:-}" ]; then
  peer pytorch "$KILN_TORCH_PYTHON" benches/finetune_torch.py "$model" "$work/data" "$steps" 8 16 256 1
else
  echo "pytorch: skipped (KILN_TORCH_PYTHON: a Python with torch and gguf)" >&2
fi
grep -m1 "model name" /proc/cpuinfo | sed 's/.*: /cpu: /'
