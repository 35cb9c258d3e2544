//! cgroup v2 directories for sandboxes, removed (with the processes still in them) on drop.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmd::wait_until;
use crate::env::cgroup2_mount;
use crate::owner;

pub(crate) const PREFIX: &str = "veil-test-";

/// Parent of every test cgroup, relative to the cgroup2 mount. veil-control only registers
/// sandboxes under configured parents; tests configure this one.
pub const PARENT: &str = "veil-test.slice";

/// A cgroup `<cgroup2>/veil-test.slice/veil-test-<pid>-<n>-<tag>`.
///
/// Drop kills the processes still in it (ours: only tests put processes there), waits until it
/// is empty and removes it.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the cgroup directory.
    pub fn new(tag: &str) -> Cgroup {
        crate::stale::init();
        let name = format!(
            "{PREFIX}{}-{}-{}",
            owner::pid(),
            owner::next_seq(),
            owner::sanitize_tag(tag)
        );
        let parent = cgroup2_mount().join(PARENT);
        let path = parent.join(name);
        // Another test process may remove the (empty) parent between our two steps: retry.
        let mut attempts = 0;
        loop {
            match std::fs::create_dir(&parent) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("creating cgroup {}: {e}", parent.display()),
            }
            match std::fs::create_dir(&path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 10 => {
                    attempts += 1;
                }
                Err(e) => panic!("creating cgroup {}: {e}", path.display()),
            }
        }
        Cgroup { path }
    }

    /// Absolute path of the cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path relative to the cgroup2 mount, as /proc/<pid>/cgroup shows it
    /// (`/veil-test.slice/veil-test-…`).
    pub fn relative(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        format!("/{PARENT}/{}", name.unwrap_or_default())
    }

    /// The cgroup id (the directory's inode number), as eBPF's `bpf_get_current_cgroup_id` sees it.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// Pids of the processes currently in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        read_pids(&self.path)
    }

    /// Kills every process in the cgroup and waits (≤ 5 s) until it is empty.
    pub fn kill_all(&self) {
        kill_and_wait(&self.path);
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Kills everything in the cgroup tree at `path` and removes it bottom-up, then the shared
/// parent if no test cgroup is left in it.
pub fn remove_cgroup_tree(path: &Path) {
    remove_tree(path);
    remove_parent_if_empty();
}

/// Removes the shared parent once no test cgroup is left in it (EBUSY otherwise: fine).
pub(crate) fn remove_parent_if_empty() {
    let _ = std::fs::remove_dir(cgroup2_mount().join(PARENT));
}

fn read_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => !read_pids(dir).is_empty(),
    }
}

fn kill_and_wait(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let kill_file = dir.join("cgroup.kill");
    let emptied = wait_until(Duration::from_secs(5), || {
        if !populated(dir) {
            return true;
        }
        // cgroup.kill (5.14+) kills the whole subtree atomically, including processes forked
        // meanwhile; the per-pid fallback repeats until nothing is left.
        if std::fs::write(&kill_file, "1").is_err() {
            for pid in read_pids(dir) {
                if let Ok(pid) = i32::try_from(pid) {
                    // SAFETY: plain kill(2) of a pid that is in our test cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        false
    });
    if !emptied {
        eprintln!(
            "veil-tests: cgroup {} still has processes {:?} after 5 s",
            dir.display(),
            read_pids(dir)
        );
    }
}

/// Kills everything in `dir` and below, then removes the directories bottom-up (bounded).
pub(crate) fn remove_tree(dir: &Path) {
    kill_and_wait(dir);
    for child in owner::list_dir(dir) {
        if child.is_dir() {
            remove_tree(&child);
        }
    }
    let removed = wait_until(Duration::from_secs(5), || match std::fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    });
    if !removed {
        eprintln!(
            "veil-tests: could not remove cgroup {} within 5 s: {:?}",
            dir.display(),
            std::fs::remove_dir(dir).err()
        );
    }
}
