//! kiln's backend ABI, version 1.2.
//!
//! One ABI for every compute backend, from Rust or C/C++: the raw
//! `#[repr(C)]` types in [`abi`] (mirrored by `include/kiln_backend.h`), a
//! layout fingerprint in [`layout`], safe names in [`types`], tensor
//! descriptions the host and every backend share in [`desc`], the plugin
//! author's trait and export macro in [`plugin`], and, behind the `host`
//! feature, the host's loader and negotiated handle in `host`.
//!
//! The contract (versioning, ownership, threading) is written down in
//! `docs/abi.md` at the repository root.

pub mod abi;
pub mod desc;
#[cfg(feature = "host")]
pub mod host;
pub mod interleave;
pub mod layout;
pub mod plugin;
pub mod types;

pub use abi::{KILN_ABI_VERSION_MAJOR, KILN_ABI_VERSION_MINOR};
pub use desc::Desc;
pub use layout::{KILN_LAYOUT_FINGERPRINT, layout_fingerprint};
pub use plugin::{Backend, DeviceInfo, Graph, HostServices, Op, Tensor, Tensors};
pub use types::{BackendError, DType, DeviceKind, ErrorCode, OpKind};

/// The path of the C header, for build scripts and tests.
pub const C_HEADER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
