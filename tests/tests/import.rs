//! `kiln models import` on stores laid out as the Hugging Face cache,
//! Ollama and LM Studio lay them out, with real GGUF files: models are
//! registered without copying (the store's blob is a hard link to the
//! file), checked against the sha256 their source names them by, Ollama's
//! template and parameters are kept, importing again changes nothing, and
//! a damaged file, a split file or a stray file are reported while the
//! rest imports.

use kiln_tests::{Home, tiny_model};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

fn sha256(path: &Path) -> String {
    kiln_runtime::store::hash_file(path, |_| {}).unwrap()
}

/// `kiln` with `HOME` (and no other store variables) set to `user`.
fn kiln(home: &Home, user: &Path, args: &[&str]) -> Command {
    let mut c = home.command(args);
    c.env("HOME", user)
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env_remove("OLLAMA_MODELS");
    c
}

#[test]
fn imports_from_hugging_face_ollama_and_lm_studio_without_copying() {
    let home = Home::default();
    let user = tempfile::tempdir().unwrap();
    let u = user.path();
    let model = tiny_model(&["--dtype", "f16"]);
    let other = tiny_model(&["--dtype", "f32"]);
    let (sha, other_sha) = (sha256(&model), sha256(&other));

    // Hugging Face: a snapshot's file is a link to a blob named by sha256;
    // a second repo's blob is damaged (its bytes are not its name).
    let hf = u.join(".cache/huggingface/hub");
    let repo = hf.join("models--Org--Tiny-GGUF");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
    std::fs::copy(&model, repo.join("blobs").join(&sha)).unwrap();
    std::os::unix::fs::symlink(
        format!("../../blobs/{sha}"),
        repo.join("snapshots/abc123/tiny-f16.gguf"),
    )
    .unwrap();
    let bad = hf.join("models--Org--Damaged-GGUF");
    std::fs::create_dir_all(bad.join("blobs")).unwrap();
    std::fs::create_dir_all(bad.join("snapshots/def456")).unwrap();
    let wrong = "0".repeat(64);
    std::fs::copy(&other, bad.join("blobs").join(&wrong)).unwrap();
    std::os::unix::fs::symlink(
        format!("../../blobs/{wrong}"),
        bad.join("snapshots/def456/damaged.gguf"),
    )
    .unwrap();

    // Ollama: a manifest naming the model, template and params blobs.
    let ollama = u.join(".ollama/models");
    std::fs::create_dir_all(ollama.join("blobs")).unwrap();
    let blob = |digest: &str| ollama.join("blobs").join(digest.replacen(':', "-", 1));
    std::fs::copy(&other, blob(&format!("sha256:{other_sha}"))).unwrap();
    let template = "{{ .System }}\n{{ .Prompt }}";
    let params = r#"{"stop":["<|endoftext|>"],"temperature":0.2}"#;
    std::fs::write(blob(&format!("sha256:{}", "1".repeat(64))), template).unwrap();
    std::fs::write(blob(&format!("sha256:{}", "2".repeat(64))), params).unwrap();
    let manifests = ollama.join("manifests/registry.ollama.ai/library/tiny-coder");
    std::fs::create_dir_all(&manifests).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{other_sha}"), "size": 1},
            {"mediaType": "application/vnd.ollama.image.template", "digest": format!("sha256:{}", "1".repeat(64)), "size": 1},
            {"mediaType": "application/vnd.ollama.image.params", "digest": format!("sha256:{}", "2".repeat(64)), "size": 1},
        ]
    });
    std::fs::write(manifests.join("latest"), manifest.to_string()).unwrap();

    // LM Studio: a model (the same bytes as the Hugging Face one, under
    // another name), a split file and a file that is not GGUF.
    let lms = u.join(".lmstudio/models/pub/tiny-repo");
    std::fs::create_dir_all(&lms).unwrap();
    let studio_file = lms.join("tiny-studio.gguf");
    std::fs::copy(&other, &studio_file).unwrap();
    std::fs::write(lms.join("big-00001-of-00002.gguf"), b"GGUF").unwrap();
    std::fs::write(lms.join("notes.gguf"), b"not a model").unwrap();

    let listed = kiln(&home, u, &["models", "import", "--list", "--json"])
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["found"].as_array().unwrap().len(), 4, "{listed}");
    let skipped = listed["skipped"].to_string();
    assert!(
        skipped.contains("split GGUF") && skipped.contains("GGUF magic"),
        "{skipped}"
    );
    assert!(
        home.registry().models().unwrap().is_empty(),
        "--list registers nothing"
    );

    let out = kiln(&home, u, &["models", "import"]).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // One damaged file: reported, exit status 1, the others imported.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("hf:Org/Damaged-GGUF/damaged.gguf")
            && stderr.contains("but its source names it"),
        "{stderr}"
    );
    assert!(stdout.contains("hard-linked, no copy"), "{stdout}");
    let models = home.registry().models().unwrap();
    let by_origin = |o: &str| {
        models
            .iter()
            .find(|m| m.origin.as_deref() == Some(o))
            .unwrap_or_else(|| panic!("{o} not registered: {stdout}"))
    };
    let hf_model = by_origin("hf:Org/Tiny-GGUF/tiny-f16.gguf");
    assert_eq!(
        (hf_model.name.as_str(), hf_model.sha256.as_str()),
        ("tiny-f16", sha.as_str())
    );
    let ol = by_origin("ollama:tiny-coder:latest");
    assert_eq!(ol.name, "tiny-coder-latest");
    assert_eq!(ol.chat_template.as_deref(), Some(template));
    assert_eq!(ol.params.as_deref(), Some(params));
    // LM Studio's file has the Ollama model's bytes: already registered.
    assert!(
        stdout.contains("lmstudio:pub/tiny-repo/tiny-studio.gguf is already tiny-coder-latest@1"),
        "{stdout}"
    );
    assert_eq!(models.len(), 2, "{models:?}");
    // No copies: each blob is the source file's inode.
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&hf_model.blob_path),
        ino(&repo.join("blobs").join(&sha))
    );
    assert_eq!(
        ino(&ol.blob_path),
        ino(&blob(&format!("sha256:{other_sha}")))
    );

    // Again, the damaged download gone: nothing new.
    std::fs::remove_dir_all(&bad).unwrap();
    let before = home.registry_snapshot();
    let again = kiln(&home, u, &["models", "import", "--from", "hf,ollama"])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("is already tiny-f16@1"));
    assert_eq!(home.registry_snapshot(), before);

    // The imported models verify and run.
    let verify = home.json(&["models", "verify", "--json"]);
    assert!(verify.to_string().contains("\"ok\""), "{verify}");
    home.ok(&[
        "run",
        "tiny-coder-latest",
        "--prompt",
        "a",
        "--max-tokens",
        "2",
    ]);
    let err = kiln(&home, u, &["models", "import", "--from", "pip"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&err.stderr).contains("choose hf, ollama or lmstudio"));
}
