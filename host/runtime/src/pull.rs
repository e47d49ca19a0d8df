//! `kiln pull`: a GGUF model from the Hugging Face Hub (`hf:ORG/REPO`,
//! `hf:ORG/REPO:FILE`, `hf:ORG/REPO:Q4_K_M`, at a branch, tag or commit
//! with `hf:ORG/REPO@REVISION…`) or from any URL, into the model store.
//!
//! - The hub's file listing (`/api/models/REPO/tree/REVISION`) gives each
//!   file's size and, for files in Git LFS (every GGUF), its sha256; the
//!   download is checked against it before anything is registered.
//! - Downloads go to `$KILN_HOME/models/downloads/` and resume with an HTTP
//!   `Range` request: after a dropped connection (up to [`ATTEMPTS`] tries
//!   per run) and across runs (the partial file stays until it completes).
//! - `HF_ENDPOINT` (a mirror, or a local server in the tests), `HF_TOKEN`
//!   (gated models), and the proxy variables (`HTTPS_PROXY`, `ALL_PROXY`,
//!   `NO_PROXY`, …) are honoured. HTTPS is rustls with the aws-lc-rs
//!   provider and the webpki root certificates.
//!
//! Nothing but the model file is fetched, and only when asked.

use crate::store::{self, AddOptions, StoreError};
use kiln_registry::config::Config;
use kiln_registry::{ModelRecord, Registry};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Tries per download in one run (each resumes where the last stopped).
pub const ATTEMPTS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{0}")]
    Spec(String),
    #[error(
        "cannot reach {host}: {why} (offline? `kiln models import` registers models you already have; HF_ENDPOINT points at a mirror)"
    )]
    Offline { host: String, why: String },
    #[error("{url}: HTTP {status}{hint}")]
    Http {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("{0}")]
    Choice(String),
    #[error(
        "{url}: the download's sha256 is {got}, but the hub publishes {want}; the partial file was removed, nothing was recorded (run the command again to download it anew)"
    )]
    HashMismatch {
        url: String,
        got: String,
        want: String,
    },
    #[error(
        "{url}: interrupted after {done} of {total} bytes ({why}); run the same command again to resume"
    )]
    Interrupted {
        url: String,
        done: u64,
        total: String,
        why: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{path}: {source}: there is no room for the download (the disk is full, or a quota or file-size limit is reached); the partial file was removed and nothing was recorded: free some space and pull again"
    )]
    NoSpace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    /// A hub repository at a revision (`main` unless named), and a file
    /// name or quantization to choose by.
    Hub {
        repo: String,
        revision: Option<String>,
        select: Option<String>,
    },
    Url(String),
}

impl Spec {
    pub fn parse(s: &str) -> Result<Spec, PullError> {
        if s.starts_with("https://") || s.starts_with("http://") {
            return Ok(Spec::Url(s.to_string()));
        }
        let Some(rest) = s.strip_prefix("hf:") else {
            return Err(PullError::Spec(format!(
                "{s:?}: say hf:ORG/REPO[@REVISION][:FILE-or-QUANT] (e.g. hf:Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:Q4_K_M) or an https:// URL of a .gguf file"
            )));
        };
        let (repo, select) = match rest.split_once(':') {
            Some((r, sel)) => (r, Some(sel.to_string())),
            None => (rest, None),
        };
        let (repo, revision) = match repo.split_once('@') {
            Some((r, rev)) => {
                // Branches, tags, commits and `refs/pr/N`.
                let fine = !rev.is_empty()
                    && !rev.contains("..")
                    && !rev.starts_with('/')
                    && !rev.ends_with('/')
                    && rev
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
                if !fine {
                    return Err(PullError::Spec(format!(
                        "{rev:?} is not a revision (a branch, tag or commit of the repository)"
                    )));
                }
                (r, Some(rev.to_string()))
            }
            None => (repo, None),
        };
        let ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        match repo.split_once('/') {
            Some((org, name)) if ok(org) && ok(name) => Ok(Spec::Hub {
                repo: repo.to_string(),
                revision,
                select: select.filter(|s| !s.is_empty()),
            }),
            _ => Err(PullError::Spec(format!(
                "{repo:?} is not a hub repository name (ORG/REPO)"
            ))),
        }
    }
}

/// A file the hub lists.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
    pub sha256: Option<String>,
}

/// The hub's endpoint and token, and an HTTP agent.
pub struct Client {
    agent: ureq::Agent,
    endpoint: String,
    token: Option<String>,
}

impl Client {
    /// From `HF_ENDPOINT` (default `https://huggingface.co`) and `HF_TOKEN`
    /// (or `HUGGING_FACE_HUB_TOKEN`).
    pub fn from_env() -> Client {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let crypto = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(crypto)
            .root_certs(ureq::tls::RootCerts::WebPki)
            .build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .proxy(ureq::Proxy::try_from_env())
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_body(None)
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build();
        Client {
            agent: config.into(),
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
        }
    }

    fn get(
        &self,
        url: &str,
        range_from: u64,
    ) -> Result<ureq::http::Response<ureq::Body>, PullError> {
        let mut req = self.agent.get(url);
        // The token goes to the hub only, never to another host.
        if let Some(t) = &self.token
            && url.starts_with(&self.endpoint)
        {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        if range_from > 0 {
            req = req.header("Range", &format!("bytes={range_from}-"));
        }
        req.call().map_err(|e| PullError::Offline {
            host: host_of(url),
            why: e.to_string(),
        })
    }

    /// Every file of `repo` at `revision`.
    pub fn list(&self, repo: &str, revision: &str) -> Result<Vec<RemoteFile>, PullError> {
        let url = format!(
            "{}/api/models/{repo}/tree/{}?recursive=true",
            self.endpoint,
            url_revision(revision)
        );
        let mut resp = self.get(&url, 0)?;
        check_status(&url, resp.status().as_u16(), self.token.is_some())?;
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(rename = "type")]
            kind: String,
            path: String,
            #[serde(default)]
            size: u64,
            lfs: Option<Lfs>,
        }
        #[derive(serde::Deserialize)]
        struct Lfs {
            oid: String,
        }
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| PullError::Offline {
                host: host_of(&url),
                why: e.to_string(),
            })?;
        let entries: Vec<Entry> = serde_json::from_str(&body).map_err(|e| {
            PullError::Spec(format!(
                "{url}: not a file listing the hub would send ({e})"
            ))
        })?;
        Ok(entries
            .into_iter()
            .filter(|e| e.kind == "file")
            .map(|e| RemoteFile {
                path: e.path,
                size: e.size,
                sha256: e.lfs.map(|l| l.oid.to_lowercase()),
            })
            .collect())
    }

    /// Where a file of a repository at `revision` is downloaded from.
    pub fn file_url(&self, repo: &str, revision: &str, path: &str) -> String {
        format!(
            "{}/{repo}/resolve/{}/{path}",
            self.endpoint,
            url_revision(revision)
        )
    }
}

/// A revision as one path segment (`refs/pr/1` → `refs%2Fpr%2F1`).
fn url_revision(revision: &str) -> String {
    revision.replace('/', "%2F")
}

fn host_of(url: &str) -> String {
    url.split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or(url)
        .to_string()
}

fn check_status(url: &str, status: u16, has_token: bool) -> Result<(), PullError> {
    let hint = match status {
        200..=299 => return Ok(()),
        401 | 403 if has_token => ": the token (HF_TOKEN) does not give access to it",
        401 | 403 => ": a gated or private repository; set HF_TOKEN to a token that may read it",
        404 => ": no such repository or file (check the name)",
        429 => ": rate-limited; wait and try again",
        _ => "",
    };
    Err(PullError::Http {
        url: url.to_string(),
        status,
        hint,
    })
}

/// The GGUF file of `files` that `select` names (a file name, or a
/// quantization such as `Q4_K_M`, any case), or the only one, or the
/// Q4_K_M one.
pub fn choose<'a>(
    repo: &str,
    files: &'a [RemoteFile],
    select: Option<&str>,
) -> Result<&'a RemoteFile, PullError> {
    let ggufs: Vec<&RemoteFile> = files
        .iter()
        .filter(|f| f.path.to_lowercase().ends_with(".gguf") && !is_split(&f.path))
        .collect();
    let names = || {
        ggufs
            .iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if ggufs.is_empty() {
        return Err(PullError::Choice(format!(
            "hf:{repo} has no single-file GGUF model (split GGUF files are not supported)"
        )));
    }
    let stem = |f: &RemoteFile| {
        let name = f.path.rsplit('/').next().unwrap_or(&f.path).to_lowercase();
        name.trim_end_matches(".gguf").to_string()
    };
    let pick = |sel: &str| -> Vec<&'a RemoteFile> {
        let sel = sel.to_lowercase();
        if let Some(f) = ggufs.iter().find(|f| f.path.to_lowercase() == sel) {
            return vec![f];
        }
        ggufs
            .iter()
            .copied()
            .filter(|f| {
                let s = stem(f);
                s.ends_with(&format!("-{sel}")) || s.ends_with(&format!(".{sel}")) || s == sel
            })
            .collect()
    };
    let matched = match select {
        Some(sel) => pick(sel),
        None if ggufs.len() == 1 => ggufs.clone(),
        None => pick("q4_k_m"),
    };
    match matched.as_slice() {
        [one] => Ok(one),
        [] => Err(PullError::Choice(match select {
            Some(sel) => format!("hf:{repo} has no GGUF file for {sel:?}; it has {}", names()),
            None => format!(
                "hf:{repo} has several GGUF files; choose one with hf:{repo}:FILE-or-QUANT: {}",
                names()
            ),
        })),
        many => Err(PullError::Choice(format!(
            "{:?} matches several files of hf:{repo}: {}; name the file",
            select.unwrap_or("q4_k_m"),
            many.iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn is_split(path: &str) -> bool {
    let p = path.to_lowercase();
    p.trim_end_matches(".gguf")
        .rsplit_once("-of-")
        .is_some_and(|(_, t)| t.len() == 5 && t.bytes().all(|b| b.is_ascii_digit()))
}

/// What `pull` did.
#[derive(Clone, Debug, Serialize)]
pub struct Pulled {
    pub model: ModelRecord,
    pub url: String,
    /// Bytes fetched in this run (less than the file when resumed).
    pub fetched_bytes: u64,
    /// How many times the download resumed after a dropped connection.
    pub resumed: usize,
}

/// What a pull tells as it goes.
pub enum Event<'a> {
    /// Bytes of the file on disk, of the total where known.
    Progress { done: u64, total: Option<u64> },
    /// A line worth telling (the file chosen, resuming, verifying).
    Note(&'a str),
}

/// Downloads `spec` into the store and registers it (named `name`, else
/// after the file), telling `event` how it goes.
pub fn pull(
    config: &Config,
    registry: &mut Registry,
    client: &Client,
    spec: &Spec,
    name: Option<&str>,
    actor: &str,
    mut event: impl FnMut(Event<'_>),
) -> Result<Pulled, PullError> {
    let mut note = |line: &str| event(Event::Note(line));
    let (url, file_name, size, sha256, origin) = match spec {
        Spec::Hub {
            repo,
            revision,
            select,
        } => {
            let rev = revision.as_deref().unwrap_or("main");
            let files = client.list(repo, rev)?;
            // Named as the user wrote it, for the messages and the origin.
            let at = revision.as_ref().map_or(String::new(), |r| format!("@{r}"));
            let f = choose(&format!("{repo}{at}"), &files, select.as_deref())?;
            note(&format!(
                "hf:{repo}{at}: {} ({:.1} MiB)",
                f.path,
                f.size as f64 / (1 << 20) as f64
            ));
            (
                client.file_url(repo, rev, &f.path),
                f.path.rsplit('/').next().unwrap_or(&f.path).to_string(),
                Some(f.size).filter(|&s| s > 0),
                f.sha256.clone(),
                format!("hf:{repo}{at}/{}", f.path),
            )
        }
        Spec::Url(u) => {
            let file = u.rsplit('/').next().unwrap_or("model.gguf");
            let file = file.split('?').next().unwrap_or(file).to_string();
            (u.clone(), file, None, None, u.clone())
        }
    };
    let dir = downloads_dir(config)?;
    // One partial file per file, so that a second run resumes it: named by
    // the hub's sha256 where it gives one (a new revision behind the same
    // URL starts afresh), else by the URL.
    let key: String = match &sha256 {
        Some(sha) => sha.clone(),
        None => Sha256::digest(url.as_bytes())
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect(),
    };
    let partial = dir.join(format!("{key}.partial"));
    let (fetched, resumed) = download(client, &url, &partial, size, &mut event)?;
    event(Event::Note("verifying the download"));
    let stem = file_name
        .trim_end_matches(".gguf")
        .trim_end_matches(".GGUF");
    let how = AddOptions {
        name: Some(name.map_or_else(|| store::name_from(stem), str::to_string)),
        link: true,
        // The store hashes what it links in (once) and holds it to the
        // hub's sha256.
        expected_sha256: sha256,
        origin: Some(origin),
        ..AddOptions::default()
    };
    let added = store::add_with(config, registry, &partial, &how, actor, |_, _| {});
    // The blob is a hard link to (or a copy of) the download: the partial
    // name goes either way. A download that is not the hub's file goes
    // too; a model refused otherwise stays to be looked at.
    let (model, _, _) = match added {
        Ok(added) => {
            let _ = std::fs::remove_file(&partial);
            added
        }
        Err(StoreError::HashMismatch { got, want, .. }) => {
            let _ = std::fs::remove_file(&partial);
            return Err(PullError::HashMismatch { url, got, want });
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Pulled {
        model,
        url,
        fetched_bytes: fetched,
        resumed,
    })
}

/// Fetches `url` into `partial`, resuming from its length; returns the
/// bytes fetched and how many times it resumed after a dropped connection.
/// `$KILN_HOME/models/downloads`, created: where downloads are kept
/// (resumable) until the store takes them.
fn downloads_dir(config: &Config) -> Result<PathBuf, PullError> {
    let dir = store::blobs_dir(config).with_file_name("downloads");
    std::fs::create_dir_all(&dir).map_err(|source| PullError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Where the file a version came from can be fetched again: its origin
/// as `kiln pull` records it (`hf:ORG/NAME[@REVISION]/PATH`, or the URL),
/// else `None` (an added or imported file). A revision is one path
/// segment (a branch, a tag, a commit), or three when it starts with
/// `refs/` (`refs/pr/2`).
pub fn source_url(client: &Client, origin: &str) -> Option<String> {
    if origin.starts_with("http://") || origin.starts_with("https://") {
        return Some(origin.to_string());
    }
    let (org, rest) = origin.strip_prefix("hf:")?.split_once('/')?;
    let (repo, revision, path) = match rest.split_once('@') {
        Some((name, after)) if !name.contains('/') => {
            let segments = if after.starts_with("refs/") { 3 } else { 1 };
            let mut cut = after.splitn(segments + 1, '/');
            let revision: Vec<&str> = (&mut cut).take(segments).collect();
            (name, revision.join("/"), cut.next()?)
        }
        _ => {
            let (name, path) = rest.split_once('/')?;
            (name, "main".to_string(), path)
        }
    };
    (!path.is_empty()).then(|| client.file_url(&format!("{org}/{repo}"), &revision, path))
}

/// Downloads again the file a version came from (`kiln store scrub
/// --repair`), into the downloads directory (resumed where a partial is
/// there), and returns it; the caller checks its hash.
pub fn refetch(
    config: &Config,
    client: &Client,
    origin: &str,
    sha256: &str,
    mut event: impl FnMut(Event<'_>),
) -> Result<PathBuf, PullError> {
    let url = source_url(client, origin).ok_or_else(|| {
        PullError::Spec(format!(
            "{origin} is not a source kiln can download again (only `kiln pull`'s are)"
        ))
    })?;
    let dir = downloads_dir(config)?;
    let partial = dir.join(format!("{sha256}.partial"));
    download(client, &url, &partial, None, &mut event)?;
    Ok(partial)
}

fn download(
    client: &Client,
    url: &str,
    partial: &Path,
    size: Option<u64>,
    event: &mut impl FnMut(Event<'_>),
) -> Result<(u64, usize), PullError> {
    let io = |source| PullError::Io {
        path: partial.to_path_buf(),
        source,
    };
    // A write that finds no room: the partial file would only hold on to
    // the space that is missing.
    let written = |r: std::io::Result<()>| {
        r.map_err(|source| {
            if store::out_of_space(&source) {
                let _ = std::fs::remove_file(partial);
                PullError::NoSpace {
                    path: partial.to_path_buf(),
                    source,
                }
            } else {
                io(source)
            }
        })
    };
    let (mut fetched, mut resumed) = (0u64, 0usize);
    let mut last_error = String::new();
    for attempt in 0..ATTEMPTS {
        let have = std::fs::metadata(partial).map_or(0, |m| m.len());
        if size.is_some_and(|s| have == s) {
            return Ok((fetched, resumed));
        }
        if have > 0 {
            event(Event::Note(&format!("resuming at byte {have}")));
            if attempt > 0 {
                resumed += 1;
            }
        }
        let mut resp = match client.get(url, have) {
            Ok(r) => r,
            Err(e) if attempt + 1 < ATTEMPTS => {
                last_error = e.to_string();
                std::thread::sleep(Duration::from_millis(200 << attempt));
                continue;
            }
            Err(e) => return Err(e),
        };
        let status = resp.status().as_u16();
        if status == 416 && have > 0 {
            // Asked past the end: what we have is all there is.
            return Ok((fetched, resumed));
        }
        check_status(url, status, client.token.is_some())?;
        // 206: the rest; 200: the whole file (the server ignored Range).
        let start = if status == 206 { have } else { 0 };
        let total = size.or_else(|| {
            resp.headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(|n| n + start)
        });
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(start == 0)
            .append(start > 0)
            .open(partial)
            .map_err(io)?;
        let mut reader = resp.body_mut().as_reader();
        let mut done = start;
        let mut buf = vec![0u8; 1 << 20];
        let outcome = loop {
            match reader.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    written(out.write_all(&buf[..n]))?;
                    done += n as u64;
                    fetched += n as u64;
                    event(Event::Progress { done, total });
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        written(out.sync_all())?;
        let complete = total.is_none_or(|t| done >= t);
        match outcome {
            Ok(()) if complete => return Ok((fetched, resumed)),
            Ok(()) => last_error = format!("the connection closed at byte {done}"),
            Err(e) => last_error = e,
        }
        if attempt + 1 < ATTEMPTS {
            std::thread::sleep(Duration::from_millis(200 << attempt));
        }
    }
    Err(PullError::Interrupted {
        url: url.to_string(),
        done: std::fs::metadata(partial).map_or(0, |m| m.len()),
        total: size.map_or("?".into(), |s| s.to_string()),
        why: last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulled_origins_give_their_download_urls_again() {
        let mut c = Client::from_env();
        c.endpoint = "http://hub".into();
        let url = |o: &str| source_url(&c, o);
        assert_eq!(
            url("hf:org/tiny-GGUF/dir/tiny-q8_0.gguf").as_deref(),
            Some("http://hub/org/tiny-GGUF/resolve/main/dir/tiny-q8_0.gguf")
        );
        assert_eq!(
            url("hf:org/tiny-GGUF@v2/tiny.gguf").as_deref(),
            Some("http://hub/org/tiny-GGUF/resolve/v2/tiny.gguf")
        );
        assert_eq!(
            url("hf:org/tiny-GGUF@refs/pr/2/tiny-pr-f16.gguf").as_deref(),
            Some("http://hub/org/tiny-GGUF/resolve/refs%2Fpr%2F2/tiny-pr-f16.gguf")
        );
        assert_eq!(url("https://x/y.gguf").as_deref(), Some("https://x/y.gguf"));
        assert_eq!(url("ollama:registry.ollama.ai/library/qwen:0.5b"), None);
        assert_eq!(url("hf:org/only-a-repo"), None);
    }

    fn f(path: &str) -> RemoteFile {
        RemoteFile {
            path: path.into(),
            size: 1,
            sha256: None,
        }
    }

    #[test]
    fn specs_parse_and_files_are_chosen_by_name_or_quantization() {
        assert_eq!(
            Spec::parse("hf:Qwen/Coder-GGUF:Q4_K_M").unwrap(),
            Spec::Hub {
                repo: "Qwen/Coder-GGUF".into(),
                revision: None,
                select: Some("Q4_K_M".into())
            }
        );
        assert_eq!(
            Spec::parse("hf:Qwen/Coder-GGUF@refs/pr/3:coder-q8_0.gguf").unwrap(),
            Spec::Hub {
                repo: "Qwen/Coder-GGUF".into(),
                revision: Some("refs/pr/3".into()),
                select: Some("coder-q8_0.gguf".into())
            }
        );
        for bad in ["hf:a/b@", "hf:a/b@../x", "hf:a/b@x?y", "hf:a/b@/x"] {
            let e = Spec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("not a revision"), "{bad}: {e}");
        }
        assert_eq!(url_revision("refs/pr/3"), "refs%2Fpr%2F3");
        assert!(matches!(
            Spec::parse("https://x/m.gguf").unwrap(),
            Spec::Url(_)
        ));
        assert!(
            Spec::parse("Qwen/Coder")
                .unwrap_err()
                .to_string()
                .contains("hf:ORG/REPO")
        );
        assert!(Spec::parse("hf:nope").is_err());
        let files = [
            f("README.md"),
            f("coder-q4_k_m.gguf"),
            f("coder-q8_0.gguf"),
            f("big-q8_0-00001-of-00002.gguf"),
        ];
        assert_eq!(
            choose("r", &files, Some("Q8_0")).unwrap().path,
            "coder-q8_0.gguf"
        );
        assert_eq!(choose("r", &files, None).unwrap().path, "coder-q4_k_m.gguf");
        assert_eq!(
            choose("r", &files, Some("coder-q8_0.gguf")).unwrap().path,
            "coder-q8_0.gguf"
        );
        let err = choose("r", &files, Some("q2_k")).unwrap_err().to_string();
        assert!(err.contains("coder-q4_k_m.gguf, coder-q8_0.gguf"), "{err}");
        let two = [f("a-q8_0.gguf"), f("b-q8_0.gguf")];
        assert!(
            choose("r", &two, None)
                .unwrap_err()
                .to_string()
                .contains("several")
        );
        assert!(
            choose("r", &two, Some("q8_0"))
                .unwrap_err()
                .to_string()
                .contains("name the file")
        );
    }
}
