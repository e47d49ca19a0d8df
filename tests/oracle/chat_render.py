"""Renders chat templates as llama.cpp's Python bindings do
(llama-cpp-python's Jinja2ChatFormatter: transformers' environment and
filters), the oracle of tests/tests/chat_templates.rs.

usage: chat_render.py CASES.json
CASES.json: [{"template", "messages", "tools" (or null), "bos", "eos"}]
Prints [{"prompt": text} or {"error": message}, ...] in the same order.
"""
import json
import sys

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

cases = json.load(open(sys.argv[1], encoding="utf-8"))
out = []
for c in cases:
    try:
        fmt = Jinja2ChatFormatter(c["template"], eos_token=c["eos"], bos_token=c["bos"])
        kwargs = {"tools": c["tools"]} if c.get("tools") is not None else {}
        out.append({"prompt": fmt(messages=c["messages"], **kwargs).prompt})
    except Exception as e:  # the template's own refusal or a failure: both are answers
        out.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(out, ensure_ascii=False))
