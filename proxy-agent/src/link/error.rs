//! Why a session with control ended.

use std::io;
use std::path::PathBuf;

use veil_link::FrameError;

/// Why a session with control ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket could not be reached.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The process behind the socket is neither root nor the agent's own user.
    #[error("control socket peer has uid {0}: only root or the agent's own user is trusted")]
    UntrustedPeer(u32),
    /// The TLS handshake with a replica failed (its certificate did not verify against
    /// `control_ca`, or it refused this host's).
    #[error("TLS with {url}: {source}")]
    Tls {
        /// The replica.
        url: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
}
