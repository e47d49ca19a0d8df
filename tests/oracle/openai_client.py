"""The `openai` package's client against `kiln serve --http`: a completion
with fill-in-the-middle, the same request streamed, a chat completion, the
model list and an unknown model. Prints one JSON object for the Rust test.

usage: openai_client.py BASE_URL
"""
import json
import sys

import openai


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    args = dict(model=model, prompt="def add(a, b):\n    return", suffix="\n", max_tokens=12,
                temperature=0, seed=7)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, **args))
    stream_text = "".join(c.choices[0].text for c in chunks)
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write hello world"}], max_tokens=6,
        temperature=0)
    chat_chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Write hello world"}], max_tokens=6,
        temperature=0, stream=True))
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        not_found = None
    except openai.NotFoundError as e:
        not_found = e.status_code
    print(json.dumps({
        "model": model,
        "text": whole.choices[0].text,
        "finish_reason": whole.choices[0].finish_reason,
        "usage": whole.usage.total_tokens,
        "stream_chunks": len(chunks),
        "stream_text": stream_text,
        "chat": chat.choices[0].message.content,
        "chat_stream": "".join(c.choices[0].delta.content or "" for c in chat_chunks),
        "not_found_status": not_found,
    }))


if __name__ == "__main__":
    main()
