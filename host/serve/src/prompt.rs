//! The one way a completion prompt is made, for the language server and
//! the HTTP API alike: the text before and after the cursor cut to their
//! token budgets (the language server's), the model family's
//! fill-in-the-middle template around context, prefix and suffix, and the
//! tokens of the whole, made once and refused past the context.
//!
//! Budgets count tokens line by line, and the count of each line is kept
//! ([`TokenCounts`]): while a user types, only the line being edited is
//! tokenized for the budget, and the prompt itself once.

use crate::engine::Loaded;
use crate::fim::{RepoFormat, comment_marker};
use kiln_runtime::tokenizer::{EncodeError, Tokenizer};
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

/// Token counts of texts seen (lines, snippets), by their hash, for one
/// model's tokenizer.
#[derive(Default)]
pub struct TokenCounts {
    seen: Mutex<HashMap<u64, u32>>,
}

/// Counts kept before the memo starts over.
const COUNTS_KEPT: usize = 1 << 16;

/// A tokenizer with its memo of counts, and how the model's prompts show
/// a snippet of another file.
pub struct Counter<'a> {
    pub tok: &'a Tokenizer,
    pub memo: &'a TokenCounts,
    pub repo: Option<RepoFormat>,
}

impl<'a> Counter<'a> {
    pub fn of(loaded: &'a Loaded) -> Counter<'a> {
        Counter {
            tok: &loaded.tok,
            memo: &loaded.counts,
            repo: loaded.repo,
        }
    }

    /// A context snippet of the file at `path` as the prompt holds it: a
    /// file of its own in a repository-level prompt, else after a comment
    /// (in the language of `cursor_path`, the edited file) naming its path.
    pub fn snippet(&self, cursor_path: &str, path: &str, text: &str) -> String {
        match self.repo {
            Some(repo) => repo.snippet(path, text),
            None => format!("{} {path}\n{text}\n", comment_marker(cursor_path)),
        }
    }

    /// Tokens of `text` alone (no BOS), tokenized the first time only.
    pub fn count(&self, text: &str) -> usize {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        let key = h.finish();
        if let Some(&n) = self
            .memo
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return n as usize;
        }
        let n = self.tok.encode(text, false).map_or(text.len(), |t| t.len());
        let mut seen = self.memo.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= COUNTS_KEPT {
            seen.clear();
        }
        seen.insert(key, n.min(u32::MAX as usize) as u32);
        n
    }
}

/// The prompt's text ([`fim_tokens`] tokenizes it).
pub fn fim_text(
    loaded: &Loaded,
    context: &str,
    prefix: &str,
    suffix: &str,
    file: Option<(&str, &str)>,
) -> String {
    match (loaded.repo, file) {
        (Some(repo), Some((name, path))) if !context.is_empty() => {
            repo.build(name, path, context, prefix, suffix)
        }
        _ => loaded.fim.build(context, prefix, suffix),
    }
}

/// The prompt's tokens: `context`, `prefix` and `suffix` in the served
/// model's fill-in-the-middle template (the prefix alone when it has
/// none), with the vocabulary's BOS, refused past `limit` tokens after
/// about `limit` tokens' worth of work. With context, a `file` (the
/// repository's name and the edited file's path in it) and a model
/// trained on repository-level prompts, the prompt is one of those.
pub fn fim_tokens(
    loaded: &Loaded,
    context: &str,
    prefix: &str,
    suffix: &str,
    file: Option<(&str, &str)>,
    limit: usize,
) -> Result<Vec<u32>, EncodeError> {
    let text = fim_text(loaded, context, prefix, suffix, file);
    loaded.tok.encode_within(&text, true, limit)
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
pub fn tail_within<'a>(tok: &Counter<'_>, text: &'a str, budget: usize) -> &'a str {
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
            let n = tok.count(&text[piece_start..end]);
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
                    if tok.count(&text[mid..end]) <= room {
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
pub fn head_within<'a>(tok: &Counter<'_>, text: &'a str, budget: usize) -> &'a str {
    let mut end = 0;
    let mut used = 0;
    while end < text.len() {
        let line_end = text[end..].find('\n').map_or(text.len(), |i| end + i + 1);
        let mut at = end;
        let mut line_used = 0;
        while at < line_end {
            let piece_end = ceil_boundary(text, at + PIECE_BYTES).min(line_end);
            line_used += tok.count(&text[at..piece_end]);
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

    fn demo_tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("demo.gguf");
        crate::demo::write_demo_model(&p).unwrap();
        kiln_runtime::model::Model::load(&p)
            .unwrap()
            .tokenizer()
            .unwrap()
    }

    #[test]
    fn budgets_cut_text_at_lines_and_characters_never_inside_one() {
        let tokenizer = demo_tokenizer();
        let memo = TokenCounts::default();
        let tok = Counter {
            tok: &tokenizer,
            memo: &memo,
            repo: None,
        };
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
