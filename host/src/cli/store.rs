//! `kiln store …`: encryption at rest of the model store, its scrub
//! (re-hash, repair from the source) and garbage collection.

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

pub fn scrub(config: &Config, repair: bool, as_json: bool) -> CliResult {
    let mut registry = open_registry(config)?;
    let keys = kiln_runtime::crypt::Keys::from_env(config)?;
    let client = kiln_runtime::pull::Client::from_env();
    let progress = Progress::new("downloading");
    let mut refetch = |m: &kiln_registry::ModelRecord| -> Result<std::path::PathBuf, String> {
        let origin = m.origin.as_deref().unwrap_or_default();
        if !as_json {
            eprintln!("kiln: {}: fetching it again from {origin}", m.label());
        }
        kiln_runtime::pull::refetch(config, &client, origin, &m.sha256, |e| {
            if let kiln_runtime::pull::Event::Progress { done, total } = e {
                progress.bytes(done, total.unwrap_or(m.size_bytes), &m.label());
            }
        })
        .map_err(|e| e.to_string())
    };
    let scrubbed = store::scrub(
        config,
        &mut registry,
        &keys,
        repair.then_some(&mut refetch as &mut store::Refetch<'_>),
        &actor(),
        |label| {
            if !as_json {
                eprintln!("kiln: checking {label}");
            }
        },
    )?;
    let bad = scrubbed.iter().filter(|s| s.bad()).count();
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "blobs": scrubbed,
            "damaged": bad,
        }));
    } else {
        for s in &scrubbed {
            let status = match &s.status {
                store::BlobStatus::Ok => "OK     ".to_string(),
                store::BlobStatus::Missing => "MISSING".to_string(),
                store::BlobStatus::Corrupt { actual_sha256 } => {
                    format!("CORRUPT (its bytes hash to {actual_sha256})")
                }
                store::BlobStatus::Damaged { reason } => format!("DAMAGED ({reason})"),
                store::BlobStatus::Locked { reason } => format!("LOCKED  ({reason})"),
            };
            println!(
                "{status}  {} {}  {}",
                s.kind,
                s.versions.join(", "),
                s.blob_path.display()
            );
            if let Some(r) = &s.repair {
                println!("         {r}");
            }
        }
        println!(
            "{} blob(s) checked, {bad} damaged or missing{}",
            scrubbed.len(),
            if bad > 0 && !repair {
                "; `kiln store scrub --repair` fetches again those `kiln pull` downloaded"
            } else {
                ""
            }
        );
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn gc(config: &Config, dry_run: bool, as_json: bool) -> CliResult {
    let mut registry = open_registry(config)?;
    let found = store::gc(config, &mut registry, dry_run, &actor())?;
    let bytes: u64 = found.iter().map(|o| o.bytes).sum();
    if as_json {
        print_json(&serde_json::json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "dry_run": dry_run,
            "files": found,
            "bytes": bytes,
        }));
    } else {
        for o in &found {
            println!(
                "{}  {:<8} {}  {}",
                if dry_run { "WOULD REMOVE" } else { "REMOVED" },
                o.kind,
                human_bytes(o.bytes),
                o.path.display()
            );
        }
        println!(
            "{} file(s), {} {}",
            found.len(),
            human_bytes(bytes),
            if dry_run {
                "would be freed (run without --dry-run to remove them)"
            } else {
                "freed"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
