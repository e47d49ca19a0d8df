#!/usr/bin/env bash
# Builds the shipped policies to WebAssembly, from source:
#   Rust with Debian's rustc 1.63 for wasm32-unknown-unknown (std, panic=abort),
#   C with clang-16 --target=wasm32 and lld.
# usage: plugins/policies/build.sh [OUT_DIR]   (default: target/policies)
# Needs: apt-get install rustc libstd-rust-dev-wasm32 clang-16 lld-16 (.ci/run does).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/policies}
mkdir -p "$out"
rustc=${KILN_WASM_RUSTC:-/usr/bin/rustc}
clang=${KILN_WASM_CLANG:-clang-16}
flags=(--edition 2021 --target wasm32-unknown-unknown -C opt-level=3 -C panic=abort)
"$rustc" "${flags[@]}" --crate-type rlib --crate-name kiln_policy "$here/sdk/src/lib.rs" -o "$out/libkiln_policy.rlib"
for p in bm25_recency jaccard tpe genetic; do
  "$rustc" "${flags[@]}" -C strip=symbols --crate-type cdylib --crate-name "$p" \
    --extern kiln_policy="$out/libkiln_policy.rlib" "$here/$p/lib.rs" -o "$out/$p.wasm"
done
"$clang" --target=wasm32 -O2 -nostdlib -fuse-ld=lld -Wl,--no-entry -Wl,--strip-debug \
  -I "$here/sdk/include" -o "$out/proximity.wasm" "$here/proximity/proximity.c"
# The SDK examples (plugins/policies/README.md), built so the docs stay true.
"$rustc" "${flags[@]}" -C strip=symbols --crate-type cdylib --crate-name fresh_first \
  --extern kiln_policy="$out/libkiln_policy.rlib" "$here/examples/fresh_first.rs" -o "$out/fresh_first.wasm"
"$rustc" "${flags[@]}" -C strip=symbols --crate-type cdylib --crate-name near \
  --extern kiln_policy="$out/libkiln_policy.rlib" "$here/examples/near.rs" -o "$out/near.wasm"
"$clang" --target=wasm32 -O2 -nostdlib -fuse-ld=lld -Wl,--no-entry -Wl,--strip-debug \
  -I "$here/sdk/include" -o "$out/fresh_first_c.wasm" "$here/examples/fresh_first.c"
ls -l "$out"/*.wasm
