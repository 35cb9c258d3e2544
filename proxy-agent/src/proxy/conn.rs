//! What every request of one intercepted connection shares.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::task::TaskTracker;
use veil_policy::ServerName;

use crate::config::{RequestLimits, SandboxId};
use crate::proxy::idle::Activity;
use crate::proxy::upstream::DstClient;
use crate::secrets::SecretStore;
use crate::stats::Stats;

/// What every request of one intercepted connection shares.
#[derive(Debug)]
pub struct ConnContext {
    /// The sandbox.
    pub sandbox: SandboxId,
    /// The live secrets and policies. Each request reads its sandbox's policy once, when it
    /// arrives, and uses that one snapshot to substitute and to scrub its response: a rotation,
    /// mount or delete acknowledged to control applies to open keep-alive and h2 connections.
    pub secrets: SecretStore,
    /// Request modes and limits from the agent's config.
    pub limits: RequestLimits,
    /// The connection's activity, for its idle timeout.
    pub activity: Arc<Activity>,
    /// The SNI the client sent (and the name upstream TLS is verified for).
    pub sni: ServerName,
    /// The original destination.
    pub dst: SocketAddr,
    /// The sandbox's pooled client towards `dst`.
    pub client: DstClient,
    /// Set when the upstream could not be reached securely: every request gets a 502 saying so.
    pub upstream_error: Option<String>,
    /// Whether responses are scrubbed.
    pub scrub: bool,
    /// Counters.
    pub stats: Arc<Stats>,
    /// WebSockets relayed after an upgrade on this connection, waited for before it ends.
    pub upgraded: TaskTracker,
}
