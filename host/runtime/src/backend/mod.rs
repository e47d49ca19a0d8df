//! Backends as the host uses them: the built-in CPU backend and loaded
//! plugins, both negotiated through the same ABI; the set of usable
//! backends; and the choice of device by measured score.
//!
//! - [`exec`] runs graphs on the chosen device, op by op falling back to
//!   the CPU for ops the device does not support, and re-running on the CPU
//!   any part that fails at run time.
//! - [`conformance`] is the gate a plugin passes before it is enabled.
//! - [`score`] is the microbenchmark that ranks devices.

pub mod conformance;
pub mod exec;
pub mod score;
mod spans;
pub mod worker;

use crate::plugin::{PreflightError, VerifiedPlugin};
use kiln_plugin_api::abi::{KilnOp, KilnTensor};
use kiln_plugin_api::host::{BackendHandle, HostApi, HostSink, LoadError, RawBuffer, host_api};
use kiln_plugin_api::{BackendError, DeviceInfo, ErrorCode};
use kiln_registry::Registry;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Plugin log lines go to stderr at or above `KILN_LOG` (error, warn,
/// info, debug; default warn). Out-of-band errors are always printed.
struct StderrSink {
    max_level: i32,
}

/// The last warnings and errors plugins logged, for `kiln doctor`.
static PLUGIN_WARNINGS: Mutex<std::collections::VecDeque<String>> =
    Mutex::new(std::collections::VecDeque::new());
const PLUGIN_WARNINGS_KEPT: usize = 64;

/// Takes the warnings and errors plugins have logged since the last call
/// (the last 64 at most; they went to stderr too).
pub fn take_plugin_warnings() -> Vec<String> {
    let mut kept = PLUGIN_WARNINGS.lock().unwrap_or_else(|p| p.into_inner());
    kept.drain(..).collect()
}

/// Keeps a warning or error a plugin logged (here, or in its worker).
pub(crate) fn keep_plugin_warning(message: String) {
    let mut kept = PLUGIN_WARNINGS.lock().unwrap_or_else(|p| p.into_inner());
    if kept.len() == PLUGIN_WARNINGS_KEPT {
        kept.pop_front();
    }
    kept.push_back(message);
}

impl HostSink for StderrSink {
    fn log(&self, level: i32, message: &str) {
        if level <= 1 {
            keep_plugin_warning(message.to_string());
        }
        if level <= self.max_level {
            let name = ["error", "warn", "info", "debug"]
                .get(level as usize)
                .unwrap_or(&"debug");
            eprintln!("kiln: plugin {name}: {message}");
        }
    }

    fn report_error(&self, code: ErrorCode, message: &str) {
        eprintln!("kiln: plugin reported {code}: {message}");
    }
}

pub(crate) fn host_services() -> HostApi {
    static API: OnceLock<HostApi> = OnceLock::new();
    *API.get_or_init(|| {
        let max_level = match std::env::var("KILN_LOG").as_deref() {
            Ok("error") => 0,
            Ok("info") => 2,
            Ok("debug") => 3,
            _ => 1,
        };
        host_api(Box::new(StderrSink { max_level }))
    })
}

/// Where a backend came from.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BackendSource {
    /// Linked into the kiln binary.
    Builtin,
    Plugin {
        name: String,
        version: String,
        sha256: String,
        library: PathBuf,
    },
}

/// Counters of what ran where; read by `kiln backends` and, later, metrics.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Ops this backend executed.
    pub ops_run: AtomicU64,
    /// Ops sent to the CPU because this backend does not support them.
    pub ops_unsupported_fallback: AtomicU64,
    /// Graph segments that failed here at run time and were re-run on the CPU.
    pub runtime_failures_rerun: AtomicU64,
    /// `supports_op` calls made (answers are remembered per op signature).
    pub supports_op_queries: AtomicU64,
    /// Bytes written into this backend's buffers by the executor (weights
    /// once, then inputs and whatever crosses from CPU ops).
    pub bytes_to_device: AtomicU64,
    /// Bytes read back from this backend's buffers by the executor.
    pub bytes_from_device: AtomicU64,
    /// Times a device failed and lost the state it held (the executor then
    /// runs on the CPU, and the session rebuilds the state there).
    pub device_losses: AtomicU64,
}

/// How the host reaches a backend: its negotiated table in this process,
/// or a supervised worker process that holds it ([`worker`]).
pub enum Handle {
    InProcess(BackendHandle),
    Worker(worker::Worker),
}

macro_rules! dispatch {
    ($self:ident, $h:ident => $e:expr) => {
        match $self {
            Handle::InProcess($h) => $e,
            Handle::Worker($h) => $e,
        }
    };
}

impl Handle {
    pub fn isolation(&self) -> worker::Isolation {
        match self {
            Handle::InProcess(_) => worker::Isolation::InProcess,
            Handle::Worker(_) => worker::Isolation::Process,
        }
    }

    /// The worker, when the backend runs in one.
    pub fn worker(&self) -> Option<&worker::Worker> {
        match self {
            Handle::Worker(w) => Some(w),
            Handle::InProcess(_) => None,
        }
    }

    /// The ABI minor the plugin declared.
    pub fn abi_minor(&self) -> u16 {
        match self {
            Handle::InProcess(h) => h.abi_minor(),
            Handle::Worker(w) => w.hello().abi_minor,
        }
    }

    pub fn device_memory(&self, device: u32) -> Option<Result<(u64, u64), BackendError>> {
        dispatch!(self, h => h.device_memory(device))
    }

    pub fn weight_layout(
        &self,
        device: u32,
        dtype: kiln_plugin_api::DType,
    ) -> kiln_plugin_api::DType {
        dispatch!(self, h => h.weight_layout(device, dtype))
    }

    pub fn buffer_alloc(&self, device: u32, size: u64) -> Result<RawBuffer, BackendError> {
        dispatch!(self, h => h.buffer_alloc(device, size))
    }

    pub fn buffer_free(&self, buffer: RawBuffer) -> Result<(), BackendError> {
        dispatch!(self, h => h.buffer_free(buffer))
    }

    pub fn buffer_write(
        &self,
        buffer: RawBuffer,
        offset: u64,
        data: &[u8],
    ) -> Result<(), BackendError> {
        dispatch!(self, h => h.buffer_write(buffer, offset, data))
    }

    pub fn buffer_read(
        &self,
        buffer: RawBuffer,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), BackendError> {
        dispatch!(self, h => h.buffer_read(buffer, offset, out))
    }

    pub fn buffer_copy(
        &self,
        src: RawBuffer,
        src_offset: u64,
        dst: RawBuffer,
        dst_offset: u64,
        size: u64,
    ) -> Result<(), BackendError> {
        dispatch!(self, h => h.buffer_copy(src, src_offset, dst, dst_offset, size))
    }

    pub fn supports_op(
        &self,
        device: u32,
        op: &KilnOp,
        tensors: &[KilnTensor],
    ) -> Result<bool, BackendError> {
        dispatch!(self, h => h.supports_op(device, op, tensors))
    }

    /// Runs a graph on at most `threads` CPU threads (0: the backend's
    /// choice; ABI 1.3's `KilnGraph.threads`).
    pub fn graph_compute(
        &self,
        device: u32,
        tensors: &[KilnTensor],
        ops: &[KilnOp],
        threads: u32,
    ) -> Result<(), BackendError> {
        dispatch!(self, h => h.graph_compute_threads(device, tensors, ops, threads))
    }

    pub fn synchronize(&self, device: u32) -> Result<(), BackendError> {
        dispatch!(self, h => h.synchronize(device))
    }

    /// Wraps host memory as a device buffer, if the plugin can (never
    /// across a process boundary).
    ///
    /// # Safety
    /// `ptr` must stay valid for `size` bytes until the buffer is freed.
    pub unsafe fn buffer_wrap_host(
        &self,
        device: u32,
        ptr: *mut u8,
        size: u64,
    ) -> Result<RawBuffer, BackendError> {
        match self {
            // SAFETY: the caller's promise, passed on.
            Handle::InProcess(h) => unsafe { h.buffer_wrap_host(device, ptr, size) },
            Handle::Worker(_) => Err(BackendError::unsupported(
                "a plugin in a worker process cannot wrap kiln's memory",
            )),
        }
    }
}

/// A negotiated backend and its devices.
pub struct Backend {
    handle: Handle,
    pub source: BackendSource,
    pub devices: Vec<DeviceInfo>,
    /// `graph_compute`/`synchronize` are serialised per device (ABI contract).
    device_locks: Vec<Mutex<()>>,
    pub stats: BackendStats,
    /// `supports_op` answers by device and op signature: the ABI makes
    /// them depend on the op, its parameters and its tensors' types and
    /// shapes only, so each is asked once.
    supports: Mutex<HashMap<(u32, OpSignature), bool>>,
}

/// What a `supports_op` answer depends on: the op kind and parameters and
/// each tensor's type, extents and strides (sources, then the destination).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OpSignature {
    pub kind: u32,
    pub params: [i32; kiln_plugin_api::abi::KILN_OP_PARAM_COUNT],
    pub tensors: Vec<(u32, [i64; 4], [u64; 4])>,
}

/// Answers kept per backend before the cache starts over.
const SUPPORTS_CACHE_ENTRIES: usize = 4096;

/// Why a backend could not be put to use.
#[derive(Debug, thiserror::Error)]
pub enum BackendLoadError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("cannot enumerate devices: {0}")]
    Devices(BackendError),
    #[error("{0}")]
    Worker(#[from] worker::StartError),
}

impl Backend {
    fn from_handle(handle: Handle, source: BackendSource) -> Result<Backend, BackendLoadError> {
        let devices = match &handle {
            Handle::InProcess(h) => {
                let n = h.device_count().map_err(BackendLoadError::Devices)?;
                (0..n)
                    .map(|d| h.device_info(d))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(BackendLoadError::Devices)?
            }
            Handle::Worker(w) => w.hello().devices.clone(),
        };
        Ok(Backend {
            handle,
            source,
            device_locks: devices.iter().map(|_| Mutex::new(())).collect(),
            devices,
            stats: BackendStats::default(),
            supports: Mutex::default(),
        })
    }

    /// Whether `device` runs an op of this signature, asked of the backend
    /// once (`ask` calls `supports_op`) and then remembered.
    pub fn supports(
        &self,
        device: u32,
        signature: OpSignature,
        ask: impl FnOnce() -> bool,
    ) -> bool {
        let key = (device, signature);
        if let Some(&yes) = self
            .supports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return yes;
        }
        self.count(&self.stats.supports_op_queries, 1);
        let yes = ask();
        let mut cache = self.supports.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= SUPPORTS_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, yes);
        yes
    }

    /// The CPU backend linked into kiln, negotiated once per process
    /// through the same entry point a plugin exports.
    pub fn builtin_cpu() -> Arc<Backend> {
        static CPU: OnceLock<Arc<Backend>> = OnceLock::new();
        CPU.get_or_init(|| {
            // SAFETY: `backend_init` is the CPU crate's entry point and the
            // host table is ours.
            let handle =
                unsafe { BackendHandle::negotiate(kiln_cpu::backend_init, host_services()) }
                    .expect("the built-in CPU backend negotiates with its own host");
            Arc::new(
                Backend::from_handle(Handle::InProcess(handle), BackendSource::Builtin)
                    .expect("the built-in CPU backend enumerates its device"),
            )
        })
        .clone()
    }

    /// The CPU backend with its fast kernels off: the scalar reference,
    /// which conformance compares every backend (the CPU's own kernels
    /// included) with.
    pub fn reference_cpu() -> Arc<Backend> {
        static CPU: OnceLock<Arc<Backend>> = OnceLock::new();
        CPU.get_or_init(|| {
            // SAFETY: as in `builtin_cpu`.
            let handle = unsafe {
                BackendHandle::negotiate(kiln_cpu::reference_backend_init, host_services())
            }
            .expect("the reference CPU backend negotiates with its own host");
            Arc::new(
                Backend::from_handle(Handle::InProcess(handle), BackendSource::Builtin)
                    .expect("the reference CPU backend enumerates its device"),
            )
        })
        .clone()
    }

    /// Opens and negotiates a plugin that passed preflight, in a worker
    /// process ([`worker::Isolation::Process`], with `run`'s limits and
    /// crash hook) or in this one. A library is started once per process
    /// and isolation; later loads return the same backend.
    pub fn load_plugin(
        plugin: &VerifiedPlugin,
        run: &PluginRun,
    ) -> Result<Arc<Backend>, BackendLoadError> {
        /// Loaded libraries by (canonical path, sha256, isolation).
        type Loaded = Mutex<HashMap<(PathBuf, String, worker::Isolation), Arc<Backend>>>;
        static LOADED: OnceLock<Loaded> = OnceLock::new();
        let loaded = LOADED.get_or_init(Default::default);
        let isolation = run.isolation_of(&plugin.manifest.name);
        let key = (
            std::fs::canonicalize(&plugin.library_path)
                .unwrap_or_else(|_| plugin.library_path.clone()),
            plugin.sha256.clone(),
            isolation,
        );
        let mut map = loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(&key) {
            return Ok(b.clone());
        }
        let handle = match isolation {
            worker::Isolation::Process => Handle::Worker(worker::Worker::start(
                &plugin.manifest.name,
                &plugin.library_path,
                run.limits,
                run.on_crash.clone(),
            )?),
            worker::Isolation::InProcess => {
                // SAFETY: the plugin passed preflight (hash, ABI, CPU
                // features, ELF sanity), and the user chose to trust it
                // in kiln's own process.
                let entry = unsafe { kiln_plugin_api::host::open_library(&plugin.library_path) }?;
                // SAFETY: `entry` is the library's `kiln_backend_init`.
                Handle::InProcess(unsafe { BackendHandle::negotiate(entry, host_services()) }?)
            }
        };
        let backend = Arc::new(Backend::from_handle(
            handle,
            BackendSource::Plugin {
                name: plugin.manifest.name.clone(),
                version: plugin.manifest.version.to_string(),
                sha256: plugin.sha256.clone(),
                library: plugin.library_path.clone(),
            },
        )?);
        map.insert(key, backend.clone());
        Ok(backend)
    }

    /// The generation of the backend's worker (0 in-process): it changes
    /// when a worker that died is replaced, and what the old one held is
    /// gone.
    pub fn generation(&self) -> u64 {
        self.handle.worker().map_or(0, |w| w.generation())
    }

    /// After a crash: starts a new worker when its backoff has passed (and
    /// the plugin is not quarantined). Whether a worker runs now; always
    /// true in-process.
    pub fn revive(&self) -> bool {
        self.handle.worker().is_none_or(|w| w.revive())
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The layout `device` wants weights of `dtype` in for matrix products
    /// ([`Model::load_for`](crate::model::Model::load_for) repacks them at
    /// load time), as the backend answers through the ABI (1.2); GGUF's
    /// layouts for a backend that does not say.
    pub fn weight_layout(
        &self,
        device: u32,
        dtype: kiln_plugin_api::DType,
    ) -> kiln_plugin_api::DType {
        self.handle.weight_layout(device, dtype)
    }

    pub fn is_builtin(&self) -> bool {
        matches!(self.source, BackendSource::Builtin)
    }

    /// The name users see: the plugin's registered name, or "cpu".
    pub fn name(&self) -> String {
        match &self.source {
            BackendSource::Builtin => "cpu".to_string(),
            BackendSource::Plugin { name, .. } => name.clone(),
        }
    }

    pub fn version(&self) -> String {
        match &self.source {
            BackendSource::Builtin => env!("CARGO_PKG_VERSION").to_string(),
            BackendSource::Plugin { version, .. } => version.clone(),
        }
    }

    /// What a cached score is keyed by: the exact build of the backend and
    /// the benchmark's method ([`score::METHOD`]).
    pub fn score_key(&self) -> String {
        let build = match &self.source {
            BackendSource::Builtin => format!("builtin-cpu-{}", env!("CARGO_PKG_VERSION")),
            BackendSource::Plugin { sha256, .. } => sha256.clone(),
        };
        score::cache_key(&build)
    }

    /// A stable key for device `d`: its UUID, or its name and index.
    pub fn device_key(&self, d: u32) -> String {
        let info = &self.devices[d as usize];
        if info.uuid != [0; 16] {
            info.uuid.iter().map(|b| format!("{b:02x}")).collect()
        } else {
            format!("{}#{d}", info.name)
        }
    }

    /// Holds the device's submission lock (see the ABI's threading contract).
    pub fn lock_device(&self, d: u32) -> MutexGuard<'_, ()> {
        self.device_locks[d as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn count(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// How plugins run: where (`[plugins.isolation]`), under which limits,
/// and who is told of a worker's crash.
#[derive(Clone, Default)]
pub struct PluginRun {
    pub config: kiln_registry::config::PluginRunConfig,
    pub limits: worker::Limits,
    pub on_crash: Option<worker::CrashHook>,
}

impl PluginRun {
    /// For the plugins of `registry`: `config.toml` beside it, and crashes
    /// recorded in it (and quarantines, after repeated ones).
    pub fn for_registry(registry: &Registry) -> PluginRun {
        let home = registry
            .path()
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        // The home's config, or the file `KILN_CONFIG` names, as every
        // other reader of it.
        let config = kiln_registry::config::Config::with_file(
            home,
            None,
            kiln_registry::config::Config::file_from_env(),
        );
        let mut run = PluginRun::from_config(&config.plugin_run);
        let path = registry.path().to_path_buf();
        let sha: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        if let Ok(active) = registry.active_plugins() {
            let mut m = sha.lock().unwrap_or_else(|p| p.into_inner());
            for p in active {
                m.insert(p.name, p.sha256);
            }
        }
        let on_crash: worker::CrashHook = Arc::new(move |c: &worker::Crash| {
            let sha256 = sha
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&c.plugin)
                .cloned()
                .unwrap_or_default();
            let recorded = Registry::open(&path).and_then(|mut r| {
                r.record_plugin_crash(&c.plugin, &sha256, &c.during, &c.cause, c.quarantined)
            });
            if let Err(e) = recorded {
                eprintln!("kiln: cannot record the crash of plugin {}: {e}", c.plugin);
            }
        });
        run.on_crash = Some(on_crash);
        run
    }

    /// As `[plugins]` says, telling no one of crashes.
    pub fn from_config(config: &kiln_registry::config::PluginRunConfig) -> PluginRun {
        let defaults = worker::Limits::default();
        PluginRun {
            config: config.clone(),
            limits: worker::Limits {
                call_timeout: config.call_timeout.unwrap_or(defaults.call_timeout),
                memory_limit: config.worker_memory.unwrap_or(defaults.memory_limit),
            },
            on_crash: None,
        }
    }

    pub fn isolation_of(&self, plugin: &str) -> worker::Isolation {
        match self.config.isolation_of(plugin) {
            kiln_registry::config::IsolationSetting::Process => worker::Isolation::Process,
            kiln_registry::config::IsolationSetting::InProcess => worker::Isolation::InProcess,
        }
    }
}

/// The backends kiln can use now: the built-in CPU first, then each active
/// plugin that still passes preflight and loads. Problems are collected, not
/// fatal: kiln always has the CPU.
pub struct BackendSet {
    pub backends: Vec<Arc<Backend>>,
    pub problems: Vec<String>,
}

impl BackendSet {
    /// Plugins run as `config.toml` beside the registry says
    /// ([`PluginRun::for_registry`]); quarantined ones are not loaded.
    pub fn load(registry: &Registry) -> BackendSet {
        let run = PluginRun::for_registry(registry);
        let mut backends = vec![Backend::builtin_cpu()];
        let mut problems = Vec::new();
        match registry.active_plugins() {
            Ok(plugins) => {
                for p in plugins {
                    if let Some(at) = &p.quarantined_at {
                        let last = registry
                            .plugin_crashes(Some(&p.name), 1)
                            .ok()
                            .and_then(|c| c.into_iter().next())
                            .map(|c| format!(" (last: during {}: {})", c.during, c.cause))
                            .unwrap_or_default();
                        problems.push(format!(
                            "plugin {} is quarantined since {at}: its worker process crashed repeatedly{last}; \
                             kiln runs without it. `kiln plugins release {}` tries it again",
                            p.label(),
                            p.name
                        ));
                        continue;
                    }
                    let loaded = crate::plugin::preflight(&p.manifest_path)
                        .map_err(BackendLoadError::from)
                        .and_then(|v| {
                            if v.sha256 != p.sha256 {
                                return Err(BackendLoadError::Preflight(PreflightError::Hash {
                                    path: v.library_path,
                                    expected: p.sha256.clone(),
                                    actual: v.sha256,
                                }));
                            }
                            Backend::load_plugin(&v, &run)
                        });
                    match loaded {
                        Ok(b) => backends.push(b),
                        Err(e) => problems.push(format!(
                            "plugin {} is active but unusable: {e}; run `kiln plugins disable {}` or re-add it",
                            p.label(),
                            p.name
                        )),
                    }
                }
            }
            Err(e) => problems.push(format!("cannot list active plugins: {e}")),
        }
        BackendSet { backends, problems }
    }
}

/// One device with its score.
#[derive(Clone, Debug, Serialize)]
pub struct RankedDevice {
    pub backend: String,
    pub device: u32,
    pub score: f64,
    pub cached: bool,
    pub measurement: serde_json::Value,
}

/// Why no device could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ChooseError {
    #[error(transparent)]
    Registry(#[from] kiln_registry::RegistryError),
    #[error(
        "no usable backend device {name}; available (`kiln backends`): {}",
        available.join(", ")
    )]
    NoSuchBackend {
        name: String,
        available: Vec<String>,
    },
    #[error("no usable device")]
    NoDevice,
}

/// A device chosen to run models on.
pub struct Chosen {
    pub executor: exec::Executor,
    /// How the device is named in messages, status and metrics:
    /// `BACKEND device N (NAME)`.
    pub label: String,
}

/// The device `name` names (`BACKEND` for its best device, `BACKEND:N`
/// for device N), or the best-scoring one of all: the active
/// plugins and the built-in CPU, scored from the registry's cache or
/// measured now. Problems with plugins that could not be used go to
/// `warn`, progress to `progress`.
pub fn choose(
    config: &kiln_registry::config::Config,
    name: Option<&str>,
    warn: impl FnMut(&str),
    progress: impl FnMut(&str),
) -> Result<Chosen, ChooseError> {
    let (set, ranked) = ranked_for(config, name, warn, progress)?;
    let named = name.map(split_device);
    let pick = match named {
        Some((backend, device)) => ranked
            .iter()
            .find(|r| r.backend == backend && device.is_none_or(|d| r.device == d))
            .ok_or_else(|| ChooseError::NoSuchBackend {
                name: name.unwrap_or_default().to_string(),
                available: ranked
                    .iter()
                    .map(|r| format!("{}:{}", r.backend, r.device))
                    .collect(),
            })?,
        None => ranked.first().ok_or(ChooseError::NoDevice)?,
    };
    Ok(chosen(&set, pick))
}

/// [`choose`] for the model file at `path`. With `name`, that device;
/// otherwise the best-scoring device that runs the model's weight
/// products (every matrix product over its weights, by the device's own
/// answer for the model's types and shapes: one that left them to the CPU
/// would move every activation through host memory) and that `fits` (a
/// memory budget); the built-in CPU runs everything. Each better device
/// passed over is said on `warn`. Only the file's header is read (an
/// encrypted file's weights are not decrypted); a file whose header
/// cannot be read (an encrypted one without its key) gets [`choose`]'s
/// device.
pub fn choose_for(
    config: &kiln_registry::config::Config,
    name: Option<&str>,
    path: &std::path::Path,
    fits: impl Fn(&Arc<Backend>, u32) -> bool,
    mut warn: impl FnMut(&str),
    progress: impl FnMut(&str),
) -> Result<Chosen, ChooseError> {
    let header = crate::gguf::GgufFile::open_header(path).ok().and_then(|f| {
        let cfg = crate::model::ModelConfig::from_gguf(&f).ok()?;
        Some((f, cfg))
    });
    let (Some((file, cfg)), None) = (header, name) else {
        return choose(config, name, warn, progress);
    };
    let (set, ranked) = ranked_for(config, None, &mut warn, progress)?;
    // One decode step's graph: every product over the weights is in it.
    let (b, _, _) = crate::model::forward::build(
        &cfg,
        &file,
        2,
        1,
        1,
        crate::model::forward::LogitsFor::Last,
        crate::model::forward::Attention::new(
            crate::model::forward::ATTENTION_BLOCK,
            crate::model::forward::KvCache::default(),
        ),
    );
    let graph = exec::Graph {
        storages: smallvec::SmallVec::new(),
        tensors: b.tensors,
        ops: b.ops,
    };
    let model = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    for r in &ranked {
        let Some(backend) = set.backends.iter().find(|b| b.name() == r.backend) else {
            continue;
        };
        if backend.is_builtin() {
            return Ok(chosen(&set, r));
        }
        let exec = exec::Executor::new(backend.clone(), r.device);
        let plan = exec.plan(&graph);
        let missing: std::collections::BTreeSet<String> = (graph.ops.iter().zip(plan))
            .filter(|(op, on)| {
                !on && op.kind == kiln_plugin_api::OpKind::MulMat
                    && graph.tensors[op.src[0]].storage == crate::model::forward::WEIGHTS
            })
            .map(|(op, _)| graph.tensors[op.src[0]].desc.dtype.to_string())
            .collect();
        let key = format!("{}:{}", r.backend, r.device);
        if !missing.is_empty() {
            warn(&format!(
                "{key} scores {:.2} but runs no products of {model}'s {} weights: it runs on the next device",
                r.score,
                missing.into_iter().collect::<Vec<_>>().join(", ")
            ));
        } else if !fits(backend, r.device) {
            warn(&format!(
                "{key} scores {:.2} but its memory budget cannot hold {model}: it runs on the next device",
                r.score
            ));
        } else {
            return Ok(chosen(&set, r));
        }
    }
    Err(ChooseError::NoDevice)
}

/// `NAME:N` names device N of a backend, `NAME` its best one.
fn split_device(name: &str) -> (&str, Option<u32>) {
    match name.rsplit_once(':') {
        Some((b, d)) if d.parse::<u32>().is_ok() => (b, d.parse::<u32>().ok()),
        _ => (name, None),
    }
}

/// The usable backends and their devices, best first (only the named
/// backend's, when `name` names one that is there).
fn ranked_for(
    config: &kiln_registry::config::Config,
    name: Option<&str>,
    mut warn: impl FnMut(&str),
    progress: impl FnMut(&str),
) -> Result<(BackendSet, Vec<RankedDevice>), ChooseError> {
    let mut registry = Registry::open_home(config)?;
    let set = BackendSet::load(&registry);
    for p in &set.problems {
        warn(p);
    }
    // A named backend's devices are the only ones measured (when it is
    // there: otherwise every device, for the error's list).
    let known = name
        .map(split_device)
        .filter(|(b, _)| set.backends.iter().any(|x| x.name() == *b));
    let measured = BackendSet {
        backends: (set.backends.iter())
            .filter(|b| known.is_none_or(|(n, _)| b.name() == n))
            .cloned()
            .collect(),
        problems: Vec::new(),
    };
    let (ranked, problems) = rank_devices(&measured, &mut registry, false, progress);
    for p in &problems {
        warn(p);
    }
    Ok((set, ranked))
}

/// The executor and label of ranked device `pick` of `set`.
fn chosen(set: &BackendSet, pick: &RankedDevice) -> Chosen {
    let b = set
        .backends
        .iter()
        .find(|b| b.name() == pick.backend)
        .expect("ranked devices come from the set")
        .clone();
    let label = format!(
        "{} device {} ({})",
        b.name(),
        pick.device,
        b.devices[pick.device as usize].name
    );
    Chosen {
        executor: exec::Executor::new(b, pick.device),
        label,
    }
}

/// Scores every device of every backend (from the registry's cache, or by
/// measuring now and caching) and returns them best first. Ties keep the
/// set's order, so the built-in CPU wins a tie.
pub fn rank_devices(
    set: &BackendSet,
    registry: &mut Registry,
    remeasure: bool,
    mut progress: impl FnMut(&str),
) -> (Vec<RankedDevice>, Vec<String>) {
    let mut ranked = Vec::new();
    let mut problems = Vec::new();
    for b in &set.backends {
        for d in 0..b.devices.len() as u32 {
            let (key, dev_key) = (b.score_key(), b.device_key(d));
            let cached = if remeasure {
                None
            } else {
                registry.score(&key, &dev_key).ok().flatten()
            };
            let (score, measurement, was_cached) = match cached {
                Some(s) => (s.score, s.details, true),
                None => {
                    progress(&format!(
                        "measuring {} device {d} ({})…",
                        b.name(),
                        b.devices[d as usize].name
                    ));
                    match score::measure(b, d) {
                        Ok(m) => {
                            let details = serde_json::to_value(&m).unwrap_or_default();
                            if let Err(e) =
                                registry.store_score(&key, &dev_key, m.score(), &details)
                            {
                                problems.push(format!(
                                    "cannot cache the score of {} device {d}: {e}",
                                    b.name()
                                ));
                            }
                            (m.score(), details, false)
                        }
                        // Scored 0, not cached: chosen only when named
                        // (or when nothing else is there).
                        Err(e) => {
                            problems.push(format!(
                                "benchmark failed on {} device {d}: {e}; it scores 0 and is used \
                                 only when named (`--backend {}`)",
                                b.name(),
                                b.name()
                            ));
                            (0.0, serde_json::Value::Null, false)
                        }
                    }
                }
            };
            ranked.push(RankedDevice {
                backend: b.name(),
                device: d,
                score,
                cached: was_cached,
                measurement,
            });
        }
    }
    // Stable sort: equal scores keep the set's order.
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score));
    (ranked, problems)
}
