//! PostgreSQL servers of dead test processes.

use crate::owner;
use crate::postgres::{DIR_TAG, kill_postmaster, postmaster_pid};

/// Stops the servers of dead test processes; their temp dirs go with the harness's stale temp dirs.
pub fn cleanup_stale_servers() {
    let prefix = "veil-test-";
    for path in owner::list_dir(&std::env::temp_dir()) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let owner_pid = parts.next().and_then(|p| p.parse::<u32>().ok());
        if parts.next() != Some(DIR_TAG) || !owner::is_stale(owner_pid) {
            continue;
        }
        let data = path.join("data");
        if let Some(pid) = postmaster_pid(&data) {
            kill_postmaster(pid, &data);
        }
    }
}
