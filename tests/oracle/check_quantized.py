"""Checks a quantized GGUF against llama.cpp's Python reference quantizers.

usage: check_quantized.py SRC.gguf DST.gguf
For every tensor whose type changed to one the `gguf` package can produce
(F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), re-quantizes the source tensor with
`gguf.quants.quantize` and compares bytes. Prints one JSON object:
{"checked": [...], "mismatched": [...], "unchecked": [[name, type], ...]}.
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFReader, quants

CHECKABLE = {T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def main() -> None:
    src = {t.name: t for t in GGUFReader(sys.argv[1]).tensors}
    out = {"checked": [], "mismatched": [], "unchecked": []}
    for t in GGUFReader(sys.argv[2]).tensors:
        s = src[t.name]
        if s.tensor_type == t.tensor_type:
            if bytes(s.data.tobytes()) != bytes(t.data.tobytes()):
                out["mismatched"].append(t.name)
            continue
        if t.tensor_type not in CHECKABLE:
            out["unchecked"].append([t.name, t.tensor_type.name])
            continue
        shape = [int(x) for x in reversed(s.shape)]
        values = quants.dequantize(s.data, s.tensor_type).reshape(shape).astype(np.float32)
        expected = quants.quantize(values, t.tensor_type)
        if expected.tobytes() == t.data.tobytes():
            out["checked"].append(t.name)
        else:
            out["mismatched"].append(t.name)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
