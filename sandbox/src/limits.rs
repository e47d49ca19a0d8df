//! The limits every policy call runs under. Defaults suit a ranker over a
//! thousand candidates; a policy may ask for more in its metadata (or the
//! user at `kiln policy add`), up to a ceiling nobody can exceed.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyLimits {
    /// Wasm fuel (about one unit per instruction) per call.
    pub fuel: u64,
    /// Wall-clock deadline per call, in milliseconds (epoch interruption).
    pub deadline_ms: u64,
    /// Linear memory, in bytes.
    pub memory_bytes: u64,
    /// Elements in any table.
    pub table_elements: u64,
    /// Largest module accepted, checked before anything is parsed.
    pub module_bytes: u64,
}

/// The wasm stack, the same for every policy (one engine runs them all).
pub const STACK_BYTES: usize = 512 * 1024;

pub const DEFAULT: PolicyLimits = PolicyLimits {
    fuel: 200_000_000,
    deadline_ms: 100,
    memory_bytes: 64 << 20,
    table_elements: 10_000,
    module_bytes: 8 << 20,
};

pub const CEILING: PolicyLimits = PolicyLimits {
    fuel: 2_000_000_000,
    deadline_ms: 2_000,
    memory_bytes: 512 << 20,
    table_elements: 100_000,
    module_bytes: 32 << 20,
};

/// Requested changes to the defaults; absent fields keep the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    pub fuel: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub memory_mib: Option<u64>,
    pub table_elements: Option<u64>,
}

impl PolicyLimits {
    /// The defaults with `o` applied; an override above the ceiling is an
    /// error naming it.
    pub fn with(o: &LimitOverrides) -> Result<PolicyLimits, String> {
        let mut l = DEFAULT;
        let check = |name: &str, v: u64, max: u64| {
            if v == 0 || v > max {
                Err(format!(
                    "limit {name} = {v} must be between 1 and the ceiling {max}"
                ))
            } else {
                Ok(v)
            }
        };
        if let Some(v) = o.fuel {
            l.fuel = check("fuel", v, CEILING.fuel)?;
        }
        if let Some(v) = o.deadline_ms {
            l.deadline_ms = check("deadline_ms", v, CEILING.deadline_ms)?;
        }
        if let Some(v) = o.memory_mib {
            l.memory_bytes = check("memory_mib", v, CEILING.memory_bytes >> 20)? << 20;
        }
        if let Some(v) = o.table_elements {
            l.table_elements = check("table_elements", v, CEILING.table_elements)?;
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_within_the_ceiling() {
        let l = PolicyLimits::with(&LimitOverrides {
            fuel: Some(5),
            memory_mib: Some(128),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (l.fuel, l.memory_bytes, l.deadline_ms),
            (5, 128 << 20, DEFAULT.deadline_ms)
        );
        let err = PolicyLimits::with(&LimitOverrides {
            deadline_ms: Some(60_000),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            err.contains("deadline_ms = 60000") && err.contains("2000"),
            "{err}"
        );
    }
}
