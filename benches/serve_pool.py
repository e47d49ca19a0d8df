#!/usr/bin/env python3
"""Inline-completion latency of `kiln serve --http` while a chat streams.

Runs the server on MODEL (the first model, which the inline completions
use) and measures COUNT inline completions (`/v1/completions`, greedy,
`--max-tokens` each, every prompt different so that no answer comes from
a cache): first alone, then while chats stream without pause
(`/v1/chat/completions`, 400 tokens each) on the same model (the chat is
paused for each completion) and, with `--chat-model`, on a second model
routed `kind = "chat"` (its own engine thread beside the first; a file
other than MODEL, and with a chat template). Prints
p50/p99 end-to-end latency per phase, the pauses, and the memory the
loaded models need against the pool's budget, as JSON.

    python3 benches/serve_pool.py target/release/kiln MODEL [--chat-model M2] [--count 40]
        [--parallel-models true|false] [--threads-per-model N]

`--threads-per-model N` gives each model N CPU threads of its own
(`[models.NAME] threads`); without it they share the process's pool.
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


def post(addr, path, body, stream=False):
    req = urllib.request.Request(
        f"http://{addr}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        if stream:
            for _ in r:
                pass
            return None
        return json.load(r)


def get(addr, path):
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=60) as r:
        return r.read().decode()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
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


def inline_latencies(addr, count, max_tokens, offset):
    out = []
    for i in range(count):
        prompt = PROMPTS[i % len(PROMPTS)].format(i=i + offset)
        t = time.perf_counter()
        post(addr, "/v1/completions",
             {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        out.append((time.perf_counter() - t) * 1e3)
    return out


def chat_loop(addr, model, stop):
    n = 0
    while not stop.is_set():
        body = {"messages": [{"role": "user", "content": f"Tell a long story, part {n}."}],
                "max_tokens": 400, "temperature": 0, "stream": True}
        if model:
            body["model"] = model
        post(addr, "/v1/chat/completions", body, stream=True)
        n += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kiln")
    ap.add_argument("model")
    ap.add_argument("--chat-model")
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--parallel-models", choices=["true", "false"],
                    help="[pool] parallel_models (default: kiln's, by the CPU threads)")
    ap.add_argument("--threads-per-model", type=int,
                    help="[models.NAME] threads for each model (default: the shared pool)")
    a = ap.parse_args()

    home = tempfile.mkdtemp(prefix="kiln-pool-bench-")
    with open(os.path.join(home, "config.toml"), "w") as f:
        if a.parallel_models:
            f.write(f"[pool]\nparallel_models = {a.parallel_models}\n\n")
        threads = f"threads = {a.threads_per_model}\n" if a.threads_per_model else ""
        if a.threads_per_model:
            # The first model answers to this name, and takes its threads.
            f.write(f'[models.inline]\nmodel = {json.dumps(a.model)}\n{threads}\n')
        if a.chat_model:
            f.write(f'[models.chat]\nmodel = {json.dumps(a.chat_model)}\n{threads}\n'
                    '[[routes]]\nkind = "chat"\nmodels = ["chat"]\n')
    env = dict(os.environ, KILN_HOME=home)
    srv = subprocess.Popen([a.kiln, "serve", "--model", a.model, "--http", "127.0.0.1:0"],
                           env=env, stderr=subprocess.PIPE, text=True)
    addr = None
    for line in srv.stderr:
        m = re.search(r"http://(127\.0\.0\.1:\d+)", line)
        if m:
            addr = m.group(1)
            break
    threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()
    try:
        # Warm-up: the first graphs, and the chat model loaded.
        inline_latencies(addr, 4, a.max_tokens, 10_000)
        result = {"model": a.model, "chat_model": a.chat_model, "count": a.count,
                  "parallel_models": a.parallel_models,
                  "max_tokens": a.max_tokens, "threads": os.environ.get("KILN_THREADS"),
                  "threads_per_model": a.threads_per_model}
        alone = inline_latencies(addr, a.count, a.max_tokens, 0)
        result["alone"] = {"p50_ms": pct(alone, 50), "p99_ms": pct(alone, 99)}
        first = ("inline" if a.threads_per_model
                 else os.path.splitext(os.path.basename(a.model))[0])
        phases = [("with_chat_same_model", first)]
        if a.chat_model:
            phases.append(("with_chat_other_model", "chat"))
        for name, chat_model in phases:
            paused_before = metric(get(addr, "/metrics"), "kiln:requests_paused_total")
            stop = threading.Event()
            t = threading.Thread(target=chat_loop, args=(addr, chat_model, stop), daemon=True)
            t.start()
            time.sleep(1.0)
            lat = inline_latencies(addr, a.count, a.max_tokens, 1000 * (len(result)))
            stop.set()
            t.join()
            paused = metric(get(addr, "/metrics"), "kiln:requests_paused_total") - paused_before
            result[name] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "chat_pauses": paused}
        m = get(addr, "/metrics")
        result["pool_memory_mib"] = metric(m, "kiln:pool_memory_bytes") / 2**20
        result["pool_budget_mib"] = metric(m, "kiln:pool_budget_bytes") / 2**20
        with open(f"/proc/{srv.pid}/status") as f:
            rss = next(l for l in f if l.startswith("VmRSS:"))
        result["process_rss_mib"] = int(rss.split()[1]) / 1024
        json.dump(result, sys.stdout, indent=2)
        print()
    finally:
        srv.terminate()
        srv.wait()


if __name__ == "__main__":
    main()
