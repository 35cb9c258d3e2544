//! The agent link server: a root-only Unix socket where veil-agents connect, say Hello, receive
//! a snapshot and then every change, and acknowledge each message.
//!
//! One writer per agent keeps its messages in order. Messages are built under one lock from the
//! store's current state (see [`super::plan`]), so every agent sees changes in commit order.
//! `notify` waits until every connected agent acknowledged its messages, or the timeout.
//!
//! One concern per module: [`socket`] (binding, accepting, the peer check), [`handshake`] (a
//! connection from Hello to close), [`snapshot`] (what a new agent receives), [`dispatch`] (a
//! change to every agent, and the wait), [`acks`] (what an acknowledgement confirms),
//! [`propagation`] (who holds which revision) and [`usage`] (reports → audit).

mod acks;
mod dispatch;
mod handshake;
mod propagation;
mod snapshot;
mod socket;
mod usage;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use veil_link::{AgentId, ControlMsg, IdError, SecretId};

pub use handshake::check_hello;
pub use socket::{CA_FILE, ServerError, trusted_peer};

use super::plan::{Change, Held};
use super::{AgentEvent, AgentLink, AgentLinkError, BuildError, LinkFuture, Propagation};
use crate::crypto::Keyring;
use crate::store::Store;
use acks::{Acked, Pending};
use usage::UsageJob;

/// A connected agent, as control remembers it.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    /// The agent's stable id.
    pub agent_id: AgentId,
    /// PID of the agent process (from the socket's peer credentials).
    pub pid: Option<i32>,
    /// Connection time, ms since the epoch.
    pub connected_since: i64,
}

#[derive(Debug)]
struct Agent {
    info: AgentInfo,
    tx: mpsc::UnboundedSender<ControlMsg>,
    held: Held,
    pending: HashMap<u64, Pending>,
}

#[derive(Debug, Default)]
struct LinkState {
    agents: BTreeMap<u64, Agent>,
    next_seq: u64,
    next_conn: u64,
    ca_pem: Option<String>,
    /// secret id → agent id → last acknowledged revision. In memory: kept across an agent's
    /// disconnection (it keeps enforcing what it had), rebuilt from snapshots after a restart.
    acks: HashMap<SecretId, BTreeMap<AgentId, Acked>>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    keyring: Arc<RwLock<Keyring>>,
    timeout: Duration,
    /// veil's own listeners, sent in every snapshot for the agents to refuse.
    guarded: Vec<SocketAddr>,
    ca_file: PathBuf,
    state: Mutex<LinkState>,
    /// Woken whenever acknowledgements or connections change (for [`AgentLink::wait_acked`]).
    acked: Notify,
    usage: mpsc::Sender<UsageJob>,
}

/// The agent link over a Unix socket.
#[derive(Clone, Debug)]
pub struct AgentServer {
    inner: Arc<Inner>,
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

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Every critical section leaves the state consistent before anything can panic.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ring(&self) -> Result<std::sync::RwLockReadGuard<'_, Keyring>, AgentLinkError> {
        self.inner
            .keyring
            .read()
            .map_err(|_| BuildError::KeyringPoisoned.into())
    }
}

/// A stored id that is not a valid link id: control validated it when it stored it, so this
/// is a corrupt record, reported like one.
fn stored_id(e: IdError) -> AgentLinkError {
    BuildError::StoredId(e).into()
}

impl AgentLink for AgentServer {
    fn notify(&self, event: AgentEvent) -> LinkFuture<'_> {
        Box::pin(async move {
            match &event {
                AgentEvent::SandboxUpserted(sb) => self.deliver(Change::Sandbox(&sb.id)).await,
                AgentEvent::SandboxRemoved { id } => self.deliver(Change::Sandbox(id)).await,
                AgentEvent::SecretChanged { id } => self.deliver(Change::Secret(id)).await,
            }
        })
    }

    fn connected(&self) -> bool {
        !self.lock().agents.is_empty()
    }

    fn ca_certificate(&self) -> Option<String> {
        self.lock().ca_pem.clone()
    }

    fn propagation(&self, id: &str) -> Propagation {
        self.propagation_of(id)
    }

    fn wait_acked(&self, id: &str, revision: u64, timeout: Duration) -> LinkFuture<'_> {
        self.wait_for_acks(id, revision, timeout)
    }
}
