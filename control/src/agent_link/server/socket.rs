//! The socket agents connect to: its path prepared (a stale socket replaced, a live one or a
//! non-socket refused), bound root-only, its accept loop, the peer check, and the CA file the
//! last agent's Hello leaves in the data dir.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::state::{AgentServer, Inner, LinkState};
use super::usage::{USAGE_QUEUE, write_usage};
use crate::crypto::Keyring;
use crate::store::Store;

/// File in the data dir keeping the last CA certificate an agent reported.
pub const CA_FILE: &str = "agent-ca.pem";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A filesystem or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process listens on the socket.
    #[error("{0} is in use: is another veil-control running?")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ServerError + use<> {
    let path = path.to_owned();
    move |source| ServerError::Io { what, path, source }
}

/// Prepares `path` for binding: creates a missing parent (0700), removes a stale socket,
/// refuses a live one or a non-socket.
fn prepare_path(path: &Path) -> Result<(), ServerError> {
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
                return Err(ServerError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err("removing stale socket", path))
        }
        Ok(_) => Err(ServerError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

/// Whether a peer may speak for an agent: root, or the user control runs as.
pub fn trusted_peer(peer_uid: u32, own_euid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_euid
}

/// Writes the CA file atomically (public data: mode 0644).
pub(super) fn save_ca(path: &Path, pem: &str) -> io::Result<()> {
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, pem)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

impl AgentServer {
    /// Binds `socket` (mode 0600) and starts accepting agents; `data_dir` keeps the last CA.
    pub fn bind(
        socket: &Path,
        data_dir: &Path,
        timeout: Duration,
        store: Arc<dyn Store>,
        keyring: Arc<RwLock<Keyring>>,
        guarded: Vec<SocketAddr>,
    ) -> Result<(AgentServer, JoinHandle<()>), ServerError> {
        prepare_path(socket)?;
        let listener = UnixListener::bind(socket).map_err(io_err("binding", socket))?;
        // Peer credentials are checked too; the mode keeps other users from even connecting.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", socket))?;
        let ca_file = data_dir.join(CA_FILE);
        let ca_pem = std::fs::read_to_string(&ca_file).ok();
        let (usage, usage_rx) = mpsc::channel(USAGE_QUEUE);
        tokio::spawn(write_usage(store.clone(), usage_rx));
        let server = AgentServer {
            inner: Arc::new(Inner {
                store,
                keyring,
                timeout,
                guarded,
                ca_file,
                state: Mutex::new(LinkState {
                    ca_pem,
                    next_seq: 1,
                    ..LinkState::default()
                }),
                snapshots: Mutex::default(),
                acked: Notify::new(),
                changed: Notify::new(),
                remote: Mutex::default(),
                usage,
                binder: std::sync::OnceLock::new(),
            }),
        };
        let accept = server.clone();
        let task = tokio::spawn(async move { accept.accept_loop(listener).await });
        tracing::info!(socket = %socket.display(), "agent link listening");
        Ok((server, task))
    }

    async fn accept_loop(self, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let server = self.clone();
                    tokio::spawn(async move { server.serve_agent(stream).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an agent connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("agent.sock");
        prepare_path(&path).unwrap();
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(prepare_path(&path), Err(ServerError::InUse(_))));
        drop(live);
        prepare_path(&path).unwrap();
        assert!(!path.exists(), "stale socket removed");
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            prepare_path(&path),
            Err(ServerError::NotASocket(_))
        ));
    }
}
