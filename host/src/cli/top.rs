//! `kiln top`: the dashboard's live numbers in a terminal. Reads a running
//! `kiln serve`'s `/dashboard/events` (found through the run files
//! `$KILN_HOME/run/serve-<pid>.json`, or `--address`) and draws them with
//! ratatui; `--plain` (or output that is not a terminal) prints one line
//! per snapshot instead.

use super::{CliError, CliResult};
use kiln_registry::config::Config;
use serde_json::Value;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

/// What a serving process says about itself in `$KILN_HOME/run/`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RunFile {
    pub pid: u32,
    /// `host:port` of its dashboard (the HTTP API or `--metrics`).
    pub address: String,
    pub model: Option<String>,
}

/// Removes the run file when the server ends normally (a killed server's
/// is skipped by `kiln top`: its pid is gone).
pub struct RunFileGuard(PathBuf);

impl Drop for RunFileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_dir(config: &Config) -> PathBuf {
    config.home.join("run")
}

/// Announces this process's dashboard address for `kiln top`; a failure
/// only means `kiln top` needs `--address`.
pub fn announce(config: &Config, address: &str, model: Option<&str>) -> Option<RunFileGuard> {
    let dir = run_dir(config);
    std::fs::create_dir_all(&dir).ok()?;
    let pid = std::process::id();
    let path = dir.join(format!("serve-{pid}.json"));
    let tmp = dir.join(format!(".serve-{pid}.json.tmp"));
    let body = serde_json::to_vec(&RunFile {
        pid,
        address: address.to_string(),
        model: model.map(str::to_string),
    })
    .ok()?;
    std::fs::write(&tmp, body).ok()?;
    std::fs::rename(&tmp, &path).ok()?;
    Some(RunFileGuard(path))
}

/// The newest run file of a live process.
fn find_server(config: &Config) -> Option<RunFile> {
    let mut found: Vec<(std::time::SystemTime, RunFile)> = std::fs::read_dir(run_dir(config))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("serve-") || !name.ends_with(".json") {
                return None;
            }
            let f: RunFile = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            if !std::path::Path::new(&format!("/proc/{}", f.pid)).exists() {
                // Left by a server that was killed.
                let _ = std::fs::remove_file(e.path());
                return None;
            }
            Some((e.metadata().ok()?.modified().ok()?, f))
        })
        .collect();
    found.sort_by_key(|(t, _)| *t);
    found.pop().map(|(_, f)| f)
}

/// Snapshots from `/dashboard/events`, as they come; `Err` when the
/// stream ends or fails.
fn subscribe(address: &str) -> Result<Receiver<Result<Value, String>>, CliError> {
    let url = format!("http://{address}/dashboard/events");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(None)
        .build()
        .into();
    let response = agent.get(&url).call().map_err(|e| {
        CliError(format!(
            "cannot reach kiln's dashboard at {url} ({e}); is `kiln serve` running with --http or --metrics?"
        ))
    })?;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let reader = BufReader::new(response.into_body().into_reader());
        let mut event = String::new();
        let mut data = String::new();
        for line in reader.lines() {
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            } else if line.is_empty() && !data.is_empty() {
                let parsed: Result<Value, _> = serde_json::from_str(&data);
                data.clear();
                let Ok(v) = parsed else { continue };
                let items = match (event.as_str(), v) {
                    ("history", Value::Array(a)) => a,
                    (_, v) => vec![v],
                };
                for s in items {
                    if tx.send(Ok(s)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Err("the server closed the stream".into()));
    });
    Ok(rx)
}

pub fn top(config: &Config, address: Option<&str>, plain: bool, count: Option<usize>) -> CliResult {
    let address = match address {
        Some(a) => a.to_string(),
        None => find_server(config)
            .ok_or_else(|| {
                CliError(format!(
                    "no running `kiln serve` with a dashboard found in {}; start one with --http or --metrics, or pass --address HOST:PORT",
                    run_dir(config).display()
                ))
            })?
            .address,
    };
    let rx = subscribe(&address)?;
    if plain || !std::io::stdout().is_terminal() {
        return print_lines(&rx, count);
    }
    tui(&address, &rx, count)
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn ms(v: &Value) -> String {
    num(v).map_or("-".into(), |x| format!("{x:.0}"))
}

fn pct(v: &Value) -> String {
    num(v).map_or("-".into(), |x| format!("{:.0}%", x * 100.0))
}

fn mib(v: &Value) -> String {
    num(v).map_or("-".into(), |x| {
        format!("{:.0} MiB", x / (1u64 << 20) as f64)
    })
}

/// One line per snapshot: the last of the history, then each new one.
fn print_lines(rx: &Receiver<Result<Value, String>>, count: Option<usize>) -> CliResult {
    let mut printed = 0;
    let mut pending: Option<Value> = None;
    loop {
        // The history arrives at once: print only its newest.
        let next = match pending.take() {
            Some(v) => Ok(v),
            None => rx.recv().unwrap_or(Err("the stream ended".into())),
        };
        let s = next.map_err(|e| CliError(format!("the dashboard stream stopped: {e}")))?;
        if let Ok(Ok(newer)) = rx.recv_timeout(Duration::from_millis(50)) {
            pending = Some(newer);
            continue;
        }
        println!("{}", line(&s));
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn line(s: &Value) -> String {
    let t = s["t"].as_u64().unwrap_or(0) / 1000;
    let (h, m, sec) = ((t / 3600) % 24, (t / 60) % 60, t % 60);
    format!(
        "{h:02}:{m:02}:{sec:02} UTC  {}  req/s {:.2}  first token p50/p99 {}/{} ms  end-to-end p50/p99 {}/{} ms  prompt {:.0} tok/s  generated {:.0} tok/s  KV reuse {}  completion cache {}  resident {}  outbound connections {}",
        s["model"]["model"].as_str().unwrap_or("-"),
        num(&s["requests_per_s"]).unwrap_or(0.0),
        ms(&s["ttft_ms"]["p50"]),
        ms(&s["ttft_ms"]["p99"]),
        ms(&s["e2e_ms"]["p50"]),
        ms(&s["e2e_ms"]["p99"]),
        num(&s["prompt_tokens_per_s"]).unwrap_or(0.0),
        num(&s["generated_tokens_per_s"]).unwrap_or(0.0),
        pct(&s["prefix_cache_hit_rate"]),
        pct(&s["completion_cache_hit_rate"]),
        mib(&s["memory"]["resident_bytes"]),
        s["offline"]["outbound_connections"],
    )
}

fn tui(address: &str, rx: &Receiver<Result<Value, String>>, count: Option<usize>) -> CliResult {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    let mut history: Vec<Value> = Vec::new();
    let mut status = String::from("connected");
    let mut terminal = ratatui::init();
    let result = (|| -> std::io::Result<()> {
        // Updates drawn: the history counts as one.
        let mut seen = 0;
        loop {
            let mut fresh = false;
            while let Ok(next) = rx.try_recv() {
                match next {
                    Ok(s) => {
                        history.push(s);
                        fresh = true;
                        if history.len() > 900 {
                            history.remove(0);
                        }
                    }
                    Err(e) => status = format!("disconnected: {e}"),
                }
            }
            seen += usize::from(fresh);
            terminal.draw(|f| draw(f, address, &status, &history))?;
            if count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
            if event::poll(Duration::from_millis(250))?
                && let Event::Key(k) = event::read()?
                && (k.code == KeyCode::Char('q')
                    || k.code == KeyCode::Esc
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(KeyModifiers::CONTROL)))
            {
                return Ok(());
            }
        }
    })();
    ratatui::restore();
    result?;
    Ok(ExitCode::SUCCESS)
}

/// How a chart reads its value from a snapshot.
type Reading = dyn Fn(&Value) -> Option<f64>;

fn draw(f: &mut ratatui::Frame<'_>, address: &str, status: &str, history: &[Value]) {
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Color, Style, Stylize};
    use ratatui::text::Line;
    use ratatui::widgets::{Block, Paragraph, Sparkline};
    let last = history.last().cloned().unwrap_or(Value::Null);
    let [head, charts, info] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(15),
        Constraint::Min(6),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(vec![
            Line::from(format!(
                "kiln top  {}  on {}   http://{address}/dashboard  ({status}; q quits)",
                last["model"]["model"].as_str().unwrap_or("no model yet"),
                last["model"]["backend"].as_str().unwrap_or("-"),
            ))
            .bold(),
            Line::from(line(&last)).dim(),
        ]),
        head,
    );
    let rows = Layout::vertical([Constraint::Length(5); 3]).split(charts);
    let series: [(&str, &Reading, Color); 6] = [
        (
            "first token p50 (ms)",
            &|s| num(&s["ttft_ms"]["p50"]),
            Color::LightRed,
        ),
        (
            "end to end p99 (ms)",
            &|s| num(&s["e2e_ms"]["p99"]),
            Color::Yellow,
        ),
        (
            "prompt tok/s",
            &|s| num(&s["prompt_tokens_per_s"]),
            Color::LightBlue,
        ),
        (
            "generated tok/s",
            &|s| num(&s["generated_tokens_per_s"]),
            Color::Cyan,
        ),
        (
            "KV prefix reuse (%)",
            &|s| num(&s["prefix_cache_hit_rate"]).map(|x| x * 100.0),
            Color::Green,
        ),
        ("requests/s", &|s| num(&s["requests_per_s"]), Color::Magenta),
    ];
    for (i, (title, get, color)) in series.iter().enumerate() {
        let cell = Layout::horizontal([Constraint::Percentage(50); 2]).split(rows[i / 2])[i % 2];
        let width = cell.width.saturating_sub(2) as usize;
        let values: Vec<f64> = history.iter().map(|s| get(s).unwrap_or(0.0)).collect();
        let shown = &values[values.len().saturating_sub(width)..];
        let max = shown.iter().copied().fold(0.0, f64::max);
        let data: Vec<u64> = shown.iter().map(|v| (v * 100.0) as u64).collect();
        let now = values.last().map_or("-".into(), |v| format!("{v:.1}"));
        f.render_widget(
            Sparkline::default()
                .block(Block::bordered().title(format!("{title}: {now} (max {max:.1})")))
                .data(&data)
                .style(Style::default().fg(*color)),
            cell,
        );
    }
    let prompt = &last["last_prompt"];
    let mut lines = vec![
        Line::from(format!(
            "served {} requests, {} prompt and {} generated tokens; {} CPU fallbacks; model file {}, resident {}, available {}",
            last["totals"]["requests"],
            last["totals"]["prompt_tokens"],
            last["totals"]["generated_tokens"],
            last["totals"]["fallbacks"],
            mib(&last["model_bytes"]),
            mib(&last["memory"]["resident_bytes"]),
            mib(&last["memory"]["available_bytes"]),
        )),
        Line::from(format!(
            "offline: listening on {}, loopback only {}, connections to other machines {}, models on disk {}/{}",
            last["offline"]["listening"],
            last["offline"]["loopback_only"],
            last["offline"]["outbound_connections"],
            last["offline"]["models"]["on_disk"],
            last["offline"]["models"]["registered"],
        )),
    ];
    if !prompt.is_null() {
        lines.push(Line::from(format!(
            "last prompt: {} tokens of {} in {}, other files {} of {} tokens ({} snippets, ranked by {})",
            prompt["prompt_tokens"], prompt["limit_tokens"], prompt["file"].as_str().unwrap_or("-"),
            prompt["context_tokens"], prompt["context_budget_tokens"],
            prompt["snippets"].as_array().map_or(0, Vec::len), prompt["ranked_by"].as_str().unwrap_or("-"),
        )));
    }
    for p in last["policies"].as_array().into_iter().flatten() {
        lines.push(Line::from(format!(
            "policy {}: {} ok, {} errors, breaker {}",
            p["policy"].as_str().unwrap_or("-"),
            p["ok"],
            p["error"],
            if p["breaker_open"] == true {
                "open"
            } else {
                "closed"
            },
        )));
    }
    let events: Vec<String> = history
        .iter()
        .rev()
        .flat_map(|s| s["events"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.as_str().map(str::to_string))
        .take(5)
        .collect();
    for e in events {
        lines.push(Line::from(format!("event: {e}")).dim());
    }
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("now")),
        info,
    );
}
