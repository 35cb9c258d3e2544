//! The sandbox's cgroup: `<parent>/<id>` under the cgroup2 mount, made before anything else
//! and removed (with whatever still runs in it) last.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The sandbox's cgroup directory.
#[derive(Debug)]
pub struct SandboxCgroup {
    /// Its directory.
    pub path: PathBuf,
    /// Its path relative to the cgroup2 mount.
    pub relative: String,
    /// The parent, when this run created it (removed again when empty).
    pub created_parent: Option<PathBuf>,
}

impl SandboxCgroup {
    /// Creates `<parent>/<id>` (and the parent when missing) under the cgroup2 `mount`.
    pub fn create(mount: &Path, parent: &str, id: &str) -> anyhow::Result<SandboxCgroup> {
        let parent = parent.trim_matches('/');
        if parent.is_empty()
            || parent
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            anyhow::bail!("--cgroup-parent {parent:?} must be a relative path without . or ..");
        }
        let parent_path = mount.join(parent);
        let created_parent = (!parent_path.exists()).then(|| parent_path.clone());
        let path = parent_path.join(id);
        // Another process may remove an empty parent between our two steps: retry.
        for attempt in 0.. {
            std::fs::create_dir_all(&parent_path)
                .with_context(|| format!("creating cgroup {}", parent_path.display()))?;
            match std::fs::create_dir(&path) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempt < 10 => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating cgroup {}", path.display()));
                }
            }
        }
        Ok(SandboxCgroup {
            path,
            relative: format!("{parent}/{id}"),
            created_parent,
        })
    }

    /// The cgroup `relative` (to the cgroup2 `mount`) a run made earlier, to remove it.
    pub fn existing(mount: &Path, relative: &str) -> anyhow::Result<SandboxCgroup> {
        let relative = relative.trim_matches('/');
        if relative.is_empty()
            || relative
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            anyhow::bail!("{relative:?} is not a relative cgroup path");
        }
        Ok(SandboxCgroup {
            path: mount.join(relative),
            relative: relative.to_owned(),
            created_parent: None,
        })
    }

    /// Whether any process is still in it.
    pub fn populated(&self) -> bool {
        match std::fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
            Err(_) => false,
        }
    }

    /// Kills whatever the command left running in the cgroup and waits (≤ 5 s) until it is empty.
    pub async fn kill_all(&self) {
        for _ in 0..100 {
            if !self.populated() {
                return;
            }
            if std::fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                let pids =
                    std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
                for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "veil-control run: cgroup {} still has processes after 5 s",
            self.path.display()
        );
    }

    /// Removes the (empty) directory, and the parent when this run created it.
    pub async fn remove(self) {
        let mut last = None;
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(e) = last {
            eprintln!(
                "veil-control run: removing cgroup {}: {e}",
                self.path.display()
            );
        }
        if let Some(parent) = self.created_parent {
            // Busy when other sandboxes live there: fine.
            let _ = std::fs::remove_dir(parent);
        }
    }
}
