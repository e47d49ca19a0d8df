//! Secrets removed from code before it is tokenized: private keys, cloud
//! and service tokens by their published shapes, passwords in URLs, and
//! quoted values assigned to names that say they are secret
//! (`password`, `api_key`, `client_secret`…). Each is replaced by
//! [`REDACTED`], so an example keeps its shape and the model learns that
//! a secret goes there, never which.

use regex::Regex;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// What a secret becomes.
pub const REDACTED: &str = "REDACTED";

/// A kind of secret and its pattern; the capture group `s` (or the whole
/// match where there is none) is what is replaced.
struct Pattern {
    kind: &'static str,
    re: Regex,
}

fn patterns() -> &'static [Pattern] {
    static PATTERNS: OnceLock<Vec<Pattern>> = OnceLock::new();
    PATTERNS.get_or_init(|| {
        let p = |kind, re: &str| Pattern {
            kind,
            re: Regex::new(re).expect("the secret patterns compile"),
        };
        vec![
            p(
                "private_key",
                r"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----(?s:(?<s>.*?))-----END ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----",
            ),
            p(
                "aws_access_key",
                r"\b(?<s>(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16})\b",
            ),
            p(
                "github_token",
                r"\b(?<s>(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}))\b",
            ),
            p("gitlab_token", r"\b(?<s>glpat-[A-Za-z0-9_\-]{20,})"),
            p("slack_token", r"\b(?<s>xox[abposr]-[A-Za-z0-9-]{10,})"),
            p(
                "slack_webhook",
                r"(?<s>https://hooks\.slack\.com/services/[A-Za-z0-9/_]+)",
            ),
            p("google_api_key", r"\b(?<s>AIza[0-9A-Za-z_\-]{35})"),
            p(
                "stripe_key",
                r"\b(?<s>(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,})",
            ),
            p("openai_key", r"\b(?<s>sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,})"),
            p(
                "jwt",
                r"\b(?<s>eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,})",
            ),
            p(
                "url_password",
                r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]+:(?<s>[^/\s:@]{3,})@",
            ),
            // A quoted value of 8 characters or more assigned to a name that
            // says it is secret: `password = "…"`, `"api_key": "…"`,
            // `API_TOKEN='…'`, `client_secret: "…"`.
            p(
                "assigned_secret",
                r#"(?i)\b[A-Za-z0-9_\-]*(?:password|passwd|pwd|secret|token|api_?key|access_?key|private_?key|auth_?key|credentials?)(?:[_\-][A-Za-z0-9_\-]*)?["']?\s*(?::=|=|:|=>)\s*["'`](?<s>[^"'`\s]{8,})["'`]"#,
            ),
            // The same in shell-like and `.env`-like lines, unquoted.
            p(
                "env_secret",
                r"(?m)^\s*(?:export\s+)?[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH_?KEY|CREDENTIALS?)(?:_[A-Z0-9_]*)?\s*=\s*(?<s>[^\s$\x22'`#]{8,})",
            ),
        ]
    })
}

/// Whether a value assigned to a secret's name looks like one: not a
/// name (an environment variable's, a metric's, a path), and with a digit,
/// or long with both cases.
fn secret_like(v: &str) -> bool {
    let name = v
        .chars()
        .all(|c| c.is_ascii_lowercase() || "_-:/.".contains(c))
        || v.chars().all(|c| c.is_ascii_uppercase() || c == '_');
    let digit = v.chars().any(|c| c.is_ascii_digit());
    let letter = v.chars().any(|c| c.is_alphabetic());
    let cases = v.chars().any(|c| c.is_uppercase()) && v.chars().any(|c| c.is_lowercase());
    !name && (digit && letter || cases && v.len() >= 16 || digit && v.len() >= 16)
}

/// [`secret_like`] for an unquoted value, which may be code
/// (`TOKEN = token.ERRORTOKEN`): also no attribute access or call.
fn env_secret_like(v: &str) -> bool {
    secret_like(v) && !v.contains(['.', '(', ')', '[', ','])
}

/// `text` with every secret found replaced, and how many of each kind.
pub fn redact(text: &str) -> (String, BTreeMap<&'static str, usize>) {
    let mut out = text.to_string();
    let mut found = BTreeMap::new();
    for p in patterns() {
        let mut count = 0;
        let replaced = p.re.replace_all(&out, |c: &regex::Captures| {
            let whole = c.get(0).expect("a match");
            let Some(s) = c.name("s") else {
                count += 1;
                return REDACTED.to_string();
            };
            if s.as_str().contains(REDACTED)
                || (p.kind == "assigned_secret" && !secret_like(s.as_str()))
                || (p.kind == "env_secret" && !env_secret_like(s.as_str()))
            {
                return whole.as_str().to_string();
            }
            count += 1;
            let (from, to) = (s.start() - whole.start(), s.end() - whole.start());
            let w = whole.as_str();
            let body = if p.kind == "private_key" {
                format!("\n{REDACTED}\n")
            } else {
                REDACTED.to_string()
            };
            format!("{}{body}{}", &w[..from], &w[to..])
        });
        if count > 0 {
            out = replaced.into_owned();
            *found.entry(p.kind).or_insert(0) += count;
        }
    }
    (out, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Secrets of each shape, as code holds them. Assembled at run time so
    /// this file's own text trips no scanner.
    pub fn planted() -> Vec<(&'static str, String)> {
        let k = |a: &str, b: &str| format!("{a}{b}");
        vec![
            ("aws_access_key", k("AKIA", "IOSFODNN7EXAMPLQ")),
            (
                "github_token",
                k("ghp_", "wWPw5k4aXcaT4fNP0UcnZwJUVFk6LO0pINUx"),
            ),
            ("gitlab_token", k("glpat-", "xXyYzZ0123456789abcd")),
            ("slack_token", k("xoxb-", "2402390-11234532-ZmVvY2g")),
            (
                "google_api_key",
                k("AIza", "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"),
            ),
            ("stripe_key", k("sk_live_", "4eC39HqLyjWDarjtT1zdp7dc")),
            ("openai_key", k("sk-proj-", "Zr4JkX9mQ2pLw8Tn5vYb1Hc7")),
            (
                "jwt",
                k(
                    "eyJhbGciOiJIUzI1NiJ9.",
                    "eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                ),
            ),
        ]
    }

    #[test]
    fn every_planted_shape_is_redacted_and_counted() {
        for (kind, secret) in planted() {
            let text = format!("fn f() {{\n    let x = call(\"{secret}\");\n}}\n");
            let (out, found) = redact(&text);
            assert!(!out.contains(&secret), "{kind}: {out}");
            assert_eq!(found.get(kind), Some(&1), "{kind}: {found:?}");
            assert!(out.contains(&format!("call(\"{REDACTED}\")")), "{out}");
        }
    }

    #[test]
    fn keys_passwords_and_assignments_are_redacted() {
        let key = format!(
            "const KEY: &str = \"-----BEGIN {}PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQ\nEFAASCBKcwggSjAgEAAoIBAQ\n-----END {}PRIVATE KEY-----\";\n",
            "RSA ", "RSA "
        );
        let (out, found) = redact(&key);
        assert!(!out.contains("MIIEvQ") && !out.contains("EFAASC"), "{out}");
        assert_eq!(found.get("private_key"), Some(&1));
        let cases = [
            ("db_password = \"hunter2hunter2\"", "hunter2hunter2"),
            ("\"api_key\": \"0123456789abcdef\"", "0123456789abcdef"),
            ("self.client_secret = 'zq8PLm2vXt'", "zq8PLm2vXt"),
            (
                "export GITHUB_TOKEN=abcdef0123456789abcd\n",
                "abcdef0123456789abcd",
            ),
            ("DATABASE_PASSWORD=s3cr3t-value\n", "s3cr3t-value"),
            (
                "url = \"postgres://admin:Tr0ub4dor@db.local/app\"",
                "Tr0ub4dor",
            ),
            ("AUTH_TOKEN: `9f8e7d6c5b4a`", "9f8e7d6c5b4a"),
        ];
        for (text, secret) in cases {
            let (out, _) = redact(text);
            assert!(!out.contains(secret), "{text} -> {out}");
        }
    }

    #[test]
    fn ordinary_code_is_left_alone() {
        let code = "fn token_count(tokens: &[u32]) -> usize {\n    let password_len = 8;\n    tokens.len() + password_len\n}\nlet key = map.get(\"name\");\nlet secret = read_secret(path)?;\ntokenizer = \"gpt2-tokenizer\"\nmax_tokens: \"unlimited-by-default\"\ntoken: var(\"HF_TOKEN\"),\nlet msg = json!({\"token\": \"kiln/load\"});\n\"inter_token_ms\": latency(\"kiln:inter_token_latency_seconds\")\n    ERRORTOKEN = token.ERRORTOKEN\n";
        let (out, found) = redact(code);
        assert_eq!(out, code, "{found:?}");
        // Redacting twice changes nothing more.
        let (once, _) = redact("password = \"correct9horse\"\napi_key = \"0123456789abcdef\"");
        let (twice, again) = redact(&once);
        assert_eq!(once, twice);
        assert!(again.is_empty(), "{again:?}");
    }
}
