//! The agent link server: a root-only Unix socket where veil-agents connect, say Hello, receive
//! a snapshot and then every change, and acknowledge each message.
//!
//! One writer per agent keeps its messages in order. Messages are built under one lock from the
//! store's current state (see [`super::plan`]), so every agent sees changes in commit order.
//! `notify` waits until every connected agent acknowledged its messages, or the timeout.
//!
//! One concern per module: [`state`] (the server, its agents and the data the others share),
//! [`socket`] (binding, accepting, the peer check), [`handshake`] (a
//! connection from Hello to close), [`snapshot`] (what a new agent receives), [`snapshot_cache`] (snapshots shared while nothing changed), [`dispatch`] (a
//! change to every agent, and the wait), [`acks`] (what an acknowledgement confirms),
//! [`propagation`] (who holds which revision) and [`usage`] (reports → audit).

mod acks;
mod dispatch;
mod handshake;
mod propagation;
mod shared;
mod snapshot;
mod snapshot_cache;
mod socket;
mod state;
mod usage;

use std::time::Duration;

pub use handshake::{Peer, check_hello};
pub use socket::{CA_FILE, ServerError, trusted_peer};
pub use state::{AgentInfo, AgentServer, PublishedAck};

use super::plan::Change;
use veil_link::{Revision, SecretId};

use super::{AgentEvent, AgentLink, BuildError, LinkFuture, Propagation};

impl AgentLink for AgentServer {
    fn notify(&self, event: AgentEvent) -> LinkFuture<'_> {
        Box::pin(async move {
            match &event {
                AgentEvent::SandboxUpserted(sb) => self.deliver(Change::Sandbox(&sb.id)).await,
                AgentEvent::SandboxRemoved { id } | AgentEvent::SandboxChanged { id } => {
                    self.deliver(Change::Sandbox(id)).await
                }
                AgentEvent::SecretChanged { id } => self.deliver(Change::Secret(id)).await,
            }
        })
    }

    fn resync(&self) -> LinkFuture<'_> {
        Box::pin(async move {
            let this = self.clone();
            let sent = tokio::task::spawn_blocking(move || this.resync())
                .await
                .map_err(|e| BuildError::Task(e.to_string()))??;
            tracing::info!(agents = sent, "agents resynchronised from the store");
            Ok(())
        })
    }

    fn connected(&self) -> bool {
        !self.lock().agents.is_empty()
    }

    fn ca_certificate(&self) -> Option<String> {
        self.lock().ca_pem.clone()
    }

    fn propagation(&self, id: &SecretId) -> Propagation {
        self.propagation_of(id)
    }

    fn wait_acked(&self, id: &SecretId, revision: Revision, timeout: Duration) -> LinkFuture<'_> {
        self.wait_for_acks(id, revision, timeout)
    }
}
