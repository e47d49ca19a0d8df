//! LoRA adapter versions in the registry, beside models: each `kiln
//! adapters add` of a name is a new version (1, 2, …) pointing at a blob;
//! one version per name is active; enable, disable and rollback are the
//! shared activation stack's (`stack.rs`), audited as `adapter`.

use super::stack::{self, ADAPTERS};
use super::{NOW, Registry, RegistryError, Result, Transition, audit};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize)]
pub struct AdapterRecord {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub version: u32,
    pub sha256: String,
    pub blob_path: PathBuf,
    pub architecture: String,
    pub rank: u32,
    pub alpha: f64,
    pub size_bytes: u64,
    /// The sha256 of the model it was checked against when added.
    pub base_sha256: Option<String>,
    /// (ε, δ) it was trained with under differential privacy, if it was.
    pub dp_epsilon: Option<f64>,
    pub dp_delta: Option<f64>,
    pub state: String,
    pub added_at: String,
}

impl AdapterRecord {
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

pub struct NewAdapter {
    pub name: String,
    pub sha256: String,
    pub blob_path: PathBuf,
    pub architecture: String,
    pub rank: u32,
    pub alpha: f64,
    pub size_bytes: u64,
    pub base_sha256: Option<String>,
    pub dp_epsilon: Option<f64>,
    pub dp_delta: Option<f64>,
}

/// One `kiln finetune eval` of an adapter version against its base.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterEval {
    pub model: String,
    pub model_sha256: String,
    pub data: String,
    pub sequences: u64,
    pub target_tokens: u64,
    pub holes: u64,
    /// Held-out negative log-likelihood, nats per target token.
    pub base_nll: f64,
    pub adapter_nll: f64,
    /// Adapter less base, paired over sequences, with its 95% interval.
    pub delta_nll: f64,
    pub delta_nll_lo: f64,
    pub delta_nll_hi: f64,
    /// The whole report, as `kiln finetune eval --json` prints it.
    pub report: serde_json::Value,
    pub measured_at: String,
}

pub struct NewAdapterEval {
    pub model: String,
    pub model_sha256: String,
    pub data: String,
    pub sequences: u64,
    pub target_tokens: u64,
    pub holes: u64,
    pub base_nll: f64,
    pub adapter_nll: f64,
    pub delta_nll: f64,
    pub delta_nll_lo: f64,
    pub delta_nll_hi: f64,
    pub report: serde_json::Value,
}

fn eval_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AdapterEval> {
    let report: String = r.get("report")?;
    Ok(AdapterEval {
        model: r.get("model")?,
        model_sha256: r.get("model_sha256")?,
        data: r.get("data")?,
        sequences: r.get::<_, i64>("sequences")? as u64,
        target_tokens: r.get::<_, i64>("target_tokens")? as u64,
        holes: r.get::<_, i64>("holes")? as u64,
        base_nll: r.get("base_nll")?,
        adapter_nll: r.get("adapter_nll")?,
        delta_nll: r.get("delta_nll")?,
        delta_nll_lo: r.get("delta_nll_lo")?,
        delta_nll_hi: r.get("delta_nll_hi")?,
        report: serde_json::from_str(&report).unwrap_or(serde_json::Value::Null),
        measured_at: r.get("measured_at")?,
    })
}

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AdapterRecord> {
    Ok(AdapterRecord {
        id: r.get("id")?,
        name: r.get("name")?,
        version: r.get("version")?,
        sha256: r.get("sha256")?,
        blob_path: PathBuf::from(r.get::<_, String>("blob_path")?),
        architecture: r.get("architecture")?,
        rank: r.get("rank")?,
        alpha: r.get("alpha")?,
        size_bytes: r.get::<_, i64>("size_bytes")? as u64,
        base_sha256: r.get("base_sha256")?,
        dp_epsilon: r.get("dp_epsilon")?,
        dp_delta: r.get("dp_delta")?,
        state: r.get("state")?,
        added_at: r.get("added_at")?,
    })
}

impl Registry {
    /// Records a new version of `a.name` and makes it active.
    pub fn add_adapter(
        &mut self,
        a: &NewAdapter,
        actor: &str,
    ) -> Result<(AdapterRecord, Transition)> {
        let tx = self.write()?;
        let version = stack::next_version(&tx, &ADAPTERS, &a.name, &a.sha256)?;
        tx.execute(
            &format!(
                "INSERT INTO adapters (name, version, sha256, blob_path, architecture, rank, alpha, size_bytes, base_sha256, dp_epsilon, dp_delta, state, added_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'inactive', {NOW}, {NOW})"
            ),
            params![
                a.name,
                version,
                a.sha256,
                a.blob_path.to_string_lossy(),
                a.architecture,
                a.rank,
                a.alpha,
                a.size_bytes as i64,
                a.base_sha256,
                a.dp_epsilon,
                a.dp_delta,
            ],
        )?;
        let id = tx.last_insert_rowid();
        audit(
            &tx,
            actor,
            "adapter",
            "add",
            &a.name,
            None,
            Some(&version.to_string()),
            Some(&format!("sha256 {}", a.sha256)),
        )?;
        let t = stack::activate(&tx, &ADAPTERS, &a.name, id, actor, "activate")?;
        let record = tx.query_row("SELECT * FROM adapters WHERE id = ?1", [id], from_row)?;
        tx.commit()?;
        Ok((record, t))
    }

    /// Every adapter version, by name and version.
    pub fn adapters(&self) -> Result<Vec<AdapterRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM adapters ORDER BY name, version")?;
        let rows = stmt.query_map([], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest version holding these bytes (`sha256`), whatever its
    /// name or state.
    pub fn adapter_by_sha256(&self, sha256: &str) -> Result<Option<AdapterRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM adapters WHERE sha256 = ?1 ORDER BY id DESC LIMIT 1",
                [sha256],
                from_row,
            )
            .optional()?)
    }

    /// Records an evaluation of adapter version `a` (audited as `eval`).
    pub fn add_adapter_eval(
        &mut self,
        a: &AdapterRecord,
        e: &NewAdapterEval,
        actor: &str,
    ) -> Result<AdapterEval> {
        let tx = self.write()?;
        tx.execute(
            &format!(
                "INSERT INTO adapter_evals (adapter_id, model, model_sha256, data, sequences, target_tokens, holes, base_nll, adapter_nll, delta_nll, delta_nll_lo, delta_nll_hi, report, measured_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, {NOW})"
            ),
            params![
                a.id,
                e.model,
                e.model_sha256,
                e.data,
                e.sequences as i64,
                e.target_tokens as i64,
                e.holes as i64,
                e.base_nll,
                e.adapter_nll,
                e.delta_nll,
                e.delta_nll_lo,
                e.delta_nll_hi,
                e.report.to_string(),
            ],
        )?;
        let id = tx.last_insert_rowid();
        audit(
            &tx,
            actor,
            "adapter",
            "eval",
            &a.name,
            None,
            Some(&a.version.to_string()),
            Some(&format!(
                "held-out NLL {:.4} -> {:.4} ({:+.4} [{:+.4}, {:+.4}]) on {}",
                e.base_nll, e.adapter_nll, e.delta_nll, e.delta_nll_lo, e.delta_nll_hi, e.model
            )),
        )?;
        let record = tx.query_row(
            "SELECT * FROM adapter_evals WHERE id = ?1",
            [id],
            eval_from_row,
        )?;
        tx.commit()?;
        Ok(record)
    }

    /// Adapter version `a`'s evaluations, newest first.
    pub fn adapter_evals(&self, a: &AdapterRecord) -> Result<Vec<AdapterEval>> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM adapter_evals WHERE adapter_id = ?1 ORDER BY id DESC")?;
        let rows = stmt.query_map([a.id], eval_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// `name` (its active version) or `name@version`.
    pub fn adapter(&self, spec: &str) -> Result<Option<AdapterRecord>> {
        Ok(match spec.split_once('@') {
            Some((name, v)) => {
                let Ok(v) = v.parse::<u32>() else {
                    return Err(RegistryError::Refused(format!(
                        "adapter version {v:?} must be a number"
                    )));
                };
                self.conn
                    .query_row(
                        "SELECT * FROM adapters WHERE name = ?1 AND version = ?2",
                        params![name, v],
                        from_row,
                    )
                    .optional()?
            }
            None => self
                .conn
                .query_row(
                    "SELECT * FROM adapters WHERE name = ?1 AND state = 'active'",
                    [spec],
                    from_row,
                )
                .optional()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;

    fn new(name: &str, sha: &str) -> NewAdapter {
        NewAdapter {
            name: name.into(),
            sha256: sha.into(),
            blob_path: format!("/blobs/{sha}").into(),
            architecture: "llama".into(),
            rank: 8,
            alpha: 16.0,
            size_bytes: 10,
            base_sha256: None,
            dp_epsilon: None,
            dp_delta: None,
        }
    }

    #[test]
    fn versions_activate_roll_back_and_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        let (a1, _) = r.add_adapter(&new("mine", "aa"), "test").unwrap();
        let (a2, t) = r.add_adapter(&new("mine", "bb"), "test").unwrap();
        assert_eq!((a1.version, a2.version), (1, 2));
        assert_eq!(t.before.as_deref(), Some("1"));
        assert_eq!(r.adapter("mine").unwrap().unwrap().version, 2);
        let e = r.add_adapter(&new("mine", "aa"), "test").unwrap_err();
        assert!(e.to_string().contains("already mine@1"), "{e}");
        r.rollback(Kind::Adapter, "mine", "test").unwrap();
        assert_eq!(r.adapter("mine").unwrap().unwrap().version, 1);
        r.disable(Kind::Adapter, "mine", "test").unwrap();
        assert!(r.adapter("mine").unwrap().is_none());
        assert_eq!(r.adapter("mine@2").unwrap().unwrap().state, "inactive");
        r.enable(Kind::Adapter, "mine@2", "test").unwrap();
        assert_eq!(r.adapter("mine").unwrap().unwrap().version, 2);
        let log = r.audit_log(20).unwrap();
        assert!(
            log.iter().filter(|e| e.kind == "adapter").count() >= 5,
            "{log:?}"
        );
        assert!(r.adapter("nothing").unwrap().is_none());
        assert!(r.adapter("mine@x").is_err());
    }

    #[test]
    fn evaluations_stay_with_their_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        let (a1, _) = r.add_adapter(&new("mine", "aa"), "test").unwrap();
        let (a2, _) = r.add_adapter(&new("mine", "bb"), "test").unwrap();
        assert_eq!(r.adapter_by_sha256("aa").unwrap().unwrap().version, 1);
        assert!(r.adapter_by_sha256("cc").unwrap().is_none());
        let eval = |delta: f64| NewAdapterEval {
            model: "m@1".into(),
            model_sha256: "ff".into(),
            data: "/data".into(),
            sequences: 10,
            target_tokens: 2000,
            holes: 5,
            base_nll: 2.5,
            adapter_nll: 2.5 + delta,
            delta_nll: delta,
            delta_nll_lo: delta - 0.01,
            delta_nll_hi: delta + 0.01,
            report: serde_json::json!({"sequences": 10}),
        };
        r.add_adapter_eval(&a2, &eval(-0.3), "test").unwrap();
        let e = r.add_adapter_eval(&a2, &eval(-0.4), "test").unwrap();
        assert_eq!(e.report["sequences"], 10);
        let evals = r.adapter_evals(&a2).unwrap();
        assert_eq!(evals.len(), 2);
        assert_eq!(evals[0].delta_nll, -0.4, "newest first");
        assert!(r.adapter_evals(&a1).unwrap().is_empty());
        let log = r.audit_log(5).unwrap();
        assert!(log.iter().any(|e| e.action == "eval"), "{log:?}");
    }
}
