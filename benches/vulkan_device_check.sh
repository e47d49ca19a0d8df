#!/bin/bash
# The Vulkan plugin on a real GPU, in one run: the gate on each matmul
# path, each model's greedy text on the device against the CPU's, and
# `kiln bench` on both. Prints a report; exits 0 unless kiln is missing.
#
#   benches/vulkan_device_check.sh KILN PLUGIN_DIR MODEL.gguf...
#
# KILN: a release `kiln`; PLUGIN_DIR: libkiln_vulkan.so with its
# kiln-plugin.toml (plugins/vulkan/README.md). Small models check tokens,
# larger ones speed; BENCH_PROMPT (512) and BENCH_DECODE (64) size the
# bench. Nothing is written outside a temporary KILN_HOME.
set -u
KILN=${1:?usage: $0 KILN PLUGIN_DIR MODEL.gguf...}; PLUGIN=${2:?plugin dir}; shift 2
[ -x "$KILN" ] || { echo "no kiln at $KILN" >&2; exit 2; }
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) × $(nproc)"

gate() { # NAME ENV...: the gate's outcomes on that path
  local name=$1; shift
  env KILN_HOME="$T/gate-$name" KILN_LOG=info "$@" timeout 300 "$KILN" plugins add "$PLUGIN" --json \
    > "$T/gate.json" 2> "$T/gate.log"
  echo "gate $name: $(grep -o 'matmul sums[^"]*' "$T/gate.log" | head -1)"
  python3 - "$T/gate.json" <<'PY'
import collections, json, sys
try:
    v = json.load(open(sys.argv[1]))
except ValueError:
    sys.exit("  no report (see the log above)")
for dev in v.get("cases", []):
    cases = dev["cases"]
    print("  device", dev.get("device"), dict(collections.Counter(c["outcome"] for c in cases)))
    for c in cases:
        if c["outcome"] != "passed":
            print("   ", c)
    worst = max((c for c in cases if c.get("nmse") is not None), key=lambda c: c["nmse"], default=None)
    if worst:
        print("  worst NMSE", worst["case"], worst["nmse"])
PY
}
gate default
gate float KILN_VULKAN_F64=0
gate plain KILN_VULKAN_NO_F64=1 KILN_VULKAN_NO_SUBGROUPS=1 KILN_VULKAN_NO_TILES=1
gate dot-f16 KILN_VULKAN_F64=0 KILN_VULKAN_DOT=1 KILN_VULKAN_FP16=1
gate no-dot-f16 KILN_VULKAN_DOT=0 KILN_VULKAN_FP16=0

export KILN_HOME="$T/home"
"$KILN" plugins add "$PLUGIN" > /dev/null 2>&1
"$KILN" backends 2>&1
for model in "$@"; do
  echo "== $(basename "$model")"
  for b in cpu vulkan; do
    timeout 300 "$KILN" run "$model" --prompt "def fibonacci(n):" --max-tokens 32 --temperature 0 \
      --backend $b --json > "$T/$b.json" 2> "$T/$b.err" || tail -3 "$T/$b.err"
  done
  python3 - "$T/cpu.json" "$T/vulkan.json" <<'PY'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:])
except ValueError:
    sys.exit("  a run failed")
s = b.get("backend_stats", {})
same = a["token_ids"] == b["token_ids"]
at = next((i for i, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y), None)
print("  tokens:", "the CPU's" if same else f"differ from token {at}",
      {k: s.get(k) for k in ("ops_run", "ops_unsupported_on_cpu", "segments_rerun_on_cpu", "device_losses")})
PY
  for b in vulkan cpu; do
    timeout 300 "$KILN" bench "$model" --prompt-tokens "${BENCH_PROMPT:-512}" \
      --decode-tokens "${BENCH_DECODE:-64}" --backend $b 2>&1 | tail -1 | sed "s/^/  $b: /"
  done
done
