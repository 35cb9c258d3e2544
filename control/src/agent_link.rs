//! The seam to the agent(s): the API tells the link about changes and waits for the agents'
//! acknowledgements; the link answers with what sandboxes need (the CA to trust).
//!
//! [`server::AgentServer`] is the real link (a Unix socket speaking `veil-link`); [`NoAgent`]
//! accepts everything and knows no CA (library users and unit tests).

pub mod plan;
pub mod server;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::store::SandboxRecord;

/// A change the agents must learn about. The link reads the current state from the store when
/// it builds the messages, so agents always converge to the store.
#[derive(Clone, Debug)]
pub enum AgentEvent {
    /// A sandbox was registered, replaced, rolled back or its mounts changed.
    SandboxUpserted(SandboxRecord),
    /// A sandbox was removed.
    SandboxRemoved {
        /// Its id.
        id: String,
    },
    /// A secret's value, hosts, description or existence changed.
    SecretChanged {
        /// Its id.
        id: String,
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
    Internal(String),
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
