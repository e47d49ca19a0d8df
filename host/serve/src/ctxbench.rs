//! ctxbench: does the context block hold what a completion needs?
//!
//! Holes are cut from a repository on disk, CrossCodeEval-style: the
//! cursor sits before an identifier on a line that uses it, and the
//! completion is the rest of that line. A hole is `cross_file` when the
//! identifier is defined only in other files of the repository (what
//! context must bring), `in_file` when the file itself defines it, and
//! `external` when nothing in the repository does. Holes are sampled with
//! a seed and frozen as JSONL with each file's sha256, so a set is checked
//! against the tree it was cut from.
//!
//! A selector sees only what an editor would: the file's text before the
//! cursor and after the hole's line (never the completion), and every
//! other file. Model-free metrics per selector and token budget, over the
//! cross-file holes: definition recall (the share of holes whose
//! identifier's definition lies inside a packed snippet), density (such
//! definitions per 1,000 context tokens spent: dumping text does not
//! win), MRR of the first ranked snippet holding the definition, and the
//! selection's latency (p50, p99).
//!
//! The repository is read once per run; the index built from it has no
//! file ages (the ranker's recency features are unknown), so a run does
//! not depend on when the files were written.
//!
//! Definitions are found as kiln's symbol index finds them
//! ([`crate::symbols`]: tree-sitter tag queries, a keyword heuristic for
//! other languages), so a label is a line a definition names.

use crate::context::{self, SelectAt, Selection, Workspace};
use crate::engine::Loaded;
use crate::prompt::Counter;
use kiln_runtime::model::Session;
use kiln_runtime::model::forward::LogitsFor;
use kiln_runtime::model::generate::{Request, generate, log_prob};
use kiln_runtime::model::sample::SamplingParams;
use kiln_sandbox::breaker::Ranker;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

/// One hole.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Hole {
    /// The file, relative to the repository root.
    pub file: String,
    /// The file's sha256 when the hole was cut.
    pub sha256: String,
    /// The cursor: 0-based line and byte column (the identifier's start).
    pub line: u32,
    pub column: u32,
    /// The identifier the completion needs, and the completion: the rest
    /// of the line from the cursor.
    pub ident: String,
    pub truth: String,
    /// `cross_file`, `in_file` or `external`.
    pub kind: String,
    /// Where the identifier is defined (path, 0-based line).
    pub definitions: Vec<(String, u32)>,
}

/// Cuts up to `n` holes from the repository at `root` (`n` cross-file
/// ones, with the in-file and external holes met on the way labelled and
/// kept up to `n` each), the same ones for the same seed and tree.
pub fn sample(root: &Path, n: usize, seed: u64) -> Vec<Hole> {
    sample_files(&context::read_files(root), n, seed)
}

/// [`sample`] from files already read ([`context::read_files`]).
pub fn sample_files(files: &[(String, String)], n: usize, seed: u64) -> Vec<Hole> {
    // Per file, the names it defines and their lines.
    let file_defs: Vec<Vec<(String, u32)>> = files
        .iter()
        .map(|(path, text)| {
            (crate::symbols::definitions(path, text).into_iter())
                .map(|d| (d.name, d.line))
                .collect()
        })
        .collect();
    let mut defined: HashMap<String, Vec<(String, u32)>> = HashMap::new();
    for ((path, _), defs) in files.iter().zip(&file_defs) {
        for (name, line) in defs {
            defined
                .entry(name.clone())
                .or_default()
                .push((path.clone(), *line));
        }
    }
    // Every use of an identifier on a line that does not define it.
    let mut uses: Vec<(usize, u32, u32, String)> = Vec::new();
    for (f, (_, text)) in files.iter().enumerate() {
        for (i, line) in text.lines().enumerate() {
            let defines: HashSet<&str> = (file_defs[f].iter())
                .filter(|(_, l)| *l == i as u32)
                .map(|(n, _)| n.as_str())
                .collect();
            let mut at = 0;
            for word in context::words(line) {
                let Some(col) = line[at..].find(&word).map(|c| c + at) else {
                    continue;
                };
                at = col + word.len();
                let bounded = line[..col]
                    .chars()
                    .next_back()
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
                if word.len() >= 3
                    && bounded
                    && !context::is_keyword(&word)
                    && !defines.contains(word.as_str())
                {
                    uses.push((f, i as u32, col as u32, word));
                }
            }
        }
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    rng.shuffle(&mut uses);
    let mut holes = Vec::new();
    let mut per_kind: HashMap<&'static str, usize> = HashMap::new();
    for (f, line, column, ident) in uses {
        let (path, text) = &files[f];
        let defs = defined.get(&ident).cloned().unwrap_or_default();
        let kind = if defs.is_empty() {
            "external"
        } else if defs.iter().any(|(p, _)| p == path) {
            "in_file"
        } else {
            "cross_file"
        };
        let count = per_kind.entry(kind).or_default();
        if *count >= n {
            if per_kind.get("cross_file").copied().unwrap_or(0) >= n {
                break;
            }
            continue;
        }
        *count += 1;
        let line_text = text.lines().nth(line as usize).unwrap_or("");
        holes.push(Hole {
            file: path.clone(),
            sha256: kiln_runtime::plugin::sha256_hex(text.as_bytes()),
            line,
            column,
            truth: line_text[column as usize..].to_string(),
            ident,
            kind: kind.to_string(),
            definitions: defs,
        });
    }
    holes
}

/// The editor's view of a hole: the file before the cursor, and after the
/// hole's line.
pub fn around(text: &str, hole: &Hole) -> (String, String) {
    let mut prefix = String::new();
    let mut suffix = String::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        match (i as u32).cmp(&hole.line) {
            std::cmp::Ordering::Less => prefix.push_str(line),
            std::cmp::Ordering::Equal => {
                prefix.push_str(&line[..(hole.column as usize).min(line.len())]);
                if line.ends_with('\n') {
                    suffix.push('\n');
                }
            }
            std::cmp::Ordering::Greater => suffix.push_str(line),
        }
    }
    (prefix, suffix)
}

/// The context selectors compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// No context.
    None,
    /// BM25 chunks, first-fit in rank order: kiln's first context.
    Bm25FirstFit,
    /// Identifier Jaccard over sliding windows of 20 lines (step 10) of
    /// every file against the 20 lines before the cursor, first-fit: the
    /// ranker Copilot and Cody describe.
    JaccardWindows,
    /// kiln's context today: the active ranker, floor, redundancy
    /// penalty, knapsack.
    Kiln,
}

pub const SELECTORS: [Selector; 4] = [
    Selector::None,
    Selector::Bm25FirstFit,
    Selector::JaccardWindows,
    Selector::Kiln,
];

/// One selector's packed snippets (path, first line, end line) with their
/// tokens, and its ranked candidates.
struct Chosen {
    packed: Vec<(String, u32, u32)>,
    tokens: usize,
    ranking: Vec<(String, u32, u32)>,
    /// The context block as the prompt holds it.
    text: String,
}

const WINDOW: usize = 20;
const STEP: usize = 10;

/// A sliding window of a file, indexed once for every hole, as an
/// editor extension keeps them.
struct Window<'a> {
    path: &'a str,
    start: u32,
    end: u32,
    body: String,
    words: HashSet<String>,
}

fn windows(files: &[(String, String)]) -> Vec<Window<'_>> {
    let mut all = Vec::new();
    for (path, text) in files {
        let lines: Vec<&str> = text.lines().collect();
        let mut start = 0;
        while start < lines.len() {
            let end = (start + WINDOW).min(lines.len());
            let body = lines[start..end].join("\n");
            let words = context::words(&body).into_iter().collect();
            all.push(Window {
                path,
                start: start as u32,
                end: end as u32,
                body,
                words,
            });
            if end == lines.len() {
                break;
            }
            start += STEP;
        }
    }
    all
}

fn jaccard_windows(
    windows: &[Window<'_>],
    hole: &Hole,
    prefix: &str,
    tok: &Counter<'_>,
    budget: usize,
) -> Chosen {
    let last: Vec<&str> = prefix.lines().rev().take(WINDOW).collect();
    let query: HashSet<String> = context::words(&last.join("\n")).into_iter().collect();
    let mut ranked: Vec<(f32, &Window<'_>)> = (windows.iter())
        .filter(|w| w.path != hole.file)
        .filter_map(|w| {
            let inter = w.words.intersection(&query).count();
            let union = w.words.len() + query.len() - inter;
            (inter > 0).then(|| (inter as f32 / union as f32, w))
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut chosen = Chosen {
        packed: Vec::new(),
        tokens: 0,
        ranking: Vec::new(),
        text: String::new(),
    };
    for (_, w) in ranked {
        let place = (w.path.to_string(), w.start, w.end);
        chosen.ranking.push(place.clone());
        let block = tok.snippet(&hole.file, w.path, &w.body);
        let n = tok.count(&block);
        if chosen.tokens + n <= budget {
            chosen.tokens += n;
            chosen.packed.push(place);
            chosen.text.push_str(&block);
        }
    }
    chosen
}

/// What `selector` packs into `budget` tokens for `hole`.
#[allow(clippy::too_many_arguments)]
fn choose(
    selector: Selector,
    ws: &Workspace,
    windows: &[Window<'_>],
    hole: &Hole,
    prefix: &str,
    suffix: &str,
    tok: &Counter<'_>,
    ranker: &Ranker,
    budget: usize,
) -> Chosen {
    match selector {
        Selector::None => Chosen {
            packed: Vec::new(),
            tokens: 0,
            ranking: Vec::new(),
            text: String::new(),
        },
        Selector::JaccardWindows => jaccard_windows(windows, hole, prefix, tok, budget),
        Selector::Bm25FirstFit | Selector::Kiln => {
            let selection = if selector == Selector::Kiln {
                Selection::Kiln
            } else {
                Selection::Bm25FirstFit
            };
            let at = SelectAt {
                path: &hole.file,
                prefix,
                suffix,
                last_completion: None,
            };
            let p = context::select_with(ws, &[], &at, ranker, tok, budget, selection);
            Chosen {
                packed: (p.snippets.iter())
                    .map(|s| (s.path.clone(), s.start_line, s.end_line))
                    .collect(),
                tokens: p.tokens,
                ranking: p.ranking,
                text: p.text,
            }
        }
    }
}

/// A selector's metrics at one budget, over the cross-file holes.
#[derive(Clone, Debug, Serialize)]
pub struct Score {
    pub selector: Selector,
    pub budget: usize,
    pub holes: usize,
    /// Share of holes whose definition is in the packed context.
    pub definition_recall: f64,
    /// Definitions found per 1,000 context tokens spent.
    pub density: f64,
    /// Mean reciprocal rank of the first ranked snippet holding the
    /// definition (0 where none does).
    pub mrr: f64,
    pub mean_context_tokens: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Cache stability: while the hole's line is typed (its first
    /// [`KEYSTROKES`] characters), the context tokens per keystroke from
    /// the first byte that differs from the previous keystroke's block on
    /// (what a KV cache must evaluate again). The language server keeps a
    /// line's block while it is typed; this measures the selector alone.
    pub unstable_tokens: f64,
}

/// Keystrokes typed per hole for [`Score::unstable_tokens`].
pub const KEYSTROKES: usize = 3;

fn holds(snippets: &[(String, u32, u32)], defs: &[(String, u32)]) -> Option<usize> {
    snippets
        .iter()
        .position(|(p, s, e)| defs.iter().any(|(dp, dl)| dp == p && dl >= s && dl < e))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Each hole's file is in the repository with the content it was cut
/// from; the error names the file.
fn check_holes(texts: &HashMap<&str, &str>, holes: &[Hole]) -> Result<(), String> {
    for hole in holes {
        let text = texts.get(hole.file.as_str()).ok_or_else(|| {
            format!(
                "{}: not in the repository (the holes were cut from another tree)",
                hole.file
            )
        })?;
        let sha = kiln_runtime::plugin::sha256_hex(text.as_bytes());
        if sha != hole.sha256 {
            return Err(format!(
                "{}: the file changed since the holes were cut (sha256 {sha}, not {}); cut them again",
                hole.file, hole.sha256
            ));
        }
    }
    Ok(())
}

/// Scores every selector at every budget on the cross-file holes of
/// `holes`, cut from the repository at `root`. A hole whose file changed
/// since it was cut is an error naming the file.
pub fn evaluate(
    root: &Path,
    holes: &[Hole],
    tok: &Counter<'_>,
    ranker: &Ranker,
    budgets: &[usize],
) -> Result<Vec<Score>, String> {
    let files = context::read_files(root);
    Corpus::new(root, &files, holes)?.evaluate(holes, tok, ranker, budgets, &SELECTORS)
}

/// A repository as ctxbench reads it, once: its files' texts (checked
/// against the holes), the workspace index and the sliding windows, for
/// as many evaluations as the caller runs on it.
pub struct Corpus<'f> {
    texts: HashMap<&'f str, &'f str>,
    ws: Workspace,
    windows: Vec<Window<'f>>,
}

impl<'f> Corpus<'f> {
    /// `files` as [`context::read_files`] reads `root`; fails when a
    /// hole's file is missing or changed since it was cut.
    pub fn new(root: &Path, files: &'f [(String, String)], holes: &[Hole]) -> Result<Self, String> {
        let texts: HashMap<&str, &str> = files
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        check_holes(&texts, holes)?;
        Ok(Corpus {
            texts,
            ws: Workspace::of_files(root, files),
            windows: windows(files),
        })
    }

    /// [`evaluate`] for `selectors` (`kiln policy test --ctxbench`
    /// scores kiln's selector with two rankers on one corpus).
    /// The context kiln's selector packs for each of the first `count`
    /// cross-file holes at `budget` tokens, in order: two rankers that
    /// give the same list give every hole the same prompt.
    pub fn contexts(
        &self,
        holes: &[Hole],
        count: usize,
        tok: &Counter<'_>,
        ranker: &Ranker,
        budget: usize,
    ) -> Vec<String> {
        (holes.iter().filter(|h| h.kind == "cross_file").take(count))
            .map(|hole| {
                let (prefix, suffix) = around(self.texts[hole.file.as_str()], hole);
                let chosen = choose(
                    Selector::Kiln,
                    &self.ws,
                    &self.windows,
                    hole,
                    &prefix,
                    &suffix,
                    tok,
                    ranker,
                    budget,
                );
                chosen.text
            })
            .collect()
    }

    pub fn evaluate(
        &self,
        holes: &[Hole],
        tok: &Counter<'_>,
        ranker: &Ranker,
        budgets: &[usize],
        selectors: &[Selector],
    ) -> Result<Vec<Score>, String> {
        let (texts, ws, windows) = (&self.texts, &self.ws, &self.windows);
        let cross: Vec<&Hole> = holes.iter().filter(|h| h.kind == "cross_file").collect();
        let mut scores = Vec::new();
        for &selector in selectors {
            for &budget in budgets {
                let (mut found, mut tokens, mut rr) = (0usize, 0usize, 0f64);
                let (mut unstable, mut keystrokes) = (0usize, 0usize);
                let mut latencies = Vec::new();
                for hole in &cross {
                    let text = texts[hole.file.as_str()];
                    let (prefix, suffix) = around(text, hole);
                    let started = Instant::now();
                    let chosen = choose(
                        selector, ws, windows, hole, &prefix, &suffix, tok, ranker, budget,
                    );
                    latencies.push(started.elapsed().as_secs_f64() * 1e3);
                    let mut previous = chosen.text.clone();
                    for typed in hole
                        .truth
                        .chars()
                        .take(KEYSTROKES)
                        .scan(String::new(), |t, c| {
                            t.push(c);
                            Some(t.clone())
                        })
                    {
                        let now = choose(
                            selector,
                            ws,
                            windows,
                            hole,
                            &(prefix.clone() + &typed),
                            &suffix,
                            tok,
                            ranker,
                            budget,
                        );
                        let same = (previous.bytes().zip(now.text.bytes()))
                            .take_while(|(a, b)| a == b)
                            .count();
                        let mut at = same;
                        while !now.text.is_char_boundary(at) {
                            at -= 1;
                        }
                        unstable += tok.count(&now.text[at..]);
                        keystrokes += 1;
                        previous = now.text;
                    }
                    tokens += chosen.tokens;
                    if holds(&chosen.packed, &hole.definitions).is_some() {
                        found += 1;
                    }
                    if let Some(r) = holds(&chosen.ranking, &hole.definitions) {
                        rr += 1.0 / (r + 1) as f64;
                    }
                }
                latencies.sort_by(f64::total_cmp);
                let n = cross.len().max(1) as f64;
                scores.push(Score {
                    selector,
                    budget,
                    holes: cross.len(),
                    definition_recall: found as f64 / n,
                    density: if tokens == 0 {
                        0.0
                    } else {
                        found as f64 * 1000.0 / tokens as f64
                    },
                    mrr: rr / n,
                    mean_context_tokens: tokens as f64 / n,
                    latency_ms_p50: percentile(&latencies, 0.5),
                    latency_ms_p99: percentile(&latencies, 0.99),
                    unstable_tokens: unstable as f64 / keystrokes.max(1) as f64,
                });
            }
        }
        Ok(scores)
    }
}

/// A mean and its 95% bootstrap interval.
#[derive(Clone, Debug, Serialize)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Resamples `values` (per hole) 1,000 times, seeded: the mean and the
/// 2.5th and 97.5th percentiles of the resampled means.
pub fn bootstrap(values: &[f64], seed: u64) -> Interval {
    let n = values.len();
    if n == 0 {
        return Interval {
            mean: 0.0,
            lo: 0.0,
            hi: 0.0,
        };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut means: Vec<f64> = (0..1000)
        .map(|_| (0..n).map(|_| values[rng.usize(..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    Interval {
        mean,
        lo: percentile(&means, 0.025),
        hi: percentile(&means, 0.975),
    }
}

/// 1 less the edit distance (in characters) over the longer length.
pub fn edit_similarity(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    1.0 - row[b.len()] as f64 / longest as f64
}

/// A context selector's effect on a real model, over the cross-file
/// holes: the change in the true completion's negative log-likelihood
/// (nats per hole; negative is better) against no context, the greedy
/// completion's exact match and edit similarity with the truth, and the
/// share of the oracle context's likelihood gain it captures.
#[derive(Clone, Debug, Serialize)]
pub struct ModelScore {
    /// A selector's name, or `oracle` (exactly the needed definitions).
    pub selector: String,
    pub budget: usize,
    pub holes: usize,
    pub mean_context_tokens: f64,
    /// The true completion's negative log-likelihood, nats per hole.
    pub nll: Interval,
    /// The same over all holes' completion tokens, nats per token.
    pub nll_per_token: f64,
    /// Against no context; `None` when `none` was not among the selectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_nll: Option<Interval>,
    pub exact_match: Interval,
    pub edit_similarity: Interval,
    /// Mean ΔNLL over the oracle's; `None` when the oracle gains nothing.
    pub gain_captured: Option<f64>,
    /// Each scored hole's NLL (nats), in the holes' order: two runs on the
    /// same holes compare hole by hole (`kiln tune`'s paired test).
    pub hole_nll: Vec<f64>,
}

/// How [`evaluate_model`] runs.
pub struct ModelRun<'a> {
    pub loaded: &'a Loaded,
    pub session: &'a mut Session,
    pub ranker: &'a Ranker,
    pub budget: usize,
    /// Tokens of the text before the cursor and after the hole's line the
    /// prompts keep ([`MODEL_PREFIX_TOKENS`], [`MODEL_SUFFIX_TOKENS`] by
    /// default).
    pub prefix_tokens: usize,
    pub suffix_tokens: usize,
    /// The selectors scored (of [`MODEL_SELECTORS`]); all when `None`.
    pub selectors: Option<&'a [String]>,
    /// Cross-file holes scored (the first ones of the set).
    pub holes: usize,
    /// Tokens of the greedy completion at most.
    pub max_tokens: usize,
    pub seed: u64,
    /// Called after each hole with (done, total).
    pub progress: &'a mut dyn FnMut(usize, usize),
}

/// Tokens of the text before the cursor and after the hole's line the
/// prompts keep by default (the language server's defaults are 1,024 and
/// 256; less here, so that context is a larger share of what the model
/// sees).
pub const MODEL_PREFIX_TOKENS: usize = 512;
pub const MODEL_SUFFIX_TOKENS: usize = 128;

/// What [`evaluate_model`] scores: no context, each selector, kiln's
/// selector with its second query, and the oracle (exactly the needed
/// definitions). `kiln_second_query`: kiln's selector again, with kiln's
/// own greedy completion as its second query (as the language server
/// does once a completion was shown on the cursor's line).
pub const MODEL_SELECTORS: [&str; 6] = [
    "none",
    "bm25_first_fit",
    "jaccard_windows",
    "kiln",
    "kiln_second_query",
    "oracle",
];

/// The negative log-likelihood (nats) of `target` after `prompt`.
fn nll(session: &mut Session, prompt: &[u32], target: &[u32]) -> Result<f64, String> {
    let all: Vec<u32> = prompt.iter().chain(target).copied().collect();
    let last = prompt.len() - 1;
    let keep = session.common_prefix(&all).min(last);
    session.truncate(keep);
    // The prompt before its last token only fills the cache: logits are
    // made (the vocabulary's projection, most of a long prompt's cost)
    // only where the target is predicted. Batches give the bits of one.
    if keep < last {
        session
            .eval(&all[keep..last], LogitsFor::Last)
            .map_err(|e| e.to_string())?;
    }
    let rows =
        (session.eval(&all[last..all.len() - 1], LogitsFor::All)).map_err(|e| e.to_string())?;
    let n_vocab = session.model.config.n_vocab;
    Ok((rows.chunks_exact(n_vocab).zip(target))
        .map(|(row, &next)| -log_prob(row, next))
        .sum())
}

/// The likelihood of a repository's own text under a model: what a
/// quantized model or cache loses shows here first.
#[derive(Clone, Debug, Serialize)]
pub struct TextNll {
    /// Files read from (the start of each).
    pub files: usize,
    /// Tokens predicted (each window's first is context only).
    pub tokens: usize,
    pub nll_per_token: f64,
}

/// Tokens of [`text_nll`]'s window (each file's first, from a fresh
/// cache), and per batch evaluated within one.
const TEXT_WINDOW: usize = 512;
const TEXT_BATCH: usize = 64;

/// The mean negative log-likelihood per token of about `tokens` tokens
/// of `files`' text (in an order shuffled by `seed`, the first
/// [`TEXT_WINDOW`] tokens of each file from a fresh cache), under
/// `session`'s model and KV cache type.
pub fn text_nll(
    session: &mut Session,
    loaded: &Loaded,
    files: &[(String, String)],
    tokens: usize,
    seed: u64,
) -> Result<TextNll, String> {
    let mut order: Vec<&(String, String)> = files.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    fastrand::Rng::with_seed(seed).shuffle(&mut order);
    let n_vocab = session.model.config.n_vocab;
    let window = TEXT_WINDOW.min(session.n_ctx());
    let (mut done, mut loss, mut used) = (0usize, 0.0f64, 0usize);
    for (_, text) in order {
        if done >= tokens {
            break;
        }
        let ids = loaded.tok.encode(text, true)?;
        if ids.len() < 2 {
            continue;
        }
        used += 1;
        // One window per file (its start), so that the tokens come from
        // many files, not the longest one.
        let w = &ids[..ids.len().min(window).min(tokens - done + 1)];
        session.truncate(0);
        for (at, batch) in w[..w.len() - 1].chunks(TEXT_BATCH).enumerate() {
            let rows = session
                .eval(batch, LogitsFor::All)
                .map_err(|e| e.to_string())?;
            let next = &w[at * TEXT_BATCH + 1..];
            for (row, &id) in rows.chunks_exact(n_vocab).zip(next) {
                loss -= log_prob(row, id);
            }
        }
        done += w.len() - 1;
    }
    if done == 0 {
        return Err("no text to score: the repository has no source files kiln reads".into());
    }
    Ok(TextNll {
        files: used,
        tokens: done,
        nll_per_token: loss / done as f64,
    })
}

/// Scores every selector, and the oracle, with the model in `run` on the
/// first `run.holes` cross-file holes at `run.budget` tokens of context.
pub fn evaluate_model(
    root: &Path,
    holes: &[Hole],
    run: ModelRun<'_>,
) -> Result<Vec<ModelScore>, String> {
    let files = context::read_files(root);
    Corpus::new(root, &files, holes)?.evaluate_model(holes, run)
}

impl Corpus<'_> {
    /// [`evaluate_model`] on this corpus.
    pub fn evaluate_model(
        &self,
        holes: &[Hole],
        run: ModelRun<'_>,
    ) -> Result<Vec<ModelScore>, String> {
        let (texts, ws, windows) = (&self.texts, &self.ws, &self.windows);
        let loaded = run.loaded;
        let tok = Counter::of(loaded);
        let cross: Vec<&Hole> = (holes.iter())
            .filter(|h| h.kind == "cross_file")
            .take(run.holes)
            .collect();
        const NAMES: [&str; 6] = MODEL_SELECTORS;
        if let Some(unknown) =
            (run.selectors.unwrap_or(&[]).iter()).find(|s| !NAMES.contains(&s.as_str()))
        {
            return Err(format!(
                "unknown selector {unknown}: give {}",
                NAMES.join(", ")
            ));
        }
        // What is reported, and what is run (kiln's own completion is the
        // second query's).
        let listed = |name: &str| run.selectors.is_none_or(|s| s.iter().any(|w| w == name));
        let wanted = |name: &str| listed(name) || (name == "kiln" && listed("kiln_second_query"));
        // Per selector, per hole.
        struct Scored {
            nll: f64,
            exact: f64,
            similarity: f64,
            context_tokens: usize,
            target_tokens: usize,
        }
        let mut per: Vec<Vec<Scored>> = (0..NAMES.len()).map(|_| Vec::new()).collect();
        for (done, hole) in cross.iter().enumerate() {
            let text = texts[hole.file.as_str()];
            let (prefix, suffix) = around(text, hole);
            let truth = hole.truth.trim_end();
            let target = loaded.tok.encode(truth, false)?;
            if target.is_empty() {
                continue;
            }
            // The budgets as they fit the window, as the language server
            // fits them.
            let limit = run
                .session
                .n_ctx()
                .saturating_sub(target.len() + run.max_tokens + 1);
            let fit = crate::Settings {
                prefix_tokens: run.prefix_tokens,
                suffix_tokens: run.suffix_tokens,
                context_tokens: run.budget,
                ..crate::Settings::default()
            }
            .within(limit);
            let prefix_cut = crate::prompt::tail_within(&tok, &prefix, fit.prefix_tokens);
            let suffix_cut = crate::prompt::head_within(&tok, &suffix, fit.suffix_tokens);
            let budget = fit.context_tokens;
            let mut kiln_completion = String::new();
            for (s, name) in NAMES.iter().enumerate() {
                if !wanted(name) {
                    continue;
                }
                let (context, tokens) = match *name {
                    "kiln_second_query" => {
                        let at = SelectAt {
                            path: &hole.file,
                            prefix: &prefix,
                            suffix: &suffix,
                            last_completion: Some(&kiln_completion),
                        };
                        let p = context::select_with(
                            ws,
                            &[],
                            &at,
                            run.ranker,
                            &tok,
                            budget,
                            Selection::Kiln,
                        );
                        (p.text, p.tokens)
                    }
                    "oracle" => {
                        let mut block = String::new();
                        let mut used = 0;
                        for (path, body, signature) in
                            ws.definition_texts(&hole.ident, &hole.definitions)
                        {
                            for t in [body, signature] {
                                let snippet = tok.snippet(&hole.file, &path, &t);
                                let n = tok.count(&snippet);
                                if used + n <= budget {
                                    used += n;
                                    block.push_str(&snippet);
                                    break;
                                }
                            }
                        }
                        (block, used)
                    }
                    _ => {
                        let selector = SELECTORS[s];
                        let c = choose(
                            selector, ws, windows, hole, &prefix, &suffix, &tok, run.ranker, budget,
                        );
                        (c.text, c.tokens)
                    }
                };
                let prompt = crate::prompt::fim_tokens(
                    loaded, &context, prefix_cut, suffix_cut, None, limit,
                )
                .map_err(|e| format!("{}: {e}", hole.file))?;
                let loss = nll(run.session, &prompt, &target)?;
                let mut request = Request::new(prompt, run.max_tokens, SamplingParams::greedy());
                request.stop = vec!["\n".to_string()];
                let g = generate(run.session, &loaded.tok, &request, |_| true)
                    .map_err(|e| e.to_string())?;
                if *name == "kiln" {
                    kiln_completion = g.text.clone();
                }
                let line = g.text.lines().next().unwrap_or("").trim_end();
                let exact = f64::from(u8::from(line == truth));
                per[s].push(Scored {
                    nll: loss,
                    exact,
                    similarity: edit_similarity(line, truth),
                    context_tokens: tokens,
                    target_tokens: target.len(),
                });
            }
            (run.progress)(done + 1, cross.len());
        }
        let none: Vec<f64> = per[0].iter().map(|r| r.nll).collect();
        let delta = |s: usize| -> Option<Vec<f64>> {
            wanted("none").then(|| per[s].iter().zip(&none).map(|(r, n)| r.nll - n).collect())
        };
        let oracle_gain = (delta(NAMES.len() - 1))
            .filter(|_| listed("oracle"))
            .map(|d| bootstrap(&d, run.seed).mean);
        Ok((NAMES.iter().enumerate())
            .filter(|(_, name)| listed(name))
            .map(|(s, name)| {
                let d = delta(s).map(|d| bootstrap(&d, run.seed));
                let column = |k: usize| -> Vec<f64> {
                    per[s]
                        .iter()
                        .map(|r| match k {
                            0 => r.nll,
                            1 => r.exact,
                            _ => r.similarity,
                        })
                        .collect()
                };
                let n = per[s].len();
                let target_tokens: usize = per[s].iter().map(|r| r.target_tokens).sum();
                ModelScore {
                    selector: name.to_string(),
                    budget: run.budget,
                    holes: n,
                    mean_context_tokens: per[s]
                        .iter()
                        .map(|r| r.context_tokens as f64)
                        .sum::<f64>()
                        / n.max(1) as f64,
                    gain_captured: match (&d, oracle_gain) {
                        (Some(d), Some(g)) if g < 0.0 => Some(d.mean / g),
                        _ => None,
                    },
                    nll: bootstrap(&column(0), run.seed),
                    nll_per_token: column(0).iter().sum::<f64>() / target_tokens.max(1) as f64,
                    delta_nll: d,
                    exact_match: bootstrap(&column(1), run.seed),
                    edit_similarity: bootstrap(&column(2), run.seed),
                    hole_nll: column(0),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("geometry.py"),
            "def circle_area(radius):\n    return 3.14159 * radius * radius\n\n\ndef square_area(side):\n    return side * side\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("main.py"),
            "from geometry import circle_area, square_area\n\n\ndef wheel(r):\n    total = circle_area(r)\n    return total + square_area(r)\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn edit_similarity_and_the_bootstrap() {
        assert_eq!(edit_similarity("kitten", "sitting"), 1.0 - 3.0 / 7.0);
        assert_eq!(edit_similarity("", ""), 1.0);
        assert_eq!(edit_similarity("abc", ""), 0.0);
        assert_eq!(edit_similarity("é", "e"), 0.0, "characters, not bytes");
        let same = bootstrap(&[2.0; 10], 3);
        assert_eq!((same.lo, same.mean, same.hi), (2.0, 2.0, 2.0));
        let values: Vec<f64> = (0..100).map(f64::from).collect();
        let i = bootstrap(&values, 3);
        assert_eq!(i.mean, 49.5);
        assert!(
            i.lo < 49.5 && 49.5 < i.hi && i.lo > 40.0 && i.hi < 60.0,
            "{i:?}"
        );
        assert_eq!(
            format!("{i:?}"),
            format!("{:?}", bootstrap(&values, 3)),
            "seeded"
        );
    }

    #[test]
    fn holes_are_labelled_reproducible_and_hide_the_completion() {
        let dir = repo();
        let holes = sample(dir.path(), 10, 1);
        assert_eq!(
            holes,
            sample(dir.path(), 10, 1),
            "the same seed, the same holes"
        );
        let h = holes
            .iter()
            .find(|h| h.kind == "cross_file" && h.ident == "circle_area" && h.line == 4)
            .unwrap_or_else(|| panic!("{holes:#?}"));
        assert_eq!(h.file, "main.py");
        assert_eq!(h.truth, "circle_area(r)");
        assert_eq!(h.definitions, vec![("geometry.py".to_string(), 0)]);
        let text = std::fs::read_to_string(dir.path().join("main.py")).unwrap();
        let (prefix, suffix) = around(&text, h);
        assert!(prefix.ends_with("    total = "), "{prefix:?}");
        assert!(suffix.starts_with("\n    return total"), "{suffix:?}");
        assert!(!prefix.contains("circle_area(r)") && !suffix.contains("circle_area(r)"));
        // `radius` is defined nowhere (a parameter): external.
        assert!(
            holes
                .iter()
                .all(|h| h.ident != "radius" || h.kind == "external")
        );
    }
}
