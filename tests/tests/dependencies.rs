//! kiln promises that nothing in its dependency tree does its own crypto
//! with OpenSSL or ring, or ships md5 or a JavaScript engine. This reads
//! the tree cargo builds (`cargo tree`, every target, every feature of
//! kiln's crates, normal and build dependencies) and fails on any of them.
//!
//! Why not `Cargo.lock`: rustls-webpki names ring in a weak feature
//! (`ring?/alloc`), so cargo writes ring into the lock file of every rustls
//! user, although nothing activates or compiles it with the aws-lc-rs
//! provider kiln uses. The tree is what ships.

use std::process::Command;

const FORBIDDEN: &[&str] = &["openssl", "openssl-sys", "ring", "md5", "quick-js"];

#[test]
fn no_forbidden_crate_anywhere_in_the_tree() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--workspace",
            "--all-features",
            "--locked",
            "--target",
            "all",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(kiln_tests::repo_root())
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: std::collections::BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.len() > 100,
        "the tree should list every crate: {names:?}"
    );
    for needed in ["rustls", "aws-lc-rs", "ureq", "wasmtime", "rusqlite"] {
        assert!(names.contains(needed), "{needed} is missing from the tree");
    }
    let bad: Vec<&&str> = names.iter().filter(|n| FORBIDDEN.contains(n)).collect();
    assert!(
        bad.is_empty(),
        "forbidden crates in the dependency tree: {bad:?}"
    );
}

/// kiln's crates by layer, lowest first. A crate may depend on crates of
/// its own layer or below, never above.
const LAYERS: &[&[&str]] = &[
    &["kiln-plugin-api", "kiln-blocks", "kiln-sandbox"],
    &["kiln-cpu"],
    &["kiln-registry"],
    &["kiln-runtime"],
    &["kiln-serve"],
    &["kiln-finetune"],
    &["kiln"],
];

/// What only the service layer may pull in (the async runtime, the HTTP
/// stack, templates, caches, metrics), and what only the binary may (the
/// argument parser).
const SERVICE_ONLY: &[&str] = &[
    "tokio",
    "axum",
    "hyper",
    "hyper-util",
    "tower",
    "moka",
    "minijinja",
    "prometheus-client",
];
const BINARY_ONLY: &[&str] = &["clap"];

fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(kiln_tests::repo_root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every crate `root` needs to build and run (normal dependencies,
/// transitively), by name.
fn normal_closure(meta: &serde_json::Value, root: &str) -> Vec<String> {
    use std::collections::{HashMap, HashSet};
    let name_of: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &serde_json::Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let start = name_of
        .iter()
        .find(|(_, n)| **n == root)
        .map(|(id, _)| *id)
        .unwrap_or_else(|| panic!("{root} is not in the workspace"));
    let (mut seen, mut todo) = (HashSet::new(), vec![start]);
    while let Some(id) = todo.pop() {
        for d in nodes[id]["deps"].as_array().unwrap() {
            let normal = d["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null());
            let dep = d["pkg"].as_str().unwrap();
            if normal && seen.insert(dep) {
                todo.push(dep);
            }
        }
    }
    seen.iter().map(|id| name_of[id].to_string()).collect()
}

#[test]
fn crates_depend_only_on_layers_below_them() {
    let meta = metadata();
    let layer_of = |name: &str| LAYERS.iter().position(|l| l.contains(&name));
    let mut problems = Vec::new();
    for (level, layer) in LAYERS.iter().enumerate() {
        for krate in *layer {
            let deps = normal_closure(&meta, krate);
            for d in &deps {
                if layer_of(d).is_some_and(|l| l > level) {
                    problems.push(format!("{krate} depends on {d}, a layer above it"));
                }
                let service = SERVICE_ONLY.contains(&d.as_str());
                if service && level < layer_of("kiln-serve").unwrap() {
                    problems.push(format!("{krate} pulls in {d}, which only kiln-serve may"));
                }
                if BINARY_ONLY.contains(&d.as_str()) && *krate != "kiln" {
                    problems.push(format!(
                        "{krate} pulls in {d}, which only the kiln binary may"
                    ));
                }
            }
        }
    }
    // Every workspace crate of the host is placed in a layer.
    for p in meta["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let in_host = p["manifest_path"].as_str().unwrap().contains("/host/");
        if in_host && layer_of(name).is_none() {
            problems.push(format!("{name} is in host/ but in no layer"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
