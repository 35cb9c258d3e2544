//! A change's way to the agents: the messages each agent needs (see [`crate::agent_link::plan`])
//! built under one lock from the store's current state, queued in order, then the wait for
//! every agent's acknowledgement or the timeout.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;
use veil_link::{ControlMsg, SecretId, SecretState};

use super::state::{AgentServer, Holds, LinkState, Pending};
use crate::agent_link::plan::{Change, RegistryView, Step, apply_to_held, plan};
use crate::agent_link::unseal::{unseal_for_agent, unseal_retired_for_agent};
use crate::agent_link::{AgentLinkError, BuildError};

/// One message's acknowledgement to await: connection, seq, the agent's errors.
type Wait = (u64, u64, oneshot::Receiver<Vec<String>>);

/// "5 s", "1.5 s", "300 ms".
pub(super) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl AgentServer {
    /// Queues the messages for `change` to every agent; returns what to wait for.
    pub(super) fn dispatch(&self, change: Change<'_>) -> Result<Vec<Wait>, AgentLinkError> {
        let mut st = self.lock();
        // Before the store read: a snapshot shared from an older read is no longer used.
        st.generation += 1;
        if st.agents.is_empty() {
            return Err(AgentLinkError::NotConnected);
        }
        let full = RegistryView::load(self.inner.store.as_ref()).map_err(BuildError::from)?;
        let ring = self.ring()?;
        let mut built: HashMap<SecretId, SecretState> = HashMap::new();
        let mut views: HashMap<Option<String>, RegistryView> = HashMap::new();
        let mut waits = Vec::new();
        let LinkState {
            agents, next_seq, ..
        } = &mut *st;
        for (conn, agent) in agents.iter_mut() {
            // Each host's agents see only the sandboxes registered for that host.
            let view = views
                .entry(agent.info.host.clone())
                .or_insert_with_key(|host| full.for_host(host.as_deref()));
            for step in plan(view, change, &agent.held) {
                // Another host's sandbox: this agent never had it, nothing to delete.
                if let Step::DeleteSandbox(id) = &step
                    && full.sandboxes.contains_key(id)
                {
                    continue;
                }
                let seq = *next_seq;
                *next_seq += 1;
                let (msg, secret, holds) = match &step {
                    Step::PutSecret(id) => {
                        let state = match built.get(id) {
                            Some(s) => s.clone(),
                            None => {
                                let s = match (view.mounted.get(id), view.retired.get(id)) {
                                    (Some(rec), _) => unseal_for_agent(&ring, rec)?,
                                    (None, Some(t)) => unseal_retired_for_agent(&ring, t)?,
                                    (None, None) => {
                                        return Err(BuildError::Vanished {
                                            kind: "secret",
                                            id: id.to_string(),
                                        }
                                        .into());
                                    }
                                };
                                built.insert(id.clone(), s.clone());
                                s
                            }
                        };
                        let holds = Holds::Put(state.id.clone(), state.revision);
                        let secret = Some(state.id.clone());
                        (ControlMsg::PutSecret { seq, secret: state }, secret, holds)
                    }
                    Step::PutSandbox(id) => {
                        let sb = view.sandboxes.get(id).ok_or_else(|| {
                            AgentLinkError::from(BuildError::Vanished {
                                kind: "sandbox",
                                id: id.to_string(),
                            })
                        })?;
                        (
                            ControlMsg::PutSandbox {
                                seq,
                                sandbox: view.sandbox_state(sb),
                            },
                            None,
                            Holds::Unchanged,
                        )
                    }
                    Step::DeleteSandbox(id) => (
                        ControlMsg::DeleteSandbox {
                            seq,
                            id: id.clone(),
                        },
                        None,
                        Holds::Unchanged,
                    ),
                    Step::DeleteSecret(id) => (
                        ControlMsg::DeleteSecret {
                            seq,
                            id: id.clone(),
                        },
                        None,
                        Holds::Dropped(id.clone()),
                    ),
                };
                apply_to_held(&mut agent.held, view, &step);
                let (done, rx) = oneshot::channel();
                agent.pending.insert(
                    seq,
                    Pending {
                        done: Some(done),
                        secret,
                        holds,
                    },
                );
                // A closed channel means the agent is going away; its entry is removed then,
                // which fails this wait as a disconnect.
                let _ = agent.tx.send(msg);
                waits.push((*conn, seq, rx));
            }
        }
        if !waits.is_empty() {
            // What the agents now hold (sent, not yet acknowledged) is published to the other
            // replicas at once, so a wait there counts these agents from the start.
            self.inner.changed.notify_one();
        }
        Ok(waits)
    }

    pub(super) async fn deliver(&self, change: Change<'_>) -> Result<(), AgentLinkError> {
        // The messages are built from the store under the link's lock: off the async workers.
        let this = self.clone();
        let owned = match change {
            Change::Secret(id) => Ok(id.clone()),
            Change::Sandbox(id) => Err(id.clone()),
        };
        let waits = tokio::task::spawn_blocking(move || {
            this.dispatch(match &owned {
                Ok(secret) => Change::Secret(secret),
                Err(sandbox) => Change::Sandbox(sandbox),
            })
        })
        .await
        .map_err(|e| BuildError::Task(e.to_string()))??;
        if waits.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let (mut acked, mut gone, mut late) = (0usize, 0usize, Vec::new());
        let mut errors = Vec::new();
        for (conn, seq, rx) in waits {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(e)) if e.is_empty() => acked += 1,
                Ok(Ok(e)) => errors.extend(e),
                Ok(Err(_)) => gone += 1,
                Err(_) => late.push((conn, seq)),
            }
        }
        if !late.is_empty() {
            let mut st = self.lock();
            for (conn, seq) in &late {
                if let Some(agent) = st.agents.get_mut(conn) {
                    agent.pending.remove(seq);
                }
            }
        }
        if !errors.is_empty() {
            return Err(AgentLinkError::Rejected(errors));
        }
        if !late.is_empty() {
            return Err(AgentLinkError::NoAck(format!(
                "no veil-agent acknowledged within {}",
                human(self.inner.timeout)
            )));
        }
        if acked == 0 && gone > 0 {
            return Err(AgentLinkError::NoAck(
                "the veil-agent disconnected before acknowledging".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(5000)), "5 s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human(Duration::from_millis(300)), "300 ms");
    }
}
