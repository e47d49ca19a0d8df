//! Backend plugins as files: the manifest, the checks made before a library
//! is opened (preflight), discovery in the plugin directories, and the
//! immutable store that installed versions are copied into.
//!
//! Preflight order: manifest → ABI major → CPU features (present and
//! OS-enabled) → library readable → sha256 matches → ELF sanity. Only a
//! plugin that passes all of them is ever handed to the dynamic loader.

pub mod elf;
pub mod manifest;

use kiln_plugin_api::{KILN_ABI_VERSION_MAJOR, KILN_ABI_VERSION_MINOR};
use kiln_registry::config::{Config, PluginDir};
pub use manifest::{MANIFEST_FILE, Manifest};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Plugins larger than this are refused before hashing.
const MAX_LIBRARY_BYTES: u64 = 2 << 30;

/// Why a plugin was refused before its library was opened.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("bad manifest: {0}")]
    Manifest(String),
    #[error(
        "the manifest declares kiln ABI {plugin_major}.{plugin_minor}, this kiln speaks ABI {host_major}.{host_minor}; get a build of the plugin for ABI {host_major}.x"
    )]
    AbiMajor {
        plugin_major: u16,
        plugin_minor: u16,
        host_major: u16,
        host_minor: u16,
    },
    #[error(
        "the plugin requires CPU feature(s) {} which this machine lacks or its OS has not enabled; use a build of the plugin for this CPU",
        missing.join(", ")
    )]
    CpuFeatures { missing: Vec<String> },
    #[error("cannot read the library {path}: {error}")]
    Library { path: PathBuf, error: String },
    #[error(
        "sha256 mismatch for {path}: the manifest says {expected}, the file is {actual}; the library was changed or corrupted after the manifest was written"
    )]
    Hash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path} is not a loadable library: {reason}")]
    Elf { path: PathBuf, reason: String },
}

/// A plugin whose manifest and library passed preflight.
#[derive(Clone, Debug)]
pub struct VerifiedPlugin {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub library_path: PathBuf,
    pub sha256: String,
}

impl VerifiedPlugin {
    pub fn label(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs every check short of opening the library.
pub fn preflight(manifest_path: &Path) -> Result<VerifiedPlugin, PreflightError> {
    let manifest = Manifest::read(manifest_path).map_err(PreflightError::Manifest)?;
    let (major, minor) = manifest.abi_version().map_err(PreflightError::Manifest)?;
    if major != KILN_ABI_VERSION_MAJOR {
        return Err(PreflightError::AbiMajor {
            plugin_major: major,
            plugin_minor: minor,
            host_major: KILN_ABI_VERSION_MAJOR,
            host_minor: KILN_ABI_VERSION_MINOR,
        });
    }
    let missing: Vec<String> = manifest
        .cpu_features
        .iter()
        .filter(|f| crate::cpu_features::detect(f) != Some(true))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(PreflightError::CpuFeatures { missing });
    }
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let library_path = dir.join(&manifest.library);
    let bytes = read_library(&library_path)?;
    let actual = sha256_hex(&bytes);
    if !actual.eq_ignore_ascii_case(&manifest.sha256) {
        return Err(PreflightError::Hash {
            path: library_path,
            expected: manifest.sha256.to_ascii_lowercase(),
            actual,
        });
    }
    elf::check_library(&bytes).map_err(|reason| PreflightError::Elf {
        path: library_path.clone(),
        reason,
    })?;
    Ok(VerifiedPlugin {
        manifest_path: manifest_path.to_path_buf(),
        library_path,
        sha256: actual,
        manifest,
    })
}

fn read_library(path: &Path) -> Result<Vec<u8>, PreflightError> {
    let err = |error: String| PreflightError::Library {
        path: path.to_path_buf(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > MAX_LIBRARY_BYTES {
        return Err(err(format!(
            "{} bytes is larger than the {MAX_LIBRARY_BYTES}-byte limit",
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| err(e.to_string()))
}

/// A manifest found in a plugin directory.
#[derive(Debug)]
pub struct Discovered {
    pub dir: PluginDir,
    pub manifest_path: PathBuf,
    pub manifest: Result<Manifest, String>,
}

/// Finds manifests in every plugin directory: a directory holding
/// `kiln-plugin.toml` itself, or one level of subdirectories that do.
pub fn discover(config: &Config) -> Vec<Discovered> {
    let mut found = Vec::new();
    for dir in &config.plugin_dirs {
        let direct = dir.path.join(MANIFEST_FILE);
        let mut candidates = Vec::new();
        if direct.is_file() {
            candidates.push(direct);
        } else if let Ok(entries) = std::fs::read_dir(&dir.path) {
            let mut subdirs: Vec<PathBuf> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join(MANIFEST_FILE))
                .filter(|p| p.is_file())
                .collect();
            subdirs.sort();
            candidates.extend(subdirs);
        }
        for manifest_path in candidates {
            found.push(Discovered {
                dir: dir.clone(),
                manifest: Manifest::read(&manifest_path),
                manifest_path,
            });
        }
    }
    found
}

/// Resolves what the user typed after `kiln plugins add`: a manifest file,
/// a directory holding one, or the name of a discovered plugin.
pub fn resolve_manifest(arg: &str, config: &Config) -> Result<PathBuf, String> {
    let path = Path::new(arg);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let m = path.join(MANIFEST_FILE);
        return if m.is_file() {
            Ok(m)
        } else {
            Err(format!("{} has no {MANIFEST_FILE}", path.display()))
        };
    }
    let named: Vec<Discovered> = discover(config)
        .into_iter()
        .filter(|d| d.manifest.as_ref().is_ok_and(|m| m.name == arg))
        .collect();
    match named.len() {
        0 => Err(format!(
            "{arg} is neither a file, a directory, nor the name of a plugin in the plugin directories"
        )),
        1 => Ok(named.into_iter().next().expect("one").manifest_path),
        _ => Err(format!(
            "several discovered plugins are named {arg}: {}; pass a path",
            named
                .iter()
                .map(|d| d.manifest_path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Copies a verified plugin into the store as `<store>/<name>/<version>/`
/// (manifest and library), atomically: a temporary directory, fsynced,
/// renamed into place. Returns the stored manifest's path.
pub fn copy_into_store(store: &Path, plugin: &VerifiedPlugin) -> std::io::Result<PathBuf> {
    let m = &plugin.manifest;
    let parent = store.join(&m.name);
    std::fs::create_dir_all(&parent)?;
    let target = parent.join(m.version.to_string());
    let stored_manifest = target.join(MANIFEST_FILE);
    // An earlier run may have stored this exact version already.
    if let Ok(existing) = preflight(&stored_manifest)
        && existing.sha256 == plugin.sha256
    {
        return Ok(stored_manifest);
    }
    let tmp = parent.join(format!(".{}.tmp-{}", m.version, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for (from, name) in [
        (&plugin.library_path, m.library.as_str()),
        (&plugin.manifest_path, MANIFEST_FILE),
    ] {
        let bytes = std::fs::read(from)?;
        let mut f = std::fs::File::create(tmp.join(name))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    if target.exists() {
        // A half-written or different copy from an interrupted run.
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&tmp, &target)?;
    std::fs::File::open(&parent)?.sync_all()?;
    Ok(stored_manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn write_plugin(dir: &Path, lib: &[u8], sha: &str, features: &str) -> PathBuf {
        std::fs::write(dir.join("libx.so"), lib).unwrap();
        let manifest = format!(
            "name = \"x\"\nversion = \"0.1.0\"\nkind = \"backend\"\nabi = \"1.1\"\nlibrary = \"libx.so\"\nsha256 = \"{sha}\"\ncpu_features = [{features}]\n"
        );
        let path = dir.join(MANIFEST_FILE);
        std::fs::write(&path, manifest).unwrap();
        path
    }

    #[test]
    fn preflight_refuses_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let lib = b"not an elf".to_vec();
        let good_sha = sha256_hex(&lib);
        let m = write_plugin(dir.path(), &lib, &"0".repeat(64), "");
        assert!(matches!(preflight(&m), Err(PreflightError::Hash { .. })));
        let m = write_plugin(dir.path(), &lib, &good_sha, "");
        let err = preflight(&m).unwrap_err();
        assert!(matches!(err, PreflightError::Elf { .. }), "{err}");
        // A foreign-architecture feature is known but never present.
        let foreign = if cfg!(target_arch = "aarch64") {
            "\"avx2\""
        } else {
            "\"neon\""
        };
        let m = write_plugin(dir.path(), &lib, &good_sha, foreign);
        let err = preflight(&m).unwrap_err();
        assert!(matches!(err, PreflightError::CpuFeatures { .. }), "{err}");
    }
}
