//! Where a daemon's root-only Unix socket goes: control's agent socket and the agent's local
//! binding socket share one rule for their path.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// Why a socket path could not be prepared.
#[derive(Debug)]
pub enum SocketPathError {
    /// A filesystem operation failed.
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process listens on the socket.
    InUse(PathBuf),
    /// The path exists and is not a socket.
    NotASocket(PathBuf),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SocketPathError + use<> {
    let path = path.to_owned();
    move |source| SocketPathError::Io { what, path, source }
}

/// Prepares `path` for binding: creates a missing parent (0700), removes a stale socket,
/// refuses a live one or a non-socket.
pub fn prepare_socket_path(path: &Path) -> Result<(), SocketPathError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err("creating", parent))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketPathError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err("removing stale socket", path))
        }
        Ok(_) => Err(SocketPathError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

/// Binds a Unix socket at `path` (prepared as [`prepare_socket_path`] does) that is never
/// visible there with another mode than `mode`: it is bound under a temporary name beside
/// `path`, given `mode`, then renamed into place (a connect by path never races the chmod).
/// The listener is non-blocking, ready for an async runtime.
pub fn bind_socket(
    path: &Path,
    mode: u32,
) -> Result<std::os::unix::net::UnixListener, SocketPathError> {
    use std::os::unix::fs::PermissionsExt;
    prepare_socket_path(path)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(io_err("binding", &tmp))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", &tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err("renaming into place", path)))
        .and_then(|()| {
            listener
                .set_nonblocking(true)
                .map_err(io_err("binding", path))
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused() {
        let dir = std::env::temp_dir().join(format!("veil-sys-socket-{}", std::process::id()));
        let path = dir.join("sub").join("agent.sock");
        prepare_socket_path(&path).unwrap();
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(
            prepare_socket_path(&path),
            Err(SocketPathError::InUse(_))
        ));
        drop(live);
        prepare_socket_path(&path).unwrap();
        assert!(!path.exists(), "stale socket removed");
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            prepare_socket_path(&path),
            Err(SocketPathError::NotASocket(_))
        ));
        std::fs::remove_file(&path).unwrap();
        let listener = bind_socket(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(matches!(
            bind_socket(&path, 0o600),
            Err(SocketPathError::InUse(_))
        ));
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
