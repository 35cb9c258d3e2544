//! Pins of bound sandboxes' network namespaces: `/proc/PID/ns/net` dies with its process and
//! a PID can be reused, so at bind time the agent bind-mounts the namespace onto a file of its
//! own (`<dir>/<sandbox>`, as `ip netns add` does) and hands control THAT path. The pin is
//! unmounted and removed when the sandbox is unbound, deleted or reaped.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::statfs::{NSFS_MAGIC, statfs};
use tracing::warn;

/// Why a namespace could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The path names no network namespace file.
    #[error("netns {0} is not a namespace file (nsfs)")]
    NotANamespace(PathBuf),
    /// The path cannot be read.
    #[error("netns {path}: {source}")]
    Unreadable {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A pin for this sandbox and cgroup exists: that binding is live (or being cleaned up).
    #[error("sandbox is already bound to this cgroup on this host (pin {0} exists)")]
    Busy(PathBuf),
    /// The pin could not be made.
    #[error("pinning netns at {path}: {source}")]
    Pin {
        /// The pin's path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// Checks that `path` is a namespace file (nsfs): a regular file, a directory or anything a
/// sandbox could create is refused.
pub fn check_namespace(path: &Path) -> Result<(), PinError> {
    if !path.is_absolute() {
        return Err(PinError::NotANamespace(path.to_owned()));
    }
    let fs = statfs(path).map_err(|e| PinError::Unreadable {
        path: path.to_owned(),
        source: e.into(),
    })?;
    if fs.filesystem_type() != NSFS_MAGIC {
        return Err(PinError::NotANamespace(path.to_owned()));
    }
    Ok(())
}

/// The agent's netns pins: `<dir>/<sandbox>/<cgroup id>`, one per binding, so a refused or
/// concurrent bind never touches the pin of a binding that is live.
#[derive(Clone, Debug)]
pub struct NetnsPins {
    dir: PathBuf,
    /// Pins of binds in flight: not stale yet.
    binding: Arc<Mutex<HashSet<PathBuf>>>,
}

impl NetnsPins {
    /// Pins under `dir` (created 0700 on first use).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            binding: Arc::default(),
        }
    }

    /// Where the pin of `sandbox` bound to cgroup `cgroup_id` lives.
    pub fn path(&self, sandbox: &str, cgroup_id: u64) -> PathBuf {
        self.dir.join(sandbox).join(cgroup_id.to_string())
    }

    /// Pins the namespace `source` for `sandbox` on cgroup `cgroup_id`; returns the pin and a
    /// guard marking the bind in flight. A pin that exists belongs to a live binding (or one
    /// not yet cleaned up): refused as [`PinError::Busy`], and left alone.
    pub fn pin(
        &self,
        sandbox: &str,
        cgroup_id: u64,
        source: &Path,
    ) -> Result<(PathBuf, BindingGuard), PinError> {
        check_namespace(source)?;
        let pin = self.path(sandbox, cgroup_id);
        let err = |source| PinError::Pin {
            path: pin.clone(),
            source,
        };
        let parent = pin.parent().unwrap_or(&self.dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(err)?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&pin)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(PinError::Busy(pin));
            }
            Err(e) => return Err(err(e)),
        }
        let guard = self.binding(&pin);
        if let Err(e) = mount(
            Some(source),
            &pin,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            let _ = std::fs::remove_file(&pin);
            return Err(err(e.into()));
        }
        Ok((pin, guard))
    }

    /// Unmounts and removes the pin at `pin`, and its sandbox's directory once empty.
    pub fn release(&self, pin: &Path) {
        if !pin.starts_with(&self.dir) || !pin.exists() {
            return;
        }
        // Not mounted (EINVAL) is fine: a pin left half-made by a crash is just a file.
        if let Err(e) = umount2(pin, MntFlags::MNT_DETACH)
            && e != nix::errno::Errno::EINVAL
        {
            warn!(pin = %pin.display(), error = %e, "unmounting a netns pin");
        }
        if let Err(e) = std::fs::remove_file(pin)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(pin = %pin.display(), error = %e, "removing a netns pin");
        }
        if let Some(parent) = pin.parent() {
            // Fails while another pin of the sandbox exists: fine.
            let _ = std::fs::remove_dir(parent);
        }
    }

    /// Releases the pins of `sandbox` except `keep` (its current binding's) and those of binds
    /// in flight.
    pub fn release_sandbox(&self, sandbox: &str, keep: Option<&Path>) {
        let Ok(entries) = std::fs::read_dir(self.dir.join(sandbox)) else {
            return;
        };
        let binding = self.lock().clone();
        for entry in entries.flatten() {
            let pin = entry.path();
            if Some(pin.as_path()) != keep && !binding.contains(&pin) {
                self.release(&pin);
            }
        }
    }

    /// Releases every pin that is neither in `live` nor of a bind in flight.
    pub fn keep_only(&self, live: &HashSet<PathBuf>) {
        let Ok(sandboxes) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let binding = self.lock().clone();
        for dir in sandboxes.flatten() {
            let Ok(pins) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for entry in pins.flatten() {
                let pin = entry.path();
                if !live.contains(&pin) && !binding.contains(&pin) {
                    self.release(&pin);
                }
            }
        }
    }

    fn binding(&self, pin: &Path) -> BindingGuard {
        self.lock().insert(pin.to_owned());
        BindingGuard {
            pins: self.clone(),
            pin: pin.to_owned(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        self.binding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A bind in flight: its pin is not released as stale until this drops.
#[derive(Debug)]
pub struct BindingGuard {
    pins: NetnsPins,
    pin: PathBuf,
}

impl Drop for BindingGuard {
    fn drop(&mut self) {
        self.pins.lock().remove(&self.pin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespace_files_pass() {
        check_namespace(Path::new("/proc/self/ns/net")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("net");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            check_namespace(&file),
            Err(PinError::NotANamespace(_))
        ));
        assert!(check_namespace(dir.path()).is_err());
        assert!(check_namespace(Path::new("proc/self/ns/net")).is_err());
        assert!(matches!(
            check_namespace(&dir.path().join("missing")),
            Err(PinError::Unreadable { .. })
        ));
    }
}
