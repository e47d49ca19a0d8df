//! How many threads the pool uses unless `KILN_THREADS` says: one per
//! physical core the process may run on, and on CPUs with cores of two
//! speeds only the fast ones. SMT siblings share one core's execution
//! units, so a second thread there adds little to compute-bound kernels
//! and makes every split op wait for the slower half; and on Intel's
//! hybrid CPUs (P and E cores) and ARM's big.LITTLE ones a thread on a
//! slow core is the one the others wait for at the end of each op.
//! llama.cpp chooses the same way.
//!
//! Read from Linux's sysfs: `devices/cpu_core/cpus` and
//! `devices/cpu_atom/cpus` (Intel hybrid), each CPU's `cpu_capacity`
//! (1024 for the fastest; big.LITTLE), and its `topology/core_cpus_list`
//! (or `thread_siblings_list`) for SMT siblings. Where none of it can be
//! read (other systems, a sandbox), every CPU available counts.

use std::collections::BTreeSet;
use std::path::Path;

/// A CPU list as the kernel writes it (`0-3,8,10-11`), or `None` if it
/// is not one.
pub fn parse_list(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
                if a > b || b - a > 1 << 16 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// The threads to use among the CPUs `allowed`, from the sysfs under
/// `sys` (normally `/sys`): `None` where it says nothing usable.
pub fn math_threads(sys: &Path, allowed: &[usize]) -> Option<usize> {
    let read = |p: &Path| std::fs::read_to_string(p).ok();
    let cpu_dir = sys.join("devices/system/cpu");
    let mut cpus: Vec<usize> = allowed.to_vec();
    // Intel hybrid: the performance cores, where the process may use any.
    if let (Some(core), Some(_)) = (
        read(&sys.join("devices/cpu_core/cpus")),
        read(&sys.join("devices/cpu_atom/cpus")),
    ) {
        let fast = parse_list(&core)?;
        let mine: Vec<usize> = cpus.iter().copied().filter(|c| fast.contains(c)).collect();
        if !mine.is_empty() {
            cpus = mine;
        }
    }
    // Cores of different capacities: those at least half as fast as the
    // fastest (ARM's prime and big cores, not its little ones).
    let capacities: Option<Vec<u32>> = cpus
        .iter()
        .map(|c| {
            read(&cpu_dir.join(format!("cpu{c}/cpu_capacity")))?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    if let Some(caps) = capacities
        && let Some(&max) = caps.iter().max()
    {
        cpus = cpus
            .iter()
            .zip(&caps)
            .filter(|&(_, &cap)| 2 * cap >= max)
            .map(|(&c, _)| c)
            .collect();
    }
    // One thread per physical core: SMT siblings share the lowest
    // sibling's number.
    let mut cores = BTreeSet::new();
    let mut known = false;
    for &c in &cpus {
        let topology = cpu_dir.join(format!("cpu{c}/topology"));
        let siblings = read(&topology.join("core_cpus_list"))
            .or_else(|| read(&topology.join("thread_siblings_list")))
            .and_then(|s| parse_list(&s));
        known |= siblings.is_some();
        cores.insert(siblings.and_then(|s| s.into_iter().min()).unwrap_or(c));
    }
    (known && !cores.is_empty()).then_some(cores.len())
}

/// The CPUs this process may run on (`Cpus_allowed_list` in
/// `/proc/self/status`).
fn allowed_cpus() -> Option<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    parse_list(line).filter(|l| !l.is_empty())
}

/// The pool's default thread count: [`math_threads`] on Linux, at most
/// what the process may use (`available_parallelism`: affinity and cgroup
/// quotas), else that. Read once per process (the host asks again for
/// every tensor it repacks).
pub fn default_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(read_default_threads)
}

fn read_default_threads() -> usize {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cfg!(target_os = "linux")
        && let Some(allowed) = allowed_cpus()
        && let Some(n) = math_threads(Path::new("/sys"), &allowed)
    {
        return n.clamp(1, available);
    }
    available
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A sysfs tree with `siblings[c]` as CPU c's core list, capacities
    /// where given, and Intel's hybrid lists where given.
    fn sysfs(
        name: &str,
        siblings: &[&str],
        capacity: Option<&[u32]>,
        hybrid: Option<(&str, &str)>,
    ) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("kiln-topology-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (c, s) in siblings.iter().enumerate() {
            let dir = root.join(format!("devices/system/cpu/cpu{c}/topology"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("core_cpus_list"), format!("{s}\n")).unwrap();
            if let Some(caps) = capacity {
                std::fs::write(dir.join("../cpu_capacity"), format!("{}\n", caps[c])).unwrap();
            }
        }
        if let Some((core, atom)) = hybrid {
            for (pmu, list) in [("cpu_core", core), ("cpu_atom", atom)] {
                let dir = root.join("devices").join(pmu);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("cpus"), format!("{list}\n")).unwrap();
            }
        }
        root
    }

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            parse_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_list("\t5"), Some(vec![5]));
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("0-x"), None);
        assert_eq!(parse_list("ff"), None);
    }

    #[test]
    fn one_thread_per_physical_core() {
        // Four cores with two SMT threads each, numbered as Linux does
        // (siblings n and n + 4).
        let sibs = ["0,4", "1,5", "2,6", "3,7", "0,4", "1,5", "2,6", "3,7"];
        let sys = sysfs("smt", &sibs, None, None);
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(math_threads(&sys, &all), Some(4));
        // Pinned to one core's two threads, or to one thread of each of two.
        assert_eq!(math_threads(&sys, &[0, 4]), Some(1));
        assert_eq!(math_threads(&sys, &[0, 1]), Some(2));
        std::fs::remove_dir_all(sys).unwrap();
    }

    #[test]
    fn hybrid_cpus_use_their_performance_cores() {
        // Six P cores with SMT (CPUs 0-11) and eight E cores (12-19).
        let mut sibs: Vec<String> = (0..12)
            .map(|c| format!("{}-{}", c / 2 * 2, c / 2 * 2 + 1))
            .collect();
        sibs.extend((12..20).map(|c| c.to_string()));
        let sibs: Vec<&str> = sibs.iter().map(String::as_str).collect();
        let sys = sysfs("hybrid", &sibs, None, Some(("0-11", "12-19")));
        let all: Vec<usize> = (0..20).collect();
        assert_eq!(math_threads(&sys, &all), Some(6));
        // A process pinned to E cores alone uses them.
        assert_eq!(math_threads(&sys, &[12, 13, 14]), Some(3));
        std::fs::remove_dir_all(sys).unwrap();
    }

    #[test]
    fn big_little_cpus_use_their_big_cores() {
        // One prime, three big, four little cores, no SMT.
        let sibs = ["0", "1", "2", "3", "4", "5", "6", "7"];
        let caps = [1024, 870, 870, 870, 380, 380, 380, 380];
        let sys = sysfs("biglittle", &sibs, Some(&caps), None);
        let all: Vec<usize> = (0..8).collect();
        assert_eq!(math_threads(&sys, &all), Some(4));
        assert_eq!(math_threads(&sys, &[5, 6]), Some(2));
        std::fs::remove_dir_all(sys).unwrap();
    }

    #[test]
    fn without_sysfs_nothing_is_claimed() {
        let empty = std::env::temp_dir().join(format!("kiln-topology-{}-none", std::process::id()));
        assert_eq!(math_threads(&empty, &[0, 1, 2]), None);
    }

    #[test]
    fn the_default_is_between_one_and_the_cores_available() {
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = default_threads();
        assert!((1..=available).contains(&n), "{n} of {available}");
    }
}
