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

/// The agent's netns pins: one file per bound sandbox under `dir`.
#[derive(Clone, Debug)]
pub struct NetnsPins {
    dir: PathBuf,
    /// Sandboxes whose bind is in flight: their pins are not stale yet.
    binding: Arc<Mutex<HashSet<String>>>,
}

impl NetnsPins {
    /// Pins under `dir` (created 0700 on first use).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            binding: Arc::default(),
        }
    }

    /// Where `sandbox`'s pin lives.
    pub fn path(&self, sandbox: &str) -> PathBuf {
        self.dir.join(sandbox)
    }

    /// Pins the namespace `source` for `sandbox` (replacing a stale pin); returns the pin.
    pub fn pin(&self, sandbox: &str, source: &Path) -> Result<PathBuf, PinError> {
        check_namespace(source)?;
        let pin = self.path(sandbox);
        let err = |source| PinError::Pin {
            path: pin.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(err)?;
        self.release(sandbox);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&pin)
            .map_err(err)?;
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
        Ok(pin)
    }

    /// Unmounts and removes `sandbox`'s pin, if any.
    pub fn release(&self, sandbox: &str) {
        let pin = self.path(sandbox);
        if !pin.exists() {
            return;
        }
        // Not mounted (EINVAL) is fine: a pin left half-made by a crash is just a file.
        if let Err(e) = umount2(&pin, MntFlags::MNT_DETACH)
            && e != nix::errno::Errno::EINVAL
        {
            warn!(sandbox, error = %e, "unmounting a netns pin");
        }
        if let Err(e) = std::fs::remove_file(&pin)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(sandbox, error = %e, "removing a netns pin");
        }
    }

    /// Marks a bind of `sandbox` in flight (its pin is kept by [`Self::keep_only`]) until the
    /// returned guard drops.
    pub fn binding(&self, sandbox: &str) -> BindingGuard {
        self.lock().insert(sandbox.to_owned());
        BindingGuard {
            pins: self.clone(),
            sandbox: sandbox.to_owned(),
        }
    }

    /// Releases every pin whose sandbox is neither in `live` nor being bound.
    pub fn keep_only(&self, live: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let binding = self.lock().clone();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) && !binding.contains(&name) {
                self.release(&name);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.binding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A bind in flight; see [`NetnsPins::binding`].
#[derive(Debug)]
pub struct BindingGuard {
    pins: NetnsPins,
    sandbox: String,
}

impl Drop for BindingGuard {
    fn drop(&mut self) {
        self.pins.lock().remove(&self.sandbox);
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
