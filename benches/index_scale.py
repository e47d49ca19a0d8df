#!/usr/bin/env python3
"""The workspace index at scale: builds (or reuses) a repository of N real
source files with benches/gen_large_repo.py, then runs `kiln context` on
it twice with a fresh KILN_HOME (cold: every file parsed and persisted;
warm: the persisted index loaded) and prints, for each run, the files,
chunks and definitions indexed, the index's own memory (`memory_bytes`),
the time to build or load it, and the process's anonymous memory once the
index is built and its peak resident memory, each against the same command
on a one-file workspace (the model's tokenizer and mapped weights, which
are not the index).

usage: benches/index_scale.py MODEL.gguf [--files N] [--repo DIR] [--kiln BIN]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(kiln, home, workspace, file, model):
    """One `kiln context` run: its JSON, wall seconds and peak RSS (bytes)."""
    cmd = [kiln, "context", "--workspace", workspace, "--file", file, "--line", "0",
           "--character", "0", "--model", model, "--json"]
    env = dict(os.environ, KILN_HOME=home)
    t0 = time.monotonic()
    # Each run in a child of its own, so RUSAGE_CHILDREN's peak is its.
    pid = os.fork()
    if pid == 0:
        out = os.open(os.path.join(home, "out.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.execvpe(cmd[0], cmd, env)
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    if status != 0:
        sys.exit(f"index_scale: {' '.join(cmd)} failed ({status})")
    with open(os.path.join(home, "out.json")) as f:
        return json.load(f), wall, usage.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--repo", default=None, help="default: /tmp/kiln-index-scale-N")
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    a = ap.parse_args()
    repo = a.repo or f"/tmp/kiln-index-scale-{a.files}"
    if not os.path.isdir(repo):
        subprocess.run([sys.executable, os.path.join(ROOT, "benches/gen_large_repo.py"), repo,
                        "--files", str(a.files)], check=True)
    first = None
    for dirpath, dirnames, filenames in os.walk(repo):
        dirnames.sort()
        rs = sorted(f for f in filenames if f.endswith((".rs", ".py", ".c", ".h")))
        if rs:
            first = os.path.join(dirpath, rs[0])
            break
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as one:
        with open(os.path.join(one, "a.py"), "w") as f:
            f.write("def a():\n    return 1\n")
        b, _, base_rss = run(a.kiln, home, one, "a.py", a.model)
        base_anon = b["process"]["anonymous_memory_bytes"] or 0
        mib = lambda x: x / 2**20
        print(f"{'run':6} {'files':>7} {'chunks':>9} {'defs':>9} {'index MiB':>10} "
              f"{'build/load s':>12} {'wall s':>7} {'anon after MiB':>14} {'peak RSS MiB':>12}")
        for name in ["cold", "warm"]:
            v, wall, rss = run(a.kiln, home, repo, first, a.model)
            w = v["workspace"]
            anon = v["process"]["anonymous_memory_bytes"] or 0
            print(f"{name:6} {w['files']:7} {w['chunks']:9} {w['definitions']:9} "
                  f"{mib(w['memory_bytes']):10.1f} {w['index']['seconds']:12.2f} {wall:7.2f} "
                  f"{mib(anon - base_anon):14.1f} {mib(rss - base_rss):12.1f}")
    print(f"(memory columns less a one-file workspace's run: anonymous {mib(base_anon):.1f} MiB after, "
          f"peak {mib(base_rss):.1f} MiB, the model's tokenizer and mapped weights)")


if __name__ == "__main__":
    main()
