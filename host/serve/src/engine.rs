//! The engine: one thread that owns the model's sessions (their KV
//! caches) and runs completion jobs, taking them fairly from each
//! client's queue: one at a time, or (on the CPU, `[engine]
//! decode_batch`) several of the model's together, one forward pass a
//! token for all of them, jobs queued meanwhile joining between tokens
//! (`run_batch`). A front end submits a job with a [`Sink`] that the
//! engine thread feeds: the language server's writes the reply itself
//! (no thread waits for it), the HTTP API's forwards to its async handler
//! ([`Engine::submit_events`]). Front ends never wait on the engine for
//! status or metrics.
//!
//! - Prefix reuse: consecutive prompts that share a prefix (typing) keep
//!   the shared part of the KV cache ([`Session`] does the matching).
//! - Exact repeats are answered from a cache of recent completions.
//! - A job for a document cancels the document's previous job.
//! - Debounce: a job may wait until a time before it starts
//!   ([`Engine::submit_after`]); a newer job for its document meanwhile
//!   cancels it before any of its prompt is evaluated.

use super::fim::{FimTemplate, RepoFormat};
use super::metrics::{Metrics, labels};
use kiln_runtime::backend::Backend;
use kiln_runtime::backend::exec::Executor;
use kiln_runtime::model::explain::{Ask, Explanation};
use kiln_runtime::model::forward::KvCache;
use kiln_runtime::model::generate::{
    BatchHost, Control, Draft, Generation, Joining, Outcome, Paused, Request, StopReason,
    generate_resumable, same_vocabulary,
};
use kiln_runtime::model::{Model, ModelError, Session};
use kiln_runtime::tokenizer::Tokenizer;
use serde::Serialize;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::ops::Bound::{Excluded, Unbounded};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// A model ready to serve: weights, tokenizer and prompt format.
pub struct Loaded {
    /// The id clients use (`/v1/models`, `kiln/status`).
    pub id: String,
    pub path: PathBuf,
    pub model: Arc<Model>,
    pub tok: Tokenizer,
    pub fim: FimTemplate,
    /// Repository-level prompts, where the model's family was trained on
    /// them and its vocabulary has their tokens.
    pub repo: Option<RepoFormat>,
    /// The GGUF's `tokenizer.chat_template` (Jinja), if any.
    pub chat_template: Option<String>,
    /// Token counts of lines and snippets seen, for prompt budgets.
    pub counts: crate::prompt::TokenCounts,
}

impl Loaded {
    /// Loads the model at `path` with its weights in the layout `device`
    /// of `target` runs best ([`Model::load_for`]).
    pub fn load(
        id: String,
        path: PathBuf,
        fim: Option<FimTemplate>,
        target: &Arc<Backend>,
        device: u32,
    ) -> Result<Loaded, String> {
        Loaded::load_adapted(id, path, None, fim, target, device)
    }

    /// [`Loaded::load`] with a LoRA adapter applied at run time
    /// ([`Model::load_adapted`]).
    pub fn load_adapted(
        id: String,
        path: PathBuf,
        adapter: Option<&std::path::Path>,
        fim: Option<FimTemplate>,
        target: &Arc<Backend>,
        device: u32,
    ) -> Result<Loaded, String> {
        let model =
            Model::load_adapted(&path, adapter, target, device).map_err(|e| e.to_string())?;
        let tok = model.tokenizer().map_err(|e| e.to_string())?;
        let name = model
            .file
            .get("general.name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let fim =
            fim.unwrap_or_else(|| FimTemplate::detect(&tok, &format!("{name} {}", path.display())));
        let chat_template = model
            .file
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let repo = RepoFormat::detect(&tok, fim);
        Ok(Loaded {
            id,
            path,
            model,
            tok,
            fim,
            repo,
            chat_template,
            counts: Default::default(),
        })
    }
}

/// What a job sends back, in order: text as it becomes final, then `Done`.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one `Done` per job, moved once
pub enum Event {
    /// The model answering (a pool's route may fall back to another),
    /// before its text.
    Model(String),
    Text(String),
    Done(Result<Finished, String>),
}

/// Where a job's output goes, fed on the engine thread: text as it
/// becomes final, then the end, exactly once.
pub trait Sink: Send {
    /// `false` cancels the job: nobody listens any more.
    fn text(&mut self, text: &str) -> bool;
    fn done(self: Box<Self>, result: Result<Finished, String>);
    /// Nobody listens any more: a queued job does not start.
    fn is_closed(&self) -> bool {
        false
    }
    /// Which model answers, before its text (a routed job's).
    fn answering(&mut self, _model: &str) {}
}

/// A submitted job's events, for an async caller. Dropping it (the client
/// went away, the request was answered) cancels the job if it is still
/// queued or running: at its next batch of prompt tokens or its next token.
pub struct Events {
    rx: UnboundedReceiver<Event>,
    control: Arc<Control>,
}

impl Events {
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.control.cancel();
    }
}

/// How a job refused after [`Engine::shutdown`] fails.
pub const UNLOADED: &str = "the model was unloaded";

/// A job for [`Engine::submit_job`].
pub struct Submit {
    /// Whose queue it waits in (clients take turns).
    pub client: u64,
    /// Its document: a newer job for the same one cancels it.
    pub doc: Option<String>,
    pub loaded: Arc<Loaded>,
    pub request: Request,
    pub sink: Box<dyn Sink>,
    /// Not started before this (debounce).
    pub not_before: Option<Instant>,
    /// Cancels it, queued or running.
    pub control: Arc<Control>,
    pub priority: Priority,
}

impl Events {
    /// The events of a job whose sink is [`Events::sink`]'s.
    pub fn channel(control: Arc<Control>) -> (Box<dyn Sink>, Events) {
        let (tx, rx) = unbounded_channel();
        (Box::new(ChannelSink(tx)), Events { rx, control })
    }
}

/// The [`Sink`] behind [`Events`].
struct ChannelSink(UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn text(&mut self, text: &str) -> bool {
        self.0.send(Event::Text(text.to_string())).is_ok()
    }

    fn done(self: Box<Self>, result: Result<Finished, String>) {
        let _ = self.0.send(Event::Done(result));
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn answering(&mut self, model: &str) {
        let _ = self.0.send(Event::Model(model.to_string()));
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Finished {
    pub generation: Generation,
    /// Answered from the cache of recent completions.
    pub completion_cache_hit: bool,
    pub queue_ms: f64,
    pub time_to_first_token_ms: f64,
    pub total_ms: f64,
    /// Tokens sampled after the job was cancelled (at most the one in flight).
    pub tokens_after_cancel: usize,
    /// Which model of its route answered, and which failed before it
    /// (set by the [`crate::pool::Pool`]; `None` for a job submitted to
    /// an engine directly).
    pub route: Option<crate::pool::Answered>,
}

struct Job {
    priority: Priority,
    client: u64,
    doc: Option<String>,
    loaded: Arc<Loaded>,
    control: Arc<Control>,
    enqueued: Instant,
    /// Not started before this (debounce).
    not_before: Option<Instant>,
    work: Work,
}

/// What a job does with the session.
enum Work {
    Complete {
        request: Request,
        sink: Box<dyn Sink>,
        /// Where it stood when a more urgent job paused it.
        resume: Option<Box<Paused>>,
    },
    Explain {
        ask: Ask,
        reply: std::sync::mpsc::Sender<Result<Explanation, String>>,
    },
}

/// Which jobs go first: an inline completion (someone is typing) before a
/// chat, a chat before work nobody waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Inline = 0,
    #[default]
    Chat = 1,
    Warmup = 2,
}

impl Priority {
    pub fn of(kind: kiln_registry::config::RequestKind) -> Priority {
        use kiln_registry::config::RequestKind as K;
        match kind {
            K::Inline => Priority::Inline,
            K::Chat | K::Any => Priority::Chat,
            K::Warmup => Priority::Warmup,
        }
    }
}

/// How long a less urgent job waits for other models' inline completions
/// before it runs anyway.
const GATE_PATIENCE: Duration = Duration::from_secs(5);

/// Engines of a pool that yield to each other's inline completions:
/// while any of them has one queued or running, the others' less urgent
/// jobs pause at their next token and wait (on a machine with few cores
/// the keystroke is then served first, instead of splitting the cores
/// with a chat on another model).
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Inline jobs queued or running on any engine.
    urgent: usize,
    /// Less urgent jobs running now, to pause.
    running: Vec<std::sync::Weak<Control>>,
}

impl Gate {
    /// An inline job was queued: the less urgent ones running pause.
    fn urgent_in(&self) {
        let mut s = lock(&self.state);
        s.urgent += 1;
        for c in s.running.drain(..).filter_map(|w| w.upgrade()) {
            c.request_pause();
        }
        drop(s);
        self.changed.notify_all();
    }

    /// An inline job left its engine.
    fn urgent_out(&self) {
        let mut s = lock(&self.state);
        s.urgent = s.urgent.saturating_sub(1);
        drop(s);
        self.changed.notify_all();
    }

    /// Whether a less urgent job may run now; if so it is registered, to
    /// be paused by the next inline job anywhere.
    fn enter(&self, control: &Arc<Control>) -> bool {
        let mut s = lock(&self.state);
        if s.urgent > 0 {
            return false;
        }
        s.running.retain(|w| w.strong_count() > 0);
        s.running.push(Arc::downgrade(control));
        true
    }

    fn wait(&self, at_most: Duration) {
        let s = lock(&self.state);
        if s.urgent > 0 {
            let _ = self.changed.wait_timeout(s, at_most);
        }
    }
}

/// Per-client queues served round robin: the next job comes from the first
/// client after the last one served that has work, so one busy client
/// cannot starve the others.
struct Fair<T> {
    per_client: BTreeMap<u64, VecDeque<T>>,
    last_client: u64,
    len: usize,
}

impl<T> Default for Fair<T> {
    fn default() -> Fair<T> {
        Fair {
            per_client: BTreeMap::new(),
            last_client: 0,
            len: 0,
        }
    }
}

impl<T> Fair<T> {
    fn push(&mut self, client: u64, item: T) {
        self.per_client.entry(client).or_default().push_back(item);
        self.len += 1;
    }

    /// Puts `item` back at the head of `client`'s queue (a paused job).
    fn push_front(&mut self, client: u64, item: T) {
        self.per_client.entry(client).or_default().push_front(item);
        self.len += 1;
    }

    /// Up to `max` items that `fits`, taken from the clients in turn
    /// after the last one served (each client's first fitting item, round
    /// after round), so that a batch is shared fairly too.
    fn take_where(&mut self, max: usize, fits: impl Fn(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        if self.len == 0 {
            return taken;
        }
        let mut progress = true;
        while taken.len() < max && progress {
            progress = false;
            let clients: Vec<u64> = (self
                .per_client
                .range((Excluded(self.last_client), Unbounded)))
            .chain(self.per_client.range(..=self.last_client))
            .map(|(&c, _)| c)
            .collect();
            for c in clients {
                if taken.len() == max {
                    break;
                }
                let q = self.per_client.get_mut(&c).expect("listed");
                if let Some(at) = q.iter().position(&fits) {
                    taken.extend(q.remove(at));
                    self.len -= 1;
                    progress = true;
                    if q.is_empty() {
                        self.per_client.remove(&c);
                    }
                }
            }
        }
        taken
    }

    fn pop(&mut self) -> Option<T> {
        let next = self
            .per_client
            .range((Excluded(self.last_client), Unbounded))
            .chain(self.per_client.range(..=self.last_client))
            .find(|(_, q)| !q.is_empty())
            .map(|(&c, _)| c)?;
        self.last_client = next;
        let q = self.per_client.get_mut(&next)?;
        let item = q.pop_front();
        if q.is_empty() {
            self.per_client.remove(&next);
        }
        self.len -= 1;
        item
    }
}

#[derive(Default)]
struct Queue {
    /// By [`Priority`]: the first class with a job is served.
    jobs: [Fair<Job>; 3],
    /// The newest job of each document, to cancel when the next arrives.
    by_doc: HashMap<String, Arc<Control>>,
    /// The running job's priority and control (to pause it for a more
    /// urgent one).
    running: Option<(Priority, Arc<Control>)>,
    shutdown: bool,
    /// Why the engine thread stopped, when a panic stopped it.
    panicked: Option<String>,
}

/// Latencies of recent requests, for `kiln/status`.
#[derive(Default)]
struct Recent {
    ttft_ms: VecDeque<f64>,
    e2e_ms: VecDeque<f64>,
    requests: u64,
    cancelled: u64,
    last_tokens_after_cancel: Option<usize>,
    max_tokens_after_cancel: usize,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_cache_queries: u64,
    completion_cache_hits: u64,
    last_error: Option<String>,
}

const RECENT: usize = 512;

fn push_recent(q: &mut VecDeque<f64>, v: f64) {
    if q.len() == RECENT {
        q.pop_front();
    }
    q.push_back(v);
}

fn percentile(q: &VecDeque<f64>, p: f64) -> Option<f64> {
    let v: Vec<f64> = q.iter().copied().collect();
    (!v.is_empty()).then(|| kiln_runtime::measure::percentile(&v, p))
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub model: String,
    pub model_path: PathBuf,
    pub architecture: String,
    pub fim_template: FimTemplate,
    pub backend: String,
    pub n_ctx: usize,
    /// The KV cache's type (`f16`, `q8_0`, `q4_0`).
    pub kv_cache_type: &'static str,
    pub requests: u64,
    pub cancelled: u64,
    pub waiting: usize,
    /// Share of prompt tokens found in the KV cache.
    pub prefix_cache_hit_rate: Option<f64>,
    pub prefix_cache_hit_tokens: u64,
    pub prompt_tokens: u64,
    /// Share of requests answered from the cache of recent completions.
    pub completion_cache_hit_rate: Option<f64>,
    pub completion_cache_hits: u64,
    pub ttft_ms_p50: Option<f64>,
    pub ttft_ms_p99: Option<f64>,
    pub e2e_ms_p50: Option<f64>,
    pub e2e_ms_p99: Option<f64>,
    pub last_tokens_after_cancel: Option<usize>,
    pub max_tokens_after_cancel: usize,
    pub last_error: Option<String>,
    /// Resident memory of this process beyond its weights, in bytes:
    /// anonymous memory (`RssAnon`) less a model file read into memory to
    /// repack its weights; Linux only.
    pub anonymous_memory_bytes: Option<u64>,
    /// The model file read into memory to repack its weights for the
    /// backend (0 when the file is mapped).
    pub copied_weight_bytes: u64,
    /// Bytes moved to and from the serving backend's device memory since
    /// the start (0 on the built-in CPU, which works in host memory).
    pub backend_bytes_to_device: u64,
    pub backend_bytes_from_device: u64,
    /// Times the device failed and lost the state it held (the model then
    /// runs on the CPU).
    pub backend_device_losses: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    current: RwLock<Arc<Loaded>>,
    cache: moka::sync::Cache<u64, Arc<Generation>>,
    recent: Mutex<Recent>,
    metrics: Arc<Metrics>,
    target: Arc<Backend>,
    device: u32,
    backend_label: String,
    n_ctx: Option<usize>,
    kv_types: KvTypes,
    draft: Draft,
    draft_max: usize,
    /// `kiln serve --draft MODEL`: the draft model, for requests whose
    /// draft is [`Draft::Model`].
    draft_model: Option<Arc<Loaded>>,
    /// Whether the draft model shares each served model's vocabulary, by
    /// model id (checked once per model, not per request).
    draft_fits: Mutex<HashMap<String, bool>>,
    engine: kiln_registry::config::EngineConfig,
    /// CPU threads of its own for its sessions' graphs (`[models.NAME]
    /// threads`); `None`: the shared pool.
    threads: Option<usize>,
    gate: Option<Arc<Gate>>,
    /// Completions of its model decoded together at most (1: one at a
    /// time); set from `[engine] decode_batch`, and by the pool to what
    /// its budget holds.
    decode_batch: std::sync::atomic::AtomicUsize,
}

/// Which KV cache type a model's sessions get: `forced` (`--kv-type`),
/// else `config.toml`'s `[kv_cache]` for the model, else f16.
#[derive(Clone, Debug, Default)]
pub struct KvTypes {
    pub forced: Option<kiln_plugin_api::DType>,
    pub config: kiln_registry::config::KvCacheSection,
}

impl KvTypes {
    pub fn for_model(&self, label: &str) -> kiln_plugin_api::DType {
        self.forced.unwrap_or_else(|| {
            let name = self.config.for_model(label).name();
            KvCache::parse_type(name).expect("config.toml's names are kiln's")
        })
    }
}

/// The handle front ends hold; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

pub struct EngineOptions {
    pub target: Arc<Backend>,
    pub device: u32,
    /// How the backend is named in status and metrics.
    pub backend_label: String,
    /// KV cache size; default the model's training context, at most 4096.
    pub n_ctx: Option<usize>,
    /// The KV cache's type per model.
    pub kv_types: KvTypes,
    /// Entries in the cache of recent completions.
    pub completion_cache_entries: u64,
    /// Where the engine counts (shared with the rest of the service).
    pub metrics: Arc<Metrics>,
    /// Whether `kiln:model_info` names this engine's model (the served
    /// model's engine; not a pool's others).
    pub announce: bool,
    /// Shared by a pool's engines when their models do not run at once
    /// ([`Gate`]).
    pub gate: Option<Arc<Gate>>,
    /// Speculative decoding for requests that do not choose (the HTTP API).
    pub draft: Draft,
    /// Tokens `draft` guesses at most per verifying batch.
    pub draft_max: usize,
    /// The draft model of [`Draft::Model`] requests (the same vocabulary
    /// as the served model; checked by whoever loads it).
    pub draft_model: Option<Loaded>,
    /// `[engine]`: the attention block and prompt batch of its sessions.
    pub engine: kiln_registry::config::EngineConfig,
    /// `[models.NAME] threads`: CPU threads of its own for its graphs.
    pub threads: Option<usize>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Starts the engine thread serving `loaded`.
    pub fn start(loaded: Loaded, opts: EngineOptions) -> Engine {
        // Sessions decode together on the built-in CPU only.
        let decode_batch = if opts.target.is_builtin() {
            opts.engine.decode_batch()
        } else {
            1
        };
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            wake: Condvar::new(),
            current: RwLock::new(Arc::new(loaded)),
            cache: {
                let evictions = opts.metrics.completion_cache_evictions.clone();
                moka::sync::Cache::builder()
                    .max_capacity(opts.completion_cache_entries)
                    .time_to_live(Duration::from_secs(600))
                    .eviction_listener(move |_, _, cause| {
                        // Pushed out for room or by age; not replaced or
                        // cleared for a new model.
                        if cause.was_evicted() {
                            evictions.inc();
                        }
                    })
                    .build()
            },
            recent: Mutex::default(),
            metrics: opts.metrics,
            target: opts.target,
            device: opts.device,
            backend_label: opts.backend_label,
            n_ctx: opts.n_ctx,
            kv_types: opts.kv_types,
            engine: opts.engine,
            threads: opts.threads,
            draft: opts.draft,
            draft_max: opts.draft_max,
            draft_model: opts.draft_model.map(Arc::new),
            draft_fits: Mutex::default(),
            gate: opts.gate,
            decode_batch: std::sync::atomic::AtomicUsize::new(decode_batch),
        });
        let engine = Engine { shared };
        if opts.announce {
            engine.announce();
        }
        let worker = engine.shared.clone();
        std::thread::Builder::new()
            .name("kiln-engine".into())
            .spawn(move || worker_loop(&worker))
            .expect("spawn the engine thread");
        engine
    }

    /// Says in the metrics which model is served.
    fn announce(&self) {
        let l = self.loaded();
        self.shared.metrics.set_model(
            &[
                ("model", &l.id),
                ("architecture", l.model.config.arch.name()),
                ("backend", &self.shared.backend_label),
                ("fim", l.fim.name()),
            ],
            self.n_ctx(),
            l.model.file.bytes().len() as u64,
        );
    }

    /// `kiln serve --draft`: speculative decoding for HTTP requests.
    pub fn draft(&self) -> Draft {
        self.shared.draft
    }

    /// `kiln serve --draft MODEL`'s model, if any.
    pub fn draft_model(&self) -> Option<&str> {
        self.shared.draft_model.as_deref().map(|l| l.id.as_str())
    }

    /// `kiln serve --draft-max`: tokens `draft` guesses at most per batch.
    pub fn draft_max(&self) -> usize {
        self.shared.draft_max
    }

    /// The model being served now.
    pub fn loaded(&self) -> Arc<Loaded> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Serves `loaded` from now on; running jobs finish on the old model.
    pub fn replace_model(&self, loaded: Loaded) {
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        self.shared.cache.invalidate_all();
        self.announce();
    }

    /// Jobs queued and running now (0: the engine is idle).
    /// Completions decoded together at most.
    pub fn decode_batch(&self) -> usize {
        self.shared
            .decode_batch
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decodes at most `n` completions together (at least one; on a
    /// device, one).
    pub fn set_decode_batch(&self, n: usize) {
        let n = if self.shared.target.is_builtin() {
            n.max(1)
        } else {
            1
        };
        self.shared
            .decode_batch
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn busy(&self) -> usize {
        let q = lock(&self.shared.queue);
        q.jobs.iter().map(|f| f.len).sum::<usize>() + usize::from(q.running.is_some())
    }

    /// The backend the engine runs on.
    pub fn target(&self) -> &Arc<Backend> {
        &self.shared.target
    }

    /// The device of [`Engine::target`] the engine runs on.
    pub fn device(&self) -> u32 {
        self.shared.device
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    pub fn n_ctx(&self) -> usize {
        kiln_runtime::model::session::default_n_ctx(&self.loaded().model.config, self.shared.n_ctx)
    }

    /// Queues `request` for `client`; the engine thread feeds `sink`. A
    /// job for `doc` cancels that document's previous job. The job may be
    /// cancelled through the returned control.
    pub fn submit(
        &self,
        client: u64,
        doc: Option<String>,
        loaded: Arc<Loaded>,
        request: Request,
        sink: Box<dyn Sink>,
    ) -> Arc<Control> {
        self.submit_after(client, doc, loaded, request, sink, None)
    }

    /// [`Engine::submit`], the job started no sooner than `not_before`
    /// (debounce: the engine holds it until then, and a newer job for the
    /// same document cancels it unstarted).
    pub fn submit_after(
        &self,
        client: u64,
        doc: Option<String>,
        loaded: Arc<Loaded>,
        request: Request,
        sink: Box<dyn Sink>,
        not_before: Option<Instant>,
    ) -> Arc<Control> {
        let control = Arc::new(Control::default());
        self.submit_job(Submit {
            client,
            doc,
            loaded,
            request,
            sink,
            not_before,
            control: control.clone(),
            priority: Priority::default(),
        });
        control
    }

    /// Queues a job as [`Submit`] says. After [`Engine::shutdown`] the
    /// job is refused: its sink gets an error at once.
    pub fn submit_job(&self, job: Submit) {
        let Submit {
            client,
            doc,
            loaded,
            mut request,
            sink,
            not_before,
            control,
            priority,
        } = job;
        request.control = Some(control.clone());
        let mut q = lock(&self.shared.queue);
        if q.shutdown {
            let why = match &q.panicked {
                Some(p) => format!("{}'s engine stopped: {p}", loaded.id),
                None => format!("{UNLOADED}: {}", loaded.id),
            };
            drop(q);
            sink.done(Err(why));
            return;
        }
        if let Some(d) = &doc
            && let Some(old) = q.by_doc.insert(d.clone(), control.clone())
        {
            old.cancel();
        }
        let job = Job {
            priority,
            client,
            doc,
            loaded,
            control,
            enqueued: Instant::now(),
            not_before,
            work: Work::Complete {
                request,
                sink,
                resume: None,
            },
        };
        self.enqueue(client, job, q);
    }

    /// Queues an explanation of a completion for `client`, computed with
    /// the served model on the engine thread between completions; the
    /// receiver gets it.
    pub fn explain(
        &self,
        client: u64,
        ask: Ask,
    ) -> std::sync::mpsc::Receiver<Result<Explanation, String>> {
        let (reply, rx) = std::sync::mpsc::channel();
        let job = Job {
            priority: Priority::Chat,
            client,
            doc: None,
            loaded: self.loaded(),
            control: Arc::new(Control::default()),
            enqueued: Instant::now(),
            not_before: None,
            work: Work::Explain { ask, reply },
        };
        self.enqueue(client, job, lock(&self.shared.queue));
        rx
    }

    /// Puts `job` in `client`'s queue (held) and wakes the engine.
    fn enqueue(&self, client: u64, job: Job, mut q: std::sync::MutexGuard<'_, Queue>) {
        // A less urgent job running pauses at its next token (a chat for
        // an inline completion) and goes on after.
        if let Some((running, control)) = &q.running
            && job.priority < *running
        {
            control.request_pause();
        }
        let urgent = job.priority == Priority::Inline;
        q.jobs[job.priority as usize].push(client, job);
        self.shared.metrics.waiting.inc();
        drop(q);
        if urgent && let Some(g) = &self.shared.gate {
            g.urgent_in();
        }
        self.shared.wake.notify_one();
    }

    /// [`Engine::submit`] for an async caller: the job's events arrive on
    /// the returned [`Events`], and dropping them cancels the job.
    pub fn submit_events(
        &self,
        client: u64,
        doc: Option<String>,
        loaded: Arc<Loaded>,
        request: Request,
    ) -> Events {
        let (tx, rx) = unbounded_channel();
        let control = self.submit(client, doc, loaded, request, Box::new(ChannelSink(tx)));
        Events { rx, control }
    }

    pub fn status(&self) -> Status {
        let loaded = self.loaded();
        let r = lock(&self.shared.recent);
        let waiting = lock(&self.shared.queue).jobs.iter().map(|f| f.len).sum();
        let rate = |hit: u64, all: u64| (all > 0).then(|| hit as f64 / all as f64);
        let stats = &self.shared.target.stats;
        use std::sync::atomic::Ordering::Relaxed;
        Status {
            model: loaded.id.clone(),
            model_path: loaded.path.clone(),
            architecture: loaded.model.config.arch.name().to_string(),
            fim_template: loaded.fim,
            backend: self.shared.backend_label.clone(),
            n_ctx: self.n_ctx(),
            kv_cache_type: KvCache::type_name(self.shared.kv_types.for_model(&loaded.id)),
            requests: r.requests,
            cancelled: r.cancelled,
            waiting,
            prefix_cache_hit_rate: rate(r.cached_tokens, r.prompt_tokens),
            prefix_cache_hit_tokens: r.cached_tokens,
            prompt_tokens: r.prompt_tokens,
            completion_cache_hit_rate: rate(r.completion_cache_hits, r.completion_cache_queries),
            completion_cache_hits: r.completion_cache_hits,
            ttft_ms_p50: percentile(&r.ttft_ms, 50.0),
            ttft_ms_p99: percentile(&r.ttft_ms, 99.0),
            e2e_ms_p50: percentile(&r.e2e_ms, 50.0),
            e2e_ms_p99: percentile(&r.e2e_ms, 99.0),
            last_tokens_after_cancel: r.last_tokens_after_cancel,
            max_tokens_after_cancel: r.max_tokens_after_cancel,
            last_error: r.last_error.clone(),
            anonymous_memory_bytes: kiln_runtime::measure::process_memory(None, "RssAnon")
                .map(|a| a.saturating_sub(loaded.model.file.copied_bytes())),
            copied_weight_bytes: loaded.model.file.copied_bytes(),
            backend_bytes_to_device: stats.bytes_to_device.load(Relaxed),
            backend_bytes_from_device: stats.bytes_from_device.load(Relaxed),
            backend_device_losses: stats.device_losses.load(Relaxed),
        }
    }

    /// Whether the engine takes no more jobs (shut down, or its thread
    /// stopped by a panic).
    pub fn is_stopped(&self) -> bool {
        lock(&self.shared.queue).shutdown
    }

    /// Stops the engine thread once the queue is empty.
    pub fn shutdown(&self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
    }
}

fn cache_key(loaded: &Loaded, r: &Request) -> u64 {
    let mut h = DefaultHasher::new();
    loaded.path.hash(&mut h);
    r.prompt.hash(&mut h);
    r.max_tokens.hash(&mut h);
    r.stop.hash(&mut h);
    format!("{:?}{:?}", r.boundary, r.sampling).hash(&mut h);
    h.finish()
}

/// Runs the engine thread's loop. A panic in it (a bug: in kiln, or a
/// front end's sink) stops the engine, not the process: the jobs it ran
/// (a batch's, all of them) lose their sinks unanswered (a pool's route
/// takes that as the model's failure), the queued jobs are answered with
/// the panic, and later ones are refused with it.
fn worker_loop(shared: &Shared) {
    let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_jobs(shared)))
    else {
        return;
    };
    let why = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into());
    let why = format!("it panicked ({why})");
    eprintln!(
        "kiln: the engine of {} stopped: {why}",
        shared_model(shared)
    );
    let mut q = lock(&shared.queue);
    q.shutdown = true;
    q.panicked = Some(why.clone());
    q.running = None;
    let jobs: Vec<Job> = q
        .jobs
        .iter_mut()
        .flat_map(|f| std::iter::from_fn(|| f.pop()))
        .collect();
    drop(q);
    shared.metrics.running.set(0);
    for job in jobs {
        shared.metrics.waiting.dec();
        let error = format!("{}'s engine stopped: {why}", job.loaded.id);
        match job.work {
            Work::Complete { sink, .. } => sink.done(Err(error)),
            Work::Explain { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

fn shared_model(shared: &Shared) -> String {
    shared
        .current
        .read()
        .map_or_else(|p| p.into_inner().id.clone(), |l| l.id.clone())
}

fn serve_jobs(shared: &Shared) {
    let mut session: Option<(Arc<Loaded>, Session)> = None;
    // The draft model's session (made on the first request that drafts).
    let mut drafter: Option<Session> = None;
    // The sessions of the requests decoded together with the first
    // (made as batches need them; none of them keeps a prefix tree).
    let mut extra: Vec<Session> = Vec::new();
    let mut seen_stats = [0u64; 8];
    loop {
        let mut job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(job) = q.jobs.iter_mut().find_map(Fair::pop) {
                    shared.metrics.waiting.dec();
                    q.running = Some((job.priority, job.control.clone()));
                    break job;
                }
                if q.shutdown {
                    return;
                }
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        if job.priority > Priority::Inline
            && let Some(g) = &shared.gate
            && !g.enter(&job.control)
        {
            // Another model's inline completion goes first: wait for it,
            // unless one comes for this model (then the job waits in its
            // queue again).
            let mut back = Some(job);
            let waited = Instant::now();
            loop {
                let j = back.as_ref().expect("held until given back");
                // Not for ever: an inline job stuck on a hung model must
                // not hold every other model's work.
                let patient = waited.elapsed() < GATE_PATIENCE;
                if j.control.is_cancelled() || g.enter(&j.control) || !patient {
                    break;
                }
                let mut q = lock(&shared.queue);
                if q.jobs[Priority::Inline as usize].len > 0 || q.shutdown {
                    let j = back.take().expect("held");
                    q.running = None;
                    shared.metrics.waiting.inc();
                    q.jobs[j.priority as usize].push_front(j.client, j);
                    break;
                }
                drop(q);
                g.wait(Duration::from_millis(50));
            }
            let Some(j) = back else { continue };
            job = j;
        }
        if let Some(t) = job.not_before {
            // Debounce: held until its time, unless a newer job for its
            // document cancels it first (the submit wakes this thread).
            let mut q = lock(&shared.queue);
            while !job.control.is_cancelled() && !q.shutdown {
                let now = Instant::now();
                if now >= t {
                    break;
                }
                q = (shared.wake.wait_timeout(q, t - now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        if let Some((mates, batch)) = take_mates(shared, &job) {
            let jobs = std::iter::once(job).chain(mates).collect();
            run_batch(shared, (&mut session, &mut extra), jobs, &batch);
            record_backend_stats(shared, &mut seen_stats);
            continue;
        }
        shared.metrics.running.inc();
        let job_priority = job.priority;
        let doc = job.doc.clone();
        let control = job.control.clone();
        let mut back = None;
        match job.work {
            Work::Complete {
                request,
                sink,
                resume,
            } => {
                let ran = Ran {
                    loaded: job.loaded,
                    request,
                    sink,
                    resume,
                    enqueued: job.enqueued,
                };
                if let Some(paused) = run_job(shared, (&mut session, &mut drafter), ran, &control) {
                    back = Some(Job {
                        priority: job.priority,
                        client: job.client,
                        doc: job.doc,
                        loaded: paused.loaded,
                        control: control.clone(),
                        enqueued: paused.enqueued,
                        not_before: None,
                        work: Work::Complete {
                            request: paused.request,
                            sink: paused.sink,
                            resume: paused.resume,
                        },
                    });
                }
            }
            Work::Explain { mut ask, reply } => {
                let loaded = job.loaded;
                // The attention map is always recorded (one more pass over
                // the completion) for the dashboard, and answered where
                // asked.
                let asked = std::mem::replace(&mut ask.attention, true);
                let result = session_for(shared, &mut session, &loaded).and_then(|s| {
                    kiln_runtime::model::explain::explain(s, &loaded.tok, &ask)
                        .map_err(|e| e.to_string())
                });
                let result = result.map(|mut e| {
                    publish_explanation(shared, &loaded.id, &ask.prompt, &e);
                    if !asked {
                        e.attention = None;
                    }
                    e
                });
                // The cache holds the last prompt scored; the next
                // completion reuses what it shares with it.
                let _ = reply.send(result);
            }
        }
        settle(shared, job_priority, doc, &control, back);
        record_backend_stats(shared, &mut seen_stats);
    }
}

/// After a job ran: the engine is free again, and the job is queued again
/// first in its client's queue when it was paused (`back`), or forgotten
/// as its document's newest.
fn settle(
    shared: &Shared,
    priority: Priority,
    doc: Option<String>,
    control: &Arc<Control>,
    back: Option<Job>,
) {
    settle_one(shared, priority, doc, control, back);
    lock(&shared.queue).running = None;
}

/// [`settle`] for one job of a batch: the batch still runs.
fn settle_one(
    shared: &Shared,
    priority: Priority,
    doc: Option<String>,
    control: &Arc<Control>,
    back: Option<Job>,
) {
    shared.metrics.running.dec();
    if priority == Priority::Inline
        && let Some(g) = &shared.gate
    {
        g.urgent_out();
    }
    let mut q = lock(&shared.queue);
    if let Some(job) = back {
        // Paused for a more urgent job: first in its client's queue.
        shared.metrics.paused.inc();
        shared.metrics.waiting.inc();
        q.jobs[job.priority as usize].push_front(job.client, job);
    } else if let Some(d) = doc
        && q.by_doc.get(&d).is_some_and(|c| Arc::ptr_eq(c, control))
    {
        q.by_doc.remove(&d);
    }
}

/// Whether `job` may be decoded together with others: a completion that
/// does not decode speculatively (a greedy one with a draft runs alone,
/// its guesses verified in batches of its own).
fn batchable(job: &Job) -> bool {
    match &job.work {
        Work::Complete { request, .. } => {
            request.draft == Draft::None || request.sampling.temperature > 0.0
        }
        Work::Explain { .. } => false,
    }
}

/// Where `job` runs in a batch (the engine decodes several together, and
/// it may be one of them): the completions queued behind it to start
/// with it (of the same model and priority, due, past any debounce, not
/// cancelled, up to the engine's `decode_batch` in all, taken from the
/// clients in turn), and the batch's control, now the running one (a
/// more urgent job pauses the whole batch). `None`: it runs alone.
fn take_mates(shared: &Shared, job: &Job) -> Option<(Vec<Job>, Arc<Control>)> {
    let want = shared
        .decode_batch
        .load(std::sync::atomic::Ordering::Relaxed);
    if want < 2 || !batchable(job) {
        return None;
    }
    let batch = Arc::new(Control::default());
    let now = Instant::now();
    let mut q = lock(&shared.queue);
    let mates = q.jobs[job.priority as usize].take_where(want - 1, |j| {
        Arc::ptr_eq(&j.loaded, &job.loaded)
            && batchable(j)
            && j.not_before.is_none_or(|t| t <= now)
            && !j.control.is_cancelled()
    });
    shared.metrics.waiting.dec_by(mates.len() as i64);
    q.running = Some((job.priority, batch.clone()));
    Some((mates, batch))
}

/// A completion job's parts while it runs in a batch.
struct Member {
    priority: Priority,
    client: u64,
    doc: Option<String>,
    loaded: Arc<Loaded>,
    control: Arc<Control>,
    enqueued: Instant,
    queue_s: f64,
    request: Request,
    sink: Box<dyn Sink>,
    /// Counted in `kiln:batched_requests_total` (it has been decoded
    /// together with another).
    batched: bool,
}

/// Runs `jobs` (completions of one model, the first taken from the queue,
/// the others its mates) together, each on a session of its own (the
/// first on the engine's session, with its prefix tree; the others on
/// `extra`, up to the engine's `decode_batch` in all), one forward pass a
/// token for all of them; jobs of the same kind queued meanwhile join as
/// sessions free up, and each job is answered as it ends. A pause asked
/// of `batch` (or of a job in it) pauses every job under way, to queue
/// again.
fn run_batch(
    shared: &Shared,
    (session, extra): (&mut Option<(Arc<Loaded>, Session)>, &mut Vec<Session>),
    jobs: Vec<Job>,
    batch: &Arc<Control>,
) {
    let loaded = jobs[0].loaded.clone();
    let priority = jobs[0].priority;
    if priority > Priority::Inline
        && let Some(g) = &shared.gate
        && !g.enter(batch)
    {
        // Another model's inline completion came meanwhile.
        batch.request_pause();
    }
    let mut host = EngineBatch {
        shared,
        loaded: loaded.clone(),
        n_ctx: Err(String::new()),
        priority,
        batch: batch.clone(),
        members: HashMap::new(),
        next_tag: 0,
        counted: false,
    };
    // Sessions: the engine's, and one more per request decoded together
    // (as many as can be made).
    host.n_ctx = session_for(shared, session, &loaded).map(|s| s.n_ctx());
    let want = shared
        .decode_batch
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(jobs.len());
    if host.n_ctx.is_ok() {
        if extra
            .first()
            .is_some_and(|s| !Arc::ptr_eq(&s.model, &loaded.model))
        {
            extra.clear();
        }
        while extra.len() + 1 < want {
            match new_session(shared, &loaded, shared.n_ctx) {
                Ok(mut s) => {
                    s.set_prefix_budget(0);
                    extra.push(s);
                }
                Err(e) => {
                    eprintln!(
                        "kiln: {}: no session for another request decoded together ({e}); the rest wait their turn",
                        loaded.id
                    );
                    break;
                }
            }
        }
    }
    let mut jobs = jobs;
    if host.n_ctx.is_ok() && jobs.len() > 1 + extra.len() {
        // No session for these: first in their queues again.
        let rest = jobs.split_off(1 + extra.len());
        let mut q = lock(&shared.queue);
        for job in rest.into_iter().rev() {
            shared.metrics.waiting.inc();
            q.jobs[job.priority as usize].push_front(job.client, job);
        }
    }
    let mut first = Vec::with_capacity(jobs.len());
    for job in jobs {
        if let Some(j) = host.enter(job, first.len()) {
            first.push(j);
        }
    }
    if host.n_ctx.is_ok() && !first.is_empty() {
        let main = &mut session.as_mut().expect("made above").1;
        let mut sessions: Vec<&mut Session> =
            std::iter::once(main).chain(extra.iter_mut()).collect();
        kiln_runtime::model::generate::generate_batch(
            &mut sessions,
            &loaded.tok,
            first,
            Some(batch),
            &mut host,
        );
        // Every session's cache, not only the last one to finish.
        let main = &session.as_ref().expect("made above").1;
        let kv: usize = std::iter::once(main)
            .chain(extra.iter())
            .map(Session::kv_bytes)
            .sum();
        shared.metrics.kv_cache_bytes.set(kv as i64);
    }
    lock(&shared.queue).running = None;
}

/// The engine as a batch's host ([`BatchHost`]): the jobs under way by
/// tag, and the queue that jobs join the batch from.
struct EngineBatch<'a> {
    shared: &'a Shared,
    loaded: Arc<Loaded>,
    /// The sessions' context, or why there is no session.
    n_ctx: Result<usize, String>,
    priority: Priority,
    batch: Arc<Control>,
    members: HashMap<u64, Member>,
    next_tag: u64,
    /// Counted in `kiln:decode_batches_total` (two requests or more ran
    /// together in it).
    counted: bool,
}

impl EngineBatch<'_> {
    /// Once two requests or more are under way: the batch and each of its
    /// requests counted, once each.
    fn count_batched(&mut self) {
        if self.members.len() < 2 {
            return;
        }
        let m = &self.shared.metrics;
        if !std::mem::replace(&mut self.counted, true) {
            m.decode_batches.inc();
        }
        for mb in self.members.values_mut() {
            if !std::mem::replace(&mut mb.batched, true) {
                m.batched_requests.inc();
            }
        }
    }

    /// `job` joining the batch on session `session`; or answered at once
    /// (cancelled while it waited, from the completion cache, its prompt
    /// longer than the context, no session), and then `None`.
    fn enter(&mut self, job: Job, session: usize) -> Option<Joining> {
        let m = &self.shared.metrics;
        m.running.inc();
        let Work::Complete {
            mut request,
            mut sink,
            resume,
        } = job.work
        else {
            unreachable!("only completions are decoded together")
        };
        let queue_s = job.enqueued.elapsed().as_secs_f64();
        if resume.is_none() {
            m.queue_time.observe(queue_s);
        }
        let early = answered_early(
            self.shared,
            &job.loaded,
            &request,
            resume.is_some(),
            &job.control,
            sink.as_mut(),
            job.enqueued,
        );
        let answer = match (early, &self.n_ctx) {
            (Some(Step::Done(f)), _) => Some(Ok(*f)),
            (Some(Step::Paused(_)), _) => unreachable!("answered before it ran"),
            (None, Err(e)) => Some(Err(e.clone())),
            (None, Ok(n_ctx)) => fit_room(&mut request, *n_ctx).err().map(Err),
        };
        if let Some(answer) = answer {
            conclude(self.shared, answer, sink);
            settle_one(self.shared, job.priority, job.doc, &job.control, None);
            return None;
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        let joining = Joining {
            tag,
            session,
            request: request.clone(),
            resume: resume.map(|r| *r),
        };
        self.members.insert(
            tag,
            Member {
                priority: job.priority,
                client: job.client,
                doc: job.doc,
                loaded: job.loaded,
                control: job.control,
                enqueued: job.enqueued,
                queue_s,
                request,
                sink,
                batched: false,
            },
        );
        self.count_batched();
        Some(joining)
    }
}

impl BatchHost for EngineBatch<'_> {
    fn join(&mut self, free: &[usize]) -> Vec<Joining> {
        if self.batch.pause_asked() || self.n_ctx.is_err() {
            // A more urgent job waits: nothing starts before it.
            return Vec::new();
        }
        let now = Instant::now();
        let loaded = &self.loaded;
        let jobs = {
            let mut q = lock(&self.shared.queue);
            let jobs = q.jobs[self.priority as usize].take_where(free.len(), |j| {
                Arc::ptr_eq(&j.loaded, loaded)
                    && batchable(j)
                    && j.not_before.is_none_or(|t| t <= now)
                    && !j.control.is_cancelled()
            });
            self.shared.metrics.waiting.dec_by(jobs.len() as i64);
            jobs
        };
        let mut joining = Vec::with_capacity(jobs.len());
        for job in jobs {
            if let Some(j) = self.enter(job, free[joining.len()]) {
                joining.push(j);
            }
        }
        joining
    }

    fn text(&mut self, tag: u64, text: &str) -> bool {
        let mb = self.members.get_mut(&tag).expect("a member under way");
        if !mb.sink.text(text) {
            // Nobody is listening any more (the client went away).
            mb.control.cancel();
            return false;
        }
        !mb.control.is_cancelled()
    }

    fn done(&mut self, tag: u64, result: Result<Outcome, ModelError>, session: &mut Session) {
        let mb = self.members.remove(&tag).expect("a member under way");
        let shared = self.shared;
        let answer = match result {
            Ok(Outcome::Done(g)) => {
                let timing = (mb.enqueued, mb.queue_s);
                let loaded = &self.loaded;
                match finished(shared, loaded, &mb.request, g, session, &mb.control, timing) {
                    Step::Done(f) => Ok(*f),
                    Step::Paused(_) => unreachable!("a finished generation"),
                }
            }
            Ok(Outcome::Paused(p)) => {
                let (priority, doc, control) = (mb.priority, mb.doc.clone(), mb.control.clone());
                let back = Job {
                    priority: mb.priority,
                    client: mb.client,
                    doc: mb.doc,
                    loaded: mb.loaded,
                    control: mb.control,
                    enqueued: mb.enqueued,
                    not_before: None,
                    work: Work::Complete {
                        request: mb.request,
                        sink: mb.sink,
                        resume: Some(Box::new(p)),
                    },
                };
                settle_one(shared, priority, doc, &control, Some(back));
                return;
            }
            Err(e) => {
                // Its cache may hold a half-written step: start clean.
                session.truncate(0);
                Err(e.to_string())
            }
        };
        conclude(shared, answer, mb.sink);
        settle_one(shared, mb.priority, mb.doc, &mb.control, None);
    }
}

fn record_backend_stats(shared: &Shared, seen: &mut [u64; 8]) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &shared.target.stats;
    let worker = shared.target.handle().worker();
    let now = [
        s.ops_run.load(Relaxed),
        s.ops_unsupported_fallback.load(Relaxed),
        s.runtime_failures_rerun.load(Relaxed),
        s.bytes_to_device.load(Relaxed),
        s.bytes_from_device.load(Relaxed),
        s.device_losses.load(Relaxed),
        worker.map_or(0, |w| w.crashes.load(Relaxed)),
        worker.map_or(0, |w| w.restarts.load(Relaxed)),
    ];
    let name = shared.target.name();
    let m = &shared.metrics;
    if let Some(w) = worker {
        let plugin = labels(&[("plugin", &name)]);
        m.plugin_crashes
            .get_or_create(&plugin)
            .inc_by(now[6].saturating_sub(seen[6]));
        m.plugin_restarts
            .get_or_create(&plugin)
            .inc_by(now[7].saturating_sub(seen[7]));
        m.plugin_quarantined
            .get_or_create(&plugin)
            .set(i64::from(w.is_quarantined()));
    }
    m.backend_ops
        .get_or_create(&labels(&[("backend", &name)]))
        .inc_by(now[0].saturating_sub(seen[0]));
    m.fallbacks
        .get_or_create(&labels(&[("backend", &name), ("reason", "unsupported_op")]))
        .inc_by(now[1].saturating_sub(seen[1]));
    m.fallbacks
        .get_or_create(&labels(&[
            ("backend", &name),
            ("reason", "runtime_failure"),
        ]))
        .inc_by(now[2].saturating_sub(seen[2]));
    m.fallbacks
        .get_or_create(&labels(&[("backend", &name), ("reason", "device_lost")]))
        .inc_by(now[5].saturating_sub(seen[5]));
    for (direction, i) in [("to_device", 3), ("from_device", 4)] {
        m.transfer_bytes
            .get_or_create(&labels(&[("backend", &name), ("direction", direction)]))
            .inc_by(now[i].saturating_sub(seen[i]));
    }
    *seen = now;
}

/// A completion job taken from the queue: its model, request and sink,
/// where it stood if it was paused, and when it was queued first.
struct Ran {
    loaded: Arc<Loaded>,
    request: Request,
    sink: Box<dyn Sink>,
    resume: Option<Box<Paused>>,
    enqueued: Instant,
}

/// Runs a completion job to its end (its sink gets the result), or until a
/// more urgent job pauses it: then it is given back, to queue again.
fn run_job(
    shared: &Shared,
    session: (&mut Option<(Arc<Loaded>, Session)>, &mut Option<Session>),
    ran: Ran,
    control: &Control,
) -> Option<Ran> {
    let Ran {
        loaded,
        request,
        mut sink,
        resume,
        enqueued,
    } = ran;
    let first_run = resume.is_none();
    let queue_s = enqueued.elapsed().as_secs_f64();
    if first_run {
        shared.metrics.queue_time.observe(queue_s);
    }
    let result = match execute(
        shared,
        session,
        &loaded,
        (&request, resume),
        control,
        sink.as_mut(),
        enqueued,
    ) {
        Ok(Step::Paused(resume)) => {
            return Some(Ran {
                loaded,
                request,
                sink,
                resume: Some(resume),
                enqueued,
            });
        }
        Ok(Step::Done(f)) => Ok(*f),
        Err(e) => Err(e),
    };
    conclude(shared, result, sink);
    None
}

/// A job's answer: counted by how it finished, in the recent figures,
/// and given to its sink.
fn conclude(shared: &Shared, result: Result<Finished, String>, sink: Box<dyn Sink>) {
    let m = &shared.metrics;
    let reason = match &result {
        Ok(f) => serde_json::to_value(f.generation.stop_reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        Err(_) => "error".to_string(),
    };
    m.requests
        .get_or_create(&labels(&[("finished_reason", &reason)]))
        .inc();
    let mut r = lock(&shared.recent);
    r.requests += 1;
    match &result {
        Ok(f) => {
            if f.generation.stop_reason == StopReason::Cancelled {
                r.cancelled += 1;
                r.last_tokens_after_cancel = Some(f.tokens_after_cancel);
                r.max_tokens_after_cancel = r.max_tokens_after_cancel.max(f.tokens_after_cancel);
            } else {
                push_recent(&mut r.ttft_ms, f.time_to_first_token_ms);
                push_recent(&mut r.e2e_ms, f.total_ms);
            }
        }
        Err(e) => r.last_error = Some(e.clone()),
    }
    drop(r);
    sink.done(result);
}

/// Runs one job: from the completion cache, or on the session (made anew
/// when the model changed), feeding `sink` as text becomes final.
fn execute(
    shared: &Shared,
    (session, drafter): (&mut Option<(Arc<Loaded>, Session)>, &mut Option<Session>),
    loaded: &Arc<Loaded>,
    (request, resume): (&Request, Option<Box<Paused>>),
    control: &Control,
    sink: &mut dyn Sink,
    enqueued: Instant,
) -> Result<Step, String> {
    let queue_s = enqueued.elapsed().as_secs_f64();
    let mut request = request.clone();
    if let Some(done) = answered_early(
        shared,
        loaded,
        &request,
        resume.is_some(),
        control,
        sink,
        enqueued,
    ) {
        return Ok(done);
    }
    let sess = session_for(shared, session, loaded)?;
    fit_room(&mut request, sess.n_ctx())?;
    let draft = match (request.draft, &shared.draft_model) {
        (Draft::Model, Some(d))
            if *lock(&shared.draft_fits)
                .entry(loaded.id.clone())
                .or_insert_with(|| same_vocabulary(&loaded.tok, &d.tok).is_ok()) =>
        {
            if drafter.is_none() {
                let s = new_session(shared, d, Some(sess.n_ctx()))
                    .map_err(|e| format!("the draft model {}: {e}", d.id))?;
                *drafter = Some(s);
            }
            drafter.as_mut()
        }
        (Draft::Model, _) => {
            // No draft model, or one of another vocabulary than this
            // model's (an A/B arm's): guesses from the text instead.
            request.draft = Draft::Ngram;
            None
        }
        _ => None,
    };
    let result = generate_resumable(
        sess,
        draft,
        &loaded.tok,
        &request,
        resume.map(|r| *r),
        true,
        |text| {
            if !sink.text(text) {
                // Nobody is listening any more (the client went away).
                control.cancel();
                return false;
            }
            !control.is_cancelled()
        },
    );
    let g = match result {
        Ok(Outcome::Done(g)) => g,
        Ok(Outcome::Paused(p)) => return Ok(Step::Paused(Box::new(p))),
        Err(e) => {
            // The caches may hold a half-written batch: start clean.
            sess.truncate(0);
            if let Some(d) = drafter {
                d.truncate(0);
            }
            return Err(e.to_string());
        }
    };
    Ok(finished(
        shared,
        loaded,
        &request,
        g,
        sess,
        control,
        (enqueued, queue_s),
    ))
}

/// A job answered before it runs: cancelled while it waited, or from the
/// cache of recent completions (not a resumed one).
fn answered_early(
    shared: &Shared,
    loaded: &Loaded,
    request: &Request,
    resumed: bool,
    control: &Control,
    sink: &mut dyn Sink,
    enqueued: Instant,
) -> Option<Step> {
    let m = &shared.metrics;
    let queue_s = enqueued.elapsed().as_secs_f64();
    if control.is_cancelled() || sink.is_closed() {
        return Some(Step::Done(Box::new(Finished {
            generation: Generation {
                token_ids: Vec::new(),
                text: String::new(),
                stop_reason: StopReason::Cancelled,
                timings: Default::default(),
            },
            completion_cache_hit: false,
            queue_ms: queue_s * 1e3,
            time_to_first_token_ms: 0.0,
            total_ms: queue_s * 1e3,
            tokens_after_cancel: 0,
            route: None,
        })));
    }
    if resumed {
        return None;
    }
    let key = cache_key(loaded, request);
    m.completion_cache_queries.inc();
    lock(&shared.recent).completion_cache_queries += 1;
    let hit = shared.cache.get(&key)?;
    m.completion_cache_hits.inc();
    lock(&shared.recent).completion_cache_hits += 1;
    if !hit.text.is_empty() {
        sink.text(&hit.text);
    }
    let ms = enqueued.elapsed().as_secs_f64() * 1e3;
    m.ttft.observe(ms / 1e3);
    m.e2e.observe(ms / 1e3);
    Some(Step::Done(Box::new(Finished {
        generation: (*hit).clone(),
        completion_cache_hit: true,
        queue_ms: queue_s * 1e3,
        time_to_first_token_ms: ms,
        total_ms: ms,
        tokens_after_cancel: 0,
        route: None,
    })))
}

/// Bounds `request`'s tokens by the room its prompt leaves in a context
/// of `n_ctx`; a prompt that fills it is an error.
fn fit_room(request: &mut Request, n_ctx: usize) -> Result<(), String> {
    let room = n_ctx.saturating_sub(request.prompt.len());
    if room == 0 {
        return Err(format!(
            "the prompt has {} tokens but the context holds {}; shorten it or raise --ctx",
            request.prompt.len(),
            n_ctx
        ));
    }
    request.max_tokens = request.max_tokens.min(room);
    Ok(())
}

/// A generation's end: counted in the metrics and recent figures, kept in
/// the completion cache (unless cancelled), as the job's [`Finished`]
/// (queued at `enqueued`, `queue_s` seconds before this run began).
fn finished(
    shared: &Shared,
    loaded: &Loaded,
    request: &Request,
    g: Generation,
    sess: &Session,
    control: &Control,
    (enqueued, queue_s): (Instant, f64),
) -> Step {
    let m = &shared.metrics;
    let total_s = enqueued.elapsed().as_secs_f64();
    let t = &g.timings;
    let ttft_s = queue_s + t.time_to_first_token_ms / 1e3;
    let n_prompt = (t.prompt_tokens + t.cached_tokens) as u64;
    m.prompt_tokens.inc_by(n_prompt);
    m.generation_tokens.inc_by(g.token_ids.len() as u64);
    m.draft_tokens.inc_by(t.draft_tokens as u64);
    m.draft_accepted.inc_by(t.draft_accepted as u64);
    m.prefix_cache_queries.inc_by(n_prompt);
    m.prefix_cache_hits.inc_by(t.cached_tokens as u64);
    m.prefix_tree_restored.inc_by(t.restored_tokens as u64);
    m.kv_cache_bytes.set(sess.kv_bytes() as i64);
    m.prefix_tree_bytes.set(sess.prefix_bytes() as i64);
    m.backend_seconds
        .get_or_create(&labels(&[("backend", &shared.target.name())]))
        .inc_by(total_s - queue_s);
    if g.stop_reason != StopReason::Cancelled {
        m.ttft.observe(ttft_s);
        m.e2e.observe(total_s);
        if t.decode_tokens > 1 && t.decode_tokens_per_s > 0.0 {
            let itl = 1.0 / t.decode_tokens_per_s;
            for _ in 1..t.decode_tokens {
                m.inter_token.observe(itl);
            }
        }
        shared
            .cache
            .insert(cache_key(loaded, request), Arc::new(g.clone()));
    }
    {
        let mut r = lock(&shared.recent);
        r.prompt_tokens += n_prompt;
        r.cached_tokens += t.cached_tokens as u64;
    }
    Step::Done(Box::new(Finished {
        tokens_after_cancel: control.generated_after_cancel(),
        route: None,
        completion_cache_hit: false,
        queue_ms: queue_s * 1e3,
        time_to_first_token_ms: ttft_s * 1e3,
        total_ms: total_s * 1e3,
        generation: g,
    }))
}

/// How a run of a job ended.
enum Step {
    Done(Box<Finished>),
    /// A more urgent job paused it.
    Paused(Box<Paused>),
}

/// Keeps `e` as the dashboard's last explanation: the prompt with its
/// parts by importance, the counterfactual and the attention map.
fn publish_explanation(shared: &Shared, model: &str, prompt: &str, e: &Explanation) {
    let mut last = lock(&shared.metrics.last_explanation);
    let seq = last.0 + 1;
    *last = (
        seq,
        Some(serde_json::json!({
            "seq": seq,
            "model": model,
            "at_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            "prompt": prompt,
            "explanation": e,
        })),
    );
}

/// The session for `loaded`: the current one, or a new one when the model
/// changed.
fn session_for<'a>(
    shared: &Shared,
    session: &'a mut Option<(Arc<Loaded>, Session)>,
    loaded: &Arc<Loaded>,
) -> Result<&'a mut Session, String> {
    if session
        .as_ref()
        .is_none_or(|(l, _)| !Arc::ptr_eq(l, loaded))
    {
        *session = None;
        *session = Some((loaded.clone(), new_session(shared, loaded, shared.n_ctx)?));
    }
    Ok(&mut session.as_mut().expect("made above").1)
}

/// A session of `loaded` on the engine's backend and device, with the KV
/// cache type kiln gives it and `[engine]`'s knobs (the served model's,
/// and the draft model's).
fn new_session(shared: &Shared, loaded: &Loaded, n_ctx: Option<usize>) -> Result<Session, String> {
    let mut exec = Executor::new(shared.target.clone(), shared.device);
    if !exec.target.is_builtin() {
        // The log says when a model's weights have reached the device
        // (seconds for gigabytes on a discrete GPU).
        let to = format!("{}:{}", exec.target.name(), exec.device);
        exec.set_upload_progress(Arc::new(move |done, total| {
            if done == total {
                eprintln!(
                    "kiln: weights uploaded to {to}: {}",
                    kiln_runtime::measure::human_bytes(total)
                );
            }
        }));
    }
    let kv_type = shared.kv_types.for_model(&loaded.id);
    let mut s = Session::with_kv_type(loaded.model.clone(), exec, n_ctx, kv_type)
        .map_err(|e| e.to_string())?;
    s.configure(&shared.engine);
    s.set_threads(shared.threads);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that panics at its first text: a bug on the engine thread.
    struct Panics;

    impl Sink for Panics {
        fn text(&mut self, _: &str) -> bool {
            panic!("a sink's bug");
        }
        fn done(self: Box<Self>, _: Result<Finished, String>) {}
    }

    #[test]
    fn a_panic_on_the_engine_thread_stops_the_engine_and_answers_its_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.gguf");
        crate::demo::write_demo_model(&path).unwrap();
        let cpu = Backend::builtin_cpu();
        let loaded = Loaded::load("demo".into(), path, None, &cpu, 0).unwrap();
        let engine = Engine::start(
            loaded,
            EngineOptions {
                target: cpu,
                device: 0,
                backend_label: "cpu".into(),
                n_ctx: Some(256),
                kv_types: KvTypes::default(),
                completion_cache_entries: 8,
                metrics: Arc::new(Metrics::default()),
                announce: false,
                gate: None,
                draft: Draft::None,
                draft_max: 4,
                draft_model: None,
                // One job at a time: the second waits in the queue (in a
                // batch it would run beside the first, and lose its sink
                // with it).
                engine: kiln_registry::config::EngineConfig {
                    decode_batch: Some(1),
                    ..Default::default()
                },
                threads: None,
            },
        );
        let l = engine.loaded();
        let prompt = l.tok.encode("def add(a, b):", true).unwrap();
        let request = || {
            Request::new(
                prompt.clone(),
                8,
                kiln_runtime::model::sample::SamplingParams::greedy(),
            )
        };
        // Held back until both are queued: the first job panics, the
        // second waits behind it.
        let hold = Instant::now() + Duration::from_millis(300);
        engine.submit_after(1, None, l.clone(), request(), Box::new(Panics), Some(hold));
        let mut queued = engine.submit_events(2, None, l.clone(), request());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let last = rt.block_on(async {
            let mut last = None;
            while let Some(e) = queued.recv().await {
                last = Some(e);
            }
            last
        });
        let Some(Event::Done(Err(e))) = last else {
            panic!("the queued job was not answered with the panic: {last:?}");
        };
        assert!(e.contains("panicked (a sink's bug)"), "{e}");
        assert!(engine.is_stopped());
        // Later jobs are refused at once, saying why.
        let mut later = engine.submit_events(3, None, l, request());
        let refused = rt.block_on(later.recv());
        let Some(Event::Done(Err(e))) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            e.contains("engine stopped") && e.contains("panicked"),
            "{e}"
        );
    }

    #[test]
    fn clients_take_turns() {
        let mut q = Fair::default();
        for i in 0..3 {
            q.push(7, format!("a{i}"));
        }
        q.push(3, "b0".to_string());
        q.push(9, "c0".to_string());
        let order: Vec<String> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, ["b0", "a0", "c0", "a1", "a2"]);
        assert_eq!(q.len, 0);
        q.push(u64::MAX, "z".to_string());
        assert_eq!(q.pop().as_deref(), Some("z"));
        // The last client served was u64::MAX: another of its jobs waits
        // for the others.
        q.push(u64::MAX, "z2".to_string());
        q.push(1, "y".to_string());
        assert_eq!(
            q.pop().as_deref(),
            Some("y"),
            "wraps around after the largest id"
        );
        assert_eq!(q.pop().as_deref(), Some("z2"));
    }
}
