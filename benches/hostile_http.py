#!/usr/bin/env python3
"""Abandoned and oversized requests against `kiln serve --http`.

    benches/hostile_http.py KILN_BIN MODEL.gguf [--threads N]

1. Three clients each send a ~1,000-token prompt and disconnect after
   0.6 s; a fourth, real request follows. Reports how long the real one
   took and how many prompt tokens the engine evaluated meanwhile
   (`kiln:prompt_tokens_total`), against the abandoned prompts' total.
2. A 4,000,000-byte prompt: time to be refused; then ten at once, with
   `/healthz` timed while they are refused, and the server's resident
   memory before, at its peak, and after.

Standard library only; the server runs on loopback with a throwaway
KILN_HOME.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time


def post(addr, path, body, timeout=600):
    data = json.dumps(body, ensure_ascii=False).encode()
    s = socket.create_connection(addr)
    s.settimeout(timeout)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
    )
    out = b""
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    s.close()
    head, _, rest = out.partition(b"\r\n\r\n")
    return int(head[9:12]), rest.decode(errors="replace")


def get(addr, path):
    s = socket.create_connection(addr)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    out = b""
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    s.close()
    return out.partition(b"\r\n\r\n")[2].decode(errors="replace")


def metric(text, name):
    return sum(
        float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name)
    )


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    kiln, model = sys.argv[1], sys.argv[2]
    threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "2"
    home = tempfile.mkdtemp()
    env = dict(os.environ, KILN_HOME=home, KILN_THREADS=threads)
    srv = subprocess.Popen(
        [kiln, "serve", "--model", model, "--http", "127.0.0.1:0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    while True:
        line = srv.stderr.readline()
        if not line:
            sys.exit("kiln serve ended before listening")
        m = re.search(r"http://([\d.]+):(\d+)", line)
        if m:
            addr = (m.group(1), int(m.group(2)))
            break
    threading.Thread(target=srv.stderr.read, daemon=True).start()
    models = json.loads(get(addr, "/v1/models"))
    name = models["data"][0]["id"]
    try:
        # Warm up (weights paged in, first graph).
        post(addr, "/v1/completions", {"model": name, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0})

        # 1. Abandoned prompts.
        words = ("alpha", "beta", "gamma", "delta", "omega")
        prompt = " ".join(f"{words[i % 5]}_{i}" for i in range(400))
        before = metric(get(addr, "/metrics"), "kiln:prompt_tokens_total")
        socks = []
        for _ in range(3):
            body = json.dumps({"model": name, "prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
            s = socket.create_connection(addr)
            s.sendall(
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            socks.append(s)
            time.sleep(0.2)
        time.sleep(0.2)
        for s in socks:
            s.close()
        t0 = time.time()
        code, text = post(addr, "/v1/completions", {"model": name, "prompt": "x = ", "max_tokens": 8, "temperature": 0})
        real_s = time.time() - t0
        assert code == 200, text
        # Let whatever still runs finish before counting.
        while metric(get(addr, "/metrics"), "kiln:num_requests_running") > 0:
            time.sleep(0.05)
        evaluated = metric(get(addr, "/metrics"), "kiln:prompt_tokens_total") - before
        usage = json.loads(post(addr, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 1})[1])
        one = usage["usage"]["prompt_tokens"]
        print(f"abandoned: 3 prompts of {one} tokens, disconnected within 0.6 s; "
              f"the next request answered in {real_s:.2f} s; "
              f"prompt tokens evaluated meanwhile {evaluated:.0f} (of {3 * one} abandoned + {json.loads(text)['usage']['prompt_tokens']} real)")

        # 2. Oversized prompts.
        big = {"model": name, "prompt": ("fn main() { println!(\"é中😀\"); }\n" * 100_000)[:4_000_000], "max_tokens": 16}
        rss0 = rss_mib(srv.pid)
        t0 = time.time()
        code, text = post(addr, "/v1/completions", big)
        one_s = time.time() - t0
        peak = [rss_mib(srv.pid)]
        results = []
        threads_ = [threading.Thread(target=lambda: results.append(post(addr, "/v1/completions", big)[0])) for _ in range(10)]
        t0 = time.time()
        for t in threads_:
            t.start()
        health = []
        while any(t.is_alive() for t in threads_):
            h0 = time.time()
            get(addr, "/healthz")
            health.append(time.time() - h0)
            peak.append(rss_mib(srv.pid))
            time.sleep(0.05)
        for t in threads_:
            t.join()
        ten_s = time.time() - t0
        time.sleep(1.0)
        print(f"oversized: one 4,000,000-byte prompt refused ({code}) in {one_s:.2f} s; "
              f"ten at once refused ({sorted(set(results))}) in {ten_s:.2f} s, /healthz max {max(health or [0]) * 1e3:.0f} ms; "
              f"RSS {rss0:.0f} MiB before, {max(peak):.0f} MiB peak, {rss_mib(srv.pid):.0f} MiB after")
    finally:
        srv.kill()


if __name__ == "__main__":
    main()
