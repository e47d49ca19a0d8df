//! `kiln quantize`

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, Progress, human_bytes, print_json, table};
use kiln_runtime::quantize::{Options, Target, quantize};
use std::path::Path;
use std::process::ExitCode;

/// A text sample for `--validate`: prose and code.
const SAMPLE: &str = "The registry keeps every version of every plugin, so a bad update is one command away from being undone.\nfn sum(values: &[f64]) -> f64 {\n    values.iter().copied().sum()\n}\nQuantization trades a little accuracy for a lot of memory bandwidth; the perplexity shows how much.";

/// Perplexity of the source and the quantized model on [`SAMPLE`] (or on
/// fixed token ids when the model has no tokenizer), on the CPU.
fn perplexity_change(input: &Path, output: &Path) -> Result<(f64, f64, usize), String> {
    use kiln_runtime::backend::{Backend, exec::Executor};
    use kiln_runtime::model::{Model, Session, generate::perplexity};
    let ppl = |path: &Path| -> Result<(f64, usize), String> {
        let model = Model::load(path).map_err(|e| e.to_string())?;
        let tokens = match model.tokenizer() {
            Ok(t) => t.encode(SAMPLE, true).map_err(|e| e.to_string())?,
            Err(_) => (0..64)
                .map(|i| (i * 7919 % model.config.n_vocab) as u32)
                .collect(),
        };
        let n = tokens.len();
        let exec = Executor::new(Backend::builtin_cpu(), 0);
        let mut session =
            Session::new(model, exec, Some(n.next_power_of_two())).map_err(|e| e.to_string())?;
        Ok((
            perplexity(&mut session, &tokens).map_err(|e| e.to_string())?,
            n,
        ))
    };
    eprintln!("kiln: measuring perplexity of the source and the result…");
    let (before, n) = ppl(input)?;
    let (after, _) = ppl(output)?;
    Ok((before, after, n))
}

pub fn run(
    input: &Path,
    output: &Path,
    qtype: &str,
    threads: Option<usize>,
    validate: bool,
    allow_requantize: bool,
    as_json: bool,
) -> CliResult {
    let target = Target::parse(qtype).ok_or_else(|| {
        CliError(format!(
            "unknown --type {qtype:?}; choose one of {} (presets that need an importance matrix, such as q2_k_s and the iq types, are not made by kiln)",
            Target::ALL.map(Target::name).join(", ")
        ))
    })?;
    if input == output {
        return Err(CliError(
            "the output must be a different file than the input".into(),
        ));
    }
    let threads = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let progress = Progress::new("quantizing");
    let options = Options {
        target,
        threads,
        validate,
        allow_requantize,
    };
    let summary = quantize(input, output, options, |done, total, name| {
        progress.bytes(done, total, name)
    })?;
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "input": input, "output": output, "type": target,
            "summary": summary,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let changed = summary.tensors.iter().filter(|t| t.from != t.to).count();
    println!(
        "wrote {} ({} -> {}): {changed} of {} tensors converted",
        output.display(),
        human_bytes(summary.input_bytes),
        human_bytes(summary.output_bytes),
        summary.tensors.len()
    );
    if validate {
        match perplexity_change(input, output) {
            Ok((before, after, n)) => println!(
                "perplexity on a {n}-token sample: {before:.4} -> {after:.4} ({:+.2}%)",
                (after / before - 1.0) * 100.0
            ),
            Err(e) => eprintln!("kiln: warning: cannot measure perplexity: {e}"),
        }
        let rows: Vec<Vec<String>> = summary
            .errors
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.dtype.clone(),
                    format!("{:.3e}", e.rmse),
                    format!("{:.6}", e.cosine),
                ]
            })
            .collect();
        println!("{}", table(&["TENSOR", "TYPE", "RMSE", "COSINE"], &rows));
    }
    Ok(ExitCode::SUCCESS)
}
