//! `kiln finetune`: fine-tuning on the user's own code
//! (`kiln_finetune`). `prepare` writes the training data.

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, print_json};
use kiln_finetune::prepare::{self, ForModel, Options, Progress, Report};
use kiln_registry::config::Config;
use kiln_runtime::gguf::GgufFile;
use kiln_runtime::store;
use kiln_runtime::tokenizer::Tokenizer;
use kiln_serve::fim::FimTemplate;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `kiln finetune prepare DIR --model M --out DATA`.
pub fn prepare(
    config: &Config,
    dir: &Path,
    model: Option<&str>,
    out: &Path,
    opts: &Options,
    json: bool,
) -> CliResult {
    let (id, path) = store::resolve_served(config, model)?;
    let file = GgufFile::open(&path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let name = file
        .get("general.name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let template = FimTemplate::detect(&tokenizer, &format!("{name} {}", path.display()));
    drop(file);
    let model = ForModel {
        id: &id,
        tokenizer: &tokenizer,
        template,
    };
    let tty = std::io::stderr().is_terminal();
    let last = Mutex::new(Instant::now());
    let progress = |p: Progress| {
        let mut last = last.lock().expect("not poisoned");
        let final_line = matches!(p, Progress::Examples(d, n) if d == n);
        if !final_line && last.elapsed() < Duration::from_millis(if tty { 200 } else { 2000 }) {
            return;
        }
        *last = Instant::now();
        let line = match p {
            Progress::Walked(n) => format!("kiln: finetune prepare: {n} files found"),
            Progress::Examples(d, n) => format!("kiln: finetune prepare: {d}/{n} files tokenized"),
        };
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r{line}\x1b[K{}", if final_line { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
    };
    let report = prepare::prepare(dir, &model, out, opts, &progress).map_err(CliError)?;
    if json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "out": out,
            "model": id,
            "template": template.name(),
            "seq_len": opts.seq_len,
            "report": report,
        }));
    } else {
        print_report(out, &id, template, &report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(out: &Path, id: &str, template: FimTemplate, r: &Report) {
    let skipped: Vec<String> = (r.files.skipped.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{n} {}", k.replace('_', " ")))
        .collect();
    println!(
        "{} files seen, {} kept ({} train, {} eval); skipped: {}",
        r.files.seen,
        r.files.kept,
        r.files.train,
        r.files.eval,
        if skipped.is_empty() {
            "none".into()
        } else {
            skipped.join(", ")
        }
    );
    let langs: Vec<String> = r
        .languages
        .iter()
        .map(|(l, n)| format!("{l} {n}"))
        .collect();
    println!("languages: {}", langs.join(", "));
    println!(
        "duplicates removed: {} exact, {} near",
        r.duplicates.exact, r.duplicates.near
    );
    let secrets: usize = r.secrets.values().sum();
    let kinds: Vec<String> = r.secrets.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "secrets redacted: {secrets}{}",
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        }
    );
    let e = &r.examples;
    if template == FimTemplate::None {
        println!(
            "examples: {} plain-text windows ({id} has no fill-in-the-middle tokens)",
            e.causal
        );
    } else {
        let spans: Vec<String> = e.by_span.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "examples: {} fill-in-the-middle ({} prefix-suffix-middle, {} suffix-prefix-middle; {}), {} plain-text windows",
            e.fim_psm + e.fim_spm,
            e.fim_psm,
            e.fim_spm,
            spans.join(", "),
            e.causal
        );
    }
    println!(
        "tokens: {} train, {} eval in {} + {} sequences; {} eval holes",
        r.tokens.train, r.tokens.eval, r.sequences.train, r.sequences.eval, r.eval_holes
    );
    println!("wrote {} ({} format)", out.display(), template.name());
}
