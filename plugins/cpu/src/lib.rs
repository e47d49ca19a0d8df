//! kiln's CPU backend.
//!
//! The scalar reference of every op in the ABI, correct first and written
//! to be read: [`ops`] holds the op semantics (the oracle every other
//! backend is checked against) over the block formats of `kiln-blocks`,
//! and `backend` puts them behind the ABI. The same code is linked into the `kiln` binary (so
//! kiln always has a backend, entered through [`backend_init`]) and built
//! as a loadable plugin by `cdylib/` (crate `kiln-cpu-plugin`).
//!
//! Per-ISA kernels sit beside the reference in [`kernels`], chosen at run
//! time from the CPU's features, each path tested against the reference;
//! an op without a fast kernel runs the reference.

mod backend;
pub mod kernels;
pub mod math;
pub mod ops;
mod scratch;

pub use backend::{CpuBackend, CpuBuffer};

std::thread_local! {
    /// Set while [`reference_backend_init`] creates its backend.
    static REFERENCE_INIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The kernel path a backend created now uses.
pub(crate) fn isa_for_new_backend() -> kernels::Isa {
    if REFERENCE_INIT.get() {
        kernels::Isa::Reference
    } else {
        kernels::Isa::current()
    }
}

/// As [`backend_init`], for a backend that runs only the scalar reference
/// (no fast kernels): the oracle that conformance compares backends with.
///
/// # Safety
/// The contract of `kiln_backend_init` in `kiln_backend.h`.
pub unsafe extern "C" fn reference_backend_init(
    host: *const kiln_plugin_api::abi::KilnHostApi,
    out_api: *mut *const kiln_plugin_api::abi::KilnBackendApi,
    out_ctx: *mut *mut core::ffi::c_void,
    err: *mut kiln_plugin_api::abi::KilnError,
) -> i32 {
    REFERENCE_INIT.set(true);
    // SAFETY: the caller upholds the entry point's contract.
    let rc = unsafe { backend_init(host, out_api, out_ctx, err) };
    REFERENCE_INIT.set(false);
    rc
}

/// The CPU backend's `kiln_backend_init`, for a host that links it in.
///
/// # Safety
/// The contract of `kiln_backend_init` in `kiln_backend.h`.
pub unsafe extern "C" fn backend_init(
    host: *const kiln_plugin_api::abi::KilnHostApi,
    out_api: *mut *const kiln_plugin_api::abi::KilnBackendApi,
    out_ctx: *mut *mut core::ffi::c_void,
    err: *mut kiln_plugin_api::abi::KilnError,
) -> i32 {
    // SAFETY: the caller upholds the entry point's contract, which is `init`'s.
    unsafe { kiln_plugin_api::plugin::init::<CpuBackend>(host, out_api, out_ctx, err) }
}
