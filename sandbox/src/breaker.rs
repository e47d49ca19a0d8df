//! Ranking with a safety net: a policy's scores when it behaves, the
//! built-in ranker's when it does not, and a circuit breaker that stops
//! calling a policy after repeated failures until it is reset (the host
//! persists the trip as the policy being disabled).

use crate::abi::RankInput;
use crate::runtime::Policy;
use crate::{PolicyError, builtin};
use std::sync::{Arc, Mutex};

/// Consecutive failures that trip the breaker by default.
pub const DEFAULT_THRESHOLD: u32 = 3;

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

    pub fn rank(&self, input: &RankInput) -> Ranked {
        let Some(policy) = &self.policy else {
            return Ranked {
                scores: builtin::rank(input),
                source: Source::Builtin(None),
                tripped_now: false,
            };
        };
        if self.is_tripped() {
            let why = format!("{} is disabled by the circuit breaker", policy.meta.label());
            return Ranked {
                scores: builtin::rank(input),
                source: Source::Builtin(Some(why)),
                tripped_now: false,
            };
        }
        match policy.rank(input) {
            Ok(out) => {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                s.consecutive_failures = 0;
                Ranked {
                    scores: out.value,
                    source: Source::Policy,
                    tripped_now: false,
                }
            }
            Err(e) => self.failed(policy, input, e),
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
        }
    }
}
