//! Chat prompts: a model's chat template (the GGUF's
//! `tokenizer.chat_template`, Jinja as Hugging Face writes them) applied
//! to OpenAI-style messages, rendered as `transformers` and llama.cpp's
//! Python bindings render them: blocks trimmed (`trim_blocks`,
//! `lstrip_blocks`), Python's string and dict methods (`.strip()`,
//! `.items()`, …), `tojson` as Python's `json.dumps` writes (no ASCII or
//! HTML escaping, `", "` and `": "` separators), `raise_exception`,
//! `strftime_now`, and `{% generation %}` markers ignored.
//!
//! `tests/tests/chat_templates.rs` renders the templates llama.cpp keeps
//! from released models with kiln and with llama-cpp-python's
//! `Jinja2ChatFormatter` and requires the same text.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use std::fmt::Write;

/// Why a chat prompt could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template itself is broken (the model's fault).
    #[error("the model's chat template does not parse: {0}")]
    Parse(String),
    /// The template refused these messages (`raise_exception`) or failed
    /// on them (the request's fault, usually).
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// What a template sees besides the messages.
pub struct ChatInputs<'a> {
    /// OpenAI's `messages`: objects with `role` and `content`.
    pub messages: &'a serde_json::Value,
    /// OpenAI's `tools`, when the request has them.
    pub tools: Option<&'a serde_json::Value>,
    pub bos_token: &'a str,
    pub eos_token: &'a str,
    pub add_generation_prompt: bool,
}

/// Renders `template` for `inputs`.
pub fn render(template: &str, inputs: &ChatInputs<'_>) -> Result<String, ChatError> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Bounded work: a template is data from a model file.
    env.set_fuel(Some(5_000_000));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| -> Result<String, Error> {
        let now = jiff::Zoned::now();
        jiff::fmt::strtime::format(format.as_str(), &now)
            .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
    });
    env.add_filter("tojson", tojson);
    // Python's `iterable`: None is not, an undefined value is (it
    // iterates as empty), as are strings, lists and dicts.
    env.add_test("iterable", |v: Value| {
        v.is_undefined()
            || matches!(
                v.kind(),
                ValueKind::String | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
            )
    });
    // `string` as Python's `str()`: a list or dict as Python writes it.
    env.add_filter("string", |v: Value| -> Value {
        match v.kind() {
            ValueKind::Seq | ValueKind::Map => {
                let mut s = String::new();
                python_repr(&v, &mut s);
                Value::from(s)
            }
            ValueKind::String => v,
            _ => Value::from(v.to_string()),
        }
    });
    // A list or dict printed as Python prints it (`{'a': 1}`), not JSON.
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_repr(value, &mut s);
            out.write_str(&s).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    });
    let source = without_generation_tags(template);
    let tmpl = env
        .template_from_str(&source)
        .map_err(|e| ChatError::Parse(describe(&e)))?;
    tmpl.render(minijinja::context! {
        messages => Value::from_serialize(inputs.messages),
        tools => inputs.tools.map(Value::from_serialize),
        add_generation_prompt => inputs.add_generation_prompt,
        bos_token => inputs.bos_token,
        eos_token => inputs.eos_token,
    })
    .map_err(|e| ChatError::Render(describe(&e)))
}

/// An error with its cause chain (minijinja's `Display` leaves the
/// template's own message in the detail).
fn describe(e: &Error) -> String {
    let mut s = match e.detail() {
        Some(detail) if e.kind() == ErrorKind::InvalidOperation => detail.to_string(),
        _ => e.to_string(),
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = write!(s, ": {cause}");
        source = cause.source();
    }
    s
}

/// The template with `{% generation %}` / `{% endgeneration %}`
/// (transformers' markers of the assistant's text, which print nothing)
/// as `{% if true %}` / `{% endif %}`: blocks of the same whitespace
/// control.
fn without_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("{%") {
        let Some(end) = rest[at..].find("%}").map(|e| at + e + 2) else {
            break;
        };
        let inner = &rest[at + 2..end - 2];
        let (left, right) = (inner.starts_with('-'), inner.ends_with('-'));
        let word = inner.trim_matches(|c: char| c == '-' || c.is_whitespace());
        let replacement = match word {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..at]);
        match replacement {
            Some(r) => {
                let dash = |d: bool| if d { "-" } else { "" };
                let _ = write!(out, "{{%{} {r} {}%}}", dash(left), dash(right));
            }
            None => out.push_str(&rest[at..end]),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// `tojson` as transformers defines it: Python's
/// `json.dumps(x, ensure_ascii=…, indent=indent, separators=…,
/// sort_keys=…)`, `ensure_ascii` False unless the template asks.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_usize() {
            Some(n) => " ".repeat(n),
            None => v.to_string(),
        }),
        None => None,
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item, key) = match separators {
        Some(v) if v.len() == Some(2) => (
            v.get_item_by_index(0)?.to_string(),
            v.get_item_by_index(1)?.to_string(),
        ),
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    let style = Style {
        indent: indent.as_deref(),
        item: &item,
        key: &key,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    dump(&json, &style, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct Style<'a> {
    indent: Option<&'a str>,
    item: &'a str,
    key: &'a str,
    sort_keys: bool,
    /// Non-ASCII characters as `\uXXXX` escapes (UTF-16, as Python).
    ensure_ascii: bool,
}

/// Python's `json.dumps` of `v` at nesting `depth`.
fn dump(v: &serde_json::Value, style: &Style<'_>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(unit) = style.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(unit);
            }
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => {
                let _ = write!(out, "{i}");
            }
            (_, Some(u), _) => {
                let _ = write!(out, "{u}");
            }
            (_, _, Some(f)) => out.push_str(&python_float(f)),
            _ => out.push_str("null"),
        },
        J::String(s) => quote(s, style.ensure_ascii, out),
        J::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(style.item);
                }
                newline(out, depth + 1);
                dump(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(style.item);
                }
                newline(out, depth + 1);
                quote(k, style.ensure_ascii, out);
                out.push_str(style.key);
                dump(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

/// A JSON string as Python's `json.dumps` writes it (`ascii`:
/// `ensure_ascii=True`).
fn quote(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ascii && !c.is_ascii() => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr` of a value from JSON (what `str()` of a list or dict
/// gives).
fn python_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => match f64::try_from(v.clone()) {
            Ok(f) if !v.is_integer() => out.push_str(&python_float(f)),
            _ => {
                let _ = write!(out, "{v}");
            }
        },
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            let q = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            out.push(q);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == q => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push(q);
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = v.try_iter() {
                for (i, k) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&k, out);
                    out.push_str(": ");
                    python_repr(&v.get_item(&k).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => {
            out.push('[');
            if let Ok(items) = v.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    python_repr(&item, out);
                }
            }
            out.push(']');
        }
    }
}

/// Python's `repr` of a float, as `json.dumps` writes it.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's shortest round-trip digits, in Python's notation: an
    // exponent from 1e16 up and below 1e-4, else a plain decimal with at
    // least one fractional digit.
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        return format!(
            "{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        );
    }
    let s = format!("{f}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inputs(messages: &serde_json::Value) -> ChatInputs<'_> {
        ChatInputs {
            messages,
            tools: None,
            bos_token: "<s>",
            eos_token: "</s>",
            add_generation_prompt: true,
        }
    }

    #[test]
    fn blocks_are_trimmed_as_transformers_trims_them() {
        let t = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}";
        let msgs = json!([{"role": "user", "content": "  hi "}]);
        assert_eq!(render(t, &inputs(&msgs)).unwrap(), "[hi]\n");
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let t = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}";
        // Keys in the request's order, as Python keeps them.
        let msgs: serde_json::Value = serde_json::from_str(
            r#"[{"role": "user", "content": "<é\"\n>", "n": 1.5, "k": [1, 2]}]"#,
        )
        .unwrap();
        let out = render(t, &inputs(&msgs)).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"<é\\\"\\n>\", \"n\": 1.5, \"k\": [1, 2]}|{\n  \"role\": \"user\",\n  \"content\": \"<é\\\"\\n>\",\n  \"n\": 1.5,\n  \"k\": [\n    1,\n    2\n  ]\n}"
        );
        // ensure_ascii=True: UTF-16 escapes, surrogate pairs past the BMP.
        let msgs = json!([{"content": "é✓😀"}]);
        let t = "{{ messages[0] | tojson(ensure_ascii=True) }}";
        assert_eq!(
            render(t, &inputs(&msgs)).unwrap(),
            "{\"content\": \"\\u00e9\\u2713\\ud83d\\ude00\"}"
        );
        assert_eq!(python_float(1e20), "1e+20");
        assert_eq!(python_float(2.5e-7), "2.5e-07");
        assert_eq!(python_float(3.0), "3.0");
    }

    #[test]
    fn raise_exception_is_a_render_error_with_the_templates_words() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}";
        let msgs = json!([{"role": "assistant", "content": "x"}]);
        let e = render(t, &inputs(&msgs)).unwrap_err();
        assert!(matches!(e, ChatError::Render(_)), "{e}");
        assert!(e.to_string().contains("must start with the user"), "{e}");
        assert!(matches!(
            render("{% if %}", &inputs(&msgs)),
            Err(ChatError::Parse(_))
        ));
    }

    #[test]
    fn generation_markers_print_nothing() {
        let t = "{% for m in messages %}{%- generation -%}{{ m.content }}{% endgeneration %}{% endfor %}";
        let msgs = json!([{"role": "assistant", "content": "ok"}]);
        assert_eq!(render(t, &inputs(&msgs)).unwrap(), "ok");
    }

    #[test]
    fn a_runaway_template_stops() {
        let t = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let msgs = json!([]);
        assert!(matches!(
            render(t, &inputs(&msgs)),
            Err(ChatError::Render(_))
        ));
    }
}
