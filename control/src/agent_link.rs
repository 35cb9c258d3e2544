//! The seam to the agent(s): the API tells the link about changes; the link answers with what
//! sandboxes need (the CA to trust). For now no agent is linked and every call succeeds.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::store::SandboxRecord;

/// A change the agents must learn about.
#[derive(Clone, Debug)]
pub enum AgentEvent {
    /// A sandbox was registered or its mounts changed.
    SandboxUpserted(SandboxRecord),
    /// A sandbox was removed.
    SandboxRemoved {
        /// Its id.
        id: String,
    },
    /// A secret's value, hosts or existence changed.
    SecretChanged {
        /// Its id.
        id: String,
    },
}

/// Why an agent could not take a change.
#[derive(Debug, thiserror::Error)]
pub enum AgentLinkError {
    /// No agent is connected.
    #[error("no agent is connected")]
    NotConnected,
    /// The agent did not acknowledge in time.
    #[error("agent did not acknowledge: {0}")]
    NoAck(String),
}

/// A boxed future returned by [`AgentLink`] methods.
pub type LinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AgentLinkError>> + Send + 'a>>;

/// The interface the API uses to reach agents.
pub trait AgentLink: Send + Sync + fmt::Debug {
    /// Delivers a change; resolves when the agents acknowledged it.
    fn notify(&self, event: AgentEvent) -> LinkFuture<'_>;
    /// Whether at least one agent is connected.
    fn connected(&self) -> bool;
    /// PEM of the interception CA that sandboxes must trust, once an agent reported it.
    fn ca_certificate(&self) -> Option<String>;
}

/// The link used until the agent channel exists: accepts everything, knows no CA.
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
