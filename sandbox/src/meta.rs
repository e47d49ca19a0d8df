//! What a policy module says about itself, read with `wasmparser` before
//! anything is compiled: its size, its `kiln_policy` metadata (ABI version,
//! kind, name, version, requested limits), its imports (only `kiln.log` is
//! allowed: no WASI, no other host functions) and its exports.

use crate::PolicyError;
use crate::abi::*;
use crate::limits::LimitOverrides;
use serde::{Deserialize, Serialize};
use wasmparser::{Parser, Payload, TypeRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Rank,
    Tune,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Rank => "rank",
            PolicyKind::Tune => "tune",
        }
    }

    pub fn export(self) -> &'static str {
        match self {
            PolicyKind::Rank => EXPORT_RANK,
            PolicyKind::Tune => EXPORT_TUNE,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    abi: String,
    kind: PolicyKind,
    name: String,
    version: String,
    #[serde(default)]
    limits: LimitOverrides,
    #[serde(default)]
    params: Vec<ParamDecl>,
}

/// A parameter a policy declares (ABI 1.4): the host sends its value in
/// every ranking input, the user's from `config.toml` (`[policies.params.
/// NAME]`) or else `default`; `kiln tune` searches it within `min`..=`max`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamDecl {
    pub name: String,
    pub default: f64,
    pub min: f64,
    pub max: f64,
    /// A search spreads its tries on a log scale (`min` must be positive).
    #[serde(default)]
    pub log: bool,
    /// Only whole numbers.
    #[serde(default)]
    pub integer: bool,
    /// What it weighs, for `kiln policy show`.
    #[serde(default)]
    pub doc: String,
}

/// Parameters a policy may declare.
pub const MAX_PARAMS: usize = 32;

impl ParamDecl {
    /// Whether `v` is a value the parameter takes; the message names the
    /// range.
    pub fn check(&self, v: f64) -> Result<(), String> {
        if !v.is_finite() || v < self.min || v > self.max || (self.integer && v.fract() != 0.0) {
            return Err(format!(
                "{} = {v}: give {}{} to {}",
                self.name,
                if self.integer {
                    "a whole number from "
                } else {
                    ""
                },
                self.min,
                self.max
            ));
        }
        Ok(())
    }
}

/// Checks a declaration: names that `config.toml` can hold, unique, at
/// most [`MAX_PARAMS`], finite ranges holding their defaults.
fn check_params(params: &[ParamDecl], abi: (u16, u16)) -> Result<(), String> {
    if params.is_empty() {
        return Ok(());
    }
    if abi < (1, 4) {
        return Err(format!(
            "params need policy ABI 1.4; the policy declares {}.{}",
            abi.0, abi.1
        ));
    }
    if params.len() > MAX_PARAMS {
        return Err(format!(
            "{} params declared; at most {MAX_PARAMS}",
            params.len()
        ));
    }
    for (i, p) in params.iter().enumerate() {
        let name_ok = !p.name.is_empty()
            && p.name.len() <= 64
            && p.name.starts_with(|c: char| c.is_ascii_lowercase())
            && (p.name.chars()).all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !name_ok {
            return Err(format!(
                "param {:?}: a name is lowercase letters, digits and '_', starting with a letter",
                p.name
            ));
        }
        if params[..i].iter().any(|q| q.name == p.name) {
            return Err(format!("param {} is declared twice", p.name));
        }
        if !(p.min.is_finite() && p.max.is_finite() && p.min <= p.max) {
            return Err(format!(
                "param {}: min {} and max {} are not a range",
                p.name, p.min, p.max
            ));
        }
        if p.log && p.min <= 0.0 {
            return Err(format!(
                "param {}: a log-scaled range must be positive (min {})",
                p.name, p.min
            ));
        }
        p.check(p.default)
            .map_err(|e| format!("param {}'s default: {e}", p.name))?;
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyMeta {
    /// The ABI the policy was built for, (major, minor).
    pub abi: (u16, u16),
    pub kind: PolicyKind,
    pub name: String,
    pub version: semver::Version,
    /// Limits the policy asks for.
    pub limits: LimitOverrides,
    /// The parameters it declares (ABI 1.4), in the order their values
    /// are sent.
    pub params: Vec<ParamDecl>,
}

impl PolicyMeta {
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Reads and checks a module's declarations. Refuses a module over
/// `max_bytes` before parsing it.
pub fn inspect(bytes: &[u8], max_bytes: u64) -> Result<PolicyMeta, PolicyError> {
    if bytes.len() as u64 > max_bytes {
        return Err(PolicyError::TooLarge {
            bytes: bytes.len() as u64,
            limit: max_bytes,
        });
    }
    let mut meta: Option<&[u8]> = None;
    let mut exports: Vec<(String, wasmparser::ExternalKind)> = Vec::new();
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| PolicyError::NotWasm(e.to_string()))?;
        match payload {
            Payload::CustomSection(c) if c.name() == META_SECTION => meta = Some(c.data()),
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    let import = import.map_err(|e| PolicyError::NotWasm(e.to_string()))?;
                    let allowed = import.module == HOST_MODULE
                        && import.name == HOST_LOG
                        && matches!(import.ty, TypeRef::Func(_) | TypeRef::FuncExact(_));
                    if !allowed {
                        return Err(PolicyError::ForbiddenImport {
                            module: import.module.to_string(),
                            name: import.name.to_string(),
                        });
                    }
                }
            }
            Payload::ExportSection(section) => {
                for e in section {
                    let e = e.map_err(|e| PolicyError::NotWasm(e.to_string()))?;
                    exports.push((e.name.to_string(), e.kind));
                }
            }
            _ => {}
        }
    }
    let raw = meta.ok_or(PolicyError::NoMetadata)?;
    let text = std::str::from_utf8(raw)
        .map_err(|_| PolicyError::BadMetadata("the kiln_policy section is not UTF-8".into()))?
        .trim_end_matches('\0');
    let m: RawMeta =
        serde_json::from_str(text).map_err(|e| PolicyError::BadMetadata(e.to_string()))?;
    let abi = m
        .abi
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
        .ok_or_else(|| PolicyError::BadMetadata(format!("abi {:?} must be MAJOR.MINOR", m.abi)))?;
    if abi.0 != ABI_MAJOR {
        return Err(PolicyError::AbiMajor {
            policy: m.abi,
            host: format!("{ABI_MAJOR}.{ABI_MINOR}"),
        });
    }
    if abi.1 > ABI_MINOR {
        return Err(PolicyError::AbiNewer {
            policy: m.abi,
            host: format!("{ABI_MAJOR}.{ABI_MINOR}"),
        });
    }
    check_params(&m.params, abi).map_err(PolicyError::BadMetadata)?;
    let version = semver::Version::parse(&m.version)
        .map_err(|e| PolicyError::BadMetadata(format!("version {:?}: {e}", m.version)))?;
    let has = |name: &str, kind: wasmparser::ExternalKind| {
        exports.iter().any(|(n, k)| n == name && *k == kind)
    };
    use wasmparser::ExternalKind::{Func, Memory};
    for (name, kind) in [
        (EXPORT_MEMORY, Memory),
        (EXPORT_ALLOC, Func),
        (m.kind.export(), Func),
    ] {
        if !has(name, kind) {
            return Err(PolicyError::MissingExport(name));
        }
    }
    Ok(PolicyMeta {
        abi,
        kind: m.kind,
        name: m.name,
        version,
        limits: m.limits,
        params: m.params,
    })
}

/// The values of the parameters `decls` declares, in order: `set`'s (the
/// policy's `[policies.params.NAME]` table) where valid, else the
/// declared defaults. Each entry that is not used (an unknown name, a
/// value out of range) is named in the second list, with what to do.
pub fn resolve_params(
    decls: &[ParamDecl],
    set: Option<&std::collections::BTreeMap<String, f64>>,
) -> (Vec<f64>, Vec<String>) {
    let mut problems = Vec::new();
    let values = decls
        .iter()
        .map(|d| match set.and_then(|s| s.get(&d.name)) {
            Some(&v) => match d.check(v) {
                Ok(()) => v,
                Err(e) => {
                    problems.push(format!("{e}; its default {} is used", d.default));
                    d.default
                }
            },
            None => d.default,
        })
        .collect();
    for name in set.into_iter().flat_map(|s| s.keys()) {
        if !decls.iter().any(|d| &d.name == name) {
            problems.push(format!(
                "{name}: not a parameter it declares{}",
                if decls.is_empty() {
                    " (it declares none)".to_string()
                } else {
                    format!(
                        " (give some of {})",
                        decls
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ));
        }
    }
    (values, problems)
}
