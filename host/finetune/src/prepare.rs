//! `kiln finetune prepare DIR --model M --out DATA`: a repository's code
//! as training sequences for `M`.
//!
//! The steps, in order:
//! 1. Walk `DIR` as the workspace index does (`.gitignore`, `.ignore`,
//!    hidden files skipped), paths sorted, and keep what
//!    [`filter::classify`] calls code.
//! 2. Drop exact and near duplicates ([`Dedup`]), the first path kept.
//! 3. Split by file, never by line: the files are ordered by a hash of
//!    the seed and the path, and the first `eval_fraction` of them (at
//!    least one where there are two files) are held out.
//! 4. Per file, on every core: secrets redacted ([`secrets::redact`]),
//!    then examples in the model's own prompt format. Where the model has
//!    fill-in-the-middle tokens: holes at syntactic spans ([`spans`]),
//!    each as prefix-suffix-middle or suffix-prefix-middle (half each),
//!    the prompt as kiln builds it when serving, the middle and the end
//!    token after it, the loss on the middle and the end token only.
//!    Every model also gets the file as plain text (cut into windows of
//!    the sequence length), the loss on every token.
//! 5. Examples packed into sequences of at most `seq_len` tokens in a
//!    seeded order; each sequence lists where its documents start (a
//!    trainer masks attention across them) and the ranges whose tokens
//!    are targets.
//!
//! The data directory (written whole to a temporary directory, then
//! renamed): `manifest.json` (what made it: model, template, options, the
//! files on each side, every file left out and why), `report.json`,
//! `train.jsonl` and `eval.jsonl` (one sequence a line: `tokens`, `docs`,
//! `loss` as `[from, to)` token ranges), `eval_files.jsonl` (the held-out
//! files' redacted text) and `holes.jsonl` (fill-in-the-middle holes in
//! them for exact-match evaluation: file, kind, byte range, middle).

use crate::dedup::{Dedup, Seen};
use crate::filter::{self, Skip};
use crate::secrets;
use crate::spans::{self, SpanKind};
use kiln_runtime::tokenizer::Tokenizer;
use kiln_serve::fim::FimTemplate;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The data directory's format (`manifest.json`'s `format`).
pub const FORMAT: u32 = 1;

pub struct Options {
    /// Tokens per training sequence at most.
    pub seq_len: usize,
    /// The share of files held out for evaluation.
    pub eval_fraction: f64,
    pub seed: u64,
    /// Fill-in-the-middle holes cut in the held-out files at most.
    pub eval_holes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seq_len: 1024,
            eval_fraction: 0.1,
            seed: 1,
            eval_holes: 200,
        }
    }
}

/// The model the data is for: its tokenizer and its fill-in-the-middle
/// template.
pub struct ForModel<'a> {
    pub id: &'a str,
    pub tokenizer: &'a Tokenizer,
    pub template: FimTemplate,
}

/// What a run found and wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub files: Files,
    /// Files kept per language.
    pub languages: BTreeMap<&'static str, usize>,
    pub duplicates: Duplicates,
    /// Secrets replaced in the files kept, per kind.
    pub secrets: BTreeMap<&'static str, usize>,
    pub tokens: Split,
    pub sequences: Split,
    pub examples: Examples,
    /// Fill-in-the-middle holes cut in the held-out files.
    pub eval_holes: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Files {
    /// Files the walk found (after `.gitignore`).
    pub seen: usize,
    pub kept: usize,
    pub train: usize,
    pub eval: usize,
    /// Files not learnt from, per reason.
    pub skipped: BTreeMap<&'static str, usize>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Duplicates {
    pub exact: usize,
    pub near: usize,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Split {
    pub train: usize,
    pub eval: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Examples {
    /// Prefix-suffix-middle and suffix-prefix-middle examples.
    pub fim_psm: usize,
    pub fim_spm: usize,
    /// Windows of whole files.
    pub causal: usize,
    /// Fill-in-the-middle examples per kind of hole.
    pub by_span: BTreeMap<&'static str, usize>,
    /// Holes skipped because their middle alone would fill half a sequence.
    pub too_long: usize,
}

/// Progress of a run, for a progress line.
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// Files walked so far.
    Walked(usize),
    /// Files turned into examples, of the total.
    Examples(usize, usize),
}

/// One example: its tokens, and the first of those that are targets
/// (the rest of the example is, to its end).
struct Example {
    tokens: Vec<u32>,
    loss_from: usize,
}

/// One packed sequence, as a line of `train.jsonl`/`eval.jsonl`.
#[derive(Serialize)]
struct Sequence {
    tokens: Vec<u32>,
    docs: Vec<usize>,
    loss: Vec<[usize; 2]>,
}

/// A held-out hole, as a line of `holes.jsonl`.
#[derive(Serialize)]
struct Hole<'a> {
    file: &'a str,
    kind: SpanKind,
    start: usize,
    end: usize,
    middle: &'a str,
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn path_hash(seed: u64, path: &str) -> u64 {
    path.bytes().fold(mix(seed), |h, b| mix(h ^ b as u64))
}

/// Runs the preparation of `root` for `model` into `out`.
pub fn prepare(
    root: &Path,
    model: &ForModel,
    out: &Path,
    opts: &Options,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Report, String> {
    if opts.seq_len < 64 {
        return Err(format!(
            "--seq-len {} is too short for an example; use 64 tokens or more",
            opts.seq_len
        ));
    }
    if !(0.0..1.0).contains(&opts.eval_fraction) {
        return Err(format!(
            "--eval-fraction {} must be at least 0 and below 1",
            opts.eval_fraction
        ));
    }
    let target = check_out(out)?;
    if !root.is_dir() {
        return Err(format!(
            "{}: not a directory; name the repository to learn from",
            root.display()
        ));
    }
    let mut report = Report::default();

    // 1-2. Walk, classify, deduplicate.
    let mut found: Vec<(String, PathBuf, u64)> = Vec::new();
    let walk = ignore::WalkBuilder::new(root)
        .require_git(false)
        .follow_links(false)
        .build();
    for entry in walk.flatten() {
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(path);
        let rel = rel.to_string_lossy().replace('\\', "/");
        let size = entry.metadata().map_or(0, |m| m.len());
        found.push((rel, path.to_path_buf(), size));
        if found.len().is_multiple_of(1000) {
            progress(Progress::Walked(found.len()));
        }
    }
    found.sort();
    report.files.seen = found.len();
    let mut dedup = Dedup::default();
    let mut kept: Vec<(String, &'static str, String)> = Vec::new();
    // Every file left out and why, for the manifest.
    let mut left_out: Vec<(String, &'static str)> = Vec::new();
    for (rel, path, size) in found {
        let why = match filter::classify(&rel, size, || std::fs::read(&path)) {
            Err(skip) => {
                *report.files.skipped.entry(skip.name()).or_insert(0) += 1;
                skip.name()
            }
            Ok((lang, text)) => match dedup.offer(&text) {
                Seen::Exact => {
                    report.duplicates.exact += 1;
                    "exact_duplicate"
                }
                Seen::Near => {
                    report.duplicates.near += 1;
                    "near_duplicate"
                }
                Seen::New => {
                    kept.push((rel, lang, text));
                    continue;
                }
            },
        };
        left_out.push((rel, why));
    }
    for skip in Skip::ALL {
        report.files.skipped.entry(skip.name()).or_insert(0);
    }
    if kept.is_empty() {
        return Err(format!(
            "{}: no source files to learn from ({} files seen; skipped: {})",
            root.display(),
            report.files.seen,
            skipped_summary(&report.files.skipped)
        ));
    }
    report.files.kept = kept.len();
    for (_, lang, _) in &kept {
        *report.languages.entry(lang).or_insert(0) += 1;
    }

    // 3. Split by file.
    let mut order: Vec<usize> = (0..kept.len()).collect();
    order.sort_by_key(|&i| (path_hash(opts.seed, &kept[i].0), i));
    let mut n_eval = (kept.len() as f64 * opts.eval_fraction).ceil() as usize;
    if opts.eval_fraction > 0.0 && kept.len() >= 2 {
        n_eval = n_eval.clamp(1, kept.len() - 1);
    } else {
        n_eval = 0;
    }
    let mut is_eval = vec![false; kept.len()];
    for &i in &order[..n_eval] {
        is_eval[i] = true;
    }
    report.files.eval = n_eval;
    report.files.train = kept.len() - n_eval;

    // 4. Examples, on every core.
    let holes_per_eval_file = opts.eval_holes.div_ceil(n_eval.max(1));
    let results: Vec<Mutex<Option<FileResult>>> = kept.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= kept.len() || failed.lock().expect("not poisoned").is_some() {
                        break;
                    }
                    let (rel, _, text) = &kept[i];
                    let holes = if is_eval[i] { holes_per_eval_file } else { 0 };
                    match examples_of(model, opts, rel, text, holes) {
                        Ok(r) => *results[i].lock().expect("not poisoned") = Some(r),
                        Err(e) => {
                            *failed.lock().expect("not poisoned") = Some(format!("{rel}: {e}"));
                        }
                    }
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d.is_multiple_of(64) || d == kept.len() {
                        progress(Progress::Examples(d, kept.len()));
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("not poisoned") {
        return Err(e);
    }

    // 5. Pack and write.
    let tmp = out.with_file_name(format!(
        ".{}.partial-{}",
        out.file_name()
            .map_or("data".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let written = (|| {
        let mut train = Vec::new();
        let mut eval = Vec::new();
        let mut eval_files = String::new();
        let mut holes_jsonl = String::new();
        let mut n_holes = 0;
        for (i, cell) in results.into_iter().enumerate() {
            let r = cell
                .into_inner()
                .expect("not poisoned")
                .expect("every file processed");
            let (rel, lang, _) = &kept[i];
            for (k, n) in &r.secrets {
                *report.secrets.entry(k).or_insert(0) += n;
            }
            let e = &mut report.examples;
            e.fim_psm += r.psm;
            e.fim_spm += r.spm;
            e.causal += r.causal;
            e.too_long += r.too_long;
            for (k, n) in &r.by_span {
                *e.by_span.entry(k.name()).or_insert(0) += n;
            }
            if is_eval[i] {
                eval.extend(r.examples);
                eval_files.push_str(&json_line(&serde_json::json!({
                    "path": rel, "language": lang, "text": r.text,
                })));
                for h in r.holes.iter().take(opts.eval_holes.saturating_sub(n_holes)) {
                    holes_jsonl.push_str(&json_line(&Hole {
                        file: rel,
                        kind: h.kind,
                        start: h.start,
                        end: h.end,
                        middle: &r.text[h.start..h.end],
                    }));
                    n_holes += 1;
                }
            } else {
                train.extend(r.examples);
            }
        }
        for k in SpanKind::ALL {
            report.examples.by_span.entry(k.name()).or_insert(0);
        }
        report.eval_holes = n_holes;
        let mut rng = fastrand::Rng::with_seed(opts.seed);
        for (name, examples, tokens, sequences) in [
            (
                "train.jsonl",
                train,
                &mut report.tokens.train,
                &mut report.sequences.train,
            ),
            (
                "eval.jsonl",
                eval,
                &mut report.tokens.eval,
                &mut report.sequences.eval,
            ),
        ] {
            let packed = pack(examples, opts.seq_len, &mut rng);
            *tokens = packed.iter().map(|s| s.tokens.len()).sum();
            *sequences = packed.len();
            let mut f = create(&tmp.join(name))?;
            for s in &packed {
                f.write_all(json_line(s).as_bytes())
                    .map_err(|e| format!("{name}: {e}"))?;
            }
            f.flush().map_err(|e| format!("{name}: {e}"))?;
        }
        write(&tmp.join("eval_files.jsonl"), &eval_files)?;
        write(&tmp.join("holes.jsonl"), &holes_jsonl)?;
        let split = |eval: bool| -> Vec<&str> {
            (kept.iter().zip(&is_eval))
                .filter(|(_, e)| **e == eval)
                .map(|((p, ..), _)| p.as_str())
                .collect()
        };
        let manifest = serde_json::json!({
            "format": FORMAT,
            "kiln_version": env!("CARGO_PKG_VERSION"),
            "source": root,
            "model": model.id,
            "template": model.template.name(),
            "vocabulary": model.tokenizer.n_vocab(),
            "seq_len": opts.seq_len,
            "seed": opts.seed,
            "eval_fraction": opts.eval_fraction,
            "files": {"train": split(false), "eval": split(true)},
            "left_out": left_out
                .iter()
                .map(|(p, why)| serde_json::json!({"path": p, "reason": why}))
                .collect::<Vec<_>>(),
        });
        write(
            &tmp.join("manifest.json"),
            &serde_json::to_string_pretty(&manifest).expect("JSON"),
        )?;
        write(
            &tmp.join("report.json"),
            &serde_json::to_string_pretty(&report).expect("JSON"),
        )?;
        Ok::<(), String>(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if target.replace {
        std::fs::remove_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        format!("{}: {e}", out.display())
    })?;
    Ok(report)
}

fn skipped_summary(skipped: &BTreeMap<&'static str, usize>) -> String {
    let parts: Vec<String> = (skipped.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Whether `out` may be written: absent, empty, or an earlier run's data
/// (replaced once the new one is complete).
struct Target {
    replace: bool,
}

fn check_out(out: &Path) -> Result<Target, String> {
    match std::fs::read_dir(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Target { replace: false }),
        Err(e) => Err(format!("{}: {e}", out.display())),
        Ok(mut entries) => {
            let ours = out.join("manifest.json").is_file() && out.join("train.jsonl").is_file();
            if entries.next().is_none() || ours {
                Ok(Target { replace: true })
            } else {
                Err(format!(
                    "{}: exists and is not a directory `kiln finetune prepare` wrote; \
                     name a new --out directory or remove this one",
                    out.display()
                ))
            }
        }
    }
}

fn json_line<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string(v).expect("JSON");
    s.push('\n');
    s
}

fn create(path: &Path) -> Result<std::io::BufWriter<std::fs::File>, String> {
    std::fs::File::create(path)
        .map(std::io::BufWriter::new)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One file's part of the data.
struct FileResult {
    text: String,
    secrets: BTreeMap<&'static str, usize>,
    examples: Vec<Example>,
    /// The holes cut for evaluation (held-out files only).
    holes: Vec<spans::Span>,
    psm: usize,
    spm: usize,
    causal: usize,
    too_long: usize,
    by_span: BTreeMap<SpanKind, usize>,
}

/// Holes per file: one per 10 lines, 2 to 48 (each is its own task, so a
/// small repository still yields a few hundred examples).
fn holes_for(text: &str) -> usize {
    (text.lines().count() / 10).clamp(2, 48)
}

fn examples_of(
    model: &ForModel,
    opts: &Options,
    rel: &str,
    raw: &str,
    eval_holes: usize,
) -> Result<FileResult, String> {
    let (text, found) = secrets::redact(raw);
    let tok = model.tokenizer;
    let mut rng = fastrand::Rng::with_seed(path_hash(opts.seed ^ 0x5eed, rel));
    let mut r = FileResult {
        text: String::new(),
        secrets: found,
        examples: Vec::new(),
        holes: Vec::new(),
        psm: 0,
        spm: 0,
        causal: 0,
        too_long: 0,
        by_span: BTreeMap::new(),
    };
    // The file as plain text, in windows of the sequence length.
    let ids = tok.encode(&text, true)?;
    for window in ids.chunks(opts.seq_len) {
        if window.len() >= 2 {
            r.examples.push(Example {
                tokens: window.to_vec(),
                loss_from: 1,
            });
            r.causal += 1;
        }
    }
    let all = spans::spans(rel, &text);
    if eval_holes > 0 {
        r.holes = spans::choose(&all, eval_holes, &mut rng);
    }
    if model.template != FimTemplate::None {
        for span in spans::choose(&all, holes_for(&text), &mut rng) {
            let spm = rng.bool();
            match fim_example(model, opts.seq_len, &text, span, spm)? {
                Some(e) => {
                    r.examples.push(e);
                    if spm {
                        r.spm += 1;
                    } else {
                        r.psm += 1;
                    }
                    *r.by_span.entry(span.kind).or_insert(0) += 1;
                }
                None => r.too_long += 1,
            }
        }
    }
    r.text = text;
    Ok(r)
}

/// The fill-in-the-middle example of `span`: the prompt the server would
/// build around it (prefix-suffix-middle, or suffix-prefix-middle with
/// `spm`), then the middle and the end token; `None` when the middle takes
/// more than half the sequence.
fn fim_example(
    model: &ForModel,
    seq_len: usize,
    text: &str,
    span: spans::Span,
    spm: bool,
) -> Result<Option<Example>, String> {
    let tok = model.tokenizer;
    // The server's own budgeted cuts (whole lines, counted line by line);
    // the whole prompt is encoded and checked below.
    let memo = kiln_serve::prompt::TokenCounts::default();
    let counter = kiln_serve::prompt::Counter {
        tok,
        memo: &memo,
        repo: None,
    };
    let mut middle = tok.encode(&text[span.start..span.end], false)?;
    if let Some(eos) = tok.eos {
        middle.push(eos);
    }
    if middle.len() > seq_len / 2 {
        return Ok(None);
    }
    // Room for the prefix and suffix, less the template's tokens and BOS;
    // narrowed until the whole fits (tokens merge across the joins).
    let mut room = seq_len - middle.len() - 16;
    for _ in 0..8 {
        let suffix = kiln_serve::prompt::head_within(&counter, &text[span.end..], room / 4);
        let used = tok.encode(suffix, false)?.len();
        let prefix = kiln_serve::prompt::tail_within(
            &counter,
            &text[..span.start],
            room.saturating_sub(used),
        );
        let prompt = if spm {
            model.template.build_spm(prefix, suffix)
        } else {
            Some(model.template.build("", prefix, suffix))
        }
        .expect("a template with fill-in-the-middle");
        let mut tokens = tok.encode(&prompt, true)?;
        if tokens.len() + middle.len() <= seq_len {
            let loss_from = tokens.len();
            tokens.extend_from_slice(&middle);
            return Ok(Some(Example { tokens, loss_from }));
        }
        room = room * 7 / 8;
    }
    Ok(None)
}

/// Examples in a seeded order, packed next-fit into sequences of at most
/// `seq_len` tokens.
fn pack(mut examples: Vec<Example>, seq_len: usize, rng: &mut fastrand::Rng) -> Vec<Sequence> {
    rng.shuffle(&mut examples);
    let mut out: Vec<Sequence> = Vec::new();
    for e in examples {
        let fits = out
            .last()
            .is_some_and(|s| s.tokens.len() + e.tokens.len() <= seq_len);
        if !fits {
            out.push(Sequence {
                tokens: Vec::with_capacity(seq_len),
                docs: Vec::new(),
                loss: Vec::new(),
            });
        }
        let s = out.last_mut().expect("a sequence");
        let at = s.tokens.len();
        s.docs.push(at);
        s.loss.push([at + e.loss_from, at + e.tokens.len()]);
        s.tokens.extend(e.tokens);
    }
    out
}
