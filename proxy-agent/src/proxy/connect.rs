//! Connect: the agent's own connections to a sandbox connection's original destination.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;

use crate::proxy::{Proxy, SandboxTag};
use crate::stats::Stats;

/// Connects to `dst` for `sandbox`; `None` (counted, logged) when it cannot be reached in time.
pub async fn upstream(proxy: &Proxy, sandbox: &SandboxTag, dst: SocketAddr) -> Option<TcpStream> {
    match tokio::time::timeout(proxy.connect_timeout, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
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
