//! Where a secret stands with the agents: who acknowledged which revision (connected or not),
//! and the wait until none may still use an older one — what a rotation's `wait` relies on.

use std::collections::BTreeMap;
use std::time::Duration;

use veil_link::{AgentId, Revision, SecretId};

use super::dispatch::human;
use super::state::AgentServer;
use crate::agent_link::{AgentLinkError, LinkFuture, Propagation, SecretAck};

impl AgentServer {
    /// Which agents acknowledged which revision of secret `id` (see [`crate::agent_link::AgentLink::propagation`]).
    pub(super) fn propagation_of(&self, id: &SecretId) -> Propagation {
        let st = self.lock();
        let mut agents: BTreeMap<AgentId, SecretAck> = BTreeMap::new();
        if let Some(per_agent) = st.acks.get(id) {
            for (agent_id, (revision, at)) in per_agent {
                agents.insert(
                    agent_id.clone(),
                    SecretAck {
                        agent_id: agent_id.clone(),
                        connected: false,
                        revision: Some(*revision),
                        at: Some(*at),
                    },
                );
            }
        }
        for agent in st.agents.values() {
            let agent_id = &agent.info.agent_id;
            if let Some(a) = agents.get_mut(agent_id) {
                a.connected = true;
            } else if agent.held.contains_key(id) {
                agents.insert(
                    agent_id.clone(),
                    SecretAck {
                        agent_id: agent_id.clone(),
                        connected: true,
                        revision: None,
                        at: None,
                    },
                );
            }
        }
        drop(st);
        self.merge_remote(id, &mut agents);
        Propagation {
            agents: agents.into_values().collect(),
        }
    }

    /// Resolves once no agent may still use a revision of `id` older than `revision` (see
    /// [`crate::agent_link::AgentLink::wait_acked`]).
    /// Agent ids, each with the fleet host it connected as (when it is one).
    async fn with_hosts(&self, agents: Vec<String>) -> Vec<String> {
        let store = self.inner.store.clone();
        let hosts = tokio::task::spawn_blocking(move || store.fleet().map(|f| f.hosts()))
            .await
            .ok()
            .flatten()
            .and_then(Result::ok)
            .unwrap_or_default();
        agents
            .into_iter()
            .map(|a| match hosts.iter().find(|h| h.agents.contains(&a)) {
                Some(h) => format!("{a} (host {})", h.name),
                None => a,
            })
            .collect()
    }

    pub(super) fn wait_for_acks(
        &self,
        id: &SecretId,
        revision: Revision,
        timeout: Duration,
    ) -> LinkFuture<'_> {
        let id = id.clone();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                // Registered before the check, so an acknowledgement in between is not missed.
                let notified = self.inner.acked.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let propagation = self.propagation_of(&id);
                let pending = propagation.pending(revision);
                if pending.is_empty() {
                    return Ok(());
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    let pending: Vec<String> = pending.iter().map(|a| a.to_string()).collect();
                    let named = self.with_hosts(pending).await;
                    return Err(AgentLinkError::NoAck(format!(
                        "not acknowledged within {} by veil-agent(s) {}",
                        human(timeout),
                        named.join(", ")
                    )));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent id made of one repeated hex digit.
    fn agent(digit: char) -> AgentId {
        AgentId::parse(digit.to_string().repeat(32)).unwrap()
    }

    #[test]
    fn pending_agents_are_those_behind() {
        let ack = |id: char, revision: Option<u64>| SecretAck {
            agent_id: agent(id),
            connected: true,
            revision: revision.map(Revision),
            at: None,
        };
        let p = Propagation {
            agents: vec![ack('a', Some(4)), ack('b', Some(5)), ack('c', None)],
        };
        assert_eq!(p.pending(5), vec![&agent('a'), &agent('c')]);
        assert_eq!(p.pending(4), vec![&agent('c')]);
        assert!(Propagation::default().pending(9).is_empty());
    }
}
