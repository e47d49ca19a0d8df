#!/usr/bin/env python3
"""Throughput and latency of `kiln serve --http` under concurrent clients,
decoding one request at a time against decoding them together.

For each `[engine] decode_batch` given (default 1, then 4) a fresh server
on MODEL serves CLIENTS clients at once, each sending ROUNDS completions
(`/v1/completions`, greedy, `--max-tokens` each, every prompt different
so that no answer comes from a cache) one after the other. Prints, per
setting, the generated tokens per second of all clients together, the
p50/p99 end-to-end latency of a completion, the requests decoded
together (`kiln:batched_requests_total`), the process's resident memory,
and the throughput of each setting over the first's, as JSON.

    python3 benches/serve_batch.py target/release/kiln MODEL [--clients 4] [--rounds 4]
        [--max-tokens 64] [--decode-batch 1,4]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def post(addr, body):
    req = urllib.request.Request(
        f"http://{addr}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def get(addr, path):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=60) as r:
        return r.read().decode()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def pct(values, p):
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


PROMPTS = [
    "def parse_{i}(text):\n    ",
    "fn handle_{i}(req: &Request) -> Response {{\n    ",
    "class Cache{i}:\n    def __init__(self):\n        ",
    "// sum of the first {i} squares\nint sum_{i}() {{\n    ",
]


def serve(kiln, model, decode_batch):
    home = tempfile.mkdtemp(prefix="kiln-batch-bench-")
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f"[engine]\ndecode_batch = {decode_batch}\n")
    env = dict(os.environ, KILN_HOME=home)
    srv = subprocess.Popen([kiln, "serve", "--model", model, "--http", "127.0.0.1:0"],
                           env=env, stderr=subprocess.PIPE, text=True)
    for line in srv.stderr:
        m = re.search(r"http://(127\.0\.0\.1:\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()
            return srv, m.group(1)
    raise SystemExit("kiln serve ended before it listened")


def run(a, decode_batch):
    srv, addr = serve(a.kiln, a.model, decode_batch)
    try:
        # Warm-up: the first graphs and sessions.
        for i in range(2):
            post(addr, {"prompt": f"x{i} = ", "max_tokens": 4, "temperature": 0})
        latencies, tokens = [], []
        lock = threading.Lock()

        def client(c):
            for r in range(a.rounds):
                prompt = PROMPTS[(c + r) % len(PROMPTS)].format(i=1000 * c + r)
                t = time.perf_counter()
                v = post(addr, {"prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0})
                ms = (time.perf_counter() - t) * 1e3
                with lock:
                    latencies.append(ms)
                    tokens.append(v["usage"]["completion_tokens"])

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        m = get(addr, "/metrics")
        with open(f"/proc/{srv.pid}/status") as f:
            rss = next(l for l in f if l.startswith("VmRSS:"))
        return {
            "decode_batch": decode_batch,
            "tokens": sum(tokens),
            "wall_s": wall,
            "tokens_per_s": sum(tokens) / wall,
            "p50_ms": pct(latencies, 50),
            "p99_ms": pct(latencies, 99),
            "batched_requests": metric(m, "kiln:batched_requests_total"),
            "process_rss_mib": int(rss.split()[1]) / 1024,
        }
    finally:
        srv.terminate()
        srv.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("model")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--decode-batch", default="1,4")
    a = ap.parse_args()
    runs = [run(a, int(b)) for b in a.decode_batch.split(",")]
    for r in runs[1:]:
        r["tokens_per_s_over_first"] = r["tokens_per_s"] / runs[0]["tokens_per_s"]
    json.dump({"model": a.model, "clients": a.clients, "rounds": a.rounds,
               "max_tokens": a.max_tokens, "threads": os.environ.get("KILN_THREADS"),
               "runs": runs}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
