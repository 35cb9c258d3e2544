//! Agents' usage and blocked reports on their way to the audit log: queued without waiting
//! (the link's acknowledgements must not queue behind a disk flush), turned into per-secret
//! deltas and one audit entry each, written in arrival order.

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use veil_link::{AgentId, BlockedReport, UsageReport};

use super::state::{AgentServer, ReportKind, UsageJob};
use crate::store::{AuditRecord, SecretRecord, Store, UsageCounts, UsageDelta};

/// Usage batches waiting for the store; beyond this a batch is dropped (and logged) rather than
/// slowing the link, whose acknowledgements rotations wait for.
pub(super) const USAGE_QUEUE: usize = 256;

impl AgentServer {
    /// Queues an agent's usage or blocked report for the store; never waits (the link's
    /// acknowledgements must not queue behind a disk flush).
    pub(super) fn report(&self, agent_id: &AgentId, kind: ReportKind, deltas: Vec<UsageDelta>) {
        if deltas.is_empty() {
            return;
        }
        let n = deltas.len();
        let job = UsageJob {
            agent_id: agent_id.clone(),
            kind,
            deltas,
        };
        if self.inner.usage.try_send(job).is_err() {
            tracing::warn!(%agent_id, entries = n, ?kind, "usage report dropped: the store is behind");
        }
    }
}

pub(super) fn usage_deltas(at_ms: i64, reports: Vec<UsageReport>) -> Vec<UsageDelta> {
    reports
        .into_iter()
        .map(|r| UsageDelta {
            secret_id: r.secret_id,
            sandbox: r.sandbox,
            host: r.host,
            counts: UsageCounts {
                substituted: r.substituted,
                wrong_host: r.wrong_host,
                host_mismatch: r.host_mismatch,
                blocked: r.blocked,
            },
            at: at_ms,
        })
        .filter(|d| !d.counts.is_zero())
        .collect()
}

/// Blocked events count nothing (the usage report carries the counts): they only audit.
pub(super) fn blocked_deltas(events: Vec<BlockedReport>) -> Vec<UsageDelta> {
    events
        .into_iter()
        .map(|e| UsageDelta {
            secret_id: e.secret_id,
            sandbox: e.sandbox,
            host: e.host,
            counts: UsageCounts::default(),
            at: e.at_ms,
        })
        .collect()
}

/// The audit entry for one reported delta (no value, ever: only ids, host and counts).
fn report_audit(
    agent_id: &AgentId,
    kind: ReportKind,
    secret: &SecretRecord,
    d: &UsageDelta,
) -> AuditRecord {
    let (action, changes) = match kind {
        ReportKind::Usage => (
            "secret.used",
            json!({
                "sandboxId": d.sandbox,
                "host": d.host,
                "substituted": d.counts.substituted,
                "wrongHost": d.counts.wrong_host,
                "hostMismatch": d.counts.host_mismatch,
                "blocked": d.counts.blocked,
            }),
        ),
        ReportKind::Blocked => (
            "secret.blocked",
            json!({"sandboxId": d.sandbox, "host": d.host}),
        ),
    };
    AuditRecord {
        seq: 0,
        time: d.at,
        actor: format!("veil-agent:{agent_id}"),
        org: secret.org.to_string(),
        action: action.to_owned(),
        target_type: "secret".into(),
        target_id: secret.id.to_string(),
        target_name: Some(secret.name.clone()),
        changes,
    }
}

/// Writes agents' reports to the store, one batch at a time, in arrival order.
pub(super) async fn write_usage(store: Arc<dyn Store>, mut rx: mpsc::Receiver<UsageJob>) {
    while let Some(job) = rx.recv().await {
        let store = store.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.record_usage(&job.deltas, &mut |secret, d| {
                Some(report_audit(&job.agent_id, job.kind, secret, d))
            })
        })
        .await;
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "recording agent usage"),
            Err(e) => tracing::warn!(error = %e, "recording agent usage"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_link::SecretId;

    fn secret(id: &str) -> SecretId {
        SecretId::parse(id).unwrap()
    }

    #[test]
    fn reports_become_deltas_without_empty_ones() {
        let r = |substituted| UsageReport {
            substituted,
            ..UsageReport::new("sb".parse().unwrap(), secret("s"), "h".into())
        };
        let d = usage_deltas(7, vec![r(0), r(2)]);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].counts.substituted, d[0].at), (2, 7));
        let b = blocked_deltas(vec![BlockedReport {
            sandbox: "sb".parse().unwrap(),
            secret_id: secret("s"),
            host: "h".into(),
            at_ms: 9,
        }]);
        assert!(b[0].counts.is_zero());
        assert_eq!(b[0].at, 9);
    }
}
