//! Ranking with a safety net: a policy's scores when it behaves, the
//! built-in ranker's when it does not, and a circuit breaker that stops
//! calling a policy after repeated failures until it is reset. Each call
//! comes back with its [`Call`] record (the exact input and output bytes),
//! which the host logs so the decision replays bit for bit, and counts so
//! a trip outlives the process (the registry disables the policy).

use crate::abi::{self, RankInput};
use crate::runtime::Policy;
use crate::{PolicyError, builtin};
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

/// A ranking policy behind a circuit breaker, with the built-in fallback.
pub struct Ranker {
    policy: Option<Arc<Policy>>,
    threshold: u32,
    state: Mutex<State>,
}

impl Ranker {
    pub fn new(policy: Option<Arc<Policy>>, threshold: u32) -> Ranker {
        Ranker {
            policy,
            threshold: threshold.max(1),
            state: Mutex::default(),
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
                scores: builtin::rank(input),
                source: Source::Builtin(None),
                tripped_now: false,
                call: None,
            };
        };
        if self.is_tripped() {
            let why = format!("{} is disabled by the circuit breaker", policy.meta.label());
            return Ranked {
                scores: builtin::rank(input),
                source: Source::Builtin(Some(why)),
                tripped_now: false,
                call: None,
            };
        }
        let bytes = input.encode();
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
            scores: builtin::rank(input),
            source: Source::Builtin(Some(why)),
            tripped_now,
            call: None,
        }
    }
}
