//! Readings and limits of the host the benchmarks run on: CPU time (all and per process), and
//! the open-files limit.

/// Raises the soft open-files limit to the hard one (children inherit it): the benchmarks hold
/// thousands of connections.
pub(crate) fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Share of all CPU time stolen by the hypervisor between two /proc/stat samples.
pub(crate) fn cpu_steal_percent(before: &[u64], after: &[u64]) -> f64 {
    let total: u64 = after.iter().zip(before).map(|(a, b)| a - b).sum();
    let steal = after.get(7).zip(before.get(7)).map_or(0, |(a, b)| a - b);
    if total == 0 {
        0.0
    } else {
        100.0 * steal as f64 / total as f64
    }
}

/// The aggregate CPU line of /proc/stat, in ticks per state.
pub(crate) fn cpu_times() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|f| f.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// User + system CPU seconds a process has used (from /proc/<pid>/stat; 100 ticks/s).
pub(crate) fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Share of all CPU time that was not idle or iowait between two /proc/stat samples.
pub(crate) fn busy_percent(before: &[u64], after: &[u64]) -> f64 {
    let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = delta.iter().sum();
    let idle = delta.get(3).copied().unwrap_or(0) + delta.get(4).copied().unwrap_or(0);
    if total == 0 {
        0.0
    } else {
        100.0 * (total - idle) as f64 / total as f64
    }
}
