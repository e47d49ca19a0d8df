//! Policy versions in the registry (activated, rolled back and audited like
//! plugins; one active policy per kind), the circuit breaker's persisted
//! failure count, and the decision log.

use super::stack::{self, POLICIES};
use super::{NOW, Registry, Result, Transition, audit};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize)]
pub struct PolicyRecord {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub blob_path: PathBuf,
    pub abi: String,
    pub state: String,
    pub limits: serde_json::Value,
    pub quality: serde_json::Value,
    pub failures: i64,
    pub installed_at: String,
}

impl PolicyRecord {
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

pub struct NewPolicy {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub blob_path: PathBuf,
    pub abi: (u16, u16),
    pub limits: serde_json::Value,
    pub quality: serde_json::Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub id: i64,
    pub at: String,
    pub policy: String,
    pub policy_sha256: String,
    pub kind: String,
    #[serde(skip)]
    pub input: Vec<u8>,
    #[serde(skip)]
    pub output: Option<Vec<u8>>,
    pub error: Option<String>,
    pub fuel_used: Option<i64>,
    pub elapsed_us: Option<i64>,
    /// `input` and `output` are age files (encryption at rest).
    pub encrypted: bool,
}

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PolicyRecord> {
    let json = |k: &str| -> rusqlite::Result<serde_json::Value> {
        Ok(serde_json::from_str(&r.get::<_, String>(k)?).unwrap_or_default())
    };
    Ok(PolicyRecord {
        id: r.get("id")?,
        name: r.get("name")?,
        version: r.get("version")?,
        kind: r.get("kind")?,
        sha256: r.get("sha256")?,
        blob_path: PathBuf::from(r.get::<_, String>("blob_path")?),
        abi: format!(
            "{}.{}",
            r.get::<_, i64>("abi_major")?,
            r.get::<_, i64>("abi_minor")?
        ),
        state: r.get("state")?,
        limits: json("limits")?,
        quality: json("quality")?,
        failures: r.get("failures")?,
        installed_at: r.get("installed_at")?,
    })
}

/// Makes `id` active for its name, and the only active policy of its kind.
pub(super) fn activate_for_kind(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    actor: &str,
    action: &str,
) -> Result<Transition> {
    let (name, kind): (String, String) =
        tx.query_row("SELECT name, kind FROM policies WHERE id = ?1", [id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let others: Vec<(i64, String)> = {
        let mut stmt =
            tx.prepare("SELECT id, name || '@' || version FROM policies WHERE kind = ?1 AND name != ?2 AND state = 'active'")?;
        stmt.query_map(params![kind, name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (other, label) in others {
        stack::set_state(tx, &POLICIES, other, "inactive")?;
        audit(
            tx,
            actor,
            "policy",
            "deactivate",
            &label,
            Some("active"),
            Some("inactive"),
            Some(&format!("{name} became the active {kind} policy")),
        )?;
    }
    tx.execute("UPDATE policies SET failures = 0 WHERE id = ?1", [id])?;
    stack::activate(tx, &POLICIES, &name, id, actor, action)
}

impl Registry {
    pub fn add_policy(&mut self, p: &NewPolicy, actor: &str) -> Result<(PolicyRecord, Transition)> {
        let tx = self.write()?;
        stack::refuse_reinstall(&tx, &POLICIES, &p.name, &p.version, &p.sha256, "module")?;
        tx.execute(
            &format!(
                "INSERT INTO policies (name, version, kind, sha256, blob_path, abi_major, abi_minor, state, limits, quality, installed_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'inactive', ?8, ?9, {NOW}, {NOW})"
            ),
            params![
                p.name,
                p.version,
                p.kind,
                p.sha256,
                p.blob_path.to_string_lossy(),
                p.abi.0,
                p.abi.1,
                p.limits.to_string(),
                p.quality.to_string()
            ],
        )?;
        let id = tx.last_insert_rowid();
        audit(
            &tx,
            actor,
            "policy",
            "install",
            &p.name,
            None,
            Some(&p.version),
            Some(&format!("sha256 {}", p.sha256)),
        )?;
        let t = activate_for_kind(&tx, id, actor, "activate")?;
        let rec = tx.query_row("SELECT * FROM policies WHERE id = ?1", [id], from_row)?;
        tx.commit()?;
        Ok((rec, t))
    }

    /// The sha256 of every module a policy version or a logged decision
    /// names (`kiln policy replay` needs the module a decision was made
    /// with, installed or not).
    pub fn policy_hashes_in_use(&self) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT sha256 FROM policies UNION SELECT DISTINCT policy_sha256 FROM policy_decisions",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn policies(&self) -> Result<Vec<PolicyRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM policies ORDER BY kind, name, id")?;
        let rows = stmt.query_map([], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// `NAME` (active version, else newest) or `NAME@VERSION`.
    pub fn policy(&self, spec: &str) -> Result<Option<PolicyRecord>> {
        let (name, version) = match spec.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (spec, None),
        };
        let all: Vec<PolicyRecord> = self
            .policies()?
            .into_iter()
            .filter(|p| p.name == name)
            .collect();
        Ok(match version {
            Some(v) => all.into_iter().find(|p| p.version == v),
            None => all
                .iter()
                .find(|p| p.state == "active")
                .cloned()
                .or_else(|| {
                    all.into_iter()
                        .max_by_key(|p| semver::Version::parse(&p.version).ok())
                }),
        })
    }

    /// The active policy of a kind (`rank` or `tune`).
    pub fn active_policy(&self, kind: &str) -> Result<Option<PolicyRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM policies WHERE kind = ?1 AND state = 'active'",
                [kind],
                from_row,
            )
            .optional()?)
    }

    /// Records a run-time outcome; at `threshold` consecutive failures
    /// (the circuit breaker's limit, which the policy layer defines) the
    /// policy is disabled, audited as a trip. Returns whether this call
    /// tripped it.
    pub fn record_policy_outcome(
        &mut self,
        sha256: &str,
        ok: bool,
        why: Option<&str>,
        threshold: u32,
    ) -> Result<bool> {
        let tx = self.write()?;
        let row: Option<(i64, String, String, String)> = tx
            .query_row(
                "SELECT id, name, version, state FROM policies WHERE sha256 = ?1 ORDER BY id DESC LIMIT 1",
                [sha256],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((id, name, version, state)) = row else {
            return Ok(false);
        };
        if ok {
            tx.execute("UPDATE policies SET failures = 0 WHERE id = ?1", [id])?;
            tx.commit()?;
            return Ok(false);
        }
        tx.execute(
            "UPDATE policies SET failures = failures + 1 WHERE id = ?1",
            [id],
        )?;
        let failures: i64 =
            tx.query_row("SELECT failures FROM policies WHERE id = ?1", [id], |r| {
                r.get(0)
            })?;
        let trip = failures >= i64::from(threshold) && state != "disabled";
        if trip {
            stack::set_state(&tx, &POLICIES, id, "disabled")?;
            audit(
                &tx,
                "circuit-breaker",
                "policy",
                "trip",
                &name,
                Some(&state),
                Some("disabled"),
                Some(&format!(
                    "{name}@{version}: {failures} consecutive failures; last: {}",
                    why.unwrap_or("?")
                )),
            )?;
        }
        tx.commit()?;
        Ok(trip)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record_decision(
        &mut self,
        policy: &str,
        sha256: &str,
        kind: &str,
        input: &[u8],
        output: Option<&[u8]>,
        error: Option<&str>,
        fuel_used: Option<u64>,
        elapsed_us: Option<u64>,
        encrypted: bool,
    ) -> Result<i64> {
        self.conn.execute(
            &format!(
                "INSERT INTO policy_decisions (at, policy, policy_sha256, kind, input, output, error, fuel_used, elapsed_us, encrypted)
                 VALUES ({NOW}, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            params![policy, sha256, kind, input, output, error, fuel_used.map(|v| v as i64), elapsed_us.map(|v| v as i64), encrypted],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn decision(&self, id: i64) -> Result<Option<Decision>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM policy_decisions WHERE id = ?1",
                [id],
                decision_from_row,
            )
            .optional()?)
    }

    /// The newest `limit` decisions, newest first.
    pub fn decisions(&self, limit: usize) -> Result<Vec<Decision>> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM policy_decisions ORDER BY id DESC LIMIT ?1")?;
        let rows = stmt.query_map([limit as i64], decision_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

fn decision_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Decision> {
    Ok(Decision {
        id: r.get("id")?,
        at: r.get("at")?,
        policy: r.get("policy")?,
        policy_sha256: r.get("policy_sha256")?,
        kind: r.get("kind")?,
        input: r.get("input")?,
        output: r.get("output")?,
        error: r.get("error")?,
        fuel_used: r.get("fuel_used")?,
        elapsed_us: r.get("elapsed_us")?,
        encrypted: r.get("encrypted")?,
    })
}
