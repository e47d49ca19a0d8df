//! The background scrub `kiln serve` runs: every `[store]
//! scrub_interval_hours` (24 by default; the first ten minutes after the
//! start at most), the model store's blobs are re-hashed, as `kiln store
//! scrub` does, on a thread at the lowest CPU and I/O priority, so that
//! completions never wait on it. Damage is reported (stderr, `/metrics`'
//! `kiln:store_damaged_blobs`, the audit log), never repaired here: the
//! repair downloads, which `kiln store scrub --repair` does when asked.

use crate::metrics::Metrics;
use kiln_registry::Registry;
use kiln_registry::config::Config;
use kiln_runtime::store;
use std::sync::Arc;
use std::time::Duration;

/// The longest wait before the first scrub.
const FIRST_AFTER: Duration = Duration::from_secs(600);

/// Starts the scrub thread where `config` asks for one.
pub fn start(config: Config, metrics: Arc<Metrics>) {
    let Some(every) = config.scrub_interval else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("kiln-scrub".into())
        .spawn(move || {
            lowest_priority();
            std::thread::sleep(every.min(FIRST_AFTER));
            loop {
                if let Err(e) = once(&config, &metrics) {
                    eprintln!("kiln: the store's background scrub failed: {e}");
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = spawned {
        eprintln!("kiln: no background scrub of the store: {e}");
    }
}

/// One scrub of every model blob; the damaged ones said and audited.
fn once(config: &Config, metrics: &Metrics) -> Result<(), String> {
    let mut registry = Registry::open_home(config).map_err(|e| e.to_string())?;
    let keys = kiln_runtime::crypt::Keys::from_env(config).unwrap_or_default();
    let scrubbed = store::scrub(config, &mut registry, &keys, None, "kiln serve", |_| {})
        .map_err(|e| e.to_string())?;
    let bad: Vec<&store::Scrubbed> = scrubbed.iter().filter(|s| s.bad()).collect();
    // The damage goes to the audit log before `/metrics` shows it, so that
    // whoever sees the gauge move finds the entry (a test read the log as
    // soon as the gauge moved and, once, before the entry was there).
    let audited = if bad.is_empty() {
        Ok(())
    } else {
        let names: Vec<String> = bad.iter().map(|s| s.versions.join(", ")).collect();
        let line = format!(
            "{} of {} blob(s) damaged or missing: {} (`kiln store scrub --repair`)",
            bad.len(),
            scrubbed.len(),
            names.join("; ")
        );
        eprintln!("kiln: store scrub: {line}");
        registry
            .audit_store(
                "kiln serve",
                "scrub",
                &store::blobs_dir(config).display().to_string(),
                &line,
            )
            .map_err(|e| e.to_string())
    };
    metrics.store_blobs.set(scrubbed.len() as i64);
    metrics.store_damaged.set(bad.len() as i64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    metrics.store_scrubbed_at.set(now as i64);
    audited
}

/// This thread at nice 19 and in the idle I/O class (Linux: both are
/// per thread), so that re-hashing gigabytes waits for everything else.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls on this thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << 13).
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        const IOPRIO_CLASS_IDLE: libc::c_long = 3;
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        );
    }
}
