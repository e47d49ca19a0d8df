//! kiln's WebAssembly policy sandbox.
//!
//! Teams steer kiln with policies: *ranking* policies score context
//! snippets for a completion, *tuning* policies propose runtime settings.
//! A policy is a WebAssembly core module written in any language; this
//! crate runs it under wasmtime as a pure function of its input:
//! - [`abi`]: the policy ABI 1.4 (see `ABI.md` beside this crate): what goes
//!   in and comes out, as compact little-endian layouts;
//! - [`meta`]: the module's declarations, checked with `wasmparser` before
//!   anything is compiled (size, metadata, imports, exports);
//! - [`limits`]: fuel, deadline, memory, table and module-size limits;
//! - [`runtime`]: the engine (deterministic floats, fuel, epochs, no WASI),
//!   the on-disk compile cache, and calls;
//! - [`builtin`]: the native fallback ranker;
//! - [`breaker`]: fallback and the circuit breaker.

pub mod abi;
pub mod breaker;
pub mod builtin;
pub mod limits;
pub mod meta;
pub mod runtime;

pub use abi::{
    Candidate, Cursor, OutputError, Param, ParamKind, RESOLUTION_BODY, RESOLUTION_EDIT,
    RESOLUTION_LINES, RESOLUTION_SIGNATURE, RankInput, Trial, TuneInput,
};
pub use limits::PolicyLimits;
pub use meta::{ParamDecl, PolicyKind, PolicyMeta};
pub use runtime::{Outcome, Policy, Sandbox};

/// Everything that can be wrong with a policy or one of its calls. Each
/// message says what happened and, where it helps, what to do.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("the module is {bytes} bytes, over the {limit}-byte limit; it was not parsed")]
    TooLarge { bytes: u64, limit: u64 },
    #[error("not a WebAssembly module: {0}")]
    NotWasm(String),
    #[error(
        "no kiln_policy custom section: declare the ABI, kind, name and version (export_ranker!/export_tuner! in Rust, KILN_POLICY_METADATA in C)"
    )]
    NoMetadata,
    #[error("bad kiln_policy metadata: {0}")]
    BadMetadata(String),
    #[error(
        "the policy was built for policy ABI {policy}; this kiln runs ABI {host}; rebuild it with a matching SDK"
    )]
    AbiMajor { policy: String, host: String },
    #[error(
        "the policy was built for policy ABI {policy}, newer than this kiln's {host}; update kiln, or rebuild the policy for ABI {host}"
    )]
    AbiNewer { policy: String, host: String },
    #[error(
        "the policy imports {module}.{name}; policies get no WASI and no host functions but kiln.log: no files, network, clock or randomness"
    )]
    ForbiddenImport { module: String, name: String },
    #[error("the policy does not export `{0}`")]
    MissingExport(&'static str),
    #[error("the export `{name}` must have the type {want}")]
    BadExport {
        name: &'static str,
        want: &'static str,
    },
    #[error("cannot compile: {0}")]
    Compile(String),
    #[error("bad limits: {0}")]
    Limits(String),
    #[error("a {policy} policy cannot be asked to {asked}")]
    WrongKind {
        policy: &'static str,
        asked: &'static str,
    },
    #[error("bad input: {0}")]
    BadInput(String),
    #[error("trapped {0}")]
    Trap(String),
    #[error("ran out of fuel ({fuel} units): it was stopped")]
    OutOfFuel { fuel: u64 },
    #[error("ran past its {ms} ms deadline: it was stopped")]
    Timeout { ms: u64 },
    #[error("tried to grow its memory past {bytes} bytes: it was stopped")]
    MemoryLimit { bytes: u64 },
    #[error("tried to grow a table past {elements} elements: it was stopped")]
    TableLimit { elements: u64 },
    #[error("overflowed its stack: it was stopped")]
    StackOverflow,
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    Output(OutputError),
}

impl PolicyError {
    /// Whether the policy misbehaved at run time (as opposed to being
    /// refused at load time).
    pub fn is_runtime(&self) -> bool {
        matches!(
            self,
            PolicyError::Trap(_)
                | PolicyError::OutOfFuel { .. }
                | PolicyError::Timeout { .. }
                | PolicyError::MemoryLimit { .. }
                | PolicyError::TableLimit { .. }
                | PolicyError::StackOverflow
                | PolicyError::Malformed(_)
                | PolicyError::Output(_)
        )
    }
}

#[cfg(test)]
mod tests;
