//! Encryption at rest: `kiln store encrypt` / `decrypt`, models stored
//! in the age format, read by the `age` tool and read from files it
//! wrote, served over HTTP; a wrong key, a truncated file and a changed
//! byte are each refused by name, and nothing in the store changes.

use kiln_tests::serve::{http_server_with, post};
use kiln_tests::{Home, real_model, sha256_file};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's `age` (the reference implementation's command-line tool),
/// which `tests/provision.sh` installs.
fn age(args: &[&str]) -> Vec<u8> {
    let out = Command::new("age")
        .args(args)
        .output()
        .expect("the `age` tool (Debian package age; tests/provision.sh installs it)");
    assert!(
        out.status.success(),
        "age {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn public_key(identity: &Path) -> String {
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(identity)
        .output()
        .expect("age-keygen");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn new_identity(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&p)
        .output()
        .expect("age-keygen");
    assert!(out.status.success());
    p
}

fn greedy(home: &Home, model: &str, env: &[(&str, &str)]) -> Value {
    let args = [
        "run",
        model,
        "--prompt",
        "def fibonacci(n):",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    ];
    json_with(home, &args, env)["token_ids"].clone()
}

/// `kiln ARGS` with `env`, asserting success; its JSON output.
fn json_with(home: &Home, args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = home
        .command(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn blobs(home: &Home) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(home.path().join("models/blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn smollm2() -> Option<PathBuf> {
    real_model("smollm2-135m-instruct-q4_1.gguf")
}

#[test]
fn the_store_encrypts_for_the_age_tool_serves_and_decrypts_back() {
    let Some(model) = smollm2() else { return };
    let home = Home::default();
    home.ok(&["models", "add", model.to_str().unwrap(), "--name", "smol"]);
    let plain_tokens = greedy(&home, "smol", &[]);
    let sha = sha256_file(&model);

    let j = home.json(&["store", "encrypt", "--json"]);
    assert_eq!(j["identity_created"], true, "{j}");
    let identity = PathBuf::from(j["identity"].as_str().unwrap());
    assert_eq!(identity, home.path().join("identity.txt"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&identity).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the identity is the user's alone");
    assert_eq!(
        blobs(&home),
        [format!("sha256-{sha}.age")],
        "no plain copy left"
    );
    let blob = PathBuf::from(j["blobs"][0]["to"].as_str().unwrap());
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(config.contains("encrypt_at_rest = true"), "{config}");

    // The age tool reads what kiln wrote, to the byte.
    let plain = age(&[
        "-d",
        "-i",
        identity.to_str().unwrap(),
        blob.to_str().unwrap(),
    ]);
    assert_eq!(plain, std::fs::read(&model).unwrap());

    // The same model, the same tokens, from the CLI and over HTTP.
    assert_eq!(greedy(&home, "smol", &[]), plain_tokens);
    let v = home.json(&["models", "verify", "--json"]);
    assert_eq!(v["blobs"][0]["status"], "ok", "{v}");
    assert_eq!(v["blobs"][0]["encrypted"], true, "{v}");
    let list = home.json(&["models", "list", "--json"]);
    assert_eq!(list["models"][0]["encrypted"], true);
    let server = http_server_with(&home, Path::new("smol"), &[]);
    let (code, r) = post(
        &server.addr,
        "/v1/completions",
        &json!({"prompt": "def fibonacci(n):", "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(code, 200, "{r}");
    assert!(!r["choices"][0]["text"].as_str().unwrap().is_empty(), "{r}");
    drop(server);
    let doctor = home.json(&["doctor", "--json"]);
    assert_eq!(doctor["encryption"]["at_rest"], true, "{doctor}");
    assert_eq!(doctor["encryption"]["encrypted_models"], 1);

    // Decrypting brings the blob back under its plain name, unchanged.
    let j = home.json(&["store", "decrypt", "--json"]);
    assert_eq!(
        j["blobs"][0]["to"],
        json!(home.path().join(format!("models/blobs/sha256-{sha}")))
    );
    assert_eq!(blobs(&home), [format!("sha256-{sha}")]);
    assert_eq!(
        sha256_file(&home.path().join(format!("models/blobs/sha256-{sha}"))),
        sha
    );
    assert_eq!(greedy(&home, "smol", &[]), plain_tokens);
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(config.contains("encrypt_at_rest = false"), "{config}");
    let actions: Vec<String> = home
        .registry()
        .audit_log(10)
        .unwrap()
        .iter()
        .map(|a| a.action.clone())
        .collect();
    assert!(
        actions.ends_with(&["encrypt".into(), "decrypt".into()]),
        "{actions:?}"
    );
}

#[test]
fn files_the_age_tool_encrypted_are_run_and_added_by_their_plaintext() {
    let Some(model) = smollm2() else { return };
    let home = Home::default();
    let keys = tempfile::tempdir().unwrap();
    let identity = new_identity(keys.path(), "mine.txt");
    let sealed = keys.path().join("smol.gguf.age");
    age(&[
        "-r",
        &public_key(&identity),
        "-o",
        sealed.to_str().unwrap(),
        model.to_str().unwrap(),
    ]);
    let plain_tokens = greedy(&home, model.to_str().unwrap(), &[]);
    let with_key = [("KILN_IDENTITY", identity.to_str().unwrap())];
    assert_eq!(
        greedy(&home, sealed.to_str().unwrap(), &with_key),
        plain_tokens
    );

    // The armored form is named, with what to do.
    let small = keys.path().join("small.bin");
    std::fs::write(&small, [7u8; 1000]).unwrap();
    let armored = keys.path().join("small.age.asc");
    age(&[
        "-a",
        "-r",
        &public_key(&identity),
        "-o",
        armored.to_str().unwrap(),
        small.to_str().unwrap(),
    ]);
    let err = home.fails(&["run", armored.to_str().unwrap(), "--prompt", "x"]);
    assert!(err.contains("ASCII-armored age file"), "{err}");

    // Without the key: refused by name, with what to do.
    let err = home.fails(&["run", sealed.to_str().unwrap(), "--prompt", "x"]);
    assert!(
        err.contains("encrypted (age)") && err.contains("KILN_IDENTITY"),
        "{err}"
    );

    // Added, it is recorded by the plaintext's hash (the store is not
    // encrypting: stored in plain).
    let j = json_with(
        &home,
        &[
            "models",
            "add",
            sealed.to_str().unwrap(),
            "--name",
            "smol",
            "--json",
        ],
        &with_key,
    );
    assert_eq!(j["model"]["sha256"], sha256_file(&model));
    assert_eq!(j["model"]["encrypted"], false);
    assert_eq!(greedy(&home, "smol", &[]), plain_tokens);

    // With encryption on, a model added later is encrypted as it is
    // copied: no plaintext copy in the store at any point after.
    home.ok(&["store", "encrypt"]);
    let before = blobs(&home);
    let j = home.json(&[
        "models",
        "add",
        model.to_str().unwrap(),
        "--name",
        "again",
        "--json",
    ]);
    assert_eq!(j["model"]["encrypted"], true, "{j}");
    assert_eq!(blobs(&home), before, "the same plaintext, the same blob");
    assert!(before.iter().all(|b| b.ends_with(".age")), "{before:?}");
}

#[test]
fn a_passphrase_encrypts_the_store_without_an_identity_file() {
    let Some(model) = smollm2() else { return };
    let home = Home::default();
    home.ok(&["models", "add", model.to_str().unwrap(), "--name", "smol"]);
    let plain_tokens = greedy(&home, "smol", &[]);
    let pass = [("KILN_PASSPHRASE", "a long passphrase for a test")];
    let j = json_with(&home, &["store", "encrypt", "--json"], &pass);
    assert_eq!(j["identity"], Value::Null, "{j}");
    assert!(!home.path().join("identity.txt").exists());
    assert_eq!(greedy(&home, "smol", &pass), plain_tokens);
    let err = home.fails(&["run", "smol", "--prompt", "x"]);
    assert!(err.contains("KILN_PASSPHRASE is not set"), "{err}");
}

#[test]
fn a_wrong_key_a_truncated_file_and_a_changed_byte_are_refused_and_nothing_changes() {
    let Some(model) = smollm2() else { return };
    let home = Home::default();
    home.ok(&["models", "add", model.to_str().unwrap(), "--name", "smol"]);
    home.ok(&["store", "encrypt"]);
    let blob = home.path().join("models/blobs").join(&blobs(&home)[0]);
    let models_before = serde_json::to_string(&home.registry().models().unwrap()).unwrap();
    let keys = tempfile::tempdir().unwrap();
    let other = new_identity(keys.path(), "other.txt");
    let wrong = [("KILN_IDENTITY", other.to_str().unwrap())];

    // Another key: every path refuses by name and changes nothing.
    for args in [
        &["run", "smol", "--prompt", "x"][..],
        &["store", "decrypt"][..],
    ] {
        let out = home.command(args).envs(wrong).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("none of") && err.contains("KILN_IDENTITY"),
            "{args:?}: {err}"
        );
    }
    let out = home
        .command(&["models", "verify", "--json"])
        .envs(wrong)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blobs"][0]["status"], "locked", "{v}");
    assert_eq!(
        blobs(&home).len(),
        1,
        "no temporary file left: {:?}",
        blobs(&home)
    );

    // An identity file that is not one, or is not there: named.
    let garbage = keys.path().join("garbage.txt");
    std::fs::write(&garbage, "hello\n").unwrap();
    let gone = keys.path().join("gone.txt");
    for (path, says) in [(&garbage, "not an age identity file"), (&gone, "gone.txt")] {
        let out = home
            .command(&["run", "smol", "--prompt", "x"])
            .env("KILN_IDENTITY", path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }

    // A truncated copy, run directly.
    let bytes = std::fs::read(&blob).unwrap();
    let cut = keys.path().join("cut.age");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = home.fails(&["run", cut.to_str().unwrap(), "--prompt", "x"]);
    assert!(
        err.contains("damaged") && err.contains("truncated"),
        "{err}"
    );

    // One byte changed in the store's blob.
    let mut flipped = bytes.clone();
    let at = bytes.len() / 2;
    flipped[at] ^= 0x01;
    std::fs::write(&blob, &flipped).unwrap();
    let err = home.fails(&["run", "smol", "--prompt", "x"]);
    assert!(
        err.contains("damaged") && err.contains("authentication"),
        "{err}"
    );
    let err = home.fails(&["serve", "--model", "smol", "--http", "127.0.0.1:0"]);
    assert!(err.contains("damaged"), "{err}");
    // The header is intact: what only needs it (the model's memory budget
    // in `kiln doctor`) reads it without decrypting the weights.
    let out = home.command(&["doctor", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["models"][0]["weights_bytes"].as_u64() > Some(50 << 20),
        "{v}"
    );
    let out = home.kiln(&["models", "verify", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["blobs"][0]["status"], "damaged", "{v}");
    assert!(home.fails(&["store", "decrypt"]).contains("damaged"));
    assert_eq!(
        serde_json::to_string(&home.registry().models().unwrap()).unwrap(),
        models_before,
        "the registry is unchanged"
    );
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        flipped,
        "the blob is left for the user to restore"
    );
    assert_eq!(blobs(&home).len(), 1, "{:?}", blobs(&home));
}

#[test]
fn logged_policy_decisions_hold_no_plaintext_and_still_replay() {
    let Some(dir) = kiln_tests::policies_dir() else {
        return;
    };
    let home = Home::default();
    home.ok(&["store", "encrypt"]);
    let module = dir.join("bm25_recency.wasm");
    home.ok(&["policy", "add", module.to_str().unwrap()]);
    let mut input = kiln_runtime::policy::synthetic_rank(12, 3);
    input.candidates[4].text = "fn secret_marker_for_the_test() {}".into();
    let file = home.path().join("rank.json");
    std::fs::write(&file, serde_json::to_string(&input).unwrap()).unwrap();
    let run = home.json(&[
        "policy",
        "run",
        "bm25-recency",
        "--input",
        file.to_str().unwrap(),
        "--json",
    ]);
    let id = run["run"]["decision_id"].as_i64().unwrap();

    let logged = home.registry().decision(id).unwrap().unwrap();
    assert!(logged.encrypted);
    for bytes in [&logged.input, logged.output.as_ref().unwrap()] {
        assert!(bytes.starts_with(b"age-encryption.org/v1\n"));
        assert!(!String::from_utf8_lossy(bytes).contains("secret_marker"));
    }
    let r = home.json(&["policy", "replay", &id.to_string(), "--json"]);
    assert_eq!(r["replay"]["identical"], true, "{r}");

    let keys = tempfile::tempdir().unwrap();
    let other = new_identity(keys.path(), "other.txt");
    let out = home
        .command(&["policy", "replay", &id.to_string()])
        .env("KILN_IDENTITY", &other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stored encrypted") && err.contains("KILN_IDENTITY"),
        "{err}"
    );
}

#[test]
fn a_kill_at_any_moment_of_store_encrypt_loses_nothing() {
    let Some(model) = smollm2() else { return };
    let home = Home::default();
    home.ok(&["models", "add", model.to_str().unwrap(), "--name", "smol"]);
    let sha = sha256_file(&model);
    for delay_ms in [20, 120, 250, 400, 600] {
        let mut child = home.command(&["store", "encrypt"]).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // Whatever the moment, the version reads, hashes right, and what
        // the kill left is an orphan that verify names and removes.
        let v = home.json(&["models", "verify", "--remove-orphans", "--json"]);
        assert_eq!(
            v["blobs"][0]["status"], "ok",
            "killed after {delay_ms} ms: {v}"
        );
        let m = &home.registry().models().unwrap()[0];
        assert_eq!(m.sha256, sha);
        assert_eq!(
            blobs(&home).len(),
            1,
            "after {delay_ms} ms: {:?}",
            blobs(&home)
        );
        if m.encrypted {
            home.ok(&["store", "decrypt"]);
        }
    }
    home.ok(&["store", "encrypt"]);
    assert_eq!(blobs(&home), [format!("sha256-{sha}.age")]);
}
