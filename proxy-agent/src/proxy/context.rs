//! What the connection path shares: the agent-wide [`Proxy`] and each sandbox's
//! [`SandboxTag`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use veil_link::Egress;

use crate::config::{RequestLimits, SandboxId, SandboxSpec};
use crate::dialer::SocketPlace;
use crate::proxy::identify::OriginTable;
use crate::proxy::upstream::SandboxUpstream;
use crate::secrets::SecretStore;
use crate::stats::Stats;
use crate::tls::server::{SandboxServers, TlsContext};

/// What every connection task shares.
#[derive(Debug)]
pub struct Proxy {
    /// Original destinations recorded by the kernel (the eBPF map; a model in tests).
    pub orig: Arc<dyn OriginTable + Send + Sync>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Connection tasks, waited for when draining.
    pub tracker: TaskTracker,
    /// Timeout for reaching the original destination (and for TLS handshakes).
    pub connect_timeout: Duration,
    /// How long the peek waits for a complete ClientHello.
    pub peek_timeout: Duration,
    /// Whether responses are scrubbed (see [`crate::config::AgentSettings::scrub_responses`]).
    pub scrub_responses: bool,
    /// Secrets, mounts and each sandbox's policy, as control sent them.
    pub secrets: SecretStore,
    /// Interception TLS material.
    pub tls: Arc<TlsContext>,
    /// Request modes and limits (see [`crate::config::AgentSettings::request_limits`]).
    pub limits: RequestLimits,
}

/// The sandbox a listener belongs to.
#[derive(Debug)]
pub struct SandboxTag {
    /// Its id.
    pub id: SandboxId,
    /// Inode id of its cgroup v2 directory (what the kernel records a connection under).
    pub cgroup_id: u64,
    /// Its network namespace file; `None` = the agent's own.
    pub netns: Option<PathBuf>,
    /// Where its upstream connections leave from.
    pub egress: Egress,
    /// Cookie of its network namespace (half of the original-destination key).
    pub netns_cookie: u64,
    /// Its upstream connection pools.
    pub upstream: SandboxUpstream,
    /// Its client-facing TLS configs (its own session cache).
    pub tls: SandboxServers,
    /// Its share of connections: one permit per open connection.
    connections: Arc<Semaphore>,
}

impl SandboxTag {
    /// The tag of sandbox `spec`, with empty pools whose sockets are opened where its egress
    /// says.
    pub fn new(spec: &SandboxSpec, cgroup_id: u64, netns_cookie: u64, proxy: &Proxy) -> Self {
        let place = SocketPlace {
            netns: spec.netns.clone(),
            egress: spec.egress,
        };
        let upstream =
            SandboxUpstream::new(proxy.tls.upstream.clone(), proxy.connect_timeout, &place);
        Self::with_upstream(spec, cgroup_id, netns_cookie, proxy, upstream)
    }

    /// The tag of sandbox `spec` over the pools `upstream` (whose connector may be anything:
    /// tests open sockets in-process).
    pub fn with_upstream(
        spec: &SandboxSpec,
        cgroup_id: u64,
        netns_cookie: u64,
        proxy: &Proxy,
        upstream: SandboxUpstream,
    ) -> Self {
        Self {
            id: spec.id.clone(),
            cgroup_id,
            netns: spec.netns.clone(),
            egress: spec.egress,
            netns_cookie,
            upstream,
            tls: proxy.tls.for_sandbox(),
            connections: Arc::new(Semaphore::new(proxy.limits.max_connections_per_sandbox)),
        }
    }

    /// A permit for one more open connection; `None` when the sandbox has its share open.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }
}
