//! What a completion at a position sends to the model: the text around the
//! cursor cut to its budgets, the context snippets chosen for it (each with
//! its exact tokens, score and why), and the whole prompt with its exact
//! token count. The language server cuts its prompts through [`cut`];
//! `kiln context` and the `kiln/context` request show them ([`preview`]).

use crate::Settings;
use crate::context::{self, OpenDoc, Snippet, Workspace};
use crate::engine::Loaded;
use crate::prompt::{self, Counter, head_within, tail_within};
use kiln_sandbox::breaker::Ranker;
use serde::Serialize;

/// The text before and after byte `at` of `text`, cut to the settings'
/// token budgets (no suffix for a model without fill-in-the-middle).
pub fn cut<'a>(loaded: &Loaded, text: &'a str, at: usize, s: &Settings) -> (&'a str, &'a str) {
    let counter = Counter::of(loaded);
    let (prefix_all, suffix_all) = text.split_at(at);
    let prefix = tail_within(&counter, prefix_all, s.prefix_tokens);
    let suffix = if loaded.fim.uses_suffix() {
        head_within(&counter, suffix_all, s.suffix_tokens)
    } else {
        ""
    };
    (prefix, suffix)
}

/// A completion's prompt, laid open.
#[derive(Debug, Serialize)]
pub struct Preview {
    /// The file the cursor is in, relative to the workspace.
    pub file: String,
    pub model: String,
    pub fim_template: &'static str,
    /// `builtin` or `policy` (with why, when a policy failed).
    pub ranked_by: String,
    /// Tokens the context block may take, and what it took.
    pub context_budget: usize,
    pub context_tokens: usize,
    /// In the order they appear in the prompt.
    pub snippets: Vec<Snippet>,
    pub prefix_tokens: usize,
    pub suffix_tokens: usize,
    /// The whole prompt as the model reads it, and its exact token count
    /// (with the vocabulary's BOS).
    pub prompt: String,
    pub prompt_tokens: usize,
}

/// Where a completion is asked for: a document and the byte offset of the
/// cursor in it.
pub struct At<'a> {
    pub path: &'a str,
    pub text: &'a str,
    pub offset: usize,
}

/// The prompt a completion at `at` would send, its context chosen from
/// `ws` and the `open` documents by `ranker`, refused past `limit` tokens.
pub fn preview(
    loaded: &Loaded,
    ws: &Workspace,
    open: &[OpenDoc<'_>],
    at: &At<'_>,
    settings: &Settings,
    ranker: &Ranker,
    limit: usize,
) -> Result<Preview, String> {
    let (prefix, suffix) = cut(loaded, at.text, at.offset, settings);
    let counter = Counter::of(loaded);
    let budget = settings.context_tokens;
    let packed = context::select(ws, open, at.path, prefix, suffix, ranker, &counter, budget);
    let repo = ws.repo_name();
    let file = repo.as_deref().map(|r| (r, at.path));
    let tokens = prompt::fim_tokens(loaded, &packed.text, prefix, suffix, file, limit)
        .map_err(|e| format!("{e}; lower the budgets (--budget) or raise --ctx"))?;
    Ok(Preview {
        file: at.path.to_string(),
        model: loaded.id.clone(),
        fim_template: loaded.fim.name(),
        ranked_by: packed.ranked_by,
        context_budget: budget,
        context_tokens: packed.tokens,
        snippets: packed.snippets,
        prefix_tokens: counter.count(prefix),
        suffix_tokens: counter.count(suffix),
        prompt: prompt::fim_text(loaded, &packed.text, prefix, suffix, file),
        prompt_tokens: tokens.len(),
    })
}
