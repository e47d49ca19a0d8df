//! `kiln-plugin.toml`: what a plugin says about itself, checked before its
//! library is opened.
//!
//! ```toml
//! name = "cpu"                 # [a-z0-9][a-z0-9_-]*, at most 64 bytes
//! version = "0.1.0"            # semver
//! kind = "backend"
//! abi = "1.1"                  # the kiln backend ABI it was built for
//! library = "libkiln_cpu.so"   # next to the manifest
//! sha256 = "…64 hex digits…"   # of the library file
//! cpu_features = ["avx2", "fma"]
//! description = "optional"
//! ```

use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MANIFEST_FILE: &str = "kiln-plugin.toml";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginKind {
    Backend,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: semver::Version,
    pub kind: PluginKind,
    pub abi: String,
    pub library: String,
    pub sha256: String,
    #[serde(default)]
    pub cpu_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Manifest {
    /// Reads and validates a manifest; the error names the file and the field.
    pub fn read(path: &Path) -> Result<Manifest, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Manifest::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Manifest, String> {
        let m: Manifest = toml::from_str(text)
            .map_err(|e| kiln_registry::config::describe_toml_error(text, &e))?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.as_bytes()[0].is_ascii_alphanumeric()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(format!(
                "name {:?} must be 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
                self.name
            ));
        }
        if self.name == "cpu" {
            return Err(
                "name \"cpu\" is reserved for kiln's built-in CPU backend; choose another".into(),
            );
        }
        self.abi_version()?;
        let lib = Path::new(&self.library);
        let plain = lib.components().count() == 1
            && matches!(
                lib.components().next(),
                Some(std::path::Component::Normal(_))
            );
        if !plain {
            return Err(format!(
                "library {:?} must be a file name next to the manifest (no directories, no '..')",
                self.library
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "sha256 {:?} must be 64 hexadecimal digits (run `sha256sum {}`)",
                self.sha256, self.library
            ));
        }
        for f in &self.cpu_features {
            if crate::cpu_features::detect(f).is_none() {
                return Err(format!(
                    "unknown CPU feature {f:?}; known: {}",
                    crate::cpu_features::KNOWN.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// The declared ABI as (major, minor).
    pub fn abi_version(&self) -> Result<(u16, u16), String> {
        let parsed = self
            .abi
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        parsed.ok_or_else(|| format!("abi {:?} must be MAJOR.MINOR, e.g. \"1.1\"", self.abi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "vendor-gpu"
version = "1.2.3"
kind = "backend"
abi = "1.1"
library = "libvendor.so"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
cpu_features = ["avx2"]
"#;

    #[test]
    fn parses_a_good_manifest() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.name, "vendor-gpu");
        assert_eq!(m.version, semver::Version::new(1, 2, 3));
        assert_eq!(m.abi_version().unwrap(), (1, 1));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("name = \"vendor-gpu\"", "name = \"Vendor GPU\"", "name"),
            ("name = \"vendor-gpu\"", "name = \"cpu\"", "reserved"),
            (
                "version = \"1.2.3\"",
                "version = \"one\"",
                "line 3 (`version = \"one\"`)",
            ),
            ("kind = \"backend\"", "kind = \"frontend\"", "frontend"),
            ("abi = \"1.1\"", "abi = \"1\"", "MAJOR.MINOR"),
            (
                "library = \"libvendor.so\"",
                "library = \"../evil.so\"",
                "no '..'",
            ),
            ("sha256 = \"0000", "sha256 = \"zz00", "64 hexadecimal"),
            (
                "cpu_features = [\"avx2\"]",
                "cpu_features = [\"avx1024\"]",
                "unknown CPU feature",
            ),
            ("cpu_features", "cpu_feature", "unknown field"),
        ];
        for (from, to, expect) in cases {
            let text = GOOD.replace(from, to);
            let err = Manifest::parse(&text).unwrap_err();
            assert!(err.contains(expect), "{to}: {err}");
        }
    }
}
