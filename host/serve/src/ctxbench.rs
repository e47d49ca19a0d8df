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
use crate::prompt::Counter;
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
    let files = context::read_files(root);
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
    };
    for (_, w) in ranked {
        let place = (w.path.to_string(), w.start, w.end);
        chosen.ranking.push(place.clone());
        let n = tok.count(&tok.snippet(&hole.file, w.path, &w.body));
        if chosen.tokens + n <= budget {
            chosen.tokens += n;
            chosen.packed.push(place);
        }
    }
    chosen
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
}

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
    let texts: HashMap<&str, &str> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
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
    let ws = Workspace::of_files(root, &files);
    let windows = windows(&files);
    let cross: Vec<&Hole> = holes.iter().filter(|h| h.kind == "cross_file").collect();
    let mut scores = Vec::new();
    for &selector in &SELECTORS {
        for &budget in budgets {
            let (mut found, mut tokens, mut rr) = (0usize, 0usize, 0f64);
            let mut latencies = Vec::new();
            for hole in &cross {
                let text = texts[hole.file.as_str()];
                let (prefix, suffix) = around(text, hole);
                let started = Instant::now();
                let chosen = match selector {
                    Selector::None => Chosen {
                        packed: Vec::new(),
                        tokens: 0,
                        ranking: Vec::new(),
                    },
                    Selector::JaccardWindows => {
                        jaccard_windows(&windows, hole, &prefix, tok, budget)
                    }
                    Selector::Bm25FirstFit | Selector::Kiln => {
                        let selection = if selector == Selector::Kiln {
                            Selection::Kiln
                        } else {
                            Selection::Bm25FirstFit
                        };
                        let at = SelectAt {
                            path: &hole.file,
                            prefix: &prefix,
                            suffix: &suffix,
                        };
                        let p = context::select_with(&ws, &[], &at, ranker, tok, budget, selection);
                        Chosen {
                            packed: (p.snippets.iter())
                                .map(|s| (s.path.clone(), s.start_line, s.end_line))
                                .collect(),
                            tokens: p.tokens,
                            ranking: p.ranking,
                        }
                    }
                };
                latencies.push(started.elapsed().as_secs_f64() * 1e3);
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
            });
        }
    }
    Ok(scores)
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
