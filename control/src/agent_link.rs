//! The seam to the agent(s): the API tells the link about changes and waits for the agents'
//! acknowledgements; the link answers with what sandboxes need (the CA to trust).
//!
//! [`server::AgentServer`] is the real link (a Unix socket speaking `veil-link`); [`NoAgent`]
//! accepts everything and knows no CA (library users and unit tests).

pub mod plan;
pub mod server;
pub mod unseal;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use veil_link::{AgentId, LocalResponse, Revision, SandboxId, SecretId};

use crate::bind_rules::Requester;
use crate::crypto::CryptoError;
use crate::store::{SandboxRecord, StoreError};

/// A change the agents must learn about. The link reads the current state from the store when
/// it builds the messages, so agents always converge to the store.
#[derive(Clone, Debug)]
pub enum AgentEvent {
    /// A sandbox was registered, replaced, rolled back or its mounts changed.
    SandboxUpserted(SandboxRecord),
    /// A sandbox changed in some way another replica announced (registered, changed or
    /// removed: the agents get what the store holds now).
    SandboxChanged {
        /// Its id.
        id: SandboxId,
    },
    /// A sandbox was removed.
    SandboxRemoved {
        /// Its id.
        id: SandboxId,
    },
    /// A secret's value, hosts, description or existence changed.
    SecretChanged {
        /// Its id.
        id: SecretId,
    },
}

/// Why the agents did not take a change.
#[derive(Debug, thiserror::Error)]
pub enum AgentLinkError {
    /// No agent is connected.
    #[error("no veil-agent is connected")]
    NotConnected,
    /// No agent acknowledged in time (or every one disconnected first).
    #[error("{0}")]
    NoAck(String),
    /// An agent applied the change and reported failures (messages never hold values).
    #[error("veil-agent reported: {}", .0.join("; "))]
    Rejected(Vec<String>),
    /// The messages could not be built (store or decryption failure).
    #[error("building agent messages: {0}")]
    Internal(#[from] BuildError),
}

/// Why the messages for the agents could not be built; names secrets and revisions, never a
/// value.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The registry could not be read.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A thread panicked while holding the keyring.
    #[error("keyring poisoned")]
    KeyringPoisoned,
    /// A sealed value did not open.
    #[error("secret {id} revision {revision}: {source}")]
    Unseal {
        /// The secret.
        id: SecretId,
        /// The revision the value was sealed under.
        revision: Revision,
        /// Why.
        source: CryptoError,
    },
    /// A value opened but is not text.
    #[error("secret {id} revision {revision}: value is not UTF-8")]
    NotUtf8 {
        /// The secret.
        id: SecretId,
        /// The revision the value was sealed under.
        revision: Revision,
    },
    /// No value of a deleted secret opens.
    #[error("deleted secret {0}: no value opens")]
    NoRetiredValue(SecretId),
    /// The blocking task that read the store did not finish (it panicked or was cancelled).
    #[error("store task: {0}")]
    Task(String),
    /// A record disappeared while the messages were being built under the lock.
    #[error("{kind} {id} vanished")]
    Vanished {
        /// "secret" or "sandbox".
        kind: &'static str,
        /// Its id.
        id: String,
    },
}

/// What an agent asks about a sandbox on behalf of a host-side tool (its local socket), or
/// reports about one it enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentRequest {
    /// What a declared sandbox is given.
    Describe {
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// Bind a declared sandbox to a cgroup (and netns) of the agent's host.
    Bind {
        /// The sandbox.
        sandbox: SandboxId,
        /// cgroup v2 path relative to the cgroup2 mount, as the agent sent it.
        cgroup: String,
        /// The cgroup directory's id (inode) when the agent checked it.
        cgroup_id: u64,
        /// The agent's pin of the network namespace; `None` = the host's.
        netns: Option<String>,
    },
    /// Unbind a sandbox.
    Unbind {
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// A bound sandbox's cgroup (of this id) is gone or was replaced.
    Gone {
        /// The sandbox.
        sandbox: SandboxId,
        /// The id of the cgroup the agent enforced it on.
        cgroup_id: u64,
    },
}

/// A boxed future of a [`Binder`]'s answer.
pub type BinderFuture<'a> = Pin<Box<dyn Future<Output = LocalResponse> + Send + 'a>>;

/// Decides agents' requests about sandboxes (declare/bind): the agent's authenticated link is
/// the authority, no API key is involved.
pub trait Binder: Send + Sync + fmt::Debug {
    /// Handles `request` from agent `agent`; the answer goes back to it as a `Reply` (a
    /// [`AgentRequest::Gone`]'s answer is dropped).
    fn handle(&self, agent: Requester, request: AgentRequest) -> BinderFuture<'_>;
}

/// A boxed future returned by [`AgentLink`] methods.
pub type LinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AgentLinkError>> + Send + 'a>>;

/// The interface the API uses to reach agents.
pub trait AgentLink: Send + Sync + fmt::Debug {
    /// Delivers a change; resolves when every connected agent acknowledged it.
    fn notify(&self, event: AgentEvent) -> LinkFuture<'_>;
    /// Whether at least one agent is connected.
    fn connected(&self) -> bool;
    /// PEM of the interception CA that sandboxes must trust, once an agent reported it.
    fn ca_certificate(&self) -> Option<String>;
    /// Sends every connected agent a fresh snapshot of the store (after changes may have been
    /// missed); resolves once queued.
    fn resync(&self) -> LinkFuture<'_> {
        Box::pin(async { Ok(()) })
    }
    /// Which agents acknowledged which revision of secret `id`.
    fn propagation(&self, _id: &SecretId) -> Propagation {
        Propagation::default()
    }
    /// Resolves once no agent may still use a revision of secret `id` older than `revision`
    /// (see [`Propagation::pending`]); `NoAck` naming the pending agents after `timeout`.
    fn wait_acked(
        &self,
        _id: &SecretId,
        _revision: Revision,
        _timeout: Duration,
    ) -> LinkFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// One agent's acknowledgement of one secret, as control remembers it (in memory: after a
/// control restart every agent re-acknowledges through its snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretAck {
    /// The agent's stable id.
    pub agent_id: AgentId,
    /// Whether the agent is connected now (a disconnected one keeps enforcing what it had).
    pub connected: bool,
    /// The revision it acknowledged last; `None` = sent, not acknowledged yet.
    pub revision: Option<Revision>,
    /// When control received that acknowledgement, ms since the epoch.
    pub at: Option<i64>,
}

/// Where a secret stands with the agents that hold (or held) it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Propagation {
    /// Every agent that holds the secret, was sent it, or held it when it disconnected; by id.
    pub agents: Vec<SecretAck>,
}

impl Propagation {
    /// Agents that may still use something older than `revision`.
    pub fn pending(&self, revision: impl Into<Revision>) -> Vec<&AgentId> {
        let revision = revision.into();
        self.agents
            .iter()
            .filter(|a| a.revision.is_none_or(|r| r < revision))
            .map(|a| &a.agent_id)
            .collect()
    }
}

/// A link without agents: accepts everything, knows no CA.
#[derive(Debug, Default)]
pub struct NoAgent;

impl AgentLink for NoAgent {
    fn notify(&self, _event: AgentEvent) -> LinkFuture<'_> {
        Box::pin(async { Ok(()) })
    }

    fn connected(&self) -> bool {
        false
    }

    fn ca_certificate(&self) -> Option<String> {
        None
    }
}
