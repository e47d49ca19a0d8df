//! `kiln plugins add`: the one path by which a plugin version enters the
//! registry.
//!
//! preflight (manifest, ABI, CPU features, sha256, ELF) → open and
//! negotiate → conformance on every device against the CPU reference →
//! copy into the store → one registry transaction (install + activate +
//! audit). A refusal at any step leaves the registry exactly as it was.

use crate::backend::{Backend, BackendLoadError, conformance};
use crate::plugin::{self, PreflightError, VerifiedPlugin};
use kiln_registry::config::Config;
use kiln_registry::{NewPlugin, Registry, RegistryError, Transition};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{label}: refused before loading: {source}")]
    Preflight {
        label: String,
        source: PreflightError,
    },
    #[error("{label}: refused at load: {source}")]
    Load {
        label: String,
        source: BackendLoadError,
    },
    #[error("{label}: the plugin reports no devices; nothing to use")]
    NoDevices { label: String },
    #[error(
        "{label}: failed conformance, so it stays disabled ({failed} of {claimed} claimed cases failed):\n  {}",
        failures.join("\n  ")
    )]
    Conformance {
        label: String,
        claimed: usize,
        failed: usize,
        failures: Vec<String>,
    },
    #[error("{label}: cannot copy into the plugin store {store}: {source}")]
    Store {
        label: String,
        store: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Registry(#[from] RegistryError),
}

/// What an accepted plugin brought.
pub struct Installed {
    pub plugin: VerifiedPlugin,
    pub transition: Transition,
    pub conformance: conformance::Report,
}

/// Runs the whole pipeline for the manifest at `manifest_path`.
/// `progress(done, total)` follows the conformance run.
pub fn add_plugin(
    config: &Config,
    registry: &mut Registry,
    manifest_path: &Path,
    actor: &str,
    progress: impl FnMut(usize, usize),
) -> Result<Installed, InstallError> {
    let shown = manifest_path.display().to_string();
    let verified = plugin::preflight(manifest_path).map_err(|source| InstallError::Preflight {
        label: shown.clone(),
        source,
    })?;
    let label = verified.label();
    // Refuse a duplicate before running anything of the plugin's.
    if let Some(existing) = registry.plugins()?.into_iter().find(|p| {
        p.name == verified.manifest.name && p.version == verified.manifest.version.to_string()
    }) {
        let same = existing.sha256 == verified.sha256;
        return Err(InstallError::Registry(RegistryError::Refused(if same {
            format!("{label} is already installed; `kiln plugins enable {label}` makes it active")
        } else {
            format!(
                "{label} is already installed with a different library (sha256 {}…); give the new build a new version",
                &existing.sha256[..12]
            )
        })));
    }
    let run = crate::backend::PluginRun::from_config(&config.plugin_run);
    let backend = Backend::load_plugin(&verified, &run).map_err(|source| InstallError::Load {
        label: label.clone(),
        source,
    })?;
    if backend.devices.is_empty() {
        return Err(InstallError::NoDevices { label });
    }
    let report = conformance::run(&backend, progress);
    if !report.passed() {
        let failed: usize = report.devices.iter().map(|d| d.failed).sum();
        let claimed: usize = report.devices.iter().map(|d| d.passed + d.failed).sum();
        return Err(InstallError::Conformance {
            label,
            claimed,
            failed,
            failures: report.failures(),
        });
    }
    let store = config.plugin_store();
    let stored_manifest =
        plugin::copy_into_store(&store, &verified).map_err(|source| InstallError::Store {
            label: label.clone(),
            store: store.display().to_string(),
            source,
        })?;
    let stored_library = stored_manifest
        .parent()
        .expect("a manifest path has a parent")
        .join(&verified.manifest.library);
    let abi = verified
        .manifest
        .abi_version()
        .expect("preflight checked the ABI string");
    let transition = registry.install(
        &NewPlugin {
            name: verified.manifest.name.clone(),
            version: verified.manifest.version.to_string(),
            kind: "backend".into(),
            sha256: verified.sha256.clone(),
            manifest_path: stored_manifest,
            library_path: stored_library,
            abi,
            conformance: report.summary(),
        },
        actor,
    )?;
    Ok(Installed {
        plugin: verified,
        transition,
        conformance: report,
    })
}
