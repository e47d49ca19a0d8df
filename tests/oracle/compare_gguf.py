"""Compares two GGUF files tensor by tensor and key by key.

usage: compare_gguf.py A.gguf B.gguf
Prints one JSON object: tensors whose type, shape or bytes differ (with the
first differing block), and
metadata keys whose values differ or exist on one side only.
"""
import json
import sys

from gguf import GGML_QUANT_SIZES, GGUFReader


def fields(r):
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = [bytes(p.tobytes()) for p in f.parts]
    return out


a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
ta = {t.name: t for t in a.tensors}
tb = {t.name: t for t in b.tensors}
diff = []
for name in sorted(set(ta) | set(tb)):
    x, y = ta.get(name), tb.get(name)
    if x is None or y is None:
        diff.append([name, "missing on one side"])
    elif x.tensor_type != y.tensor_type:
        diff.append([name, f"type {x.tensor_type.name} vs {y.tensor_type.name}"])
    elif list(x.shape) != list(y.shape):
        diff.append([name, "shape"])
    elif x.data.tobytes() != y.data.tobytes():
        # Name the first differing block, so a mismatch points at the data.
        bx, by = x.data.tobytes(), y.data.tobytes()
        at = next(i for i in range(min(len(bx), len(by))) if bx[i] != by[i]) if len(bx) == len(by) else 0
        _, block_bytes = GGML_QUANT_SIZES[x.tensor_type]
        diff.append([name, f"bytes ({x.tensor_type.name}): first at byte {at}, block {at // block_bytes}"])
fa, fb = fields(a), fields(b)
keys = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
print(json.dumps({"tensor_differences": diff, "metadata_differences": keys, "tensors": len(ta)}))
