#!/usr/bin/env bash
# Builds ik_llama.cpp's llama-bench, the second peer of
# benches/model_vs_llama.sh (KILN_IK_LLAMA_BENCH=OUT/bin/llama-bench).
#
# usage: benches/build_ik_llama.sh SRC OUT [native|avx2|avxvnni]
#   SRC: a checkout of https://github.com/ikawrakow/ik_llama.cpp
#   avx2: built for AVX2/FMA/F16C alone (AVX-512 off), the peer of
#         KILN_CPU_ISA=avx2 on an AVX-512 machine; avxvnni: the same with
#         AVX-VNNI, the peer of KILN_CPU_ISA=avxvnni; native (the default):
#         for the CPU at hand.
# Needs cmake and GCC 12 or newer (the default; clang 16 crashes on its
# iqk_gemm_floats.cpp, clang 14 does not compile its kernels; CC/CXX
# choose another compiler). Its CPU flash-attention kernels are built for
# F16/Q8_0 caches only (with them off its sources do not link: the
# stubs it compiles instead lack C linkage); the bench runs without flash
# attention. About 7 minutes on 2 cores.
set -euo pipefail
src=$1 out=$2 isa=${3:-native}
cc=${CC:-gcc} cxx=${CXX:-g++}
flags=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx"
  -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
  -DGGML_IQK_FLASH_ATTENTION=ON -DGGML_IQK_FA_ALL_QUANTS=OFF)
x86=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF)
case $isa in
  native) flags+=(-DGGML_NATIVE=ON) ;;
  avx2) flags+=("${x86[@]}" -DGGML_AVXVNNI=OFF) ;;
  avxvnni) flags+=("${x86[@]}" -DGGML_AVXVNNI=ON) ;;
  *) echo "usage: $0 SRC OUT [native|avx2|avxvnni]" >&2; exit 2 ;;
esac
cmake -S "$src" -B "$out" "${flags[@]}"
cmake --build "$out" --target llama-bench -j "$(nproc)"
echo "built $out/bin/llama-bench"
