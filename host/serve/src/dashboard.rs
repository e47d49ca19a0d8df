//! `/dashboard`: a live page of what the service is doing, served with
//! the HTTP API and beside the language server (`--metrics`).
//!
//! A sampler thread reads the service's own Prometheus exposition every
//! interval (1–60 s, `--dashboard-interval`), turns the change since the
//! last sample into a snapshot (rates, hit rates, latency percentiles read
//! from the histograms' buckets as `histogram_quantile` does), adds what
//! is not a metric (memory, the last prompt's layout, sockets, models on
//! disk) and keeps the last 15 minutes in a ring. `/dashboard/events`
//! streams them as server-sent events: the ring first (`history`), then
//! each new one (`snapshot`), so a page opened late shows the past at
//! once. The page and its charting library (uPlot, MIT, vendored from npm)
//! are compiled into the binary and served with a content security policy
//! that lets the page load nothing from anywhere else.

use crate::metrics::Metrics;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kiln_registry::config::Config;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How much history the ring keeps.
pub const HISTORY: Duration = Duration::from_secs(15 * 60);
/// How often the offline panel counts the registered models.
const MODELS_EVERY: Duration = Duration::from_secs(30);
/// How often the experiments are read from the registry.
const EXPERIMENTS_EVERY: Duration = Duration::from_secs(5);
/// The default sampling interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");
const UPLOT_JS: &str = include_str!("../assets/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../assets/uplot/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../assets/uplot/LICENSE");

/// The page may load only what this server serves, and connect only back
/// to it.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

pub struct Dashboard {
    metrics: Arc<Metrics>,
    config: Option<Config>,
    interval: Duration,
    ring: Mutex<VecDeque<Arc<str>>>,
    live: tokio::sync::broadcast::Sender<Arc<str>>,
    listening: Mutex<Vec<String>>,
}

impl Dashboard {
    /// The home whose registry the dashboard reads.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// Starts sampling `metrics` every `interval` (clamped to 1–60 s);
    /// `config` is the home whose registry says which models are on disk.
    pub fn start(metrics: Arc<Metrics>, config: Option<Config>, interval: Duration) -> Arc<Self> {
        let interval = interval.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let (live, _) = tokio::sync::broadcast::channel(16);
        let d = Arc::new(Dashboard {
            metrics,
            config,
            interval,
            ring: Mutex::default(),
            live,
            listening: Mutex::default(),
        });
        let sampler = Arc::downgrade(&d);
        std::thread::Builder::new()
            .name("kiln-dashboard".into())
            .spawn(move || {
                let mut last: Option<(Instant, Scrape)> = None;
                let mut state = Memory::default();
                loop {
                    let Some(d) = sampler.upgrade() else { return };
                    let now = Instant::now();
                    let scrape = Scrape::parse(&d.metrics.render());
                    if let Some((then, prev)) = &last {
                        let dt = now.duration_since(*then).as_secs_f64();
                        let snap = d.snapshot(prev, &scrape, dt, &mut state);
                        d.publish(snap.to_string().into());
                    }
                    last = Some((now, scrape));
                    let interval = d.interval;
                    drop(d);
                    std::thread::sleep(interval);
                }
            })
            .expect("spawn the dashboard sampler");
        d
    }

    /// Records an address the service listens on (for the offline panel).
    pub fn listening_on(&self, addr: String) {
        lock(&self.listening).push(addr);
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn publish(&self, snap: Arc<str>) {
        let mut ring = lock(&self.ring);
        let keep = (HISTORY.as_secs_f64() / self.interval.as_secs_f64()).ceil() as usize;
        while ring.len() >= keep {
            ring.pop_front();
        }
        ring.push_back(snap.clone());
        drop(ring);
        // Nobody listening is fine.
        let _ = self.live.send(snap);
    }

    /// The snapshots kept, oldest first, as one JSON array.
    pub fn history(&self) -> String {
        let ring = lock(&self.ring);
        let mut out = String::from("[");
        for (i, s) in ring.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(s);
        }
        out.push(']');
        out
    }

    fn snapshot(&self, prev: &Scrape, cur: &Scrape, dt: f64, mem: &mut Memory) -> Value {
        let rate = |name: &str| (cur.sum(name) - prev.sum(name)).max(0.0) / dt;
        let share = |hit: &str, all: &str| {
            let all = cur.sum(all) - prev.sum(all);
            (all > 0.0).then(|| (cur.sum(hit) - prev.sum(hit)) / all)
        };
        let latency = |name: &str| {
            let q = |p| cur.quantile(prev, name, p).map(|s| s * 1e3);
            json!({"p50": q(0.5), "p95": q(0.95), "p99": q(0.99)})
        };
        let requests =
            cur.sum("kiln:request_success_total") - prev.sum("kiln:request_success_total");
        let errors = cur.sum_where("kiln:request_success_total", "finished_reason", "error")
            - prev.sum_where("kiln:request_success_total", "finished_reason", "error");

        let model = cur
            .series("kiln:model_info")
            .into_iter()
            .find(|(_, v)| *v > 0.0)
            .map(|(l, _)| l);
        let mut events = Vec::new();
        let model_id = model.as_ref().and_then(|m| m.get("model").cloned());
        if model_id != mem.model {
            if let Some(id) = &model_id {
                let backend = model
                    .as_ref()
                    .and_then(|m| m.get("backend").cloned())
                    .unwrap_or_default();
                events.push(format!("now serving {id} on {backend}"));
            }
            mem.model = model_id;
        }
        let fallbacks = cur.sum("kiln:backend_fallbacks_total");
        if fallbacks > mem.fallbacks {
            events.push(format!(
                "{} op(s) fell back to the CPU",
                fallbacks - mem.fallbacks
            ));
        }
        mem.fallbacks = fallbacks;

        let mut policies: BTreeMap<String, Value> = BTreeMap::new();
        for (labels, v) in cur.series("kiln:policy_calls_total") {
            let (Some(p), Some(outcome)) = (labels.get("policy"), labels.get("outcome")) else {
                continue;
            };
            let e = policies
                .entry(p.clone())
                .or_insert_with(|| json!({"policy": p}));
            e[outcome.as_str()] = json!(v);
        }
        for (labels, v) in cur.series("kiln:policy_fuel_total") {
            if let Some(p) = labels.get("policy") {
                let e = policies
                    .entry(p.clone())
                    .or_insert_with(|| json!({"policy": p}));
                e["fuel"] = json!(v);
            }
        }
        for (labels, v) in cur.series("kiln:policy_breaker_open") {
            if let Some(p) = labels.get("policy") {
                let e = policies
                    .entry(p.clone())
                    .or_insert_with(|| json!({"policy": p}));
                e["breaker_open"] = json!(v > 0.0);
                let was = mem.breakers.insert(p.clone(), v > 0.0).unwrap_or(false);
                if v > 0.0 && !was {
                    events.push(format!("the circuit breaker of {p} opened"));
                }
            }
        }
        let pool = pool_models(cur, mem, &mut events);
        let transfer =
            |dir: &str| cur.sum_where("kiln:backend_transfer_bytes_total", "direction", dir);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        json!({
            "t": now_ms,
            "interval_s": dt,
            "requests_per_s": requests / dt,
            "errors": errors,
            "prompt_tokens_per_s": rate("kiln:prompt_tokens_total"),
            "generated_tokens_per_s": rate("kiln:generation_tokens_total"),
            "ttft_ms": latency("kiln:time_to_first_token_seconds"),
            "inter_token_ms": latency("kiln:inter_token_latency_seconds"),
            "e2e_ms": latency("kiln:e2e_request_latency_seconds"),
            "ttft_histogram": cur.buckets("kiln:time_to_first_token_seconds"),
            "e2e_histogram": cur.buckets("kiln:e2e_request_latency_seconds"),
            "prefix_cache_hit_rate": share("kiln:prefix_cache_hits_total", "kiln:prefix_cache_queries_total"),
            "completion_cache_hit_rate": share("kiln:completion_cache_hits_total", "kiln:completion_cache_queries_total"),
            "draft_acceptance": share("kiln:draft_accepted_total", "kiln:draft_tokens_total"),
            "running": cur.sum("kiln:num_requests_running"),
            "waiting": cur.sum("kiln:num_requests_waiting"),
            "totals": {
                "requests": cur.sum("kiln:request_success_total"),
                "prompt_tokens": cur.sum("kiln:prompt_tokens_total"),
                "generated_tokens": cur.sum("kiln:generation_tokens_total"),
                "fallbacks": fallbacks,
                "completion_cache_evictions": cur.sum("kiln:completion_cache_evictions_total"),
                "bytes_to_device": transfer("to_device"),
                "bytes_from_device": transfer("from_device"),
            },
            "model": model,
            "context_window_tokens": cur.sum("kiln:context_window_tokens"),
            "model_bytes": cur.sum("kiln:model_bytes"),
            "memory": {
                "resident_bytes": kiln_runtime::measure::process_memory(None, "VmRSS"),
                "available_bytes": kiln_runtime::measure::proc_kib_field("/proc/meminfo", "MemAvailable"),
            },
            "last_prompt": *lock(&self.metrics.last_prompt),
            "explanations": lock(&self.metrics.last_explanation).0,
            "policies": policies.into_values().collect::<Vec<_>>(),
            "pool": {
                "models": pool,
                "memory_bytes": cur.sum("kiln:pool_memory_bytes"),
                "budget_bytes": cur.sum("kiln:pool_budget_bytes"),
                "paused": cur.sum("kiln:requests_paused_total"),
                "offline_answers": cur.sum("kiln:route_offline_cache_answers_total"),
            },
            "offline": self.offline(mem),
            "experiments": self.experiments(mem),
            "events": events,
        })
    }

    /// The A/B experiments running, and those stopped in the last day,
    /// with their arms and decisions (read every few seconds).
    fn experiments(&self, mem: &mut Memory) -> Value {
        let Memory {
            registry,
            experiments,
            ..
        } = mem;
        self.registry_read(registry, experiments, EXPERIMENTS_EVERY, |r| {
            let recent: Vec<Value> = (r.recent_experiments().ok()?.iter())
                .take(4)
                .filter_map(|e| serde_json::to_value(r.experiment_status(e).ok()?).ok())
                .collect();
            Some(Value::Array(recent))
        })
    }

    /// `slot`'s value, read again by `read` from the registry (one
    /// connection, kept) when it is older than `every`.
    fn registry_read(
        &self,
        registry: &mut Option<kiln_registry::Registry>,
        slot: &mut Option<(Instant, Value)>,
        every: Duration,
        read: impl FnOnce(&kiln_registry::Registry) -> Option<Value>,
    ) -> Value {
        if slot.as_ref().is_none_or(|(at, _)| at.elapsed() >= every) {
            if registry.is_none() {
                *registry =
                    (self.config.as_ref()).and_then(|c| kiln_registry::Registry::open_home(c).ok());
            }
            let value = registry.as_ref().and_then(read);
            *slot = Some((Instant::now(), value.unwrap_or(Value::Null)));
        }
        slot.as_ref().map_or(Value::Null, |(_, v)| v.clone())
    }

    /// What says that nothing leaves the machine: the addresses listened
    /// on, whether all are loopback, connections this process opened to
    /// other machines (read from `/proc`), and the models on local disk.
    fn offline(&self, mem: &mut Memory) -> Value {
        let sockets = sockets();
        let listening = lock(&self.listening).clone();
        // The registry is read twice a minute, not at every snapshot.
        let Memory {
            registry, models, ..
        } = mem;
        let models = self.registry_read(registry, models, MODELS_EVERY, |r| {
            let all = r.models().ok()?;
            let on_disk = all.iter().filter(|m| m.blob_path.is_file()).count();
            // Plugin health: each backend plugin's state and what its
            // conformance gate found.
            let plugins: Vec<Value> = (r.plugins().ok()?.iter())
                .map(|p| {
                    json!({
                        "plugin": p.label(),
                        "state": p.state,
                        "passed": p.conformance["passed"],
                        "failed": p.conformance["failed"],
                        "library_present": p.library_path.is_file(),
                    })
                })
                .collect();
            Some(json!({"registered": all.len(), "on_disk": on_disk, "plugins": plugins}))
        });
        json!({
            "listening": listening,
            "loopback_only": sockets.as_ref().map(|s| s.listening_remote == 0),
            "outbound_connections": sockets.as_ref().map(|s| s.outbound),
            "models": models,
        })
    }
}

/// What the sampler remembers between snapshots, to say what changed.
/// The pool's models from `/metrics` (loaded, health, loads, unloads,
/// fallbacks), with an event for each change since the last snapshot.
fn pool_models(cur: &Scrape, mem: &mut Memory, events: &mut Vec<String>) -> Vec<Value> {
    let by_model = |name: &str| -> HashMap<String, f64> {
        let mut m = HashMap::new();
        for (labels, v) in cur.series(name) {
            if let Some(id) = labels.get("model") {
                *m.entry(id.clone()).or_insert(0.0) += v;
            }
        }
        m
    };
    let (loaded, health) = (by_model("kiln:model_loaded"), by_model("kiln:model_health"));
    let (loads, unloads) = (
        by_model("kiln:model_loads_total"),
        by_model("kiln:model_unloads_total"),
    );
    let fallbacks = by_model("kiln:route_fallbacks_total");
    let mut ids: Vec<&String> = loaded.keys().collect();
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        let is_loaded = loaded[id] > 0.0;
        let h = health.get(id).copied().unwrap_or(0.0);
        let f = fallbacks.get(id).copied().unwrap_or(0.0);
        let state = match h as i64 {
            0 => "healthy",
            1 => "degraded",
            _ => "failed",
        };
        let (was_loaded, was_health, was_fallbacks) = mem
            .pool
            .insert(id.clone(), (is_loaded, h, f))
            .unwrap_or((false, 0.0, 0.0));
        if is_loaded != was_loaded {
            events.push(format!(
                "{} {id}",
                if is_loaded { "loaded" } else { "unloaded" }
            ));
        }
        if h != was_health {
            events.push(format!("{id} is {state}"));
        }
        if f > was_fallbacks {
            events.push(format!(
                "{id} failed {} time(s); the next model of its route answered",
                f - was_fallbacks
            ));
        }
        out.push(json!({
            "model": id,
            "loaded": is_loaded,
            "health": state,
            "loads": loads.get(id).copied().unwrap_or(0.0),
            "unloads": unloads.get(id).copied().unwrap_or(0.0),
            "fallbacks": f,
        }));
    }
    out
}

#[derive(Default)]
struct Memory {
    /// The registry, opened at the first read.
    registry: Option<kiln_registry::Registry>,
    /// The models registered and on disk, and when they were counted.
    models: Option<(Instant, Value)>,
    /// The experiments running or stopped in the last day, and when read.
    experiments: Option<(Instant, Value)>,
    model: Option<String>,
    fallbacks: f64,
    breakers: HashMap<String, bool>,
    /// Per pool model: loaded, health, and its route fallbacks so far.
    pool: HashMap<String, (bool, f64, f64)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One reading of the Prometheus exposition: every series's value by its
/// name and labels as written (`name{a="b"}`).
#[derive(Default)]
struct Scrape {
    series: HashMap<String, f64>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut series = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if let Ok(v) = value.parse::<f64>() {
                series.insert(key.to_string(), v);
            }
        }
        Scrape { series }
    }

    fn name_of(key: &str) -> &str {
        key.split('{').next().unwrap_or(key)
    }

    /// Every series of metric `name`, with its labels.
    fn series(&self, name: &str) -> Vec<(HashMap<String, String>, f64)> {
        (self.series.iter())
            .filter(|(k, _)| Self::name_of(k) == name)
            .map(|(k, v)| (labels_of(k), *v))
            .collect()
    }

    fn sum(&self, name: &str) -> f64 {
        (self.series.iter())
            .filter(|(k, _)| Self::name_of(k) == name)
            .map(|(_, v)| v)
            .sum()
    }

    fn sum_where(&self, name: &str, label: &str, value: &str) -> f64 {
        (self.series(name).into_iter())
            .filter(|(l, _)| l.get(label).is_some_and(|v| v == value))
            .map(|(_, v)| v)
            .sum()
    }

    /// The cumulative bucket counts of histogram `name`, by upper bound.
    fn cumulative(&self, name: &str) -> Vec<(f64, f64)> {
        let mut b: Vec<(f64, f64)> = self
            .series(&format!("{name}_bucket"))
            .into_iter()
            .filter_map(|(l, v)| {
                let le = l.get("le")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, v))
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }

    /// Non-empty buckets since the start, `[upper bound in ms, count]`.
    fn buckets(&self, name: &str) -> Vec<[f64; 2]> {
        let mut below = 0.0;
        let mut out = Vec::new();
        for (le, cum) in self.cumulative(name) {
            if cum > below {
                out.push([if le.is_finite() { le * 1e3 } else { -1.0 }, cum - below]);
            }
            below = cum;
        }
        out
    }

    /// Quantile `q` of the observations of histogram `name` made since
    /// `prev`, interpolated linearly inside its bucket; `None` without any.
    fn quantile(&self, prev: &Scrape, name: &str, q: f64) -> Option<f64> {
        let before: HashMap<u64, f64> = (prev.cumulative(name).into_iter())
            .map(|(le, c)| (le.to_bits(), c))
            .collect();
        let delta: Vec<(f64, f64)> = (self.cumulative(name).into_iter())
            .map(|(le, c)| (le, c - before.get(&le.to_bits()).copied().unwrap_or(0.0)))
            .collect();
        let total = delta.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let target = q * total;
        let (mut lo, mut below) = (0.0, 0.0);
        for (le, cum) in delta {
            if cum >= target {
                if !le.is_finite() {
                    return Some(lo);
                }
                let within = cum - below;
                let frac = if within > 0.0 {
                    (target - below) / within
                } else {
                    1.0
                };
                return Some(lo + (le - lo) * frac);
            }
            (lo, below) = (le, cum);
        }
        Some(lo)
    }
}

/// `{a="b",c="d"}` of a series key, unescaped.
fn labels_of(key: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Some(body) = key
        .split_once('{')
        .and_then(|(_, rest)| rest.strip_suffix('}'))
    else {
        return out;
    };
    let mut chars = body.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if name.is_empty() || chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(name.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

/// This process's TCP sockets, from `/proc`.
struct Sockets {
    /// Connections to addresses that are not loopback, other than
    /// clients of our own listening ports.
    outbound: usize,
    /// Listening sockets bound to a non-loopback address.
    listening_remote: usize,
}

/// Reads `/proc/self/fd` and `/proc/net/tcp{,6}`; `None` off Linux.
fn sockets() -> Option<Sockets> {
    let mut ours = HashSet::new();
    for e in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.to_string_lossy();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                ours.insert(inode.to_string());
            }
        }
    }
    let mut rows = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !ours.contains(f[9]) {
                continue;
            }
            let (Some(local), Some(remote)) = (endpoint(f[1]), endpoint(f[2])) else {
                continue;
            };
            rows.push((local, remote, f[3].to_string()));
        }
    }
    const LISTEN: &str = "0A";
    let listen_ports: HashSet<u16> = (rows.iter())
        .filter(|r| r.2 == LISTEN)
        .map(|r| r.0.1)
        .collect();
    let listening_remote = (rows.iter())
        .filter(|r| r.2 == LISTEN && !r.0.0.is_loopback())
        .count();
    // ESTABLISHED, SYN_SENT.
    let outbound = (rows.iter())
        .filter(|r| (r.2 == "01" || r.2 == "02") && !listen_ports.contains(&r.0.1))
        .filter(|r| !r.1.0.is_loopback())
        .count();
    Some(Sockets {
        outbound,
        listening_remote,
    })
}

/// `0100007F:1F90` (the kernel's host-order words) as an address and port.
fn endpoint(s: &str) -> Option<(std::net::IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => {
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            v6.to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
        }
        _ => return None,
    };
    Some((ip, port))
}

/// `/dashboard` and what it loads, for any router.
pub fn routes<S: Clone + Send + Sync + 'static>(dashboard: Arc<Dashboard>) -> Router<S> {
    let asset = |body: &'static str, kind: &'static str| {
        move || async move {
            (
                [
                    (header::CONTENT_TYPE, kind),
                    (header::CONTENT_SECURITY_POLICY, POLICY),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
                .into_response()
        }
    };
    const JS: &str = "text/javascript; charset=utf-8";
    const CSS: &str = "text/css; charset=utf-8";
    let files = [
        ("/dashboard", PAGE, "text/html; charset=utf-8"),
        ("/dashboard/dashboard.js", SCRIPT, JS),
        ("/dashboard/dashboard.css", STYLE, CSS),
        ("/dashboard/uPlot.iife.min.js", UPLOT_JS, JS),
        ("/dashboard/uPlot.min.css", UPLOT_CSS, CSS),
        (
            "/dashboard/LICENSE-uPlot",
            UPLOT_LICENSE,
            "text/plain; charset=utf-8",
        ),
    ];
    let mut router = Router::new();
    for (path, body, kind) in files {
        router = router.route(path, get(asset(body, kind)));
    }
    router
        .route("/dashboard/history", get(history))
        .route("/dashboard/events", get(events))
        .route("/dashboard/explanation", get(explanation))
        .with_state(dashboard)
}

/// The last explanation computed (`null` before the first), with its
/// attention map, for the page's heat map.
async fn explanation(State(d): State<Arc<Dashboard>>) -> Response {
    let last = lock(&d.metrics.last_explanation).1.clone();
    axum::Json(last.unwrap_or(Value::Null)).into_response()
}

async fn history(State(d): State<Arc<Dashboard>>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], d.history()).into_response()
}

async fn events(State(d): State<Arc<Dashboard>>) -> Response {
    use futures_util::stream::{self, StreamExt};
    let rx = d.live.subscribe();
    let first = Event::default()
        .event("history")
        .data(d.history())
        .retry(d.interval);
    let first = stream::once(async move { Ok::<_, std::convert::Infallible>(first) });
    let live = stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(s) => return Some((Ok(Event::default().event("snapshot").data(&*s)), rx)),
                // A slow reader skips what it missed.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(first.chain(live))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_buckets_filled_since_the_last_sample() {
        let m = Metrics::default();
        for ms in [10.0, 12.0, 14.0, 200.0] {
            m.ttft.observe(ms / 1e3);
        }
        let before = Scrape::parse(&m.render());
        for _ in 0..99 {
            m.ttft.observe(0.050);
        }
        m.ttft.observe(2.0);
        let after = Scrape::parse(&m.render());
        let q = |p| {
            after
                .quantile(&before, "kiln:time_to_first_token_seconds", p)
                .unwrap()
        };
        // 99 of the 100 new ones are 50 ms: p50 and p95 sit in its bucket
        // (a quarter-octave wide), p99 too; the earlier ones do not count.
        for p in [0.5, 0.95, 0.99] {
            assert!((0.045..=0.054).contains(&q(p)), "p{p}: {}", q(p));
        }
        assert!(q(1.0) > 1.6, "{}", q(1.0));
        assert_eq!(
            before.quantile(&before, "kiln:time_to_first_token_seconds", 0.5),
            None
        );
    }

    #[test]
    fn labels_and_sums_read_the_exposition() {
        let m = Metrics::default();
        m.policy_calls
            .get_or_create(&crate::metrics::labels(&[
                ("policy", "a \"b\""),
                ("outcome", "ok"),
            ]))
            .inc_by(3);
        let s = Scrape::parse(&m.render());
        let series = s.series("kiln:policy_calls_total");
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].0["policy"], "a \"b\"");
        assert_eq!(series[0].0["outcome"], "ok");
        assert_eq!(s.sum_where("kiln:policy_calls_total", "outcome", "ok"), 3.0);
    }

    #[test]
    fn kernel_socket_addresses_decode() {
        let (ip, port) = endpoint("0100007F:1F90").unwrap();
        assert!(ip.is_loopback() && port == 8080);
        let (ip, _) = endpoint("00000000000000000000000001000000:0050").unwrap();
        assert!(ip.is_loopback(), "{ip}");
        let (ip, _) = endpoint("0000000000000000FFFF00000100007F:0050").unwrap();
        assert!(ip.is_loopback(), "{ip}");
        let (ip, _) = endpoint("0101A8C0:0050").unwrap();
        assert_eq!(ip.to_string(), "192.168.1.1");
        // This test's own process: nothing outbound.
        assert_eq!(sockets().unwrap().outbound, 0);
    }
}
