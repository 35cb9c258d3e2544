//! Acknowledgements: what each message's `Applied` confirms about the secrets an agent holds.
//! Control derives the revisions from the sequence number it sent rather than trusting a list
//! from the agent, and remembers them per secret and agent (in memory: after a control restart
//! every agent re-acknowledges through its snapshot).

use std::collections::{BTreeMap, HashMap};

use veil_link::{AgentId, SecretId};

use super::state::{Acked, AgentServer, Holds};
use crate::timefmt::now_ms;

impl AgentServer {
    /// Handles an acknowledgement.
    pub(super) fn applied(&self, conn: u64, seq: u64, errors: Vec<String>) {
        let mut st = self.lock();
        let Some(agent) = st.agents.get_mut(&conn) else {
            return;
        };
        let Some(pending) = agent.pending.remove(&seq) else {
            tracing::debug!(agent_id = %agent.info.agent_id, seq, "late or unknown acknowledgement");
            return;
        };
        if !errors.is_empty() {
            tracing::warn!(agent_id = %agent.info.agent_id, seq, errors = ?errors, "agent could not apply a change");
            if let Some(id) = &pending.secret {
                agent.held.remove(id.as_str());
            }
        } else {
            tracing::debug!(agent_id = %agent.info.agent_id, seq, "applied");
        }
        let agent_id = agent.info.agent_id.clone();
        record_holds(
            &mut st.acks,
            &agent_id,
            pending.holds,
            errors.is_empty(),
            now_ms(),
        );
        drop(st);
        if let Some(done) = pending.done {
            let _ = done.send(errors);
        }
        self.inner.acked.notify_waiters();
        self.inner.changed.notify_one();
    }
}

/// Updates what control knows an agent holds, once it acknowledged a message.
fn record_holds(
    acks: &mut HashMap<SecretId, BTreeMap<AgentId, Acked>>,
    agent_id: &AgentId,
    holds: Holds,
    applied: bool,
    now: i64,
) {
    match holds {
        Holds::Unchanged => {}
        // A snapshot replaces the agent's secrets even when some sandbox failed.
        Holds::Exactly(list) => {
            for per_agent in acks.values_mut() {
                per_agent.remove(agent_id);
            }
            for (id, revision) in list {
                acks.entry(id)
                    .or_default()
                    .insert(agent_id.clone(), (revision, now));
            }
        }
        Holds::Put(id, revision) if applied => {
            acks.entry(id)
                .or_default()
                .insert(agent_id.clone(), (revision, now));
        }
        Holds::Put(..) => {}
        Holds::Dropped(id) => {
            if let Some(per_agent) = acks.get_mut(&id) {
                per_agent.remove(agent_id);
            }
        }
    }
    acks.retain(|_, per_agent| !per_agent.is_empty());
}

#[cfg(test)]
mod tests {
    use veil_link::Revision;

    use super::*;

    /// An agent id made of one repeated hex digit.
    fn agent(digit: char) -> AgentId {
        AgentId::parse(digit.to_string().repeat(32)).unwrap()
    }

    fn secret(id: &str) -> SecretId {
        SecretId::parse(id).unwrap()
    }

    #[test]
    fn acknowledgements_track_what_each_agent_holds() {
        let (a, b) = (agent('a'), agent('b'));
        let at = |acks: &HashMap<SecretId, BTreeMap<AgentId, Acked>>, s: &str, who: &AgentId| {
            acks[s][who]
        };
        let mut acks = HashMap::new();
        let snap = Holds::Exactly(vec![
            (secret("s1"), Revision(3)),
            (secret("s2"), Revision(1)),
        ]);
        record_holds(&mut acks, &a, snap, false, 10);
        record_holds(
            &mut acks,
            &b,
            Holds::Put(secret("s1"), Revision(3)),
            true,
            11,
        );
        assert_eq!(
            at(&acks, "s1", &a),
            (Revision(3), 10),
            "a snapshot counts even with sandbox errors"
        );
        // A failed put acknowledges nothing; a successful one moves the revision.
        record_holds(
            &mut acks,
            &a,
            Holds::Put(secret("s1"), Revision(4)),
            false,
            12,
        );
        assert_eq!(at(&acks, "s1", &a), (Revision(3), 10));
        record_holds(
            &mut acks,
            &a,
            Holds::Put(secret("s1"), Revision(4)),
            true,
            13,
        );
        assert_eq!(at(&acks, "s1", &a), (Revision(4), 13));
        record_holds(&mut acks, &a, Holds::Dropped(secret("s2")), true, 14);
        assert!(!acks.contains_key("s2"));
        // A new snapshot replaces: what it does not list, the agent no longer holds.
        record_holds(&mut acks, &a, Holds::Exactly(vec![]), true, 15);
        assert!(!acks["s1"].contains_key(&a));
        assert_eq!(at(&acks, "s1", &b), (Revision(3), 11));
        record_holds(&mut acks, &a, Holds::Unchanged, true, 16);
        assert_eq!(acks.len(), 1);
    }
}
