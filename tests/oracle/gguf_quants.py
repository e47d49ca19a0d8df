"""Format oracle for kiln's tests: llama.cpp's own Python quantizers.

usage: gguf_quants.py dequantize TYPE IN OUT   (raw blocks -> little-endian f32)
       gguf_quants.py quantize TYPE IN OUT     (little-endian f32 -> raw blocks)
TYPE is a GGMLQuantizationType name (Q4_0, Q6_K, ...).
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType, quants


def main() -> None:
    op, type_name, src, dst = sys.argv[1:5]
    qtype = GGMLQuantizationType[type_name]
    if op == "dequantize":
        raw = np.fromfile(src, dtype=np.uint8)
        out = quants.dequantize(raw, qtype).astype("<f4")
    elif op == "quantize":
        values = np.fromfile(src, dtype="<f4")
        out = quants.quantize(values.reshape(1, -1), qtype)
    else:
        raise SystemExit(f"unknown op {op}")
    out.tofile(dst)


if __name__ == "__main__":
    main()
