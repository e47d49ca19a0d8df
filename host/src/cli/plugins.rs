//! `kiln plugins …`

use super::{CliResult, JSON_SCHEMA_VERSION, Progress, open_registry, print_json, table};
use kiln_registry::actor;
use kiln_registry::config::Config;
use kiln_runtime::install::add_plugin;
use serde_json::json;
use std::process::ExitCode;

pub fn list(config: &Config, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let installed = registry.plugins()?;
    let discovered: Vec<serde_json::Value> = kiln_runtime::plugin::discover(config)
        .into_iter()
        .filter_map(|d| {
            let m = d.manifest.as_ref().ok();
            let is_installed = m.is_some_and(|m| {
                installed.iter().any(|p| {
                    p.name == m.name && p.version == m.version.to_string() && p.sha256 == m.sha256
                })
            });
            (!is_installed).then(|| {
                json!({
                    "manifest": d.manifest_path,
                    "origin": d.dir.origin,
                    "name": m.map(|m| m.name.clone()),
                    "version": m.map(|m| m.version.to_string()),
                    "error": d.manifest.as_ref().err(),
                })
            })
        })
        .collect();
    if as_json {
        // Each version with the device scores measured for its build.
        let plugins: Vec<serde_json::Value> = installed
            .iter()
            .map(|p| {
                let mut v = serde_json::to_value(p).unwrap_or_default();
                v["isolation"] = json!(config.plugin_run.isolation_of(&p.name));
                v["crashes"] = serde_json::to_value(
                    registry
                        .plugin_crashes(Some(&p.name), 10)
                        .unwrap_or_default(),
                )
                .unwrap_or_default();
                v["scores"] = serde_json::to_value(
                    registry
                        .scores(&kiln_runtime::backend::score::cache_key(&p.sha256))
                        .unwrap_or_default(),
                )
                .unwrap_or_default();
                v
            })
            .collect();
        print_json(&json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "plugins": plugins,
            "discovered_not_installed": discovered,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    if installed.is_empty() {
        println!("No plugins installed (the built-in CPU backend is always there).");
    } else {
        let rows: Vec<Vec<String>> = installed
            .iter()
            .map(|p| {
                let c = &p.conformance;
                let state = format!("{:?}", p.state).to_lowercase();
                vec![
                    p.name.clone(),
                    p.version.clone(),
                    if p.quarantined_at.is_some() {
                        format!("{state}, quarantined")
                    } else {
                        state
                    },
                    match config.plugin_run.isolation_of(&p.name) {
                        kiln_registry::config::IsolationSetting::Process => "process".into(),
                        kiln_registry::config::IsolationSetting::InProcess => "in-process".into(),
                    },
                    p.abi.clone(),
                    format!("{} passed, {} not claimed", c["passed"], c["not_claimed"]),
                    p.sha256[..12].to_string(),
                ]
            })
            .collect();
        println!(
            "{}",
            table(
                &[
                    "NAME",
                    "VERSION",
                    "STATE",
                    "RUNS",
                    "ABI",
                    "CONFORMANCE",
                    "SHA256"
                ],
                &rows
            )
        );
    }
    if !discovered.is_empty() {
        println!("\nFound in plugin directories, not installed (`kiln plugins add PATH`):");
        for d in &discovered {
            match (&d["name"], &d["error"]) {
                (serde_json::Value::String(n), _) => {
                    println!(
                        "  {n} {}  {}",
                        d["version"].as_str().unwrap_or(""),
                        d["manifest"].as_str().unwrap_or("")
                    )
                }
                (_, e) => println!(
                    "  {}  (unreadable: {})",
                    d["manifest"].as_str().unwrap_or(""),
                    e.as_str().unwrap_or("")
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn add(config: &Config, arg: &str, as_json: bool) -> CliResult {
    let manifest = kiln_runtime::plugin::resolve_manifest(arg, config)?;
    let mut registry = open_registry(config)?;
    let progress = Progress::new("conformance");
    let installed = add_plugin(config, &mut registry, &manifest, &actor(), |d, t| {
        progress.update(d, t)
    })?;
    let summary = installed.conformance.summary();
    if as_json {
        print_json(&json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "name": installed.plugin.manifest.name,
            "version": installed.plugin.manifest.version.to_string(),
            "sha256": installed.plugin.sha256,
            "previous_active": installed.transition.before,
            "conformance": summary,
            "cases": installed.conformance.devices.iter().map(|d| json!({
                "device": d.device, "cases": d.cases,
            })).collect::<Vec<_>>(),
        }));
    } else {
        let was = match &installed.transition.before {
            Some(v) => format!(" (was {v})"),
            None => String::new(),
        };
        println!(
            "added {}: conformance {} passed, {} not claimed (those run on the CPU); now active{was}",
            installed.plugin.label(),
            summary["passed"],
            summary["not_claimed"],
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `kiln plugins trust NAME` (`trusted`) and `kiln plugins isolate NAME`:
/// where the plugin runs, written to config.toml as a recorded change.
pub fn trust(config: &Config, name: &str, trusted: bool) -> CliResult {
    let mut registry = open_registry(config)?;
    if !registry.plugins()?.iter().any(|p| p.name == name) {
        return Err(format!(
            "no installed plugin named {name}; `kiln plugins list` shows what is installed"
        )
        .into());
    }
    let setting = trusted.then_some(kiln_registry::config::IsolationSetting::InProcess);
    let (before, after) = kiln_registry::config::with_isolation(config, name, setting)?;
    if before == after {
        println!(
            "{name} already runs {}",
            if trusted {
                "in kiln's process"
            } else {
                "in a worker process"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let reason = if trusted {
        format!("kiln plugins trust {name}: it runs in kiln's process")
    } else {
        format!("kiln plugins isolate {name}: it runs in a worker process")
    };
    let version = registry.record_config_version(&actor(), &reason, &before, &after)?;
    kiln_registry::config::write_config_text(config, &after)?;
    println!(
        "{name} runs {} from the next start (config.toml change {version}; `kiln tune rollback` undoes it){}",
        if trusted {
            "in kiln's process"
        } else {
            "in a supervised worker process"
        },
        if trusted {
            "; a crash in it is now a crash of kiln"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `kiln plugins release NAME`: lifts a quarantine.
pub fn release(config: &Config, name: &str) -> CliResult {
    let mut registry = open_registry(config)?;
    let crashes = registry.plugin_crashes(Some(name), 1)?;
    let record = registry.release_plugin(name, &actor())?;
    let last = crashes
        .first()
        .map(|c| format!(" (its last crash: during {}: {})", c.during, c.cause))
        .unwrap_or_default();
    println!(
        "released {}{last}: the next `kiln serve` loads it again; it is quarantined again after {} crashes within {} minutes",
        record.label(),
        kiln_runtime::backend::worker::QUARANTINE_AFTER,
        kiln_runtime::backend::worker::QUARANTINE_WINDOW.as_secs() / 60
    );
    Ok(ExitCode::SUCCESS)
}

pub fn log(config: &Config, limit: usize, as_json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let entries: Vec<_> = registry
        .audit_log(limit)?
        .into_iter()
        .filter(|e| e.kind == "plugin")
        .collect();
    if as_json {
        print_json(&json!({ "schema_version": JSON_SCHEMA_VERSION, "entries": entries }));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.at.clone(),
                e.action.clone(),
                e.subject.clone(),
                e.before.clone().unwrap_or_default(),
                e.after.clone().unwrap_or_default(),
                e.actor.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["AT", "ACTION", "PLUGIN", "FROM", "TO", "BY"], &rows)
    );
    Ok(ExitCode::SUCCESS)
}
