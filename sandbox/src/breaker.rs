//! Ranking with a safety net: a policy's scores when it behaves, the
//! built-in ranker's when it does not, and a circuit breaker that stops
//! calling a policy after repeated failures until it is reset. Each call
//! comes back with its [`Call`] record (the exact input and output bytes),
//! which the host logs so the decision replays bit for bit, and counts so
//! a trip outlives the process (the registry disables the policy).

use crate::abi::{self, RankInput};
use crate::runtime::Policy;
use crate::{PolicyError, builtin};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Consecutive failures that trip the breaker, here and in the registry's
/// persisted count: kiln's one definition of the limit.
pub const DEFAULT_THRESHOLD: u32 = 3;

/// One call of a policy, as the decision log keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// `name@version`.
    pub policy: String,
    pub sha256: String,
    /// The input exactly as the policy received it.
    pub input: Vec<u8>,
    /// The policy's output bytes, when it returned any.
    pub output: Option<Vec<u8>>,
    /// Why the call failed (a trap, fuel, the deadline, an output that
    /// does not check), if it did.
    pub error: Option<String>,
    pub fuel_used: Option<u64>,
    pub elapsed: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Policy,
    /// The built-in ranker, and why (`None`: no policy configured).
    Builtin(Option<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ranked {
    pub scores: Vec<f32>,
    pub source: Source,
    /// Set when this call tripped the breaker.
    pub tripped_now: bool,
    /// The policy call behind these scores; `None` when no policy was
    /// called (none configured, or the breaker is open).
    pub call: Option<Call>,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    tripped: bool,
    last_error: Option<String>,
}

/// `config.toml`'s `[policies.params]`: by policy name, parameter name →
/// value.
pub type ParamTables = BTreeMap<String, BTreeMap<String, f64>>;

/// A ranking policy behind a circuit breaker, with the built-in fallback.
pub struct Ranker {
    policy: Option<Arc<Policy>>,
    /// The values of the parameters the policy declares, sent with every
    /// input (ABI 1.4).
    params: Vec<f64>,
    /// The built-in ranker's parameter values (`bm25-recency`'s), and
    /// them as its formula's weights.
    builtin_values: Vec<f64>,
    weights: builtin::Weights,
    threshold: u32,
    state: Mutex<State>,
}

impl Ranker {
    /// `policy` (the built-in ranker when `None`) with its declared
    /// parameters' defaults.
    pub fn new(policy: Option<Arc<Policy>>, threshold: u32) -> Ranker {
        let params = policy.as_ref().map_or_else(Vec::new, |p| {
            p.meta.params.iter().map(|d| d.default).collect()
        });
        Ranker {
            policy,
            params,
            builtin_values: builtin::params().iter().map(|d| d.default).collect(),
            weights: builtin::Weights::defaults(),
            threshold: threshold.max(1),
            state: Mutex::default(),
        }
    }

    /// Sets the parameters from `tables` (`[policies.params]`): the
    /// policy's from its name's table, the built-in ranker's from
    /// `bm25-recency`'s. What cannot be used (an unknown name, a value
    /// out of range) keeps its default and is described in the list
    /// returned, one line each naming the table.
    pub fn with_params(mut self, tables: &ParamTables) -> (Ranker, Vec<String>) {
        let mut problems = Vec::new();
        let mut resolve = |name: &str, decls: &[crate::meta::ParamDecl]| {
            let (values, wrong) = crate::meta::resolve_params(decls, tables.get(name));
            problems.extend((wrong.into_iter()).map(|w| format!("[policies.params.{name}] {w}")));
            values
        };
        self.builtin_values = resolve(builtin::NAME, &builtin::params());
        self.weights = builtin::Weights::from_values(&self.builtin_values);
        if let Some(p) = &self.policy {
            self.params = if p.meta.name == builtin::NAME {
                // Its table was read, and what is wrong in it said, for
                // the built-in ranker above.
                crate::meta::resolve_params(&p.meta.params, tables.get(builtin::NAME)).0
            } else {
                resolve(&p.meta.name, &p.meta.params)
            };
        }
        (self, problems)
    }

    /// The values sent to the policy (its declared parameters, in order).
    pub fn params(&self) -> &[f64] {
        &self.params
    }

    /// The built-in ranker's weights.
    pub fn weights(&self) -> &builtin::Weights {
        &self.weights
    }

    /// The parameters in force, by name: the policy's (declared order),
    /// or the built-in ranker's when there is no policy.
    pub fn param_values(&self) -> Vec<(String, f64)> {
        (self.declared().1.into_iter())
            .map(|(d, v)| (d.name, v))
            .collect()
    }

    /// Who ranks (the policy's name, or `bm25-recency` for the built-in
    /// ranker) and its declared parameters with the values in force.
    pub fn declared(&self) -> (String, Vec<(crate::meta::ParamDecl, f64)>) {
        match &self.policy {
            Some(p) => (
                p.meta.name.clone(),
                (p.meta.params.iter().cloned())
                    .zip(self.params.iter().copied())
                    .collect(),
            ),
            None => (
                builtin::NAME.to_string(),
                (builtin::params().into_iter())
                    .zip(self.builtin_values.iter().copied())
                    .collect(),
            ),
        }
    }

    pub fn is_tripped(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).tripped
    }

    pub fn last_error(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .clone()
    }

    /// Re-enables a tripped policy.
    pub fn reset(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = State::default();
    }

    /// Opens the breaker from outside: the host's persisted count reached
    /// the limit (failures from before a restart count too).
    pub fn trip(&self, why: String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.tripped = true;
        s.last_error = Some(why);
    }

    /// The policy behind the breaker, if any.
    pub fn policy(&self) -> Option<&Arc<Policy>> {
        self.policy.as_ref()
    }

    /// Consecutive failures counted since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .consecutive_failures
    }

    pub fn rank(&self, input: &RankInput) -> Ranked {
        let Some(policy) = &self.policy else {
            return Ranked {
                scores: builtin::rank_with(input, &self.weights),
                source: Source::Builtin(None),
                tripped_now: false,
                call: None,
            };
        };
        if self.is_tripped() {
            let why = format!("{} is disabled by the circuit breaker", policy.meta.label());
            return Ranked {
                scores: builtin::rank_with(input, &self.weights),
                source: Source::Builtin(Some(why)),
                tripped_now: false,
                call: None,
            };
        }
        let bytes = input.encode_with(&self.params);
        let start = std::time::Instant::now();
        let raw = policy.expect_rank().and_then(|()| policy.call_raw(&bytes));
        let mut call = Call {
            policy: policy.meta.label(),
            sha256: policy.sha256.clone(),
            input: bytes,
            output: None,
            error: None,
            fuel_used: None,
            elapsed: start.elapsed(),
        };
        let scores = raw.and_then(|out| {
            call.fuel_used = Some(out.fuel_used);
            call.elapsed = out.elapsed;
            let scores =
                abi::decode_scores(&out.value, input.candidates.len()).map_err(PolicyError::Output);
            call.output = Some(out.value);
            scores
        });
        match scores {
            Ok(scores) => {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                s.consecutive_failures = 0;
                Ranked {
                    scores,
                    source: Source::Policy,
                    tripped_now: false,
                    call: Some(call),
                }
            }
            Err(e) => {
                call.error = Some(e.to_string());
                let mut ranked = self.failed(policy, input, e);
                ranked.call = Some(call);
                ranked
            }
        }
    }

    fn failed(&self, policy: &Policy, input: &RankInput, e: PolicyError) -> Ranked {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.consecutive_failures += 1;
        let why = format!("{} failed: {e}", policy.meta.label());
        s.last_error = Some(why.clone());
        let tripped_now = !s.tripped && s.consecutive_failures >= self.threshold;
        s.tripped |= tripped_now;
        Ranked {
            scores: builtin::rank_with(input, &self.weights),
            source: Source::Builtin(Some(why)),
            tripped_now,
            call: None,
        }
    }
}
