//! kiln's registry: where kiln keeps its state, and the catalog of what is
//! installed. [`config`] finds `KILN_HOME` and reads `config.toml`;
//! [`Registry`] is one SQLite file there.
//!
//! The registry: one SQLite file (`$KILN_HOME/kiln.db`, WAL mode) holding
//! installed plugin versions, which version of each is active, the history
//! that rollback walks back, cached device scores, and an audit log of every
//! change.
//!
//! Schema changes are forward-only migrations (`migrations/NNNN_name.sql`),
//! embedded in the binary and applied in one transaction at open;
//! `PRAGMA user_version` records how many have run. A database from a newer
//! kiln (a higher `user_version`) is refused before anything is written.
//! Every change is one transaction that also writes its audit row, so a
//! process killed at any point leaves either the old state or the new one.

mod adapters;
pub mod config;
pub mod experiments;
mod models;
mod policies;
mod stack;
pub mod tune;

pub use adapters::{AdapterEval, AdapterRecord, NewAdapter, NewAdapterEval};
pub use models::{ModelRecord, NewModel};
pub use policies::{Decision, NewPolicy, PolicyRecord};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use serde::Serialize;
pub use stack::Kind;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The embedded migrations, in order. `tests` checks that every file in
/// `migrations/` is listed here.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_registry.sql",
        include_str!("../../../migrations/0001_registry.sql"),
    ),
    (
        "0002_models.sql",
        include_str!("../../../migrations/0002_models.sql"),
    ),
    (
        "0003_policies.sql",
        include_str!("../../../migrations/0003_policies.sql"),
    ),
    (
        "0004_model_origin.sql",
        include_str!("../../../migrations/0004_model_origin.sql"),
    ),
    (
        "0005_encrypted_blobs.sql",
        include_str!("../../../migrations/0005_encrypted_blobs.sql"),
    ),
    (
        "0006_experiments.sql",
        include_str!("../../../migrations/0006_experiments.sql"),
    ),
    (
        "0007_adapters.sql",
        include_str!("../../../migrations/0007_adapters.sql"),
    ),
    (
        "0008_adapter_evals.sql",
        include_str!("../../../migrations/0008_adapter_evals.sql"),
    ),
    (
        "0009_plugin_health.sql",
        include_str!("../../../migrations/0009_plugin_health.sql"),
    ),
    (
        "0010_tuning.sql",
        include_str!("../../../migrations/0010_tuning.sql"),
    ),
];

/// The schema version this kiln writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "{path} was written by a newer kiln (schema version {found}; this kiln knows up to {known}). Upgrade kiln, or set KILN_HOME to another directory; the file was left untouched"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error(
        "{path} is busy: another kiln process kept it locked for more than {seconds} s. Nothing was changed; try again when that process (a long `kiln models add`, another `kiln serve`) is done"
    )]
    Busy { path: PathBuf, seconds: u64 },
    #[error(
        "{path} is not a usable kiln registry ({source}); move it away (kiln then creates a new one) or restore a backup"
    )]
    Unusable {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// `config.toml` cannot be used; the message names the line.
    #[error("{0}")]
    Config(String),
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("registry error: {0}")]
    Sqlite(rusqlite::Error),
    /// The request does not fit the registry's state; the message says why.
    #[error("{0}")]
    Refused(String),
}

type Result<T> = std::result::Result<T, RegistryError>;

/// How long a process waits for another's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// SQLite's "another connection holds the lock", which is no fault of the
/// file.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> RegistryError {
        RegistryError::Sqlite(e)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginState {
    Active,
    Inactive,
    Disabled,
}

impl PluginState {
    fn parse(s: &str) -> PluginState {
        match s {
            "active" => PluginState::Active,
            "disabled" => PluginState::Disabled,
            _ => PluginState::Inactive,
        }
    }
}

/// One installed plugin version.
#[derive(Clone, Debug, Serialize)]
pub struct PluginRecord {
    #[serde(skip)]
    pub id: i64,
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub manifest_path: PathBuf,
    pub library_path: PathBuf,
    pub abi: String,
    pub state: PluginState,
    pub conformance: serde_json::Value,
    pub installed_at: String,
    pub updated_at: String,
    /// When repeated crashes of its worker quarantined this version.
    pub quarantined_at: Option<String>,
}

/// One recorded death of a plugin's worker process.
#[derive(Clone, Debug, Serialize)]
pub struct PluginCrash {
    pub plugin: String,
    pub version: String,
    pub at: String,
    pub during: String,
    pub cause: String,
}

impl PluginRecord {
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// What `install` needs to know about a plugin that passed conformance.
pub struct NewPlugin {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub sha256: String,
    pub manifest_path: PathBuf,
    pub library_path: PathBuf,
    pub abi: (u16, u16),
    pub conformance: serde_json::Value,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditEntry {
    pub at: String,
    pub actor: String,
    /// `plugin`, `model`, `policy`, `adapter`, `experiment`, `store` or
    /// `config`.
    pub kind: String,
    pub action: String,
    pub subject: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub detail: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StoredScore {
    pub device_key: String,
    pub score: f64,
    pub details: serde_json::Value,
    pub measured_at: String,
}

/// A change made: which version was active before and which is now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Transition {
    pub name: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

pub struct Registry {
    conn: Connection,
    path: PathBuf,
}

fn plugin_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<PluginRecord> {
    let conformance: String = row.get("conformance")?;
    let (major, minor): (u16, u16) = (row.get("abi_major")?, row.get("abi_minor")?);
    Ok(PluginRecord {
        id: row.get("id")?,
        name: row.get("name")?,
        version: row.get("version")?,
        kind: row.get("kind")?,
        sha256: row.get("sha256")?,
        manifest_path: PathBuf::from(row.get::<_, String>("manifest_path")?),
        library_path: PathBuf::from(row.get::<_, String>("library_path")?),
        abi: format!("{major}.{minor}"),
        state: PluginState::parse(&row.get::<_, String>("state")?),
        conformance: serde_json::from_str(&conformance).unwrap_or(serde_json::Value::Null),
        installed_at: row.get("installed_at")?,
        updated_at: row.get("updated_at")?,
        quarantined_at: row.get("quarantined_at")?,
    })
}

#[allow(clippy::too_many_arguments)]
fn audit(
    tx: &Transaction<'_>,
    actor: &str,
    kind: &str,
    action: &str,
    subject: &str,
    before: Option<&str>,
    after: Option<&str>,
    detail: Option<&str>,
) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO audit_log (at, actor, kind, action, subject, before, after, detail) VALUES ({NOW}, ?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ),
        params![actor, kind, action, subject, before, after, detail],
    )?;
    Ok(())
}

impl Registry {
    /// Opens (creating if needed) the registry at `path` and brings its
    /// schema up to date. A newer or unreadable database is refused and
    /// left as it is. Other kiln processes may hold it at the same time
    /// (several `kiln serve`, CLI commands): each waits for the others'
    /// writes, and a lock held too long is reported as busy, never as a
    /// broken file.
    pub fn open(path: &Path) -> Result<Registry> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| RegistryError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let classify = |source: rusqlite::Error| {
            if is_busy(&source) {
                RegistryError::Busy {
                    path: path.to_path_buf(),
                    seconds: BUSY_TIMEOUT.as_secs(),
                }
            } else {
                RegistryError::Unusable {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        // Look before writing anything: a read-only connection cannot
        // change the file, not even its journal mode.
        if path.exists() {
            let ro = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(classify)?;
            // Another kiln process (or thread) may be migrating it now.
            ro.busy_timeout(BUSY_TIMEOUT)?;
            let found: u32 = ro
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(classify)?;
            if found > SCHEMA_VERSION {
                return Err(RegistryError::NewerSchema {
                    path: path.to_path_buf(),
                    found,
                    known: SCHEMA_VERSION,
                });
            }
        }
        let mut conn = Connection::open(path).map_err(classify)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Switching to WAL needs the file to itself; once in WAL mode (the
        // first opener did it) it stays, so others only read the mode.
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(classify)?;
        if !mode.eq_ignore_ascii_case("wal") {
            set_wal(&conn).map_err(classify)?;
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn).map_err(|e| match e {
            RegistryError::Sqlite(source) => classify(source),
            other => other,
        })?;
        Ok(Registry {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// A write transaction holding the write lock from its start. A
    /// deferred one that reads and then writes fails at once when another
    /// process commits in between (its snapshot is stale, so SQLite cannot
    /// wait); taking the lock first makes it wait its turn instead.
    fn write(&mut self) -> Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| {
                if is_busy(&e) {
                    RegistryError::Busy {
                        path: self.path.clone(),
                        seconds: BUSY_TIMEOUT.as_secs(),
                    }
                } else {
                    RegistryError::Sqlite(e)
                }
            })
    }

    /// The registry of the home `config` describes, refusing a broken
    /// `config.toml` first.
    pub fn open_home(config: &config::Config) -> Result<Registry> {
        config.require_valid().map_err(RegistryError::Config)?;
        Registry::open(&config.registry_path())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// `PRAGMA integrity_check`: "ok", or SQLite's list of problems.
    pub fn integrity_check(&self) -> Result<String> {
        let mut stmt = self.conn.prepare("PRAGMA integrity_check")?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows.join("; "))
    }

    pub fn plugins(&self) -> Result<Vec<PluginRecord>> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM plugins ORDER BY name, id")?;
        let rows = stmt.query_map([], plugin_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn active_plugins(&self) -> Result<Vec<PluginRecord>> {
        Ok(self
            .plugins()?
            .into_iter()
            .filter(|p| p.state == PluginState::Active)
            .collect())
    }

    /// Records a new plugin version and makes it the active one.
    pub fn install(&mut self, new: &NewPlugin, actor: &str) -> Result<Transition> {
        let tx = self.write()?;
        stack::refuse_reinstall(
            &tx,
            &stack::PLUGINS,
            &new.name,
            &new.version,
            &new.sha256,
            "library",
        )?;
        tx.execute(
            &format!(
                "INSERT INTO plugins (name, version, kind, sha256, manifest_path, library_path, abi_major, abi_minor, state, conformance, installed_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'inactive', ?9, {NOW}, {NOW})"
            ),
            params![
                new.name,
                new.version,
                new.kind,
                new.sha256,
                new.manifest_path.to_string_lossy(),
                new.library_path.to_string_lossy(),
                new.abi.0,
                new.abi.1,
                new.conformance.to_string(),
            ],
        )?;
        let label = format!("{}@{}", new.name, new.version);
        audit(
            &tx,
            actor,
            "plugin",
            "install",
            &new.name,
            None,
            Some(&new.version),
            Some(&format!("{label} sha256 {}", new.sha256)),
        )?;
        let record = stack::find(&tx, &stack::PLUGINS, &label)?;
        let t = stack::activate(
            &tx,
            &stack::PLUGINS,
            &record.name,
            record.id,
            actor,
            "activate",
        )?;
        tx.commit()?;
        Ok(t)
    }

    /// Records a death of `name`'s worker (the active version with
    /// library `sha256`) and, with `quarantine`, quarantines that version,
    /// audited. A version no longer registered is not recorded.
    pub fn record_plugin_crash(
        &mut self,
        name: &str,
        sha256: &str,
        during: &str,
        cause: &str,
        quarantine: bool,
    ) -> Result<()> {
        let tx = self.write()?;
        let row: Option<(i64, String)> = tx
            .query_row(
                "SELECT id, version FROM plugins WHERE name = ?1 AND sha256 = ?2 ORDER BY state = 'active' DESC, id DESC LIMIT 1",
                params![name, sha256],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((id, version)) = row else {
            return Ok(());
        };
        tx.execute(
            &format!(
                "INSERT INTO plugin_crashes (plugin_id, at, during, cause) VALUES (?1, {NOW}, ?2, ?3)"
            ),
            params![id, during, cause],
        )?;
        if quarantine {
            tx.execute(
                &format!("UPDATE plugins SET quarantined_at = {NOW} WHERE id = ?1"),
                params![id],
            )?;
            audit(
                &tx,
                "kiln",
                "plugin",
                "quarantine",
                name,
                Some(&version),
                None,
                Some(&format!(
                    "{name}@{version}: its worker process crashed repeatedly; last during {during}: {cause}"
                )),
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Lifts the quarantine of `name`'s active version: it is loaded again
    /// (its crash history stays).
    pub fn release_plugin(&mut self, name: &str, actor: &str) -> Result<PluginRecord> {
        let tx = self.write()?;
        let record = tx
            .query_row(
                "SELECT * FROM plugins WHERE name = ?1 AND state = 'active'",
                params![name],
                plugin_from_row,
            )
            .optional()?
            .ok_or_else(|| {
                RegistryError::Refused(format!(
                    "no active plugin named {name}; `kiln plugins list` shows what is installed"
                ))
            })?;
        if record.quarantined_at.is_none() {
            return Err(RegistryError::Refused(format!(
                "{} is not quarantined; nothing to release",
                record.label()
            )));
        }
        tx.execute(
            "UPDATE plugins SET quarantined_at = NULL WHERE id = ?1",
            params![record.id],
        )?;
        audit(
            &tx,
            actor,
            "plugin",
            "release",
            name,
            None,
            Some(&record.version),
            Some(&format!("{}: quarantine lifted", record.label())),
        )?;
        tx.commit()?;
        Ok(PluginRecord {
            quarantined_at: None,
            ..record
        })
    }

    /// The newest `limit` crashes of plugin workers, newest first (of
    /// `name` only, when given).
    pub fn plugin_crashes(&self, name: Option<&str>, limit: usize) -> Result<Vec<PluginCrash>> {
        let mut stmt = self.conn.prepare(
            "SELECT p.name, p.version, c.at, c.during, c.cause FROM plugin_crashes c
             JOIN plugins p ON p.id = c.plugin_id
             WHERE ?1 IS NULL OR p.name = ?1 ORDER BY c.id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![name, limit as i64], |r| {
            Ok(PluginCrash {
                plugin: r.get(0)?,
                version: r.get(1)?,
                at: r.get(2)?,
                during: r.get(3)?,
                cause: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut stmt = self.conn.prepare(
            "SELECT * FROM (SELECT * FROM audit_log ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(AuditEntry {
                at: r.get("at")?,
                actor: r.get("actor")?,
                kind: r.get("kind")?,
                action: r.get("action")?,
                subject: r.get("subject")?,
                before: r.get("before")?,
                after: r.get("after")?,
                detail: r.get("detail")?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn score(&self, backend_key: &str, device_key: &str) -> Result<Option<StoredScore>> {
        Ok(self
            .scores(backend_key)?
            .into_iter()
            .find(|s| s.device_key == device_key))
    }

    /// Every cached score of one backend build (a plugin's sha256).
    pub fn scores(&self, backend_key: &str) -> Result<Vec<StoredScore>> {
        let mut stmt = self.conn.prepare(
            "SELECT device_key, score, details, measured_at FROM device_scores WHERE backend_key = ?1 ORDER BY device_key",
        )?;
        let rows = stmt.query_map([backend_key], |r| {
            let details: String = r.get(2)?;
            Ok(StoredScore {
                device_key: r.get(0)?,
                score: r.get(1)?,
                details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
                measured_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn store_score(
        &mut self,
        backend_key: &str,
        device_key: &str,
        score: f64,
        details: &serde_json::Value,
    ) -> Result<()> {
        self.conn.execute(
            &format!(
                "INSERT INTO device_scores (backend_key, device_key, score, details, measured_at)
                 VALUES (?1, ?2, ?3, ?4, {NOW})
                 ON CONFLICT (backend_key, device_key) DO UPDATE SET score = excluded.score, details = excluded.details, measured_at = excluded.measured_at"
            ),
            params![backend_key, device_key, score, details.to_string()],
        )?;
        Ok(())
    }
}

/// `PRAGMA journal_mode = WAL`, retried while another process holds the
/// file (the busy handler does not cover a change of journal mode).
fn set_wal(conn: &Connection) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current == SCHEMA_VERSION {
        return Ok(());
    }
    // Take the write lock up front: a deferred transaction that reads and
    // then writes fails at once (not after the busy timeout) when another
    // connection is migrating at the same moment.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        // Another process upgraded the file between our check and now.
        return Err(RegistryError::Refused(format!(
            "the registry's schema version {current} is newer than this kiln's {SCHEMA_VERSION}"
        )));
    }
    for (_, sql) in &MIGRATIONS[current as usize..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Who is making a change, for the audit log.
pub fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user} via kiln-cli (pid {})", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_plugin(name: &str, version: &str) -> NewPlugin {
        NewPlugin {
            name: name.into(),
            version: version.into(),
            kind: "backend".into(),
            sha256: format!("{:0>64}", version.replace('.', "")),
            manifest_path: PathBuf::from("/store/m.toml"),
            library_path: PathBuf::from("/store/lib.so"),
            abi: (1, 1),
            conformance: serde_json::json!({"passed": 3}),
        }
    }

    fn states(r: &Registry) -> Vec<(String, PluginState)> {
        r.plugins()
            .unwrap()
            .into_iter()
            .map(|p| (p.version, p.state))
            .collect()
    }

    #[test]
    fn migrates_from_empty() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        assert_eq!(r.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(r.integrity_check().unwrap(), "ok");
        let mode: String = r
            .conn
            .query_row("PRAGMA journal_mode", [], |x| x.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // Opening again applies nothing and keeps the data.
        drop(r);
        let r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        assert_eq!(r.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn install_enable_disable_rollback_walks_the_stack() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        use PluginState::*;
        r.install(&new_plugin("gpu", "1.0.0"), "t").unwrap();
        r.install(&new_plugin("gpu", "1.1.0"), "t").unwrap();
        let t = r.install(&new_plugin("gpu", "2.0.0"), "t").unwrap();
        assert_eq!(t.before.as_deref(), Some("1.1.0"));
        assert_eq!(
            states(&r),
            vec![
                ("1.0.0".into(), Inactive),
                ("1.1.0".into(), Inactive),
                ("2.0.0".into(), Active)
            ]
        );
        let t = r.rollback(Kind::Plugin, "gpu", "t").unwrap();
        assert_eq!(
            (t.before.as_deref(), t.after.as_deref()),
            (Some("2.0.0"), Some("1.1.0"))
        );
        let t = r.rollback(Kind::Plugin, "gpu", "t").unwrap();
        assert_eq!(t.after.as_deref(), Some("1.0.0"));
        let err = r
            .rollback(Kind::Plugin, "gpu", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no earlier active version"), "{err}");
        // Enabling pushes onto the stack again; rollback returns to 1.0.0.
        r.enable(Kind::Plugin, "gpu@2.0.0", "t").unwrap();
        assert_eq!(
            r.rollback(Kind::Plugin, "gpu", "t")
                .unwrap()
                .after
                .as_deref(),
            Some("1.0.0")
        );
        r.disable(Kind::Plugin, "gpu", "t").unwrap();
        assert!(r.active_plugins().unwrap().is_empty());
        let err = r
            .rollback(Kind::Plugin, "gpu", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no active version"), "{err}");
        let actions: Vec<String> = r
            .audit_log(100)
            .unwrap()
            .into_iter()
            .map(|a| a.action)
            .collect();
        assert_eq!(
            actions,
            [
                "install", "activate", "install", "activate", "install", "activate", "rollback",
                "rollback", "enable", "rollback", "disable"
            ]
        );
    }

    #[test]
    fn reinstalling_a_version_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        r.install(&new_plugin("gpu", "1.0.0"), "t").unwrap();
        let before = r.audit_log(100).unwrap().len();
        let mut other = new_plugin("gpu", "1.0.0");
        other.sha256 = "f".repeat(64);
        let err = r.install(&other, "t").unwrap_err().to_string();
        assert!(err.contains("different library"), "{err}");
        assert_eq!(r.audit_log(100).unwrap().len(), before);
    }

    #[test]
    fn newer_schema_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
                .unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let err = Registry::open(&path).err().unwrap();
        assert!(
            matches!(err, RegistryError::NewerSchema { found: 99, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("newer kiln"));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("kiln.db-wal").exists());
    }

    #[test]
    fn garbage_file_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        std::fs::write(
            &path,
            b"this is not sqlite, just some text that is long enough",
        )
        .unwrap();
        let err = Registry::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("not a usable kiln registry") && err.contains("move it away"),
            "{err}"
        );
    }

    #[test]
    fn every_migration_file_is_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
        assert!(dir.is_dir());
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<&str> = MIGRATIONS.iter().map(|(n, _)| *n).collect();
        assert_eq!(files, embedded);
        for (i, name) in embedded.iter().enumerate() {
            assert!(
                name.starts_with(&format!("{:04}_", i + 1)),
                "{name} out of sequence"
            );
        }
    }

    #[test]
    fn scores_are_cached_per_backend_and_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(&dir.path().join("kiln.db")).unwrap();
        assert!(r.score("sha", "dev").unwrap().is_none());
        r.store_score("sha", "dev", 1.5, &serde_json::json!({"a": 1}))
            .unwrap();
        r.store_score("sha", "dev", 2.5, &serde_json::json!({"a": 2}))
            .unwrap();
        let s = r.score("sha", "dev").unwrap().unwrap();
        assert_eq!(s.score, 2.5);
        assert_eq!(s.details["a"], 2);
    }
}
