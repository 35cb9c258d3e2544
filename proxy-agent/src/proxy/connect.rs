//! Connect: the agent's own connections to a sandbox connection's original destination, opened
//! by the sandbox's connector, where its `egress` says (see [`crate::dialer`]).

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;

use crate::dialer::DialError;
use crate::proxy::context::{Proxy, SandboxTag};
use crate::stats::Stats;

/// Connects to `dst` for `sandbox`; `None` (counted, logged) when it cannot be reached in time
/// or its egress rules refuse it.
pub async fn upstream(proxy: &Proxy, sandbox: &SandboxTag, dst: SocketAddr) -> Option<TcpStream> {
    let connector = sandbox.upstream.connector();
    match tokio::time::timeout(proxy.connect_timeout, connector.connect(dst)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        // Counted as egress_refused and logged by the guard.
        Ok(Err(DialError::Refused { .. })) => None,
        Ok(Err(e)) => {
            Stats::inc(&proxy.stats.upstream_failed);
            debug!(sandbox = %sandbox.id, %dst, error = %e, "upstream connect failed");
            None
        }
        Err(_) => {
            Stats::inc(&proxy.stats.upstream_failed);
            debug!(sandbox = %sandbox.id, %dst, "upstream connect timed out");
            None
        }
    }
}
