//! Where `veil-control run` keeps host-wide state: the network set-up lock and the uid
//! records live in a root-only directory (a sandbox must not open, hold or forge them); the
//! per-run files a sandbox reads (its CA bundle) in a directory it may traverse but not list.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Root-only (0700) directory of host-wide `run` state.
pub const PRIVATE_DIR: &str = "/run/veil/run";
/// Parent (0711) of the per-run directories a sandbox reads its CA bundle from.
pub const SHARED_DIR: &str = "/run/veil-run";

/// A state directory that cannot be made safe.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A system call failed.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory (or its parent) belongs to someone else or is not a directory.
    #[error("{path}: {why}; remove it, or fix it to be a root-owned directory")]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Makes sure `path` is a directory owned by root with exactly `mode`, creating it (and missing
/// parents, 0700) when needed; its parent must be root's and writable by nobody else, or
/// someone could swap it.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<(), StateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))?;
    if let Some(parent) = path.parent() {
        let meta = std::fs::symlink_metadata(parent).map_err(io(parent))?;
        if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Err(StateError::Unsafe {
                path: parent.to_owned(),
                why: "not a root-owned directory writable only by root".into(),
            });
        }
    }
    let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
    if !meta.is_dir() || meta.uid() != 0 {
        return Err(StateError::Unsafe {
            path: path.to_owned(),
            why: "not a directory owned by root".into(),
        });
    }
    if meta.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))?;
    }
    Ok(())
}

/// Subdirectory of [`PRIVATE_DIR`] holding the uid records.
pub(crate) const UID_RECORDS: &str = "uids";

/// [`PRIVATE_DIR`], made safe; with `sub`, that subdirectory of it (also 0700).
pub fn private_dir(sub: Option<&str>) -> Result<PathBuf, StateError> {
    let dir = Path::new(PRIVATE_DIR);
    ensure_dir(dir, 0o700)?;
    match sub {
        None => Ok(dir.to_owned()),
        Some(sub) => {
            let path = dir.join(sub);
            ensure_dir(&path, 0o700)?;
            Ok(path)
        }
    }
}

/// A run's own directory under [`SHARED_DIR`] (root's, 0711: the sandbox reads the files
/// in it by name); removed with everything in it on drop.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `SHARED_DIR/<id>` (which must not exist).
    pub fn create(id: &str) -> Result<RunDir, StateError> {
        let parent = Path::new(SHARED_DIR);
        ensure_dir(parent, 0o711)?;
        let path = parent.join(id);
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&path)
            .map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o711))
            .map_err(io(&path))?;
        Ok(RunDir { path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("veil-control run: removing {}: {e}", self.path.display());
        }
    }
}
