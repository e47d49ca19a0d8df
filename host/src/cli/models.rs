//! `kiln models …`

use super::{
    CliError, CliResult, JSON_SCHEMA_VERSION, Progress, human_bytes, open_registry, print_json,
    table,
};
use kiln_registry::actor;
use kiln_registry::config::Config;
use kiln_runtime::store::{self, BlobStatus};
use std::path::Path;
use std::process::ExitCode;

pub fn add(config: &Config, file: &Path, name: Option<&str>, as_json: bool) -> CliResult {
    let mut registry = open_registry(config)?;
    let progress = Progress::new("copying into the model store");
    let (record, t) = store::add(config, &mut registry, file, name, &actor(), |d, total| {
        progress.bytes(d, total, "")
    })?;
    if as_json {
        print_json(
            &serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "model": record, "previous_active": t.before}),
        );
    } else {
        println!(
            "added {} ({}, {}, {}){}; now active",
            record.label(),
            record.architecture,
            record.quant_type,
            human_bytes(record.size_bytes),
            record
                .parent
                .as_ref()
                .map(|p| format!(", quantized from {p}"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn import(config: &Config, from: &[String], only_list: bool, as_json: bool) -> CliResult {
    use kiln_runtime::import::{self, Outcome, Source};
    let mut sources = Vec::new();
    for f in from {
        sources.push(Source::parse(f).ok_or_else(|| {
            CliError(format!(
                "unknown source {f:?} for --from; choose hf, ollama or lmstudio"
            ))
        })?);
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let roots: Vec<_> = import::roots(home.as_deref(), |k| std::env::var_os(k))
        .into_iter()
        .filter(|(s, _)| sources.is_empty() || sources.contains(s))
        .collect();
    let (found, skipped) = import::discover(&roots);
    if only_list {
        if as_json {
            print_json(&serde_json::json!({
                "schema_version": JSON_SCHEMA_VERSION,
                "searched": roots.iter().map(|(s, p)| serde_json::json!({"source": s, "path": p})).collect::<Vec<_>>(),
                "found": found, "skipped": skipped,
            }));
            return Ok(ExitCode::SUCCESS);
        }
        for (s, p) in &roots {
            let state = if p.is_dir() { "" } else { " (absent)" };
            println!("searched {} {}{state}", s.name(), p.display());
        }
        for f in &found {
            println!("found {} -> {} ({})", f.origin(), f.name, f.path.display());
        }
        for s in &skipped {
            println!("skipped {}: {}", s.path.display(), s.why);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut registry = open_registry(config)?;
    let mut results = Vec::new();
    let mut failed = 0;
    for f in &found {
        let progress = Progress::new("hashing");
        let r = import::import(config, &mut registry, f, &actor(), |d, total| {
            progress.bytes(d, total, &f.name)
        });
        match &r {
            Ok(Outcome::Imported { model, linked }) if !as_json => println!(
                "imported {} as {} ({}, {}, {}; {})",
                f.origin(),
                model.label(),
                model.architecture,
                model.quant_type,
                human_bytes(model.size_bytes),
                if *linked {
                    "hard-linked, no copy"
                } else {
                    "copied: another file system"
                }
            ),
            Ok(Outcome::Already { model }) if !as_json => {
                println!("{} is already {model}", f.origin())
            }
            Err(e) if !as_json => eprintln!("kiln: not imported: {}: {e}", f.origin()),
            _ => {}
        }
        failed += usize::from(r.is_err());
        results.push(match r {
            Ok(o) => serde_json::json!({"origin": f.origin(), "outcome": o}),
            Err(e) => serde_json::json!({"origin": f.origin(), "error": e.to_string()}),
        });
    }
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION, "results": results, "skipped": skipped,
        }));
    } else {
        for s in &skipped {
            println!("skipped {}: {}", s.path.display(), s.why);
        }
        if found.is_empty() {
            println!(
                "No GGUF models found in {}.",
                roots
                    .iter()
                    .map(|(_, p)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub fn list(config: &Config, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let models = registry.models()?;
    if as_json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "models": models}));
        return Ok(ExitCode::SUCCESS);
    }
    if models.is_empty() {
        println!("No models registered (`kiln models add FILE`).");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.version.to_string(),
                m.state.clone(),
                m.architecture.clone(),
                m.quant_type.clone(),
                human_bytes(m.size_bytes),
                m.parent.clone().unwrap_or_default(),
                if m.encrypted { "age" } else { "plain" }.to_string(),
                m.sha256[..12].to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "NAME", "VERSION", "STATE", "ARCH", "TYPE", "SIZE", "PARENT", "STORED", "SHA256"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

pub fn verify(config: &Config, as_json: bool, remove_orphans: bool) -> CliResult {
    let registry = open_registry(config)?;
    let keys = kiln_runtime::crypt::Keys::from_env(config)?;
    let results = store::verify(&registry, &keys, |m| eprintln!("kiln: hashing {m}…"))?;
    let orphans = store::orphans(config, &registry, remove_orphans)?;
    let bad = results
        .iter()
        .filter(|r| !matches!(r.status, BlobStatus::Ok))
        .count()
        + if remove_orphans { 0 } else { orphans.len() };
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "blobs": results,
            "orphans": orphans,
            "orphans_removed": remove_orphans,
            "problems": bad,
        }));
    } else {
        for r in &results {
            match &r.status {
                BlobStatus::Ok => println!("ok       {}", r.model),
                BlobStatus::Missing => println!("MISSING  {} ({})", r.model, r.blob_path.display()),
                BlobStatus::Damaged { reason } | BlobStatus::Locked { reason } => println!(
                    "{}  {} ({}: {reason})",
                    if matches!(r.status, BlobStatus::Damaged { .. }) {
                        "DAMAGED"
                    } else {
                        "LOCKED "
                    },
                    r.model,
                    r.blob_path.display()
                ),
                BlobStatus::Corrupt { actual_sha256 } => println!(
                    "CORRUPT  {} ({}: sha256 is {actual_sha256}, expected {}); nothing was deleted: restore the file or `kiln models rollback`",
                    r.model,
                    r.blob_path.display(),
                    r.sha256
                ),
            }
        }
        for o in &orphans {
            println!(
                "{}  {} ({}, no model version uses it{})",
                if remove_orphans { "REMOVED" } else { "ORPHAN " },
                o.path.display(),
                human_bytes(o.bytes),
                if remove_orphans {
                    ""
                } else {
                    "; `kiln models verify --remove-orphans` deletes it"
                }
            );
        }
        println!(
            "{} blob(s) checked, {} orphan file(s){}, {bad} problem(s)",
            results.len(),
            orphans.len(),
            if remove_orphans { " removed" } else { "" }
        );
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
