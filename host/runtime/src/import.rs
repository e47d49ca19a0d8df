//! `kiln models import`: GGUF models the user already has in another
//! tool's store, found where those tools keep them, and registered without
//! copying (the store hard-links them; see `store::add_with`).
//!
//! - **Hugging Face cache** (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `~/.cache/huggingface/hub`): `models--ORG--REPO/snapshots/REV/**.gguf`,
//!   symlinks into `blobs/`, where a file is named by its sha256 (which the
//!   import checks).
//! - **Ollama** (`$OLLAMA_MODELS`, else `~/.ollama/models`): manifests
//!   under `manifests/HOST/NAMESPACE/MODEL/TAG`, whose layers name blobs
//!   `blobs/sha256-HEX` by digest: the model layer (checked against its
//!   digest), and the template and params layers, kept in the registry.
//! - **LM Studio** (`~/.lmstudio/models`, `~/.cache/lm-studio/models`):
//!   `PUBLISHER/REPO/*.gguf`.
//!
//! Split GGUF files (`*-00001-of-00003.gguf`) and files that are not GGUF
//! are listed as skipped, with the reason.

use crate::store::{self, AddOptions, StoreError, name_from};
use kiln_registry::config::Config;
use kiln_registry::{ModelRecord, Registry};
use serde::Serialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where a model was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[serde(rename = "hf")]
    HuggingFace,
    Ollama,
    LmStudio,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::HuggingFace, Source::Ollama, Source::LmStudio];

    pub fn name(self) -> &'static str {
        match self {
            Source::HuggingFace => "hf",
            Source::Ollama => "ollama",
            Source::LmStudio => "lmstudio",
        }
    }

    pub fn parse(s: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// A model found in another tool's store.
#[derive(Clone, Debug, Serialize)]
pub struct Found {
    pub source: Source,
    /// The file's real path (symlinks resolved).
    pub path: PathBuf,
    /// What it is called there (`ORG/REPO/FILE`, `MODEL:TAG`, …).
    pub label: String,
    /// The registry name it gets.
    pub name: String,
    /// The sha256 the source names the file by, if it does.
    pub sha256: Option<String>,
    #[serde(skip)]
    pub chat_template: Option<String>,
    #[serde(skip)]
    pub params: Option<String>,
}

impl Found {
    /// `source:label`, as the registry records it.
    pub fn origin(&self) -> String {
        format!("{}:{}", self.source.name(), self.label)
    }
}

/// Something seen but not importable, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub source: Source,
    pub path: PathBuf,
    pub why: String,
}

/// The directories each source is looked for in, from the environment
/// (`var`) and the home directory.
pub fn roots(
    home: Option<&Path>,
    var: impl Fn(&str) -> Option<OsString>,
) -> Vec<(Source, PathBuf)> {
    let mut out = Vec::new();
    let home_join = |p: &str| home.map(|h| h.join(p));
    let hf = var("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| home_join(".cache/huggingface/hub"));
    out.extend(hf.map(|p| (Source::HuggingFace, p)));
    let ollama = var("OLLAMA_MODELS")
        .map(PathBuf::from)
        .or_else(|| home_join(".ollama/models"));
    out.extend(ollama.map(|p| (Source::Ollama, p)));
    for p in [".lmstudio/models", ".cache/lm-studio/models"] {
        out.extend(home_join(p).map(|p| (Source::LmStudio, p)));
    }
    out
}

/// Every model under `roots`, and what was skipped.
pub fn discover(roots: &[(Source, PathBuf)]) -> (Vec<Found>, Vec<Skipped>) {
    let (mut found, mut skipped) = (Vec::new(), Vec::new());
    for (source, root) in roots {
        if !root.is_dir() {
            continue;
        }
        match source {
            Source::HuggingFace => huggingface(root, &mut found, &mut skipped),
            Source::Ollama => ollama(root, &mut found, &mut skipped),
            Source::LmStudio => lm_studio(root, &mut found, &mut skipped),
        }
    }
    // The same file reached twice (two snapshots, two tags): once.
    let mut seen = std::collections::HashSet::new();
    found.retain(|f| seen.insert(f.path.clone()));
    (found, skipped)
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `path` names a GGUF file kiln can take; else why not.
fn gguf_file(path: &Path) -> Result<(), String> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_lowercase());
    let file_name = file_name.unwrap_or_default();
    if !file_name.ends_with(".gguf") {
        return Err("not a .gguf file".into());
    }
    if let Some(stem) = file_name.strip_suffix(".gguf")
        && let Some((_, tail)) = stem.rsplit_once("-of-")
        && tail.len() == 5
        && tail.bytes().all(|b| b.is_ascii_digit())
    {
        return Err("a split GGUF file (one part of several); kiln loads single files".into());
    }
    if file_name.starts_with("mmproj") {
        return Err("a multimodal projector, not a language model".into());
    }
    magic(path)
}

fn magic(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut m = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut m))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if &m == b"GGUF" {
        Ok(())
    } else {
        Err("does not start with the GGUF magic".into())
    }
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if depth > 0 {
                walk(&p, depth - 1, out);
            }
        } else {
            out.push(p);
        }
    }
}

fn huggingface(root: &Path, found: &mut Vec<Found>, skipped: &mut Vec<Skipped>) {
    let Ok(repos) = std::fs::read_dir(root) else {
        return;
    };
    let mut repos: Vec<_> = repos.flatten().map(|e| e.path()).collect();
    repos.sort();
    for repo in repos {
        let dir_name = repo
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some(id) = dir_name.strip_prefix("models--") else {
            continue;
        };
        let id = id.replacen("--", "/", 1);
        let mut files = Vec::new();
        walk(&repo.join("snapshots"), 4, &mut files);
        for f in files {
            let Some(real) = candidate(Source::HuggingFace, &f, skipped) else {
                continue;
            };
            let blob = real.file_name().unwrap_or_default().to_string_lossy();
            found.push(Found {
                source: Source::HuggingFace,
                label: format!(
                    "{id}/{}",
                    f.file_name().unwrap_or_default().to_string_lossy()
                ),
                name: name_from(&f.file_stem().unwrap_or_default().to_string_lossy()),
                sha256: is_sha256(&blob).then(|| blob.to_lowercase()),
                path: real,
                chat_template: None,
                params: None,
            });
        }
    }
}

/// `f`'s real path when it is a GGUF model file kiln can take; a `.gguf`
/// file that is not (a broken link, a split part, a projector, not GGUF)
/// is listed in `skipped` with the reason. Other files are ignored.
fn candidate(source: Source, f: &Path, skipped: &mut Vec<Skipped>) -> Option<PathBuf> {
    if !f.to_string_lossy().to_lowercase().ends_with(".gguf") {
        return None;
    }
    let checked = f
        .canonicalize()
        .map_err(|e| format!("a broken link ({e}); the download is incomplete"))
        .and_then(|real| gguf_file(f).map(|()| real));
    match checked {
        Ok(real) => Some(real),
        Err(why) => {
            skipped.push(Skipped {
                source,
                path: f.to_path_buf(),
                why,
            });
            None
        }
    }
}

#[derive(serde::Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(serde::Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
}

fn ollama(root: &Path, found: &mut Vec<Found>, skipped: &mut Vec<Skipped>) {
    let manifests = root.join("manifests");
    let mut files = Vec::new();
    walk(&manifests, 4, &mut files);
    let blob = |digest: &str| root.join("blobs").join(digest.replacen(':', "-", 1));
    let text = |digest: &str| std::fs::read_to_string(blob(digest)).ok();
    for m in files {
        let Ok(rel) = m.strip_prefix(&manifests) else {
            continue;
        };
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        // HOST/NAMESPACE/MODEL/TAG; "library" is Ollama's default namespace.
        let [host, namespace, model, tag] = parts.as_slice() else {
            continue;
        };
        let label = match (host.as_str(), namespace.as_str()) {
            ("registry.ollama.ai", "library") => format!("{model}:{tag}"),
            ("registry.ollama.ai", _) => format!("{namespace}/{model}:{tag}"),
            _ => format!("{host}/{namespace}/{model}:{tag}"),
        };
        let skip = |why: String| Skipped {
            source: Source::Ollama,
            path: m.clone(),
            why,
        };
        let manifest: Manifest = match std::fs::read(&m)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                skipped.push(skip(format!("an unreadable manifest ({e})")));
                continue;
            }
        };
        let layer = |kind: &str| {
            manifest
                .layers
                .iter()
                .find(|l| l.media_type == format!("application/vnd.ollama.image.{kind}"))
        };
        let Some(model_layer) = layer("model") else {
            skipped.push(skip("the manifest has no model layer".into()));
            continue;
        };
        let Some(sha) = model_layer
            .digest
            .strip_prefix("sha256:")
            .filter(|h| is_sha256(h))
        else {
            skipped.push(skip(format!("an unknown digest {:?}", model_layer.digest)));
            continue;
        };
        let path = blob(&model_layer.digest);
        if let Err(why) = magic(&path) {
            skipped.push(skip(format!("its model blob {}: {why}", path.display())));
            continue;
        }
        found.push(Found {
            source: Source::Ollama,
            path: path.canonicalize().unwrap_or(path),
            name: name_from(&format!("{model}-{tag}")),
            label,
            sha256: Some(sha.to_lowercase()),
            chat_template: layer("template").and_then(|l| text(&l.digest)),
            params: layer("params").and_then(|l| text(&l.digest)),
        });
    }
}

fn lm_studio(root: &Path, found: &mut Vec<Found>, skipped: &mut Vec<Skipped>) {
    let mut files = Vec::new();
    walk(root, 3, &mut files);
    for f in files {
        let Some(real) = candidate(Source::LmStudio, &f, skipped) else {
            continue;
        };
        found.push(Found {
            source: Source::LmStudio,
            label: f
                .strip_prefix(root)
                .unwrap_or(&f)
                .to_string_lossy()
                .into_owned(),
            name: name_from(&f.file_stem().unwrap_or_default().to_string_lossy()),
            path: real,
            sha256: None,
            chat_template: None,
            params: None,
        });
    }
}

/// What importing one model did.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Registered; `linked`: the blob is a hard link to the file (no copy).
    Imported {
        model: Box<ModelRecord>,
        linked: bool,
    },
    /// Registered before (same bytes, or the same origin and size).
    Already { model: String },
}

/// Registers `found` in the store, hard-linked where the file system
/// allows: checked as `kiln models add` checks a model, and against the
/// sha256 its source names it by. Importing again changes nothing.
pub fn import(
    config: &Config,
    registry: &mut Registry,
    found: &Found,
    actor: &str,
    progress: impl FnMut(u64, u64),
) -> Result<Outcome, StoreError> {
    let origin = found.origin();
    let size = std::fs::metadata(&found.path).map(|m| m.len()).ok();
    let models = registry.models()?;
    let known = models.iter().find(|m| {
        found.sha256.as_deref() == Some(m.sha256.as_str())
            || (m.origin.as_deref() == Some(origin.as_str()) && Some(m.size_bytes) == size)
    });
    if let Some(m) = known {
        return Ok(Outcome::Already { model: m.label() });
    }
    // A name another model already uses gets a number.
    let taken = |n: &str| models.iter().any(|m| m.name == n);
    let mut name = found.name.clone();
    let mut i = 2;
    while taken(&name) {
        name = format!("{}-{i}", found.name);
        i += 1;
    }
    let how = AddOptions {
        name: Some(name),
        link: true,
        expected_sha256: found.sha256.clone(),
        origin: Some(origin),
        chat_template: found.chat_template.clone(),
        params: found.params.clone(),
        skip_known: true,
    };
    match store::add_with(config, registry, &found.path, &how, actor, progress) {
        Ok((model, _, linked)) => Ok(Outcome::Imported {
            model: Box::new(model),
            linked,
        }),
        Err(StoreError::Known { model, .. }) => Ok(Outcome::Already { model }),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_follow_the_environment_then_home() {
        let home = Path::new("/home/u");
        let none = roots(Some(home), |_| None);
        let paths: Vec<_> = none.iter().map(|(s, p)| (s.name(), p.clone())).collect();
        assert_eq!(
            paths,
            vec![
                ("hf", home.join(".cache/huggingface/hub")),
                ("ollama", home.join(".ollama/models")),
                ("lmstudio", home.join(".lmstudio/models")),
                ("lmstudio", home.join(".cache/lm-studio/models")),
            ]
        );
        let set = roots(Some(home), |k| match k {
            "HF_HOME" => Some("/data/hf".into()),
            "OLLAMA_MODELS" => Some("/data/ollama".into()),
            _ => None,
        });
        assert_eq!(set[0].1, Path::new("/data/hf/hub"));
        assert_eq!(set[1].1, Path::new("/data/ollama"));
        let hub = roots(Some(home), |k| (k == "HF_HUB_CACHE").then(|| "/c".into()));
        assert_eq!(hub[0].1, Path::new("/c"));
    }

    #[test]
    fn names_and_split_files() {
        assert_eq!(
            name_from("Qwen2.5-Coder 0.5B:latest"),
            "qwen2.5-coder-0.5b-latest"
        );
        assert_eq!(name_from("///"), "model");
        assert_eq!(name_from(&"a".repeat(300)).len(), 128, "check_name's limit");
        let dir = tempfile::tempdir().unwrap();
        let split = dir.path().join("m-00001-of-00003.gguf");
        std::fs::write(&split, b"GGUF....").unwrap();
        assert!(gguf_file(&split).unwrap_err().contains("split"));
        let bad = dir.path().join("m.gguf");
        std::fs::write(&bad, b"nope").unwrap();
        assert!(gguf_file(&bad).unwrap_err().contains("magic"));
    }
}
