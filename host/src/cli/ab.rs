//! `kiln ab …`: A/B experiments between two versions of a model.

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, open_registry, print_json};
use kiln_registry::actor;
use kiln_registry::config::Config;
use kiln_registry::experiments::{Arm, Metric, Status};
use std::process::ExitCode;

pub fn start(
    config: &Config,
    name: &str,
    a: &str,
    b: &str,
    split: f64,
    metric: &str,
    json: bool,
) -> CliResult {
    let metric = Metric::parse(metric).ok_or_else(|| {
        CliError(format!(
            "--metric {metric}: choose acceptance (completions the editor accepted) or latency"
        ))
    })?;
    let mut registry = open_registry(config)?;
    let e = registry.start_experiment(name, a, b, split, metric, &actor())?;
    if json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "experiment": e}));
    } else {
        println!(
            "started {}: {} (a, control) against {} (b) on {:.0} % of units, by {}",
            e.name,
            e.a,
            e.b,
            e.split * 100.0,
            e.metric.as_str()
        );
        println!(
            "kiln serve assigns each workspace (language server) or client (HTTP) an arm and records what the editor accepts; `kiln ab status {}` shows where it stands",
            e.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(config: &Config, name: Option<&str>, json: bool) -> CliResult {
    let registry = open_registry(config)?;
    let experiments = match name {
        Some(n) => vec![registry.experiment(n)?.ok_or_else(|| {
            CliError(format!(
                "there is no experiment {n} (`kiln ab status` lists them)"
            ))
        })?],
        None => registry.experiments()?,
    };
    let all: Vec<Status> = experiments
        .iter()
        .map(|e| registry.experiment_status(e))
        .collect::<Result<_, _>>()?;
    if json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "experiments": all}));
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no experiments; `kiln ab start NAME --a MODEL@1 --b MODEL@2` starts one");
    }
    for s in &all {
        print(s);
    }
    Ok(ExitCode::SUCCESS)
}

fn print(s: &Status) {
    let e = &s.experiment;
    let how = match (&e.state[..], e.winner) {
        ("running", _) => "running".to_string(),
        (_, Some(w)) => format!("stopped, winner {}", e.version(w)),
        _ => "stopped, no winner".to_string(),
    };
    println!(
        "{} on {} ({how}; started {})",
        e.name, e.model, e.started_at
    );
    if let Some(r) = &e.reason {
        println!("  {r}");
    }
    println!(
        "  {:<4} {:<16} {:>6} {:>7} {:>9} {:>11} {:>7} {:>11} {:>10}",
        "arm",
        "version",
        "units",
        "served",
        "accepted",
        "superseded",
        "errors",
        "acceptance",
        "latency"
    );
    for a in &s.arms {
        println!(
            "  {:<4} {:<16} {:>6} {:>7} {:>9} {:>11} {:>7} {:>11} {:>10}",
            a.arm.as_str(),
            a.version,
            a.units,
            a.served,
            a.accepted,
            a.superseded,
            a.errors,
            a.acceptance
                .map_or("–".into(), |p| format!("{:.1} %", p * 100.0)),
            a.mean_latency_ms
                .map_or("–".into(), |m| format!("{m:.0} ms")),
        );
    }
    let an = &s.analysis;
    if let (Some(d), Some([lo, hi])) = (an.difference, an.interval) {
        let (scale, unit) = match an.metric {
            Metric::Acceptance => (100.0, " points"),
            Metric::Latency => (1.0, " ms"),
        };
        println!(
            "  b - a: {:+.1}{unit}, always-valid 95 % interval [{:+.1}, {:+.1}]; likelihood ratio {:.2} (a winner at {:.0})",
            d * scale,
            lo * scale,
            hi * scale,
            an.likelihood_ratio.unwrap_or(0.0),
            an.threshold
        );
    }
    if let Some(g) = &an.guardrail {
        println!("  guardrail: {g}");
    }
    match an.winner {
        Some(w) if e.state == "running" => println!(
            "  decided: {} wins; kiln serve stops the experiment at its next completion",
            e.version(w)
        ),
        _ if e.state == "running" && an.events_needed > 0 => println!(
            "  undecided: each arm needs {} more accepted or superseded completions before a decision",
            an.events_needed
        ),
        _ if e.state == "running" => println!("  undecided"),
        _ => {}
    }
}

pub fn stop(config: &Config, name: &str, winner: Option<&str>, json: bool) -> CliResult {
    let winner = match winner {
        None => None,
        Some(w) => Some(Arm::parse(w).ok_or_else(|| CliError(format!("--winner {w}: a or b")))?),
    };
    let mut registry = open_registry(config)?;
    let e = registry.stop_experiment(name, winner, "stopped by hand (kiln ab stop)", &actor())?;
    if json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "experiment": e}));
    } else {
        println!(
            "stopped {}{}; kiln serve now serves the active version of {} to everyone",
            e.name,
            e.winner
                .map(|w| format!(" (winner {})", e.version(w)))
                .unwrap_or_default(),
            e.model
        );
    }
    Ok(ExitCode::SUCCESS)
}
