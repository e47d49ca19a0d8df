//! kiln promises that nothing in its dependency tree does its own crypto
//! with OpenSSL or ring, or ships md5 or a JavaScript engine. This reads the
//! resolved tree (`cargo metadata`, every target and feature) and fails on
//! any of them.

use std::process::Command;

const FORBIDDEN: &[&str] = &["openssl", "openssl-sys", "ring", "md5", "quick-js"];

#[test]
fn no_forbidden_crate_anywhere_in_the_tree() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--all-features",
            "--locked",
        ])
        .current_dir(kiln_tests::repo_root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    assert!(
        packages.len() > 10,
        "the metadata should list the whole tree"
    );
    let bad: Vec<String> = packages
        .iter()
        .filter(|p| FORBIDDEN.contains(&p["name"].as_str().unwrap()))
        .map(|p| format!("{} {}", p["name"], p["version"]))
        .collect();
    assert!(
        bad.is_empty(),
        "forbidden crates in the dependency tree: {bad:?}"
    );
}
