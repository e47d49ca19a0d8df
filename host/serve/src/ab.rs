//! A/B experiments where completions are served. While an experiment
//! runs on the served model's name, each unit (the language server's
//! `abUnit` setting, else its workspace root; an HTTP request's `user`,
//! else its client's address) gets its arm once (sticky, by the registry's
//! hash) and its completions come from that arm's version. Every
//! completion has an id the editor reports back when the user accepts it
//! (`kiln.accepted` in the language server, `POST /v1/feedback` over
//! HTTP); one not accepted before the next request for its document (or
//! client) is superseded. The outcomes go to the registry, and the
//! experiment stops itself when a winner is decided or the guardrail trips
//! (the control is then kept).

use crate::engine::{Engine, Loaded};
use crate::fim::FimTemplate;
use kiln_registry::Registry;
use kiln_registry::config::Config;
use kiln_registry::experiments::{Arm, Experiment};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the registry is asked whether an experiment runs.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Outcomes between two looks at the decision.
const DECIDE_EVERY: u32 = 10;

/// A completion served in an experiment, recorded by the reply (on the
/// engine thread) and written to the registry by the server's loop.
pub struct Served {
    experiment: Experiment,
    arm: Arm,
    unit: String,
    completion: String,
    latency_ms: Option<f64>,
    error: bool,
}

/// What a reply needs to say which completion it is and to record it.
pub struct Tag {
    pub completion: String,
    /// The experiment, the arm and its version, where one runs.
    pub arm: Option<(Experiment, Arm, String)>,
    log: Arc<Mutex<Vec<Served>>>,
}

impl Tag {
    /// The item's command and the experiment for the reply's metadata.
    pub fn command(&self) -> serde_json::Value {
        serde_json::json!({
            "title": "kiln: accepted",
            "command": "kiln.accepted",
            "arguments": [{"completion": self.completion}],
        })
    }

    pub fn meta(&self) -> serde_json::Value {
        match &self.arm {
            Some((e, arm, unit)) => serde_json::json!({
                "experiment": e.name, "arm": arm, "version": e.version(*arm), "unit": unit,
            }),
            None => serde_json::Value::Null,
        }
    }

    /// Records the served completion (`latency_ms`, or an error).
    pub fn served(self, latency_ms: Option<f64>, error: bool) {
        if let Some((experiment, arm, unit)) = self.arm {
            let s = Served {
                experiment,
                arm,
                unit,
                completion: self.completion,
                latency_ms,
                error,
            };
            self.log.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        }
    }
}

#[derive(Default)]
pub struct Ab {
    registry: Option<Registry>,
    /// The running experiment on the served model, and when the registry
    /// was last asked.
    current: Option<Experiment>,
    checked: Option<Instant>,
    /// The units' arms in it.
    arms: HashMap<String, Arm>,
    /// Versions loaded for arms, by `name@version`.
    loaded: HashMap<String, Arc<Loaded>>,
    /// The last completion shown per document.
    shown: HashMap<String, String>,
    served: Arc<Mutex<Vec<Served>>>,
    next: u64,
    since_decision: u32,
}

/// What the server reports to the editor's log.
pub type Log<'a> = &'a mut dyn FnMut(u8, &str);

impl Ab {
    fn registry(&mut self, config: &Config) -> Option<&mut Registry> {
        if self.registry.is_none() {
            self.registry = Registry::open_home(config).ok();
        }
        self.registry.as_mut()
    }

    /// The model to complete `doc` (a document, or the client) with and
    /// the completion's tag (its id `completion`, else a new one): the
    /// arm's version while an experiment runs on the served model, else
    /// the served model. The document's last completion in the experiment,
    /// if not accepted, is superseded; outside one nothing is written.
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        &mut self,
        config: &Config,
        engine: &Engine,
        fim: Option<FimTemplate>,
        unit: &str,
        doc: &str,
        completion: Option<String>,
        log: Log<'_>,
    ) -> (Arc<Loaded>, Tag) {
        self.flush(config, log);
        self.next += 1;
        let completion =
            completion.unwrap_or_else(|| format!("lsp-{}-{}", std::process::id(), self.next));
        let served = engine.loaded();
        let tag = Tag {
            completion,
            arm: None,
            log: self.served.clone(),
        };
        let Some((e, arm)) = self.arm(config, &served.id, unit) else {
            return (served, tag);
        };
        let version = e.version(arm).to_string();
        let loaded = match self.version(config, engine, fim, &served, &version) {
            Ok(l) => l,
            Err(why) => {
                log(
                    1,
                    &format!(
                        "kiln: experiment {}: {version} cannot be loaded ({why}); serving {} instead",
                        e.name, served.id
                    ),
                );
                let failed = Tag {
                    completion: tag.completion.clone(),
                    arm: Some((e, arm, unit.to_string())),
                    log: self.served.clone(),
                };
                failed.served(None, true);
                return (served, tag);
            }
        };
        // The document's last completion in the experiment, not accepted
        // by now, was passed over.
        if let Some(prev) = self.shown.insert(doc.to_string(), tag.completion.clone())
            && let Some(r) = self.registry(config)
        {
            let _ = r.record_superseded(&prev);
            self.since_decision += 1;
        }
        (
            loaded,
            Tag {
                arm: Some((e, arm, unit.to_string())),
                ..tag
            },
        )
    }

    /// The experiment running on the served model (`served`, its
    /// `name@version`; the registry asked every few seconds) and `unit`'s
    /// arm in it.
    fn arm(&mut self, config: &Config, served: &str, unit: &str) -> Option<(Experiment, Arm)> {
        if self.checked.is_none_or(|t| t.elapsed() >= CHECK_EVERY) {
            self.checked = Some(Instant::now());
            let running = (served.split_once('@'))
                .and_then(|(m, _)| self.registry(config)?.running_experiment(m).ok().flatten());
            if running.as_ref().map(|e| e.id) != self.current.as_ref().map(|e| e.id) {
                self.arms.clear();
                self.loaded.clear();
            }
            self.current = running;
        }
        let e = self.current.clone()?;
        let arm = match self.arms.get(unit) {
            Some(&a) => a,
            None => {
                let a = self.registry(config)?.assign(&e, unit).ok()?;
                self.arms.insert(unit.to_string(), a);
                a
            }
        };
        Some((e, arm))
    }

    /// The model of `version`: the served one, or loaded once beside it.
    fn version(
        &mut self,
        config: &Config,
        engine: &Engine,
        fim: Option<FimTemplate>,
        served: &Arc<Loaded>,
        version: &str,
    ) -> Result<Arc<Loaded>, String> {
        if served.id == version {
            return Ok(served.clone());
        }
        if let Some(l) = self.loaded.get(version) {
            return Ok(l.clone());
        }
        let (id, path) = kiln_runtime::store::resolve_served(config, Some(version))
            .map_err(|e| e.to_string())?;
        let l = Arc::new(Loaded::load(
            id,
            path,
            fim,
            engine.target(),
            engine.device(),
        )?);
        self.loaded.insert(version.to_string(), l.clone());
        Ok(l)
    }

    /// `kiln.accepted`: the editor kept `chars` characters (all when not
    /// said) of `completion`. False when it is not one this server showed
    /// in a running experiment.
    pub fn accepted(
        &mut self,
        config: &Config,
        completion: &str,
        chars: Option<u64>,
        log: Log<'_>,
    ) -> bool {
        self.flush(config, log);
        self.shown.retain(|_, c| c != completion);
        let found = self
            .registry(config)
            .and_then(|r| r.record_accepted(completion, chars).ok())
            .unwrap_or(false);
        if found {
            self.since_decision += 1;
            self.decide(config, log);
        }
        found
    }

    /// The editor said `completion` was not taken (shown and passed over):
    /// it counts as superseded.
    pub fn rejected(&mut self, config: &Config, completion: &str, log: Log<'_>) -> bool {
        self.flush(config, log);
        self.shown.retain(|_, c| c != completion);
        let found = self
            .registry(config)
            .and_then(|r| r.record_superseded(completion).ok())
            .unwrap_or(false);
        if found {
            self.since_decision += 1;
            self.decide(config, log);
        }
        found
    }

    /// Writes what the replies recorded, and looks at the decision every
    /// few outcomes.
    pub fn flush(&mut self, config: &Config, log: Log<'_>) {
        let served: Vec<Served> =
            std::mem::take(&mut *self.served.lock().unwrap_or_else(|p| p.into_inner()));
        if served.is_empty() {
            return;
        }
        if let Some(r) = self.registry(config) {
            for s in &served {
                let _ = r.record_served(
                    &s.experiment,
                    s.arm,
                    &s.unit,
                    &s.completion,
                    s.latency_ms,
                    s.error,
                );
            }
        }
        self.since_decision += served.len() as u32;
        self.decide(config, log);
    }

    /// Stops the experiment when a winner is decided or the guardrail
    /// trips.
    fn decide(&mut self, config: &Config, log: Log<'_>) {
        if self.since_decision < DECIDE_EVERY {
            return;
        }
        self.since_decision = 0;
        let Some(e) = self.current.clone() else {
            return;
        };
        let Some(r) = self.registry(config) else {
            return;
        };
        let Ok(status) = r.experiment_status(&e) else {
            return;
        };
        let a = &status.analysis;
        let (winner, reason) = match (&a.guardrail, a.winner) {
            (Some(g), _) => (
                Arm::A,
                format!("guardrail: {g}; {} kept (rolled back to the control)", e.a),
            ),
            (None, Some(w)) => (
                w,
                format!(
                    "decided: {} wins on {} (likelihood ratio {:.1} over {:.0})",
                    e.version(w),
                    a.metric.as_str(),
                    a.likelihood_ratio.unwrap_or(0.0),
                    a.threshold
                ),
            ),
            (None, None) => return,
        };
        if r.stop_experiment(&e.name, Some(winner), &reason, "kiln serve")
            .is_ok()
        {
            log(3, &format!("kiln: experiment {} stopped: {reason}", e.name));
            self.current = None;
            self.arms.clear();
            self.loaded.clear();
        }
    }
}
