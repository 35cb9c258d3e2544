//! Address-block lock files of dead test processes.

use std::path::Path;

use crate::alloc::try_take;
use crate::owner;

/// Removes lock files nobody holds (their owners died).
pub fn cleanup_stale_locks() {
    for path in owner::list_dir(Path::new(owner::STATE_DIR)) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(index) = name
            .strip_prefix("block-")
            .and_then(|r| r.strip_suffix(".lock"))
            .and_then(|i| i.parse::<u32>().ok())
        else {
            continue;
        };
        // Taking the lock proves no live process holds it; dropping the Block unlinks it.
        drop(try_take(index));
    }
}
