//! Why a completion came out as it did: leave-one-out attribution over
//! the prompt's parts, and the counterfactual completion without the part
//! that mattered most.
//!
//! The measure is the log-probability of the completion's tokens after
//! the prompt: each part (a block between blank lines, or a span the
//! caller names) is removed in turn and the completion scored again; the
//! drop is the part's importance. Removing a part changes only the tokens
//! after it, so the KV cache is kept up to it and only the rest is
//! evaluated again. Within a token budget the most important blocks are
//! then split into lines and those measured too, and the most important
//! lines into spans (words, numbers, runs of punctuation): hierarchical,
//! files or blocks first, then lines, then spans. Greedy decoding and a
//! fixed order make the result deterministic.
//!
//! Beside it, where asked, the attention map: for each layer and head,
//! how much attention the queries that predict the completion pay to each
//! of the prompt's tokens (their attention probabilities, averaged over
//! those queries), recorded from the model's own softmax in one more pass
//! over the completion.

use super::ModelError;
use super::forward::LogitsFor;
use super::generate::{Request, generate, log_prob};
use super::sample::SamplingParams;
use super::session::Session;
use crate::tokenizer::Tokenizer;
use serde::Serialize;

/// A part of the prompt text, by byte range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Part {
    pub start: usize,
    pub end: usize,
    /// `block` or `line`, or the caller's name for it.
    pub kind: String,
    /// Its first line, for people.
    pub label: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Attribution {
    #[serde(flatten)]
    pub part: Part,
    /// Log-probability of the completion with the part, less without it:
    /// how much the part made the completion more likely (nats; negative:
    /// it made it less likely).
    pub importance: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Counterfactual {
    /// The part left out.
    pub removed: Part,
    pub completion: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub completion: String,
    pub completion_tokens: usize,
    /// Log-probability of the completion after the whole prompt (nats).
    pub logprob: f64,
    /// The blocks (or the caller's parts), most important first.
    pub parts: Vec<Attribution>,
    /// The lines of the most important blocks, most important first.
    pub lines: Vec<Attribution>,
    /// The spans of the most important lines (words, numbers, runs of
    /// punctuation), most important first.
    pub spans: Vec<Attribution>,
    pub counterfactual: Option<Counterfactual>,
    /// Tokens evaluated for the attribution, against the budget.
    pub evaluated_tokens: usize,
    pub budget_tokens: usize,
    /// Parts not measured because the budget ran out.
    pub skipped_parts: usize,
    /// Where asked ([`Ask::attention`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<AttentionMap>,
}

/// Attention paid to the prompt while the completion was predicted.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionMap {
    pub layers: usize,
    pub heads: usize,
    /// The prompt's tokens as text (a control token by its name).
    pub tokens: Vec<String>,
    /// `[layer][head][token]`: the attention probability each prompt token
    /// got, averaged over the queries that predict the completion's tokens
    /// (rounded to 1e-5).
    pub weights: Vec<Vec<Vec<f32>>>,
    /// `[layer][head]`: the rest of each query's attention, paid to the
    /// completion's own earlier tokens (each row of `weights` and this
    /// add up to 1).
    pub to_completion: Vec<Vec<f32>>,
}

impl AttentionMap {
    /// Each prompt token's attention averaged over layers and heads.
    pub fn mean(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.tokens.len()];
        for row in self.weights.iter().flatten() {
            for (o, w) in out.iter_mut().zip(row) {
                *o += w;
            }
        }
        let n = (self.layers * self.heads).max(1) as f32;
        out.iter_mut().for_each(|o| *o /= n);
        out
    }
}

/// What to explain.
#[derive(Clone, Debug)]
pub struct Ask {
    pub prompt: String,
    /// The completion to explain; `None`: the model's greedy completion of
    /// `max_tokens` tokens.
    pub completion: Option<String>,
    pub max_tokens: usize,
    /// Parts to measure; empty: the prompt's blocks (split at blank
    /// lines) but the last, which the completion continues. The three most
    /// important are then measured line by line.
    pub parts: Vec<Part>,
    /// Tokens to evaluate at most for attribution (the completion's
    /// generation and scoring are not counted).
    pub budget_tokens: usize,
    pub counterfactual: bool,
    /// Record the attention map too.
    pub attention: bool,
}

/// The default token budget of an explanation, and the largest.
pub const DEFAULT_BUDGET: usize = 8192;
pub const MAX_BUDGET: usize = 1 << 20;

/// A budget given in a request (JSON): the default when absent.
pub fn budget(v: &serde_json::Value) -> Result<usize, String> {
    match v {
        serde_json::Value::Null => Ok(DEFAULT_BUDGET),
        v => match v.as_u64() {
            Some(n) if (1..=MAX_BUDGET as u64).contains(&n) => Ok(n as usize),
            _ => Err(format!("must be an integer from 1 to {MAX_BUDGET}")),
        },
    }
}

/// The prompt's blocks: runs of lines between blank lines (each with the
/// blank lines after it).
pub fn blocks(text: &str) -> Vec<Part> {
    blocks_in(text, 0, text.len())
}

/// [`blocks`] of `text[from..to]`, as ranges of `text`.
pub fn blocks_in(text: &str, from: usize, to: usize) -> Vec<Part> {
    let mut out = Vec::new();
    let mut start = None;
    let mut at = from;
    let mut prev_blank = false;
    for line in text[from..to].split_inclusive('\n') {
        let blank = line.trim().is_empty();
        if !blank
            && prev_blank
            && let Some(s) = start.take()
        {
            out.push(part(text, s, at, "block"));
        }
        if start.is_none() && !blank {
            start = Some(at);
        }
        prev_blank = blank;
        at += line.len();
    }
    if let Some(s) = start {
        out.push(part(text, s, to, "block"));
    }
    out
}

/// The non-blank lines of `within`.
pub fn lines(text: &str, within: &Part) -> Vec<Part> {
    let mut out = Vec::new();
    let mut at = within.start;
    for line in text[within.start..within.end].split_inclusive('\n') {
        if !line.trim().is_empty() {
            out.push(part(text, at, at + line.len(), "line"));
        }
        at += line.len();
    }
    out
}

/// The spans of `within` (a line): maximal runs of letters, digits and
/// `_`, and maximal runs of other characters but whitespace.
pub fn spans(text: &str, within: &Part) -> Vec<Part> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let slice = &text[within.start..within.end];
    let mut out = Vec::new();
    // The open span: where it starts and whether it is a word.
    let mut open: Option<(usize, bool)> = None;
    // A space after the last character closes the last span.
    for (i, c) in slice.char_indices().chain([(slice.len(), ' ')]) {
        let at = within.start + i;
        let kind = (!c.is_whitespace()).then(|| word(c));
        if let Some((start, is_word)) = open {
            if kind == Some(is_word) {
                continue;
            }
            out.push(part(text, start, at, "span"));
        }
        open = kind.map(|k| (at, k));
    }
    out
}

fn part(text: &str, start: usize, end: usize, kind: &str) -> Part {
    let label = text[start..end].lines().next().unwrap_or("").trim();
    let label: String = label.chars().take(80).collect();
    Part {
        start,
        end,
        kind: kind.to_string(),
        label,
    }
}

/// Log-probability of `completion` after `prompt`, reusing the cached
/// prefix; returns it and the tokens evaluated.
fn score(
    session: &mut Session,
    prompt: &[u32],
    completion: &[u32],
) -> Result<(f64, usize), ModelError> {
    let all: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let n_vocab = session.model.config.n_vocab;
    // The logits that predict the completion start at the prompt's last
    // token: keep the cache before it.
    let keep = session.common_prefix(&all).min(prompt.len() - 1);
    session.truncate(keep);
    let rows = session.eval(&all[keep..all.len() - 1], LogitsFor::All)?;
    let first = prompt.len() - 1 - keep;
    let mut lp = 0.0f64;
    for (row, &next) in rows.chunks_exact(n_vocab).skip(first).zip(completion) {
        lp += log_prob(row, next);
    }
    Ok((lp, all.len() - 1 - keep))
}

fn without(text: &str, p: &Part) -> String {
    format!("{}{}", &text[..p.start], &text[p.end..])
}

fn greedy(
    session: &mut Session,
    tok: &Tokenizer,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> Result<(Vec<u32>, String), ModelError> {
    let g = generate(
        session,
        tok,
        &Request::new(prompt, max_tokens, SamplingParams::greedy()),
        |_| true,
    )?;
    Ok((g.token_ids, g.text))
}

pub fn explain(
    session: &mut Session,
    tok: &Tokenizer,
    ask: &Ask,
) -> Result<Explanation, ModelError> {
    let text = ask.prompt.as_str();
    let encode = |t: &str| tok.encode(t, true).map_err(ModelError::Invalid);
    let prompt = encode(text)?;
    if prompt.is_empty() {
        return Err(ModelError::Invalid("the prompt is empty".into()));
    }
    let (completion_ids, completion) = match ask.completion.as_deref() {
        Some(c) => (
            tok.encode(c, false).map_err(ModelError::Invalid)?,
            c.to_string(),
        ),
        None => greedy(session, tok, prompt.clone(), ask.max_tokens)?,
    };
    if completion_ids.is_empty() {
        return Err(ModelError::Invalid(
            "the completion is empty: there is nothing to explain (give --completion, or a prompt the model continues)".into(),
        ));
    }
    let (base, _) = score(session, &prompt, &completion_ids)?;
    let mut spent = 0usize;
    let mut skipped = 0usize;
    let mut fine = Vec::new();
    let measure = |session: &mut Session,
                   parts: Vec<Part>,
                   spent: &mut usize,
                   skipped: &mut usize|
     -> Result<Vec<Attribution>, ModelError> {
        let mut out = Vec::new();
        for p in parts {
            let ids = encode(&without(text, &p))?;
            if ids.is_empty() {
                *skipped += 1;
                continue;
            }
            // What removing it costs: the tokens from where it starts.
            let cost =
                ids.len() + completion_ids.len() - session.common_prefix(&ids).min(ids.len() - 1);
            if *spent + cost > ask.budget_tokens {
                *skipped += 1;
                continue;
            }
            let (lp, n) = score(session, &ids, &completion_ids)?;
            *spent += n;
            out.push(Attribution {
                part: p,
                importance: base - lp,
            });
        }
        Ok(out)
    };
    let by_importance = |v: &mut Vec<Attribution>| {
        v.sort_by(|a, b| {
            b.importance
                .total_cmp(&a.importance)
                .then(a.part.start.cmp(&b.part.start))
        })
    };
    let coarse_parts = if ask.parts.is_empty() {
        // The block the completion continues is what is being completed,
        // not context for it: the others are measured.
        let mut parts = blocks(text);
        if parts.len() > 1 && parts.last().is_some_and(|p| p.end == text.len()) {
            parts.pop();
        }
        parts
    } else {
        for p in &ask.parts {
            if p.start > p.end
                || p.end > text.len()
                || !text.is_char_boundary(p.start)
                || !text.is_char_boundary(p.end)
            {
                return Err(ModelError::Invalid(format!(
                    "part {}..{} is not a range of the prompt's characters ({} bytes)",
                    p.start,
                    p.end,
                    text.len()
                )));
            }
        }
        ask.parts.clone()
    };
    let mut measured = measure(session, coarse_parts, &mut spent, &mut skipped)?;
    by_importance(&mut measured);
    // The three most important parts of several lines, line by line.
    for a in measured.iter().filter(|a| a.importance > 0.0).take(3) {
        let ls = lines(text, &a.part);
        if ls.len() > 1 {
            fine.extend(measure(session, ls, &mut spent, &mut skipped)?);
        }
    }
    by_importance(&mut fine);
    // The two most important lines of several spans, span by span.
    let mut finest = Vec::new();
    for a in fine.iter().filter(|a| a.importance > 0.0).take(2) {
        let ss = spans(text, &a.part);
        if ss.len() > 1 {
            finest.extend(measure(session, ss, &mut spent, &mut skipped)?);
        }
    }
    by_importance(&mut finest);
    let counterfactual = match measured.first() {
        Some(top) if ask.counterfactual && top.importance > 0.0 => {
            let ids = encode(&without(text, &top.part))?;
            let (_, text) = greedy(session, tok, ids, completion_ids.len().max(ask.max_tokens))?;
            Some(Counterfactual {
                removed: top.part.clone(),
                completion: text,
            })
        }
        _ => None,
    };
    let attention = if ask.attention {
        Some(attention_map(session, tok, &prompt, &completion_ids)?)
    } else {
        None
    };
    Ok(Explanation {
        attention,
        completion,
        completion_tokens: completion_ids.len(),
        logprob: base,
        parts: measured,
        lines: fine,
        spans: finest,
        counterfactual,
        evaluated_tokens: spent,
        budget_tokens: ask.budget_tokens,
        skipped_parts: skipped,
    })
}

fn attention_map(
    session: &mut Session,
    tok: &Tokenizer,
    prompt: &[u32],
    completion: &[u32],
) -> Result<AttentionMap, ModelError> {
    let cfg = &session.model.config;
    let (layers, heads) = (cfg.n_layer, cfg.n_head);
    let sums = session.attention(prompt, completion)?;
    let positions = prompt.len() + completion.len() - 1;
    let round = |v: f32| (v * 1e5).round() / 1e5;
    let mut weights = Vec::with_capacity(layers);
    let mut to_completion = Vec::with_capacity(layers);
    for layer in sums.chunks_exact(heads * positions) {
        let rows: Vec<&[f32]> = layer.chunks_exact(positions).collect();
        weights.push(
            rows.iter()
                .map(|r| r[..prompt.len()].iter().map(|&v| round(v)).collect())
                .collect(),
        );
        to_completion.push(
            rows.iter()
                .map(|r| round(r[prompt.len()..].iter().sum()))
                .collect(),
        );
    }
    let tokens = prompt
        .iter()
        .map(|&id| {
            let text = tok.decode(&[id]);
            if text.is_empty() {
                tok.token_text(id).unwrap_or("").to_string()
            } else {
                text
            }
        })
        .collect();
    Ok(AttentionMap {
        layers,
        heads,
        tokens,
        weights,
        to_completion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_words_numbers_and_runs_of_punctuation() {
        let t = "x = 1\n  assert DATABASE_PORT == 7913;  # é_1\n";
        let line = lines(t, &part(t, 0, t.len(), "block"))[1].clone();
        let got: Vec<&str> = spans(t, &line).iter().map(|p| &t[p.start..p.end]).collect();
        assert_eq!(
            got,
            ["assert", "DATABASE_PORT", "==", "7913", ";", "#", "é_1"]
        );
        assert!(spans(t, &part(t, 5, 8, "line")).is_empty());
    }

    #[test]
    fn blocks_and_lines_cover_the_text_by_byte_ranges() {
        let t = "# a.py\nX = 1\n\n\n# b.py\nY = 2\nZ = 3\n\nprint(X";
        let b = blocks(t);
        let spans: Vec<&str> = b.iter().map(|p| &t[p.start..p.end]).collect();
        assert_eq!(
            spans,
            ["# a.py\nX = 1\n\n\n", "# b.py\nY = 2\nZ = 3\n\n", "print(X"]
        );
        assert_eq!(b[1].label, "# b.py");
        let l = lines(t, &b[1]);
        let spans: Vec<&str> = l.iter().map(|p| &t[p.start..p.end]).collect();
        assert_eq!(spans, ["# b.py\n", "Y = 2\n", "Z = 3\n"]);
        assert!(blocks("").is_empty());
    }
}
