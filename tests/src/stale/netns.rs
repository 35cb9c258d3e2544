//! Network namespaces of dead test processes.

use std::path::Path;

use crate::cmd::try_run;
use crate::netns::{NETNS_DIR, PREFIX};
use crate::owner;

/// Deletes `veil-<pid>-<n>-*` namespaces whose owner pid is dead.
pub fn cleanup_stale_netns() {
    for path in owner::list_dir(Path::new(NETNS_DIR)) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if owner::is_stale(owner::owner_decimal(name, PREFIX))
            && let Err(e) = try_run("ip", &["netns", "del", name])
        {
            eprintln!("veil-tests: removing stale netns: {e}");
        }
    }
}
