//! `kiln store …`: encryption at rest of the model store.

use super::{CliResult, JSON_SCHEMA_VERSION, Progress, human_bytes, open_registry, print_json};
use kiln_registry::actor;
use kiln_registry::config::Config;
use kiln_runtime::store;
use std::process::ExitCode;

pub fn reseal(config: &Config, encrypt: bool, as_json: bool) -> CliResult {
    let mut config = config.clone();
    let mut registry = open_registry(&config)?;
    let progress = Progress::new(if encrypt { "encrypting" } else { "decrypting" });
    let done = store::reseal(
        &mut config,
        &mut registry,
        encrypt,
        &actor(),
        |m, d, total| progress.bytes(d, total, m),
    )?;
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "encrypt_at_rest": encrypt,
            "identity": done.identity,
            "identity_created": done.identity_created,
            "blobs": done.blobs,
            "missing": done.missing,
        }));
    } else {
        let verb = if encrypt { "encrypted" } else { "decrypted" };
        for b in &done.blobs {
            println!(
                "{verb} {} ({}) -> {}",
                b.models.join(", "),
                human_bytes(b.bytes),
                b.to.display()
            );
        }
        for m in &done.missing {
            println!("MISSING  {m}: its blob is gone, nothing to {}", &verb[..7]);
        }
        match (&done.identity, done.identity_created) {
            (Some(p), true) => println!(
                "created the identity {} (mode 0600): keep a copy somewhere safe; without it the encrypted models cannot be read",
                p.display()
            ),
            (Some(p), false) => println!("identity: {}", p.display()),
            (None, _) if encrypt => println!("key: the passphrase in KILN_PASSPHRASE"),
            (None, _) => {}
        }
        println!(
            "{} blob(s) {verb}; models added from now on are stored {}",
            done.blobs.len(),
            if encrypt { "encrypted" } else { "in plain" }
        );
    }
    Ok(if done.missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
