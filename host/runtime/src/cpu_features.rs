//! CPU feature detection: which instruction sets this CPU has *and* the OS
//! has enabled (for AVX, AVX-512 and AMX the register state must be on in
//! XCR0, or the first instruction faults). A plugin manifest names the
//! features it needs with the names in [`KNOWN`]; the loader refuses a
//! plugin whose features are missing before it opens the library.

use serde::Serialize;

/// Every feature name a manifest may use, across architectures. A name of
/// another architecture is known but never present.
pub const KNOWN: &[&str] = &[
    // x86-64
    "sse2",
    "sse3",
    "ssse3",
    "sse4.1",
    "sse4.2",
    "popcnt",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi1",
    "bmi2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512cd",
    "avx512vnni",
    "avx512bf16",
    "avx512fp16",
    "avx512vbmi",
    "avxvnni",
    "amx-tile",
    "amx-int8",
    "amx-bf16",
    // aarch64
    "neon",
    "dotprod",
    "i8mm",
    "sve",
    "fp16",
];

/// Whether the named feature is usable here; `None` for an unknown name.
pub fn detect(name: &str) -> Option<bool> {
    if !KNOWN.contains(&name) {
        return None;
    }
    Some(detect_known(name))
}

#[cfg(target_arch = "x86_64")]
fn detect_known(name: &str) -> bool {
    use std::arch::is_x86_feature_detected as has;
    match name {
        "sse2" => has!("sse2"),
        "sse3" => has!("sse3"),
        "ssse3" => has!("ssse3"),
        "sse4.1" => has!("sse4.1"),
        "sse4.2" => has!("sse4.2"),
        "popcnt" => has!("popcnt"),
        "avx" => has!("avx"),
        "avx2" => has!("avx2"),
        "fma" => has!("fma"),
        "f16c" => has!("f16c"),
        "bmi1" => has!("bmi1"),
        "bmi2" => has!("bmi2"),
        "avx512f" => has!("avx512f"),
        "avx512bw" => has!("avx512bw"),
        "avx512vl" => has!("avx512vl"),
        "avx512dq" => has!("avx512dq"),
        "avx512cd" => has!("avx512cd"),
        "avx512vnni" => has!("avx512vnni"),
        "avx512bf16" => has!("avx512bf16"),
        "avx512fp16" => has!("avx512fp16"),
        "avx512vbmi" => has!("avx512vbmi"),
        "avxvnni" => has!("avxvnni"),
        "amx-tile" | "amx-int8" | "amx-bf16" => amx(name),
        _ => false,
    }
}

/// AMX by hand (std's detection of it is not stable yet): the CPUID bit and
/// both tile state components enabled in XCR0.
#[cfg(target_arch = "x86_64")]
fn amx(name: &str) -> bool {
    let bit = match name {
        "amx-bf16" => 22,
        "amx-tile" => 24,
        "amx-int8" => 25,
        _ => return false,
    };
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let tile_state = xcr0().is_some_and(|x| x & (0b11 << 17) == 0b11 << 17);
    leaf7.edx & (1 << bit) != 0 && tile_state
}

#[cfg(target_arch = "aarch64")]
fn detect_known(name: &str) -> bool {
    use std::arch::is_aarch64_feature_detected as has;
    match name {
        "neon" => has!("neon"),
        "dotprod" => has!("dotprod"),
        "i8mm" => has!("i8mm"),
        "sve" => has!("sve"),
        "fp16" => has!("fp16"),
        _ => false,
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect_known(_name: &str) -> bool {
    false
}

/// The OS-enabled register state (XCR0), when the OS exposes XGETBV.
#[cfg(target_arch = "x86_64")]
pub fn xcr0() -> Option<u64> {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    let osxsave = leaf1.ecx & (1 << 27) != 0;
    if !osxsave {
        return None;
    }
    #[target_feature(enable = "xsave")]
    fn read() -> u64 {
        // SAFETY: OSXSAVE is set (checked by the caller), so XGETBV is
        // enabled; XCR0 is register 0.
        unsafe { std::arch::x86_64::_xgetbv(0) }
    }
    // SAFETY: OSXSAVE implies the CPU supports XSAVE.
    Some(unsafe { read() })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn xcr0() -> Option<u64> {
    None
}

/// XCR0's state components, by name, as `kiln doctor` shows them.
pub fn xcr0_components(xcr0: u64) -> Vec<&'static str> {
    const BITS: &[(u32, &str)] = &[
        (0, "x87"),
        (1, "sse"),
        (2, "avx"),
        (5, "avx512-opmask"),
        (6, "avx512-zmm-hi256"),
        (7, "avx512-hi16-zmm"),
        (17, "amx-tilecfg"),
        (18, "amx-tiledata"),
    ];
    BITS.iter()
        .filter(|(b, _)| xcr0 & (1 << b) != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// One feature's state, for reports.
#[derive(Clone, Debug, Serialize)]
pub struct FeatureState {
    pub name: &'static str,
    pub available: bool,
}

/// Every known feature of this machine's architecture and whether it is usable.
pub fn report() -> Vec<FeatureState> {
    let arm = ["neon", "dotprod", "i8mm", "sve", "fp16"];
    KNOWN
        .iter()
        .filter(|n| arm.contains(n) == cfg!(target_arch = "aarch64"))
        .map(|&name| FeatureState {
            name,
            available: detect_known(name),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_are_none() {
        assert_eq!(detect("avx1024"), None);
        assert!(detect("avx2").is_some());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn baseline_x86_features_are_present_and_foreign_ones_absent() {
        assert_eq!(detect("sse2"), Some(true));
        assert_eq!(detect("neon"), Some(false));
        let x = xcr0().expect("every x86-64 OS we run on enables XSAVE");
        assert!(xcr0_components(x).contains(&"sse"));
    }
}
