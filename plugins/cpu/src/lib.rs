//! kiln's CPU backend.
//!
//! The scalar reference of every op in the ABI, correct first and written
//! to be read: [`quant`] holds the block formats, [`ops`] the op semantics
//! (the oracle every other backend is checked against), and `backend` puts
//! them behind the ABI. The same code is linked into the `kiln` binary (so
//! kiln always has a backend) and built as a loadable plugin (`cdylib`)
//! exporting `kiln_backend_init`.
//!
//! Per-ISA kernels (AVX2, AVX-512, NEON) will sit beside the scalar ones in
//! their own modules with the same signatures, chosen at run time, each
//! tested against its scalar twin.

mod backend;
pub mod ops;
pub mod quant;

pub use backend::{CpuBackend, CpuBuffer};

kiln_plugin_api::export_backend!(CpuBackend);
