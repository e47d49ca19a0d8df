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
    })
}
