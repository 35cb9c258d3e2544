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

use std::fmt;
use std::net::SocketAddr;

use crate::bpf::{BpfError, ConnTuple, OrigDstTable, Recorded};

#[cfg(test)]
mod model;

/// Where the kernel's records are read (the eBPF map; an in-memory model of the kernel in
/// tests).
pub trait OriginTable: fmt::Debug {
    /// Removes and returns the record of `conn`, if there is one.
    fn take(&self, conn: &ConnTuple) -> Result<Option<Recorded>, BpfError>;
    /// Removes every record of connections to the listener `listener` in netns
    /// `netns_cookie` (a closed listener's unaccepted connections); returns how many.
    fn forget_listener(&self, netns_cookie: u64, listener: SocketAddr) -> Result<usize, BpfError>;
}

impl OriginTable for OrigDstTable {
    fn take(&self, conn: &ConnTuple) -> Result<Option<Recorded>, BpfError> {
        OrigDstTable::take(self, conn)
    }

    fn forget_listener(&self, netns_cookie: u64, listener: SocketAddr) -> Result<usize, BpfError> {
        OrigDstTable::forget_listener(self, netns_cookie, listener)
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
    table: &(impl OriginTable + ?Sized),
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
pub fn consume(table: &(impl OriginTable + ?Sized), conn: &ConnTuple) {
    let _ = table.take(conn);
}
