//! What plugins, models and policies share: versions of a name, at most
//! one active, a rollback stack of activations, and enable, disable and
//! rollback on them. Each kind has its table, its activations table and
//! its audit kind; the logic is written once here, and
//! [`Registry::enable`], [`Registry::disable`] and [`Registry::rollback`]
//! take the [`Kind`].

use super::{NOW, Registry, RegistryError, Result, Transition, audit};
use rusqlite::{OptionalExtension, Transaction, params};

/// The kinds of things the registry versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Plugin,
    Model,
    Policy,
    Adapter,
}

impl Kind {
    fn catalog(self) -> &'static Catalog {
        match self {
            Kind::Plugin => &PLUGINS,
            Kind::Model => &MODELS,
            Kind::Policy => &POLICIES,
            Kind::Adapter => &ADAPTERS,
        }
    }
}

/// One row of a catalog, as enable and disable see it.
pub(super) struct Row {
    pub id: i64,
    pub name: String,
    pub version: String,
    pub state: String,
}

/// `name[@version]` in catalog `c`: that version, or with none the active
/// one, else the newest (by semver where versions are semver, else by
/// number, else the last installed).
pub(super) fn find(tx: &Transaction<'_>, c: &Catalog, spec: &str) -> Result<Row> {
    let (name, version) = match spec.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let mut stmt = tx.prepare(&format!(
        "SELECT id, name, version, state FROM {} WHERE name = ?1 ORDER BY id",
        c.table
    ))?;
    let rows: Vec<Row> = stmt
        .query_map([name], |r| {
            Ok(Row {
                id: r.get(0)?,
                name: r.get(1)?,
                version: version_text(r.get(2)?),
                state: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    if rows.is_empty() {
        return Err(RegistryError::Refused(format!(
            "{name} is not registered (no {} of that name; see `{}`)",
            c.kind, c.list
        )));
    }
    if let Some(v) = version {
        return rows.into_iter().find(|r| r.version == v).ok_or_else(|| {
            RegistryError::Refused(format!(
                "{name}@{v} is not registered: {name} has no installed version {v} (see `{}`)",
                c.list
            ))
        });
    }
    if let Some(i) = rows.iter().position(|r| r.state == "active") {
        return Ok(rows.into_iter().nth(i).expect("found above"));
    }
    let order = |r: &Row| {
        (
            semver::Version::parse(&r.version).ok(),
            r.version.parse::<u64>().ok(),
            r.id,
        )
    };
    Ok(rows
        .into_iter()
        .max_by(|a, b| order(a).cmp(&order(b)))
        .expect("not empty"))
}

impl Registry {
    /// `kiln {plugins,models,policy} enable NAME[@VERSION]`: that version
    /// (default: the active one, else the newest) becomes active; a policy
    /// becomes the only active one of its kind and its failure count
    /// starts over.
    pub fn enable(&mut self, kind: Kind, spec: &str, actor: &str) -> Result<Transition> {
        let c = kind.catalog();
        let tx = self.write()?;
        let target = find(&tx, c, spec)?;
        let t = match kind {
            Kind::Policy => super::policies::activate_for_kind(&tx, target.id, actor, "enable")?,
            _ => activate(&tx, c, &target.name, target.id, actor, "enable")?,
        };
        tx.commit()?;
        Ok(t)
    }

    /// `… disable NAME[@VERSION]`: the version (default: the active one)
    /// stops being used until enabled again.
    pub fn disable(&mut self, kind: Kind, spec: &str, actor: &str) -> Result<Transition> {
        let c = kind.catalog();
        let tx = self.write()?;
        let target = find(&tx, c, spec)?;
        if target.state == "disabled" {
            return Err(RegistryError::Refused(format!(
                "{}@{} is already disabled",
                target.name, target.version
            )));
        }
        set_state(&tx, c, target.id, "disabled")?;
        audit(
            &tx,
            actor,
            c.kind,
            "disable",
            &target.name,
            Some(&format!("{} {}", target.version, target.state)),
            Some(&format!("{} disabled", target.version)),
            None,
        )?;
        let was_active = target.state == "active";
        let after = if was_active {
            None
        } else {
            active(&tx, c, &target.name)?.map(|(_, v)| v)
        };
        tx.commit()?;
        Ok(Transition {
            name: target.name,
            before: was_active.then_some(target.version),
            after,
        })
    }

    /// `… rollback NAME`: re-activates the version that was active before
    /// the current one; repeated rollbacks walk further back.
    pub fn rollback(&mut self, kind: Kind, name: &str, actor: &str) -> Result<Transition> {
        if name.contains('@') {
            return Err(RegistryError::Refused(format!(
                "rollback takes a name, not a version ({name}); to pick a version use `{} {name}`",
                kind.catalog().command
            )));
        }
        let tx = self.write()?;
        let t = rollback(&tx, kind.catalog(), name, actor)?;
        tx.commit()?;
        Ok(t)
    }
}

pub(super) struct Catalog {
    pub table: &'static str,
    pub activations: &'static str,
    /// The activations table's column naming a row of `table`.
    pub fk: &'static str,
    /// The audit log's `kind`.
    pub kind: &'static str,
    /// The command that activates a version, for advice in messages.
    pub command: &'static str,
    /// The command that lists what is installed.
    pub list: &'static str,
}

pub(super) const PLUGINS: Catalog = Catalog {
    table: "plugins",
    activations: "plugin_activations",
    fk: "plugin_id",
    kind: "plugin",
    command: "kiln plugins enable",
    list: "kiln plugins list",
};

pub(super) const POLICIES: Catalog = Catalog {
    table: "policies",
    activations: "policy_activations",
    fk: "policy_id",
    kind: "policy",
    command: "kiln policy enable",
    list: "kiln policy list",
};

pub(super) const MODELS: Catalog = Catalog {
    table: "models",
    activations: "model_activations",
    fk: "model_id",
    kind: "model",
    command: "kiln models enable",
    list: "kiln models list",
};

pub(super) const ADAPTERS: Catalog = Catalog {
    table: "adapters",
    activations: "adapter_activations",
    fk: "adapter_id",
    kind: "adapter",
    command: "kiln adapters enable",
    list: "kiln adapters list",
};

fn version_text(v: rusqlite::types::Value) -> String {
    match v {
        rusqlite::types::Value::Integer(i) => i.to_string(),
        rusqlite::types::Value::Text(t) => t,
        other => format!("{other:?}"),
    }
}

/// The next version number (1, 2, …) of `name` in `c`, for a file of
/// `sha256`; refused when those bytes are already a version of `name`.
pub(super) fn next_version(
    tx: &Transaction<'_>,
    c: &Catalog,
    name: &str,
    sha256: &str,
) -> Result<u32> {
    let same: Option<u32> = tx
        .query_row(
            &format!(
                "SELECT version FROM {} WHERE name = ?1 AND sha256 = ?2",
                c.table
            ),
            params![name, sha256],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(v) = same {
        return Err(RegistryError::Refused(format!(
            "this file is already {name}@{v}; `{} {name}@{v}` makes it active",
            c.command
        )));
    }
    Ok(tx.query_row(
        &format!(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM {} WHERE name = ?1",
            c.table
        ),
        [name],
        |r| r.get(0),
    )?)
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
