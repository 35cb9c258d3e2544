//! The way between the local binding socket ([`crate::local`]) and the control link
//! ([`crate::link`]): the requests the socket forwards, their answers, and whether the link is
//! in sync (no request is sent while it is not).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::{mpsc, oneshot};
use veil_link::{LocalResponse, SandboxId};

/// Requests waiting for the link at once; more are refused as unavailable.
const QUEUE: usize = 64;

/// What the link sends control for a local request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Describe a declared sandbox.
    Describe {
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// Bind it (paths checked, netns pinned).
    Bind {
        /// The sandbox.
        sandbox: SandboxId,
        /// cgroup relative to the cgroup2 mount.
        cgroup: PathBuf,
        /// Its id (inode) now.
        cgroup_id: u64,
        /// The pin of its netns.
        netns: Option<PathBuf>,
    },
    /// Unbind it.
    Unbind {
        /// The sandbox.
        sandbox: SandboxId,
    },
}

/// A request for the link and where its answer goes.
#[derive(Debug)]
pub struct Pending {
    /// The request.
    pub ask: Ask,
    /// Its answer (dropped = control unavailable).
    pub answer: oneshot::Sender<LocalResponse>,
}

/// The local server's way to control: requests go through the link session, which answers
/// them from control's replies.
#[derive(Debug, Clone)]
pub struct ToControl {
    /// Requests for the link.
    pub tx: mpsc::Sender<Pending>,
    /// Whether the link is in sync with control now.
    pub synced: Arc<AtomicBool>,
}

/// The link's end of [`ToControl`].
#[derive(Debug)]
pub struct FromLocal {
    /// Requests from the local socket.
    pub rx: mpsc::Receiver<Pending>,
    /// Set by the link while it is in sync.
    pub synced: Arc<AtomicBool>,
}

/// A connected pair.
pub fn channel() -> (ToControl, FromLocal) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let synced = Arc::new(AtomicBool::new(false));
    (
        ToControl {
            tx,
            synced: synced.clone(),
        },
        FromLocal { rx, synced },
    )
}
