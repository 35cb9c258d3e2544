//! The snapshot a newly connected agent receives: every sandbox, every secret mounted in one
//! (unsealed for the agent) and every retired one of their organizations, queued atomically
//! with the agent's registration so no change can slip between the two.

use std::collections::HashMap;

use tokio::sync::mpsc;
use veil_link::{ControlMsg, Revision, SecretId};

use super::socket::save_ca;
use super::state::{Agent, AgentInfo, AgentServer, Holds, LinkState, Pending};
use crate::agent_link::plan::RegistryView;
use crate::agent_link::unseal::{unseal_for_agent, unseal_retired_for_agent};
use crate::agent_link::{AgentLinkError, BuildError};

/// A snapshot built from one view of the registry, and what the agent holds once applied.
struct Built {
    sandboxes: Vec<veil_link::SandboxState>,
    secrets: Vec<veil_link::SecretState>,
    acks: Vec<(SecretId, Revision)>,
    held: crate::agent_link::plan::Held,
}

impl AgentServer {
    fn build(&self, view: &RegistryView) -> Result<Built, AgentLinkError> {
        let mut secrets = Vec::with_capacity(view.mounted.len() + view.retired.len());
        {
            let ring = self.ring()?;
            for s in view.mounted.values() {
                secrets.push(unseal_for_agent(&ring, s)?);
            }
            for t in view.retired.values() {
                secrets.push(unseal_retired_for_agent(&ring, t)?);
            }
        }
        let sandboxes: Vec<_> = view
            .sandboxes
            .values()
            .map(|sb| view.sandbox_state(sb))
            .collect();
        let acks = view
            .held()
            .into_iter()
            .map(|(id, stamp)| (id, stamp.revision))
            .collect();
        Ok(Built {
            sandboxes,
            secrets,
            acks,
            held: view.held(),
        })
    }

    /// Sends every connected agent a fresh snapshot of the store (after this replica may have
    /// missed changes: its database connection was lost); each agent reconciles to exactly it.
    /// Blocks on the store: call from a blocking thread.
    pub fn resync(&self) -> Result<usize, AgentLinkError> {
        let mut st = self.lock();
        if st.agents.is_empty() {
            return Ok(0);
        }
        let view = RegistryView::load(self.inner.store.as_ref()).map_err(BuildError::from)?;
        let mut per_host: HashMap<Option<String>, Built> = HashMap::new();
        let LinkState {
            agents, next_seq, ..
        } = &mut *st;
        for agent in agents.values_mut() {
            let host = agent.info.host.clone();
            let built = match per_host.entry(host) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let mine = view.for_host(e.key().as_deref());
                    e.insert(self.build(&mine)?)
                }
            };
            let seq = *next_seq;
            *next_seq += 1;
            let _ = agent.tx.send(ControlMsg::Snapshot {
                guarded: self.inner.guarded.clone(),
                seq,
                sandboxes: built.sandboxes.clone(),
                secrets: built.secrets.clone(),
            });
            agent.pending.insert(
                seq,
                Pending {
                    done: None,
                    secret: None,
                    holds: Holds::Exactly(built.acks.clone()),
                },
            );
            agent.held = built.held.clone();
        }
        Ok(agents.len())
    }

    /// Registers a Hello'd agent and queues its snapshot, atomically with respect to changes.
    /// Blocks on the store: call from a blocking thread.
    pub(super) fn admit(
        &self,
        info: AgentInfo,
        ca_pem: String,
        tx: mpsc::UnboundedSender<ControlMsg>,
    ) -> Result<u64, AgentLinkError> {
        let mut st = self.lock();
        let view = RegistryView::load(self.inner.store.as_ref())
            .map_err(BuildError::from)?
            .for_host(info.host.as_deref());
        let Built {
            sandboxes,
            secrets,
            acks: held,
            held: view_held,
        } = self.build(&view)?;
        let seq = st.next_seq;
        st.next_seq += 1;
        let conn = st.next_conn;
        st.next_conn += 1;
        let (n_sandboxes, n_secrets) = (sandboxes.len(), secrets.len());
        // A closed receiver is impossible here: the writer has not started yet.
        let _ = tx.send(ControlMsg::Snapshot {
            guarded: self.inner.guarded.clone(),
            seq,
            sandboxes,
            secrets,
        });
        let mut pending = HashMap::new();
        pending.insert(
            seq,
            Pending {
                done: None,
                secret: None,
                holds: Holds::Exactly(held),
            },
        );
        // A fleet host's CA is kept with its enrollment; the local one answers local PUTs.
        if info.host.is_none() && st.ca_pem.as_deref() != Some(ca_pem.as_str()) {
            if let Err(e) = save_ca(&self.inner.ca_file, &ca_pem) {
                tracing::warn!(error = %e, file = %self.inner.ca_file.display(), "saving the agent CA");
            }
            st.ca_pem = Some(ca_pem);
        }
        tracing::info!(
            agent_id = %info.agent_id,
            pid = info.pid,
            seq,
            sandboxes = n_sandboxes,
            secrets = n_secrets,
            "agent connected; snapshot queued"
        );
        st.agents.insert(
            conn,
            Agent {
                info,
                tx,
                held: view_held,
                pending,
            },
        );
        Ok(conn)
    }
}
