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

/// Lines by which the start of a cut prefix moves: while the user types
/// further down a file longer than the prefix budget, the prompt keeps its
/// start (and the KV cache its prefix) for this many lines, instead of
/// moving it, and evaluating the whole prompt again, at every new line.
pub const PREFIX_START_LINES: usize = 16;

/// The text before and after byte `at` of `text`, cut to the settings'
/// token budgets (no suffix for a model without fill-in-the-middle). A
/// prefix cut by its budget starts at a line whose number is a multiple of
/// [`PREFIX_START_LINES`] (when one is before the cursor's line).
pub fn cut<'a>(loaded: &Loaded, text: &'a str, at: usize, s: &Settings) -> (&'a str, &'a str) {
    let counter = Counter::of(loaded);
    let (prefix_all, suffix_all) = text.split_at(at);
    let prefix = stable_start(
        prefix_all,
        tail_within(&counter, prefix_all, s.prefix_tokens),
    );
    let suffix = if loaded.fim.uses_suffix() {
        head_within(&counter, suffix_all, s.suffix_tokens)
    } else {
        ""
    };
    (prefix, suffix)
}

/// `tail` (a tail of `text` starting at a line) moved on to the next line
/// whose number is a multiple of [`PREFIX_START_LINES`], if that line starts
/// before the last line of `text`; `tail` itself when it is all of `text`.
fn stable_start<'a>(text: &'a str, tail: &'a str) -> &'a str {
    let start = text.len() - tail.len();
    if start == 0 || !text[..start].ends_with('\n') {
        return tail;
    }
    let line = text[..start].matches('\n').count();
    let skip = (PREFIX_START_LINES - line % PREFIX_START_LINES) % PREFIX_START_LINES;
    let cursor_line = text.rfind('\n').map_or(0, |i| i + 1);
    let mut at = start;
    for _ in 0..skip {
        match text[at..].find('\n') {
            Some(i) if at + i < cursor_line => at += i + 1,
            _ => return tail,
        }
    }
    &text[at..]
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
    /// The completion shown last on the cursor's line, when the selection
    /// used it as its second query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_query: Option<String>,
    pub prefix_tokens: usize,
    pub suffix_tokens: usize,
    /// The whole prompt as the model reads it, and its exact token count
    /// (with the vocabulary's BOS).
    pub prompt: String,
    pub prompt_tokens: usize,
    /// Where the text before the cursor is in `prompt` (bytes), if there
    /// is any.
    #[serde(skip)]
    pub prefix_range: Option<std::ops::Range<usize>>,
    /// Where the context block is in `prompt` (bytes), if there is one:
    /// each snippet's block is at its [`Snippet::block`] from its start.
    #[serde(skip)]
    pub context_start: Option<usize>,
}

/// Where a completion is asked for: a document and the byte offset of the
/// cursor in it.
pub struct At<'a> {
    pub path: &'a str,
    pub text: &'a str,
    pub offset: usize,
    /// The completion shown last on the cursor's line (the selection's
    /// second query), as the language server has it.
    pub last_completion: Option<&'a str>,
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
    let settings = &settings.within(limit);
    let (prefix, suffix) = cut(loaded, at.text, at.offset, settings);
    let counter = Counter::of(loaded);
    let budget = settings.context_tokens;
    let select_at = context::SelectAt {
        path: at.path,
        prefix,
        suffix,
        last_completion: at.last_completion,
    };
    let packed = context::select_with(
        ws,
        open,
        &select_at,
        ranker,
        &counter,
        budget,
        context::Selection::Kiln,
    );
    let repo = ws.repo_name();
    let tokens = prompt::fim_tokens(
        loaded,
        &packed.text,
        prefix,
        suffix,
        repo.as_deref().map(|r| (r, at.path)),
        limit,
    )
    .map_err(|e| format!("{e}; lower the budgets (--budget) or raise --ctx"))?;
    Ok(assemble(
        loaded,
        Parts {
            path: at.path.to_string(),
            repo,
            packed,
            context_budget: budget,
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
            second_query: at.last_completion.map(str::to_string),
            prompt_tokens: tokens.len(),
        },
    ))
}

/// What a prompt was made of: what [`assemble`] lays open. The language
/// server keeps this for each inline completion it serves, so that
/// `kiln/explain` can explain that very completion by its id.
#[derive(Clone, Debug)]
pub struct Parts {
    /// The file, relative to the workspace.
    pub path: String,
    /// The repository's name, where the prompt format names it.
    pub repo: Option<String>,
    pub packed: context::Packed,
    pub context_budget: usize,
    pub prefix: String,
    pub suffix: String,
    pub second_query: Option<String>,
    /// The prompt's exact token count, as cut to its limit.
    pub prompt_tokens: usize,
}

/// The [`Preview`] of a prompt made of `parts` for `loaded`'s format.
pub fn assemble(loaded: &Loaded, parts: Parts) -> Preview {
    let counter = Counter::of(loaded);
    let Parts {
        path,
        repo,
        packed,
        context_budget,
        prefix,
        suffix,
        second_query,
        prompt_tokens,
    } = parts;
    let file = repo.as_deref().map(|r| (r, path.as_str()));
    let text = prompt::fim_text(loaded, &packed.text, &prefix, &suffix, file);
    Preview {
        model: loaded.id.clone(),
        fim_template: loaded.fim.name(),
        ranked_by: packed.ranked_by,
        context_budget,
        context_tokens: packed.tokens,
        snippets: packed.snippets,
        second_query,
        prefix_tokens: counter.count(&prefix),
        suffix_tokens: counter.count(&suffix),
        prefix_range: (!prefix.is_empty())
            .then(|| text.rfind(&prefix))
            .flatten()
            .map(|at| at..at + prefix.len()),
        // Every format puts the block before the prefix, as it is.
        context_start: (!packed.text.is_empty())
            .then(|| text.find(&packed.text))
            .flatten(),
        prompt: text,
        prompt_tokens,
        file: path,
    }
}

#[cfg(test)]
mod tests {
    use super::{PREFIX_START_LINES, stable_start};

    #[test]
    fn a_cut_prefix_starts_at_every_sixteenth_line_so_typing_keeps_it() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect::<String>() + "cur";
        let line_start = |n: usize| -> usize {
            text.match_indices('\n')
                .nth(n - 1)
                .map_or(0, |(i, _)| i + 1)
        };
        // A budget cut at lines 33..=48 starts at line 48; at 49, at 64.
        for first in 33..=48 {
            let s = stable_start(&text, &text[line_start(first)..]);
            assert!(s.starts_with("line 48\n"), "{first}: {}", &s[..10]);
        }
        let s = stable_start(&text, &text[line_start(49)..]);
        assert!(s.starts_with("line 64\n"));
        assert_eq!(PREFIX_START_LINES, 16);
        // Never past the cursor's line; the whole text stays whole.
        let s = stable_start(&text, &text[line_start(97)..]);
        assert!(s.starts_with("line 97\n"), "{s}");
        assert_eq!(stable_start(&text, &text), text);
        // A tail inside the cursor's line (it alone is over budget) stays.
        assert_eq!(stable_start(&text, &text[text.len() - 2..]), "ur");
    }
}
