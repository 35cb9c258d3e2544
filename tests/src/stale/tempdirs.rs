//! Temp dirs of dead test processes.

use crate::owner::{is_stale, list_dir};

/// Removes `veil-test-<pid>-*` temp dirs whose owner pid is dead.
pub fn cleanup_stale_tempdirs() {
    let tmp = std::env::temp_dir();
    for path in list_dir(&tmp) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let owner = name
            .strip_prefix("veil-test-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if !is_stale(owner) || !path.is_dir() {
            continue;
        }
        // A killed agent's netns pins (mount points) would keep the directory.
        crate::bind::release_pins(&path.join("local").join("netns"));
        if let Err(e) = std::fs::remove_dir_all(&path) {
            eprintln!("veil-tests: removing stale {}: {e}", path.display());
        }
    }
}
