//! `/metrics`: Prometheus text exposition with vLLM's metric names under a
//! `kiln:` prefix. Updated by the engine as requests finish; reading it
//! never waits for a generation.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub draft_tokens: Counter,
    pub draft_accepted: Counter,
    /// Runs of several requests decoded together, and the requests in them.
    pub decode_batches: Counter,
    pub batched_requests: Counter,
    pub prefix_cache_queries: Counter,
    pub prefix_cache_hits: Counter,
    /// Prompt tokens copied back from the session's prefix tree (part of
    /// the hits).
    pub prefix_tree_restored: Counter,
    /// Bytes of the live KV cache (it grows by pages as used) and of the
    /// prefixes kept beside it.
    pub kv_cache_bytes: Gauge,
    pub prefix_tree_bytes: Gauge,
    pub completion_cache_queries: Counter,
    pub completion_cache_hits: Counter,
    pub completion_cache_evictions: Counter,
    /// Inline completions the editor said it accepted (`kiln.accepted`).
    pub completions_accepted: Counter,
    pub running: Gauge,
    pub waiting: Gauge,
    /// Jobs paused for a more urgent one (a chat for an inline
    /// completion), to go on after it.
    pub paused: Counter,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub backend_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    pub backend_ops: Family<Labels, Counter>,
    pub fallbacks: Family<Labels, Counter>,
    pub transfer_bytes: Family<Labels, Counter>,
    /// Deaths and restarts of a plugin's worker process, and 1 while the
    /// plugin is quarantined.
    pub plugin_crashes: Family<Labels, Counter>,
    pub plugin_restarts: Family<Labels, Counter>,
    pub plugin_quarantined: Family<Labels, Gauge>,
    pub policy_calls: Family<Labels, Counter>,
    pub policy_trips: Family<Labels, Counter>,
    pub policy_breaker_open: Family<Labels, Gauge>,
    /// Fuel the ranking policies burned (wasmtime's instruction budget).
    pub policy_fuel: Family<Labels, Counter>,
    /// 1 for the model being served, labelled with what it is.
    pub model_info: Family<Labels, Gauge>,
    pub context_window: Gauge,
    pub model_bytes: Gauge,
    /// The last background scrub of the model store: blobs checked,
    /// damaged or missing ones, and when (Unix seconds; 0: none yet).
    pub store_blobs: Gauge,
    pub store_damaged: Gauge,
    pub store_scrubbed_at: Gauge,
    /// The model pool, by model: 1 while loaded; health (0 healthy, 1
    /// degraded, 2 failed); loads; unloads by reason (budget, idle);
    /// times a route's model failed and the next was asked, by reason.
    pub model_loaded: Family<Labels, Gauge>,
    pub model_health: Family<Labels, Gauge>,
    pub model_loads: Family<Labels, Counter>,
    pub model_evictions: Family<Labels, Counter>,
    pub route_fallbacks: Family<Labels, Counter>,
    /// Requests answered from the offline cache (every model failed).
    pub offline_answers: Counter,
    /// What the loaded models need together, and the pool's budget.
    pub pool_memory_bytes: Gauge,
    pub pool_budget_bytes: Gauge,
    /// The process's anonymous memory on transparent huge pages, read
    /// when the metrics are rendered.
    pub huge_pages_bytes: Gauge,
    /// The last completion prompt's layout (the language server's), for
    /// the dashboard: not a Prometheus metric.
    pub last_prompt: std::sync::Mutex<Option<serde_json::Value>>,
    /// The last explanation computed (its attention map included), for
    /// the dashboard's heat map, and how many there were: not a
    /// Prometheus metric.
    pub last_explanation: std::sync::Mutex<(u64, Option<serde_json::Value>)>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 1 ms … about 46 s, four buckets per doubling (the dashboard's
    // percentiles are read from them).
    exponential_buckets(0.001, 2f64.sqrt().sqrt(), 63)
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            draft_tokens: Counter::default(),
            draft_accepted: Counter::default(),
            decode_batches: Counter::default(),
            batched_requests: Counter::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            prefix_tree_restored: Counter::default(),
            kv_cache_bytes: Gauge::default(),
            prefix_tree_bytes: Gauge::default(),
            completion_cache_queries: Counter::default(),
            completion_cache_hits: Counter::default(),
            completion_cache_evictions: Counter::default(),
            completions_accepted: Counter::default(),
            running: Gauge::default(),
            waiting: Gauge::default(),
            paused: Counter::default(),
            ttft: Histogram::new(latency_buckets()),
            inter_token: Histogram::new(exponential_buckets(0.0005, 2f64.sqrt().sqrt(), 55)),
            e2e: Histogram::new(latency_buckets()),
            queue_time: Histogram::new(latency_buckets()),
            backend_seconds: Family::default(),
            backend_ops: Family::default(),
            fallbacks: Family::default(),
            transfer_bytes: Family::default(),
            plugin_crashes: Family::default(),
            plugin_restarts: Family::default(),
            plugin_quarantined: Family::default(),
            policy_calls: Family::default(),
            policy_trips: Family::default(),
            policy_breaker_open: Family::default(),
            policy_fuel: Family::default(),
            model_info: Family::default(),
            context_window: Gauge::default(),
            model_bytes: Gauge::default(),
            store_blobs: Gauge::default(),
            store_damaged: Gauge::default(),
            store_scrubbed_at: Gauge::default(),
            model_loaded: Family::default(),
            model_health: Family::default(),
            model_loads: Family::default(),
            model_evictions: Family::default(),
            route_fallbacks: Family::default(),
            offline_answers: Counter::default(),
            pool_memory_bytes: Gauge::default(),
            pool_budget_bytes: Gauge::default(),
            huge_pages_bytes: Gauge::default(),
            last_prompt: Default::default(),
            last_explanation: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "kiln:request_success",
            "Finished requests, by why they finished",
            m.requests.clone(),
        );
        registry.register(
            "kiln:prompt_tokens",
            "Prompt tokens processed (cached ones included)",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "kiln:generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        registry.register(
            "kiln:draft_tokens",
            "Tokens guessed by speculative decoding (`--draft`)",
            m.draft_tokens.clone(),
        );
        registry.register(
            "kiln:draft_accepted",
            "Guessed tokens the model agreed with: decode steps saved",
            m.draft_accepted.clone(),
        );
        registry.register(
            "kiln:decode_batches",
            "Runs of several requests of one model decoded together, one forward pass a token for all of them ([engine] decode_batch)",
            m.decode_batches.clone(),
        );
        registry.register(
            "kiln:batched_requests",
            "Requests decoded together with others (in kiln:decode_batches)",
            m.batched_requests.clone(),
        );
        registry.register(
            "kiln:prefix_cache_queries",
            "Prompt tokens looked up in the KV cache",
            m.prefix_cache_queries.clone(),
        );
        registry.register(
            "kiln:prefix_cache_hits",
            "Prompt tokens found in the KV cache",
            m.prefix_cache_hits.clone(),
        );
        registry.register(
            "kiln:prefix_tree_restored_tokens",
            "Prompt tokens copied back from the prefix tree (KV of earlier prompts kept beside the live cache) instead of evaluated",
            m.prefix_tree_restored.clone(),
        );
        registry.register(
            "kiln:kv_cache_bytes",
            "Bytes of the live KV cache, which grows by pages as positions are used",
            m.kv_cache_bytes.clone(),
        );
        registry.register(
            "kiln:prefix_tree_bytes",
            "Bytes of KV kept in the prefix tree for earlier prompts",
            m.prefix_tree_bytes.clone(),
        );
        registry.register(
            "kiln:completion_cache_queries",
            "Requests looked up in the cache of recent completions",
            m.completion_cache_queries.clone(),
        );
        registry.register(
            "kiln:completion_cache_hits",
            "Requests answered from the cache of recent completions",
            m.completion_cache_hits.clone(),
        );
        registry.register(
            "kiln:completions_accepted",
            "Inline completions the editor reported accepted (kiln.accepted)",
            m.completions_accepted.clone(),
        );
        registry.register(
            "kiln:completion_cache_evictions",
            "Completions dropped from the cache for room or age",
            m.completion_cache_evictions.clone(),
        );
        registry.register(
            "kiln:num_requests_running",
            "Requests generating now",
            m.running.clone(),
        );
        registry.register(
            "kiln:num_requests_waiting",
            "Requests queued",
            m.waiting.clone(),
        );
        registry.register(
            "kiln:requests_paused",
            "Times a running request was paused for a more urgent one (a chat for an inline completion) and went on after it",
            m.paused.clone(),
        );
        registry.register(
            "kiln:time_to_first_token_seconds",
            "From arrival to the first generated token",
            m.ttft.clone(),
        );
        registry.register(
            "kiln:inter_token_latency_seconds",
            "Between consecutive generated tokens",
            m.inter_token.clone(),
        );
        registry.register(
            "kiln:e2e_request_latency_seconds",
            "From arrival to the last token",
            m.e2e.clone(),
        );
        registry.register(
            "kiln:request_queue_time_seconds",
            "Time spent waiting for the engine",
            m.queue_time.clone(),
        );
        registry.register(
            "kiln:backend_compute_seconds",
            "Time spent evaluating graphs, by backend",
            m.backend_seconds.clone(),
        );
        registry.register(
            "kiln:backend_ops",
            "Ops a backend executed",
            m.backend_ops.clone(),
        );
        registry.register(
            "kiln:backend_fallbacks",
            "Ops or failed segments run on the CPU instead, by backend and reason",
            m.fallbacks.clone(),
        );
        registry.register(
            "kiln:backend_transfer_bytes",
            "Bytes moved between the host and a backend's device memory, by backend and \
             direction (to_device, from_device)",
            m.transfer_bytes.clone(),
        );
        registry.register(
            "kiln:plugin_worker_crashes",
            "Deaths of a plugin's worker process (signal, watchdog, memory limit), by plugin",
            m.plugin_crashes.clone(),
        );
        registry.register(
            "kiln:plugin_worker_restarts",
            "Worker processes started again after a crash, by plugin",
            m.plugin_restarts.clone(),
        );
        registry.register(
            "kiln:plugin_quarantined",
            "1 while a plugin is quarantined after repeated crashes (kiln plugins release NAME)",
            m.plugin_quarantined.clone(),
        );
        registry.register(
            "kiln:policy_calls",
            "Ranking policy calls while serving, by policy and outcome (ok, error)",
            m.policy_calls.clone(),
        );
        registry.register(
            "kiln:policy_breaker_trips",
            "Times a policy's circuit breaker tripped (the policy was disabled)",
            m.policy_trips.clone(),
        );
        registry.register(
            "kiln:policy_fuel",
            "Fuel (WebAssembly instructions, roughly) the ranking policies used",
            m.policy_fuel.clone(),
        );
        registry.register(
            "kiln:policy_breaker_open",
            "1 while a policy's circuit breaker is open (the built-in ranker stands in)",
            m.policy_breaker_open.clone(),
        );
        registry.register(
            "kiln:model_info",
            "1 for the model being served (labels: model, architecture, backend, fim)",
            m.model_info.clone(),
        );
        registry.register(
            "kiln:context_window_tokens",
            "The served model's KV cache size in tokens",
            m.context_window.clone(),
        );
        registry.register(
            "kiln:model_bytes",
            "Bytes of the served model's file",
            m.model_bytes.clone(),
        );
        registry.register(
            "kiln:store_blobs",
            "Model blobs the last background scrub of the store checked",
            m.store_blobs.clone(),
        );
        registry.register(
            "kiln:store_damaged_blobs",
            "Model blobs the last background scrub found damaged or missing (kiln store scrub --repair)",
            m.store_damaged.clone(),
        );
        registry.register(
            "kiln:store_scrub_timestamp_seconds",
            "When the last background scrub of the model store ended (Unix time; 0: none yet)",
            m.store_scrubbed_at.clone(),
        );
        registry.register(
            "kiln:model_loaded",
            "1 while a model of the pool is loaded, by model",
            m.model_loaded.clone(),
        );
        registry.register(
            "kiln:model_health",
            "A pool model's health: 0 healthy, 1 degraded (its backend failed lately), 2 failed (cooling down)",
            m.model_health.clone(),
        );
        registry.register(
            "kiln:model_loads",
            "Times a pool model was loaded, by model",
            m.model_loads.clone(),
        );
        registry.register(
            "kiln:model_unloads",
            "Times a pool model was unloaded, by model and reason (budget, idle)",
            m.model_evictions.clone(),
        );
        registry.register(
            "kiln:route_fallbacks",
            "Times a route's model failed and the next one was asked, by model and reason (error, deadline, load)",
            m.route_fallbacks.clone(),
        );
        registry.register(
            "kiln:route_offline_cache_answers",
            "Requests answered from the offline cache because every model of their route failed",
            m.offline_answers.clone(),
        );
        registry.register(
            "kiln:pool_memory_bytes",
            "What the loaded models need together: weights, KV caches, work space",
            m.pool_memory_bytes.clone(),
        );
        registry.register(
            "kiln:pool_budget_bytes",
            "The pool's memory budget ([pool] max_memory_mb, else what was available at start)",
            m.pool_budget_bytes.clone(),
        );
        registry.register(
            "kiln:huge_pages_bytes",
            "Anonymous memory of the process on transparent huge pages (weights copied into memory, KV caches and work spaces ask for them)",
            m.huge_pages_bytes.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Records the model now served.
    pub fn set_model(&self, labels_: &[(&str, &str)], n_ctx: usize, bytes: u64) {
        self.model_info.clear();
        self.model_info.get_or_create(&labels(labels_)).set(1);
        self.context_window.set(n_ctx as i64);
        self.model_bytes.set(bytes as i64);
    }

    /// The exposition text (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        if let Some(b) = kiln_runtime::measure::huge_pages_bytes() {
            self.huge_pages_bytes.set(b as i64);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// A label set.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
