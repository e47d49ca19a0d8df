//! `kiln pull` against a local server that answers as the Hugging Face Hub
//! does (the file listing with LFS sha256s, `resolve/main/FILE` with Range
//! requests), on loopback only: a connection dropped mid-file resumes with
//! a Range request; a wrong hash, a missing repository, a gated one, an
//! ambiguous choice and an unreachable hub each give a clear error and
//! record nothing; a URL pulls too. `kiln store scrub` finds damaged and
//! missing blobs and, with --repair, fetches again those kiln pulled;
//! `kiln store gc` removes what no version uses.

use kiln_tests::{Home, tiny_model};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Hub {
    port: u16,
    /// One line per request: `PATH range=… auth=…`.
    log: Arc<Mutex<Vec<String>>>,
}

struct Files {
    q8: Vec<u8>,
    f16: Vec<u8>,
}

fn respond(
    mut s: &TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    cut: Option<usize>,
) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body[..cut.unwrap_or(body.len())]);
    let _ = s.flush();
}

fn serve_one(s: TcpStream, files: &Files, log: &Mutex<Vec<String>>, dropped: &Mutex<bool>) {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        match k.to_ascii_lowercase().as_str() {
            "range" => range = Some(v.trim().to_string()),
            "authorization" => auth = Some(v.trim().to_string()),
            _ => {}
        }
    }
    log.lock().unwrap().push(format!(
        "{path} range={} auth={}",
        range.as_deref().unwrap_or("-"),
        auth.as_deref().unwrap_or("-")
    ));
    let sha = |b: &[u8]| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b).unwrap();
        kiln_runtime::store::hash_file(&p, |_| {}).unwrap()
    };
    let listing = |entries: Vec<(&str, &[u8], String)>| {
        let v: Vec<serde_json::Value> = entries
            .into_iter()
            .map(|(p, b, oid)| {
                serde_json::json!({"type": "file", "path": p, "size": b.len(), "lfs": {"oid": oid, "size": b.len()}})
            })
            .chain([serde_json::json!({"type": "file", "path": "README.md", "size": 5})])
            .chain([serde_json::json!({"type": "directory", "path": "docs", "size": 0})])
            .collect();
        serde_json::to_vec(&v).unwrap()
    };
    let json = [("Content-Type", "application/json".to_string())];
    let gated_ok = auth.as_deref() == Some("Bearer secret");
    match path.as_str() {
        "/api/models/org/tiny-GGUF/tree/main?recursive=true" => {
            let body = listing(vec![
                ("tiny-q8_0.gguf", &files.q8, sha(&files.q8)),
                ("tiny-f16.gguf", &files.f16, sha(&files.f16)),
            ]);
            respond(&s, "200 OK", &json, &body, None)
        }
        "/api/models/org/bad-GGUF/tree/main?recursive=true" => {
            let body = listing(vec![("bad-q8_0.gguf", &files.q8, "ab".repeat(32))]);
            respond(&s, "200 OK", &json, &body, None)
        }
        "/api/models/org/gated-GGUF/tree/main?recursive=true" if gated_ok => {
            let body = listing(vec![("gated-f16.gguf", &files.f16, sha(&files.f16))]);
            respond(&s, "200 OK", &json, &body, None)
        }
        "/api/models/org/gated-GGUF/tree/main?recursive=true" => {
            respond(&s, "401 Unauthorized", &[], b"", None)
        }
        "/org/tiny-GGUF/resolve/main/tiny-q8_0.gguf"
        | "/org/bad-GGUF/resolve/main/bad-q8_0.gguf" => {
            let body = &files.q8;
            match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                Some(from) => {
                    let from: usize = from.trim_end_matches('-').parse().unwrap();
                    let cr = format!("bytes {from}-{}/{}", body.len() - 1, body.len());
                    respond(
                        &s,
                        "206 Partial Content",
                        &[("Content-Range", cr)],
                        &body[from..],
                        None,
                    )
                }
                None => {
                    // The first whole-file request of the tiny model is
                    // cut after a third: the connection drops.
                    let mut d = dropped.lock().unwrap();
                    let cut = (!*d && path.contains("tiny")).then_some(body.len() / 3);
                    *d |= cut.is_some();
                    respond(&s, "200 OK", &[], body, cut)
                }
            }
        }
        // A pull request's revision, as one path segment.
        "/api/models/org/tiny-GGUF/tree/refs%2Fpr%2F2?recursive=true" => {
            let body = listing(vec![("tiny-pr-f16.gguf", &files.f16, sha(&files.f16))]);
            respond(&s, "200 OK", &json, &body, None)
        }
        "/org/tiny-GGUF/resolve/main/tiny-f16.gguf"
        | "/org/tiny-GGUF/resolve/refs%2Fpr%2F2/tiny-pr-f16.gguf"
        | "/org/gated-GGUF/resolve/main/gated-f16.gguf" => {
            respond(&s, "200 OK", &[], &files.f16, None)
        }
        _ => respond(&s, "404 Not Found", &[], b"Repository not found", None),
    }
    // The client sees the close (mid-body where the response was cut).
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn hub() -> Hub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(Mutex::new(Vec::new()));
    let files = Files {
        q8: std::fs::read(tiny_model(&["--dtype", "f32", "--seed", "7"])).unwrap(),
        f16: std::fs::read(tiny_model(&["--dtype", "f16", "--seed", "7"])).unwrap(),
    };
    let (l, dropped) = (log.clone(), Mutex::new(false));
    std::thread::spawn(move || {
        // Bounded: at most 64 connections.
        for s in listener.incoming().take(64).flatten() {
            serve_one(s, &files, &l, &dropped);
        }
    });
    Hub { port, log }
}

/// `kiln ARGS` with the hub as `HF_ENDPOINT`, and no token or proxy
/// from the environment.
fn hub_command(home: &Home, hub_port: u16, args: &[&str]) -> std::process::Command {
    let mut c = home.command(args);
    c.env("HF_ENDPOINT", format!("http://127.0.0.1:{hub_port}"));
    for v in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "ALL_PROXY",
        "https_proxy",
        "http_proxy",
        "all_proxy",
    ] {
        c.env_remove(v);
    }
    c
}

fn pull(home: &Home, hub_port: u16, args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut c = hub_command(home, hub_port, &[&["pull"], args].concat());
    if let Some(t) = token {
        c.env("HF_TOKEN", t);
    }
    c.output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn pulls_from_a_hub_resuming_and_refuses_what_it_cannot_trust() {
    let home = Home::default();
    let hub = hub();
    let port = hub.port;

    // A dropped connection: resumed with a Range request, verified.
    let out = pull(&home, port, &["hf:org/tiny-GGUF:Q8_0"], None);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("resuming at byte") && t.contains("now active"),
        "{t}"
    );
    let log = hub.log.lock().unwrap().clone();
    let ranged: Vec<_> = log
        .iter()
        .filter(|l| l.contains("tiny-q8_0") && !l.contains("range=-"))
        .collect();
    assert_eq!(ranged.len(), 1, "{log:?}");
    let models = home.registry().models().unwrap();
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!((m.name.as_str(), m.state.as_str()), ("tiny-q8_0", "active"));
    assert_eq!(m.origin.as_deref(), Some("hf:org/tiny-GGUF/tiny-q8_0.gguf"));
    assert_eq!(
        m.sha256,
        kiln_runtime::store::hash_file(&tiny_model(&["--dtype", "f32", "--seed", "7"]), |_| {})
            .unwrap()
    );
    let downloads = home.path().join("models/downloads");
    assert_eq!(
        std::fs::read_dir(&downloads).unwrap().count(),
        0,
        "no partial file is left"
    );
    home.ok(&["run", "tiny-q8_0", "--prompt", "a", "--max-tokens", "2"]);

    // Errors that record nothing.
    let before = home.registry_snapshot();
    let out = pull(&home, port, &["hf:org/tiny-GGUF"], None);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("several GGUF files") && t.contains("tiny-f16.gguf"),
        "{t}"
    );
    let out = pull(&home, port, &["hf:org/bad-GGUF"], None);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("the hub publishes"),
        "{t}"
    );
    assert_eq!(
        std::fs::read_dir(&downloads).unwrap().count(),
        0,
        "the bad download is removed"
    );
    let out = pull(&home, port, &["hf:org/missing-GGUF"], None);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("HTTP 404") && t.contains("no such repository"),
        "{t}"
    );
    let out = pull(&home, port, &["hf:org/gated-GGUF"], None);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("HTTP 401") && t.contains("HF_TOKEN"),
        "{t}"
    );
    let out = pull(&home, 1, &["hf:org/tiny-GGUF"], None);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("cannot reach 127.0.0.1:1") && t.contains("offline"),
        "{t}"
    );
    let out = pull(&home, port, &["org/tiny-GGUF"], None);
    assert!(text(&out).contains("hf:ORG/REPO"), "{}", text(&out));
    assert_eq!(home.registry_snapshot(), before);

    // A token opens the gated repository; it is sent to the hub only.
    let out = pull(&home, port, &["hf:org/gated-GGUF"], Some("secret"));
    assert!(out.status.success(), "{}", text(&out));
    // A URL, named.
    let url = format!("http://127.0.0.1:{port}/org/tiny-GGUF/resolve/main/tiny-f16.gguf");
    let out = pull(&home, port, &[&url, "--name", "from-url"], None);
    assert!(out.status.success(), "{}", text(&out));
    let mut names: Vec<String> = home
        .registry()
        .models()
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    names.sort();
    assert_eq!(names, vec!["from-url", "gated-f16", "tiny-q8_0"]);

    // A revision: its own listing and files; a revision the hub does not
    // have is a 404 that records nothing.
    let out = pull(&home, port, &["hf:org/tiny-GGUF@refs/pr/2"], None);
    assert!(out.status.success(), "{}", text(&out));
    let m = home.registry().model("tiny-pr-f16").unwrap().unwrap();
    assert_eq!(
        m.origin.as_deref(),
        Some("hf:org/tiny-GGUF@refs/pr/2/tiny-pr-f16.gguf")
    );
    let before = home.registry_snapshot();
    let out = pull(&home, port, &["hf:org/tiny-GGUF@v9:Q8_0"], None);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("HTTP 404") && t.contains("tree/v9"),
        "{t}"
    );
    assert_eq!(home.registry_snapshot(), before);
}

fn with_hub(home: &Home, hub_port: u16, args: &[&str]) -> std::process::Output {
    hub_command(home, hub_port, args).output().unwrap()
}

#[test]
fn scrub_reports_damage_and_repairs_pulled_models_from_their_source() {
    let home = Home::default();
    let hub = hub();
    let port = hub.port;
    // From the hub, from a URL, and added from a file (no source known).
    let url = format!("http://127.0.0.1:{port}/org/tiny-GGUF/resolve/main/tiny-f16.gguf");
    for args in [
        vec!["pull", "hf:org/tiny-GGUF:Q8_0"],
        vec!["pull", &url, "--name", "from-url"],
    ] {
        let out = with_hub(&home, port, &args);
        assert!(out.status.success(), "{}", text(&out));
    }
    let local = tiny_model(&["--dtype", "f16", "--seed", "11"]);
    let out = home
        .command(&["models", "add", local.to_str().unwrap(), "--name", "local"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let scrub = |args: &[&str]| -> (std::process::Output, serde_json::Value) {
        let out = with_hub(&home, port, &[&["store", "scrub", "--json"], args].concat());
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
        (out, v)
    };
    let status = |v: &serde_json::Value, model: &str| -> (String, String) {
        let b = (v["blobs"].as_array().unwrap().iter())
            .find(|b| b["versions"][0].as_str().unwrap().starts_with(model))
            .unwrap_or_else(|| panic!("{model}: {v}"));
        (
            b["status"].as_str().unwrap().to_string(),
            b["repair"].as_str().unwrap_or("").to_string(),
        )
    };
    // A ranking policy's blob is scrubbed too (reported, not repaired).
    let policy = kiln_tests::policies_dir().map(|dir| {
        let module = dir.join("jaccard.wasm");
        let out = home
            .command(&["policy", "add", module.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        home.registry().policies().unwrap()[0].clone()
    });
    let (out, v) = scrub(&[]);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["damaged"], 0, "{v}");
    if let Some(p) = &policy {
        let mut bytes = std::fs::read(&p.blob_path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&p.blob_path, bytes).unwrap();
        let (out, v) = scrub(&["--repair"]);
        assert_eq!(out.status.code(), Some(1), "{v}");
        let (status, why) = status(&v, &p.name);
        assert_eq!(status, "corrupt", "{v}");
        assert!(why.contains("no source for policies"), "{why}");
        std::fs::remove_file(&p.blob_path).unwrap();
        let module = kiln_tests::policies_dir().unwrap().join("jaccard.wasm");
        std::fs::copy(module, &p.blob_path).unwrap();
    }

    // A byte flipped in two blobs, the third deleted.
    for m in home.registry().models().unwrap() {
        if m.name == "from-url" {
            std::fs::remove_file(&m.blob_path).unwrap();
        } else {
            let mut bytes = std::fs::read(&m.blob_path).unwrap();
            let at = bytes.len() / 2;
            bytes[at] ^= 0x40;
            std::fs::write(&m.blob_path, bytes).unwrap();
        }
    }
    let before = home.registry_snapshot();
    let (out, v) = scrub(&[]);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["damaged"], 3, "{v}");
    assert_eq!(status(&v, "tiny-q8_0").0, "corrupt");
    assert_eq!(status(&v, "from-url").0, "missing");
    assert_eq!(status(&v, "local").0, "corrupt");
    assert_eq!(
        home.registry_snapshot(),
        before,
        "a scrub without --repair changes nothing"
    );

    // Repaired where kiln pulled them; the added one is said to have no
    // source, and stays as it is.
    let (out, v) = scrub(&["--repair"]);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["damaged"], 1, "{v}");
    assert_eq!(status(&v, "tiny-q8_0").1, "repaired", "{v}");
    assert_eq!(status(&v, "from-url").1, "repaired", "{v}");
    let (_, why) = status(&v, "local");
    assert!(why.contains("does not know where it came from"), "{why}");
    let verify = home
        .command(&["models", "verify", "--json"])
        .output()
        .unwrap();
    let verified: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    for m in verified["blobs"].as_array().unwrap() {
        let want = if m["model"].as_str().unwrap().starts_with("local") {
            "corrupt"
        } else {
            "ok"
        };
        assert_eq!(m["status"], want, "{m}");
    }
    let audit = home.registry().audit_log(100).unwrap();
    let repairs = audit
        .iter()
        .filter(|e| e.kind == "store" && e.action == "repair")
        .count();
    assert_eq!(repairs, 2, "{audit:?}");
    // Nothing downloaded is left behind.
    let downloads = home.path().join("models").join("downloads");
    let left: Vec<_> = std::fs::read_dir(&downloads)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // A source that now serves other bytes (as a file replaced upstream):
    // the download is refused by its hash, the blob left as it was.
    let q8 = home.registry().model("tiny-q8_0").unwrap().unwrap();
    let mut bytes = std::fs::read(&q8.blob_path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&q8.blob_path, &bytes).unwrap();
    let db = rusqlite::Connection::open(home.path().join("kiln.db")).unwrap();
    db.execute(
        "UPDATE models SET origin = ?1 WHERE name = 'tiny-q8_0'",
        [&url],
    )
    .unwrap();
    drop(db);
    let (out, v) = scrub(&["--repair"]);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let (_, why) = status(&v, "tiny-q8_0");
    assert!(
        why.starts_with("not repaired") && why.contains(&q8.sha256),
        "{why}"
    );
    assert_eq!(std::fs::read(&q8.blob_path).unwrap(), bytes);

    // A blob no version names: listed by a dry run, removed by gc, audited.
    let blobs = home.path().join("models").join("blobs");
    let orphan = blobs.join(format!("sha256-{}", "0".repeat(64)));
    std::fs::write(&orphan, b"left by an add that was killed").unwrap();
    let gc = |args: &[&str]| -> serde_json::Value {
        let out = home
            .command(&[&["store", "gc", "--json"], args].concat())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let dry = gc(&["--dry-run"]);
    assert_eq!(dry["files"][0]["path"], orphan.to_str().unwrap(), "{dry}");
    assert!(orphan.exists());
    let done = gc(&[]);
    assert_eq!(done["files"].as_array().unwrap().len(), 1, "{done}");
    assert!(!orphan.exists());
    assert!(
        (home.registry().audit_log(100).unwrap().iter())
            .any(|e| e.kind == "store" && e.action == "gc"),
    );
    // Every version's blob is still there.
    assert_eq!(gc(&["--dry-run"])["files"].as_array().unwrap().len(), 0);
}

/// Limits the command's files to `bytes` (a write past it fails with
/// EFBIG rather than killing the process): a full disk as one process
/// meets it, on any file system, without root.
fn no_room_past(c: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls async-signal-safe functions.
    unsafe {
        c.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn no_room_for_an_add_or_a_pull_records_nothing_and_leaves_no_partial_file() {
    let home = Home::default();
    let hub = hub();
    let port = hub.port;
    // A first model, so that the registry exists below the limit.
    let small = tiny_model(&["--dtype", "f16", "--seed", "11"]);
    let out = home
        .command(&["models", "add", small.to_str().unwrap(), "--name", "first"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let before = home.registry_snapshot();
    let files = |dir: &str| -> Vec<String> {
        std::fs::read_dir(home.path().join("models").join(dir))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let blobs_before = files("blobs");
    let limit = 256 << 10;

    // Run with no room past `limit`: refused with `says`, nothing
    // recorded, no partial file left in the store or the downloads.
    let refused = |mut c: std::process::Command, says: &[&str]| {
        no_room_past(&mut c, limit);
        let out = c.output().unwrap();
        let t = text(&out);
        assert!(!out.status.success(), "{t}");
        assert!(says.iter().all(|s| t.contains(s)), "{t}");
        assert_eq!(home.registry_snapshot(), before);
        assert_eq!(files("blobs"), blobs_before, "a partial copy was left");
        assert!(files("downloads").is_empty(), "{:?}", files("downloads"));
    };
    // An add whose copy does not fit (the model is 621 KiB), and a pull
    // whose download does not.
    let big = tiny_model(&["--dtype", "f32", "--seed", "7"]);
    refused(
        home.command(&["models", "add", big.to_str().unwrap(), "--name", "big"]),
        &["there is no room for it", "nothing was recorded"],
    );
    refused(
        hub_command(&home, port, &["pull", "hf:org/tiny-GGUF:Q8_0"]),
        &["no room for the download", "the partial file was removed"],
    );

    // With room again, both go through.
    let out = home
        .command(&["models", "add", big.to_str().unwrap(), "--name", "big"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = with_hub(&home, port, &["pull", "hf:org/tiny-GGUF:Q8_0"]);
    assert!(out.status.success(), "{}", text(&out));
}
