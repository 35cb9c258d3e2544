//! The snapshot a newly connected agent receives: every sandbox, every secret mounted in one
//! (unsealed for the agent) and every retired one of their organizations, queued atomically
//! with the agent's registration so no change can slip between the two.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use veil_link::ControlMsg;

use super::snapshot_cache::Built;
use super::socket::save_ca;
use super::state::{Agent, AgentInfo, AgentServer, Holds, LinkState, Pending};
use crate::agent_link::plan::RegistryView;
use crate::agent_link::unseal::{unseal_for_agent, unseal_retired_for_agent};
use crate::agent_link::{AgentLinkError, BuildError};

/// How often an admission tries a shared snapshot before reading the store under the lock.
const SHARED_TRIES: usize = 3;

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
        st.generation += 1;
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

    /// The snapshot for `host` shared at the current generation (read and built if none is),
    /// with that generation. Blocks on the store.
    fn shared_snapshot(&self, host: Option<&str>) -> Result<(u64, Arc<Built>), AgentLinkError> {
        let mut cache = self
            .inner
            .snapshots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Read before the store is: a change dispatched after this makes the entry unusable.
        let generation = self.lock().generation;
        let now = Instant::now();
        cache.refresh(generation, now);
        let built = cache.get_or_build(
            host,
            now,
            || {
                RegistryView::load(self.inner.store.as_ref())
                    .map_err(|e| AgentLinkError::from(BuildError::from(e)))
            },
            |view| self.build(view),
        )?;
        Ok((cache.generation(), built))
    }

    /// Registers a Hello'd agent and queues its snapshot, atomically with respect to changes.
    /// Blocks on the store: call from a blocking thread.
    pub(super) fn admit(
        &self,
        info: AgentInfo,
        ca_pem: String,
        tx: mpsc::UnboundedSender<ControlMsg>,
    ) -> Result<u64, AgentLinkError> {
        // A snapshot shared since the last change, read outside the state lock; registered only
        // if no change was dispatched meanwhile. Under a stream of changes, the agent's own read
        // under the lock (as every agent once did) ends the retries.
        let mut shared = None;
        for _ in 0..SHARED_TRIES {
            let (generation, built) = self.shared_snapshot(info.host.as_deref())?;
            let st = self.lock();
            if st.generation == generation {
                shared = Some((st, built));
                break;
            }
        }
        let (mut st, built) = match shared {
            Some(found) => found,
            None => {
                let st = self.lock();
                let view = RegistryView::load(self.inner.store.as_ref())
                    .map_err(BuildError::from)?
                    .for_host(info.host.as_deref());
                (st, Arc::new(self.build(&view)?))
            }
        };
        let Built {
            sandboxes,
            secrets,
            acks: held,
            held: view_held,
        } = Arc::unwrap_or_clone(built);
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

#[cfg(test)]
mod tests {
    use std::sync::RwLock;
    use std::time::Duration;

    use veil_link::SandboxId;

    use super::*;
    use crate::agent_link::plan::Change;
    use crate::store::{AuditRecord, SandboxRecord, Store};

    fn audit() -> AuditRecord {
        crate::store::conformance::fixtures::audit("acme")
    }

    fn sandbox(id: &str) -> SandboxRecord {
        SandboxRecord {
            egress: Default::default(),
            id: SandboxId::parse(id).unwrap(),
            org: crate::store::OrgId::parse("acme").unwrap(),
            cgroup: format!("veil.slice/{id}"),
            netns: None,
            bound: true,
            keep: false,
            cgroup_id: None,
            mounts: Vec::new(),
            host: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    /// The sandboxes of the snapshot a newly admitted agent was sent.
    fn admitted(server: &AgentServer) -> Vec<String> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let info = AgentInfo {
            agent_id: veil_link::AgentId::parse("a".repeat(32)).unwrap(),
            pid: None,
            host: None,
            connected_since: 0,
        };
        let pem = "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n".to_owned();
        server.admit(info, pem, tx).unwrap();
        match rx.try_recv() {
            Ok(ControlMsg::Snapshot { sandboxes, .. }) => {
                sandboxes.into_iter().map(|s| s.id.to_string()).collect()
            }
            _ => panic!("no snapshot queued"),
        }
    }

    #[tokio::test]
    async fn a_change_between_two_admissions_reaches_the_second_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sled::SledStore::open(&dir.path().join("db")).unwrap());
        let ring = crate::crypto::Keyring::open_or_create(dir.path()).unwrap();
        let (server, task) = AgentServer::bind(
            &dir.path().join("agent.sock"),
            dir.path(),
            Duration::from_secs(1),
            store.clone(),
            Arc::new(RwLock::new(ring)),
            Vec::new(),
        )
        .unwrap();
        store.put_sandbox(&sandbox("one"), audit()).unwrap();
        assert_eq!(admitted(&server), ["one"]);
        assert_eq!(admitted(&server), ["one"], "shared while nothing changed");
        store.put_sandbox(&sandbox("two"), audit()).unwrap();
        let two = SandboxId::parse("two").unwrap();
        server.dispatch(Change::Sandbox(&two)).unwrap();
        assert_eq!(
            admitted(&server),
            ["one", "two"],
            "a dispatched change is in every later snapshot"
        );
        task.abort();
    }
}
