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

/// Transparent huge pages as the kernel offers them
/// (`/sys/kernel/mm/transparent_hugepage/enabled`): `always`, `madvise`
/// (for memory that asks, as kiln's weights copied into memory, KV caches
/// and work spaces do) or `never`; `None` where the kernel has none.
pub fn huge_pages_mode() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    // The mode in force is the bracketed one: "always [madvise] never".
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

/// Bytes of this process's anonymous memory on transparent huge pages
/// (`AnonHugePages` of `/proc/self/smaps_rollup`).
pub fn huge_pages_bytes() -> Option<u64> {
    proc_kib_field("/proc/self/smaps_rollup", "AnonHugePages")
}

/// The size of a transparent huge page on x86-64 and most ARM64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// `n` zeroed bytes, asking the kernel for huge pages where they would
/// hold 2 MiB or more of them (`MADV_HUGEPAGE` on the aligned inside):
/// a KV cache or work space that every token reads misses the TLB less.
/// The bytes are asked for before any is touched (a large zeroed
/// allocation is fresh mapped memory), so the first touch of each
/// aligned 2 MiB faults in a huge page where the kernel has one free. A
/// hint: without transparent huge pages it is plain memory.
pub fn huge_zeroed(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    advise_huge(&mut v);
    v
}

fn advise_huge(bytes: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        let start = (bytes.as_mut_ptr() as usize).next_multiple_of(HUGE_PAGE);
        let end = (bytes.as_mut_ptr() as usize + bytes.len()) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside `bytes`, page-aligned; the
            // advice changes how the kernel backs the pages, not their
            // contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (bytes, HUGE_PAGE);
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

    /// The advice reaches the kernel: the memory's mapping is eligible
    /// for huge pages (`THPeligible` in `/proc/self/smaps`) where the
    /// kernel offers them on request, and the bytes are zeroes.
    #[test]
    fn huge_zeroed_memory_asks_for_huge_pages() {
        let mut v = huge_zeroed(8 << 20);
        assert!(v.iter().all(|&b| b == 0));
        v[5 << 20] = 1;
        if !cfg!(target_os = "linux")
            || !matches!(huge_pages_mode().as_deref(), Some("madvise" | "always"))
        {
            return;
        }
        let at = v.as_ptr() as usize + (4 << 20);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut eligible = None;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&at);
            } else if inside && let Some(flag) = line.strip_prefix("THPeligible:") {
                eligible = Some(flag.trim() == "1");
            }
        }
        assert_eq!(eligible, Some(true), "the mapping holding the bytes");
    }
}
