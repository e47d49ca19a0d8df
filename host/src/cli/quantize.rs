//! `kiln quantize`

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, Progress, human_bytes, print_json, table};
use crate::quantize::{Target, quantize};
use std::path::Path;
use std::process::ExitCode;

pub fn run(
    input: &Path,
    output: &Path,
    qtype: &str,
    threads: Option<usize>,
    validate: bool,
    as_json: bool,
) -> CliResult {
    let target = Target::parse(qtype).ok_or_else(|| {
        CliError(format!(
            "unknown --type {qtype:?}; choose q4_0, q5_0, q8_0, f16 or bf16"
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
    let summary = quantize(
        input,
        output,
        target,
        threads,
        validate,
        |done, total, name| progress.bytes(done, total, name),
    )?;
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
