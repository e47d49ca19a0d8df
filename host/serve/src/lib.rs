//! kiln as an IDE service (`kiln serve`): a language server on stdio
//! ([`lsp`]) or an OpenAI-compatible HTTP API ([`http`]), both in front of
//! one [`engine`] that owns the model's KV cache. Built on `kiln-runtime`
//! (models, backends, policies) and `kiln-registry` (state); the only
//! crate with the async runtime, the HTTP stack and the metrics.
//!
//! - [`start`]: the model, device, engine and ranking policy a service runs;
//! - [`engine`]: the job queue, prefix reuse, the completion cache, cancellation;
//! - [`fim`]: fill-in-the-middle templates per model family;
//! - [`context`]: workspace snippets, ranked and packed into a token budget;
//! - [`decisions`]: ranking decisions logged for replay, breaker trips persisted;
//! - [`metrics`]: Prometheus counters and histograms;
//! - [`demo`]: the model `kiln demo` generates, and the scripted typing session.

pub mod context;
pub mod decisions;
pub mod demo;
pub mod engine;
pub mod fim;
pub mod http;
pub mod lsp;
pub mod metrics;
pub mod start;

use kiln_runtime::model::generate::Boundary;
use kiln_runtime::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

/// How long a completion may run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Single line inside a line, a block at an empty line or after an
    /// opening bracket or colon.
    #[default]
    Auto,
    Line,
    Block,
    /// No boundary: only stop tokens and `maxTokens` end a completion.
    None,
}

/// Completion settings: `kiln serve` flags, or the LSP client's
/// `initializationOptions` / `workspace/didChangeConfiguration` (camelCase
/// keys, see docs/lsp.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    pub max_tokens: usize,
    /// Token budget of the text before the cursor.
    pub prefix_tokens: usize,
    /// Token budget of the text after the cursor (FIM models only).
    pub suffix_tokens: usize,
    /// Token budget of snippets from other files.
    pub context_tokens: usize,
    pub mode: Mode,
    /// Overrides the template detected from the model (`codellama`,
    /// `qwen`, `deepseek`, `starcoder`, `none`).
    pub fim_template: Option<String>,
    pub temperature: f32,
    /// Index the workspace for context snippets.
    pub workspace_context: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            max_tokens: 64,
            prefix_tokens: 1024,
            suffix_tokens: 256,
            context_tokens: 512,
            mode: Mode::Auto,
            fim_template: None,
            temperature: 0.0,
            workspace_context: true,
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens == 0 || self.max_tokens > 4096 {
            return Err(format!(
                "maxTokens must be between 1 and 4096, not {}",
                self.max_tokens
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(format!(
                "temperature must be between 0 and 2, not {}",
                self.temperature
            ));
        }
        if let Some(t) = &self.fim_template {
            fim::FimTemplate::parse(t)?;
        }
        Ok(())
    }
}

/// The boundary for a completion at `prefix`|`suffix` in `mode`.
pub fn boundary(mode: Mode, prefix: &str, suffix: &str) -> Boundary {
    match mode {
        Mode::Line => Boundary::Line,
        Mode::Block => Boundary::Block,
        Mode::None => Boundary::None,
        Mode::Auto => {
            let line_before = prefix.rsplit('\n').next().unwrap_or("");
            let line_after = suffix.split('\n').next().unwrap_or("");
            let before = line_before.trim_end();
            if !line_after.trim().is_empty() {
                Boundary::Line
            } else if before.trim().is_empty() || before.ends_with(['{', '(', '[', ':']) {
                Boundary::Block
            } else {
                Boundary::Line
            }
        }
    }
}

fn count(tok: &Tokenizer, text: &str) -> usize {
    tok.encode(text, false).map_or(text.len(), |t| t.len())
}

/// Lines are counted in pieces of at most this many bytes, so that a huge
/// line (minified code, a data blob) costs what fits the budget, not its
/// length.
const PIECE_BYTES: usize = 1024;

/// The largest character boundary of `text` at or below `at`.
fn floor_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The smallest character boundary of `text` at or above `at`.
fn ceil_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// The longest tail of `text` that starts at a line and fits `budget`
/// tokens. The cursor's own line (after the last line break) is kept in
/// part when it alone is over the budget.
pub fn tail_within<'a>(tok: &Tokenizer, text: &'a str, budget: usize) -> &'a str {
    let cursor_line = text.rfind('\n').map_or(0, |i| i + 1);
    let mut start = text.len();
    let mut used = 0;
    while start > 0 {
        // The line that ends at `start` (with its own line break).
        let line_start = if start > cursor_line {
            cursor_line
        } else {
            text[..start - 1].rfind('\n').map_or(0, |i| i + 1)
        };
        let mut end = start;
        let mut line_used = 0;
        while end > line_start {
            let piece_start = floor_boundary(text, end.saturating_sub(PIECE_BYTES)).max(line_start);
            let n = count(tok, &text[piece_start..end]);
            if used + line_used + n > budget {
                if line_start != cursor_line {
                    return &text[start..];
                }
                // Keep as much of the cursor's line as fits: the shortest
                // piece start found by bisection.
                let room = budget - line_used;
                let (mut fits, mut over) = (end, piece_start);
                loop {
                    let mid = ceil_boundary(text, over + (fits - over).div_ceil(2));
                    if mid >= fits {
                        break;
                    }
                    if count(tok, &text[mid..end]) <= room {
                        fits = mid;
                    } else {
                        over = mid;
                    }
                }
                return &text[fits..];
            }
            line_used += n;
            end = piece_start;
        }
        used += line_used;
        start = line_start;
    }
    text
}

/// The longest head of `text` that ends at a line and fits `budget` tokens.
pub fn head_within<'a>(tok: &Tokenizer, text: &'a str, budget: usize) -> &'a str {
    let mut end = 0;
    let mut used = 0;
    while end < text.len() {
        let line_end = text[end..].find('\n').map_or(text.len(), |i| end + i + 1);
        let mut at = end;
        let mut line_used = 0;
        while at < line_end {
            let piece_end = ceil_boundary(text, at + PIECE_BYTES).min(line_end);
            line_used += count(tok, &text[at..piece_end]);
            if used + line_used > budget {
                return &text[..end];
            }
            at = piece_end;
        }
        used += line_used;
        end = line_end;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_mode_picks_line_or_block() {
        assert_eq!(boundary(Mode::Auto, "let x = ", ";\n"), Boundary::Line);
        assert_eq!(boundary(Mode::Auto, "fn f() {", "\n}"), Boundary::Block);
        assert_eq!(
            boundary(Mode::Auto, "fn f() {\n    ", "\n}"),
            Boundary::Block
        );
        assert_eq!(boundary(Mode::Auto, "    let y = f", "\n"), Boundary::Line);
        assert_eq!(boundary(Mode::Auto, "def f():", ""), Boundary::Block);
        assert_eq!(boundary(Mode::Line, "", ""), Boundary::Line);
    }

    fn demo_tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("demo.gguf");
        demo::write_demo_model(&p).unwrap();
        kiln_runtime::model::Model::load(&p)
            .unwrap()
            .tokenizer()
            .unwrap()
    }

    #[test]
    fn budgets_cut_text_at_lines_and_characters_never_inside_one() {
        let tok = demo_tokenizer();
        let texts = [
            "é = 1",
            "a = 'é'\nb = '中文'\nc = '😀'\n",
            "x\n😀😀😀\ne\u{301}\u{301}",
            "\n\n",
            "",
        ];
        for text in texts {
            for budget in 0..40 {
                for cut in 0..=text.len() {
                    if !text.is_char_boundary(cut) {
                        continue;
                    }
                    let (before, after) = text.split_at(cut);
                    let tail = tail_within(&tok, before, budget);
                    let head = head_within(&tok, after, budget);
                    assert!(before.ends_with(tail) && after.starts_with(head));
                    assert!(head.is_empty() || head.len() == after.len() || head.ends_with('\n'));
                    if tail.len() < before.len()
                        && !before[..before.len() - tail.len()].ends_with('\n')
                    {
                        // Only the cursor's line may be cut inside.
                        assert!(!tail.contains('\n'), "{before:?} {budget} {tail:?}");
                        assert!(
                            !tail.is_empty() || budget < 6,
                            "{before:?} {budget}: a character is at most 4 byte tokens and a prefix space"
                        );
                    }
                }
            }
        }
        // A 4 MB line costs the budget, not its length.
        let huge = "é".repeat(2 << 20);
        let t0 = std::time::Instant::now();
        let tail = tail_within(&tok, &huge, 64);
        let head = head_within(&tok, &huge, 64);
        assert!(!tail.is_empty() && tail.len() < 4096, "{}", tail.len());
        assert!(head.is_empty());
        assert!(t0.elapsed() < std::time::Duration::from_secs(20));
    }
}
