#!/usr/bin/env bash
# The privacy-utility trade-off of `kiln finetune train --dp-epsilon`:
# the same LoRA run without DP and at ε = 8, 4 and 1 (δ = 1e-5), each
# adapter scored against the base on every held-out sequence by `kiln
# finetune eval` (NLL per token, with the paired difference's 95 %
# interval). DP needs hundreds of sequences a step to keep any of the
# gain (docs/cli.md), so this is a heavy run on 2 cores: about 25 minutes
# for models/kiln-code at 30 steps of 256 sequences of 128 tokens, an
# hour for SmolLM2-135M at 8 steps of 256 sequences of 64 tokens.
#
# usage: benches/finetune_dp.sh MODEL.gguf SOURCE_DIR [STEPS] [BATCH] [SEQ_LEN] [LR]
#   e.g. benches/finetune_dp.sh models/kiln-code/kiln-code.gguf ~/src/some-repo 30 256 128 2e-3
# Every run: LoRA rank 4, alpha 8 on all seven projections, BATCH
# sequences a step (expected, under DP), clip 0.25.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: $0 MODEL.gguf SOURCE_DIR [STEPS] [BATCH] [SEQ_LEN] [LR]"
model=${1:?$usage}
src=${2:?$usage}
steps=${3:-30}
batch=${4:-256}
seq=${5:-128}
lr=${6:-2e-3}
# KILN names a kiln binary to time; otherwise this tree's, built (a no-op
# when it is up to date) so that a stale binary is never measured.
if [ -z "${KILN:-}" ]; then
  cargo build --release --locked -p kiln >&2
fi
kiln=${KILN:-target/release/kiln}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$kiln" finetune prepare "$src" --model "$model" --out "$work/data" --seq-len "$seq" >&2
echo "| | noise multiplier σ | ε spent | train tok/s | peak memory | held-out NLL, base → adapter | change [95 %] |"
echo "|---|---|---|---|---|---|---|"
for e in none 8 4 1; do
  dp=()
  [ "$e" = none ] || dp=(--dp-epsilon "$e" --dp-delta 1e-5 --dp-clip 0.25)
  "$kiln" finetune train "$work/data" --model "$model" --out "$work/a-$e.gguf" \
    --steps "$steps" --accumulate "$batch" --rank 4 --alpha 8 --lr "$lr" \
    --eval-every 0 --save-every 0 --json "${dp[@]}" > "$work/train-$e.jsonl"
  "$kiln" finetune eval "$work/data" --model "$model" --adapter "$work/a-$e.gguf" \
    --holes 0 --json > "$work/eval-$e.json"
  python3 - "$e" "$work/train-$e.jsonl" "$work/eval-$e.json" <<'PY'
import json, sys
e, train, ev = sys.argv[1:]
done = json.loads([l for l in open(train) if l.strip()][-1])
r = json.load(open(ev))["report"]
dp = done["dp"] or {}
d = r["delta_nll"]
sigma = f"{dp['noise_multiplier']:.3f}" if dp else "–"
spent = f"{dp['epsilon_spent']:.2f}" if dp else "–"
name = "no DP" if e == "none" else f"ε = {e}"
print(f"| {name} | {sigma} | {spent} | {done['tokens_per_s']:.0f} | "
      f"{done['peak_rss_bytes'] / 2**20:.0f} MiB | "
      f"{r['base']['nll']['mean']:.3f} → {r['adapter']['nll']['mean']:.3f} | "
      f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |")
PY
done
