//! The link's state and the plain data its concerns share: the server, its connected agents,
//! the acknowledgements waited for and the usage jobs queued for the store. The behaviour lives
//! in the sibling modules, which add `impl` blocks to [`AgentServer`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use veil_link::{AgentId, ControlMsg, Revision, SecretId};

use crate::agent_link::plan::Held;
use crate::agent_link::{AgentLinkError, Binder, BuildError};
use crate::crypto::Keyring;
use crate::store::{Store, UsageDelta};

/// A connected agent, as control remembers it.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    /// The agent's stable id.
    pub agent_id: AgentId,
    /// PID of the agent process (from the socket's peer credentials).
    pub pid: Option<i32>,
    /// The fleet host it is connected as (mutual TLS); `None` on the local socket.
    pub host: Option<String>,
    /// Connection time, ms since the epoch.
    pub connected_since: i64,
}

#[derive(Debug)]
pub(super) struct Agent {
    pub(super) info: AgentInfo,
    pub(super) tx: mpsc::UnboundedSender<ControlMsg>,
    pub(super) held: Held,
    pub(super) pending: HashMap<u64, Pending>,
}

#[derive(Debug, Default)]
pub(super) struct LinkState {
    pub(super) agents: BTreeMap<u64, Agent>,
    pub(super) next_seq: u64,
    pub(super) next_conn: u64,
    pub(super) ca_pem: Option<String>,
    /// secret id → agent id → last acknowledged revision. In memory: kept across an agent's
    /// disconnection (it keeps enforcing what it had), rebuilt from snapshots after a restart.
    pub(super) acks: HashMap<SecretId, BTreeMap<AgentId, Acked>>,
    /// Bumped by every dispatch and resync before it reads the store: a shared snapshot built
    /// at another generation may miss a change (see [`super::snapshot_cache`]).
    pub(super) generation: u64,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) store: Arc<dyn Store>,
    pub(super) keyring: Arc<RwLock<Keyring>>,
    pub(super) timeout: Duration,
    /// veil's own listeners, sent in every snapshot for the agents to refuse.
    pub(super) guarded: Vec<SocketAddr>,
    pub(super) ca_file: PathBuf,
    pub(super) state: Mutex<LinkState>,
    /// Snapshots shared by the agents admitted at one generation; locked before `state`,
    /// never while holding it.
    pub(super) snapshots: Mutex<super::snapshot_cache::SnapshotCache>,
    /// Woken whenever acknowledgements or connections change (for [`AgentLink::wait_acked`]).
    pub(super) acked: Notify,
    /// Woken when this replica's acknowledgements or agents change (to publish them).
    pub(super) changed: Notify,
    /// What other replicas published (shared store only).
    pub(super) remote: Mutex<Remote>,
    pub(super) usage: mpsc::Sender<UsageJob>,
    /// Decides agents' bind requests; set once the API state exists.
    pub(super) binder: OnceLock<Arc<dyn Binder>>,
}

/// The agent link over a Unix socket.
#[derive(Clone, Debug)]
pub struct AgentServer {
    pub(super) inner: Arc<Inner>,
}

impl AgentServer {
    /// The agents connected now.
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.lock()
            .agents
            .values()
            .map(|a| a.info.clone())
            .collect()
    }

    /// Installs what decides agents' bind requests (once; later calls are ignored). Until
    /// then requests are answered `unavailable`.
    pub fn set_binder(&self, binder: Arc<dyn Binder>) {
        let _ = self.inner.binder.set(binder);
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Every critical section leaves the state consistent before anything can panic.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn ring(&self) -> Result<std::sync::RwLockReadGuard<'_, Keyring>, AgentLinkError> {
        self.inner
            .keyring
            .read()
            .map_err(|_| BuildError::KeyringPoisoned.into())
    }
}

/// An acknowledgement being waited for.
#[derive(Debug)]
pub(super) struct Pending {
    /// Resolved with the agent's errors (empty = applied); `None` when nobody waits (snapshots).
    pub(super) done: Option<oneshot::Sender<Vec<String>>>,
    /// The secret a PutSecret carried: forgotten on failure so it is sent again next time.
    pub(super) secret: Option<SecretId>,
    /// What the acknowledgement says about the agent's secrets.
    pub(super) holds: Holds,
}

/// The secret revisions a message's acknowledgement confirms: control derives them from the
/// sequence number it sent rather than trusting a list from the agent.
#[derive(Debug)]
pub(super) enum Holds {
    /// Nothing about secrets.
    Unchanged,
    /// The agent now holds exactly these (id, revision): a snapshot replaces everything.
    Exactly(Vec<(SecretId, Revision)>),
    /// The agent holds this revision of this secret (only when applied without errors).
    Put(SecretId, Revision),
    /// The agent dropped this secret.
    Dropped(SecretId),
}

/// An acknowledged revision and when it arrived (ms since the epoch).
pub(super) type Acked = (Revision, i64);

/// Agent reports on their way to the store.
#[derive(Debug)]
pub(super) struct UsageJob {
    pub(super) agent_id: AgentId,
    pub(super) kind: ReportKind,
    pub(super) deltas: Vec<UsageDelta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReportKind {
    /// Aggregated counts: one `secret.used` audit entry per (secret, sandbox, host) and report.
    Usage,
    /// One `secret.blocked` audit entry per refused request.
    Blocked,
}

/// What the other replicas published, by replica id, with whether each is alive.
#[derive(Debug, Default)]
pub(super) struct Remote {
    pub(super) replicas: HashMap<String, (bool, Vec<PublishedAck>)>,
}

/// One agent's hold of one secret, as a replica publishes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedAck {
    /// The secret.
    pub secret_id: SecretId,
    /// The agent.
    pub agent_id: AgentId,
    /// The revision it acknowledged; `None` = sent, not acknowledged yet.
    pub revision: Option<Revision>,
    /// When the acknowledgement arrived, ms since the epoch.
    pub at: Option<i64>,
    /// Whether the agent is connected to the publishing replica.
    pub connected: bool,
}
