//! The sandboxes this agent enforces: for each, its listeners, accept loops, map entry and
//! pinned links, and the persistent record that lets a restarted agent adopt it.
//!
//! Starting a sandbox opens its listeners first, lists their ports in the bind guard (no
//! sandbox process may bind them in that netns, whether or not the agent runs) and among the
//! netns's reserved ports (the kernel never hands them out by itself, see [`crate::reserved`]),
//! puts them in the redirect map, then makes sure every program is linked (a pinned link left
//! by an earlier agent is kept, never attached twice). Only [`Registry::delete`] (control's DeleteSandbox, or reconciling to a
//! snapshot without the sandbox) unpins and removes the entry; stopping the agent closes the
//! listeners and leaves the redirect in place, so connections are refused rather than sent
//! around veil.
//!
//! A sandbox no secret applies to, leaving from its own netns, is flagged direct in its map
//! entry ([`crate::direct`]): its connects skip the redirect. [`Registry::sync_direct`] brings
//! every flag in line with the secrets after each change from control, before it is
//! acknowledged; a sandbox being (re)started keeps the flag it had only while the secrets do
//! not know it yet (an agent adopting its sandboxes before control is reachable).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use veil_link::{OrgId, SandboxId};

use crate::bpf::{self, Bpf, BpfError};
use crate::config::SandboxSpec;
use crate::direct::{self, direct_allowed};
use crate::proxy::{self, Proxy, SandboxTag};
use crate::state::{SandboxFile, SandboxRecord, StateError};
use crate::{reserved, sockets};

/// A sandbox that could not be started, adopted or removed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Its listeners could not be created.
    #[error("sandbox {id}: cannot open listeners: {source}")]
    Listen {
        /// The sandbox.
        id: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Its programs or map entry could not be set up or removed.
    #[error("sandbox {id}: {source}")]
    Bpf {
        /// The sandbox.
        id: String,
        /// The underlying error.
        source: BpfError,
    },
    /// Another sandbox already owns the cgroup.
    #[error("sandbox {id}: cgroup is already used by sandbox {other}")]
    CgroupTaken {
        /// The sandbox.
        id: String,
        /// The sandbox that has the cgroup.
        other: String,
    },
    /// The persistent sandbox set could not be written.
    #[error("saving the sandbox set: {0}")]
    State(#[from] StateError),
}

/// Accept loops of a sandbox whose listeners are open.
#[derive(Debug)]
struct Live {
    cancel: CancellationToken,
}

/// How a sandbox came to be started, for the log and for undoing a failed start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// New to this agent: undo everything on failure.
    Fresh,
    /// Known from the record: on failure keep its pins, so it stays fail-closed.
    Known,
}

/// The set of sandboxes this agent serves.
#[derive(Debug)]
pub struct Registry {
    bpf: Bpf,
    proxy: Arc<Proxy>,
    backlog: u32,
    file: SandboxFile,
    /// Every sandbox whose pins and map entry this agent manages (persisted).
    records: BTreeMap<String, SandboxRecord>,
    /// The subset whose listeners are open.
    live: BTreeMap<String, Live>,
    /// The sandboxes whose map entry is flagged direct (as this agent last wrote or found it).
    direct: BTreeSet<String>,
}

impl Registry {
    /// A registry over loaded programs and the sandbox set left in `file` (not yet adopted).
    pub fn open(
        bpf: Bpf,
        proxy: Arc<Proxy>,
        backlog: u32,
        file: SandboxFile,
    ) -> Result<Self, StateError> {
        let records = file.load()?;
        Ok(Self {
            bpf,
            proxy,
            backlog,
            file,
            records,
            live: BTreeMap::new(),
            direct: BTreeSet::new(),
        })
    }

    /// The loaded programs (for counters).
    pub fn bpf(&self) -> &Bpf {
        &self.bpf
    }

    /// Number of sandboxes with open listeners.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no sandbox is served.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Number of sandboxes known (served or kept fail-closed).
    pub fn known(&self) -> usize {
        self.records.len()
    }

    /// Re-adopts every recorded sandbox without control: reopens listeners (previous ports
    /// first), updates the map entry, keeps the pinned links. A sandbox whose cgroup is gone is
    /// dropped; one that cannot be served (netns gone, or an id or organization the current
    /// rule refuses) stays pinned, refusing connections, and is logged.
    ///
    /// Must run inside the tokio runtime (listeners register with its reactor).
    pub fn adopt(&mut self) -> Vec<SandboxError> {
        let mut errors = Vec::new();
        let records: Vec<SandboxRecord> = self.records.values().cloned().collect();
        // What the previous agent decided stays until control's state says otherwise: a
        // secretless sandbox keeps going direct across a restart.
        for record in &records {
            if let Ok(Some(target)) = self.bpf.sandbox(record.cgroup_id)
                && target.direct()
            {
                self.direct.insert(record.id.clone());
            }
        }
        for record in records {
            match bpf::cgroup_id(&record.cgroup) {
                Ok(id) if id == record.cgroup_id => {}
                _ => {
                    info!(sandbox = %record.id, cgroup = %record.cgroup.display(),
                          "cgroup is gone; forgetting the sandbox");
                    self.records.remove(&record.id);
                    if let Err(e) = self.unpin(record.cgroup_id) {
                        errors.push(bpf_error(&record.id, e));
                    }
                    continue;
                }
            }
            let spec = match (
                SandboxId::parse(record.id.as_str()),
                OrgId::parse(record.org.as_str()),
            ) {
                (Ok(id), Ok(org)) => SandboxSpec {
                    id,
                    org,
                    cgroup: record.cgroup.clone(),
                    netns: record.netns.clone(),
                    egress: record.egress,
                },
                // Written by an agent with a looser rule: its links and map entry stay, its
                // listeners stay closed, so its connections are refused, never sent around veil.
                // Control's next snapshot removes it (control never registers such an id).
                (Err(why), _) | (_, Err(why)) => {
                    warn!(sandbox = %record.id.escape_debug(), cgroup = %record.cgroup.display(),
                          "{why}; sandbox left fail-closed (redirected, connections refused)");
                    continue;
                }
            };
            if let Err(e) = self.start(&spec, Some((record.port_v4, record.port_v6)), Origin::Known)
            {
                errors.push(e);
            }
        }
        if let Err(e) = self.persist() {
            errors.push(e);
        }
        errors
    }

    /// Registers or updates one sandbox; a no-op when it is already served as asked.
    pub fn put(&mut self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let id = spec.id.as_str();
        if let Some(record) = self.records.get(id) {
            // Same path but a new directory (the container's cgroup was recreated): the old
            // links guard a cgroup that is gone, so the sandbox starts over.
            let same = record.cgroup == spec.cgroup
                && record.netns == spec.netns
                && bpf::cgroup_id(&spec.cgroup).is_ok_and(|id| id == record.cgroup_id);
            let prefer = (record.port_v4, record.port_v6);
            let record_egress = record.egress;
            let org_changed = record.org != spec.org.as_str();
            if same {
                if org_changed {
                    if let Some(r) = self.records.get_mut(id) {
                        r.org = spec.org.to_string();
                    }
                    self.persist()?;
                }
                if self.live.contains_key(id) && record_egress == spec.egress {
                    return Ok(());
                }
                // New egress: new listeners and tag; the links and the redirect stay in place.
                return self.start(spec, Some(prefer), Origin::Known);
            }
            // Moved to another cgroup or netns: start over.
            self.delete(id)?;
        }
        if let Some(other) = self.records.values().find(|r| r.cgroup == spec.cgroup) {
            return Err(SandboxError::CgroupTaken {
                id: id.to_owned(),
                other: other.id.clone(),
            });
        }
        self.start(spec, None, Origin::Fresh)
    }

    fn start(
        &mut self,
        spec: &SandboxSpec,
        prefer: Option<(u16, u16)>,
        origin: Origin,
    ) -> Result<(), SandboxError> {
        let id = spec.id.as_str();
        let cgroup_id = bpf::cgroup_id(&spec.cgroup).map_err(|e| bpf_error(id, e))?;
        let listen_err = |source| SandboxError::Listen {
            id: id.to_owned(),
            source,
        };
        let socks = sockets::open_listeners(spec.netns.as_deref(), self.backlog, prefer)
            .map_err(listen_err)?;
        let mut listeners = vec![TcpListener::from_std(socks.v4).map_err(listen_err)?];
        if let Some(v6) = socks.v6 {
            listeners.push(TcpListener::from_std(v6).map_err(listen_err)?);
        }
        let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).map_err(listen_err);
        let ports = (
            port(&listeners[0])?,
            listeners.get(1).map(port).transpose()?.unwrap_or(0),
        );
        // Secrets known: they decide. Unknown (adopting before control's state): a sandbox
        // keeps its flag, a new one is redirected.
        let direct = match self.proxy.secrets.secrets_apply(id) {
            Some(apply) => direct_allowed(apply, spec.egress),
            None => {
                origin == Origin::Known
                    && self.direct.contains(id)
                    && direct_allowed(false, spec.egress)
            }
        };
        let target = direct::target(ports, direct);
        let guarded: BTreeSet<_> = [target.port_v4, target.port_v6]
            .into_iter()
            .filter(|&p| p != 0)
            .map(|p| bpf::port_key(socks.netns_cookie, p))
            .collect();
        let previous: Vec<u16> = self
            .records
            .get(id)
            .filter(|r| r.netns == spec.netns)
            .map(|r| vec![r.port_v4, r.port_v6])
            .unwrap_or_default();
        let ports = [target.port_v4, target.port_v6];
        if let Err(e) = reserved::update(spec.netns.as_deref(), &ports, &previous) {
            warn!(sandbox = %id, error = %e, "cannot reserve the listener ports in the netns");
        }
        let written = self
            .bpf
            .set_listener_ports(cgroup_id, &guarded)
            .and_then(|()| self.bpf.set_target(cgroup_id, target));
        if written.is_ok() {
            if direct {
                self.direct.insert(id.to_owned());
            } else {
                self.direct.remove(id);
            }
        }
        let linked = written.and_then(|()| self.bpf.ensure_links(&spec.cgroup, cgroup_id));
        let report = match linked {
            Ok(report) => report,
            Err(e) => {
                if origin == Origin::Fresh {
                    // Best effort; the original error is the one worth reporting.
                    let _ = self.unpin(cgroup_id);
                }
                return Err(bpf_error(id, e));
            }
        };
        let cancel = CancellationToken::new();
        let tag = Arc::new(SandboxTag::new(
            spec,
            cgroup_id,
            socks.netns_cookie,
            &self.proxy,
        ));
        for listener in listeners {
            tokio::spawn(proxy::serve(
                self.proxy.clone(),
                tag.clone(),
                listener,
                cancel.clone(),
            ));
        }
        info!(sandbox = %id, cgroup = %spec.cgroup.display(), netns = ?spec.netns,
              port_v4 = target.port_v4, port_v6 = target.port_v6, direct,
              attached = report.attached, kept = report.reused, replaced = report.replaced,
              "sandbox {}", if origin == Origin::Fresh { "attached" } else { "adopted" });
        if let Some(old) = self.live.insert(id.to_owned(), Live { cancel }) {
            old.cancel.cancel();
        }
        self.records.insert(
            id.to_owned(),
            SandboxRecord {
                id: id.to_owned(),
                org: spec.org.to_string(),
                cgroup: spec.cgroup.clone(),
                netns: spec.netns.clone(),
                cgroup_id,
                port_v4: target.port_v4,
                port_v6: target.port_v6,
                egress: spec.egress,
            },
        );
        self.persist()
    }

    /// Detaches a sandbox for good: unpins its links, removes its map entry, closes its
    /// listeners. Unknown ids are fine.
    pub fn delete(&mut self, id: &str) -> Result<(), SandboxError> {
        let live = self.live.remove(id);
        self.direct.remove(id);
        let Some(record) = self.records.remove(id) else {
            if let Some(live) = live {
                live.cancel.cancel();
            }
            return Ok(());
        };
        // Detach before closing: nothing is ever redirected to a closed listener meanwhile.
        let detached = self.unpin(record.cgroup_id);
        if let Some(live) = live {
            live.cancel.cancel();
        }
        let ports = [record.port_v4, record.port_v6];
        if let Err(e) = reserved::update(record.netns.as_deref(), &[], &ports) {
            // A netns that is gone took its reservations along.
            info!(sandbox = %id, error = %e, "listener ports not unreserved");
        }
        self.persist()?;
        detached.map_err(|e| bpf_error(id, e))?;
        info!(sandbox = %id, "sandbox detached");
        Ok(())
    }

    fn unpin(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        let unpinned = bpf::unpin_sandbox(self.bpf.pins(), cgroup_id);
        let removed = self.bpf.remove_target(cgroup_id);
        let ports = self.bpf.set_listener_ports(cgroup_id, &BTreeSet::new());
        unpinned.and(removed).and(ports)
    }

    /// Brings the set to exactly `desired` (control's snapshot); a failing sandbox does not
    /// stop the others. Pins and map entries that belong to no known sandbox (left by a crash
    /// between pinning and recording) are removed.
    pub fn reconcile(&mut self, desired: &[SandboxSpec]) -> Vec<SandboxError> {
        let mut errors = Vec::new();
        let wanted: BTreeSet<&str> = desired.iter().map(|s| s.id.as_str()).collect();
        let stale: Vec<String> = self
            .records
            .keys()
            .chain(self.live.keys())
            .filter(|id| !wanted.contains(id.as_str()))
            .cloned()
            .collect();
        for id in stale {
            if let Err(e) = self.delete(&id) {
                errors.push(e);
            }
        }
        for spec in desired {
            if let Err(e) = self.put(spec) {
                errors.push(e);
            }
        }
        let known: BTreeSet<u64> = self.records.values().map(|r| r.cgroup_id).collect();
        let pinned = self.bpf.pins().pinned_cgroups().unwrap_or_default();
        let entries = self.bpf.target_ids();
        for cgroup_id in pinned.into_iter().chain(entries) {
            if !known.contains(&cgroup_id) {
                info!(cgroup_id, "removing pins of an unknown sandbox");
                if let Err(e) = self.unpin(cgroup_id) {
                    errors.push(bpf_error(&format!("cgroup {cgroup_id}"), e));
                }
            }
        }
        if let Err(e) = self
            .bpf
            .retain_listener_ports(|owner| known.contains(&owner))
        {
            errors.push(bpf_error("listener ports", e));
        }
        errors
    }

    /// Flags each sandbox direct or not as its secrets now say ([`direct_allowed`]); a sandbox
    /// whose listeners are not open, or that the secrets do not know, is redirected (fail
    /// closed). Writes only the entries that change. Call after every change from control and
    /// before acknowledging it: a sandbox that just got its first secret is redirected from
    /// then on.
    pub fn sync_direct(&mut self) -> Vec<SandboxError> {
        let mut errors = Vec::new();
        let secrets = self.proxy.secrets.clone();
        let records: Vec<(String, u64, (u16, u16), veil_link::Egress)> = self
            .records
            .values()
            .map(|r| (r.id.clone(), r.cgroup_id, (r.port_v4, r.port_v6), r.egress))
            .collect();
        for (id, cgroup_id, ports, egress) in records {
            let wanted = self.live.contains_key(&id)
                && secrets
                    .secrets_apply(&id)
                    .is_some_and(|apply| direct_allowed(apply, egress));
            if wanted == self.direct.contains(&id) {
                continue;
            }
            match self
                .bpf
                .set_target(cgroup_id, direct::target(ports, wanted))
            {
                Ok(()) => {
                    info!(sandbox = %id, direct = wanted, "{}", if wanted {
                        "no secret applies: connections go direct"
                    } else {
                        "secrets apply: connections are redirected"
                    });
                    if wanted {
                        self.direct.insert(id);
                    } else {
                        self.direct.remove(&id);
                    }
                }
                Err(e) => {
                    // Failing to clear the flag would leave the sandbox outside veil: remove
                    // the entry instead, which refuses its connects (fail closed).
                    if !wanted {
                        warn!(sandbox = %id, error = %e, "cannot redirect the sandbox; removing its entry");
                        if self.bpf.remove_target(cgroup_id).is_ok() {
                            self.direct.remove(&id);
                        }
                    }
                    errors.push(bpf_error(&id, e));
                }
            }
        }
        errors
    }

    /// Whether the sandbox's map entry is flagged direct.
    pub fn is_direct(&self, id: &str) -> bool {
        self.direct.contains(id)
    }

    /// The ids of the served sandboxes.
    pub fn ids(&self) -> Vec<String> {
        self.live.keys().cloned().collect()
    }

    /// Closes every listener but leaves the programs attached, so that while the agent stops,
    /// sandbox connections are refused rather than sent around veil.
    pub fn stop_accepting(&self) {
        for live in self.live.values() {
            live.cancel.cancel();
        }
    }

    fn persist(&self) -> Result<(), SandboxError> {
        Ok(self.file.store(&self.records)?)
    }
}

fn bpf_error(id: &str, source: BpfError) -> SandboxError {
    SandboxError::Bpf {
        id: id.to_owned(),
        source,
    }
}
