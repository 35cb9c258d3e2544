//! Agents and bpffs pin directories of dead test processes.

use std::path::Path;

use crate::agent::{BPFFS, PIN_PREFIX, remove_pin_dir, start_time};
use crate::owner;

/// Kills agents started by test processes that died (pid and start time must both match).
pub fn cleanup_stale_agents() {
    for path in owner::list_dir(Path::new(owner::STATE_DIR)) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(rest) = name
            .strip_prefix("agent-")
            .and_then(|r| r.strip_suffix(".pid"))
        else {
            continue;
        };
        if !owner::is_stale(owner::owner_decimal(rest, "")) {
            continue;
        }
        let recorded = std::fs::read_to_string(&path).unwrap_or_default();
        let mut fields = recorded.split_whitespace();
        let pid = fields.next().and_then(|p| p.parse::<u32>().ok());
        let started = fields.next().and_then(|s| s.parse::<u64>().ok());
        if let (Some(pid), Some(started)) = (pid, started)
            && started != 0
            && start_time(pid) == Some(started)
            && let Ok(pid) = i32::try_from(pid)
        {
            // SAFETY: kill(2) of the agent a dead test process started (verified by pid and
            // start time).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// Removes pin directories of dead test processes.
pub fn cleanup_stale_pins() {
    for path in owner::list_dir(Path::new(BPFFS)) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_dir() && owner::is_stale(owner::owner_decimal(name, PIN_PREFIX)) {
            remove_pin_dir(&path);
        }
    }
}
