//! Starting a service: the model and device to serve, the engine, and the
//! ranking policy, shared by the language server and the HTTP API.

use crate::Settings;
use crate::engine::{Engine, EngineOptions, Loaded};
use crate::fim::FimTemplate;
use crate::metrics::Metrics;
use crate::pool::{MemberSpec, Pool, Template};
use kiln_registry::Registry;
use kiln_registry::config::Config;
use kiln_runtime::backend::{self, Chosen};
use kiln_runtime::store;
use kiln_sandbox::breaker::Ranker;
use std::sync::Arc;

/// What `kiln serve` was asked to serve.
#[derive(Clone)]
pub struct ServeSpec {
    pub config: Config,
    /// A GGUF path or registered name; `None`: the registry's active model.
    pub model: Option<String>,
    /// `--model` given again: more models, served by name and behind the
    /// first in its route when no `[[routes]]` say otherwise.
    pub more_models: Vec<String>,
    pub backend: Option<String>,
    pub n_ctx: Option<usize>,
    /// `--kv-type`: every model's KV cache type (else `config.toml`'s).
    pub kv_type: Option<kiln_plugin_api::DType>,
    pub settings: Settings,
    /// `--draft MODEL`: a draft model of the same vocabulary (a GGUF path
    /// or registered name) for speculative decoding.
    pub draft_model: Option<String>,
    /// Where `/metrics` is served beside the language server, if anywhere.
    pub metrics_address: Option<String>,
    /// `--max-memory`, in MiB: the pool's budget (over `[pool]
    /// max_memory_mb`).
    pub max_memory_mb: Option<u64>,
    /// `--adapter`: a LoRA adapter file and its label, applied at run time
    /// to the first model, which is then served as `MODEL+LABEL` (the
    /// other models take theirs from `[models.NAME] adapter`).
    pub adapter: Option<(std::path::PathBuf, String)>,
}

/// Resolves the models and backend and starts the pool, its first
/// model loaded on an engine counting into `metrics`; the others
/// (`--model` again, `[models.NAME]`) load when first asked for.
pub fn start_pool(
    spec: &ServeSpec,
    fim: Option<FimTemplate>,
    metrics: Arc<Metrics>,
) -> Result<Pool, String> {
    // `kiln serve` without --model, with [models] and no active model:
    // the first route's first model, with its entry's adapter.
    let mut spec = spec.clone();
    let mut chosen: Option<(String, Option<String>)> = None;
    if spec.model.is_none()
        && !spec.config.models.is_empty()
        && store::resolve_served(&spec.config, None).is_err()
    {
        let name = (spec.config.routes.first())
            .and_then(|r| r.models.first())
            .or_else(|| spec.config.models.keys().next())
            .cloned()
            .unwrap_or_default();
        if let Some(m) = spec.config.models.get(&name) {
            spec.model = Some(m.model.clone());
            // Served by its name, with its entry's adapter, unless the
            // command line's adapter makes it another model.
            if spec.adapter.is_none() {
                if let Some(a) = &m.adapter {
                    let resolved = store::resolve_adapter(&spec.config, a)
                        .map_err(|e| format!("[models.{name}] adapter: {e}"))?;
                    spec.adapter = Some(resolved);
                }
                chosen = Some((name, m.adapter.clone()));
            }
        }
    }
    let spec = &spec;
    let mut others = Vec::new();
    for name in &spec.more_models {
        let (id, _) = store::resolve_served(&spec.config, Some(name))
            .map_err(|e| format!("--model {name}: {e}"))?;
        others.push(MemberSpec {
            id,
            source: name.clone(),
            backend: None,
            n_ctx: spec.n_ctx,
            keep_alive: None,
            mlock: spec.config.pool.mlock.unwrap_or(false),
            threads: None,
            adapter: None,
        });
    }
    let (engine, template) = start_engine(spec, fim, metrics.clone())?;
    let loaded = engine.loaded();
    // The first model answers to its [models] name too (not once an
    // adapter makes it another model: `MODEL+LABEL`).
    let (first_id, adapter) = match (&chosen, &spec.adapter) {
        (Some((name, adapter)), _) => (name.clone(), adapter.clone()),
        (None, Some((file, _))) => (loaded.id.clone(), Some(file.display().to_string())),
        (None, None) => (
            entry_for(&spec.config, &loaded.path)
                .map_or_else(|| loaded.id.clone(), |(name, _)| name.clone()),
            None,
        ),
    };
    let entry = spec.config.models.get(&first_id);
    let mlock = (entry.and_then(|m| m.mlock))
        .or(spec.config.pool.mlock)
        .unwrap_or(false);
    let first = MemberSpec {
        id: first_id,
        source: spec
            .model
            .clone()
            .unwrap_or_else(|| loaded.path.display().to_string()),
        backend: spec.backend.clone(),
        n_ctx: spec.n_ctx,
        keep_alive: None,
        mlock,
        threads: entry.and_then(|m| m.threads),
        adapter,
    };
    Pool::start(
        &spec.config,
        (first, engine),
        others,
        template,
        metrics,
        spec.max_memory_mb,
    )
}

/// CPU threads from which a pool's models run at once by default
/// (`[pool] parallel_models`).
pub const PARALLEL_FROM: usize = 8;

/// Resolves the model and backend and starts an engine counting into
/// `metrics`; what the pool's other engines are made with.
/// The `[models]` entry that serves the model file `path` as it is (with
/// no adapter), if one does.
fn entry_for<'a>(
    config: &'a kiln_registry::config::Config,
    path: &std::path::Path,
) -> Option<(&'a String, &'a kiln_registry::config::ModelEntry)> {
    (config.models.iter()).find(|(_, m)| {
        m.adapter.is_none()
            && store::resolve_served(config, Some(&m.model)).is_ok_and(|(_, p)| p == path)
    })
}

fn start_engine(
    spec: &ServeSpec,
    fim: Option<FimTemplate>,
    metrics: Arc<Metrics>,
) -> Result<(Engine, Template), String> {
    let (id, path) =
        store::resolve_served(&spec.config, spec.model.as_deref()).map_err(|e| e.to_string())?;
    let threads = entry_for(&spec.config, &path).and_then(|(_, m)| m.threads);
    let Chosen {
        executor: exec,
        label,
    } = backend::choose_for(
        &spec.config,
        spec.backend.as_deref(),
        &path,
        |_, _| true,
        |w| eprintln!("kiln: warning: {w}"),
        |m| eprintln!("kiln: {m}"),
    )
    .map_err(|e| e.to_string())?;
    if spec.kv_type.is_none() {
        // The KV cache's type comes from config.toml: it must be usable.
        spec.config.require_valid()?;
    }
    let (id, adapter) = match &spec.adapter {
        Some((file, label)) => (format!("{id}+{label}"), Some(file.as_path())),
        None => (id, None),
    };
    let loaded = Loaded::load_adapted(id, path, adapter, fim, &exec.target, exec.device)?;
    let draft_model = match &spec.draft_model {
        None => None,
        Some(name) => {
            let (id, path) = store::resolve_served(&spec.config, Some(name))
                .map_err(|e| format!("--draft {name}: {e}"))?;
            let d = Loaded::load(id, path, None, &exec.target, exec.device)
                .map_err(|e| format!("--draft {name}: {e}"))?;
            kiln_runtime::model::generate::same_vocabulary(&loaded.tok, &d.tok)
                .map_err(|e| format!("--draft {name}: {e}"))?;
            Some(d)
        }
    };
    let kv_types = crate::engine::KvTypes {
        forced: spec.kv_type,
        config: spec.config.kv_cache.clone(),
    };
    // The models take turns (an inline completion first) unless the
    // machine has the cores to run them at once.
    let parallel = spec.config.pool.parallel_models.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, usize::from) >= PARALLEL_FROM
    });
    let gate = (!parallel).then(|| Arc::new(crate::engine::Gate::default()));
    let template = Template {
        target: exec.target.clone(),
        device: exec.device,
        backend_label: label.clone(),
        kv_types: kv_types.clone(),
        engine: spec.config.engine,
        draft: spec.settings.draft,
        draft_max: spec.settings.draft_max,
        fim,
        gate: gate.clone(),
        chosen_per_model: spec.backend.is_none(),
    };
    let engine = Engine::start(
        loaded,
        EngineOptions {
            target: exec.target.clone(),
            device: exec.device,
            backend_label: label,
            n_ctx: spec.n_ctx,
            kv_types,
            completion_cache_entries: 256,
            metrics,
            announce: true,
            gate,
            draft: spec.settings.draft,
            draft_max: spec.settings.draft_max,
            draft_model,
            engine: spec.config.engine,
            threads,
        },
    );
    Ok((engine, template))
}

/// The active ranking policy from the registry, in a breaker; the built-in
/// ranker when there is none or it cannot be loaded (said on `log`). The
/// parameters the policy declares (and the built-in ranker's, which are
/// `bm25-recency`'s) take their values from `[policies.params]`; a value
/// that cannot be used keeps its default and is said on `log`.
pub fn ranker(config: &Config, log: &mut dyn FnMut(String)) -> Ranker {
    let (ranker, problems) = ranker_checked(config, log);
    for p in problems {
        log(p);
    }
    ranker
}

/// [`ranker`], with the `[policies.params]` entries that cannot be used
/// returned (each naming the file, the table, the key and the range)
/// rather than logged.
pub fn ranker_checked(config: &Config, log: &mut dyn FnMut(String)) -> (Ranker, Vec<String>) {
    let (ranker, problems) = policy_ranker(config, log).with_params(&config.policy_params);
    let file = config.config_file.display();
    (
        ranker,
        problems
            .into_iter()
            .map(|p| format!("{file}: {p}"))
            .collect(),
    )
}

fn policy_ranker(config: &Config, log: &mut dyn FnMut(String)) -> Ranker {
    let policy = (|| -> Result<Option<Arc<kiln_sandbox::Policy>>, String> {
        let registry = Registry::open_home(config).map_err(|e| e.to_string())?;
        let Some(rec) = registry.active_policy("rank").map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let (bytes, rec) = kiln_runtime::policy::resolve(config, &registry, &rec.label())?;
        let limits = kiln_runtime::policy::limits_of(rec.as_ref(), &bytes);
        let policy = kiln_runtime::policy::sandbox(config)
            .load(&bytes, limits)
            .map_err(|e| e.to_string())?;
        Ok(Some(Arc::new(policy)))
    })();
    match policy {
        Ok(p) => {
            if let Some(p) = &p {
                log(format!("ranking context with policy {}", p.meta.label()));
            }
            Ranker::new(p, kiln_sandbox::breaker::DEFAULT_THRESHOLD)
        }
        Err(e) => {
            log(format!(
                "the ranking policy cannot be used ({e}); using the built-in ranker"
            ));
            Ranker::new(None, kiln_sandbox::breaker::DEFAULT_THRESHOLD)
        }
    }
}
