//! The socket agents connect to: its path prepared (a stale socket replaced, a live one or a
//! non-socket refused), bound root-only, its accept loop, the peer check, and the CA file the
//! last agent's Hello leaves in the data dir.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use veil_sys::SocketPathError;

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

/// Binds the socket at `path`, never visible there with another mode than 0600 (see
/// [`veil_sys::bind_socket`]).
fn bind_private(path: &Path) -> Result<UnixListener, ServerError> {
    let listener = veil_sys::bind_socket(path, 0o600).map_err(|e| match e {
        SocketPathError::Io { what, path, source } => ServerError::Io { what, path, source },
        SocketPathError::InUse(p) => ServerError::InUse(p),
        SocketPathError::NotASocket(p) => ServerError::NotASocket(p),
    })?;
    UnixListener::from_std(listener).map_err(io_err("binding", path))
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
        // Peer credentials are checked too; the mode keeps other users from even connecting.
        let listener = bind_private(socket)?;
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
