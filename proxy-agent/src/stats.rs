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
    /// Connections closed because their record names another sandbox than the listener's.
    pub origin_mismatch: AtomicU64,
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
    /// Response bytes sequences replaced by a placeholder (scrubbing).
    pub scrubbed: AtomicU64,
    /// Requests answered 403 because a placeholder went to a host its secret blocks.
    pub blocked: AtomicU64,
    /// Requests whose body had a placeholder replaced.
    pub body_substituted: AtomicU64,
    /// Request bodies over the substitution bound, passed unchanged.
    pub body_too_large: AtomicU64,
    /// Connections or streams refused by a per-sandbox limit.
    pub limit_refused: AtomicU64,
    /// Protocol upgrades (WebSocket) refused on intercepted connections.
    pub upgrade_refused: AtomicU64,
    /// WebSocket upgrades relayed on intercepted connections.
    pub websocket_relayed: AtomicU64,
    /// Relayed WebSockets veil closed itself: a frame it could not scrub, a limit, idleness.
    pub websocket_closed: AtomicU64,
    /// Responses withheld or cut off because they could not be scrubbed: a transfer coding
    /// other than chunked, an undecodable content coding, a body still compressed once decoded.
    pub scrub_withheld: AtomicU64,
    /// Response streams whose scrubber switched to a newer policy's values while streaming.
    pub scrub_policy_switched: AtomicU64,
    /// Upstream connections of `egress: "host"` sandboxes refused by the egress rules.
    pub egress_refused: AtomicU64,
    /// Latency from a request's arrival to its upstream response head.
    pub request_seconds: Histogram,
    /// Duration of the client TLS handshakes veil terminates.
    pub client_handshake_seconds: Histogram,
    /// Per secret id: placeholder occurrences by outcome, since start.
    pub secret_hits: Mutex<HashMap<String, SecretUsage>>,
    /// Per (sandbox, secret, host): occurrences not yet reported to control.
    pending_usage: Mutex<HashMap<UsageKey, SecretUsage>>,
    /// Blocked requests not yet reported to control.
    pending_blocks: Mutex<Vec<BlockedEvent>>,
    /// Woken when a blocked request waits to be reported.
    pub report_ready: tokio::sync::Notify,
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
    /// The request was refused: the secret blocks hosts it does not allow.
    pub blocked: u64,
}

impl SecretUsage {
    fn add(&mut self, other: &SecretUsage) {
        self.substituted += other.substituted;
        self.wrong_host += other.wrong_host;
        self.host_mismatch += other.host_mismatch;
        self.blocked += other.blocked;
    }
}

/// Where a secret's placeholder was seen: the unit of usage reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    /// Sandbox id.
    pub sandbox: String,
    /// Secret id.
    pub secret_id: String,
    /// The SNI of the connection.
    pub host: String,
}

/// A request refused because a placeholder went to a host its secret blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedEvent {
    /// Where it happened.
    pub key: UsageKey,
    /// When.
    pub at: std::time::SystemTime,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one request's per-secret counts (indices into `policy`'s secrets) for `sandbox`
    /// on a connection to `host`.
    pub fn record_hits(
        &self,
        sandbox: &str,
        host: &str,
        policy: &SandboxPolicy,
        hits: &[SecretHit],
    ) {
        let mut totals = lock(&self.secret_hits);
        let mut pending = lock(&self.pending_usage);
        for hit in hits {
            let Some(secret) = policy.secrets().get(hit.secret) else {
                continue;
            };
            let usage = SecretUsage {
                substituted: u64::from(hit.substituted),
                wrong_host: u64::from(hit.wrong_host),
                host_mismatch: u64::from(hit.host_mismatch),
                blocked: 0,
            };
            totals.entry(secret.id.clone()).or_default().add(&usage);
            pending
                .entry(UsageKey {
                    sandbox: sandbox.to_owned(),
                    secret_id: secret.id.clone(),
                    host: host.to_owned(),
                })
                .or_default()
                .add(&usage);
        }
    }

    /// Records a request refused because `secret_id`'s placeholder went to `host`, which the
    /// secret blocks; control is told promptly (it writes an audit record).
    pub fn record_blocked(&self, sandbox: &str, host: &str, secret_id: &str) {
        Self::inc(&self.blocked);
        let key = UsageKey {
            sandbox: sandbox.to_owned(),
            secret_id: secret_id.to_owned(),
            host: host.to_owned(),
        };
        let one = SecretUsage {
            blocked: 1,
            ..SecretUsage::default()
        };
        lock(&self.secret_hits)
            .entry(key.secret_id.clone())
            .or_default()
            .add(&one);
        lock(&self.pending_usage)
            .entry(key.clone())
            .or_default()
            .add(&one);
        lock(&self.pending_blocks).push(BlockedEvent {
            key,
            at: std::time::SystemTime::now(),
        });
        self.report_ready.notify_one();
    }

    /// Takes the usage and blocked requests gathered since the last call (for control).
    pub fn take_reports(&self) -> (Vec<(UsageKey, SecretUsage)>, Vec<BlockedEvent>) {
        let usage = std::mem::take(&mut *lock(&self.pending_usage));
        let blocks = std::mem::take(&mut *lock(&self.pending_blocks));
        let mut usage: Vec<_> = usage.into_iter().collect();
        usage.sort_by(|a, b| a.0.cmp(&b.0));
        (usage, blocks)
    }

    /// The usage of secret `id` since start.
    pub fn usage(&self, id: &str) -> SecretUsage {
        lock(&self.secret_hits).get(id).copied().unwrap_or_default()
    }

    /// Every counter: (metric name suffix, help, value). One list for logs and metrics.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "accepted",
                "Connections accepted on sandbox listeners.",
                g(&self.accepted),
            ),
            (
                "completed",
                "Connections forwarded to the end.",
                g(&self.completed),
            ),
            (
                "origin_unknown",
                "Connections closed: original destination not recorded (map miss).",
                g(&self.origin_unknown),
            ),
            (
                "origin_mismatch",
                "Connections closed: recorded for another sandbox than the listener's.",
                g(&self.origin_mismatch),
            ),
            (
                "upstream_failed",
                "Upstream connections or requests that failed.",
                g(&self.upstream_failed),
            ),
            (
                "bytes_up",
                "Bytes copied from sandboxes to upstreams.",
                g(&self.bytes_up),
            ),
            (
                "bytes_down",
                "Bytes copied from upstreams to sandboxes.",
                g(&self.bytes_down),
            ),
            (
                "intercepted",
                "Connections whose TLS veil terminated.",
                g(&self.intercepted),
            ),
            (
                "passthrough_no_secrets",
                "Passed through: the sandbox has no usable secret.",
                g(&self.passthrough_no_secrets),
            ),
            (
                "passthrough_not_tls",
                "Passed through: not a TLS ClientHello.",
                g(&self.passthrough_not_tls),
            ),
            (
                "passthrough_silent",
                "Passed through: nothing decisive within the peek timeout.",
                g(&self.passthrough_silent),
            ),
            (
                "passthrough_no_sni",
                "Passed through: no valid SNI.",
                g(&self.passthrough_no_sni),
            ),
            (
                "passthrough_alpn",
                "Passed through: ALPN is not HTTP.",
                g(&self.passthrough_alpn),
            ),
            (
                "passthrough_not_allowed",
                "Passed through: no mounted secret allows the SNI.",
                g(&self.passthrough_not_allowed),
            ),
            (
                "client_handshake_failed",
                "Client TLS handshakes with veil that failed or timed out.",
                g(&self.client_handshake_failed),
            ),
            (
                "requests",
                "Requests on intercepted connections.",
                g(&self.requests),
            ),
            (
                "refused",
                "Requests refused because a value could not be substituted safely.",
                g(&self.refused),
            ),
            (
                "upstream_verify_failed",
                "Upstream certificates that failed verification.",
                g(&self.upstream_verify_failed),
            ),
            (
                "scrubbed",
                "Secret values replaced by placeholders in responses.",
                g(&self.scrubbed),
            ),
            (
                "blocked",
                "Requests refused: placeholder sent to a host its secret blocks.",
                g(&self.blocked),
            ),
            (
                "body_substituted",
                "Requests whose body had a placeholder replaced.",
                g(&self.body_substituted),
            ),
            (
                "body_too_large",
                "Request bodies over the substitution bound, passed unchanged.",
                g(&self.body_too_large),
            ),
            (
                "limit_refused",
                "Connections or streams refused by a per-sandbox limit.",
                g(&self.limit_refused),
            ),
            (
                "upgrade_refused",
                "Protocol upgrades refused on intercepted connections.",
                g(&self.upgrade_refused),
            ),
            (
                "websocket_relayed",
                "WebSocket upgrades relayed (scrubbed) on intercepted connections.",
                g(&self.websocket_relayed),
            ),
            (
                "websocket_closed",
                "Relayed WebSockets veil closed: unscrubbable frame, limit or idleness.",
                g(&self.websocket_closed),
            ),
            (
                "scrub_withheld",
                "Responses withheld or cut off because veil could not scrub them.",
                g(&self.scrub_withheld),
            ),
            (
                "scrub_policy_switched",
                "Response streams whose scrubber took up a newer policy's values mid-stream.",
                g(&self.scrub_policy_switched),
            ),
            (
                "egress_refused",
                "Upstream connections refused by the egress rules (egress: host).",
                g(&self.egress_refused),
            ),
        ]
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        let mut out = format!("active={}", self.active.load(Ordering::Relaxed));
        for (name, _, value) in self.counters() {
            out.push_str(&format!(" {name}={value}"));
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single insert or add: a panic cannot leave a
    // half-made change behind.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Upper bounds (seconds) of the latency buckets.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with fixed buckets (Prometheus-style, non-cumulative storage).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    /// Observations above the last bucket.
    over: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        match BUCKETS.iter().position(|b| secs <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket of [`BUCKETS`], then the total count and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut cumulative = Vec::with_capacity(BUCKETS.len());
        let mut total = 0;
        for b in &self.buckets {
            total += b.load(Ordering::Relaxed);
            cumulative.push(total);
        }
        total += self.over.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, total, sum)
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
