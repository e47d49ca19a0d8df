//! Where kiln keeps its state and where it looks for plugins.
//!
//! `KILN_HOME` (default: the platform's data directory, e.g.
//! `~/.local/share/kiln`) holds the registry (`kiln.db`), the plugin store
//! (`store/plugins/`), the drop-in plugin directory (`plugins/`) and the
//! optional `config.toml`:
//!
//! ```toml
//! [plugins]
//! dirs = ["/opt/vendor/kiln-plugins"]   # relative paths are relative to KILN_HOME
//! ```
//!
//! `KILN_PLUGIN_PATH` adds directories, separated like `PATH`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a plugin directory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirOrigin {
    Home,
    ConfigFile,
    Environment,
}

#[derive(Clone, Debug, Serialize)]
pub struct PluginDir {
    pub path: PathBuf,
    pub origin: DirOrigin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    plugins: PluginsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginsSection {
    #[serde(default)]
    dirs: Vec<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub home: PathBuf,
    pub config_file: PathBuf,
    pub plugin_dirs: Vec<PluginDir>,
    /// Set when `config.toml` exists but cannot be used; the defaults apply
    /// and commands that depend on it refuse to run.
    pub config_error: Option<String>,
}

impl Config {
    /// Reads `KILN_HOME`, `KILN_PLUGIN_PATH` and `config.toml`.
    pub fn from_env() -> Result<Config, String> {
        let home = match std::env::var_os("KILN_HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h),
            _ => dirs::data_dir()
                .map(|d| d.join("kiln"))
                .ok_or("cannot find a data directory for kiln; set KILN_HOME")?,
        };
        Ok(Config::new(
            home,
            std::env::var_os("KILN_PLUGIN_PATH").as_deref(),
        ))
    }

    /// The configuration rooted at `home`, with `plugin_path` as `KILN_PLUGIN_PATH`.
    pub fn new(home: PathBuf, plugin_path: Option<&std::ffi::OsStr>) -> Config {
        let config_file = home.join("config.toml");
        let mut plugin_dirs = vec![PluginDir {
            path: home.join("plugins"),
            origin: DirOrigin::Home,
        }];
        let mut config_error = None;
        match read_config_file(&config_file) {
            Ok(file) => plugin_dirs.extend(file.plugins.dirs.into_iter().map(|p| PluginDir {
                path: if p.is_absolute() { p } else { home.join(p) },
                origin: DirOrigin::ConfigFile,
            })),
            Err(e) => config_error = Some(e),
        }
        if let Some(paths) = plugin_path {
            plugin_dirs.extend(
                std::env::split_paths(paths)
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|path| PluginDir {
                        path,
                        origin: DirOrigin::Environment,
                    }),
            );
        }
        Config {
            home,
            config_file,
            plugin_dirs,
            config_error,
        }
    }

    pub fn registry_path(&self) -> PathBuf {
        self.home.join("kiln.db")
    }

    /// Installed plugin versions live here, one immutable directory each.
    pub fn plugin_store(&self) -> PathBuf {
        self.home.join("store").join("plugins")
    }

    /// Fails when `config.toml` is unusable, naming the file and the problem.
    pub fn require_valid(&self) -> Result<(), String> {
        match &self.config_error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

fn read_config_file(path: &Path) -> Result<ConfigFile, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    toml::from_str(&text).map_err(|e| {
        format!(
            "{} is not a valid kiln config: {}; fix it or move it away",
            path.display(),
            describe_toml_error(&text, &e)
        )
    })
}

/// "line 3 (`version = "one"`): <what toml says>", so the user sees which
/// line of which file to fix.
pub fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            format!("line {line_no} (`{line}`): {}", e.message())
        }
        None => e.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_come_from_home_file_and_env_in_order() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join("config.toml"),
            "[plugins]\ndirs = [\"vendor\", \"/opt/x\"]\n",
        )
        .unwrap();
        let env = std::env::join_paths(["/a", "/b"]).unwrap();
        let c = Config::new(home.path().to_path_buf(), Some(&env));
        let got: Vec<(PathBuf, DirOrigin)> = c
            .plugin_dirs
            .iter()
            .map(|d| (d.path.clone(), d.origin))
            .collect();
        assert_eq!(
            got,
            vec![
                (home.path().join("plugins"), DirOrigin::Home),
                (home.path().join("vendor"), DirOrigin::ConfigFile),
                (PathBuf::from("/opt/x"), DirOrigin::ConfigFile),
                (PathBuf::from("/a"), DirOrigin::Environment),
                (PathBuf::from("/b"), DirOrigin::Environment),
            ]
        );
        assert!(c.config_error.is_none());
    }

    #[test]
    fn a_broken_config_file_is_reported_not_fatal() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("config.toml"), "[plugins]\ndir = 3\n").unwrap();
        let c = Config::new(home.path().to_path_buf(), None);
        let err = c.config_error.clone().unwrap();
        assert!(err.contains("config.toml") && err.contains("dir"), "{err}");
        assert_eq!(c.plugin_dirs.len(), 1);
        assert!(c.require_valid().is_err());
    }
}
