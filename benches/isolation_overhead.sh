#!/usr/bin/env bash
# What running a plugin in a worker process costs: kiln's CPU backend built
# as a plugin (`cargo build --release -p kiln-cpu-plugin`) is added to a
# fresh KILN_HOME, then `kiln bench MODEL --backend cpu-plugin` runs with
# the plugin in a worker process (the default) and in kiln's own process
# (`[plugins.isolation] cpu-plugin = "in-process"`), alternating, N times
# each. Prints the median prompt and decode speeds of each and the ratio
# isolated ÷ in-process per decode step (issue 23 asks for a small,
# measured overhead).
#
# usage: benches/isolation_overhead.sh KILN LIBKILN_CPU_PLUGIN.so MODEL.gguf [RUNS]   (RUNS: 5)
set -euo pipefail
kiln=$1 lib=$2 model=$3 runs=${4:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KILN_HOME="$work/home"
mkdir -p "$work/plugin"
cp "$lib" "$work/plugin/"
cat > "$work/plugin/kiln-plugin.toml" <<EOF
name = "cpu-plugin"
version = "1.0.0"
kind = "backend"
abi = "1.2"
library = "$(basename "$lib")"
sha256 = "$(sha256sum "$lib" | cut -d' ' -f1)"
EOF
"$kiln" plugins add "$work/plugin" >/dev/null
python3 - "$kiln" "$model" "$runs" "$KILN_HOME/config.toml" <<'EOF'
import json, statistics, subprocess, sys
kiln, model, runs, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def once(isolation):
    with open(config, "w") as f:
        f.write(f'[plugins.isolation]\n"cpu-plugin" = "{isolation}"\n')
    out = subprocess.run([kiln, "bench", model, "--backend", "cpu-plugin", "--prompt-tokens", "128",
                          "--decode-tokens", "64", "--json"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return r["prompt_tokens_per_s"], r["decode_tokens_per_s"]
once("process"); once("in-process")  # warm-up: the page cache and the device's score
got = {"process": [], "in-process": []}
for _ in range(runs):
    for iso in got:
        got[iso].append(once(iso))
med = {iso: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for iso, v in got.items()}
for iso, (p, d) in med.items():
    print(f"{iso:12s} prompt {p:8.1f} tok/s   decode {d:7.2f} tok/s")
(pp, dp), (pi, di) = med["process"], med["in-process"]
print(f"per decode step, isolated / in-process: {di / dp:.3f}×   per prompt token: {pi / pp:.3f}×")
EOF
