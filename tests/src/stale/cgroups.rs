//! Cgroups of dead test processes.

use crate::cgroup::{PARENT, PREFIX, remove_parent_if_empty, remove_tree};
use crate::env::cgroup2_mount;
use crate::owner;

/// Removes `veil-test-<pid>-<n>-*` cgroups whose owner pid is dead (killing what is left in them).
pub fn cleanup_stale_cgroups() {
    let root = cgroup2_mount();
    let mut dirs = owner::list_dir(&root.join(PARENT));
    // Older runs put test cgroups at the top level.
    dirs.extend(owner::list_dir(&root));
    for path in dirs {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_dir() && owner::is_stale(owner::owner_decimal(name, PREFIX)) {
            remove_tree(&path);
        }
    }
    remove_parent_if_empty();
}
