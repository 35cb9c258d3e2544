//! Identify: which destination a sandbox connection was dialled to, from the record the
//! kernel made when it redirected the connection — never a guess.
//!
//! The record is keyed by the connection's four-tuple (netns cookie, client, listener) and
//! names the sandbox whose listener the kernel redirected it to; a connection is served only
//! when its own record is there and names the sandbox of the listener that accepted it. Every
//! accepted connection consumes its record, whatever happens to it next (the over-limit drop
//! included), so a later connection reusing the tuple never finds it. A connection without a
//! record (a direct connect to a listener, or a record the kernel already forgot) is closed and
//! counted; one whose record names another sandbox is closed and counted separately.
//!
//! A connection reset while it waited in the accept queue no longer holds its tuple, so a new
//! redirected connection may have recorded the same tuple since; its record is taken (so it
//! cannot outlive the dead one) but not used. Checking after the take is what makes this
//! exact: a record made by another connection on this tuple can only exist once this one was
//! reset, and a reset is final.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::bpf::{BpfError, ConnTuple, OrigDstTable, Recorded};
use crate::proxy::{Proxy, SandboxTag};
use crate::stats::Stats;

#[cfg(test)]
mod model;

/// Where the kernel's records are read (the eBPF map; an in-memory model of the kernel in
/// tests).
pub trait OriginTable {
    /// Removes and returns the record of `conn`, if there is one.
    fn take(&self, conn: &ConnTuple) -> Result<Option<Recorded>, BpfError>;
}

impl OriginTable for OrigDstTable {
    fn take(&self, conn: &ConnTuple) -> Result<Option<Recorded>, BpfError> {
        OrigDstTable::take(self, conn)
    }
}

/// What the record says about a connection accepted on one sandbox's listener.
#[derive(Debug)]
pub enum Identity {
    /// Redirected from this sandbox, which dialled this destination.
    Known(SocketAddr),
    /// No record: not a redirected connection, or one whose record is gone.
    Unknown,
    /// The record names another sandbox.
    Mismatch,
    /// The connection was reset before it was identified; the record may be another's.
    Reset,
    /// The records could not be read.
    Failed(BpfError),
}

/// Consumes the record of `conn`, accepted on a listener of the sandbox with cgroup id
/// `cgroup_id`, and says whether the connection may be served and where it was going.
/// `alive` tells, after the take, whether the accepted socket is still connected.
pub fn check(
    table: &impl OriginTable,
    cgroup_id: u64,
    conn: &ConnTuple,
    alive: impl FnOnce() -> bool,
) -> Identity {
    match table.take(conn) {
        Ok(Some(_)) if !alive() => Identity::Reset,
        Ok(Some(rec)) if rec.cgroup_id == cgroup_id => Identity::Known(rec.dst),
        Ok(Some(_)) => Identity::Mismatch,
        Ok(None) => Identity::Unknown,
        Err(e) => Identity::Failed(e),
    }
}

/// Consumes the record of a connection that will not be served (closed over the limit), so
/// that nothing reusing its tuple later can find it.
pub fn consume(table: &impl OriginTable, conn: &ConnTuple) {
    let _ = table.take(conn);
}

/// Finds where the connection `conn` (accepted as `client`) was going; `None` (counted,
/// logged) when it may not be served.
pub fn origin(
    proxy: &Proxy,
    sandbox: &SandboxTag,
    client: &TcpStream,
    conn: &ConnTuple,
) -> Option<SocketAddr> {
    let peer = conn.peer;
    // A socket that went to CLOSE (reset) has no peer any more.
    let alive = || client.peer_addr().is_ok();
    match check(&proxy.orig, sandbox.cgroup_id, conn, alive) {
        Identity::Known(dst) => Some(dst),
        Identity::Unknown => {
            Stats::inc(&proxy.stats.origin_unknown);
            warn!(sandbox = %sandbox.id, %peer, "original destination unknown; connection closed");
            None
        }
        Identity::Reset => {
            Stats::inc(&proxy.stats.origin_unknown);
            debug!(sandbox = %sandbox.id, %peer, "connection reset before it was identified");
            None
        }
        Identity::Mismatch => {
            Stats::inc(&proxy.stats.origin_mismatch);
            warn!(sandbox = %sandbox.id, %peer, "connection recorded for another sandbox; closed");
            None
        }
        Identity::Failed(e) => {
            Stats::inc(&proxy.stats.origin_unknown);
            warn!(sandbox = %sandbox.id, %peer, error = %e, "original destination lookup failed; connection closed");
            None
        }
    }
}
