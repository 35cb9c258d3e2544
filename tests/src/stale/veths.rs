//! Root-netns veths of dead test processes.

use std::path::Path;

use crate::cmd::try_run;
use crate::owner;
use crate::world::HOST_IF_PREFIX;

/// Deletes root-netns veths `vh-<pid36>-<n36>` whose owner pid is dead.
pub fn cleanup_stale_veths() {
    for path in owner::list_dir(Path::new("/sys/class/net")) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if owner::is_stale(owner::owner_base36(name, HOST_IF_PREFIX))
            && let Err(e) = try_run("ip", &["link", "del", name])
        {
            eprintln!("veil-tests: removing stale veth: {e}");
        }
    }
}
