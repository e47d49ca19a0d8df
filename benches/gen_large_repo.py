#!/usr/bin/env python3
"""Builds a large repository for the index scale bench from real source
files already on this machine (the cargo registry's crates, the C headers
under /usr/include, Python's standard library, npm's global packages, or
any folders named with --from).

usage: benches/gen_large_repo.py OUT [--files N] [--from DIR ...]

The distinct files found are taken once as they are; past them, copies
follow in folders of their own (m01/, m02/, ...) in which about half of the
compound identifiers (those with an underscore or a capital after the first
letter, at least 4 characters, not starting with `_`) carry the copy's
suffix, so the repository's vocabulary grows with it as a monorepo's does
rather than repeating (keywords are lower-case single words and stay as
they are, so every file still parses). Deterministic: the same sources and
N give the same tree.
"""

import argparse
import os
import re
import sys
import zlib

EXTS = {
    "rs", "py", "js", "ts", "tsx", "jsx", "go", "c", "h", "cc", "cpp", "hpp", "java", "kt",
}
MAX_BYTES = 512 * 1024
COMPOUND = re.compile(r"\b[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9_]*|[a-z0-9][A-Z][A-Za-z0-9_]*)\b")


def default_sources():
    home = os.path.expanduser("~")
    found = [os.path.join(home, ".cargo/registry/src")]
    found += ["/usr/include", "/usr/lib/python3", "/usr/lib/python3.11", "/usr/lib/node_modules"]
    return [d for d in found if os.path.isdir(d)]


def sources(dirs):
    """(label, relative path, text) of every distinct code file."""
    seen = set()
    for d in dirs:
        label = re.sub(r"[^A-Za-z0-9]+", "_", d.strip("/"))[-40:]
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            dirnames[:] = [n for n in dirnames if not n.startswith(".")]
            for name in sorted(filenames):
                if name.rsplit(".", 1)[-1] not in EXTS:
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.path.getsize(path) > MAX_BYTES or os.path.islink(path):
                        continue
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError):
                    continue
                key = zlib.crc32(text.encode())
                if key in seen:
                    continue
                seen.add(key)
                yield label, os.path.relpath(path, d), text


def renamed(text, copy):
    def sub(m):
        w = m.group(0)
        if len(w) < 4 or zlib.crc32(f"{copy}:{w}".encode()) & 1:
            return w
        return f"{w}_m{copy}"

    return COMPOUND.sub(sub, text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--from", dest="dirs", action="append")
    a = ap.parse_args()
    files = list(sources(a.dirs or default_sources()))
    if not files:
        sys.exit("gen_large_repo: no source files found; name folders with --from")
    written = 0
    copy = 0
    while written < a.files:
        for label, rel, text in files:
            if written >= a.files:
                break
            folder = label if copy == 0 else os.path.join(f"m{copy:02}", label)
            path = os.path.join(a.out, folder, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text if copy == 0 else renamed(text, copy))
            written += 1
        copy += 1
    print(f"{written} files ({len(files)} distinct, {copy} passes) under {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
