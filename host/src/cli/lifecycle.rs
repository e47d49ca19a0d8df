//! `enable`, `disable` and `rollback`: the same for plugins, models and
//! policies (the registry's [`Kind`]), written once.

use super::{CliResult, open_registry};
use kiln_registry::config::Config;
use kiln_registry::{Kind, Transition, actor};
use std::process::ExitCode;

#[derive(Clone, Copy)]
pub enum Action {
    Enable,
    Disable,
    Rollback,
}

/// Applies `action` to `spec` (`NAME[@VERSION]`; a name for rollback) and
/// says what changed.
pub fn change(config: &Config, kind: Kind, action: Action, spec: &str) -> CliResult {
    let mut registry = open_registry(config)?;
    let t = match action {
        Action::Enable => registry.enable(kind, spec, &actor())?,
        Action::Disable => registry.disable(kind, spec, &actor())?,
        Action::Rollback => registry.rollback(kind, spec, &actor())?,
    };
    report(&t);
    Ok(ExitCode::SUCCESS)
}

/// `NAME: active version BEFORE -> AFTER`.
pub fn report(t: &Transition) {
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
    println!(
        "{}: active version {} -> {}",
        t.name,
        show(&t.before),
        show(&t.after)
    );
}
