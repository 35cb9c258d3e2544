//! Unlinking a sandbox cgroup: its pinned links removed, detached first.

use std::io;
use std::os::fd::AsFd as _;
use std::path::Path;

use super::error::BpfError;
use super::programs::PROGRAMS;
use super::sys::{link_detach, obj_get};
use crate::pins::PinLayout;

/// Removes the pins of one sandbox cgroup's links (connect first, so nothing new is redirected
/// meanwhile), then its directory. Without pins and without an open fd the kernel detaches.
pub fn unpin_sandbox(pins: &PinLayout, cgroup_id: u64) -> Result<(), BpfError> {
    unpin_links(&pins.sandbox_dir(cgroup_id), &PROGRAMS)
}

/// Removes the pins `<dir>/<program>` of `programs` (in reverse attach order, detached first),
/// then `dir` with anything else in it.
pub fn unpin_links(dir: &Path, programs: &[&str]) -> Result<(), BpfError> {
    let mut first_err = None;
    for name in programs.iter().rev() {
        let path = dir.join(name);
        // Dropping the last reference releases a link asynchronously; detaching it first makes
        // "unpinned" mean "no longer runs" by the time this returns.
        if let Ok(fd) = obj_get(&path)
            && let Err(source) = link_detach(fd.as_fd())
        {
            first_err.get_or_insert(BpfError::Pin {
                path: path.clone(),
                source,
            });
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                first_err.get_or_insert(BpfError::Pin { path, source });
            }
        }
    }
    // Anything else in there (nothing we made) is removed too: the directory must go.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            first_err.get_or_insert(BpfError::Pin {
                path: dir.to_owned(),
                source,
            });
        }
    }
    first_err.map_or(Ok(()), Err)
}
