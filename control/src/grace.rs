//! Rotated-out values and deleted secrets, kept for `rotated_value_grace`: the rules that decide
//! what is kept (pure), and the sweeper that drops what is past it.
//!
//! A rotated-out value is still a secret: it often stays valid upstream during a rollover, and
//! requests in flight carried it. So control keeps the last [`MAX_PREVIOUS_VALUES`] values of a
//! secret (each sealed under the revision it had, so its ciphertext stays bound to its record)
//! and a tombstone of a deleted secret, and sends them to the agents, which scrub them from
//! responses and never substitute them. Once the grace has passed since a value was replaced, the
//! sweeper drops it from the store and tells the agents, which drop (and zeroize) it too.

use std::sync::Arc;
use std::time::Duration;

use veil_link::MAX_PREVIOUS_VALUES;

use crate::agent_link::{AgentEvent, AgentLink, AgentLinkError};
use crate::store::{PreviousValue, SecretId, SecretRecord, Store, TombstoneRecord};
use crate::timefmt::now_ms;

/// Longest pause between two sweeps (so a clock change or an added value is seen in time).
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// Shortest pause between two sweeps.
const MIN_PAUSE: Duration = Duration::from_millis(100);

fn grace_ms(grace: Duration) -> i64 {
    i64::try_from(grace.as_millis()).unwrap_or(i64::MAX)
}

/// Values replaced at or before this instant (ms since the epoch) are past the grace at `now`.
pub fn cutoff(now: i64, grace: Duration) -> i64 {
    now.saturating_sub(grace_ms(grace))
}

/// The previous values of `old` once its value is replaced at `now` by one for which
/// `is_new_value` holds (it tells whether a stored value equals the new one): the old value
/// first, then the older ones, newest first; values past the grace, values equal to the new one
/// (they are current again) and those beyond [`MAX_PREVIOUS_VALUES`] are left out. Empty when
/// the grace is off.
pub fn previous_after_rotation(
    old: &SecretRecord,
    now: i64,
    grace: Duration,
    mut is_new_value: impl FnMut(&PreviousValue) -> bool,
) -> Vec<PreviousValue> {
    if grace.is_zero() {
        return Vec::new();
    }
    let replaced = PreviousValue {
        revision: old.revision,
        sealed: old.sealed.clone(),
        replaced_at: now,
    };
    let cutoff = cutoff(now, grace);
    std::iter::once(replaced)
        .chain(old.previous.iter().cloned())
        .filter(|v| v.replaced_at > cutoff && !is_new_value(v))
        .take(MAX_PREVIOUS_VALUES)
        .collect()
}

/// The previous values of `old` still inside the grace at `now` (a change that keeps the value).
pub fn previous_kept(old: &SecretRecord, now: i64, grace: Duration) -> Vec<PreviousValue> {
    let cutoff = cutoff(now, grace);
    old.previous
        .iter()
        .filter(|v| v.replaced_at > cutoff)
        .take(MAX_PREVIOUS_VALUES)
        .cloned()
        .collect()
}

/// The tombstone of `old`, deleted at `now`: its last value and its previous values still inside
/// the grace. `None` when the grace is off.
pub fn tombstone(old: &SecretRecord, now: i64, grace: Duration) -> Option<TombstoneRecord> {
    if grace.is_zero() {
        return None;
    }
    let last = PreviousValue {
        revision: old.revision,
        sealed: old.sealed.clone(),
        replaced_at: now,
    };
    let mut values = vec![last];
    values.extend(previous_kept(old, now, grace));
    Some(TombstoneRecord {
        id: old.id.clone(),
        org: old.org.clone(),
        name: old.name.clone(),
        placeholder: old.placeholder.clone(),
        hosts: old.hosts.clone(),
        revision: old.revision.next(),
        deleted_at: now,
        values,
    })
}

/// How long to wait after a sweep at `now` that kept values as old as `oldest_kept`: until the
/// oldest expires, but at most the grace or a minute.
pub fn pause(now: i64, oldest_kept: Option<i64>, grace: Duration) -> Duration {
    let cap = grace.min(MAX_PAUSE).max(MIN_PAUSE);
    let Some(oldest) = oldest_kept else {
        return cap;
    };
    // One ms past the expiry: the sweep then finds it strictly past the cutoff.
    let due = oldest.saturating_add(grace_ms(grace)).saturating_add(1);
    let wait = u64::try_from(due.saturating_sub(now)).unwrap_or(0);
    Duration::from_millis(wait).clamp(MIN_PAUSE, cap)
}

/// Drops values past the grace, tells the agents, and repeats when the next value expires;
/// runs for the daemon's life (with the grace off, one sweep clears what an earlier
/// configuration kept, and it ends).
pub async fn sweeper(store: Arc<dyn Store>, agent: Arc<dyn AgentLink>, grace: Duration) {
    loop {
        let now = now_ms();
        let st = store.clone();
        let swept = tokio::task::spawn_blocking(move || st.sweep_grace(cutoff(now, grace))).await;
        let next = match swept {
            Ok(Ok(swept)) => {
                if swept.dropped > 0 {
                    tracing::info!(
                        values = swept.dropped,
                        secrets = ?swept.changed,
                        "values past rotated_value_grace dropped"
                    );
                }
                for id in swept.changed {
                    tell_agents(agent.as_ref(), id).await;
                }
                pause(now, swept.oldest_kept, grace)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "sweeping values past rotated_value_grace");
                pause(now, None, grace)
            }
            Err(e) => {
                tracing::warn!(error = %e, "sweeping values past rotated_value_grace");
                pause(now, None, grace)
            }
        };
        if grace.is_zero() {
            return;
        }
        tokio::time::sleep(next).await;
    }
}

/// Sends the secret's new state (fewer values, or no tombstone) to the agents; one that does not
/// acknowledge converges from the store when it reconnects.
async fn tell_agents(agent: &dyn AgentLink, id: SecretId) {
    match agent
        .notify(AgentEvent::SecretChanged { id: id.clone() })
        .await
    {
        Ok(()) | Err(AgentLinkError::NotConnected) => {}
        Err(e) => tracing::warn!(secret = %id, error = %e, "expiry not acknowledged by the agents"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Sealed;
    use crate::store::{OrgId, Revision};

    const H: Duration = Duration::from_secs(3600);
    const H_MS: i64 = 3_600_000;

    fn sealed(tag: &str) -> Sealed {
        Sealed {
            key_id: "k".into(),
            nonce: tag.into(),
            ciphertext: tag.into(),
        }
    }

    fn prev(revision: u64, replaced_at: i64) -> PreviousValue {
        PreviousValue {
            revision: Revision(revision),
            sealed: sealed(&format!("r{revision}")),
            replaced_at,
        }
    }

    fn record(revision: u64, previous: Vec<PreviousValue>) -> SecretRecord {
        SecretRecord {
            id: SecretId::parse("s1").unwrap(),
            org: OrgId::parse("acme").unwrap(),
            name: "n".into(),
            description: None,
            hosts: vec!["api.test".into()],
            placeholder: "ph".into(),
            created_at: 0,
            updated_at: 0,
            revision: Revision(revision),
            sealed: sealed(&format!("r{revision}")),
            body_substitution: false,
            wrong_host: Default::default(),
            previous,
        }
    }

    fn revisions(values: &[PreviousValue]) -> Vec<u64> {
        values.iter().map(|v| v.revision.0).collect()
    }

    #[test]
    fn a_rotation_keeps_the_newest_values_inside_the_grace() {
        let now = 100 * H_MS;
        let old = record(
            9,
            vec![
                prev(8, now - 1),
                prev(6, now - H_MS / 2),
                prev(5, now - H_MS),
                prev(3, now - 2 * H_MS),
            ],
        );
        // Past the grace: replaced exactly one grace ago or earlier.
        let p = previous_after_rotation(&old, now, H, |_| false);
        assert_eq!(revisions(&p), [9, 8, 6]);
        assert_eq!(p[0].replaced_at, now);
        assert_eq!(
            p[0].sealed, old.sealed,
            "moved as sealed, bound to revision 9"
        );
        // At most MAX_PREVIOUS_VALUES, newest first.
        let many: Vec<_> = (1..=8).rev().map(|r| prev(r, now - 10)).collect();
        let p = previous_after_rotation(&record(9, many), now, H, |_| false);
        assert_eq!(revisions(&p), [9, 8, 7, 6]);
        // A value equal to the new one is current again, not previous.
        let p = previous_after_rotation(&old, now, H, |v| v.revision == 8 || v.revision == 9);
        assert_eq!(revisions(&p), [6]);
        // Grace off: nothing is kept.
        assert!(previous_after_rotation(&old, now, Duration::ZERO, |_| false).is_empty());
        // A change that keeps the value only prunes.
        assert_eq!(revisions(&previous_kept(&old, now, H)), [8, 6]);
    }

    #[test]
    fn a_tombstone_holds_the_last_value_then_the_previous_ones() {
        let now = 50 * H_MS;
        let old = record(4, vec![prev(3, now - 5), prev(2, now - 2 * H_MS)]);
        let t = tombstone(&old, now, H).unwrap();
        assert_eq!((t.id.as_str(), t.org.as_str()), ("s1", "acme"));
        assert_eq!(t.revision, 5, "a deletion is a change agents acknowledge");
        assert_eq!(revisions(&t.values), [4, 3]);
        assert_eq!(t.values[0].replaced_at, now);
        assert_eq!(t.deleted_at, now);
        assert!(tombstone(&old, now, Duration::ZERO).is_none());
    }

    #[test]
    fn sweeps_are_timed_by_the_oldest_value() {
        let now = 10 * H_MS;
        // Nothing kept: look again within a grace (at most a minute).
        assert_eq!(pause(now, None, H), MAX_PAUSE);
        assert_eq!(
            pause(now, None, Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        // The oldest value expires in 1 s: wake just after.
        let oldest = now - H_MS + 1000;
        assert_eq!(pause(now, Some(oldest), H), Duration::from_millis(1001));
        // Far away: the cap; overdue: soon, never a busy loop.
        assert_eq!(pause(now, Some(now), H), MAX_PAUSE);
        assert_eq!(pause(now, Some(now - 2 * H_MS), H), MIN_PAUSE);
        assert_eq!(cutoff(now, H), 9 * H_MS);
    }

    /// Records the changes it is told about.
    #[derive(Debug, Default)]
    struct Recorder(std::sync::Mutex<Vec<SecretId>>);

    impl AgentLink for Recorder {
        fn notify(&self, event: AgentEvent) -> crate::agent_link::LinkFuture<'_> {
            if let AgentEvent::SecretChanged { id } = event {
                self.0.lock().unwrap().push(id);
            }
            Box::pin(async { Ok(()) })
        }

        fn connected(&self) -> bool {
            true
        }

        fn ca_certificate(&self) -> Option<String> {
            None
        }
    }

    #[tokio::test]
    async fn the_sweeper_drops_values_at_start_and_when_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sled::SledStore::open(dir.path()).unwrap());
        let audit = || crate::store::conformance::fixtures::audit("acme");
        let now = now_ms();
        // Expired while the daemon was down, and one due a second from now.
        let mut stale = record(2, vec![prev(1, now - 5_000)]);
        stale.id = SecretId::parse("stale").unwrap();
        stale.placeholder = "ph-stale".into();
        let mut fresh = record(2, vec![prev(1, now)]);
        fresh.name = "fresh".into();
        store.insert_secret(&stale, audit()).unwrap();
        store.insert_secret(&fresh, audit()).unwrap();
        let agent = Arc::new(Recorder::default());
        let task = tokio::spawn(sweeper(
            store.clone(),
            agent.clone(),
            Duration::from_secs(1),
        ));
        let told = || agent.0.lock().unwrap().clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while told().len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "told {:?}", told());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        assert_eq!(
            told(),
            ["stale", "s1"],
            "the expired one at once, then the other"
        );
        for id in ["stale", "s1"] {
            let (acme, id) = (OrgId::parse("acme").unwrap(), SecretId::parse(id).unwrap());
            let s = store.secret(&acme, &id).unwrap().unwrap();
            assert!(s.previous.is_empty(), "{id}");
        }
        // With the grace off, one sweep and the task ends.
        sweeper(store, agent, Duration::ZERO).await;
    }
}
