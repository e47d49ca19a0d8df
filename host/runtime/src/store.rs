//! The offline model store: every model kiln manages is a blob named by its
//! content, `$KILN_HOME/models/blobs/sha256-<hex>`, recorded in the
//! registry as a version of a name.
//!
//! Adding copies the file while hashing it, fsyncs the copy, hashes the
//! copy again from disk and only then renames it into place: a blob's name
//! always matches its bytes, and an interrupted add leaves at most a
//! temporary file. `verify` re-hashes every blob and reports, never deletes.
//!
//! With `[store] encrypt_at_rest` (`kiln store encrypt`) blobs are stored
//! in the age format as `sha256-<hex>.age`, named by their plaintext's
//! hash; the same checks run on the plaintext, decrypted from disk.

use crate::crypt::{self, CryptError, Keys};
use crate::gguf::GgufFile;
use crate::model::{Model, ModelError};
use kiln_registry::config::Config;
use kiln_registry::{ModelRecord, NewModel, Registry, RegistryError, Transition};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Metadata key `kiln quantize` writes: the sha256 of its input file.
pub const PARENT_KEY: &str = "kiln.quantized_from.sha256";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{0} is neither a model file nor a registered model (see `kiln models list`, or `kiln models add FILE`)"
    )]
    NotFound(String),
    #[error(
        "{0} is neither a file nor a registered adapter with an active version (see `kiln adapters list`, or `kiln adapters add FILE`)"
    )]
    AdapterNotFound(String),
    #[error(
        "no model to serve: pass --model FILE|NAME, or register one with `kiln models add FILE` (or try `kiln demo`)"
    )]
    NothingActive,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: the copy's sha256 {copy} differs from the source's {source_hash}; the disk or the file changed during the copy. Nothing was recorded"
    )]
    CopyMismatch {
        path: PathBuf,
        copy: String,
        source_hash: String,
    },
    #[error(
        "{path}: its sha256 is {got}, but its source names it {want}: the file is damaged or was changed; nothing was recorded"
    )]
    HashMismatch {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error("{path}: the same bytes are already registered as {model}")]
    Known { path: PathBuf, model: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Crypt(#[from] CryptError),
    #[error(
        "{path}: {source}: there is no room for it (the disk is full, or a quota or file-size limit is reached); the partial copy was removed and nothing was recorded: free some space and try again"
    )]
    NoSpace {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether a write failed for want of room: a full disk, a quota, or the
/// process's file-size limit.
pub fn out_of_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), StorageFull | QuotaExceeded | FileTooLarge)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn blobs_dir(config: &Config) -> PathBuf {
    config.home.join("models").join("blobs")
}

/// A model argument: a file, or the name (`NAME` or `NAME@VERSION`) of a
/// registered model.
pub fn resolve(config: &Config, arg: &str) -> Result<PathBuf, StoreError> {
    let path = PathBuf::from(arg);
    if path.is_file() {
        return Ok(path);
    }
    let registry = Registry::open_home(config)?;
    registry
        .model_path(arg)?
        .ok_or_else(|| StoreError::NotFound(arg.to_string()))
}

/// `(id, path)` of the model to serve: a file (its stem is the id), a
/// registered name (`NAME@VERSION` is the id), or with no argument the
/// registry's active model (the most recently added active one).
pub fn resolve_served(config: &Config, arg: Option<&str>) -> Result<(String, PathBuf), StoreError> {
    if let Some(m) = arg {
        let p = Path::new(m);
        if p.is_file() {
            let id = p
                .file_stem()
                .map_or_else(|| m.to_string(), |s| s.to_string_lossy().into_owned());
            return Ok((id, p.to_path_buf()));
        }
        let path = resolve(config, m)?;
        let rec = Registry::open_home(config)?.model(m)?;
        return Ok((rec.map_or_else(|| m.to_string(), |r| r.label()), path));
    }
    let models = Registry::open_home(config)?.models()?;
    let active = models
        .iter()
        .filter(|m| m.state == "active")
        .max_by(|a, b| a.added_at.cmp(&b.added_at))
        .ok_or(StoreError::NothingActive)?;
    Ok((active.label(), active.blob_path.clone()))
}

/// An adapter argument (`--adapter`, `[models.NAME] adapter`): a file as
/// it is, or a registered adapter (`NAME` for its active version,
/// `NAME@VERSION`): its file and the label a model served with it
/// carries (`MODEL+LABEL`).
pub fn resolve_adapter(config: &Config, arg: &str) -> Result<(PathBuf, String), StoreError> {
    let path = Path::new(arg);
    if path.is_file() {
        let stem = path
            .file_stem()
            .map_or_else(|| "adapter".into(), |s| s.to_string_lossy().into_owned());
        return Ok((path.to_path_buf(), stem));
    }
    match Registry::open_home(config)?.adapter(arg)? {
        Some(a) => {
            let label = a.label();
            Ok((a.blob_path, label))
        }
        None => Err(StoreError::AdapterNotFound(arg.to_string())),
    }
}

/// [`resolve_adapter`]'s file for the model whose header is `base` (as
/// [`GgufFile::open_header`] reads it for the model's budget), checked
/// against it before the model loads ([`crate::model::lora::check`]), and
/// what it is (`bytes`: its pairs in memory); errors name `arg`.
pub fn adapter_for_model(
    config: &Config,
    arg: &str,
    base: &GgufFile,
) -> Result<(PathBuf, crate::model::lora::Applied), String> {
    let fail = |e: String| format!("adapter {arg:?}: {e}");
    let (file, _) = resolve_adapter(config, arg).map_err(|e| fail(e.to_string()))?;
    let applied = crate::model::lora::check(&file, base).map_err(fail)?;
    Ok((file, applied))
}

/// sha256 of a file, streamed; `progress(bytes)` after each chunk.
pub fn hash_file(path: &Path, progress: impl FnMut(u64)) -> Result<String, StoreError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    hash_reader(&mut f, path, progress)
}

/// llama.cpp's names for `general.file_type`, or the weights' types.
pub fn quant_type(f: &GgufFile) -> String {
    let named = f
        .get("general.file_type")
        .and_then(|v| v.as_u64())
        .and_then(|t| match t {
            // What `kiln quantize` writes is named by its targets; the
            // rest kiln runs but does not write.
            0 => Some("f32"),
            25 => Some("iq4_nl"),
            30 => Some("iq4_xs"),
            t => crate::quantize::Target::ALL
                .into_iter()
                .find(|x| u64::from(x.ftype()) == t)
                .map(crate::quantize::Target::name),
        });
    if let Some(n) = named {
        return n.to_string();
    }
    let mut types: Vec<String> = f
        .tensors
        .iter()
        .filter(|t| t.n_dims >= 2)
        .map(|t| t.dtype.to_string())
        .collect();
    types.sort();
    types.dedup();
    match types.len() {
        1 => types.remove(0),
        _ => format!("mixed ({})", types.join(", ")),
    }
}

/// A name for a model: `general.name` or the file's stem, as
/// [`name_from`] makes it.
pub fn default_name(f: &GgufFile, path: &Path) -> String {
    let raw = f
        .get("general.name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    name_from(&raw)
}

/// A registry name from free text: lowercase [a-z0-9._-] (anything else
/// becomes '-'), at most 128 characters, `model` when nothing is left.
pub fn name_from(raw: &str) -> String {
    let mut name: String = raw
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(128);
    let name = name.trim_matches('-');
    if name.is_empty() {
        "model".into()
    } else {
        name.to_string()
    }
}

pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.contains('@')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "model name {name:?} must be 1-128 characters of a-z, A-Z, 0-9, '.', '_' and '-'"
        )))
    }
}

/// `kiln models add`: validates the model (format, architecture, shapes,
/// tokenizer), copies it into the store and records a new version.
pub fn add(
    config: &Config,
    registry: &mut Registry,
    file: &Path,
    name: Option<&str>,
    actor: &str,
    progress: impl FnMut(u64, u64),
) -> Result<(ModelRecord, Transition), StoreError> {
    let how = AddOptions {
        name: name.map(str::to_string),
        ..AddOptions::default()
    };
    add_with(config, registry, file, &how, actor, progress).map(|(r, t, _)| (r, t))
}

/// How [`add_with`] takes a file in.
#[derive(Clone, Debug, Default)]
pub struct AddOptions {
    /// Default: the model's `general.name`, or the file name.
    pub name: Option<String>,
    /// Hard-link the file into the store instead of copying it, where the
    /// store is on the same file system (else it is copied).
    pub link: bool,
    /// The sha256 the file's source names it by (Ollama's digest, the Hugging
    /// Face cache's blob name): a file that does not hash to it is refused.
    pub expected_sha256: Option<String>,
    pub origin: Option<String>,
    pub chat_template: Option<String>,
    pub params: Option<String>,
    /// Record nothing when a registered version has the same bytes
    /// ([`StoreError::Known`]).
    pub skip_known: bool,
}

/// [`add`] with options; also says whether the blob is a hard link to
/// `file` (true) or a copy.
pub fn add_with(
    config: &Config,
    registry: &mut Registry,
    file: &Path,
    how: &AddOptions,
    actor: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<(ModelRecord, Transition, bool), StoreError> {
    let model = Model::load(file)?;
    model.tokenizer()?;
    let name = match &how.name {
        Some(n) => n.clone(),
        None => default_name(&model.file, file),
    };
    check_name(&name)?;
    // An encrypted source is read through its decryption; with
    // encryption at rest the copy is encrypted as it is written.
    let sealed_source = crypt::is_encrypted(file).map_err(io(file))?;
    let keys = match (config.encrypt_at_rest, sealed_source) {
        (true, _) => Some(sealing_keys(config)?),
        (false, true) => Some(Keys::from_env(config)?),
        (false, false) => None,
    };
    let seal = keys.as_ref().filter(|_| config.encrypt_at_rest);
    let total = model.file.bytes().len() as u64;
    let dir = blobs_dir(config);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = incoming(&dir);
    // A hard link shares the file's bytes: one hash of them is the check.
    // A copy is hashed while written and again from disk.
    let linked =
        how.link && !sealed_source && seal.is_none() && std::fs::hard_link(file, &tmp).is_ok();
    let checked = if linked {
        hash_file(&tmp, |done| progress(done, total))
    } else {
        let source: Result<Box<dyn Read>, StoreError> = match (&keys, sealed_source) {
            (Some(k), true) => crypt::open_reader(file, k)
                .map(|r| Box::new(r) as Box<dyn Read>)
                .map_err(StoreError::from),
            _ => std::fs::File::open(file)
                .map(|f| Box::new(f) as Box<dyn Read>)
                .map_err(io(file)),
        };
        source.and_then(|mut src| {
            copy_checked(&mut src, file, &tmp, seal, None, |done| {
                progress(done, total)
            })
        })
    };
    let copy = match checked {
        Ok(copy) => copy,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Some(want) = &how.expected_sha256
        && *want != copy
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(StoreError::HashMismatch {
            path: file.to_path_buf(),
            got: copy,
            want: want.clone(),
        });
    }
    if how.skip_known
        && let Some(m) = registry.models_with_sha(&copy)?.into_iter().next()
    {
        let _ = std::fs::remove_file(&tmp);
        return Err(StoreError::Known {
            path: file.to_path_buf(),
            model: m.label(),
        });
    }
    let blob = blob_path(&dir, &copy, seal.is_some());
    let parent = model
        .file
        .get(PARENT_KEY)
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let new = NewModel {
        name,
        sha256: copy,
        blob_path: blob.clone(),
        architecture: model.config.arch.name().to_string(),
        quant_type: quant_type(&model.file),
        size_bytes: total,
        parent_sha256: parent,
        origin: how.origin.clone(),
        chat_template: how.chat_template.clone(),
        params: how.params.clone(),
        encrypted: seal.is_some(),
    };
    // Publishing the blob and recording it happen under the store's lock,
    // so that a blob no record names is always garbage (see `orphans`).
    let _lock = StoreLock::acquire(&dir)?;
    let existed = blob.exists();
    publish(&dir, &tmp, &blob)?;
    let recorded = registry.add_model(&new, actor);
    if recorded.is_err() && !existed && !registry.blob_in_use(&new.sha256).unwrap_or(true) {
        // Nothing names the new blob: take it back.
        let _ = std::fs::remove_file(&blob);
    }
    let (record, t) = recorded?;
    Ok((record, t, linked))
}

/// Temporary copies are named `.incoming-<pid>-<random>` until published.
const INCOMING: &str = ".incoming-";

fn incoming(dir: &Path) -> PathBuf {
    dir.join(format!(
        "{INCOMING}{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ))
}

/// `sha256-<hex>`, or `sha256-<hex>.age` encrypted.
fn blob_path(dir: &Path, sha256: &str, encrypted: bool) -> PathBuf {
    dir.join(format!(
        "sha256-{sha256}{}",
        if encrypted { ".age" } else { "" }
    ))
}

/// The keys blobs are encrypted to: the environment's
/// ([`Keys::from_env`]), else `$KILN_HOME/identity.txt`, created when
/// there is none.
pub fn sealing_keys(config: &Config) -> Result<Keys, StoreError> {
    let keys = Keys::from_env(config)?;
    if keys.can_encrypt() {
        return Ok(keys);
    }
    crypt::ensure_identity(config)?;
    Ok(Keys::from_env(config)?)
}

/// sha256 of a stored copy's plaintext: decrypted from disk with `seal`.
fn stored_hash(path: &Path, seal: Option<&Keys>) -> Result<String, StoreError> {
    match seal {
        None => hash_file(path, |_| {}),
        Some(keys) => hash_reader(&mut crypt::open_reader(path, keys)?, path, |_| {}),
    }
}

fn hash_reader(
    r: &mut dyn Read,
    path: &Path,
    mut progress: impl FnMut(u64),
) -> Result<String, StoreError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 22];
    let mut done = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(|e| read_error(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hex(h))
}

fn hex(h: Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// An error reading a file, encrypted or not: a truncated file or a failed
/// authentication names the file as damaged ([`crypt::damaged_io`]).
fn read_error(path: &Path, e: std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            StoreError::Crypt(crypt::damaged_io(path, e))
        }
        _ => io(path)(e),
    }
}

/// An exclusive lock on a blob directory (`store.lock` beside it:
/// `models/store.lock`, `adapters/store.lock`), held while a blob is
/// published and recorded and while orphans are looked for; released
/// when dropped (or when the process dies).
pub struct StoreLock {
    _file: std::fs::File,
}

impl StoreLock {
    pub(crate) fn acquire(blobs: &Path) -> Result<StoreLock, StoreError> {
        // Beside the blobs, not among them.
        let path = blobs.with_file_name("store.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        f.lock().map_err(io(&path))?;
        Ok(StoreLock { _file: f })
    }
}

/// A file in the store that no registered model uses.
#[derive(Clone, Debug, Serialize)]
pub struct Orphan {
    pub path: PathBuf,
    pub bytes: u64,
    /// `blob` (a published blob no version names: an add that failed or
    /// was killed before recording it) or `incoming` (the copy of an add
    /// whose process is gone).
    pub kind: &'static str,
}

/// Files in the stores that no registered model, adapter, policy version
/// or logged policy decision uses, found under each directory's lock.
/// With `remove`, they are deleted.
pub fn orphans(
    config: &Config,
    registry: &Registry,
    remove: bool,
) -> Result<Vec<Orphan>, StoreError> {
    let models = || -> Result<_, StoreError> {
        Ok(registry
            .models()?
            .into_iter()
            .map(|m| m.blob_path)
            .collect())
    };
    let adapters = || -> Result<_, StoreError> {
        Ok(registry
            .adapters()?
            .into_iter()
            .map(|a| a.blob_path)
            .collect())
    };
    let policies = || -> Result<_, StoreError> {
        let dir = crate::policy::blobs_dir(config);
        Ok(registry
            .policy_hashes_in_use()?
            .into_iter()
            .map(|h| dir.join(format!("sha256-{h}.wasm")))
            .collect())
    };
    let mut out = orphans_in(&blobs_dir(config), models, None, remove)?;
    out.extend(orphans_in(
        &adapter_blobs_dir(config),
        adapters,
        None,
        remove,
    )?);
    // A policy module is stored before the decisions made with it are
    // logged (`kiln policy run`): one unnamed for less than an hour is
    // spared.
    out.extend(orphans_in(
        &crate::policy::blobs_dir(config),
        policies,
        Some(std::time::Duration::from_secs(3600)),
        remove,
    )?);
    Ok(out)
}

/// [`orphans`] in one blob directory; `used` reads the blobs versions
/// name, under the directory's lock: read before it, an add that records
/// in between would lose its blob.
fn orphans_in(
    dir: &Path,
    used: impl FnOnce() -> Result<std::collections::HashSet<PathBuf>, StoreError>,
    grace: Option<std::time::Duration>,
    remove: bool,
) -> Result<Vec<Orphan>, StoreError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let _lock = StoreLock::acquire(dir)?;
    let used = used()?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = if name.starts_with("sha256-") {
            if used.contains(&path) {
                continue;
            }
            "blob"
        } else if let Some(rest) = name.strip_prefix(INCOMING) {
            let pid = rest.split('-').next().unwrap_or("");
            if Path::new("/proc").join(pid).exists() && !pid.is_empty() {
                continue; // an add still copying
            }
            "incoming"
        } else {
            continue;
        };
        let meta = entry.metadata().map_err(io(&path))?;
        let young = grace.is_some_and(|g| {
            meta.modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < g)
        });
        if young {
            continue;
        }
        let bytes = meta.len();
        if remove {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        out.push(Orphan { path, bytes, kind });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Where adapters' blobs are kept (`sha256-<hex>.gguf`).
pub fn adapter_blobs_dir(config: &Config) -> PathBuf {
    config.home.join("adapters").join("blobs")
}

/// An adapter file taken into the adapter store: copied while hashed,
/// read back and hashed again, then published as `sha256-<hex>.gguf`
/// under the store's lock, which the caller holds (`lock`) while it
/// records the version, so that a gc never sees it unrecorded.
pub struct PublishedAdapter {
    pub sha256: String,
    pub blob_path: PathBuf,
    pub lock: StoreLock,
}

/// Copies `file` into the adapter store (see [`PublishedAdapter`]); a
/// disk without room, or a copy that reads back other bytes, leaves
/// nothing behind.
pub fn publish_adapter(config: &Config, file: &Path) -> Result<PublishedAdapter, StoreError> {
    let dir = adapter_blobs_dir(config);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let tmp = incoming(&dir);
    let mut src = std::fs::File::open(file).map_err(io(file))?;
    let hash = copy_checked(&mut src, file, &tmp, None, None, |_| {})?;
    let blob_path = dir.join(format!("sha256-{hash}.gguf"));
    let lock = StoreLock::acquire(&dir)?;
    publish(&dir, &tmp, &blob_path)?;
    Ok(PublishedAdapter {
        sha256: hash,
        blob_path,
        lock,
    })
}

/// `kiln store gc`: the store's files that no model or adapter version
/// uses ([`orphans`]), removed unless `dry_run`; a removal is audited with
/// what it freed.
pub fn gc(
    config: &Config,
    registry: &mut Registry,
    dry_run: bool,
    actor: &str,
) -> Result<Vec<Orphan>, StoreError> {
    let found = orphans(config, registry, !dry_run)?;
    if !dry_run && !found.is_empty() {
        let bytes: u64 = found.iter().map(|o| o.bytes).sum();
        registry.audit_store(
            actor,
            "gc",
            &blobs_dir(config).display().to_string(),
            &format!("removed {} file(s), {bytes} bytes", found.len()),
        )?;
    }
    Ok(found)
}

/// Copies `src` into the new file `to`, encrypted for `seal` when given,
/// and returns the sha256 of what was read. On error `to` is removed.
fn copy_hashing(
    src: &mut dyn Read,
    from: &Path,
    to: &Path,
    seal: Option<&Keys>,
    progress: impl FnMut(u64),
) -> Result<String, StoreError> {
    let mut reader = Hashing {
        inner: src,
        from,
        hash: Sha256::new(),
        done: 0,
        progress,
        failed: None,
    };
    if let Some(keys) = seal {
        let sealed = crypt::encrypt_file(&mut reader, to, keys, |_| {});
        if let Some(e) = reader.failed.take() {
            let _ = std::fs::remove_file(to);
            return Err(e);
        }
        sealed?;
        return Ok(hex(reader.hash));
    }
    let copied = (|| -> std::io::Result<()> {
        let mut dst = std::fs::File::create(to)?;
        let mut buf = vec![0u8; 1 << 22];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n])?;
        }
        dst.sync_all()
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(to);
        return Err(reader.failed.take().unwrap_or_else(|| {
            if out_of_space(&e) {
                StoreError::NoSpace {
                    path: to.to_path_buf(),
                    source: e,
                }
            } else {
                StoreError::Io {
                    path: to.to_path_buf(),
                    source: e,
                }
            }
        }));
    }
    Ok(hex(reader.hash))
}

/// [`copy_hashing`] into `tmp`, then the copy read back (decrypted for
/// `seal`) and hashed again: the hash of what was read, equal to the
/// copy's, and to `want` where given. On any failure `tmp` is gone.
fn copy_checked(
    src: &mut dyn Read,
    from: &Path,
    tmp: &Path,
    seal: Option<&Keys>,
    want: Option<&str>,
    progress: impl FnMut(u64),
) -> Result<String, StoreError> {
    let hash = copy_hashing(src, from, tmp, seal, progress)?;
    let failed = match want {
        Some(want) if hash != want => Some(StoreError::HashMismatch {
            path: from.to_path_buf(),
            got: hash.clone(),
            want: want.to_string(),
        }),
        _ => match stored_hash(tmp, seal) {
            Ok(copy) if copy == hash => None,
            Ok(copy) => Some(StoreError::CopyMismatch {
                path: from.to_path_buf(),
                copy,
                source_hash: hash.clone(),
            }),
            Err(e) => Some(e),
        },
    };
    match failed {
        None => Ok(hash),
        Some(e) => {
            let _ = std::fs::remove_file(tmp);
            Err(e)
        }
    }
}

/// Renames the checked copy `tmp` to `blob` in `dir` and syncs the
/// directory, under the caller's [`StoreLock`]; on failure `tmp` is gone.
fn publish(dir: &Path, tmp: &Path, blob: &Path) -> Result<(), StoreError> {
    let published = std::fs::rename(tmp, blob)
        .and_then(|()| std::fs::File::open(dir).and_then(|d| d.sync_all()));
    published.map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        StoreError::Io {
            path: blob.to_path_buf(),
            source: e,
        }
    })
}

/// A reader that hashes what passes through it and reports progress; a
/// read error is kept (with the source's path) to tell it from a write error.
struct Hashing<'a, P> {
    inner: &'a mut dyn Read,
    from: &'a Path,
    hash: Sha256,
    done: u64,
    progress: P,
    failed: Option<StoreError>,
}

impl<P: FnMut(u64)> Read for Hashing<'_, P> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                if n > 0 {
                    self.hash.update(&buf[..n]);
                    self.done += n as u64;
                    (self.progress)(self.done);
                }
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.failed = Some(read_error(self.from, e));
                Err(std::io::Error::new(kind, "reading the source failed"))
            }
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum BlobStatus {
    Ok,
    Missing,
    Corrupt {
        actual_sha256: String,
    },
    /// Encrypted, and it fails its authentication (truncated, a byte changed).
    Damaged {
        reason: String,
    },
    /// Encrypted for a key this process does not have.
    Locked {
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    pub model: String,
    pub sha256: String,
    pub blob_path: PathBuf,
    pub encrypted: bool,
    #[serde(flatten)]
    pub status: BlobStatus,
}

/// `kiln models verify`: re-hashes every registered blob (each once); an
/// encrypted one is decrypted with `keys` and its plaintext hashed.
pub fn verify(
    registry: &Registry,
    keys: &Keys,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Verified>, StoreError> {
    let mut checked: std::collections::HashMap<PathBuf, BlobStatus> = Default::default();
    let mut out = Vec::new();
    for m in registry.models()? {
        let status = match checked.get(&m.blob_path) {
            Some(s) => s.clone(),
            None => {
                progress(&m.label());
                let s = blob_status(&m, keys);
                checked.insert(m.blob_path.clone(), s.clone());
                s
            }
        };
        out.push(Verified {
            model: m.label(),
            sha256: m.sha256,
            blob_path: m.blob_path,
            encrypted: m.encrypted,
            status,
        });
    }
    Ok(out)
}

/// The state of `m`'s blob: re-hashed (decrypted with `keys` first where
/// it is encrypted) against the version's sha256.
fn blob_status(m: &ModelRecord, keys: &Keys) -> BlobStatus {
    if !m.blob_path.is_file() {
        return BlobStatus::Missing;
    }
    match stored_hash(&m.blob_path, m.encrypted.then_some(keys)) {
        Ok(h) if h == m.sha256 => BlobStatus::Ok,
        Ok(h) => BlobStatus::Corrupt { actual_sha256: h },
        Err(StoreError::Crypt(e @ CryptError::Damaged { .. })) => {
            BlobStatus::Damaged { reason: e.detail() }
        }
        Err(StoreError::Crypt(e)) => BlobStatus::Locked { reason: e.detail() },
        Err(_) => BlobStatus::Missing,
    }
}

/// One blob [`scrub`] looked at.
#[derive(Clone, Debug, Serialize)]
pub struct Scrubbed {
    /// `model`, `adapter` or `policy`.
    pub kind: &'static str,
    pub sha256: String,
    pub blob_path: PathBuf,
    /// The versions stored in it.
    pub versions: Vec<String>,
    pub encrypted: bool,
    /// Where it came from (`kiln pull`'s source, an import's), if known.
    pub origin: Option<String>,
    #[serde(flatten)]
    pub status: BlobStatus,
    /// With repair asked for and the blob damaged or missing: `repaired`,
    /// or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<String>,
}

impl Scrubbed {
    /// Whether the blob is damaged or missing (and not repaired).
    pub fn bad(&self) -> bool {
        matches!(
            self.status,
            BlobStatus::Missing | BlobStatus::Corrupt { .. } | BlobStatus::Damaged { .. }
        ) && self.repair.as_deref() != Some("repaired")
    }
}

/// Fetches a fresh copy of a version's file from where it came from
/// (its origin), returning the file it wrote; the caller's (`kiln pull`'s
/// download), so that this layer stays off the network.
pub type Refetch<'a> = dyn FnMut(&ModelRecord) -> Result<PathBuf, String> + 'a;

/// `kiln store scrub`: re-hashes every model blob once, as `kiln models
/// verify` does (and every adapter's and policy's, reported only), and
/// with `refetch` repairs each damaged or missing model blob
/// whose source it can fetch again: the fresh copy must hash to the
/// version's sha256, is stored as the blob was (encrypted again where it
/// was) and checked from disk, then renamed over the blob under the
/// store's lock, and the repair audited. A blob that cannot be repaired
/// is left as it is, and said why. Blobs whose key this process lacks
/// (locked) are not damage.
pub fn scrub(
    config: &Config,
    registry: &mut Registry,
    keys: &Keys,
    mut refetch: Option<&mut Refetch<'_>>,
    actor: &str,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Scrubbed>, StoreError> {
    let mut by_blob: Vec<(ModelRecord, Vec<String>)> = Vec::new();
    for m in registry.models()? {
        match by_blob.iter_mut().find(|(b, _)| b.blob_path == m.blob_path) {
            Some((_, names)) => names.push(m.label()),
            None => {
                let label = m.label();
                by_blob.push((m, vec![label]));
            }
        }
    }
    let mut out = Vec::new();
    for (m, models) in by_blob {
        progress(&models.join(", "));
        let status = blob_status(&m, keys);
        let damaged = matches!(
            status,
            BlobStatus::Missing | BlobStatus::Corrupt { .. } | BlobStatus::Damaged { .. }
        );
        let repair = match (&mut refetch, damaged) {
            (Some(fetch), true) => Some(match restore(config, registry, &m, fetch, actor) {
                Ok(()) => "repaired".to_string(),
                Err(why) => why,
            }),
            _ => None,
        };
        out.push(Scrubbed {
            kind: "model",
            sha256: m.sha256.clone(),
            blob_path: m.blob_path.clone(),
            versions: models,
            encrypted: m.encrypted,
            origin: m.origin.clone(),
            status,
            repair,
        });
    }
    // Adapters and policies: kiln made or was given them, so there is no
    // source to fetch again; their damage is reported.
    let others = (registry.adapters()?.into_iter())
        .map(|a| ("adapter", a.label(), a.sha256, a.blob_path))
        .chain(
            (registry.policies()?.into_iter())
                .map(|p| ("policy", p.label(), p.sha256, p.blob_path)),
        );
    for (kind, label, sha256, blob_path) in others {
        if let Some(seen) = out.iter_mut().find(|s| s.blob_path == blob_path) {
            seen.versions.push(label);
            continue;
        }
        progress(&label);
        let status = if !blob_path.is_file() {
            BlobStatus::Missing
        } else {
            match hash_file(&blob_path, |_| {}) {
                Ok(h) if h == sha256 => BlobStatus::Ok,
                Ok(h) => BlobStatus::Corrupt { actual_sha256: h },
                Err(_) => BlobStatus::Missing,
            }
        };
        let repair = (refetch.is_some() && !matches!(status, BlobStatus::Ok)).then(|| {
            let kinds = if kind == "policy" {
                "policies"
            } else {
                "adapters"
            };
            format!("not repaired: kiln has no source for {kinds} (add it again from its file)")
        });
        out.push(Scrubbed {
            kind,
            sha256,
            blob_path,
            versions: vec![label],
            encrypted: false,
            origin: None,
            status,
            repair,
        });
    }
    Ok(out)
}

/// [`scrub`]'s repair of `m`'s blob from a fresh copy; the error says why
/// it was not repaired.
fn restore(
    config: &Config,
    registry: &mut Registry,
    m: &ModelRecord,
    refetch: &mut Refetch<'_>,
    actor: &str,
) -> Result<(), String> {
    if m.origin.is_none() {
        return Err(
            "not repaired: kiln does not know where it came from (add the file again with `kiln models add`)"
                .into(),
        );
    }
    let fresh = refetch(m).map_err(|e| format!("not repaired: {e}"))?;
    let result = (|| -> Result<(), StoreError> {
        let seal = if m.encrypted {
            Some(sealing_keys(config)?)
        } else {
            None
        };
        let dir = blobs_dir(config);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let tmp = incoming(&dir);
        let mut src = std::fs::File::open(&fresh).map_err(io(&fresh))?;
        copy_checked(
            &mut src,
            &fresh,
            &tmp,
            seal.as_ref(),
            Some(&m.sha256),
            |_| {},
        )?;
        let _lock = StoreLock::acquire(&dir)?;
        publish(&dir, &tmp, &m.blob_path)?;
        registry.audit_store(
            actor,
            "repair",
            &format!("sha256-{}", m.sha256),
            &format!(
                "blob rewritten from {}",
                m.origin.as_deref().unwrap_or("its source")
            ),
        )?;
        Ok(())
    })();
    // The fresh copy was the caller's download: stored or refused, it goes.
    let _ = std::fs::remove_file(&fresh);
    result.map_err(|e| format!("not repaired: {e}"))
}

/// One blob [`reseal`] encrypted or decrypted.
#[derive(Clone, Debug, Serialize)]
pub struct Resealed {
    pub sha256: String,
    /// The versions stored in it.
    pub models: Vec<String>,
    pub from: PathBuf,
    pub to: PathBuf,
    pub bytes: u64,
}

/// What [`reseal`] did.
#[derive(Clone, Debug, Serialize)]
pub struct Resealing {
    pub encrypted: bool,
    pub blobs: Vec<Resealed>,
    /// Versions whose blob is missing (nothing to convert; see `kiln
    /// models verify`).
    pub missing: Vec<String>,
    /// The identity file the blobs are encrypted to or were decrypted
    /// with, if one was used.
    pub identity: Option<PathBuf>,
    /// The identity file was created by this call.
    pub identity_created: bool,
}

/// `kiln store encrypt` (`encrypt`) and `kiln store decrypt`: rewrites
/// every blob not yet in that form, then sets `[store] encrypt_at_rest`.
///
/// Each blob is converted into a temporary file while its plaintext is
/// hashed (it must hash to its name), the result is read back and hashed
/// again, and only then, under the store's lock, renamed into place, the
/// registry repointed (audited) and the old file removed. A kill at any
/// point leaves every version readable: at worst an orphan that `kiln
/// models verify --remove-orphans` deletes.
pub fn reseal(
    config: &mut Config,
    registry: &mut Registry,
    encrypt: bool,
    actor: &str,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<Resealing, StoreError> {
    config.require_valid().map_err(StoreError::Invalid)?;
    let created =
        encrypt && !Keys::from_env(config)?.can_encrypt() && crypt::ensure_identity(config)?;
    let keys = if encrypt {
        sealing_keys(config)?
    } else {
        Keys::from_env(config)?
    };
    let dir = blobs_dir(config);
    let mut groups: std::collections::BTreeMap<PathBuf, Vec<ModelRecord>> = Default::default();
    for m in registry.models()? {
        if m.encrypted != encrypt {
            groups.entry(m.blob_path.clone()).or_default().push(m);
        }
    }
    let mut out = Resealing {
        encrypted: encrypt,
        blobs: Vec::new(),
        missing: Vec::new(),
        identity: keys.identity_file.clone(),
        identity_created: created,
    };
    for (from, models) in groups {
        let labels: Vec<String> = models.iter().map(ModelRecord::label).collect();
        if !from.is_file() {
            out.missing.extend(labels);
            continue;
        }
        let sha = models[0].sha256.clone();
        let label = labels.join(", ");
        let total = std::fs::metadata(&from).map_err(io(&from))?.len();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let tmp = incoming(&dir);
        let seal = encrypt.then_some(&keys);
        let mut src: Box<dyn Read> = if encrypt {
            Box::new(std::fs::File::open(&from).map_err(io(&from))?)
        } else {
            Box::new(crypt::open_reader(&from, &keys)?)
        };
        copy_checked(&mut src, &from, &tmp, seal, Some(&sha), |d| {
            progress(&label, d, total)
        })?;
        let to = blob_path(&dir, &sha, encrypt);
        let bytes = std::fs::metadata(&tmp).map_err(io(&tmp))?.len();
        let _lock = StoreLock::acquire(&dir)?;
        publish(&dir, &tmp, &to)?;
        // Until the registry names `to`, it is an orphan; after, `from` is.
        registry.move_blob(&sha, &to, encrypt, actor)?;
        if from.parent() == Some(dir.as_path()) && from != to {
            std::fs::remove_file(&from).map_err(io(&from))?;
        }
        out.blobs.push(Resealed {
            sha256: sha,
            models: labels,
            from,
            to,
            bytes,
        });
    }
    kiln_registry::config::set_encrypt_at_rest(config, encrypt).map_err(StoreError::Invalid)?;
    Ok(out)
}
