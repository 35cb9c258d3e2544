//! Identify: which destination a sandbox connection was dialled to, from the record the
//! kernel made when it redirected the connection. A connection whose record is missing is
//! closed and counted, never guessed.

use std::net::SocketAddr;

use tracing::warn;

use crate::proxy::{Proxy, SandboxTag};
use crate::stats::Stats;

/// Finds where the connection from `peer` was going; `None` (counted) when it cannot be known.
pub fn origin(proxy: &Proxy, sandbox: &SandboxTag, peer: SocketAddr) -> Option<SocketAddr> {
    match proxy.orig.take(sandbox.netns_cookie, peer) {
        Ok(Some(dst)) => Some(dst),
        Ok(None) => {
            Stats::inc(&proxy.stats.origin_unknown);
            warn!(sandbox = %sandbox.id, %peer, "original destination unknown; connection closed");
            None
        }
        Err(e) => {
            Stats::inc(&proxy.stats.origin_unknown);
            warn!(sandbox = %sandbox.id, %peer, error = %e, "original destination lookup failed; connection closed");
            None
        }
    }
}
