#!/usr/bin/env bash
# kiln against llama.cpp (and candle, when its bench is there) on the same
# GGUF files, in the same run: load time, prompt-processing and decode
# speed, and the share of the memory-bandwidth bound decode reaches, in one
# table with the ratios.
#
# usage: benches/model_vs_llama.sh MODELS... [-- PROMPT DECODE]
#   e.g. benches/model_vs_llama.sh big-q4_0.gguf big-q5_0.gguf -- 256 32
# TinyLlama-shaped files: ../shared/peers/gen_model.py OUT big, then
# ../shared/peers/quantize.py. Needs llama-cpp-python (KILN_PYTHON, or the
# venv .ci/run makes) and a release build of kiln (built here). candle's
# bench is built from ../shared/peers/candle_bench when that exists
# (KILN_CANDLE=0 skips it; it is not run on Q5_0 or F16 files, which it
# has no fast kernels for); the bandwidth from ../shared/peers/bw.c, around
# each file; the bound is that bandwidth over the bytes of weights read
# per token (the file minus the token embedding). Prompt GFLOP/s: the
# weights' matrix products only, 2 × the elements of the layers' matrices
# per prompt token (attention's products and the output layer, which runs
# for the last token only, not counted). Peak RSS: kiln's VmHWM; llama.cpp's
# ru_maxrss (about 40 MiB of it is Python). 2 threads for every engine.
# kiln and llama.cpp run KILN_BENCH_RUNS times each (default 3), taking
# turns, and each one's best speeds count: on a machine whose memory
# bandwidth is shared, one run swings by 20 % and more.
# ik_llama.cpp, the second peer, runs in the same turns when
# KILN_IK_LLAMA_BENCH names its llama-bench (benches/build_ik_llama.sh
# builds one), with run-time repacking on (-rtr 1, its fastest CPU
# layouts; KILN_IK_ARGS replaces that); "faster peer" is the faster of
# llama.cpp and ik_llama.cpp.
# Above the table: the CPU, the kernels kiln ran (`kiln doctor`'s line,
# which KILN_CPU_ISA lowers) and what llama.cpp and ik_llama.cpp were
# built for, so a table says which ISA each column measured.
# Decode is also timed from outside both engines (kiln and llama.cpp):
# whole processes decoding 72 and then 8 tokens after the same 16-token
# warm-up (a 1-token prompt), the tokens over the difference of their wall
# times, the shortest of the runs each; no engine's own clock, nor what
# it leaves out of it, counts.
set -euo pipefail
cd "$(dirname "$0")/.."
models=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do models+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
prompt=${1:-64}
decode=${2:-16}
python=${KILN_PYTHON:-target/python-venv/bin/python}
peers=../shared/peers
cargo build --release -q -p kiln
kiln=target/release/kiln
export KILN_HOME=${KILN_HOME:-$(mktemp -d)} KILN_THREADS=2
ik=${KILN_IK_LLAMA_BENCH:-}
read -r -a ik_args <<< "${KILN_IK_ARGS:--rtr 1}"
# ik_llama.cpp's prompt and decode speeds on one file, as JSON.
ik_run() {
  "$ik" -m "$1" -t 2 -p "$prompt" -n "$decode" -r 1 -o json "${ik_args[@]}" 2>/dev/null | "$python" -c '
import json, sys
out = {}
for r in json.load(sys.stdin):
    if r.get("n_gen", 0) == 0: out["prompt_tokens_per_s"] = r["avg_ts"]
    if r.get("n_prompt", 0) == 0: out["decode_tokens_per_s"] = r["avg_ts"]
print(json.dumps(out))'
}

candle=""
if [ "${KILN_CANDLE:-1}" != 0 ] && [ -f "$peers/candle_bench/Cargo.toml" ]; then
  cargo build --release -q --manifest-path "$peers/candle_bench/Cargo.toml" --target-dir target/candle_bench
  candle=target/candle_bench/release/candle_bench
fi
# The bandwidth is measured before and after each file's runs, and the
# larger counts (the bound is a ceiling): on a shared machine it moves by
# half within one run.
bw=""
if [ -f "$peers/bw.c" ] && gcc -O3 -march=native -ffast-math -fopenmp "$peers/bw.c" -o target/bw 2>/dev/null; then
  bw=target/bw
fi
# Seconds a command takes, as a whole process.
wall() {
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > /dev/null 2>&1
  t1=$(date +%s.%N)
  "$python" -c "print($t1 - $t0)"
}
# 64 tokens over the difference of the shortest 72- and 8-token runs.
# outside RUNS72 RUNS8 TOKENS: TOKENS decoded over the difference of the
# shortest runs. `kiln bench` decodes its --decode-tokens twice (after the
# warm-up and again after its prompt, here 1 token), so kiln's 72 − 8
# processes differ by 128 tokens; llama_bench.py's by 64.
outside() {
  "$python" -c 'import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); d = min(map(float, a)) - min(map(float, b)); print(int(sys.argv[3]) / d if d > 0 else 0)' "$1" "$2" "$3"
}
bandwidth() {
  if [ -n "$bw" ]; then OMP_NUM_THREADS=2 "$bw" 2048 5 | sed -n 's/.*best_GB\/s \([0-9.]*\).*/\1/p'; fi
}

# What ran, above the table: the CPU, the kernels kiln chose (after
# KILN_CPU_ISA), and what each peer was built for (llama.cpp's own
# report; ik_llama.cpp's CMake cache beside its bin/, where it is).
echo "CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
echo "kiln: $("$kiln" doctor 2>/dev/null | sed -n 's/^cpu kernels *//p')"
echo "llama.cpp: $("$python" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode().strip())' 2>/dev/null)"
if [ -n "$ik" ]; then
  cache=$(dirname "$ik")/../CMakeCache.txt
  if [ -f "$cache" ]; then
    echo "ik_llama.cpp: $(grep -E '^GGML_(NATIVE|AVX2|AVXVNNI|AVX512|AVX512_VNNI|AVX512_BF16):' "$cache" | sed 's/:BOOL//' | tr '\n' ' ')"
  else
    echo "ik_llama.cpp: $ik (no CMakeCache.txt beside it to say what it was built for)"
  fi
fi
echo
printf '| file | MiB | decode tok/s kiln / llama.cpp / ik_llama.cpp / candle | kiln ÷ llama.cpp | kiln ÷ faster peer | kiln ÷ candle | decode from outside tok/s kiln / llama.cpp | kiln ÷ llama.cpp | prompt-%d tok/s kiln / llama.cpp / ik_llama.cpp / candle | kiln ÷ llama.cpp | kiln ÷ faster peer | prompt GFLOP/s kiln / llama.cpp | %% of bound kiln / llama.cpp | peak RSS MiB kiln / llama.cpp | load ms kiln / llama.cpp | bandwidth GB/s |\n' "$prompt"
printf '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n'
for m in "${models[@]}"; do
  bw_before=$(bandwidth)
  kr=() lr=() ir=() k72="" k8="" l72="" l8=""
  for _ in $(seq "${KILN_BENCH_RUNS:-3}"); do
    kr+=("$("$kiln" bench "$m" --prompt-tokens "$prompt" --decode-tokens "$decode" --json 2>/dev/null | tr -d '\n')")
    lr+=("$("$python" benches/llama_bench.py "$m" "$prompt" "$decode" | tr -d '\n')")
    k72+=" $(wall "$kiln" bench "$m" --prompt-tokens 1 --decode-tokens 72)"
    l72+=" $(wall "$python" benches/llama_bench.py "$m" 1 72)"
    k8+=" $(wall "$kiln" bench "$m" --prompt-tokens 1 --decode-tokens 8)"
    l8+=" $(wall "$python" benches/llama_bench.py "$m" 1 8)"
    if [ -n "$ik" ]; then ir+=("$(ik_run "$m" || echo '{}')"); fi
  done
  # The best of each engine's runs (peak RSS: the largest; load: the
  # shortest, the file in the page cache).
  best='import json, sys
rs = [json.loads(a) for a in sys.argv[1:]]
b = {k: max(r.get(k) or 0 for r in rs) for k in ("decode_tokens_per_s", "prompt_tokens_per_s", "peak_rss_bytes")}
b["load_ms"] = min(r.get("load_ms") or 0 for r in rs)
print(json.dumps(b))'
  bw_gbs=$("$python" -c 'import sys; print(max([float(v) for v in sys.argv[1:] if v] or [0]))' "$bw_before" "$(bandwidth)")
  k=$("$python" -c "$best" "${kr[@]}")
  l=$("$python" -c "$best" "${lr[@]}")
  i="{}"
  if [ -n "$ik" ]; then i=$("$python" -c "$best" "${ir[@]}"); fi
  c="{}"
  # candle has no fast kernel for Q5_0 or F16 (one Q5_0 run takes minutes).
  ftype=$("$python" -c 'import gguf, sys; f = gguf.GGUFReader(sys.argv[1]).fields["general.file_type"]; print(int(f.parts[-1][0]))' "$m")
  if [ -n "$candle" ] && [ "$ftype" != 8 ] && [ "$ftype" != 1 ]; then
    out=$(RAYON_NUM_THREADS=2 timeout 600 "$candle" "$m" "$decode" 2 "$prompt" 2>/dev/null || true)
    c=$(printf '%s\n' "$out" | "$python" -c '
import json, sys, statistics
d, p = [], []
for line in sys.stdin:
    f = line.split()
    if len(f) > 3 and f[2] == "decode_tok_s": d.append(float(f[3]))
    if len(f) > 3 and f[2] == "prompt_tok_s": p.append(float(f[3]))
print(json.dumps({"decode": max(d) if d else None, "prompt": max(p) if p else None}))')
  fi
  "$python" - "$m" "$k" "$l" "$c" "$i" "${bw_gbs:-0}" "$(outside "$k72" "$k8" 128)" "$(outside "$l72" "$l8" 64)" <<'PY'
import json, os, sys
import gguf
m, k, l, c, i, bw = sys.argv[1], *map(json.loads, sys.argv[2:6]), float(sys.argv[6])
ko, lo = float(sys.argv[7]), float(sys.argv[8])
size = os.path.getsize(m)
r = lambda a, b: f"{a / b:.2f}x" if a and b else "–"
f = lambda v, p=1: f"{v:.{p}f}" if v else "–"
# Bytes read per decoded token: every weight but the token embedding (one row).
tensors = gguf.GGUFReader(m).tensors
embd = sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
# Multiply-adds per prompt token with the layers' weight matrices.
macs = sum(int(t.n_elements) for t in tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
gflops = lambda v: f"{2 * macs * v / 1e9:.0f}" if v else "–"
bound = bw * 1e9 / (size - embd) if bw else None
pct = lambda v: f"{100 * v / bound:.0f}" if bound and v else "–"
kd, ld, cd = k["decode_tokens_per_s"], l["decode_tokens_per_s"], c.get("decode")
kp, lp, cp = k["prompt_tokens_per_s"], l["prompt_tokens_per_s"], c.get("prompt")
idd, ip = i.get("decode_tokens_per_s"), i.get("prompt_tokens_per_s")
peer = lambda a, b: max(a or 0, b or 0)
mib = lambda b: f"{b / 2**20:.0f}" if b else "–"
print(f"| {os.path.basename(m)} | {size / 2**20:.0f} | {f(kd)} / {f(ld)} / {f(idd)} / {f(cd)} | {r(kd, ld)} "
      f"| {r(kd, peer(ld, idd))} | {r(kd, cd)} | {f(ko)} / {f(lo)} | {r(ko, lo)} "
      f"| {f(kp)} / {f(lp)} / {f(ip)} / {f(cp)} | {r(kp, lp)} | {r(kp, peer(lp, ip))} "
      f"| {gflops(kp)} / {gflops(lp)} | {pct(kd)} / {pct(ld)} "
      f"| {mib(k.get('peak_rss_bytes'))} / {mib(l.get('peak_rss_bytes'))} "
      f"| {f(k.get('load_ms'), 0)} / {f(l.get('load_ms'), 0)} | {f(bw)} |")
PY
done
