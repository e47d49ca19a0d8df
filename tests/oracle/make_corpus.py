"""Writes tests/fixtures/tokenizer-corpus.json: code and text snippets for
tokenizer parity (unicode, whitespace runs, digits, special tokens).
Deterministic; every snippet is NFC (Qwen's tokenizer normalizes to NFC,
llama.cpp does not, so non-NFC input would test the normalizer, not kiln).

usage: python3 tests/oracle/make_corpus.py
"""
import json
import pathlib
import unicodedata

CODE = [
    "fn main() {\n    println!(\"Hello, world!\");\n}\n",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "const add = (a, b) => a + b;\nexport default add;",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC LIMIT 10;",
    "#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do wc -l \"$f\"; done\n",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "name: ci\non: [push]\njobs:\n  build:\n    runs-on: ubuntu-latest\n",
    "<div class=\"container\"><p>Paragraph &amp; text</p></div>",
    "impl<T: Clone + Send> Iterator for Foo<T> where T: 'static {\n    type Item = T;\n}",
    "    let mut v: Vec<u8> = Vec::with_capacity(1024);\n",
    "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x, self.y = x, y\n",
    "x=1;y=2;z=x*y+3/4-5%6",
    "if (a && b || !c) { return a ?? b; }",
    "std::vector<std::pair<int, double>> v{{1, 2.5}, {3, 4.75}};",
    "let s = r#\"raw string with \"quotes\"\"#;",
    "# Title\n\n- item one\n- item two\n\n```rust\nfn x() {}\n```\n",
    "public static void main(String[] args) { System.out.println(args.length); }",
    "CamelCaseIdentifier snake_case_identifier SCREAMING_CASE kebab-case-name",
    "// TODO(kiln): handle the edge case where n == 0\n",
    "/* block comment */ int x = 0x1F; float f = 1e-3f;",
    "async function fetchData(url) {\n  const res = await fetch(url);\n  return res.json();\n}",
    "match value {\n    Some(x) if x > 0 => x,\n    _ => 0,\n}",
    "@decorator\ndef wrapped(*args, **kwargs):\n    pass",
    "$ cargo test --workspace -- --nocapture 2>&1 | tee log.txt",
    "git commit -m \"Fix the bug\" && git push origin main",
    "<?php echo $greeting . ' world'; ?>",
    "SELECT COUNT(*) AS n FROM t GROUP BY k HAVING n > 1;",
    "lambda x: [i ** 2 for i in range(x) if i % 2 == 0]",
]

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've done this before, haven't we?",
    "Don't panic. DON'T PANIC. don't panic.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "日本語のテキストを正しく分割できるか確認します。",
    "我们需要测试中文分词是否与参考实现一致。",
    "한국어 문장도 포함되어야 합니다.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم",
    "Emoji: 🦀🔥✨ and a family 👨‍👩‍👧 and flags 🇩🇪🇯🇵",
    "Mathematics: ∀x ∈ ℝ, x² ≥ 0; ∑ᵢ aᵢ ≈ ∫ f(x) dx",
    "Ελληνικά: γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο.",
    "naïve café résumé façade jalapeño",
    "Tabs\tand\tmore\ttabs",
    "Ünïcödé wörds ïn ä ròw",
    "«Quotes» „German“ “English” 'single' ‹angle›",
    "Price: $1,234.56 — or €1.234,56 — or ¥123456",
    "Hello, World! Hello, world! hello world HELLO WORLD",
    "A sentence with a URL: https://example.com/path?query=1&x=y#frag",
    "Email me at someone@example.org or call +1 (555) 010-9999.",
    "Ellipsis… and em—dash and en–dash",
    "Zero-width joiner: a\u200db and non-breaking\u00a0space",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "🙂 Smile 😀 grin 😂 tears",
]

WHITESPACE = [
    "  leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "\n\nnewlines\n\n\nbetween\n",
    "\t\ttabs\t\tinside\t",
    "mixed \t \n \r\n whitespace",
    "     ",
    "\n",
    " ",
    "line1\r\nline2\r\nline3",
    "indent:\n    four\n        eight\n            twelve",
    "x \n y",
]

DIGITS = [
    "0",
    "7",
    "42",
    "123",
    "1234",
    "12345678901234567890",
    "3.14159265358979",
    "1,000,000",
    "2026-11-26T17:02:00Z",
    "v1.2.3-rc.4+build.5",
    "0x7fffffff 0b1010 0o777",
    "-273.15°C",
    "1e10 2E-5 6.02e23",
    "Room 101, floor 12, 3rd door",
    "٠١٢٣٤٥ ١٢٣",
]

SPECIALS = [
    "<s>",
    "</s>",
    "<s> hello </s>",
    "text<s>more</s>text",
    "<|begin_of_text|>Hello<|end_of_text|>",
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return c<|fim_middle|>",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "<unk> unknown",
    "<|fim_pad|><|repo_name|>kiln<|file_sep|>src/main.rs",
]


def main() -> None:
    corpus = []
    corpus += CODE + TEXT + WHITESPACE + DIGITS + SPECIALS
    # Combinations: code with text, numbers in prose, specials around code.
    for i, c in enumerate(CODE):
        corpus.append(TEXT[i % len(TEXT)] + "\n" + c)
        corpus.append(c.replace("    ", "\t"))
    for i, d in enumerate(DIGITS):
        corpus.append(f"Item {d}: {TEXT[i % len(TEXT)]}")
    for i, s in enumerate(SPECIALS):
        corpus.append(s + CODE[i % len(CODE)])
        corpus.append(WHITESPACE[i % len(WHITESPACE)] + s + " " + DIGITS[i % len(DIGITS)])
    for i, t in enumerate(TEXT):
        corpus.append(t.upper())
        corpus.append("  " + t + "  \n")
    for c in corpus:
        assert unicodedata.normalize("NFC", c) == c, repr(c)
    seen, unique = set(), []
    for c in corpus:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    out = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "tokenizer-corpus.json"
    out.write_text(json.dumps(unique, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(unique)} snippets -> {out}")


if __name__ == "__main__":
    main()
