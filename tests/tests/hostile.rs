//! Hostile plugins. Each is refused with a message that names the problem,
//! the `kiln` process exits cleanly (code 1, no signal), and the registry is
//! byte-for-byte the same as before: nothing installed, nothing activated,
//! nothing audited.

use kiln_plugin_api::KILN_ABI_VERSION_MINOR;
use kiln_runtime::backend::Backend;
use kiln_runtime::install::{InstallError, add_plugin};
use kiln_tests::{Home, ManifestSpec, c_fixture, plugin_dir, rust_cdylib};
use std::path::{Path, PathBuf};

/// A home with one good plugin installed, so "unchanged" means something.
fn home_with_a_plugin() -> Home {
    let home = Home::default();
    let lib = c_fixture("kiln_fixture_hostile_baseline", &[]);
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("good", "1.0.0"));
    home.ok(&["plugins", "add", dir.to_str().unwrap()]);
    home
}

/// Adds the plugin in `dir`, expecting a refusal that mentions every one of
/// `expect`, and checks that the registry did not change.
fn refused(home: &Home, dir: &Path, expect: &[&str]) -> String {
    let before = home.registry_snapshot();
    let stderr = home.fails(&["plugins", "add", dir.to_str().unwrap()]);
    for e in expect {
        assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
    }
    assert_eq!(home.registry_snapshot(), before, "the registry changed");
    // And kiln still works.
    home.ok(&["backends"]);
    stderr
}

fn fixture(home: &Home, lib_name: &str, flags: &[&str], spec: ManifestSpec) -> PathBuf {
    plugin_dir(home.path(), &c_fixture(lib_name, flags), &spec)
}

#[test]
fn wrong_abi_major_in_the_manifest() {
    let home = home_with_a_plugin();
    let mut spec = ManifestSpec::new("future", "1.0.0");
    spec.abi = "2.0".into();
    let dir = fixture(&home, "kiln_fixture_plain", &[], spec);
    refused(
        &home,
        &dir,
        &[
            "declares kiln ABI 2.0",
            &format!("speaks ABI 1.{KILN_ABI_VERSION_MINOR}"),
            "refused before loading",
        ],
    );
}

#[test]
fn wrong_abi_major_in_the_table() {
    let home = home_with_a_plugin();
    let dir = fixture(
        &home,
        "kiln_fixture_wrong_major",
        &["-DFIXTURE_WRONG_MAJOR"],
        ManifestSpec::new("liar", "1.0.0"),
    );
    refused(
        &home,
        &dir,
        &[
            "ABI major version mismatch",
            &format!("built for kiln ABI 2.{KILN_ABI_VERSION_MINOR}"),
            &format!("host speaks ABI 1.{KILN_ABI_VERSION_MINOR}"),
        ],
    );
}

#[test]
fn missing_entry_symbol() {
    let home = home_with_a_plugin();
    let dir = fixture(
        &home,
        "kiln_fixture_no_entry",
        &["-DFIXTURE_NO_ENTRY"],
        ManifestSpec::new("no-entry", "1.0.0"),
    );
    refused(&home, &dir, &["does not export `kiln_backend_init`"]);
}

#[test]
fn init_returns_an_error() {
    let home = home_with_a_plugin();
    let dir = fixture(
        &home,
        "kiln_fixture_init_error",
        &["-DFIXTURE_INIT_ERROR"],
        ManifestSpec::new("no-device", "1.0.0"),
    );
    refused(
        &home,
        &dir,
        &["init failed", "device error", "deliberate init failure"],
    );
}

#[test]
fn init_panics_in_a_rust_plugin() {
    let home = home_with_a_plugin();
    let lib = rust_cdylib("kiln-fixture-rust-plugin", "kiln_fixture_rust_plugin");
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("panicky", "1.0.0"));
    refused(
        &home,
        &dir,
        &[
            "init failed",
            "panic",
            "deliberate panic in the fixture's init",
        ],
    );
}

#[test]
fn init_panic_does_not_take_down_an_in_process_host() {
    let home = home_with_a_plugin();
    let lib = rust_cdylib("kiln-fixture-rust-plugin", "kiln_fixture_rust_plugin");
    let dir = plugin_dir(home.path(), &lib, &ManifestSpec::new("panicky", "1.0.0"));
    let config = kiln_registry::config::Config::new(home.path().to_path_buf(), None);
    let mut registry = home.registry();
    let err = add_plugin(
        &config,
        &mut registry,
        &dir.join("kiln-plugin.toml"),
        "test",
        |_, _| {},
    )
    .err()
    .expect("refused");
    assert!(matches!(err, InstallError::Load { .. }), "{err}");
    // This process is the host: it is alive and its CPU backend still computes.
    assert!(kiln_runtime::backend::conformance::run(&Backend::builtin_cpu(), |_, _| {}).passed());
}

#[test]
fn manifest_hash_mismatch() {
    let home = home_with_a_plugin();
    let mut spec = ManifestSpec::new("tampered", "1.0.0");
    spec.sha256 = Some("ab".repeat(32));
    let dir = fixture(&home, "kiln_fixture_plain", &[], spec);
    refused(
        &home,
        &dir,
        &[
            "sha256 mismatch",
            "the manifest says abab",
            "changed or corrupted",
        ],
    );
}

#[test]
fn cpu_feature_the_machine_lacks() {
    let home = home_with_a_plugin();
    // The first known feature this machine does not have (a foreign
    // architecture's feature is always absent).
    let missing = kiln_runtime::cpu_features::KNOWN
        .iter()
        .find(|f| kiln_runtime::cpu_features::detect(f) == Some(false))
        .expect("some feature is missing on every machine");
    let mut spec = ManifestSpec::new("exotic", "1.0.0");
    spec.cpu_features = vec!["sse2".into(), missing.to_string()];
    let dir = fixture(&home, "kiln_fixture_plain", &[], spec);
    let stderr = refused(&home, &dir, &["requires CPU feature(s)", missing]);
    assert!(
        !stderr.contains("sse2"),
        "only the missing feature is named: {stderr}"
    );
}

#[test]
fn truncated_library() {
    let home = home_with_a_plugin();
    let lib = c_fixture("kiln_fixture_plain", &[]);
    let bytes = std::fs::read(&lib).unwrap();
    let truncated = lib.with_file_name("libkiln_fixture_truncated.so");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    // The manifest's hash matches the truncated file: only the ELF check stands.
    let dir = plugin_dir(
        home.path(),
        &truncated,
        &ManifestSpec::new("truncated", "1.0.0"),
    );
    refused(
        &home,
        &dir,
        &["is not a loadable library", "truncated ELF file"],
    );
}

#[test]
fn non_elf_library() {
    let home = home_with_a_plugin();
    let fake = kiln_tests::fixture_dir().join("libkiln_fixture_text.so");
    std::fs::write(&fake, "#!/bin/sh\necho I am not a library\n").unwrap();
    let dir = plugin_dir(home.path(), &fake, &ManifestSpec::new("text", "1.0.0"));
    refused(&home, &dir, &["not an ELF file"]);
}

#[test]
fn wrong_numbers_fail_conformance_naming_op_type_and_error() {
    let home = home_with_a_plugin();
    let dir = fixture(
        &home,
        "kiln_fixture_wrong_numbers",
        &["-DFIXTURE_WRONG_NUMBERS"],
        ManifestSpec::new("sloppy", "1.0.0"),
    );
    let stderr = refused(
        &home,
        &dir,
        &["failed conformance", "stays disabled", "NMSE"],
    );
    // Each failing case is named with its op, types and shapes.
    assert!(
        stderr.contains("mul(f32[37,5,3], f32[37,5,3]) -> f32[37,5,3]"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("add("),
        "only the broken op is named: {stderr}"
    );
}

#[test]
fn struct_size_smaller_than_the_abi_needs() {
    let home = home_with_a_plugin();
    let dir = fixture(
        &home,
        "kiln_fixture_small_struct",
        &["-DFIXTURE_SMALL_STRUCT"],
        ManifestSpec::new("short", "1.0.0"),
    );
    refused(
        &home,
        &dir,
        &[&format!(
            "KilnBackendApi is 64 bytes but ABI 1.{KILN_ABI_VERSION_MINOR} needs at least 144"
        )],
    );
}

#[test]
fn bad_manifests_are_refused_with_the_line() {
    let home = home_with_a_plugin();
    let dir = fixture(
        &home,
        "kiln_fixture_plain",
        &[],
        ManifestSpec::new("typo", "1.0.0"),
    );
    let m = dir.join("kiln-plugin.toml");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("cpu_features", "cpu_feature");
    std::fs::write(&m, text).unwrap();
    refused(
        &home,
        &dir,
        &[
            "bad manifest",
            "unknown field `cpu_feature`",
            "kiln-plugin.toml",
        ],
    );
}
