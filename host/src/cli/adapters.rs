//! `kiln adapters`: LoRA adapters as registry versions beside models
//! (add, list; enable, disable and rollback through `lifecycle.rs`).

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, open_registry, print_json, table};
use kiln_registry::config::Config;
use kiln_registry::{AdapterEval, NewAdapter, actor};
use kiln_runtime::gguf::GgufFile;
use kiln_runtime::measure::human_bytes;
use kiln_runtime::store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `kiln adapters add FILE [--name NAME] [--model M]`: checked (against
/// the model where one is named), copied into the store, a new active
/// version.
pub fn add(
    config: &Config,
    file: &Path,
    name: Option<&str>,
    model: Option<&str>,
    json: bool,
) -> CliResult {
    let f = GgufFile::open(file)?;
    let meta = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    if meta("general.type") != "adapter" || meta("adapter.type") != "lora" {
        return Err(CliError(format!(
            "{}: not a LoRA adapter (general.type = adapter, adapter.type = lora); \
             make one with `kiln finetune train` or llama.cpp's convert_lora_to_gguf.py",
            file.display()
        )));
    }
    let rank = (f.tensors.iter())
        .find(|t| t.name.ends_with(".lora_b"))
        .map(|t| t.ne[0] as u32)
        .ok_or_else(|| {
            CliError(format!(
                "{}: the adapter holds no LoRA pair",
                file.display()
            ))
        })?;
    let alpha = f
        .get("adapter.lora.alpha")
        .and_then(|v| v.as_f64())
        .unwrap_or(rank as f64);
    let architecture = meta("general.architecture");
    let dp = |k: &str| {
        f.get(&format!("kiln.finetune.dp.{k}"))
            .and_then(|v| v.as_f64())
    };
    let (dp_epsilon, dp_delta) = (dp("epsilon"), dp("delta"));
    drop(f);
    let base_sha256 = match model {
        Some(m) => {
            let (_, path) = store::resolve_served(config, Some(m))?;
            let base = kiln_finetune::train::model::Base::open(&path).map_err(CliError)?;
            kiln_finetune::train::file::read_adapter(file, &base).map_err(CliError)?;
            Some(store::hash_file(&path, |_| {})?)
        }
        None => None,
    };
    // Published under the adapter store's lock, held until it is recorded.
    let published = store::publish_adapter(config, file)?;
    let (sha256, blob) = (published.sha256.clone(), published.blob_path.clone());
    let name = name.map(str::to_string).unwrap_or_else(|| {
        file.file_stem()
            .map_or_else(|| "adapter".into(), |s| s.to_string_lossy().into_owned())
    });
    let mut registry = open_registry(config)?;
    let (record, t) = registry.add_adapter(
        &NewAdapter {
            name,
            sha256,
            blob_path: blob,
            architecture,
            rank,
            alpha,
            size_bytes: std::fs::metadata(file).map_or(0, |m| m.len()),
            base_sha256,
            dp_epsilon,
            dp_delta,
        },
        &actor(),
    )?;
    drop(published);
    if json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "adapter": record, "previous_active": t.before,
        }));
    } else {
        let dp = match (record.dp_epsilon, record.dp_delta) {
            (Some(e), Some(d)) => {
                format!(", trained with (ε = {e:.2}, δ = {d:e}) differential privacy")
            }
            _ => String::new(),
        };
        println!(
            "added {} ({} rank {}, alpha {}, {}{dp}); now active",
            record.label(),
            record.architecture,
            record.rank,
            record.alpha,
            human_bytes(record.size_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln adapters list`.
pub fn list(config: &Config, json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let adapters = registry.adapters()?;
    // Each version with its newest evaluation.
    let latest: Vec<Option<AdapterEval>> = adapters
        .iter()
        .map(|a| Ok(registry.adapter_evals(a)?.into_iter().next()))
        .collect::<Result<_, kiln_registry::RegistryError>>()?;
    if json {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            #[serde(flatten)]
            adapter: &'a kiln_registry::AdapterRecord,
            latest_eval: &'a Option<AdapterEval>,
        }
        let rows: Vec<Row> = adapters
            .iter()
            .zip(&latest)
            .map(|(adapter, latest_eval)| Row {
                adapter,
                latest_eval,
            })
            .collect();
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "adapters": rows}));
        return Ok(ExitCode::SUCCESS);
    }
    if adapters.is_empty() {
        println!("no adapters; add one with `kiln adapters add FILE`");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = adapters
        .iter()
        .zip(&latest)
        .map(|(a, e)| {
            vec![
                a.label(),
                a.state.clone(),
                a.architecture.clone(),
                format!("{}", a.rank),
                format!("{}", a.alpha),
                human_bytes(a.size_bytes),
                e.as_ref().map_or("-".into(), |e| {
                    format!(
                        "{:+.3} [{:+.3}, {:+.3}]",
                        e.delta_nll, e.delta_nll_lo, e.delta_nll_hi
                    )
                }),
                a.added_at.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "ADAPTER",
                "STATE",
                "ARCH",
                "RANK",
                "ALPHA",
                "SIZE",
                "Δ NLL (LAST EVAL)",
                "ADDED"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

/// `--adapter FILE-or-NAME`: a file as it is, or a registered adapter
/// (`NAME` for its active version, `NAME@VERSION`): (its file, the name
/// the served model carries).
pub fn resolve(config: &Config, spec: &Path) -> Result<(PathBuf, String), CliError> {
    kiln_runtime::store::resolve_adapter(config, &spec.to_string_lossy())
        .map_err(|e| CliError(format!("--adapter: {e}")))
}
