//! kiln as an IDE service (`kiln serve`): a language server on stdio
//! ([`lsp`]) or an OpenAI-compatible HTTP API ([`http`]), both in front of
//! one [`engine`] that owns the model's KV cache. Built on `kiln-runtime`
//! (models, backends, policies) and `kiln-registry` (state); the only
//! crate with the async runtime, the HTTP stack and the metrics.
//!
//! - [`start`]: the model, device, engine and ranking policy a service runs;
//! - [`engine`]: the job queue, prefix reuse, the completion cache, cancellation;
//! - [`pool`]: the models served, their memory budget, routes, health and fallback;
//! - [`fim`]: fill-in-the-middle templates per model family;
//! - [`context`]: workspace snippets, ranked and packed into a token budget;
//! - [`decisions`]: ranking decisions logged for replay, breaker trips persisted;
//! - [`prompt`]: the one way a completion prompt is made: budgets, template, tokens;
//! - [`metrics`]: Prometheus counters and histograms;
//! - [`demo`]: the model `kiln demo` generates, and the scripted typing session.

pub mod ab;
pub mod chat;
pub mod context;
pub mod ctxbench;
pub mod dashboard;
pub mod decisions;
pub mod demo;
pub mod engine;
pub mod fim;
pub mod http;
pub mod imports;
pub mod index_cache;
pub mod lsp;
pub mod metrics;
pub mod pack;
pub mod pool;
pub mod preview;
pub mod prompt;
pub mod scrub;
pub mod start;
pub mod symbols;
mod terms;

use kiln_runtime::model::generate::Boundary;
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
    /// Speculative decoding of greedy completions (`none`, `ngram`, or
    /// `model`: `kiln serve --draft MODEL`'s draft model); the HTTP API
    /// takes `kiln serve --draft`'s.
    pub draft: kiln_runtime::model::generate::Draft,
    /// Tokens `draft` guesses at most per verifying batch.
    pub draft_max: usize,
    /// Milliseconds an automatic inline completion waits before it
    /// starts: a keystroke within them cancels it unstarted (0: none).
    pub debounce_ms: u64,
    /// The unit A/B experiments assign an arm to (a user or machine id
    /// the editor keeps); default: the workspace root.
    pub ab_unit: Option<String>,
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
            draft: kiln_runtime::model::generate::Draft::None,
            draft_max: kiln_runtime::model::generate::DRAFT_MAX,
            debounce_ms: 0,
            ab_unit: None,
        }
    }
}

/// Tokens of a prompt kept for what the budgets do not count: the
/// template's markers, the repository's and file's names, and the seams
/// where the parts join.
pub const PROMPT_OVERHEAD_TOKENS: usize = 64;

/// The longest debounce a client may ask for, in milliseconds.
pub const MAX_DEBOUNCE_MS: u64 = kiln_registry::config::MAX_DEBOUNCE_MS as u64;

impl Settings {
    /// These settings with the prompt's budgets (prefix, suffix, context)
    /// scaled down in proportion so that a prompt fits `window` tokens
    /// (the context window less the completion's tokens); as they are when
    /// they fit. Budgets larger than the model's window would otherwise
    /// fail every completion.
    pub fn within(&self, window: usize) -> Settings {
        let room = window.saturating_sub(PROMPT_OVERHEAD_TOKENS).max(1);
        let sum = self.prefix_tokens + self.suffix_tokens + self.context_tokens;
        if sum <= room {
            return self.clone();
        }
        let scaled = |b: usize| (b as u128 * room as u128 / sum as u128) as usize;
        Settings {
            prefix_tokens: scaled(self.prefix_tokens).max(1),
            suffix_tokens: scaled(self.suffix_tokens),
            context_tokens: scaled(self.context_tokens),
            ..self.clone()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.debounce_ms > MAX_DEBOUNCE_MS {
            return Err(format!(
                "debounceMs must be between 0 and {MAX_DEBOUNCE_MS}, not {}",
                self.debounce_ms
            ));
        }
        let limit = kiln_runtime::model::generate::DRAFT_MAX_LIMIT;
        if self.draft_max == 0 || self.draft_max > limit {
            return Err(format!(
                "draftMax must be between 1 and {limit}, not {}",
                self.draft_max
            ));
        }
        let most = kiln_registry::config::MAX_COMPLETION_TOKENS;
        if self.max_tokens == 0 || self.max_tokens > most {
            return Err(format!(
                "maxTokens must be between 1 and {most}, not {}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_past_the_window_shrink_in_proportion() {
        let s = Settings {
            prefix_tokens: 3000,
            suffix_tokens: 1000,
            context_tokens: 2000,
            ..Settings::default()
        };
        assert_eq!(s.within(8192).prefix_tokens, 3000, "it fits");
        let w = s.within(3064);
        assert_eq!(
            (w.prefix_tokens, w.suffix_tokens, w.context_tokens),
            (1500, 500, 1000)
        );
        assert!(
            w.prefix_tokens + w.suffix_tokens + w.context_tokens + PROMPT_OVERHEAD_TOKENS <= 3064
        );
        // A window too small for anything keeps a token of prefix.
        assert_eq!(s.within(10).prefix_tokens, 1);
    }

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
}
