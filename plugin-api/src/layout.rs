//! The layout fingerprint: a hash over the size and every field offset of
//! the ABI's structs, per ABI minor version.
//!
//! The C header computes the same hash from its own `sizeof`/`offsetof`
//! (`kiln_layout_fingerprint()`, folded to a constant by the compiler), so a
//! plugin compiled against an edited header reports a fingerprint the host
//! does not expect and is refused. The entries, their names and their order
//! are part of the contract; `tests/` compiles the header and compares the
//! two tables entry by entry.

use crate::abi::*;
use core::mem::{offset_of, size_of};

/// One value that the fingerprint folds in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutEntry {
    pub name: &'static str,
    /// First ABI minor version that has this entry.
    pub since_minor: u16,
    /// Last ABI minor version that has this entry (`u16::MAX`: still current).
    pub until_minor: u16,
    pub value: u64,
}

const fn e(name: &'static str, value: usize) -> LayoutEntry {
    LayoutEntry {
        name,
        since_minor: 0,
        until_minor: u16::MAX,
        value: value as u64,
    }
}

const fn since(minor: u16, name: &'static str, value: usize) -> LayoutEntry {
    LayoutEntry {
        name,
        since_minor: minor,
        until_minor: u16::MAX,
        value: value as u64,
    }
}

const fn only(minor: u16, name: &'static str, value: usize) -> LayoutEntry {
    LayoutEntry {
        name,
        since_minor: minor,
        until_minor: minor,
        value: value as u64,
    }
}

/// Every layout entry of every minor version, in fingerprint order: the
/// 1.0 fields, the fields each later minor appended, then the sizes of the
/// growable structs (which differ per minor).
pub const LAYOUT: &[LayoutEntry] = &[
    e("KilnError", size_of::<KilnError>()),
    e("KilnError.code", offset_of!(KilnError, code)),
    e("KilnError.op_index", offset_of!(KilnError, op_index)),
    e("KilnError.message", offset_of!(KilnError, message)),
    e(
        "KilnHostApi.struct_size",
        offset_of!(KilnHostApi, struct_size),
    ),
    e("KilnHostApi.abi_major", offset_of!(KilnHostApi, abi_major)),
    e("KilnHostApi.abi_minor", offset_of!(KilnHostApi, abi_minor)),
    e(
        "KilnHostApi.layout_fingerprint",
        offset_of!(KilnHostApi, layout_fingerprint),
    ),
    e("KilnHostApi.host_ctx", offset_of!(KilnHostApi, host_ctx)),
    e("KilnHostApi.log", offset_of!(KilnHostApi, log)),
    e(
        "KilnHostApi.report_error",
        offset_of!(KilnHostApi, report_error),
    ),
    e(
        "KilnDeviceInfo.struct_size",
        offset_of!(KilnDeviceInfo, struct_size),
    ),
    e("KilnDeviceInfo.kind", offset_of!(KilnDeviceInfo, kind)),
    e("KilnDeviceInfo.name", offset_of!(KilnDeviceInfo, name)),
    e(
        "KilnDeviceInfo.total_memory",
        offset_of!(KilnDeviceInfo, total_memory),
    ),
    e(
        "KilnDeviceInfo.free_memory",
        offset_of!(KilnDeviceInfo, free_memory),
    ),
    e(
        "KilnDeviceInfo.capabilities",
        offset_of!(KilnDeviceInfo, capabilities),
    ),
    e(
        "KilnDeviceInfo.max_buffer_size",
        offset_of!(KilnDeviceInfo, max_buffer_size),
    ),
    e(
        "KilnDeviceInfo.buffer_alignment",
        offset_of!(KilnDeviceInfo, buffer_alignment),
    ),
    e(
        "KilnDeviceInfo.reserved0",
        offset_of!(KilnDeviceInfo, reserved0),
    ),
    e("KilnTensor", size_of::<KilnTensor>()),
    e("KilnTensor.buffer", offset_of!(KilnTensor, buffer)),
    e("KilnTensor.offset", offset_of!(KilnTensor, offset)),
    e("KilnTensor.dtype", offset_of!(KilnTensor, dtype)),
    e("KilnTensor.n_dims", offset_of!(KilnTensor, n_dims)),
    e("KilnTensor.ne", offset_of!(KilnTensor, ne)),
    e("KilnTensor.nb", offset_of!(KilnTensor, nb)),
    e("KilnOp", size_of::<KilnOp>()),
    e("KilnOp.kind", offset_of!(KilnOp, kind)),
    e("KilnOp.n_src", offset_of!(KilnOp, n_src)),
    e("KilnOp.src", offset_of!(KilnOp, src)),
    e("KilnOp.dst", offset_of!(KilnOp, dst)),
    e("KilnOp.flags", offset_of!(KilnOp, flags)),
    e("KilnOp.params", offset_of!(KilnOp, params)),
    e("KilnGraph", size_of::<KilnGraph>()),
    e("KilnGraph.struct_size", offset_of!(KilnGraph, struct_size)),
    e("KilnGraph.n_tensors", offset_of!(KilnGraph, n_tensors)),
    e("KilnGraph.tensors", offset_of!(KilnGraph, tensors)),
    e("KilnGraph.n_ops", offset_of!(KilnGraph, n_ops)),
    // `threads` since 1.3, the same bytes.
    e("KilnGraph.reserved0", offset_of!(KilnGraph, threads)),
    e("KilnGraph.ops", offset_of!(KilnGraph, ops)),
    e(
        "KilnBackendApi.struct_size",
        offset_of!(KilnBackendApi, struct_size),
    ),
    e(
        "KilnBackendApi.abi_major",
        offset_of!(KilnBackendApi, abi_major),
    ),
    e(
        "KilnBackendApi.abi_minor",
        offset_of!(KilnBackendApi, abi_minor),
    ),
    e(
        "KilnBackendApi.layout_fingerprint",
        offset_of!(KilnBackendApi, layout_fingerprint),
    ),
    e(
        "KilnBackendApi.device_info_size",
        offset_of!(KilnBackendApi, device_info_size),
    ),
    e(
        "KilnBackendApi.reserved0",
        offset_of!(KilnBackendApi, reserved0),
    ),
    e("KilnBackendApi.name", offset_of!(KilnBackendApi, name)),
    e(
        "KilnBackendApi.version",
        offset_of!(KilnBackendApi, version),
    ),
    e(
        "KilnBackendApi.device_count",
        offset_of!(KilnBackendApi, device_count),
    ),
    e(
        "KilnBackendApi.device_info",
        offset_of!(KilnBackendApi, device_info),
    ),
    e(
        "KilnBackendApi.buffer_alloc",
        offset_of!(KilnBackendApi, buffer_alloc),
    ),
    e(
        "KilnBackendApi.buffer_wrap_host",
        offset_of!(KilnBackendApi, buffer_wrap_host),
    ),
    e(
        "KilnBackendApi.buffer_free",
        offset_of!(KilnBackendApi, buffer_free),
    ),
    e(
        "KilnBackendApi.buffer_write",
        offset_of!(KilnBackendApi, buffer_write),
    ),
    e(
        "KilnBackendApi.buffer_read",
        offset_of!(KilnBackendApi, buffer_read),
    ),
    e(
        "KilnBackendApi.buffer_copy",
        offset_of!(KilnBackendApi, buffer_copy),
    ),
    e(
        "KilnBackendApi.supports_op",
        offset_of!(KilnBackendApi, supports_op),
    ),
    e(
        "KilnBackendApi.graph_compute",
        offset_of!(KilnBackendApi, graph_compute),
    ),
    e(
        "KilnBackendApi.synchronize",
        offset_of!(KilnBackendApi, synchronize),
    ),
    // ---- appended in 1.1 ----
    since(1, "KilnDeviceInfo.uuid", offset_of!(KilnDeviceInfo, uuid)),
    since(
        1,
        "KilnBackendApi.device_memory",
        offset_of!(KilnBackendApi, device_memory),
    ),
    // ---- appended in 1.2 ----
    since(
        2,
        "KilnBackendApi.weight_layout",
        offset_of!(KilnBackendApi, weight_layout),
    ),
    // ---- given a meaning in 1.3 (KilnGraph's layout is frozen) ----
    since(3, "KilnGraph.threads", offset_of!(KilnGraph, threads)),
    // ---- sizes of the growable structs ----
    e("KilnHostApi", size_of::<KilnHostApi>()),
    only(0, "KilnDeviceInfo", KILN_DEVICE_INFO_SIZE_1_0),
    since(1, "KilnDeviceInfo", size_of::<KilnDeviceInfo>()),
    only(0, "KilnBackendApi", KILN_BACKEND_API_SIZE_1_0),
    only(1, "KilnBackendApi", KILN_BACKEND_API_SIZE_1_1),
    since(2, "KilnBackendApi", size_of::<KilnBackendApi>()),
];

const FINGERPRINT_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const FINGERPRINT_PRIME: u64 = 0x0000_0100_0000_01b3;

impl LayoutEntry {
    /// Whether this entry is part of ABI 1.`minor`.
    pub const fn in_minor(&self, minor: u16) -> bool {
        self.since_minor <= minor && minor <= self.until_minor
    }
}

/// The fingerprint of ABI 1.`minor`, as a plugin compiled for that minor reports it.
pub const fn layout_fingerprint(minor: u16) -> u64 {
    let mut h = FINGERPRINT_SEED;
    let mut i = 0;
    while i < LAYOUT.len() {
        if LAYOUT[i].in_minor(minor) {
            h = (h ^ LAYOUT[i].value).wrapping_mul(FINGERPRINT_PRIME);
        }
        i += 1;
    }
    h
}

/// The fingerprint of the ABI version this crate defines.
pub const KILN_LAYOUT_FINGERPRINT: u64 = layout_fingerprint(KILN_ABI_VERSION_MINOR);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minors_have_distinct_fingerprints() {
        assert_ne!(layout_fingerprint(0), layout_fingerprint(1));
    }

    #[test]
    fn growable_structs_only_grow() {
        assert!(KILN_DEVICE_INFO_SIZE_1_0 < size_of::<KilnDeviceInfo>());
        assert!(KILN_BACKEND_API_SIZE_1_0 < size_of::<KilnBackendApi>());
        // 1.0 sizes are 8-aligned so that C's sizeof of the 1.0 struct matches.
        assert_eq!(KILN_DEVICE_INFO_SIZE_1_0 % 8, 0);
        assert_eq!(KILN_BACKEND_API_SIZE_1_0 % 8, 0);
    }

    #[test]
    fn every_minor_has_one_size_per_growable_struct() {
        for minor in 0..=KILN_ABI_VERSION_MINOR {
            for name in ["KilnHostApi", "KilnDeviceInfo", "KilnBackendApi"] {
                let n = LAYOUT
                    .iter()
                    .filter(|e| e.name == name && e.in_minor(minor))
                    .count();
                assert_eq!(n, 1, "{name} in 1.{minor}");
            }
        }
    }
}
