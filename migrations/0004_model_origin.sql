-- Where a model version came from when `kiln models import` found it in
-- another tool's store (Hugging Face cache, Ollama, LM Studio), and what
-- that tool kept beside it: Ollama's prompt template and parameters.

ALTER TABLE models ADD COLUMN origin TEXT;          -- e.g. ollama:registry.ollama.ai/library/qwen2.5-coder:0.5b
ALTER TABLE models ADD COLUMN chat_template TEXT;   -- Ollama's template layer, as text
ALTER TABLE models ADD COLUMN params TEXT;          -- Ollama's params layer (JSON)
