//! Acknowledgements across replicas (shared store): each replica publishes what its agents
//! acknowledged, and merges what the others published into [`AgentServer::propagation_of`], so
//! a `wait` on any replica waits for every agent that holds the secret, wherever connected.
//! The publishing and reading go through the store's database (see [`crate::fanout`]); this
//! module is the in-memory side.

use std::collections::{BTreeMap, HashSet};

use veil_link::{AgentId, SecretId};

use super::state::{AgentServer, PublishedAck, Remote};
use crate::agent_link::SecretAck;

impl AgentServer {
    /// This replica's acknowledgements, to publish: every (secret, agent) it knows of.
    pub fn published(&self) -> Vec<PublishedAck> {
        let st = self.lock();
        let mut out: BTreeMap<(SecretId, AgentId), PublishedAck> = BTreeMap::new();
        for (secret_id, per_agent) in &st.acks {
            for (agent_id, (revision, at)) in per_agent {
                out.insert(
                    (secret_id.clone(), agent_id.clone()),
                    PublishedAck {
                        secret_id: secret_id.clone(),
                        agent_id: agent_id.clone(),
                        revision: Some(*revision),
                        at: Some(*at),
                        connected: false,
                    },
                );
            }
        }
        let connected: HashSet<&AgentId> = st.agents.values().map(|a| &a.info.agent_id).collect();
        for ack in out.values_mut() {
            ack.connected = connected.contains(&ack.agent_id);
        }
        // Sent but not acknowledged yet: the agent holds it as far as a waiter is concerned.
        for agent in st.agents.values() {
            for secret_id in agent.held.keys() {
                out.entry((secret_id.clone(), agent.info.agent_id.clone()))
                    .or_insert_with(|| PublishedAck {
                        secret_id: secret_id.clone(),
                        agent_id: agent.info.agent_id.clone(),
                        revision: None,
                        at: None,
                        connected: true,
                    });
            }
        }
        out.into_values().collect()
    }

    /// Replaces what `replica` published (`alive` = it refreshed its presence lately; the
    /// agents of a replica that is gone count as disconnected) and wakes the waiters.
    pub fn set_remote(&self, replica: &str, alive: bool, acks: Vec<PublishedAck>) {
        self.remote()
            .replicas
            .insert(replica.to_owned(), (alive, acks));
        self.inner.acked.notify_waiters();
    }

    /// Forgets the replicas not in `keep`.
    pub fn retain_remote(&self, keep: &[String]) {
        self.remote().replicas.retain(|r, _| keep.contains(r));
        self.inner.acked.notify_waiters();
    }

    /// Resolves when this replica's acknowledgements or agents may have changed since the last
    /// call (a change while nobody waits is remembered).
    pub async fn local_changed(&self) {
        self.inner.changed.notified().await;
    }

    /// Adds the other replicas' view of secret `id` to `agents` (this replica's): an agent
    /// connected somewhere is connected; otherwise the newest acknowledgement counts.
    pub(super) fn merge_remote(&self, id: &SecretId, agents: &mut BTreeMap<AgentId, SecretAck>) {
        let remote = self.remote();
        for (alive, acks) in remote.replicas.values() {
            for a in acks.iter().filter(|a| &a.secret_id == id) {
                let theirs = SecretAck {
                    agent_id: a.agent_id.clone(),
                    connected: a.connected && *alive,
                    revision: a.revision,
                    at: a.at,
                };
                match agents.get_mut(&a.agent_id) {
                    None => {
                        agents.insert(a.agent_id.clone(), theirs);
                    }
                    Some(mine) => {
                        if theirs.connected && !mine.connected
                            || theirs.connected == mine.connected && theirs.at > mine.at
                        {
                            *mine = theirs;
                        }
                    }
                }
            }
        }
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, Remote> {
        self.inner
            .remote
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
