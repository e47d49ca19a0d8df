//! Small measurements several commands report: process memory from
//! `/proc` (Linux; `None` elsewhere) and percentiles of latencies.

/// `n` bytes for a person: "812 B", "252.8 KiB", "1.5 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A `kB` field of a `/proc` file (`/proc/self/status`, `/proc/meminfo`,
/// …), in bytes.
pub fn proc_kib_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// A memory field of a process's `status` (`VmHWM`, `RssAnon`, `RssFile`,
/// …), in bytes; `None` for this process.
pub fn process_memory(pid: Option<u32>, key: &str) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    proc_kib_field(&path, key)
}

/// Hands the heap's free pages back to the system (glibc keeps what a
/// large, short-lived build freed, in every thread's arena, as resident
/// memory otherwise); a no-op elsewhere.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free
    // lists; it is thread-safe and takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The `p`-th percentile (nearest rank) of `values` (in any order); 0 for
/// none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_proc_fields() {
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 99.0), 3.0);
        assert_eq!(percentile(&[5.0], 1.0), 5.0);
        if cfg!(target_os = "linux") {
            let hwm = process_memory(None, "VmHWM").unwrap();
            assert!(hwm > 0 && hwm.is_multiple_of(1024));
            assert!(proc_kib_field("/proc/meminfo", "MemAvailable").is_some());
            assert_eq!(process_memory(None, "NoSuchField"), None);
        }
    }
}
