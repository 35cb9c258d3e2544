//! The snapshot a newly connected agent receives: every sandbox, every secret mounted in one
//! (unsealed for the agent) and every retired one of their organizations, queued atomically
//! with the agent's registration so no change can slip between the two.

use std::collections::HashMap;

use tokio::sync::mpsc;
use veil_link::ControlMsg;

use super::socket::save_ca;
use super::state::{Agent, AgentInfo, AgentServer, Holds, Pending};
use crate::agent_link::plan::RegistryView;
use crate::agent_link::unseal::{unseal_for_agent, unseal_retired_for_agent};
use crate::agent_link::{AgentLinkError, BuildError};

impl AgentServer {
    /// Registers a Hello'd agent and queues its snapshot, atomically with respect to changes.
    pub(super) fn admit(
        &self,
        info: AgentInfo,
        ca_pem: String,
        tx: mpsc::UnboundedSender<ControlMsg>,
    ) -> Result<u64, AgentLinkError> {
        let mut st = self.lock();
        let view = RegistryView::load(self.inner.store.as_ref()).map_err(BuildError::from)?;
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
        let held = view
            .held()
            .into_iter()
            .map(|(id, stamp)| (id, stamp.revision))
            .collect();
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
        if st.ca_pem.as_deref() != Some(ca_pem.as_str()) {
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
                held: view.held(),
                pending,
            },
        );
        Ok(conn)
    }
}
