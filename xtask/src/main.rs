//! `cargo xtask test [--ci] [-- ARGS…]`: makes a fresh clone's test suite
//! runnable and runs it. `tests/provision.sh` installs what the tests need
//! (Debian packages, a Python environment with llama.cpp under `target/`,
//! real vocabularies, the shipped policies) once and prints the
//! environment the tests run with; then `cargo test --workspace ARGS…`
//! runs with it, the parity tests included (a missing oracle fails them
//! rather than skipping them). With `--ci`, the format and lint checks run
//! first and the lockfile must be up to date.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => match test(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xtask: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: cargo xtask test [--ci] [-- CARGO-TEST-ARGS…]");
            ExitCode::from(2)
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({status})"))
    }
}

fn test(args: &[String]) -> Result<(), String> {
    let ci = args.iter().any(|a| a == "--ci");
    let passthrough: Vec<&String> = args.iter().skip_while(|a| *a != "--").skip(1).collect();
    let root = repo_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let out = Command::new("bash")
        .arg(root.join("tests/provision.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run tests/provision.sh: {e}"))?;
    if !out.status.success() {
        return Err("tests/provision.sh failed (see above)".into());
    }
    let env: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

    if ci {
        run(Command::new(&cargo)
            .args(["fmt", "--all", "--", "--check"])
            .current_dir(&root))?;
        run(Command::new(&cargo)
            .args(["clippy", "--workspace", "--all-targets", "--locked", "--"])
            .args(["-D", "warnings"])
            .current_dir(&root))?;
    }
    let mut test = Command::new(&cargo);
    test.args(["test", "--workspace"])
        .current_dir(&root)
        .envs(env);
    if ci {
        test.arg("--locked");
    }
    if !passthrough.is_empty() {
        test.arg("--").args(passthrough);
    }
    run(&mut test)
}
