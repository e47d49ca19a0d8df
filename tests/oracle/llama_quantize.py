"""Quantizes a GGUF with llama.cpp itself (llama-cpp-python), for comparison.

usage: llama_quantize.py SRC.gguf DST.gguf TYPE [--allow-requantize]
TYPE: q4_0 q4_1 q5_0 q5_1 q8_0 f16 bf16 q2_k q2_k_s q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m
      q5_k_s q5_k_m q6_k iq4_nl iq4_xs
"""
import ctypes
import sys

import llama_cpp

FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "q2_k_s": "LLAMA_FTYPE_MOSTLY_Q2_K_S",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}

src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, FTYPES[kind])
params.nthread = 2
params.allow_requantize = "--allow-requantize" in sys.argv[4:]
if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
    sys.exit("llama.cpp quantize failed")
