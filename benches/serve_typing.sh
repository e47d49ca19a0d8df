#!/usr/bin/env bash
# A scripted typing session through `kiln serve` over LSP (stdio), as an
# editor drives it: KEYSTROKES characters typed into a Python file, one
# textDocument/inlineCompletion request after each (the client waits for
# each answer). Prints time to first token and end-to-end latency (p50,
# p99), the share of prompt tokens reused from the KV cache, completion-
# cache hits, and the server's resident memory beyond the mapped weights.
#
# usage: benches/serve_typing.sh MODEL.gguf [KEYSTROKES] [MAX_TOKENS]
# (defaults: 200 keystrokes, 16 tokens per completion)
set -euo pipefail
model=${1:?usage: benches/serve_typing.sh MODEL.gguf [KEYSTROKES]}
keys=${2:-200}
max_tokens=${3:-16}
cd "$(dirname "$0")/.."
cargo build --release -q -p kiln
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
KILN_HOME=$home target/release/kiln demo --model "$model" --keystrokes "$keys" --max-tokens "$max_tokens" --json >"$home/report.json"
python3 - "$home/report.json" "$model" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))["report"]
size = os.path.getsize(sys.argv[2]) / 2**20
print(f"model {r['model']} ({size:.0f} MiB file) on {r['backend']}, {r['requests']} keystroke requests")
print(f"  time to first token   p50 {r['ttft_ms_p50']:8.1f} ms   p99 {r['ttft_ms_p99']:8.1f} ms")
print(f"  end to end (client)   p50 {r['e2e_ms_p50']:8.1f} ms   p99 {r['e2e_ms_p99']:8.1f} ms")
print(f"  prompt tokens reused from the KV cache: {100 * r['prefix_cache_hit_rate']:.1f}%")
print(f"  requests answered from the completion cache: {100 * r['completion_cache_hit_rate']:.1f}%")
anon, filemem = r.get("server_anonymous_memory_mib"), r.get("server_file_backed_memory_mib")
if anon is not None:
    print(f"  server memory beyond the mapped weights (RssAnon): {anon:.1f} MiB; weights paged in (RssFile): {filemem:.1f} MiB")
PY
