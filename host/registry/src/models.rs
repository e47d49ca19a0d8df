//! Model versions in the registry: each `kiln models add` of a name is a
//! new version (1, 2, …) pointing at a blob in the content-addressed store;
//! one version per name is active; rollback walks back through activations.

use super::stack::{self, MODELS};
use super::{NOW, Registry, RegistryError, Result, Transition, audit};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize)]
pub struct ModelRecord {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub version: u32,
    pub sha256: String,
    pub blob_path: PathBuf,
    pub architecture: String,
    pub quant_type: String,
    pub size_bytes: u64,
    /// `name@version` of the model this one was quantized from.
    pub parent: Option<String>,
    pub state: String,
    pub added_at: String,
    /// Where `kiln models import` found it (`hf:…`, `ollama:…`,
    /// `lmstudio:…`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The prompt template its source kept (Ollama's template layer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// The parameters its source kept (Ollama's params layer, JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// The blob is stored encrypted (age); `sha256` is the plaintext's.
    pub encrypted: bool,
}

impl ModelRecord {
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

pub struct NewModel {
    pub name: String,
    pub sha256: String,
    pub blob_path: PathBuf,
    pub architecture: String,
    pub quant_type: String,
    pub size_bytes: u64,
    /// The sha256 of the file this one was quantized from, if known.
    pub parent_sha256: Option<String>,
    pub origin: Option<String>,
    pub chat_template: Option<String>,
    pub params: Option<String>,
    /// The blob is stored encrypted (age).
    pub encrypted: bool,
}

const SELECT: &str = "SELECT m.*, p.name || '@' || p.version AS parent_label FROM models m LEFT JOIN models p ON p.id = m.parent_id";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ModelRecord> {
    Ok(ModelRecord {
        id: r.get("id")?,
        name: r.get("name")?,
        version: r.get("version")?,
        sha256: r.get("sha256")?,
        blob_path: PathBuf::from(r.get::<_, String>("blob_path")?),
        architecture: r.get("architecture")?,
        quant_type: r.get("quant_type")?,
        size_bytes: r.get::<_, i64>("size_bytes")? as u64,
        parent: r.get("parent_label")?,
        state: r.get("state")?,
        added_at: r.get("added_at")?,
        origin: r.get("origin")?,
        chat_template: r.get("chat_template")?,
        params: r.get("params")?,
        encrypted: r.get("encrypted")?,
    })
}

impl Registry {
    /// Records a new version of `m.name` and makes it active.
    pub fn add_model(&mut self, m: &NewModel, actor: &str) -> Result<(ModelRecord, Transition)> {
        let tx = self.write()?;
        let version = stack::next_version(&tx, &MODELS, &m.name, &m.sha256)?;
        let parent: Option<i64> = match &m.parent_sha256 {
            Some(sha) => tx
                .query_row(
                    "SELECT id FROM models WHERE sha256 = ?1 ORDER BY id DESC LIMIT 1",
                    [sha],
                    |r| r.get(0),
                )
                .optional()?,
            None => None,
        };
        tx.execute(
            &format!(
                "INSERT INTO models (name, version, sha256, blob_path, architecture, quant_type, size_bytes, parent_id, origin, chat_template, params, encrypted, state, added_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'inactive', {NOW}, {NOW})"
            ),
            params![
                m.name,
                version,
                m.sha256,
                m.blob_path.to_string_lossy(),
                m.architecture,
                m.quant_type,
                m.size_bytes as i64,
                parent,
                m.origin,
                m.chat_template,
                m.params,
                m.encrypted
            ],
        )?;
        let id = tx.last_insert_rowid();
        audit(
            &tx,
            actor,
            "model",
            "add",
            &m.name,
            None,
            Some(&version.to_string()),
            Some(&format!("sha256 {}", m.sha256)),
        )?;
        let t = stack::activate(&tx, &MODELS, &m.name, id, actor, "activate")?;
        let record = tx.query_row(&format!("{SELECT} WHERE m.id = ?1"), [id], from_row)?;
        tx.commit()?;
        Ok((record, t))
    }

    /// The versions whose blob has this sha256, oldest first.
    pub fn models_with_sha(&self, sha256: &str) -> Result<Vec<ModelRecord>> {
        let mut st = self
            .conn
            .prepare(&format!("{SELECT} WHERE m.sha256 = ?1 ORDER BY m.id"))?;
        let rows = st.query_map([sha256], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Points every version whose blob has this sha256 at `blob_path`,
    /// stored encrypted or not (`kiln store encrypt` and `decrypt`);
    /// audited. The number of versions changed.
    pub fn move_blob(
        &mut self,
        sha256: &str,
        blob_path: &std::path::Path,
        encrypted: bool,
        actor: &str,
    ) -> Result<usize> {
        let tx = self.write()?;
        let n = tx.execute(
            &format!(
                "UPDATE models SET blob_path = ?2, encrypted = ?3, updated_at = {NOW} WHERE sha256 = ?1"
            ),
            params![sha256, blob_path.to_string_lossy(), encrypted],
        )?;
        if n > 0 {
            let (action, before, after) = match encrypted {
                true => ("encrypt", "plain", "age"),
                false => ("decrypt", "age", "plain"),
            };
            audit(
                &tx,
                actor,
                "model",
                action,
                &format!("sha256-{sha256}"),
                Some(before),
                Some(after),
                Some(&format!("{n} version(s)")),
            )?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Records a change to the store's files that no version row shows
    /// (`kiln store scrub --repair` rewriting a blob, `kiln store gc`
    /// removing some) in the audit log, as kind `store`.
    pub fn audit_store(
        &mut self,
        actor: &str,
        action: &str,
        subject: &str,
        detail: &str,
    ) -> Result<()> {
        let tx = self.write()?;
        audit(
            &tx,
            actor,
            "store",
            action,
            subject,
            None,
            None,
            Some(detail),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Whether any model version's blob has this sha256.
    pub fn blob_in_use(&self, sha256: &str) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM models WHERE sha256 = ?1 LIMIT 1",
                [sha256],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn models(&self) -> Result<Vec<ModelRecord>> {
        let mut stmt = self
            .conn
            .prepare(&format!("{SELECT} ORDER BY m.name, m.version"))?;
        let rows = stmt.query_map([], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// `name` (its active version) or `name@version`.
    pub fn model(&self, spec: &str) -> Result<Option<ModelRecord>> {
        let found = match spec.split_once('@') {
            Some((name, v)) => {
                let Ok(v) = v.parse::<u32>() else {
                    return Err(RegistryError::Refused(format!(
                        "model version {v:?} must be a number"
                    )));
                };
                self.conn
                    .query_row(
                        &format!("{SELECT} WHERE m.name = ?1 AND m.version = ?2"),
                        params![name, v],
                        from_row,
                    )
                    .optional()?
            }
            None => self
                .conn
                .query_row(
                    &format!("{SELECT} WHERE m.name = ?1 AND m.state = 'active'"),
                    [spec],
                    from_row,
                )
                .optional()?,
        };
        Ok(found)
    }

    /// The blob of a registered model (see [`Registry::model`]).
    pub fn model_path(&self, spec: &str) -> Result<Option<PathBuf>> {
        Ok(self.model(spec)?.map(|m| m.blob_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str, sha: &str, parent: Option<&str>) -> NewModel {
        NewModel {
            name: name.into(),
            sha256: sha.into(),
            blob_path: PathBuf::from(format!("/blobs/sha256-{sha}")),
            architecture: "llama".into(),
            quant_type: "f16".into(),
            size_bytes: 10,
            parent_sha256: parent.map(str::to_string),
            origin: None,
            chat_template: None,
            params: None,
            encrypted: false,
        }
    }

    #[test]
    fn moving_a_blob_repoints_every_version_and_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        r.add_model(&new("a", "aa", None), "test").unwrap();
        r.add_model(&new("b", "aa", None), "test").unwrap();
        r.add_model(&new("c", "cc", None), "test").unwrap();
        let to = PathBuf::from("/blobs/sha256-aa.age");
        assert_eq!(r.move_blob("aa", &to, true, "test").unwrap(), 2);
        for m in r.models().unwrap() {
            assert_eq!(m.encrypted, m.sha256 == "aa", "{}", m.label());
            assert_eq!(m.blob_path == to, m.sha256 == "aa");
        }
        let last = &r.audit_log(1).unwrap()[0];
        assert_eq!(
            (last.action.as_str(), last.kind.as_str()),
            ("encrypt", "model")
        );
    }

    #[test]
    fn versions_parents_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        let (a, t) = r.add_model(&new("coder", "aa", None), "t").unwrap();
        assert_eq!((a.version, t.before, a.parent.clone()), (1, None, None));
        let (b, t) = r.add_model(&new("coder", "bb", Some("aa")), "t").unwrap();
        assert_eq!((b.version, t.before.as_deref()), (2, Some("1")));
        assert_eq!(b.parent.as_deref(), Some("coder@1"));
        let err = r
            .add_model(&new("coder", "bb", None), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("already coder@2"), "{err}");
        assert_eq!(r.model("coder").unwrap().unwrap().version, 2);
        let t = r.rollback(crate::Kind::Model, "coder", "t").unwrap();
        assert_eq!(
            (t.before.as_deref(), t.after.as_deref()),
            (Some("2"), Some("1"))
        );
        assert_eq!(
            r.model_path("coder").unwrap(),
            Some(PathBuf::from("/blobs/sha256-aa"))
        );
        assert!(r.rollback(crate::Kind::Model, "coder", "t").is_err());
        r.enable(crate::Kind::Model, "coder@2", "t").unwrap();
        assert_eq!(r.model("coder@1").unwrap().unwrap().state, "inactive");
        let kinds: Vec<(String, String)> = r
            .audit_log(100)
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.action))
            .collect();
        assert_eq!(kinds[0], ("model".to_string(), "add".to_string()));
        assert!(kinds.iter().any(|(k, a)| k == "model" && a == "rollback"));
    }
}
