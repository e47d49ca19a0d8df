//! The C header and the Rust definitions describe the same ABI: a C program
//! compiled against the header prints every layout entry, and they must
//! equal the Rust table entry for entry, for every minor version. A plugin
//! built against an edited header is refused by its fingerprint.

use kiln_plugin_api::host::{BackendHandle, HostSink, LoadError, host_api, open_library};
use kiln_plugin_api::layout::{LAYOUT, layout_fingerprint};
use kiln_plugin_api::{ErrorCode, KILN_ABI_VERSION_MINOR};
use kiln_tests::{c_compiler, c_fixture, compile_c_plugin, fixture_dir, repo_root};
use std::path::Path;
use std::process::Command;

const DUMP: &str = r#"
#include "kiln_backend.h"
#include <stdio.h>
int main(void) {
#define PRINT(name, value) printf("%s %llu\n", name, (unsigned long long)(value));
    KILN_LAYOUT_ENTRIES(PRINT)
    printf("fingerprint %llu\n", (unsigned long long)KILN_LAYOUT_FINGERPRINT);
    return 0;
}
"#;

fn dump(compiler: &str, lang: &str, minor: u16) -> Vec<(String, u64)> {
    let dir = fixture_dir();
    let src = dir.join(format!("layout_dump.{lang}"));
    std::fs::write(&src, DUMP).unwrap();
    let exe = dir.join(format!("layout_dump_{lang}_{minor}"));
    let out = Command::new(compiler)
        .args(["-Wall", "-Werror", "-I"])
        .arg(repo_root().join("plugin-api/include"))
        .arg(format!("-DKILN_ABI_TARGET_MINOR={minor}"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run compiler");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn expected(minor: u16) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = LAYOUT
        .iter()
        .filter(|e| e.in_minor(minor))
        .map(|e| (e.name.to_string(), e.value))
        .collect();
    v.push(("fingerprint".into(), layout_fingerprint(minor)));
    v
}

#[test]
fn c_header_matches_rust_layout_for_every_minor() {
    for minor in 0..=KILN_ABI_VERSION_MINOR {
        assert_eq!(
            dump(&c_compiler(), "c", minor),
            expected(minor),
            "ABI 1.{minor}"
        );
    }
}

#[test]
fn header_compiles_as_cpp_with_the_same_layout() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        eprintln!("no C++ compiler ({cxx}); skipping");
        return;
    }
    assert_eq!(
        dump(&cxx, "cpp", KILN_ABI_VERSION_MINOR),
        expected(KILN_ABI_VERSION_MINOR)
    );
}

struct Quiet;
impl HostSink for Quiet {
    fn log(&self, _: i32, _: &str) {}
    fn report_error(&self, _: ErrorCode, _: &str) {}
}

fn negotiate(lib: &Path) -> Result<BackendHandle, LoadError> {
    // SAFETY: test fixtures built from this repository's sources.
    unsafe {
        let entry = open_library(lib)?;
        BackendHandle::negotiate(entry, host_api(Box::new(Quiet)))
    }
}

#[test]
fn a_plugin_built_against_an_edited_header_is_refused() {
    let edited = fixture_dir().join("edited-include");
    std::fs::create_dir_all(&edited).unwrap();
    let header =
        std::fs::read_to_string(repo_root().join("plugin-api/include/kiln_backend.h")).unwrap();
    // A vendor adds a field to a frozen struct.
    let changed = header.replace(
        "    uint64_t nb[KILN_MAX_DIMS]; /* byte strides; nb[0] = block bytes */",
        "    uint64_t nb[KILN_MAX_DIMS];\n    uint32_t vendor_flags;",
    );
    assert_ne!(changed, header, "the edit must apply");
    std::fs::write(edited.join("kiln_backend.h"), changed).unwrap();
    let lib = compile_c_plugin(
        "kiln_fixture_edited_header",
        &repo_root().join("tests/fixtures/c-plugin/plugin.c"),
        &edited,
        &[],
    );
    match negotiate(&lib) {
        Err(LoadError::Fingerprint {
            expected, actual, ..
        }) => {
            assert_eq!(expected, layout_fingerprint(KILN_ABI_VERSION_MINOR));
            assert_ne!(actual, expected);
        }
        Err(other) => panic!("wrong refusal: {other}"),
        Ok(_) => panic!("an edited header must be refused"),
    }
}

#[test]
fn the_unedited_fixture_negotiates() {
    let lib = c_fixture("kiln_fixture_negotiates", &[]);
    let h = negotiate(&lib).unwrap();
    assert_eq!(h.name(), "c-fixture");
    assert_eq!(h.abi_minor(), KILN_ABI_VERSION_MINOR);
    assert_eq!(h.device_count().unwrap(), 1);
}
