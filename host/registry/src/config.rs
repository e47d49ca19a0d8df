//! Where kiln keeps its state and where it looks for plugins.
//!
//! `KILN_HOME` (default: the platform's data directory, e.g.
//! `~/.local/share/kiln`) holds the registry (`kiln.db`), the plugin store
//! (`store/plugins/`), the drop-in plugin directory (`plugins/`) and the
//! optional `config.toml`:
//!
//! ```toml
//! [plugins]
//! dirs = ["/opt/vendor/kiln-plugins"]   # relative paths are relative to KILN_HOME
//! call_timeout_seconds = 60   # the watchdog: a worker that takes longer is killed
//! worker_memory_mb = 8192     # a worker holding more is killed (default: half the RAM)
//! [plugins.isolation]
//! "vendor-cuda" = "in-process"   # trusted; every other plugin runs in a worker process
//!
//! [store]
//! encrypt_at_rest = true   # models added from now on are stored encrypted (age)
//!
//! [engine]
//! threads = 4              # CPU threads (KILN_THREADS wins); `kiln tune apply` writes these
//! attention_block = 64     # queries per attention block in prompt graphs
//! prompt_batch = 256       # tokens of a prompt evaluated per graph
//! decode_batch = 4         # requests of one model decoded together in one forward pass
//!
//! [completion]
//! draft = "ngram"          # speculative decoding by default (none, ngram)
//! draft_max = 8            # tokens it guesses at most per verifying batch
//! debounce_ms = 50         # an automatic inline completion waits this long first
//! max_tokens = 64          # tokens per completion at most
//! prefix_tokens = 1024     # prompt budgets: text before the cursor,
//! suffix_tokens = 256      #   after it,
//! context_tokens = 512     #   and snippets from other files
//!
//! [kv_cache]
//! type = "q8_0"            # f16 (default), q8_0 or q4_0, for every model
//! [kv_cache.models]
//! "qwen-coder" = "f16"     # by registered name (every version) or name@version
//! ```
//!
//! `KILN_PLUGIN_PATH` adds directories, separated like `PATH`;
//! `KILN_CONFIG` names another file to read instead of `config.toml`
//! (`kiln tune` runs each trial with its own).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a plugin directory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirOrigin {
    Home,
    ConfigFile,
    Environment,
}

#[derive(Clone, Debug, Serialize)]
pub struct PluginDir {
    pub path: PathBuf,
    pub origin: DirOrigin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    plugins: PluginsSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    kv_cache: KvCacheSection,
    #[serde(default)]
    engine: EngineConfig,
    #[serde(default)]
    completion: CompletionConfig,
    #[serde(default)]
    policies: PoliciesSection,
    #[serde(default)]
    models: std::collections::BTreeMap<String, ModelEntry>,
    #[serde(default)]
    pool: PoolConfig,
    #[serde(default)]
    routes: Vec<RouteEntry>,
}

/// `[models.NAME]`: a model `kiln serve` may serve under NAME (loaded on
/// first use, kept while used, unloaded for room).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// A registered model (`NAME` or `NAME@VERSION`) or a GGUF file.
    pub model: String,
    /// The backend to run it on (default: the best one, as `kiln serve`
    /// picks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// KV cache size in tokens (default: the model's, at most 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctx: Option<usize>,
    /// Seconds it stays loaded after its last request (default:
    /// `[pool] keep_alive_seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_seconds: Option<u64>,
    /// Lock its weights in memory (default: `[pool] mlock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlock: Option<bool>,
    /// CPU threads of its own (its caller's included) for its graphs, so
    /// that models run side by side each on its share of the cores
    /// (default: the process's shared pool, `KILN_THREADS` or `[engine]
    /// threads`). The built-in CPU and CPU plugins of ABI 1.3 take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// A LoRA adapter applied to it at run time: a file, or a registered
    /// adapter (`NAME` for its active version, `NAME@VERSION`). The same
    /// model may be served by several entries, each with its own adapter
    /// or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
}

/// `[pool]`: the memory budget of the models `kiln serve` holds at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// MiB the loaded models may take together: weights, KV cache, work
    /// space (default: the memory available when `kiln serve` starts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    /// Seconds an idle model stays loaded (default 300); the first model
    /// served stays loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_alive_seconds: Option<u64>,
    /// Seconds a failed model is left alone before a request tries it
    /// again (default 10; doubled at each further failure, at most 32×).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_seconds: Option<u64>,
    /// Whether the models run at once (each on its own cores), or take
    /// turns: a chat or warm-up on one model pausing while an inline
    /// completion runs on another (default: at once from 8 CPU threads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_models: Option<bool>,
    /// Lock every loaded model's weights in memory (`mlock`), so that the
    /// system never pages them out (default false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlock: Option<bool>,
    /// MiB of each plugin device's memory the models loaded there may
    /// take together: weights, KV cache, work space (default: what the
    /// device had free when the pool first loaded a model there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_device_memory_mb: Option<u64>,
}

/// What a request is, for routing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestKind {
    /// A route for every kind.
    #[default]
    Any,
    /// An inline completion at the cursor (the language server's, and
    /// the HTTP API's `/v1/completions`).
    Inline,
    /// A chat (`/v1/chat/completions`).
    Chat,
    /// Work nobody waits for (warming a cache).
    Warmup,
}

impl RequestKind {
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Any => "any",
            RequestKind::Inline => "inline",
            RequestKind::Chat => "chat",
            RequestKind::Warmup => "warmup",
        }
    }
}

/// `[[routes]]`: which models answer which requests, in order: the first
/// that is healthy answers, the next when it fails.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    #[serde(default)]
    pub kind: RequestKind,
    /// Globs over the file's path in the workspace (`**/*.rs`); any file
    /// when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// The editor's language ids (`rust`, `python`); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub languages: Vec<String>,
    /// The chain: `[models.NAME]` names (or `kiln serve --model` ids).
    pub models: Vec<String>,
    /// Milliseconds a model has to answer (to finish, or to send its first
    /// text when streaming) before the next one in the chain is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// The longest route deadline, in milliseconds.
pub const MAX_DEADLINE_MS: u64 = 600_000;

/// By policy name, parameter name → value: `[policies.params.NAME]`.
pub type PolicyParams = std::collections::BTreeMap<String, std::collections::BTreeMap<String, f64>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoliciesSection {
    /// The values of the parameters ranking policies declare (ABI 1.4),
    /// by policy name; the built-in ranker reads `bm25-recency`'s.
    #[serde(default)]
    params: PolicyParams,
}

/// A KV cache type `config.toml` may name.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum KvType {
    #[default]
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl KvType {
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }
}

/// `[kv_cache]`: the KV cache type of every model, and of some by name.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvCacheSection {
    #[serde(default, rename = "type")]
    pub kv_type: KvType,
    /// By registered name (every version) or `name@version`.
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, KvType>,
}

impl KvCacheSection {
    /// The type for the model registered as `label` (`name@version`, or
    /// a path for a file served unregistered): its `name@version` entry,
    /// else its name's, else `type`.
    pub fn for_model(&self, label: &str) -> KvType {
        let name = label.split_once('@').map_or(label, |(n, _)| n);
        self.models
            .get(label)
            .or_else(|| self.models.get(name))
            .copied()
            .unwrap_or(self.kv_type)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    #[serde(default)]
    encrypt_at_rest: bool,
    /// Hours between the background scrubs `kiln serve` runs; 0: none.
    #[serde(default)]
    scrub_interval_hours: Option<f64>,
}

/// `[store] scrub_interval_hours` when `config.toml` does not set it.
pub const DEFAULT_SCRUB_HOURS: f64 = 24.0;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginsSection {
    #[serde(default)]
    dirs: Vec<PathBuf>,
    /// Seconds one call into a worker may take before it is killed.
    #[serde(default)]
    call_timeout_seconds: Option<f64>,
    /// MiB of resident memory a worker may hold before it is killed.
    #[serde(default)]
    worker_memory_mb: Option<u64>,
    /// By plugin name: "process" or "in-process".
    #[serde(default)]
    isolation: std::collections::BTreeMap<String, IsolationSetting>,
}

/// Where a plugin runs (`[plugins.isolation]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationSetting {
    /// A supervised worker process: the default.
    Process,
    /// kiln's own process: the user trusts the plugin not to crash.
    InProcess,
}

/// `[completion]`: the language server's and HTTP API's defaults (`kiln
/// serve`'s flags and the editor's settings win); what `kiln tune apply`
/// writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompletionConfig {
    /// Speculative decoding by default (`none`, `ngram`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft: Option<String>,
    /// Tokens it guesses at most per verifying batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft_max: Option<usize>,
    /// Milliseconds an automatic inline completion waits before it starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debounce_ms: Option<usize>,
    /// Tokens per completion at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// Prompt budgets: the text before the cursor, after it, and snippets
    /// from other files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_tokens: Option<usize>,
}

/// The largest prompt budget `[completion]` takes, in tokens.
pub const MAX_BUDGET_TOKENS: usize = 1 << 17;
/// The longest completion, in tokens (`max_tokens`, the editor's
/// `maxTokens`).
pub const MAX_COMPLETION_TOKENS: usize = 4096;
/// The most tokens a draft guesses per verifying batch (`draft_max`).
pub const MAX_DRAFT_TOKENS: usize = 64;
/// The longest debounce, in milliseconds (`debounce_ms`).
pub const MAX_DEBOUNCE_MS: usize = 2000;

/// `[engine]`: how models run on this machine (what `kiln tune apply`
/// writes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// CPU threads (`KILN_THREADS`, when set, wins).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Queries per attention block in prompt graphs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_block: Option<usize>,
    /// Tokens of a prompt evaluated per graph.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_batch: Option<usize>,
    /// Requests of one model decoded together, one forward pass a token
    /// for all of them, on the CPU (1: one at a time). Each takes a KV
    /// cache of its own, counted in the model's memory budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_batch: Option<usize>,
}

/// Requests decoded together by default ([`EngineConfig::decode_batch`]).
pub const DEFAULT_DECODE_BATCH: usize = 4;
/// The most `[engine] decode_batch` may say.
pub const MAX_DECODE_BATCH: usize = 64;

impl EngineConfig {
    /// `decode_batch`, else [`DEFAULT_DECODE_BATCH`].
    pub fn decode_batch(&self) -> usize {
        self.decode_batch.unwrap_or(DEFAULT_DECODE_BATCH)
    }
}

/// `[plugins]`: how plugins are run.
#[derive(Clone, Debug, Default)]
pub struct PluginRunConfig {
    /// `call_timeout_seconds`: the watchdog (`None`: kiln's default).
    pub call_timeout: Option<std::time::Duration>,
    /// `worker_memory_mb` in bytes (`None`: half the machine's memory).
    pub worker_memory: Option<u64>,
    /// `[plugins.isolation]`: by plugin name; plugins not named run in a
    /// worker process.
    pub isolation: std::collections::BTreeMap<String, IsolationSetting>,
}

impl PluginRunConfig {
    pub fn isolation_of(&self, plugin: &str) -> IsolationSetting {
        self.isolation
            .get(plugin)
            .copied()
            .unwrap_or(IsolationSetting::Process)
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub home: PathBuf,
    pub config_file: PathBuf,
    pub plugin_dirs: Vec<PluginDir>,
    /// Set when `config.toml` exists but cannot be used; the defaults apply
    /// and commands that depend on it refuse to run.
    pub config_error: Option<String>,
    /// `[store] encrypt_at_rest`: new blobs are stored encrypted.
    pub encrypt_at_rest: bool,
    /// `[kv_cache]`: which KV cache type each model gets.
    pub kv_cache: KvCacheSection,
    /// `[store] scrub_interval_hours`: how often `kiln serve` re-hashes
    /// the model store in the background (`None`: never).
    pub scrub_interval: Option<std::time::Duration>,
    /// `[plugins]`: isolation, the watchdog, the workers' memory.
    pub plugin_run: PluginRunConfig,
    /// `[engine]`: threads, attention block.
    pub engine: EngineConfig,
    /// `[completion]`: speculative decoding and the prompt's budgets by
    /// default; `kiln serve`'s flags and the editor's settings win.
    pub completion: CompletionConfig,
    /// `[policies.params.NAME]`: the values of ranking policies'
    /// declared parameters (checked against the declarations when a
    /// policy is loaded).
    pub policy_params: PolicyParams,
    /// `[models.NAME]`: models `kiln serve` may serve by name.
    pub models: std::collections::BTreeMap<String, ModelEntry>,
    /// `[pool]`: the models' memory budget, keep-alive and cooldown.
    pub pool: PoolConfig,
    /// `[[routes]]`: which models answer which requests.
    pub routes: Vec<RouteEntry>,
}

impl Config {
    /// Reads `KILN_HOME`, `KILN_PLUGIN_PATH` and `config.toml`.
    pub fn from_env() -> Result<Config, String> {
        let home = match std::env::var_os("KILN_HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h),
            _ => dirs::data_dir()
                .map(|d| d.join("kiln"))
                .ok_or("cannot find a data directory for kiln; set KILN_HOME")?,
        };
        Ok(Config::with_file(
            home,
            std::env::var_os("KILN_PLUGIN_PATH").as_deref(),
            Config::file_from_env(),
        ))
    }

    /// `KILN_CONFIG`: the file read instead of `config.toml`, if set.
    pub fn file_from_env() -> Option<PathBuf> {
        std::env::var_os("KILN_CONFIG")
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
    }

    /// The configuration rooted at `home`, with `plugin_path` as `KILN_PLUGIN_PATH`.
    pub fn new(home: PathBuf, plugin_path: Option<&std::ffi::OsStr>) -> Config {
        Config::with_file(home, plugin_path, None)
    }

    /// As [`Config::new`], reading `file` (`KILN_CONFIG`) instead of
    /// `config.toml` in `home` when given.
    pub fn with_file(
        home: PathBuf,
        plugin_path: Option<&std::ffi::OsStr>,
        file: Option<PathBuf>,
    ) -> Config {
        let config_file = file.unwrap_or_else(|| home.join("config.toml"));
        let mut plugin_dirs = vec![PluginDir {
            path: home.join("plugins"),
            origin: DirOrigin::Home,
        }];
        let mut config_error = None;
        let mut encrypt_at_rest = false;
        let mut kv_cache = KvCacheSection::default();
        let mut scrub_hours = DEFAULT_SCRUB_HOURS;
        let mut plugin_run = PluginRunConfig::default();
        let mut engine = EngineConfig::default();
        let mut completion = CompletionConfig::default();
        let mut policy_params = PolicyParams::new();
        let mut models = std::collections::BTreeMap::new();
        let mut pool = PoolConfig::default();
        let mut routes = Vec::new();
        match read_config_file(&config_file) {
            Ok(file) => {
                if let Some(e) = check_pool(&file.models, &file.pool, &file.routes) {
                    config_error = Some(format!("{}: {e}", config_file.display()));
                }
                (models, pool, routes) = (file.models, file.pool, file.routes);
                for (policy, params) in &file.policies.params {
                    if let Some((name, v)) = params.iter().find(|(_, v)| !v.is_finite()) {
                        config_error = Some(format!(
                            "{}: [policies.params.{policy}] {name} = {v}: give a finite number",
                            config_file.display()
                        ));
                    }
                }
                policy_params = file.policies.params;
                match file.completion.draft.as_deref() {
                    Some(d) if !["none", "ngram"].contains(&d) => {
                        config_error = Some(format!(
                            "{}: [completion] draft = {d:?}: give \"none\" or \"ngram\"",
                            config_file.display()
                        ));
                    }
                    _ => {}
                }
                for (key, value, lo, hi) in [
                    (
                        "max_tokens",
                        file.completion.max_tokens,
                        1,
                        MAX_COMPLETION_TOKENS,
                    ),
                    ("draft_max", file.completion.draft_max, 1, MAX_DRAFT_TOKENS),
                    (
                        "debounce_ms",
                        file.completion.debounce_ms,
                        0,
                        MAX_DEBOUNCE_MS,
                    ),
                    (
                        "prefix_tokens",
                        file.completion.prefix_tokens,
                        1,
                        MAX_BUDGET_TOKENS,
                    ),
                    (
                        "suffix_tokens",
                        file.completion.suffix_tokens,
                        0,
                        MAX_BUDGET_TOKENS,
                    ),
                    (
                        "context_tokens",
                        file.completion.context_tokens,
                        0,
                        MAX_BUDGET_TOKENS,
                    ),
                ] {
                    if let Some(v) = value.filter(|v| !(lo..=hi).contains(v)) {
                        config_error = Some(format!(
                            "{}: [completion] {key} = {v}: give {lo} to {hi}",
                            config_file.display()
                        ));
                    }
                }
                completion = file.completion;
                for (key, value, max) in [
                    ("threads", file.engine.threads, 1024),
                    ("attention_block", file.engine.attention_block, 65536),
                    ("prompt_batch", file.engine.prompt_batch, 8192),
                    ("decode_batch", file.engine.decode_batch, MAX_DECODE_BATCH),
                ] {
                    if let Some(v) = value.filter(|&v| v == 0 || v > max) {
                        config_error = Some(format!(
                            "{}: [engine] {key} = {v}: give 1 to {max}",
                            config_file.display()
                        ));
                    }
                }
                engine = file.engine;
                match file.plugins.call_timeout_seconds {
                    Some(t) if !(t.is_finite() && (0.1..=86_400.0).contains(&t)) => {
                        config_error = Some(format!(
                            "{}: [plugins] call_timeout_seconds = {t}: give seconds from 0.1 to 86400",
                            config_file.display()
                        ));
                    }
                    t => plugin_run.call_timeout = t.map(std::time::Duration::from_secs_f64),
                }
                match file.plugins.worker_memory_mb {
                    Some(0) => {
                        config_error = Some(format!(
                            "{}: [plugins] worker_memory_mb = 0: give MiB (leave it out for half the machine's memory)",
                            config_file.display()
                        ));
                    }
                    m => plugin_run.worker_memory = m.map(|m| m.saturating_mul(1 << 20)),
                }
                plugin_run.isolation = file.plugins.isolation;
                encrypt_at_rest = file.store.encrypt_at_rest;
                match file.store.scrub_interval_hours {
                    Some(h) if !(h.is_finite() && (0.0..=24.0 * 365.0).contains(&h)) => {
                        config_error = Some(format!(
                            "{}: [store] scrub_interval_hours = {h}: give hours from 0 (no background scrub) to 8760",
                            config_file.display()
                        ));
                    }
                    Some(h) => scrub_hours = h,
                    None => {}
                }
                kv_cache = file.kv_cache;
                plugin_dirs.extend(file.plugins.dirs.into_iter().map(|p| PluginDir {
                    path: if p.is_absolute() { p } else { home.join(p) },
                    origin: DirOrigin::ConfigFile,
                }))
            }
            Err(e) => config_error = Some(e),
        }
        if let Some(paths) = plugin_path {
            plugin_dirs.extend(
                std::env::split_paths(paths)
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|path| PluginDir {
                        path,
                        origin: DirOrigin::Environment,
                    }),
            );
        }
        Config {
            home,
            config_file,
            plugin_dirs,
            config_error,
            encrypt_at_rest,
            kv_cache,
            scrub_interval: (scrub_hours > 0.0)
                .then(|| std::time::Duration::from_secs_f64(scrub_hours * 3600.0)),
            plugin_run,
            engine,
            completion,
            policy_params,
            models,
            pool,
            routes,
        }
    }

    pub fn registry_path(&self) -> PathBuf {
        self.home.join("kiln.db")
    }

    /// Installed plugin versions live here, one immutable directory each.
    pub fn plugin_store(&self) -> PathBuf {
        self.home.join("store").join("plugins")
    }

    /// Fails when `config.toml` is unusable, naming the file and the problem.
    pub fn require_valid(&self) -> Result<(), String> {
        match &self.config_error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// The config file's text ('' when there is none).
pub fn config_text(config: &Config) -> Result<String, String> {
    match std::fs::read_to_string(&config.config_file) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("cannot read {}: {e}", config.config_file.display())),
    }
}

/// Sets `[store] encrypt_at_rest` in `config.toml` (created if missing),
/// keeping the rest of the file as it was; written to a temporary file
/// and renamed over it.
pub fn set_encrypt_at_rest(config: &mut Config, on: bool) -> Result<(), String> {
    config.require_valid()?;
    let path = &config.config_file;
    let text = config_text(config)?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    let store = doc
        .entry("store")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
    let Some(store) = store.as_table_like_mut() else {
        return Err(format!(
            "{}: `store` is not a table; make it `[store]`",
            path.display()
        ));
    };
    store.insert("encrypt_at_rest", toml_edit::value(on));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&config.home)?;
        let tmp = path.with_extension(format!("toml.tmp-{}", std::process::id()));
        std::fs::write(&tmp, doc.to_string())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    config.encrypt_at_rest = on;
    Ok(())
}

/// What `kiln tune` sets in a config: `[engine] threads` and
/// `attention_block`, `[kv_cache.models] MODEL = TYPE`, `[completion]
/// draft` and the prompt's budgets; `None` leaves a key as it is.
#[derive(Clone, Debug, Default)]
pub struct EngineSetting<'a> {
    /// `[engine]`'s keys to set.
    pub engine: EngineConfig,
    pub kv_type: Option<(&'a str, KvType)>,
    /// `[completion]`'s keys to set.
    pub completion: CompletionConfig,
    /// `[policies.params.NAME]`'s keys to set.
    pub policy_params: PolicyParams,
}

/// `config.toml`'s text now ('' when there is none) and with `setting`
/// applied (the rest of the file as it was). Nothing is written: the
/// caller records the change, then [`write_config_text`].
pub fn with_engine_setting(
    config: &Config,
    setting: &EngineSetting<'_>,
) -> Result<(String, String), String> {
    config.require_valid()?;
    let before = config_text(config)?;
    let after = engine_setting_text(&before, &config.config_file, setting)?;
    Ok((before, after))
}

/// `before` (the text of the config file at `path`) with `setting`
/// applied.
pub fn engine_setting_text(
    before: &str,
    path: &Path,
    setting: &EngineSetting<'_>,
) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = before
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    fn table<'d>(
        doc: &'d mut toml_edit::DocumentMut,
        name: &str,
        path: &Path,
    ) -> Result<&'d mut dyn toml_edit::TableLike, String> {
        doc.entry(name)
            .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
            .as_table_like_mut()
            .ok_or_else(|| format!("{}: `{name}` is not a table", path.display()))
    }
    // The keys a section's struct has set (`None`s are left out).
    fn set<T: Serialize>(
        doc: &mut toml_edit::DocumentMut,
        name: &str,
        path: &Path,
        keys: &T,
    ) -> Result<(), String> {
        let toml::Value::Table(keys) =
            toml::Value::try_from(keys).map_err(|e| format!("[{name}]: {e}"))?
        else {
            return Ok(());
        };
        for (key, value) in keys {
            let value = match value {
                toml::Value::Integer(i) => toml_edit::value(i),
                toml::Value::String(s) => toml_edit::value(s),
                other => return Err(format!("[{name}] {key} = {other}: not written")),
            };
            table(doc, name, path)?.insert(&key, value);
        }
        Ok(())
    }
    set(&mut doc, "engine", path, &setting.engine)?;
    if let Some((model, kv)) = setting.kv_type {
        let kv_cache = table(&mut doc, "kv_cache", path)?;
        let models = kv_cache
            .entry("models")
            .or_insert(toml_edit::Item::Table(toml_edit::Table::new()))
            .as_table_like_mut()
            .ok_or_else(|| format!("{}: `kv_cache.models` is not a table", path.display()))?;
        models.insert(model, toml_edit::value(kv.name()));
    }
    set(&mut doc, "completion", path, &setting.completion)?;
    // `[policies.params.NAME]`, its parents implicit (no empty headers).
    let implicit = || {
        let mut t = toml_edit::Table::new();
        t.set_implicit(true);
        toml_edit::Item::Table(t)
    };
    for (policy, params) in &setting.policy_params {
        let policies = doc
            .entry("policies")
            .or_insert_with(implicit)
            .as_table_like_mut()
            .ok_or_else(|| format!("{}: `policies` is not a table", path.display()))?;
        let all = policies
            .entry("params")
            .or_insert_with(implicit)
            .as_table_like_mut()
            .ok_or_else(|| format!("{}: `policies.params` is not a table", path.display()))?;
        let one = all
            .entry(policy)
            .or_insert(toml_edit::Item::Table(toml_edit::Table::new()))
            .as_table_like_mut()
            .ok_or_else(|| {
                format!(
                    "{}: `policies.params.{policy}` is not a table",
                    path.display()
                )
            })?;
        for (name, v) in params {
            one.insert(name, toml_edit::value(*v));
        }
    }
    let after = doc.to_string();
    // What is written must read back as a valid config.
    toml::from_str::<ConfigFile>(&after)
        .map_err(|e| format!("the tuned config would not be valid: {e}"))?;
    Ok(after)
}

/// `config.toml`'s text now and with `[plugins.isolation] PLUGIN` set to
/// `isolation` (`None`: the entry removed, so the plugin runs in a worker
/// process, the default). Nothing is written.
pub fn with_isolation(
    config: &Config,
    plugin: &str,
    isolation: Option<IsolationSetting>,
) -> Result<(String, String), String> {
    config.require_valid()?;
    let path = &config.config_file;
    let before = config_text(config)?;
    let mut doc: toml_edit::DocumentMut = before
        .parse()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))?;
    let plugins = doc
        .entry("plugins")
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()))
        .as_table_like_mut()
        .ok_or_else(|| format!("{}: `plugins` is not a table", path.display()))?;
    let table = plugins
        .entry("isolation")
        .or_insert(toml_edit::Item::Table(toml_edit::Table::new()))
        .as_table_like_mut()
        .ok_or_else(|| format!("{}: `plugins.isolation` is not a table", path.display()))?;
    match isolation {
        Some(IsolationSetting::InProcess) => {
            table.insert(plugin, toml_edit::value("in-process"));
        }
        Some(IsolationSetting::Process) => {
            table.insert(plugin, toml_edit::value("process"));
        }
        None => {
            table.remove(plugin);
        }
    }
    let after = doc.to_string();
    toml::from_str::<ConfigFile>(&after)
        .map_err(|e| format!("the changed config would not be valid: {e}"))?;
    Ok((before, after))
}

/// Writes `text` as `config.toml` (a temporary file, synced, renamed
/// over it); an empty text removes the file.
pub fn write_config_text(config: &Config, text: &str) -> Result<(), String> {
    let path = &config.config_file;
    let write = || -> std::io::Result<()> {
        if text.is_empty() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        std::fs::create_dir_all(&config.home)?;
        let tmp = path.with_extension(format!("toml.tmp-{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// What is wrong with `[models]`, `[pool]` and `[[routes]]`, if anything.
/// (A route's model may also be a `kiln serve --model` id, and its globs
/// are compiled, when `kiln serve` starts.)
fn check_pool(
    models: &std::collections::BTreeMap<String, ModelEntry>,
    pool: &PoolConfig,
    routes: &[RouteEntry],
) -> Option<String> {
    const WEEK: u64 = 7 * 86_400;
    for (name, m) in models {
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '/') {
            return Some(format!(
                "[models.{name:?}]: a model's name has no spaces or slashes"
            ));
        }
        if m.model.trim().is_empty() {
            return Some(format!(
                "[models.{name}] model is empty: give a registered model or a GGUF file"
            ));
        }
        if let Some(c) = m.ctx.filter(|c| !(16..=1 << 20).contains(c)) {
            return Some(format!(
                "[models.{name}] ctx = {c}: give 16 to 1048576 tokens"
            ));
        }
        if let Some(k) = m.keep_alive_seconds.filter(|&k| k > WEEK) {
            return Some(format!(
                "[models.{name}] keep_alive_seconds = {k}: give 0 to {WEEK}"
            ));
        }
        if let Some(t) = m.threads.filter(|t| !(1..=1024).contains(t)) {
            return Some(format!(
                "[models.{name}] threads = {t}: give 1 to 1024 (leave it out for the shared pool)"
            ));
        }
    }
    if pool.max_device_memory_mb == Some(0) {
        return Some(
            "[pool] max_device_memory_mb = 0: give MiB (leave it out for each device's free memory)"
                .into(),
        );
    }
    if pool.max_memory_mb == Some(0) {
        return Some(
            "[pool] max_memory_mb = 0: give MiB (leave it out for the memory available)".into(),
        );
    }
    if let Some(k) = pool.keep_alive_seconds.filter(|&k| k > WEEK) {
        return Some(format!("[pool] keep_alive_seconds = {k}: give 0 to {WEEK}"));
    }
    if let Some(c) = pool.cooldown_seconds.filter(|&c| c == 0 || c > 3600) {
        return Some(format!("[pool] cooldown_seconds = {c}: give 1 to 3600"));
    }
    for (i, r) in routes.iter().enumerate() {
        if r.models.is_empty() {
            return Some(format!(
                "[[routes]] #{}: models is empty: list the models that answer, first to last",
                i + 1
            ));
        }
        if let Some(d) = r.deadline_ms.filter(|&d| d == 0 || d > MAX_DEADLINE_MS) {
            return Some(format!(
                "[[routes]] #{}: deadline_ms = {d}: give 1 to {MAX_DEADLINE_MS}",
                i + 1
            ));
        }
    }
    None
}

fn read_config_file(path: &Path) -> Result<ConfigFile, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    toml::from_str(&text).map_err(|e| {
        format!(
            "{} is not a valid kiln config: {}; fix it or move it away",
            path.display(),
            describe_toml_error(&text, &e)
        )
    })
}

/// "line 3 (`version = "one"`): <what toml says>", so the user sees which
/// line of which file to fix.
pub fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no} (`{line}`): {}", e.message())
        }
        None => e.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_come_from_home_file_and_env_in_order() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join("config.toml"),
            "[plugins]\ndirs = [\"vendor\", \"/opt/x\"]\n",
        )
        .unwrap();
        let env = std::env::join_paths(["/a", "/b"]).unwrap();
        let c = Config::new(home.path().to_path_buf(), Some(&env));
        let got: Vec<(PathBuf, DirOrigin)> = c
            .plugin_dirs
            .iter()
            .map(|d| (d.path.clone(), d.origin))
            .collect();
        assert_eq!(
            got,
            vec![
                (home.path().join("plugins"), DirOrigin::Home),
                (home.path().join("vendor"), DirOrigin::ConfigFile),
                (PathBuf::from("/opt/x"), DirOrigin::ConfigFile),
                (PathBuf::from("/a"), DirOrigin::Environment),
                (PathBuf::from("/b"), DirOrigin::Environment),
            ]
        );
        assert!(c.config_error.is_none());
    }

    #[test]
    fn a_broken_config_file_is_reported_not_fatal() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("config.toml"), "[plugins]\ndir = 3\n").unwrap();
        let c = Config::new(home.path().to_path_buf(), None);
        let err = c.config_error.clone().unwrap();
        assert!(err.contains("config.toml") && err.contains("dir"), "{err}");
        assert_eq!(c.plugin_dirs.len(), 1);
        assert!(c.require_valid().is_err());
    }

    #[test]
    fn policy_params_are_read_and_written_back() {
        let home = tempfile::tempdir().unwrap();
        let text = "[engine]\nthreads = 2\n\n[policies.params.proximity]\nreach = 40\n";
        std::fs::write(home.path().join("config.toml"), text).unwrap();
        let c = Config::new(home.path().to_path_buf(), None);
        assert!(c.config_error.is_none(), "{:?}", c.config_error);
        assert_eq!(c.policy_params["proximity"]["reach"], 40.0);
        let mut setting = EngineSetting::default();
        setting
            .policy_params
            .entry("bm25-recency".into())
            .or_default()
            .insert("definition".into(), 12.5);
        let (_, after) = with_engine_setting(&c, &setting).unwrap();
        assert!(after.starts_with(text), "{after}");
        assert!(
            after.contains("[policies.params.bm25-recency]\ndefinition = 12.5"),
            "{after}"
        );
        assert!(!after.contains("[policies]\n"), "{after}");
        write_config_text(&c, &after).unwrap();
        let c = Config::new(home.path().to_path_buf(), None);
        assert_eq!(c.policy_params["bm25-recency"]["definition"], 12.5);
        assert_eq!(c.policy_params["proximity"]["reach"], 40.0);

        // A value that is not a finite number, or not a number, is refused
        // with the table and the key.
        for bad in ["reach = nan", "reach = inf", "reach = \"far\""] {
            std::fs::write(
                home.path().join("config.toml"),
                format!("[policies.params.proximity]\n{bad}\n"),
            )
            .unwrap();
            let c = Config::new(home.path().to_path_buf(), None);
            let e = c.require_valid().unwrap_err();
            assert!(e.contains("reach"), "{bad}: {e}");
        }
    }

    #[test]
    fn turning_encryption_on_keeps_the_rest_of_the_file() {
        let home = tempfile::tempdir().unwrap();
        let mut c = Config::new(home.path().to_path_buf(), None);
        assert!(!c.encrypt_at_rest);
        set_encrypt_at_rest(&mut c, true).unwrap();
        assert!(Config::new(home.path().to_path_buf(), None).encrypt_at_rest);

        let text = "# my plugins\n[plugins]\ndirs = [\"vendor\"]  # theirs\n";
        std::fs::write(home.path().join("config.toml"), text).unwrap();
        let mut c = Config::new(home.path().to_path_buf(), None);
        set_encrypt_at_rest(&mut c, true).unwrap();
        let now = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
        assert!(now.starts_with(text), "{now}");
        let c = Config::new(home.path().to_path_buf(), None);
        assert!(c.encrypt_at_rest && c.config_error.is_none());
        assert_eq!(c.plugin_dirs.len(), 2);
    }
}
