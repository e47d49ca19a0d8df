//! `kiln backends`

use super::{CliResult, JSON_SCHEMA_VERSION, human_bytes, open_registry, print_json, table};
use kiln_plugin_api::abi::{KILN_CAP_ASYNC_COMPUTE, KILN_CAP_HOST_MEMORY, KILN_CAP_UNIFIED_MEMORY};
use kiln_registry::config::Config;
use kiln_runtime::backend::{BackendSet, rank_devices};
use serde_json::json;
use std::process::ExitCode;

fn capability_names(caps: u64) -> Vec<&'static str> {
    [
        (KILN_CAP_HOST_MEMORY, "host-memory"),
        (KILN_CAP_UNIFIED_MEMORY, "unified-memory"),
        (KILN_CAP_ASYNC_COMPUTE, "async-compute"),
    ]
    .iter()
    .filter(|(bit, _)| caps & bit != 0)
    .map(|(_, n)| *n)
    .collect()
}

pub fn backends(config: &Config, as_json: bool, remeasure: bool) -> CliResult {
    let mut registry = open_registry(config)?;
    let set = BackendSet::load(&registry);
    let (ranked, score_problems) =
        rank_devices(&set, &mut registry, remeasure, |m| eprintln!("kiln: {m}"));
    let problems: Vec<String> = set
        .problems
        .iter()
        .chain(&score_problems)
        .cloned()
        .collect();
    let chosen = ranked.first();
    let score_of = |backend: &str, d: u32| {
        ranked
            .iter()
            .find(|r| r.backend == backend && r.device == d)
    };

    if as_json {
        let backends: Vec<serde_json::Value> = set
            .backends
            .iter()
            .map(|b| {
                let devices: Vec<serde_json::Value> = b
                    .devices
                    .iter()
                    .enumerate()
                    .map(|(i, info)| {
                        let r = score_of(&b.name(), i as u32);
                        json!({
                            "index": i,
                            "name": info.name,
                            "kind": info.kind.name(),
                            "total_memory": info.total_memory,
                            "free_memory": info.free_memory,
                            "capabilities": capability_names(info.capabilities),
                            "score": r.map(|r| r.score),
                            "score_cached": r.map(|r| r.cached),
                            "measurement": r.map(|r| r.measurement.clone()),
                        })
                    })
                    .collect();
                json!({
                    "name": b.name(),
                    "version": b.version(),
                    "source": b.source,
                    "abi": format!("1.{}", b.handle().abi_minor()),
                    "devices": devices,
                })
            })
            .collect();
        print_json(&json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "chosen": chosen.map(|c| json!({"backend": c.backend, "device": c.device, "score": c.score})),
            "backends": backends,
            "problems": problems,
        }));
        return Ok(ExitCode::SUCCESS);
    }

    let mut rows = Vec::new();
    for b in &set.backends {
        for (i, info) in b.devices.iter().enumerate() {
            let r = score_of(&b.name(), i as u32);
            let is_chosen = chosen.is_some_and(|c| c.backend == b.name() && c.device == i as u32);
            rows.push(vec![
                if is_chosen { "*".into() } else { String::new() },
                b.name(),
                b.version(),
                format!("{i}"),
                info.kind.name().to_string(),
                info.name.clone(),
                human_bytes(info.total_memory),
                r.map_or("-".into(), |r| {
                    format!("{:.2}{}", r.score, if r.cached { "" } else { " (new)" })
                }),
            ]);
        }
    }
    println!(
        "{}",
        table(
            &[
                "", "BACKEND", "VERSION", "DEV", "KIND", "NAME", "MEMORY", "SCORE"
            ],
            &rows
        )
    );
    if let Some(c) = chosen {
        println!(
            "\nkiln uses {} device {} (score {:.2}; higher is faster).",
            c.backend, c.device, c.score
        );
    }
    for p in &problems {
        eprintln!("kiln: warning: {p}");
    }
    Ok(ExitCode::SUCCESS)
}
