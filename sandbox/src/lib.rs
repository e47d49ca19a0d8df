//! kiln's WebAssembly policy sandbox.
//!
//! Empty on purpose for now: the policy issue (#5) fills it with the
//! wasmtime runtime, the policy ABI and its limits. It is a workspace member
//! already so the crate layout in `ARCHITECTURE.md` holds from the start.
