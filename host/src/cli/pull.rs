//! `kiln pull`

use super::{CliError, CliResult, JSON_SCHEMA_VERSION, human_bytes, open_registry, print_json};
use kiln_registry::actor;
use kiln_registry::config::Config;
use kiln_runtime::pull::{self, Client, Event, Spec};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

/// A download's progress on stderr: a line redrawn with the rate and the
/// time left on a terminal, else a line every tenth of the file.
struct Download {
    tty: bool,
    start: Instant,
    shown: u64,
}

impl Download {
    fn show(&mut self, done: u64, total: Option<u64>) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let of = total.map_or(String::new(), |t| format!(" of {}", human_bytes(t)));
        let eta = match total {
            Some(t) if rate > 0.0 && t > done => {
                format!(", {:.0} s left", (t - done) as f64 / rate)
            }
            _ => String::new(),
        };
        let line = format!(
            "downloading: {}{of} at {}/s{eta}",
            human_bytes(done),
            human_bytes(rate as u64)
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            if total == Some(done) {
                eprintln!();
            }
        } else {
            let tenth = total.map_or(u64::MAX, |t| (t / 10).max(1));
            if done / tenth > self.shown / tenth || total == Some(done) {
                eprintln!("{line}");
            }
        }
        self.shown = done;
    }
}

pub fn run(config: &Config, spec: &str, name: Option<&str>, as_json: bool) -> CliResult {
    let spec = Spec::parse(spec).map_err(|e| CliError(e.to_string()))?;
    let mut registry = open_registry(config)?;
    let client = Client::from_env();
    let mut bar = Download {
        tty: std::io::stderr().is_terminal(),
        start: Instant::now(),
        shown: 0,
    };
    let pulled = pull::pull(
        config,
        &mut registry,
        &client,
        &spec,
        name,
        &actor(),
        |e| match e {
            Event::Progress { done, total } => bar.show(done, total),
            Event::Note(line) => eprintln!("kiln: {line}"),
        },
    )
    .map_err(|e| CliError(e.to_string()))?;
    if as_json {
        print_json(&serde_json::json!({"schema_version": JSON_SCHEMA_VERSION, "pulled": pulled}));
    } else {
        let m = &pulled.model;
        println!(
            "pulled {} as {} ({}, {}, {}; sha256 {}…); now active",
            pulled.url,
            m.label(),
            m.architecture,
            m.quant_type,
            human_bytes(m.size_bytes),
            &m.sha256[..12]
        );
    }
    Ok(ExitCode::SUCCESS)
}
