#!/usr/bin/env bash
# Loading an encrypted model against the same model in plain: each GGUF
# given is encrypted with the `age` tool to a fresh X25519 key, then
# `kiln run FILE --prompt "def f" --max-tokens 1` (load, a 3-token prompt,
# one token: the time until a model can answer) runs plain and encrypted
# in turn, N times each after a warm-up, as whole processes with the files
# in the page cache. Prints the median wall time of each and their ratio
# (issue 22 asks for at most 1.3).
#
# usage: benches/encrypted_load.sh KILN MODEL.gguf… [-- RUNS]   (RUNS: 10)
set -euo pipefail
kiln=$1
shift
models=()
runs=10
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then runs=${2:-10}; break; fi
  models+=("$1")
  shift
done
command -v age >/dev/null || { echo "needs Debian's age (apt-get install age)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
age-keygen -o "$work/id.txt" 2>/dev/null
recipient=$(grep -o 'age1[a-z0-9]*' "$work/id.txt" | head -1)
export KILN_HOME="$work/home" KILN_IDENTITY="$work/id.txt"
printf '%-40s %8s %12s %16s %7s\n' model MiB "plain ms" "encrypted ms" ratio
for m in "${models[@]}"; do
  enc="$work/$(basename "$m").age"
  age -r "$recipient" -o "$enc" "$m"
  python3 - "$kiln" "$m" "$enc" "$runs" <<'EOF'
import os, statistics, subprocess, sys, time
kiln, plain, enc, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def once(path):
    t = time.perf_counter()
    subprocess.run([kiln, "run", path, "--prompt", "def f", "--max-tokens", "1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t
once(plain); once(enc)  # warm-up: the page cache and the device's score
a, b = [], []
for _ in range(runs):
    a.append(once(plain))
    b.append(once(enc))
pa, pb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
mib = os.path.getsize(plain) / (1 << 20)
print(f"{os.path.basename(plain):40s} {mib:8.0f} {pa:12.0f} {pb:16.0f} {pb / pa:7.2f}")
EOF
done
