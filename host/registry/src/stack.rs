//! What plugins and models share: versions of a name, at most one active,
//! and a rollback stack of activations. Each kind has its table, its
//! activations table and its audit kind; the logic is written once here.

use super::{NOW, RegistryError, Result, Transition, audit};
use rusqlite::{OptionalExtension, Transaction, params};

pub(super) struct Catalog {
    pub table: &'static str,
    pub activations: &'static str,
    /// The activations table's column naming a row of `table`.
    pub fk: &'static str,
    /// The audit log's `kind`.
    pub kind: &'static str,
    /// The command family, for advice in messages.
    pub command: &'static str,
}

pub(super) const PLUGINS: Catalog = Catalog {
    table: "plugins",
    activations: "plugin_activations",
    fk: "plugin_id",
    kind: "plugin",
    command: "kiln plugins enable",
};

pub(super) const POLICIES: Catalog = Catalog {
    table: "policies",
    activations: "policy_activations",
    fk: "policy_id",
    kind: "policy",
    command: "kiln policy enable",
};

pub(super) const MODELS: Catalog = Catalog {
    table: "models",
    activations: "model_activations",
    fk: "model_id",
    kind: "model",
    command: "kiln models activate",
};

fn version_text(v: rusqlite::types::Value) -> String {
    match v {
        rusqlite::types::Value::Integer(i) => i.to_string(),
        rusqlite::types::Value::Text(t) => t,
        other => format!("{other:?}"),
    }
}

/// Refuses to record `name@version` again: the same bytes are already
/// there (enable them instead), or different bytes would hide behind the
/// same version. `what` names the artifact ("library", "module").
pub(super) fn refuse_reinstall(
    tx: &Transaction<'_>,
    c: &Catalog,
    name: &str,
    version: &str,
    sha256: &str,
    what: &str,
) -> Result<()> {
    let existing: Option<String> = tx
        .query_row(
            &format!(
                "SELECT sha256 FROM {} WHERE name = ?1 AND version = ?2",
                c.table
            ),
            params![name, version],
            |r| r.get(0),
        )
        .optional()?;
    match existing {
        None => Ok(()),
        Some(sha) if sha == sha256 => Err(RegistryError::Refused(format!(
            "{name}@{version} is already installed (same sha256); use `{} {name}@{version}` to make it active",
            c.command
        ))),
        Some(sha) => Err(RegistryError::Refused(format!(
            "{name}@{version} is already installed with a different {what} (sha256 {}…); give the new build a new version",
            &sha[..12.min(sha.len())]
        ))),
    }
}

/// The active row of `name`: (id, version).
pub(super) fn active(
    tx: &Transaction<'_>,
    c: &Catalog,
    name: &str,
) -> Result<Option<(i64, String)>> {
    Ok(tx
        .query_row(
            &format!(
                "SELECT id, version FROM {} WHERE name = ?1 AND state = 'active'",
                c.table
            ),
            [name],
            |r| Ok((r.get(0)?, version_text(r.get(1)?))),
        )
        .optional()?)
}

pub(super) fn set_state(tx: &Transaction<'_>, c: &Catalog, id: i64, state: &str) -> Result<()> {
    tx.execute(
        &format!(
            "UPDATE {} SET state = ?1, updated_at = {NOW} WHERE id = ?2",
            c.table
        ),
        params![state, id],
    )?;
    Ok(())
}

fn version_of(tx: &Transaction<'_>, c: &Catalog, id: i64) -> Result<String> {
    Ok(version_text(tx.query_row(
        &format!("SELECT version FROM {} WHERE id = ?1", c.table),
        [id],
        |r| r.get(0),
    )?))
}

/// Makes row `id` the active version of `name`, demoting the current one,
/// and pushes the activation onto the rollback stack.
pub(super) fn activate(
    tx: &Transaction<'_>,
    c: &Catalog,
    name: &str,
    id: i64,
    actor: &str,
    action: &str,
) -> Result<Transition> {
    let target = version_of(tx, c, id)?;
    let current = active(tx, c, name)?;
    if let Some((cur, v)) = &current {
        if *cur == id {
            return Ok(Transition {
                name: name.to_string(),
                before: Some(v.clone()),
                after: Some(v.clone()),
            });
        }
        set_state(tx, c, *cur, "inactive")?;
    }
    set_state(tx, c, id, "active")?;
    tx.execute(
        &format!(
            "INSERT INTO {} (name, {}, activated_at) VALUES (?1, ?2, {NOW})",
            c.activations, c.fk
        ),
        params![name, id],
    )?;
    let before = current.map(|(_, v)| v);
    audit(
        tx,
        actor,
        c.kind,
        action,
        name,
        before.as_deref(),
        Some(&target),
        None,
    )?;
    Ok(Transition {
        name: name.to_string(),
        before,
        after: Some(target),
    })
}

/// Re-activates the version active before the current one, popping the
/// stack so that repeated rollbacks walk further back.
pub(super) fn rollback(
    tx: &Transaction<'_>,
    c: &Catalog,
    name: &str,
    actor: &str,
) -> Result<Transition> {
    let Some((current, current_version)) = active(tx, c, name)? else {
        return Err(RegistryError::Refused(format!(
            "{name} has no active version to roll back from; use `{} {name}@VERSION`",
            c.command
        )));
    };
    let top: i64 = tx
        .query_row(
            &format!(
                "SELECT id FROM {} WHERE name = ?1 AND rolled_back = 0 AND {} = ?2 ORDER BY id DESC LIMIT 1",
                c.activations, c.fk
            ),
            params![name, current],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(i64::MAX);
    let previous: Option<(i64, i64)> = tx
        .query_row(
            &format!(
                "SELECT id, {fk} FROM {t} WHERE name = ?1 AND rolled_back = 0 AND id < ?2 AND {fk} != ?3 ORDER BY id DESC LIMIT 1",
                fk = c.fk,
                t = c.activations
            ),
            params![name, top, current],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((activation, target)) = previous else {
        return Err(RegistryError::Refused(format!(
            "{name} has no earlier active version to roll back to (active: {current_version})"
        )));
    };
    tx.execute(
        &format!(
            "UPDATE {} SET rolled_back = 1 WHERE name = ?1 AND id > ?2 AND rolled_back = 0",
            c.activations
        ),
        params![name, activation],
    )?;
    let target_version = version_of(tx, c, target)?;
    set_state(tx, c, current, "inactive")?;
    set_state(tx, c, target, "active")?;
    audit(
        tx,
        actor,
        c.kind,
        "rollback",
        name,
        Some(&current_version),
        Some(&target_version),
        None,
    )?;
    Ok(Transition {
        name: name.to_string(),
        before: Some(current_version),
        after: Some(target_version),
    })
}
