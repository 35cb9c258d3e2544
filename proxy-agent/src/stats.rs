//! Process-wide counters of the data path.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every connection task; relaxed atomics, read for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted on sandbox listeners.
    pub accepted: AtomicU64,
    /// Connections closed because their original destination was not recorded.
    pub origin_unknown: AtomicU64,
    /// Connections closed because the original destination could not be reached.
    pub upstream_failed: AtomicU64,
    /// Connections forwarded to the end.
    pub completed: AtomicU64,
    /// Connections open right now.
    pub active: AtomicU64,
    /// Bytes copied from sandboxes to upstreams.
    pub bytes_up: AtomicU64,
    /// Bytes copied from upstreams to sandboxes.
    pub bytes_down: AtomicU64,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "accepted={} completed={} active={} origin_unknown={} upstream_failed={} bytes_up={} bytes_down={}",
            g(&self.accepted),
            g(&self.completed),
            g(&self.active),
            g(&self.origin_unknown),
            g(&self.upstream_failed),
            g(&self.bytes_up),
            g(&self.bytes_down),
        )
    }
}

/// Decrements [`Stats::active`] when a connection task ends, however it ends.
#[derive(Debug)]
pub struct ActiveGuard<'a>(&'a Stats);

impl<'a> ActiveGuard<'a> {
    /// Counts one more active connection until the guard drops.
    pub fn new(stats: &'a Stats) -> Self {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
