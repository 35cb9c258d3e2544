//! Process-wide counters of the data path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use veil_policy::{SandboxPolicy, SecretHit};

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
    /// Connections whose TLS was terminated and whose requests went through substitution.
    pub intercepted: AtomicU64,
    /// Passed through: the sandbox has no usable secret.
    pub passthrough_no_secrets: AtomicU64,
    /// Passed through: the first bytes are not a TLS ClientHello (plain HTTP, other protocols).
    pub passthrough_not_tls: AtomicU64,
    /// Passed through: the client sent nothing decisive within the peek timeout, or closed.
    pub passthrough_silent: AtomicU64,
    /// Passed through: the ClientHello has no valid SNI.
    pub passthrough_no_sni: AtomicU64,
    /// Passed through: the ALPN offer is not HTTP (or absent, for unrestricted secrets only).
    pub passthrough_alpn: AtomicU64,
    /// Passed through: no mounted secret allows the SNI.
    pub passthrough_not_allowed: AtomicU64,
    /// Client TLS handshakes with veil that failed or timed out.
    pub client_handshake_failed: AtomicU64,
    /// Requests on intercepted connections.
    pub requests: AtomicU64,
    /// Requests refused (4xx) because a value could not be substituted safely.
    pub refused: AtomicU64,
    /// Upstream certificates that failed verification (nothing was sent).
    pub upstream_verify_failed: AtomicU64,
    /// Per secret id: placeholder occurrences by outcome (for usage reports).
    pub secret_hits: Mutex<HashMap<String, SecretUsage>>,
}

/// How often one secret's placeholder was seen, by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SecretUsage {
    /// Replaced by the value.
    pub substituted: u64,
    /// Left alone: the secret does not allow the SNI.
    pub wrong_host: u64,
    /// Left alone: the request's Host / :authority differs from the SNI.
    pub host_mismatch: u64,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one request's per-secret counts (indices into `policy`'s secrets).
    pub fn record_hits(&self, policy: &SandboxPolicy, hits: &[SecretHit]) {
        let mut map = self.secret_hits.lock().unwrap_or_else(|p| p.into_inner());
        for hit in hits {
            let Some(secret) = policy.secrets().get(hit.secret) else {
                continue;
            };
            let usage = match map.get_mut(&secret.id) {
                Some(u) => u,
                None => map.entry(secret.id.clone()).or_default(),
            };
            usage.substituted += u64::from(hit.substituted);
            usage.wrong_host += u64::from(hit.wrong_host);
            usage.host_mismatch += u64::from(hit.host_mismatch);
        }
    }

    /// The usage of secret `id` so far.
    pub fn usage(&self, id: &str) -> SecretUsage {
        let map = self.secret_hits.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).copied().unwrap_or_default()
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "accepted={} completed={} active={} origin_unknown={} upstream_failed={} bytes_up={} bytes_down={} \
             intercepted={} requests={} refused={} upstream_verify_failed={} client_handshake_failed={} \
             passthrough_no_secrets={} passthrough_not_tls={} passthrough_silent={} passthrough_no_sni={} \
             passthrough_alpn={} passthrough_not_allowed={}",
            g(&self.accepted),
            g(&self.completed),
            g(&self.active),
            g(&self.origin_unknown),
            g(&self.upstream_failed),
            g(&self.bytes_up),
            g(&self.bytes_down),
            g(&self.intercepted),
            g(&self.requests),
            g(&self.refused),
            g(&self.upstream_verify_failed),
            g(&self.client_handshake_failed),
            g(&self.passthrough_no_secrets),
            g(&self.passthrough_not_tls),
            g(&self.passthrough_silent),
            g(&self.passthrough_no_sni),
            g(&self.passthrough_alpn),
            g(&self.passthrough_not_allowed),
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
