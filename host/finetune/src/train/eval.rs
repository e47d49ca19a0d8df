//! `kiln finetune eval`: the base model against an adapter on the
//! held-out files of a data directory, in the same run.
//!
//! - **NLL**: the mean negative log-likelihood per target token of every
//!   held-out sequence, by the trainer's forward (inference's arithmetic)
//!   with and without the adapter, and in bits per byte of the targets'
//!   text (comparable across vocabularies); 95% bootstrap intervals over
//!   the sequences (resampling whole sequences), the difference paired.
//! - **Completions**: at each held-out hole (`holes.jsonl`), the greedy
//!   completion from the text before it (and after it, where the model
//!   has fill-in-the-middle tokens) in the prompt `kiln serve` builds,
//!   cut to the hole's number of lines: exact match and edit similarity
//!   with the hole's text. Both sides run kiln's inference as `kiln
//!   serve` runs them: the model's weights as stored, and on the
//!   adapter's side the adapter applied at run time on them
//!   (`Model::load_adapted`), so only the adapter differs.

use super::model::{Adapter, Base, Sequence, Trainable};
use kiln_runtime::backend::Backend;
use kiln_runtime::model::Session;
use kiln_runtime::model::generate::{Request, generate};
use kiln_runtime::model::sample::SamplingParams;
use kiln_serve::ctxbench::{Interval, edit_similarity};
use kiln_serve::engine::Loaded;
use kiln_serve::prompt::{Counter, fim_tokens, head_within, tail_within};
use serde::Serialize;
use std::path::Path;

pub struct Options {
    /// Holes to complete at most (0: none, NLL only).
    pub holes: usize,
    /// Tokens of a completion at most.
    pub max_tokens: usize,
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            holes: 100,
            max_tokens: 64,
            seed: 1,
        }
    }
}

/// One model's scores.
#[derive(Clone, Debug, Serialize)]
pub struct Side {
    /// Nats per target token.
    pub nll: Interval,
    /// Bits per byte of target text (the same negative log-likelihood
    /// over the UTF-8 bytes the target tokens decode to, control tokens
    /// aside): comparable between models whose vocabularies differ.
    pub bits_per_byte: Interval,
    pub exact_match: Option<Interval>,
    pub edit_similarity: Option<Interval>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub sequences: usize,
    pub target_tokens: usize,
    /// UTF-8 bytes of the target tokens' text.
    pub target_bytes: usize,
    pub holes: usize,
    /// The prompt format of the completions.
    pub template: String,
    pub base: Side,
    pub adapter: Option<Side>,
    /// Adapter less base, nats per token, paired over the sequences.
    pub delta_nll: Option<Interval>,
    /// Adapter less base, paired over the holes.
    pub delta_exact_match: Option<Interval>,
    pub delta_edit_similarity: Option<Interval>,
}

/// 2.5th and 97.5th percentiles of `stat` over 1,000 resamples (with
/// replacement) of `0..n`, seeded; `mean` is `stat` of all.
fn bootstrap(n: usize, seed: u64, stat: &dyn Fn(&[usize]) -> f64) -> Interval {
    let all: Vec<usize> = (0..n).collect();
    let mean = stat(&all);
    if n == 0 {
        return Interval {
            mean,
            lo: mean,
            hi: mean,
        };
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut draws: Vec<f64> = (0..1000)
        .map(|_| {
            let pick: Vec<usize> = (0..n).map(|_| rng.usize(..n)).collect();
            stat(&pick)
        })
        .collect();
    draws.sort_by(f64::total_cmp);
    Interval {
        mean,
        lo: kiln_runtime::measure::percentile(&draws, 2.5),
        hi: kiln_runtime::measure::percentile(&draws, 97.5),
    }
}

/// Σ loss / Σ tokens over the picked sequences.
fn ratio(per: &[(f64, usize)], pick: &[usize]) -> f64 {
    let (l, n) = pick
        .iter()
        .fold((0.0, 0usize), |(l, n), &i| (l + per[i].0, n + per[i].1));
    l / n.max(1) as f64
}

#[derive(serde::Deserialize)]
struct HoleLine {
    file: String,
    start: usize,
    end: usize,
}

#[derive(serde::Deserialize)]
struct FileLine {
    path: String,
    text: String,
}

/// (exact, similarity) of each hole's greedy completion by the model at
/// `path`.
fn complete(
    path: &Path,
    adapter: Option<&Path>,
    holes: &[(String, usize, usize)],
    texts: &std::collections::HashMap<String, String>,
    opts: &Options,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<(f64, f64)>, String), String> {
    let loaded = Loaded::load_adapted(
        "eval".into(),
        path.to_path_buf(),
        adapter,
        None,
        &Backend::builtin_cpu(),
        0,
    )?;
    let exec = kiln_runtime::backend::exec::Executor::new(Backend::builtin_cpu(), 0);
    let mut session =
        Session::new(loaded.model.clone(), exec, Some(2048)).map_err(|e| e.to_string())?;
    let counter = Counter::of(&loaded);
    let mut out = Vec::new();
    for (i, (file, start, end)) in holes.iter().enumerate() {
        let text = &texts[file];
        // Without the suffix, the completion starts at its line's start
        // where only indentation comes before the hole: a prompt ending in
        // spaces splits a token the model would write with them.
        let line_start = text[..*start].rfind('\n').map_or(0, |i| i + 1);
        let start = match loaded.fim.uses_suffix() {
            false if text[line_start..*start].trim().is_empty() => &line_start,
            _ => start,
        };
        let middle = &text[*start..*end];
        let prefix = tail_within(&counter, &text[..*start], 512);
        let suffix = head_within(&counter, &text[*end..], 128);
        let want = loaded.tok.encode(middle, false)?.len();
        let max_tokens = opts.max_tokens.min(want + 8).max(1);
        let limit = session.n_ctx().saturating_sub(max_tokens + 1);
        let prompt = fim_tokens(&loaded, "", prefix, suffix, None, limit)
            .map_err(|e| format!("{file}: {e}"))?;
        let mut request = Request::new(prompt, max_tokens, SamplingParams::greedy());
        request.stop = loaded
            .fim
            .stop_strings()
            .iter()
            .map(|s| s.to_string())
            .collect();
        session.truncate(0);
        let g =
            generate(&mut session, &loaded.tok, &request, |_| true).map_err(|e| e.to_string())?;
        let lines = middle.lines().count().max(1);
        let got: Vec<&str> = g.text.lines().take(lines).collect();
        let got = got.join("\n");
        let exact = f64::from(u8::from(got.trim_end() == middle.trim_end()));
        out.push((exact, edit_similarity(got.trim_end(), middle.trim_end())));
        progress(i + 1, holes.len());
    }
    Ok((out, loaded.fim.name().to_string()))
}

/// Evaluates `model` (and the adapter at `adapter_file` on it) on
/// `data`'s held-out files. `progress(what, done, total)` reports each
/// phase.
pub fn evaluate(
    model: &Path,
    data: &Path,
    adapter_file: Option<&Path>,
    opts: &Options,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Report, String> {
    let base = Base::open(model)?;
    let adapter = adapter_file
        .map(|p| super::file::read_adapter(p, &base))
        .transpose()?;
    let seqs: Vec<Sequence> =
        super::run::read_sequences(&data.join("eval.jsonl"), base.cfg.n_vocab)?;
    if seqs.is_empty() {
        return Err(format!(
            "{}: no held-out sequences; prepare the data with --eval-fraction above 0",
            data.display()
        ));
    }
    let tokenizer = kiln_runtime::tokenizer::Tokenizer::from_gguf(base.file())
        .map_err(|e| format!("{}: {e}", model.display()))?;
    // Per sequence, the bytes its targets decode to.
    let bytes: Vec<usize> = seqs
        .iter()
        .map(|s| {
            let ids: Vec<u32> = s.targets().iter().map(|&(_, t)| t).collect();
            tokenizer.decode(&ids).len()
        })
        .collect();
    let trainable = Trainable::<f32>::new(&base);
    let zero = Adapter::<f32>::new(&base, 1, 1.0, &[], 0);
    let mut per_base = Vec::new();
    let mut per_adapter = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        per_base.push(trainable.loss(&zero, s, None));
        if let Some(a) = &adapter {
            per_adapter.push(trainable.loss(a, s, None));
        }
        progress("held-out likelihood", i + 1, seqs.len());
    }
    let n = seqs.len();
    let nll = |per: &[(f64, usize)]| bootstrap(n, opts.seed, &|p| ratio(per, p));
    let delta_nll = adapter.as_ref().map(|_| {
        bootstrap(n, opts.seed, &|p| {
            ratio(&per_adapter, p) - ratio(&per_base, p)
        })
    });

    // Completions at the held-out holes.
    let texts: std::collections::HashMap<String, String> =
        std::fs::read_to_string(data.join("eval_files.jsonl"))
            .map_err(|e| format!("{}: {e}", data.join("eval_files.jsonl").display()))?
            .lines()
            .filter_map(|l| serde_json::from_str::<FileLine>(l).ok())
            .map(|f| (f.path, f.text))
            .collect();
    let holes: Vec<(String, usize, usize)> = std::fs::read_to_string(data.join("holes.jsonl"))
        .map_err(|e| format!("{}: {e}", data.join("holes.jsonl").display()))?
        .lines()
        .filter_map(|l| serde_json::from_str::<HoleLine>(l).ok())
        .filter(|h| {
            texts
                .get(&h.file)
                .is_some_and(|t| h.start < h.end && t.get(h.start..h.end).is_some())
        })
        .map(|h| (h.file, h.start, h.end))
        .take(opts.holes)
        .collect();
    let mut template = String::new();
    let mut sides: Vec<Vec<(f64, f64)>> = Vec::new();
    if !holes.is_empty() {
        // As served: the model's weights as stored, and the adapter
        // applied at run time on them (`kiln serve --adapter`).
        let mut with = vec![("base", None)];
        if adapter_file.is_some() {
            with.push(("adapter", adapter_file));
        }
        for (name, a) in with {
            let what = format!("completions ({name})");
            let (scores, t) = complete(model, a, &holes, &texts, opts, &mut |d, n| {
                progress(&what, d, n)
            })?;
            template = t;
            sides.push(scores);
        }
    }
    let column = |side: &[(f64, f64)], k: usize| -> Vec<f64> {
        side.iter()
            .map(|s| if k == 0 { s.0 } else { s.1 })
            .collect()
    };
    let mean_of =
        |v: &[f64], p: &[usize]| p.iter().map(|&i| v[i]).sum::<f64>() / p.len().max(1) as f64;
    let interval = |v: Vec<f64>| bootstrap(v.len(), opts.seed, &|p| mean_of(&v, p));
    let per_byte = |per: &[(f64, usize)]| -> Vec<(f64, usize)> {
        per.iter().zip(&bytes).map(|(&(l, _), &b)| (l, b)).collect()
    };
    let bits = |per: &[(f64, usize)]| {
        let per = per_byte(per);
        bootstrap(n, opts.seed, &|p| ratio(&per, p) / std::f64::consts::LN_2)
    };
    let side_of = |per: &[(f64, usize)], s: Option<&Vec<(f64, f64)>>| Side {
        nll: nll(per),
        bits_per_byte: bits(per),
        exact_match: s.map(|s| interval(column(s, 0))),
        edit_similarity: s.map(|s| interval(column(s, 1))),
    };
    let paired = |k: usize| -> Option<Interval> {
        let (b, a) = (sides.first()?, sides.get(1)?);
        let d: Vec<f64> = column(a, k)
            .iter()
            .zip(column(b, k))
            .map(|(a, b)| a - b)
            .collect();
        Some(interval(d))
    };
    Ok(Report {
        sequences: n,
        target_tokens: per_base.iter().map(|p| p.1).sum(),
        target_bytes: bytes.iter().sum(),
        holes: holes.len(),
        template,
        base: side_of(&per_base, sides.first()),
        adapter: adapter
            .as_ref()
            .map(|_| side_of(&per_adapter, sides.get(1))),
        delta_nll,
        delta_exact_match: paired(0),
        delta_edit_similarity: paired(1),
    })
}
