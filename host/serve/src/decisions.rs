//! Policy decisions made while serving, kept as the policy layer promises:
//! each ranking call is logged with its exact input and output bytes (so
//! `kiln policy replay ID` re-runs it bit for bit) and counted against the
//! circuit breaker in the registry, so a trip disables the policy there
//! and outlives the process. The writes happen on a thread of their own:
//! a registry busy with another process never holds up a completion.

use crate::metrics::{Metrics, labels};
use kiln_registry::Registry;
use kiln_registry::config::Config;
use kiln_runtime::policy::{self, Recorded};
use kiln_sandbox::PolicyKind;
use kiln_sandbox::breaker::{Call, Ranker};
use serde::Serialize;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

/// What the log has done, for `kiln/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LogStatus {
    /// Decisions written to the registry.
    pub logged: u64,
    pub last_decision_id: Option<i64>,
    /// Trips the registry recorded (the policy is disabled there).
    pub trips: u64,
    /// Why the last write failed, if it did.
    pub last_error: Option<String>,
}

struct Entry {
    call: Call,
    ranker: Arc<Ranker>,
    done: Sender<Result<Recorded, String>>,
}

/// A decision on its way to the log; cheap to clone.
#[derive(Clone)]
pub struct PendingDecision(Arc<Mutex<PendingState>>);

enum PendingState {
    Waiting(Receiver<Result<Recorded, String>>),
    Written(Option<i64>),
}

impl PendingDecision {
    /// The decision's id, once written (`None` before, or if the write
    /// failed); never waits.
    pub fn id(&self) -> Option<i64> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let PendingState::Waiting(rx) = &*s {
            match rx.try_recv() {
                Ok(r) => *s = PendingState::Written(r.ok().map(|r| r.decision_id)),
                Err(std::sync::mpsc::TryRecvError::Empty) => return None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    *s = PendingState::Written(None)
                }
            }
        }
        match &*s {
            PendingState::Written(id) => *id,
            PendingState::Waiting(_) => None,
        }
    }
}

/// The handle serving code holds; cheap to clone.
#[derive(Clone)]
pub struct DecisionLog {
    tx: Sender<Entry>,
    status: Arc<Mutex<LogStatus>>,
}

impl DecisionLog {
    /// Starts the writer for the registry of `config`'s home; `metrics`
    /// counts calls and trips.
    pub fn start(config: Config, metrics: Arc<Metrics>) -> DecisionLog {
        let (tx, rx) = channel::<Entry>();
        let status = Arc::new(Mutex::new(LogStatus::default()));
        let shared = status.clone();
        std::thread::Builder::new()
            .name("kiln-decisions".into())
            .spawn(move || write_loop(&config, &metrics, &shared, rx))
            .expect("spawn the decision log");
        DecisionLog { tx, status }
    }

    /// Queues `call` (made through `ranker`) for the log. A trip the
    /// registry records opens `ranker`'s breaker too.
    pub fn log(&self, call: Call, ranker: Arc<Ranker>) -> PendingDecision {
        let (done, rx) = channel();
        // The writer thread lives as long as the process.
        let _ = self.tx.send(Entry { call, ranker, done });
        PendingDecision(Arc::new(Mutex::new(PendingState::Waiting(rx))))
    }

    pub fn status(&self) -> LogStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn write_loop(config: &Config, metrics: &Metrics, status: &Mutex<LogStatus>, rx: Receiver<Entry>) {
    let mut registry: Option<Registry> = None;
    // With encryption at rest, decisions (which hold the user's code) are
    // logged encrypted or not at all.
    let seal = config
        .encrypt_at_rest
        .then(|| kiln_runtime::store::sealing_keys(config).map_err(|e| e.to_string()));
    while let Ok(Entry { call, ranker, done }) = rx.recv() {
        let outcome = if call.error.is_none() { "ok" } else { "error" };
        metrics
            .policy_calls
            .get_or_create(&labels(&[("policy", &call.policy), ("outcome", outcome)]))
            .inc();
        if let Some(fuel) = call.fuel_used {
            metrics
                .policy_fuel
                .get_or_create(&labels(&[("policy", &call.policy)]))
                .inc_by(fuel);
        }
        let keys = match &seal {
            None => Ok(None),
            Some(Ok(k)) => Ok(Some(k)),
            Some(Err(e)) => Err(format!("not logged: encryption at rest is on and {e}")),
        };
        let result = keys.and_then(|keys| match &mut registry {
            Some(r) => policy::record(r, &call, PolicyKind::Rank, keys),
            None => Registry::open_home(config)
                .map_err(|e| e.to_string())
                .and_then(|mut r| {
                    let recorded = policy::record(&mut r, &call, PolicyKind::Rank, keys);
                    registry = Some(r);
                    recorded
                }),
        });
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            match &result {
                Ok(rec) => {
                    s.logged += 1;
                    s.last_decision_id = Some(rec.decision_id);
                    s.trips += u64::from(rec.tripped);
                }
                Err(e) => s.last_error = Some(e.clone()),
            }
        }
        if let Ok(rec) = &result
            && rec.tripped
        {
            // The persisted count reached the limit (failures from before a
            // restart count too): stop calling the policy here as well.
            ranker.trip(format!(
                "{} was disabled by the circuit breaker: {}",
                call.policy,
                call.error.as_deref().unwrap_or("it failed")
            ));
            metrics
                .policy_trips
                .get_or_create(&labels(&[("policy", &call.policy)]))
                .inc();
        }
        metrics
            .policy_breaker_open
            .get_or_create(&labels(&[("policy", &call.policy)]))
            .set(i64::from(ranker.is_tripped()));
        let _ = done.send(result);
    }
}
