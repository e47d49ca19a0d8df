//! `kiln tune`'s records: searches, their trials (resumable after a
//! kill: a trial left `running` is measured again), and the versions of
//! `config.toml` kiln wrote, so that an applied setting can be rolled back.

use super::{NOW, Registry, RegistryError, Result, audit};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct TuneRun {
    pub id: i64,
    pub model: String,
    pub sampler: String,
    pub space: serde_json::Value,
    pub objective: serde_json::Value,
    pub trials_wanted: u32,
    pub state: String,
    pub verdict: Option<serde_json::Value>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TuneTrial {
    pub id: i64,
    pub run_id: i64,
    pub setting: serde_json::Value,
    pub repeats: u32,
    pub status: String,
    pub metrics: Option<serde_json::Value>,
    pub started_at: String,
    pub finished_at: Option<String>,
}

/// A change kiln made to `config.toml`.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigVersion {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub reason: String,
    pub before: String,
    pub after: String,
    pub rolled_back: bool,
}

fn json(text: Option<String>) -> Option<serde_json::Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TuneRun> {
    Ok(TuneRun {
        id: r.get("id")?,
        model: r.get("model")?,
        sampler: r.get("sampler")?,
        space: json(r.get("space")?).unwrap_or_default(),
        objective: json(r.get("objective")?).unwrap_or_default(),
        trials_wanted: r.get("trials_wanted")?,
        state: r.get("state")?,
        verdict: json(r.get("verdict")?),
        created_at: r.get("created_at")?,
        updated_at: r.get("updated_at")?,
    })
}

fn trial_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TuneTrial> {
    Ok(TuneTrial {
        id: r.get("id")?,
        run_id: r.get("run_id")?,
        setting: json(r.get("setting")?).unwrap_or_default(),
        repeats: r.get("repeats")?,
        status: r.get("status")?,
        metrics: json(r.get("metrics")?),
        started_at: r.get("started_at")?,
        finished_at: r.get("finished_at")?,
    })
}

impl Registry {
    /// Starts recording a search.
    pub fn tune_start(
        &mut self,
        model: &str,
        sampler: &str,
        space: &serde_json::Value,
        objective: &serde_json::Value,
        trials_wanted: u32,
    ) -> Result<TuneRun> {
        let tx = self.write()?;
        tx.execute(
            &format!(
                "INSERT INTO tune_runs (model, sampler, space, objective, trials_wanted, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'running', {NOW}, {NOW})"
            ),
            params![model, sampler, space.to_string(), objective.to_string(), trials_wanted],
        )?;
        let id = tx.last_insert_rowid();
        let run = tx.query_row(
            "SELECT * FROM tune_runs WHERE id = ?1",
            params![id],
            run_from_row,
        )?;
        tx.commit()?;
        Ok(run)
    }

    pub fn tune_run(&self, id: i64) -> Result<TuneRun> {
        self.conn
            .query_row(
                "SELECT * FROM tune_runs WHERE id = ?1",
                params![id],
                run_from_row,
            )
            .optional()?
            .ok_or_else(|| {
                RegistryError::Refused(format!("no tuning run {id}; `kiln tune list` shows them"))
            })
    }

    /// Every search, newest first.
    pub fn tune_runs(&self) -> Result<Vec<TuneRun>> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM tune_runs ORDER BY id DESC")?;
        let rows = stmt.query_map([], run_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A run's trials in the order they started.
    pub fn tune_trials(&self, run_id: i64) -> Result<Vec<TuneTrial>> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM tune_trials WHERE run_id = ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![run_id], trial_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn tune_trial(&self, id: i64) -> Result<TuneTrial> {
        self.conn
            .query_row(
                "SELECT * FROM tune_trials WHERE id = ?1",
                params![id],
                trial_from_row,
            )
            .optional()?
            .ok_or_else(|| {
                RegistryError::Refused(format!(
                    "no trial {id}; `kiln tune show RUN` lists a run's trials"
                ))
            })
    }

    /// Records that a trial starts (it stays `running` if kiln is killed
    /// before [`Self::tune_trial_done`]).
    pub fn tune_trial_start(
        &mut self,
        run_id: i64,
        setting: &serde_json::Value,
        repeats: u32,
    ) -> Result<i64> {
        let tx = self.write()?;
        tx.execute(
            &format!(
                "INSERT INTO tune_trials (run_id, setting, repeats, status, started_at) VALUES (?1, ?2, ?3, 'running', {NOW})"
            ),
            params![run_id, setting.to_string(), repeats],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            &format!("UPDATE tune_runs SET updated_at = {NOW} WHERE id = ?1"),
            params![run_id],
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// Records a trial's measurements (`ok`) or its error.
    pub fn tune_trial_done(
        &mut self,
        id: i64,
        ok: bool,
        metrics: &serde_json::Value,
    ) -> Result<()> {
        let tx = self.write()?;
        tx.execute(
            &format!(
                "UPDATE tune_trials SET status = ?2, metrics = ?3, finished_at = {NOW} WHERE id = ?1"
            ),
            params![id, if ok { "done" } else { "failed" }, metrics.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Drops a run's trials that were cut short, so that a resumed run
    /// measures them again. Returns how many.
    pub fn tune_forget_unfinished(&mut self, run_id: i64) -> Result<usize> {
        let tx = self.write()?;
        let n = tx.execute(
            "DELETE FROM tune_trials WHERE run_id = ?1 AND status = 'running'",
            params![run_id],
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Ends a run with its verdict.
    pub fn tune_finish(&mut self, run_id: i64, verdict: &serde_json::Value) -> Result<()> {
        let tx = self.write()?;
        tx.execute(
            &format!(
                "UPDATE tune_runs SET state = 'done', verdict = ?2, updated_at = {NOW} WHERE id = ?1"
            ),
            params![run_id, verdict.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records a change of `config.toml` (its text before and after),
    /// audited; the caller writes the file after this succeeds.
    pub fn record_config_version(
        &mut self,
        actor: &str,
        reason: &str,
        before: &str,
        after: &str,
    ) -> Result<i64> {
        let tx = self.write()?;
        tx.execute(
            &format!(
                "INSERT INTO config_versions (at, actor, reason, before, after) VALUES ({NOW}, ?1, ?2, ?3, ?4)"
            ),
            params![actor, reason, before, after],
        )?;
        let id = tx.last_insert_rowid();
        audit(
            &tx,
            actor,
            "config",
            "change",
            "config.toml",
            None,
            Some(&format!("version {id}")),
            Some(reason),
        )?;
        tx.commit()?;
        Ok(id)
    }

    /// The newest change of `config.toml` not rolled back yet.
    pub fn last_config_version(&self) -> Result<Option<ConfigVersion>> {
        Ok(self
            .conn
            .query_row(
                "SELECT * FROM config_versions WHERE rolled_back = 0 ORDER BY id DESC LIMIT 1",
                [],
                |r| {
                    Ok(ConfigVersion {
                        id: r.get("id")?,
                        at: r.get("at")?,
                        actor: r.get("actor")?,
                        reason: r.get("reason")?,
                        before: r.get("before")?,
                        after: r.get("after")?,
                        rolled_back: r.get::<_, i64>("rolled_back")? != 0,
                    })
                },
            )
            .optional()?)
    }

    /// Marks change `id` rolled back, audited; the caller restores its
    /// `before` text.
    pub fn roll_back_config_version(&mut self, id: i64, actor: &str) -> Result<()> {
        let tx = self.write()?;
        let n = tx.execute(
            "UPDATE config_versions SET rolled_back = 1 WHERE id = ?1 AND rolled_back = 0",
            params![id],
        )?;
        if n == 0 {
            return Err(RegistryError::Refused(format!(
                "config.toml change {id} is not the newest one standing"
            )));
        }
        audit(
            &tx,
            actor,
            "config",
            "rollback",
            "config.toml",
            Some(&format!("version {id}")),
            None,
            None,
        )?;
        tx.commit()?;
        Ok(())
    }
}
