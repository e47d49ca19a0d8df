//! The model pool: every model `kiln serve` may serve (`--model A --model
//! B`, `[models.NAME]`), each on an [`Engine`] of its own (its own thread
//! and KV cache, so one model's hang leaves the others answering), loaded
//! on first use and unloaded when idle past its keep-alive or when a
//! model that must load needs the room (least recently used first); the
//! first model served stays loaded. What all loaded models need (weights,
//! KV cache, work space: [`session::budget`]) stays within `[pool]
//! max_memory_mb`, and a model that cannot fit is refused with the numbers
//! before anything is allocated.
//!
//! A request is routed (`[[routes]]`: by kind, path glob, language) to a
//! chain of models. The first usable one answers; one that errors, fails
//! to load, or has not answered by the route's deadline is marked failed
//! (skipped for a cooldown that doubles with each further failure, then
//! tried again by one request: the probe) and the next one is asked; when
//! every model failed, the answer to the same request kept from before
//! (the offline cache) is given, saying so. A model whose backend failed
//! under it (its work re-run on the CPU) is degraded: it still answers
//! when no healthy model of the chain can. The answer says which model
//! gave it and which failed first ([`Answered`]); health is in
//! `kiln/status`, `/v1/models` and `/metrics`.

use crate::engine::{Engine, EngineOptions, Events, Finished, Loaded, Priority, Sink, Submit};
use crate::fim::FimTemplate;
use crate::metrics::{Metrics, labels};
use kiln_registry::config::{Config, RequestKind};
use kiln_runtime::backend::{Backend, Chosen};
use kiln_runtime::model::generate::{Control, Draft, Generation, Request, StopReason};
use kiln_runtime::model::session;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const MIB: u64 = 1 << 20;
/// `[pool] keep_alive_seconds` unless set.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(300);
/// The least a model stays loaded after its last use, whatever its
/// keep-alive.
const MIN_IDLE: Duration = Duration::from_secs(2);
/// How long a model that needs room waits for a model in use to finish
/// before it is refused.
const ROOM_WAIT: Duration = Duration::from_secs(2);
/// `[pool] cooldown_seconds` unless set.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);

/// Which model answered a routed request, and which failed before it.
#[derive(Clone, Debug, Serialize)]
pub struct Answered {
    pub model: String,
    pub kind: &'static str,
    /// The models of the chain that failed or were skipped first, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fallback_from: Vec<Failure>,
    /// Every model failed: this is the answer kept from an earlier
    /// identical request (by `model`).
    pub from_cache: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub model: String,
    /// `error`, `deadline`, `load`, `cooling_down`, `degraded`.
    pub reason: &'static str,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Healthy,
    /// Answers, but its backend failed under it lately.
    Degraded,
    /// Skipped until its cooldown ends; then one request probes it.
    Failed,
}

#[derive(Debug)]
struct Health {
    state: HealthState,
    /// Failures since it last answered.
    consecutive: u32,
    retry_at: Option<Instant>,
    /// A request is trying it after its cooldown.
    probing: bool,
    last_error: Option<String>,
    failures: u64,
    /// Its backend's failure count when last looked at.
    backend_failures_seen: Option<u64>,
    degraded_at: Option<Instant>,
}

impl Health {
    fn new() -> Health {
        Health {
            state: HealthState::Healthy,
            consecutive: 0,
            retry_at: None,
            probing: false,
            last_error: None,
            failures: 0,
            backend_failures_seen: None,
            degraded_at: None,
        }
    }

    /// Whether [`Health::begin`] would let a request use it now (without
    /// taking the probe).
    fn usable_now(&self, now: Instant) -> bool {
        self.state != HealthState::Failed
            || (!self.probing && self.retry_at.is_none_or(|t| t <= now))
    }

    /// Whether a request may use it now (a failed one: once its cooldown
    /// ended, by one request at a time); why not, if not.
    fn begin(&mut self, now: Instant) -> Result<(), String> {
        if self.state != HealthState::Failed {
            return Ok(());
        }
        match self.retry_at {
            Some(t) if t > now => Err(format!(
                "failed ({}); tried again in {:.1} s",
                self.last_error.as_deref().unwrap_or("?"),
                (t - now).as_secs_f64()
            )),
            _ if self.probing => Err("failed; another request is trying it".into()),
            _ => {
                self.probing = true;
                Ok(())
            }
        }
    }

    fn failed(&mut self, why: &str, cooldown: Duration, now: Instant) {
        self.consecutive += 1;
        self.failures += 1;
        self.state = HealthState::Failed;
        self.retry_at = Some(now + cooldown * (1u32 << (self.consecutive - 1).min(5)));
        self.probing = false;
        self.last_error = Some(why.to_string());
    }

    /// It answered; `backend_failures` is its backend's failure count now.
    fn succeeded(&mut self, backend_failures: u64, cooldown: Duration, now: Instant) {
        self.consecutive = 0;
        self.probing = false;
        self.retry_at = None;
        let seen = self.backend_failures_seen.replace(backend_failures);
        if seen.is_some_and(|s| backend_failures > s) {
            self.state = HealthState::Degraded;
            self.degraded_at = Some(now);
            self.last_error = Some(format!(
                "its backend failed {} time(s) during a request (the CPU re-ran the work)",
                backend_failures - seen.unwrap_or(0)
            ));
        } else if self.state == HealthState::Failed
            || (self.state == HealthState::Degraded
                && self.degraded_at.is_none_or(|t| now >= t + cooldown))
        {
            self.state = HealthState::Healthy;
        }
    }
}

/// A model the pool may serve.
pub struct Member {
    /// The name requests and routes use.
    pub id: String,
    /// A registered model or a GGUF file.
    source: String,
    backend: Option<String>,
    n_ctx: Option<usize>,
    keep_alive: Mutex<Duration>,
    /// Its weights locked in memory once loaded.
    mlock: bool,
    /// CPU threads of its own for its graphs.
    threads: Option<usize>,
    /// A LoRA adapter applied at run time (a file or a registered name).
    adapter: Option<String>,
    /// The first model served: never unloaded.
    pinned: bool,
    slot: Mutex<Slot>,
    health: Mutex<Health>,
}

struct Slot {
    engine: Option<Engine>,
    /// Bytes it needs loaded (known once it was resolved).
    need: Option<session::Budget>,
    path: Option<PathBuf>,
    /// Its adapter's file (known once it was resolved).
    adapter_path: Option<PathBuf>,
    last_used: Instant,
    /// Bytes of its weights locked in memory, or why they could not be.
    locked: Result<u64, String>,
    /// The plugin device it is loaded on (`BACKEND:DEVICE`), whose
    /// memory holds its weights, KV cache and work space; `None`: the CPU.
    device: Option<String>,
}

/// One member's state, for `kiln/status`, `/v1/models` and `kiln/models`.
#[derive(Clone, Debug, Serialize)]
pub struct MemberStatus {
    pub id: String,
    pub model: String,
    pub path: Option<PathBuf>,
    pub loaded: bool,
    /// Stays loaded (the first model served).
    pub pinned: bool,
    pub health: HealthState,
    pub last_error: Option<String>,
    pub failures: u64,
    /// What it needs loaded: weights, KV cache, work space.
    pub need_bytes: Option<u64>,
    pub backend: Option<String>,
    pub idle_seconds: Option<f64>,
    /// Requests queued and running on it.
    pub busy: usize,
    /// Bytes of its weights locked in memory (`mlock`; 0: not asked, or
    /// not loaded).
    pub locked_bytes: u64,
    /// Why its weights could not be locked, when asked.
    pub lock_error: Option<String>,
    /// CPU threads of its own (`[models.NAME] threads`); `None`: the
    /// shared pool.
    pub threads: Option<usize>,
    /// The plugin device holding it while loaded (`None`: the CPU).
    pub device: Option<String>,
    /// Requests it decodes together at most while loaded (`[engine]
    /// decode_batch`, as many as the budget holds; one on a device).
    pub decode_batch: Option<usize>,
    /// The LoRA adapter applied to it at run time (`kiln serve
    /// --adapter`), while loaded.
    pub adapter: Option<kiln_runtime::model::lora::Applied>,
}

/// A request's route: the models that may answer it, in order.
pub struct Plan {
    pub kind: RequestKind,
    chain: Vec<Arc<Member>>,
    next: usize,
    deadline: Option<Duration>,
    failed: Vec<Failure>,
}

impl Plan {
    /// What failed so far, one line each.
    pub fn failures(&self) -> String {
        (self.failed.iter())
            .map(|f| format!("{}: {}", f.model, f.message))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The chain's models, in order.
    pub fn models(&self) -> Vec<String> {
        self.chain.iter().map(|m| m.id.clone()).collect()
    }
}

/// What a request is, for routing.
#[derive(Default)]
pub struct Ask<'a> {
    pub kind: RequestKind,
    /// A model the client named (no fallback: it asked for that one).
    pub model: Option<&'a str>,
    /// The file's path in the workspace.
    pub path: Option<&'a str>,
    /// The editor's language id.
    pub language: Option<&'a str>,
}

struct Route {
    kind: RequestKind,
    paths: Option<globset::GlobSet>,
    languages: Vec<String>,
    chain: Vec<usize>,
    deadline: Option<Duration>,
}

impl Route {
    fn matches(&self, ask: &Ask) -> bool {
        (self.kind == RequestKind::Any || self.kind == ask.kind)
            && self
                .paths
                .as_ref()
                .is_none_or(|g| ask.path.is_some_and(|p| g.is_match(p)))
            && (self.languages.is_empty()
                || ask
                    .language
                    .is_some_and(|l| self.languages.iter().any(|x| x == l)))
    }
}

/// Makes a model's request for a routed job (the prompt in its
/// tokenizer and template, within its context `n_ctx`).
pub type Build = Arc<dyn Fn(&Arc<Loaded>, usize) -> Result<Request, String> + Send + Sync>;

/// A routed job, beside its first model's request.
pub struct Job {
    pub client: u64,
    pub doc: Option<String>,
    pub not_before: Option<Instant>,
    /// Its text goes to the client as it comes (no fallback once it did).
    pub streaming: bool,
    /// The request's identity across models (its text and settings), for
    /// the offline cache.
    pub key: Option<u64>,
    /// The request for each further model of the chain.
    pub build: Build,
}

/// What engines are made with: the served model's backend and options.
pub struct Template {
    pub target: Arc<Backend>,
    pub device: u32,
    pub backend_label: String,
    pub kv_types: crate::engine::KvTypes,
    pub engine: kiln_registry::config::EngineConfig,
    pub draft: Draft,
    pub draft_max: usize,
    pub fim: Option<FimTemplate>,
    /// Shared by every engine when the models do not run at once.
    pub gate: Option<Arc<crate::engine::Gate>>,
    /// No `--backend`: a model with no `backend` of its own goes to the
    /// best-scoring device that runs its weight products and whose
    /// budget holds it (`backend::choose_for`), not the first model's.
    pub chosen_per_model: bool,
}

/// An attempt's deadline: when, its flight, its number.
type Watch = (Instant, Weak<Mutex<Flight>>, u64);

/// The models and routes in force (replaced whole when `config.toml` is
/// read again).
struct Layout {
    /// The first model, the command line's others, then `[models]`'s.
    members: Vec<Arc<Member>>,
    /// Chains by index into `members`; the last takes every request.
    routes: Vec<Route>,
    budget: u64,
    /// Where the budget comes from, for messages: `--max-memory`,
    /// `[pool] max_memory_mb`, or the memory available at the start.
    budget_from: &'static str,
    cooldown: Duration,
    config: Config,
}

struct Inner {
    layout: std::sync::RwLock<Arc<Layout>>,
    /// The first model and the command line's others: kept through reloads.
    fixed: Vec<Arc<Member>>,
    /// The budget when `[pool] max_memory_mb` is not set: what was free at
    /// the start, and what the first model took of it.
    auto_budget: u64,
    /// `kiln serve --max-memory` in MiB: wins over `[pool] max_memory_mb`,
    /// through reloads too.
    max_memory_mb: Option<u64>,
    /// Per plugin device (`BACKEND:DEVICE`), its budget when `[pool]
    /// max_device_memory_mb` is not set: its free memory when a model
    /// first loaded there, and what the pool's models held there then.
    device_budgets: Mutex<std::collections::HashMap<String, u64>>,
    template: Template,
    metrics: Arc<Metrics>,
    /// Held while a model loads or is unloaded.
    loading: Mutex<()>,
    /// Flights to move on (a model failed), for the pool's thread.
    moves: Mutex<(Vec<Arc<Mutex<Flight>>>, bool)>,
    moved: Condvar,
    /// Attempts' deadlines, for the watch thread.
    watches: Mutex<Vec<Watch>>,
    watched: Condvar,
    /// Recent answers by request key: the last resort of a chain.
    offline: moka::sync::Cache<u64, Arc<(String, Generation)>>,
}

/// The handle front ends hold; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// A model for [`Pool::start`]: its name and where it comes from.
pub struct MemberSpec {
    pub id: String,
    pub source: String,
    pub backend: Option<String>,
    pub n_ctx: Option<usize>,
    pub keep_alive: Option<Duration>,
    /// Lock its weights in memory.
    pub mlock: bool,
    /// CPU threads of its own for its graphs (`[models.NAME] threads`).
    pub threads: Option<usize>,
    /// A LoRA adapter applied at run time (`[models.NAME] adapter`).
    pub adapter: Option<String>,
}

impl Pool {
    /// A pool serving `first` (loaded, on its engine, pinned), the command
    /// line's `others` and `config`'s `[models]` (loaded on first use),
    /// routed by its `[[routes]]` (requests no route takes: the first
    /// model, then `others` in order). Fails on a route naming no model of
    /// the pool, a bad glob, or a first model larger than the budget.
    pub fn start(
        config: &Config,
        first: (MemberSpec, Engine),
        others: Vec<MemberSpec>,
        template: Template,
        metrics: Arc<Metrics>,
        max_memory_mb: Option<u64>,
    ) -> Result<Pool, String> {
        let (spec, engine) = first;
        let loaded = engine.loaded();
        let locked = if spec.mlock {
            lock_weights(&loaded)
        } else {
            Ok(0)
        };
        let device = (!engine.target().is_builtin())
            .then(|| format!("{}:{}", engine.target().name(), engine.device()));
        let first = Arc::new(Member {
            pinned: true,
            slot: Mutex::new(Slot {
                engine: Some(engine),
                need: None,
                path: Some(loaded.path.clone()),
                adapter_path: None,
                last_used: Instant::now(),
                locked,
                device,
            }),
            ..Member::new(spec, Duration::MAX)
        });
        let keep = keep_alive_of(config);
        let mut fixed = vec![first];
        for s in others {
            if !fixed.iter().any(|m| m.id == s.id) {
                let k = s.keep_alive.unwrap_or(keep);
                fixed.push(Arc::new(Member::new(s, k)));
            }
        }
        let available = kiln_runtime::measure::proc_kib_field("/proc/meminfo", "MemAvailable");
        let on_device = lock(&fixed[0].slot).device.is_some();
        let first_need = (fixed[0].resolve(config, &template))
            .ok()
            .map(|b| host_bytes(&b, on_device));
        // What was free, and what the first model took of it.
        let auto_budget = available.map_or(u64::MAX, |a| a + first_need.unwrap_or(0));
        let budgets = Budgets {
            cli_mb: max_memory_mb,
            auto: auto_budget,
        };
        let layout = layout(config, &fixed, None, budgets)?;
        if let Some(need) = first_need.filter(|&n| n > layout.budget) {
            return Err(format!(
                "{} needs {} MiB but the pool's budget ({}) is {} MiB; raise it, or serve a smaller model or context",
                fixed[0].id,
                need / MIB,
                layout.budget_from,
                layout.budget / MIB,
            ));
        }
        // On a plugin's device, the first model must fit that device's
        // budget too where the config sets one (else its free memory,
        // which the session checks when it is made).
        let device_key = lock(&fixed[0].slot).device.clone();
        if let (Some(key), Some(mb)) = (&device_key, config.pool.max_device_memory_mb)
            && let Ok(need) = fixed[0].resolve(config, &template)
            && need.total_bytes > mb.saturating_mul(MIB)
        {
            return Err(format!(
                "{} needs {} of {key}'s memory but its budget ([pool] max_device_memory_mb) is {mb} MiB; raise it, or serve a smaller model or context",
                fixed[0].id,
                need.describe(),
            ));
        }
        // The first model's engine decodes together as many requests as
        // the budget holds the caches of.
        if let Ok(b) = fixed[0].resolve(config, &template) {
            let need = with_batch(&fixed[0].id, b, on_device, &config.engine, layout.budget);
            let mut slot = lock(&fixed[0].slot);
            if let Some(e) = &slot.engine {
                e.set_decode_batch(need.sequences);
            }
            slot.need = Some(need);
        }
        let pool = Pool {
            inner: Arc::new(Inner {
                layout: std::sync::RwLock::new(Arc::new(layout)),
                fixed,
                auto_budget,
                max_memory_mb,
                device_budgets: Mutex::default(),
                template,
                metrics,
                loading: Mutex::new(()),
                moves: Mutex::new((Vec::new(), false)),
                moved: Condvar::new(),
                watches: Mutex::new(Vec::new()),
                watched: Condvar::new(),
                offline: moka::sync::Cache::builder()
                    .max_capacity(1024)
                    .time_to_live(Duration::from_secs(24 * 3600))
                    .build(),
            }),
        };
        publish(&pool.inner);
        let weak = Arc::downgrade(&pool.inner);
        std::thread::Builder::new()
            .name("kiln-pool".into())
            .spawn(move || mover(&weak))
            .map_err(|e| e.to_string())?;
        let weak = Arc::downgrade(&pool.inner);
        std::thread::Builder::new()
            .name("kiln-pool-watch".into())
            .spawn(move || watcher(&weak))
            .map_err(|e| e.to_string())?;
        Ok(pool)
    }

    /// Takes `config`'s `[models]`, `[[routes]]` and `[pool]` from now on
    /// (what `config.toml` says when read again): new models are served,
    /// changed ones start afresh, removed ones are unloaded once their
    /// queued work is done; requests already routed finish on their
    /// chains. A configuration that cannot be used changes nothing.
    /// Returns the models unloaded.
    pub fn reload(&self, config: &Config) -> Result<Vec<String>, String> {
        let inner = &self.inner;
        let _loading = lock(&inner.loading);
        let old = inner.layout();
        let budgets = Budgets {
            cli_mb: inner.max_memory_mb,
            auto: inner.auto_budget,
        };
        let new = layout(config, &inner.fixed, Some(&old), budgets)?;
        let gone: Vec<Arc<Member>> = (old.members.iter())
            .filter(|m| !new.members.iter().any(|n| Arc::ptr_eq(m, n)))
            .cloned()
            .collect();
        *inner.layout.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        for m in &gone {
            if let Some(e) = lock(&m.slot).engine.take() {
                e.shutdown();
            }
            let l = labels(&[("model", &m.id)]);
            inner.metrics.model_loaded.remove(&l);
            inner.metrics.model_health.remove(&l);
        }
        publish(inner);
        Ok(gone.iter().map(|m| m.id.clone()).collect())
    }

    /// The first model's engine (always loaded).
    pub fn first(&self) -> Engine {
        lock(&self.inner.fixed[0].slot)
            .engine
            .clone()
            .expect("the first model stays loaded")
    }

    /// Whether `m` is the first model (the one experiments run on).
    pub fn is_first(&self, m: &Arc<Member>) -> bool {
        Arc::ptr_eq(m, &self.inner.fixed[0])
    }

    /// The pool's budget in bytes.
    pub fn budget(&self) -> u64 {
        self.inner.layout().budget
    }

    /// Every model's state.
    pub fn status(&self) -> Vec<MemberStatus> {
        let now = Instant::now();
        (self.inner.layout().members.iter())
            .map(|m| {
                let slot = lock(&m.slot);
                let h = lock(&m.health);
                MemberStatus {
                    id: m.id.clone(),
                    model: m.source.clone(),
                    path: slot.path.clone(),
                    loaded: slot.engine.is_some(),
                    pinned: m.pinned,
                    health: h.state,
                    last_error: h.last_error.clone(),
                    failures: h.failures,
                    need_bytes: slot.need.as_ref().map(|b| b.total_bytes),
                    backend: m.backend.clone(),
                    idle_seconds: slot
                        .engine
                        .as_ref()
                        .map(|_| (now - slot.last_used).as_secs_f64()),
                    busy: slot.engine.as_ref().map_or(0, Engine::busy),
                    locked_bytes: match (&slot.engine, &slot.locked) {
                        (Some(_), Ok(b)) => *b,
                        _ => 0,
                    },
                    lock_error: slot.locked.as_ref().err().cloned(),
                    threads: m.threads,
                    device: slot.engine.as_ref().and(slot.device.clone()),
                    decode_batch: slot.engine.as_ref().map(Engine::decode_batch),
                    adapter: (slot.engine.as_ref()).and_then(|e| e.loaded().model.adapter.clone()),
                }
            })
            .collect()
    }

    /// Bytes the loaded models need together.
    pub fn used(&self) -> u64 {
        self.inner.layout().used()
    }

    /// The route of `ask`: its chain of models and deadline. Fails on a
    /// model the pool does not serve.
    pub fn plan(&self, ask: &Ask) -> Result<Plan, String> {
        let inner = &self.inner.layout();
        if let Some(name) = ask.model {
            let m = (inner.members.iter())
                .find(|m| m.id == name)
                .or_else(|| {
                    // The id the first model is known by elsewhere (a path's
                    // file stem, name@version).
                    let first = &inner.members[0];
                    (lock(&first.slot).engine.as_ref())
                        .is_some_and(|e| e.loaded().id == name)
                        .then_some(first)
                })
                .ok_or_else(|| {
                    format!(
                        "the model {name:?} does not exist here; kiln serves {}",
                        self.ids().join(", ")
                    )
                })?;
            let deadline = (inner.routes.iter())
                .find(|r| {
                    r.matches(&Ask {
                        model: None,
                        ..*ask
                    })
                })
                .and_then(|r| r.deadline);
            return Ok(Plan {
                kind: ask.kind,
                chain: vec![m.clone()],
                next: 0,
                deadline,
                failed: Vec::new(),
            });
        }
        let route = (inner.routes.iter())
            .find(|r| r.matches(ask))
            .expect("the last route takes every request");
        // Healthy ones (and failed ones due a probe) in order, then the
        // degraded ones.
        let mut chain: Vec<Arc<Member>> = route
            .chain
            .iter()
            .map(|&i| inner.members[i].clone())
            .collect();
        chain.sort_by_key(|m| lock(&m.health).state == HealthState::Degraded);
        Ok(Plan {
            kind: ask.kind,
            chain,
            next: 0,
            deadline: route.deadline,
            failed: Vec::new(),
        })
    }

    /// The models' names, first to last.
    pub fn ids(&self) -> Vec<String> {
        (self.inner.layout().members.iter())
            .map(|m| m.id.clone())
            .collect()
    }

    /// The next model of `plan` that can be used, with its engine (loaded
    /// here if it was not: this may take seconds); what failed on the
    /// way is recorded in the plan. `None`: none is left.
    pub fn next_engine(&self, plan: &mut Plan) -> Option<(Arc<Member>, Engine)> {
        next_engine(&self.inner, plan)
    }

    /// The model [`Pool::next_engine`] would take for `plan` when it is not
    /// loaded yet (loading it may take seconds: a caller that must not
    /// wait can [`Pool::load`] it elsewhere first).
    pub fn unloaded_next(&self, plan: &Plan) -> Option<Arc<Member>> {
        let now = Instant::now();
        let m = (plan.chain[plan.next.min(plan.chain.len())..].iter())
            .find(|m| lock(&m.health).usable_now(now))?;
        let loaded = lock(&m.slot)
            .engine
            .as_ref()
            .is_some_and(|e| !e.is_stopped());
        (!loaded).then(|| m.clone())
    }

    /// Loads `m` (if it is not), as a request would: a failure marks it
    /// failed.
    pub fn load(&self, m: &Arc<Member>) -> Result<(), String> {
        engine_of(&self.inner, m).map(|_| ()).map_err(|why| {
            m.failed(&self.inner, "load", &why);
            eprintln!("kiln: {}: {why}", m.id);
            why
        })
    }

    /// Sends `request` (made for `member`'s model) to `engine` and, should
    /// it fail, `job` to the next models of `plan`; `sink` gets the one
    /// answer. Cancelling the returned control cancels whichever model
    /// is answering.
    pub fn submit(
        &self,
        plan: Plan,
        first: (Arc<Member>, Engine, Arc<Loaded>),
        request: Request,
        job: Job,
        sink: Box<dyn Sink>,
    ) -> Arc<Control> {
        let outer = Arc::new(Control::default());
        self.submit_with(outer.clone(), plan, first, request, job, sink);
        outer
    }

    fn submit_with(
        &self,
        outer: Arc<Control>,
        plan: Plan,
        (member, engine, loaded): (Arc<Member>, Engine, Arc<Loaded>),
        request: Request,
        job: Job,
        sink: Box<dyn Sink>,
    ) {
        let flight = Arc::new(Mutex::new(Flight {
            plan,
            job,
            sink: Some(sink),
            outer: outer.clone(),
            attempt_no: 0,
            attempt: None,
            committed: false,
        }));
        launch(&self.inner, &flight, member, engine, loaded, request);
    }

    /// [`Pool::submit`] for an async caller: the events of whichever
    /// model answers; dropping them cancels it.
    pub fn submit_events(
        &self,
        plan: Plan,
        first: (Arc<Member>, Engine, Arc<Loaded>),
        request: Request,
        job: Job,
    ) -> Events {
        let outer = Arc::new(Control::default());
        let (sink, events) = Events::channel(outer.clone());
        self.submit_with(outer, plan, first, request, job, sink);
        events
    }

    /// The answer kept for `key` from an earlier request, when every model
    /// of `plan` failed.
    pub fn offline(&self, plan: &Plan, key: Option<u64>) -> Option<Finished> {
        offline_answer(&self.inner, plan, key)
    }

    /// Unloads every model (their engines finish what they hold first).
    pub fn shutdown(&self) {
        for m in &self.inner.layout().members {
            if let Some(e) = &lock(&m.slot).engine {
                e.shutdown();
            }
        }
        lock(&self.inner.moves).1 = true;
        self.inner.moved.notify_all();
        self.inner.watched.notify_all();
    }
}

fn keep_alive_of(config: &Config) -> Duration {
    config
        .pool
        .keep_alive_seconds
        .map_or(DEFAULT_KEEP_ALIVE, Duration::from_secs)
}

/// The models and routes `config` says, beside the `fixed` ones; a
/// `[models]` entry unchanged since `old` keeps its member (loaded or not,
/// with its health).
/// Where a pool's budget may come from, in order: the command line
/// (MiB), `[pool] max_memory_mb`, what was available at the start.
#[derive(Clone, Copy)]
struct Budgets {
    cli_mb: Option<u64>,
    auto: u64,
}

fn layout(
    config: &Config,
    fixed: &[Arc<Member>],
    old: Option<&Layout>,
    budgets: Budgets,
) -> Result<Layout, String> {
    config.require_valid()?;
    let file = config.config_file.display();
    let keep = keep_alive_of(config);
    let mut members = fixed.to_vec();
    for m in members.iter().skip(1) {
        *lock(&m.keep_alive) = keep;
    }
    for (name, e) in &config.models {
        if members.iter().any(|m| &m.id == name) {
            continue;
        }
        let spec = MemberSpec {
            id: name.clone(),
            source: e.model.clone(),
            backend: e.backend.clone(),
            n_ctx: e.ctx,
            keep_alive: e.keep_alive_seconds.map(Duration::from_secs),
            mlock: e.mlock.or(config.pool.mlock).unwrap_or(false),
            threads: e.threads,
            adapter: e.adapter.clone(),
        };
        let k = spec.keep_alive.unwrap_or(keep);
        let same = old.and_then(|o| {
            (o.members.iter())
                .find(|m| {
                    m.id == spec.id
                        && m.source == spec.source
                        && m.backend == spec.backend
                        && m.n_ctx == spec.n_ctx
                        && m.mlock == spec.mlock
                        && m.threads == spec.threads
                        && m.adapter == spec.adapter
                })
                .cloned()
        });
        members.push(match same {
            Some(m) => {
                *lock(&m.keep_alive) = k;
                m
            }
            None => Arc::new(Member::new(spec, k)),
        });
    }
    let index = |name: &str, what: &str| -> Result<usize, String> {
        members.iter().position(|m| m.id == name).ok_or_else(|| {
            format!(
                "{file}: {what} names the model {name:?}, which is neither a [models.{name}] entry nor a `kiln serve --model`; kiln serves {}",
                members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
            )
        })
    };
    let mut routes = Vec::new();
    for (i, r) in config.routes.iter().enumerate() {
        let what = format!("[[routes]] #{}", i + 1);
        let chain = (r.models.iter())
            .map(|m| index(m, &what))
            .collect::<Result<Vec<_>, _>>()?;
        let paths = if r.paths.is_empty() {
            None
        } else {
            let mut b = globset::GlobSetBuilder::new();
            for p in &r.paths {
                b.add(
                    globset::Glob::new(p)
                        .map_err(|e| format!("{file}: {what}: paths {p:?} is not a glob ({e})"))?,
                );
            }
            Some(b.build().map_err(|e| format!("{file}: {what}: {e}"))?)
        };
        routes.push(Route {
            kind: r.kind,
            paths,
            languages: r.languages.clone(),
            chain,
            deadline: r.deadline_ms.map(Duration::from_millis),
        });
    }
    // Every request not routed above: the first model, then the rest of
    // the command line's in order.
    routes.push(Route {
        kind: RequestKind::Any,
        paths: None,
        languages: Vec::new(),
        chain: (0..fixed.len()).collect(),
        deadline: None,
    });
    Ok(Layout {
        members,
        routes,
        budget: (budgets.cli_mb.or(config.pool.max_memory_mb))
            .map_or(budgets.auto, |mb| mb.saturating_mul(MIB)),
        budget_from: match (budgets.cli_mb, config.pool.max_memory_mb) {
            (Some(_), _) => "--max-memory",
            (None, Some(_)) => "[pool] max_memory_mb",
            (None, None) => "the memory available at the start; set [pool] max_memory_mb",
        },
        cooldown: config
            .pool
            .cooldown_seconds
            .map_or(DEFAULT_COOLDOWN, Duration::from_secs),
        config: config.clone(),
    })
}

impl Inner {
    /// Device `key`'s budget for the pool's models, and where it comes
    /// from: `[pool] max_device_memory_mb`, else what the device had free
    /// when a model first loaded there (asked through `device_memory`,
    /// else as it enumerated) plus what the pool held there then.
    fn device_budget(
        &self,
        layout: &Layout,
        key: &str,
        target: &Backend,
        device: u32,
    ) -> (u64, &'static str) {
        if let Some(mb) = layout.config.pool.max_device_memory_mb {
            return (mb.saturating_mul(MIB), "[pool] max_device_memory_mb");
        }
        let from = "its free memory when the pool first loaded a model there; set [pool] max_device_memory_mb";
        let mut budgets = lock(&self.device_budgets);
        let budget = *budgets.entry(key.to_string()).or_insert_with(|| {
            let free = match target.handle().device_memory(device) {
                Some(Ok((free, _))) => free,
                _ => target
                    .devices
                    .get(device as usize)
                    .map_or(0, |d| d.free_memory),
            };
            free + layout.used_on(key)
        });
        (budget, from)
    }

    /// The models and routes in force now.
    fn layout(&self) -> Arc<Layout> {
        self.layout
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// `need` for the requests its engine decodes together: `engine`'s
/// `decode_batch` on the CPU (on a device, which keeps one cache, one),
/// fewer where their KV caches would not fit `budget` (said on the log).
fn with_batch(
    id: &str,
    need: session::Budget,
    on_device: bool,
    engine: &kiln_registry::config::EngineConfig,
    budget: u64,
) -> session::Budget {
    let want = if on_device { 1 } else { engine.decode_batch() };
    let need = need.fitting(want, budget);
    if need.sequences < want {
        eprintln!(
            "kiln: {id} decodes {} request(s) at a time, not {want} ([engine] decode_batch): the KV caches of {want} would not fit the pool's budget of {} MiB",
            need.sequences,
            budget / MIB
        );
    }
    need
}

/// Host memory a model needs: all of it on the CPU; on a plugin's device
/// (which holds its weights, KV cache and work space) the host's copies
/// of its KV cache and work space.
fn host_bytes(need: &session::Budget, on_device: bool) -> u64 {
    if on_device {
        need.kv_bytes + need.scratch_bytes
    } else {
        need.total_bytes
    }
}

impl Layout {
    /// Host memory the loaded models need together ([`host_bytes`]).
    fn used(&self) -> u64 {
        (self.members.iter())
            .map(|m| {
                let s = lock(&m.slot);
                match (&s.engine, &s.need) {
                    (Some(_), Some(b)) => host_bytes(b, s.device.is_some()),
                    _ => 0,
                }
            })
            .sum()
    }

    /// Memory of device `key` the models loaded there need together.
    fn used_on(&self, key: &str) -> u64 {
        (self.members.iter())
            .map(|m| {
                let s = lock(&m.slot);
                match (&s.engine, &s.need) {
                    (Some(_), Some(b)) if s.device.as_deref() == Some(key) => b.total_bytes,
                    _ => 0,
                }
            })
            .sum()
    }
}

/// Writes the health, load and memory gauges.
fn publish(inner: &Inner) {
    let m = &inner.metrics;
    let layout = inner.layout();
    for member in &layout.members {
        let l = labels(&[("model", &member.id)]);
        let loaded = lock(&member.slot).engine.is_some();
        m.model_loaded.get_or_create(&l).set(i64::from(loaded));
        let state = lock(&member.health).state;
        m.model_health.get_or_create(&l).set(match state {
            HealthState::Healthy => 0,
            HealthState::Degraded => 1,
            HealthState::Failed => 2,
        });
    }
    m.pool_memory_bytes.set(layout.used() as i64);
    m.pool_budget_bytes
        .set(i64::try_from(layout.budget).unwrap_or(i64::MAX));
}

impl Member {
    fn new(spec: MemberSpec, keep_alive: Duration) -> Member {
        Member {
            id: spec.id,
            source: spec.source,
            backend: spec.backend,
            n_ctx: spec.n_ctx,
            keep_alive: Mutex::new(keep_alive),
            mlock: spec.mlock,
            threads: spec.threads,
            adapter: spec.adapter,
            pinned: false,
            slot: Mutex::new(Slot {
                engine: None,
                need: None,
                path: None,
                adapter_path: None,
                last_used: Instant::now(),
                locked: Ok(0),
                device: None,
            }),
            health: Mutex::new(Health::new()),
        }
    }

    /// Resolves its file and what it needs loaded (once).
    fn resolve(&self, config: &Config, t: &Template) -> Result<session::Budget, String> {
        let mut slot = lock(&self.slot);
        if let Some(b) = &slot.need {
            return Ok(b.clone());
        }
        let path = match &slot.path {
            Some(p) => p.clone(),
            None => {
                kiln_runtime::store::resolve_served(config, Some(&self.source))
                    .map_err(|e| e.to_string())?
                    .1
            }
        };
        let kv_type = t.kv_types.for_model(&self.id);
        // Read once, for the budget and the adapter's check.
        let header = kiln_runtime::gguf::GgufFile::open_header(&path);
        let b = match &header {
            Ok(f) => session::budget_of(f, self.n_ctx, kv_type).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let b = b.or_else(|e| {
            // An encrypted blob has no readable header: count its size.
            let size = std::fs::metadata(&path).map_err(|_| e)?.len();
            Ok::<_, String>(session::Budget {
                n_ctx: self.n_ctx.unwrap_or(0),
                kv_type: "f16",
                weights_bytes: size,
                kv_bytes: 0,
                scratch_bytes: 0,
                sequences: 1,
                batch_kv_bytes: 0,
                total_bytes: size,
            })
        })?;
        // Its adapter checked against it before it loads, its pairs held
        // beside the weights.
        let (b, adapter) = match &self.adapter {
            Some(a) => {
                let base = header.as_ref().map_err(|e| format!("adapter {a:?}: {e}"))?;
                let (file, applied) = kiln_runtime::store::adapter_for_model(config, a, base)?;
                (b.with_weights(applied.bytes), Some(file))
            }
            None => (b, None),
        };
        slot.path = Some(path);
        slot.adapter_path = adapter;
        slot.need = Some(b.clone());
        Ok(b)
    }

    fn failed(&self, inner: &Inner, reason: &'static str, message: &str) -> Failure {
        lock(&self.health).failed(message, inner.layout().cooldown, Instant::now());
        inner
            .metrics
            .route_fallbacks
            .get_or_create(&labels(&[("model", &self.id), ("reason", reason)]))
            .inc();
        publish(inner);
        Failure {
            model: self.id.clone(),
            reason,
            message: message.to_string(),
        }
    }
}

/// Failures of a backend so far: segments re-run on the CPU, devices
/// lost, worker crashes.
fn backend_failures(target: &Backend) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &target.stats;
    s.runtime_failures_rerun.load(Relaxed)
        + s.device_losses.load(Relaxed)
        + target
            .handle()
            .worker()
            .map_or(0, |w| w.crashes.load(Relaxed))
}

fn next_engine(inner: &Arc<Inner>, plan: &mut Plan) -> Option<(Arc<Member>, Engine)> {
    while let Some(m) = plan.chain.get(plan.next).cloned() {
        plan.next += 1;
        if let Err(why) = lock(&m.health).begin(Instant::now()) {
            plan.failed.push(Failure {
                model: m.id.clone(),
                reason: "cooling_down",
                message: why,
            });
            continue;
        }
        match engine_of(inner, &m) {
            Ok(e) => return Some((m, e)),
            Err(why) => {
                let f = m.failed(inner, "load", &why);
                eprintln!("kiln: {}: {why}", m.id);
                plan.failed.push(f);
            }
        }
    }
    None
}

/// `m`'s engine: running, or started now (after unloading idle models
/// for room, least recently used first).
fn engine_of(inner: &Arc<Inner>, m: &Arc<Member>) -> Result<Engine, String> {
    {
        let mut slot = lock(&m.slot);
        if let Some(e) = slot.engine.clone().filter(|e| !e.is_stopped()) {
            slot.last_used = Instant::now();
            return Ok(e);
        }
    }
    let _loading = lock(&inner.loading);
    {
        let mut slot = lock(&m.slot);
        match &slot.engine {
            Some(e) if !e.is_stopped() => return Ok(e.clone()),
            // Its thread stopped (a panic): loaded again, afresh.
            Some(_) => slot.engine = None,
            None => {}
        }
    }
    let t = &inner.template;
    let layout = inner.layout();
    let need = m.resolve(&layout.config, t)?;
    let (target, device, label) = match &m.backend {
        None if t.chosen_per_model => {
            let path = lock(&m.slot).path.clone().expect("resolved above");
            let fits = |b: &Arc<kiln_runtime::backend::Backend>, d: u32| {
                let key = format!("{}:{d}", b.name());
                need.total_bytes <= inner.device_budget(&layout, &key, b, d).0
            };
            let Chosen { executor, label } = kiln_runtime::backend::choose_for(
                &layout.config,
                None,
                &path,
                fits,
                |w| eprintln!("kiln: {}: {w}", m.id),
                |p| eprintln!("kiln: {p}"),
            )
            .map_err(|e| e.to_string())?;
            (executor.target.clone(), executor.device, label)
        }
        None => (t.target.clone(), t.device, t.backend_label.clone()),
        Some(name) => {
            let Chosen { executor, label } = kiln_runtime::backend::choose(
                &layout.config,
                Some(name),
                |w| eprintln!("kiln: warning: {w}"),
                |p| eprintln!("kiln: {p}"),
            )
            .map_err(|e| e.to_string())?;
            (executor.target.clone(), executor.device, label)
        }
    };
    // On a plugin's device the weights, KV cache and work space live in
    // its memory, and the host keeps copies of the KV cache and work
    // space; on the CPU all of it is the host's.
    let on_device = (!target.is_builtin()).then(|| format!("{}:{device}", target.name()));
    let need = with_batch(&m.id, need, on_device.is_some(), &t.engine, layout.budget);
    let host_need = host_bytes(&need, on_device.is_some());
    let device_budget = on_device
        .as_ref()
        .map(|key| inner.device_budget(&layout, key, &target, device));
    let mib = |b: u64| b / MIB;
    let budget = layout.budget;
    let what = || need.describe();
    if host_need > budget {
        return Err(format!(
            "needs {} but the pool's budget is {} MiB ({}); raise it, give it a smaller ctx, or use a smaller quantization",
            what(),
            mib(budget),
            layout.budget_from
        ));
    }
    if let (Some(key), Some((dev_budget, from))) = (&on_device, device_budget)
        && need.total_bytes > dev_budget
    {
        return Err(format!(
            "needs {} of {key}'s memory but the pool's budget there is {} MiB ({from}); raise it, give it a smaller ctx, or use a smaller quantization",
            what(),
            mib(dev_budget),
        ));
    }
    // Room: unload idle models, least recently used first (waiting a
    // moment for one in use to finish: a request just answered may not
    // have left its engine yet).
    let patience = Instant::now() + ROOM_WAIT;
    loop {
        let used = layout.used();
        let host_fits = used + host_need <= budget;
        // The device's budget, where its models hold too much.
        let device_short = match (&on_device, device_budget) {
            (Some(key), Some((dev_budget, from))) => {
                let used = layout.used_on(key);
                (used + need.total_bytes > dev_budget).then_some((key, used, dev_budget, from))
            }
            _ => None,
        };
        if host_fits && device_short.is_none() {
            break;
        }
        // Short of device memory: only a model on that device helps.
        let victim = (layout.members.iter())
            .filter(|o| !o.pinned && !Arc::ptr_eq(o, m))
            .filter_map(|o| {
                let s = lock(&o.slot);
                let e = s.engine.as_ref()?;
                let helps = host_fits
                    || device_short.is_none_or(|(key, ..)| s.device.as_deref() == Some(key));
                (e.busy() == 0 && helps).then_some((s.last_used, o.clone()))
            })
            .min_by_key(|(t, _)| *t);
        let Some((_, victim)) = victim else {
            if Instant::now() < patience {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let (held, of, from) = match device_short {
                Some((key, used, dev_budget, from)) => {
                    (used, dev_budget, format!("on {key}: {from}"))
                }
                None => (used, budget, layout.budget_from.to_string()),
            };
            return Err(format!(
                "needs {} but {} MiB of the pool's {} MiB ({}) are held by models in use ({}); wait, or raise it",
                what(),
                mib(held),
                mib(of),
                from,
                (layout.members.iter())
                    .filter(|o| lock(&o.slot).engine.is_some())
                    .map(|o| o.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        unload(inner, &victim, "budget");
        eprintln!("kiln: unloaded {} to make room for {}", victim.id, m.id);
    }
    let (path, adapter) = {
        let slot = lock(&m.slot);
        (
            slot.path.clone().expect("resolved above"),
            slot.adapter_path.clone(),
        )
    };
    let started = Instant::now();
    let loaded = Loaded::load_adapted(
        m.id.clone(),
        path,
        adapter.as_deref(),
        t.fim,
        &target,
        device,
    )?;
    let locked = if m.mlock {
        lock_weights(&loaded)
    } else {
        Ok(0)
    };
    let engine = Engine::start(
        loaded,
        EngineOptions {
            target,
            device,
            backend_label: label,
            n_ctx: m.n_ctx,
            kv_types: t.kv_types.clone(),
            completion_cache_entries: 256,
            metrics: inner.metrics.clone(),
            announce: false,
            gate: t.gate.clone(),
            draft: t.draft,
            draft_max: t.draft_max,
            draft_model: None,
            engine: kiln_registry::config::EngineConfig {
                decode_batch: Some(need.sequences),
                ..t.engine
            },
            threads: m.threads,
        },
    );
    eprintln!(
        "kiln: loaded {} in {:.2} s ({})",
        m.id,
        started.elapsed().as_secs_f64(),
        what()
    );
    {
        let mut slot = lock(&m.slot);
        slot.engine = Some(engine.clone());
        slot.last_used = Instant::now();
        slot.locked = locked;
        slot.device = on_device;
        slot.need = Some(need);
    }
    lock(&m.health).backend_failures_seen = Some(backend_failures(engine.target()));
    inner
        .metrics
        .model_loads
        .get_or_create(&labels(&[("model", &m.id)]))
        .inc();
    publish(inner);
    Ok(engine)
}

/// Locks `loaded`'s weights in memory; a refusal (the `ulimit -l` limit,
/// no `CAP_IPC_LOCK`) is said and the model served unlocked.
impl Pool {
    /// Serves `loaded` in place of the first model (another version
    /// activated, or its FIM template changed), its weights locked in
    /// memory where the first model asks for it, as at its load.
    pub fn replace_first(&self, loaded: Loaded) {
        let m = &self.inner.fixed[0];
        let locked = if m.mlock {
            lock_weights(&loaded)
        } else {
            Ok(0)
        };
        let mut slot = lock(&m.slot);
        slot.path = Some(loaded.path.clone());
        slot.locked = locked;
        if let Some(e) = &slot.engine {
            e.replace_model(loaded);
        }
    }
}

fn lock_weights(loaded: &Loaded) -> Result<u64, String> {
    loaded.model.file.lock_in_memory().map_err(|e| {
        let why = format!(
            "its weights ({} MiB) cannot be locked in memory ({e}); raise `ulimit -l` (RLIMIT_MEMLOCK) or give kiln CAP_IPC_LOCK; served unlocked",
            loaded.model.file.bytes().len() >> 20
        );
        eprintln!("kiln: {}: {why}", loaded.id);
        why
    })
}

fn unload(inner: &Inner, m: &Member, reason: &str) {
    if let Some(e) = lock(&m.slot).engine.take() {
        e.shutdown();
    }
    inner
        .metrics
        .model_evictions
        .get_or_create(&labels(&[("model", &m.id), ("reason", reason)]))
        .inc();
    publish(inner);
}

/// A routed request on its way through the chain.
struct Flight {
    plan: Plan,
    job: Job,
    /// The client's sink, until the answer is given.
    sink: Option<Box<dyn Sink>>,
    /// The client's control: cancels every attempt.
    outer: Arc<Control>,
    /// Bumped per attempt: a stale attempt's output is dropped.
    attempt_no: u64,
    /// The running attempt: its control, model and start.
    attempt: Option<(Arc<Control>, Arc<Member>, Instant)>,
    /// Text was sent to the client: no other model may answer now.
    committed: bool,
}

impl Flight {
    fn deliver(&mut self, result: Result<Finished, String>) {
        if let Some(sink) = self.sink.take() {
            sink.done(result);
        }
    }

    /// Takes the attempt `attempt_no` over (for its end or its deadline): `None`
    /// when it is stale or already taken.
    fn claim(&mut self, attempt_no: u64) -> Option<(Arc<Control>, Arc<Member>, Instant)> {
        if self.attempt_no != attempt_no || self.sink.is_none() {
            return None;
        }
        self.attempt.take()
    }

    fn answered(&self, model: &str, from_cache: bool) -> Answered {
        Answered {
            model: model.to_string(),
            kind: self.plan.kind.name(),
            fallback_from: self.plan.failed.clone(),
            from_cache,
        }
    }
}

/// Starts an attempt of `flight` on `engine`.
fn launch(
    inner: &Arc<Inner>,
    flight: &Arc<Mutex<Flight>>,
    member: Arc<Member>,
    engine: Engine,
    loaded: Arc<Loaded>,
    request: Request,
) {
    let (attempt_no, control, job) = {
        let mut f = lock(flight);
        f.attempt_no += 1;
        let control = f.outer.child();
        f.attempt = Some((control.clone(), member.clone(), Instant::now()));
        if let Some(d) = f.plan.deadline {
            lock(&inner.watches).push((Instant::now() + d, Arc::downgrade(flight), f.attempt_no));
            inner.watched.notify_one();
        }
        let job = (
            f.job.client,
            f.job.doc.clone(),
            f.job.not_before,
            Priority::of(f.plan.kind),
        );
        (f.attempt_no, control, job)
    };
    // The member's name, or an experiment arm's version standing in for it.
    let model = if Arc::ptr_eq(&loaded, &engine.loaded()) {
        member.id.clone()
    } else {
        loaded.id.clone()
    };
    let sink = Attempt {
        ended: false,
        inner: Arc::downgrade(inner),
        flight: flight.clone(),
        attempt_no,
        model,
        member,
        buffer: String::new(),
    };
    engine.submit_job(Submit {
        client: job.0,
        doc: job.1,
        loaded,
        request,
        sink: Box::new(sink),
        not_before: job.2,
        control,
        priority: job.3,
    });
}

/// The sink of one attempt: passes its answer on, or hands the flight to
/// the next model when it fails.
struct Attempt {
    /// `done` was called (a sink dropped without it: its engine's thread
    /// stopped).
    ended: bool,
    inner: Weak<Inner>,
    flight: Arc<Mutex<Flight>>,
    attempt_no: u64,
    member: Arc<Member>,
    /// The model that answers: the member's name, or an A/B arm's
    /// version run in its place.
    model: String,
    /// Text held until the attempt ends (not streaming).
    buffer: String,
}

impl Sink for Attempt {
    fn text(&mut self, text: &str) -> bool {
        let mut f = lock(&self.flight);
        if f.attempt_no != self.attempt_no || f.attempt.is_none() || f.outer.is_cancelled() {
            return false;
        }
        if !f.job.streaming {
            self.buffer.push_str(text);
            return true;
        }
        if !f.committed {
            f.committed = true;
            let id = self.model.clone();
            if let Some(s) = f.sink.as_mut() {
                s.answering(&id);
            }
        }
        f.sink.as_mut().is_some_and(|s| s.text(text))
    }

    fn done(mut self: Box<Self>, result: Result<Finished, String>) {
        self.ended = true;
        self.end(result);
    }

    fn is_closed(&self) -> bool {
        let f = lock(&self.flight);
        f.attempt_no != self.attempt_no
            || f.attempt.is_none()
            || f.outer.is_cancelled()
            || f.sink.as_ref().is_none_or(|s| s.is_closed())
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.ended {
            // Dropped unanswered: the engine's thread stopped under it.
            self.ended = true;
            let model = self.model.clone();
            self.end(Err(format!(
                "the engine of {model} stopped without answering"
            )));
        }
    }
}

impl Attempt {
    /// The attempt's end: its answer passed on, or (a failure before any
    /// text reached the client) the next model asked.
    fn end(&mut self, result: Result<Finished, String>) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let mut f = lock(&self.flight);
        if f.claim(self.attempt_no).is_none() {
            return;
        }
        let now = Instant::now();
        match result {
            Ok(mut finished) => {
                let engine = {
                    let mut slot = lock(&self.member.slot);
                    slot.last_used = now;
                    slot.engine.clone()
                };
                if let Some(e) = engine {
                    let mut h = lock(&self.member.health);
                    let before = h.state;
                    h.succeeded(backend_failures(e.target()), inner.layout().cooldown, now);
                    let changed = h.state != before;
                    drop(h);
                    if changed {
                        publish(&inner);
                    }
                }
                finished.route = Some(f.answered(&self.model, false));
                if finished.generation.stop_reason != StopReason::Cancelled
                    && let Some(key) = f.job.key
                {
                    inner.offline.insert(
                        key,
                        Arc::new((self.model.clone(), finished.generation.clone())),
                    );
                }
                if !f.committed {
                    let id = self.model.clone();
                    if let Some(s) = f.sink.as_mut() {
                        s.answering(&id);
                        if !self.buffer.is_empty() {
                            s.text(&self.buffer);
                        }
                    }
                }
                f.deliver(Ok(finished));
            }
            Err(e) if f.committed || f.outer.is_cancelled() => {
                f.deliver(Err(e));
            }
            Err(e) if e.starts_with(crate::engine::UNLOADED) => {
                // Unloaded between its choice and its job (its keep-alive
                // ran out): not its failure; load it again.
                lock(&self.member.health).probing = false;
                f.plan.next -= 1;
                drop(f);
                move_on(&inner, self.flight.clone());
            }
            Err(e) => {
                let failure = self.member.failed(&inner, "error", &e);
                eprintln!(
                    "kiln: {} failed ({e}); asking the next model",
                    self.member.id
                );
                f.plan.failed.push(failure);
                drop(f);
                move_on(&inner, self.flight.clone());
            }
        }
    }
}

/// Hands `flight` to the pool's thread, which asks the next model.
fn move_on(inner: &Inner, flight: Arc<Mutex<Flight>>) {
    lock(&inner.moves).0.push(flight);
    inner.moved.notify_one();
}

/// The pool's thread: moves failed flights on to their next model
/// (loading it if need be, which may take seconds: off the engines' and
/// front ends' threads).
fn mover(inner: &Weak<Inner>) {
    loop {
        let flight = {
            let Some(i) = inner.upgrade() else { return };
            let mut q = lock(&i.moves);
            loop {
                if q.1 {
                    return;
                }
                if let Some(f) = q.0.pop() {
                    break f;
                }
                q = i
                    .moved
                    .wait_timeout(q, Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if Arc::strong_count(&i) == 1 {
                    return;
                }
            }
        };
        let Some(i) = inner.upgrade() else { return };
        next_attempt(&i, &flight);
    }
}

/// Asks the next usable model of `flight`'s chain; when none is left,
/// answers from the offline cache or with every failure.
fn next_attempt(inner: &Arc<Inner>, flight: &Arc<Mutex<Flight>>) {
    loop {
        let (mut plan, build) = {
            let mut f = lock(flight);
            if f.sink.is_none() {
                return;
            }
            if f.outer.is_cancelled() {
                let result = Err("cancelled".to_string());
                f.deliver(result);
                return;
            }
            let plan = Plan {
                kind: f.plan.kind,
                chain: f.plan.chain.clone(),
                next: f.plan.next,
                deadline: f.plan.deadline,
                failed: Vec::new(),
            };
            (plan, f.job.build.clone())
        };
        let next = next_engine(inner, &mut plan);
        let mut f = lock(flight);
        f.plan.next = plan.next;
        f.plan.failed.extend(plan.failed);
        let Some((member, engine)) = next else {
            let key = f.job.key;
            let answer = offline_answer(inner, &f.plan, key);
            let result = answer.ok_or_else(|| {
                format!("no model of the route could answer: {}", f.plan.failures())
            });
            if let Ok(a) = &result {
                let m = a
                    .route
                    .as_ref()
                    .map_or("", |r| r.model.as_str())
                    .to_string();
                if let Some(s) = f.sink.as_mut() {
                    s.answering(&m);
                    s.text(&a.generation.text);
                }
            }
            f.deliver(result);
            return;
        };
        drop(f);
        let loaded = engine.loaded();
        match build(&loaded, engine.n_ctx()) {
            Ok(request) => return launch(inner, flight, member, engine, loaded, request),
            Err(e) => {
                // This model cannot take the request (its context is too
                // small for the prompt): not its failure.
                lock(&member.health).probing = false;
                lock(flight).plan.failed.push(Failure {
                    model: member.id.clone(),
                    reason: "request",
                    message: e,
                });
            }
        }
    }
}

fn offline_answer(inner: &Inner, plan: &Plan, key: Option<u64>) -> Option<Finished> {
    let hit = inner.offline.get(&key?)?;
    let (model, generation) = (&hit.0, &hit.1);
    inner.metrics.offline_answers.inc();
    Some(Finished {
        generation: generation.clone(),
        completion_cache_hit: true,
        queue_ms: 0.0,
        time_to_first_token_ms: 0.0,
        total_ms: 0.0,
        tokens_after_cancel: 0,
        route: Some(Answered {
            model: model.clone(),
            kind: plan.kind.name(),
            fallback_from: plan.failed.clone(),
            from_cache: true,
        }),
    })
}

/// The watch thread: fails attempts past their deadline (handing their
/// flights on) and unloads models idle past their keep-alive.
fn watcher(inner: &Weak<Inner>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        if lock(&i.moves).1 {
            return;
        }
        let now = Instant::now();
        let due: Vec<_> = {
            let mut w = lock(&i.watches);
            let (due, keep): (Vec<_>, Vec<_>) = w.drain(..).partition(|(t, _, _)| *t <= now);
            *w = keep;
            due
        };
        for (_, flight, attempt_no) in due {
            let Some(flight) = flight.upgrade() else {
                continue;
            };
            let mut f = lock(&flight);
            if f.committed {
                continue;
            }
            let Some((control, member, started)) = f.claim(attempt_no) else {
                continue;
            };
            control.cancel();
            let why = format!(
                "no answer within the route's deadline of {} ms",
                (now - started).as_millis()
            );
            let failure = member.failed(&i, "deadline", &why);
            eprintln!("kiln: {}: {why}; asking the next model", member.id);
            f.plan.failed.push(failure);
            drop(f);
            move_on(&i, flight);
        }
        // Keep-alive.
        for m in i.layout().members.iter().filter(|m| !m.pinned) {
            let idle = {
                let s = lock(&m.slot);
                // At least a moment idle: a request may have chosen it and
                // not yet queued its job.
                s.engine.as_ref().is_some_and(|e| {
                    e.busy() == 0 && now - s.last_used >= lock(&m.keep_alive).max(MIN_IDLE)
                })
            };
            if idle {
                let _loading = lock(&i.loading);
                unload(&i, m, "idle");
                eprintln!("kiln: unloaded {} (idle for its keep-alive)", m.id);
            }
        }
        let next = lock(&i.watches).iter().map(|w| w.0).min();
        let wait = next.map_or(Duration::from_millis(500), |t| {
            t.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500))
        });
        let w = lock(&i.watches);
        let _ = i.watched.wait_timeout(w, wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_model_cools_down_doubling_and_one_request_probes_it() {
        let t0 = Instant::now();
        let cool = Duration::from_secs(10);
        let mut h = Health::new();
        assert!(h.begin(t0).is_ok());
        h.failed("boom", cool, t0);
        assert_eq!(h.state, HealthState::Failed);
        assert!(h.begin(t0 + Duration::from_secs(9)).is_err());
        assert!(h.begin(t0 + Duration::from_secs(10)).is_ok(), "the probe");
        assert!(
            h.begin(t0 + Duration::from_secs(10)).is_err(),
            "one probe at a time"
        );
        // The probe fails: twice as long.
        let t1 = t0 + Duration::from_secs(10);
        h.failed("boom again", cool, t1);
        assert!(h.begin(t1 + Duration::from_secs(19)).is_err());
        assert!(h.begin(t1 + Duration::from_secs(20)).is_ok());
        h.succeeded(0, cool, t1 + Duration::from_secs(21));
        assert_eq!(h.state, HealthState::Healthy);
        assert_eq!(h.consecutive, 0);
        assert_eq!(h.failures, 2);
        // Backend failures under a request degrade it, until a cooldown
        // passes without more.
        let t2 = t1 + Duration::from_secs(30);
        h.succeeded(3, cool, t2);
        assert_eq!(h.state, HealthState::Degraded);
        assert!(h.begin(t2).is_ok(), "a degraded model still answers");
        h.succeeded(3, cool, t2 + Duration::from_secs(1));
        assert_eq!(h.state, HealthState::Degraded);
        h.succeeded(3, cool, t2 + Duration::from_secs(11));
        assert_eq!(h.state, HealthState::Healthy);
        // The cooldown stops doubling at 32×.
        for _ in 0..10 {
            h.failed("x", cool, t2);
        }
        assert_eq!(h.retry_at, Some(t2 + cool * 32));
    }

    #[test]
    fn routes_match_kind_path_and_language() {
        let mut b = globset::GlobSetBuilder::new();
        b.add(globset::Glob::new("**/*.rs").unwrap());
        let r = Route {
            kind: RequestKind::Inline,
            paths: Some(b.build().unwrap()),
            languages: vec!["rust".into()],
            chain: vec![0],
            deadline: None,
        };
        let ask = |kind, path, language| Ask {
            kind,
            model: None,
            path,
            language,
        };
        assert!(r.matches(&ask(RequestKind::Inline, Some("src/a/b.rs"), Some("rust"))));
        assert!(!r.matches(&ask(RequestKind::Chat, Some("src/a/b.rs"), Some("rust"))));
        assert!(!r.matches(&ask(RequestKind::Inline, Some("b.py"), Some("rust"))));
        assert!(!r.matches(&ask(RequestKind::Inline, None, Some("rust"))));
        assert!(!r.matches(&ask(RequestKind::Inline, Some("b.rs"), Some("python"))));
        let any = Route {
            kind: RequestKind::Any,
            paths: None,
            languages: Vec::new(),
            chain: vec![0],
            deadline: None,
        };
        assert!(any.matches(&ask(RequestKind::Warmup, None, None)));
    }
}
