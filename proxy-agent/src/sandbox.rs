//! The running sandboxes: for each, its listeners, accept loops and eBPF attachment.
//!
//! Adding a sandbox opens its listeners first (their ports go into the redirect map), then
//! attaches the programs; removing detaches first, so no connection is ever redirected to a
//! listener that is already closed.

use std::collections::BTreeMap;
use std::sync::Arc;

use proxy_common::SandboxTarget;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::bpf::{Attachment, Bpf, BpfError};
use crate::config::{SandboxId, SandboxSpec};
use crate::proxy::{self, Proxy, SandboxTag};
use crate::sockets;

/// A sandbox that could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Its listeners could not be created.
    #[error("sandbox {id}: cannot open listeners: {source}")]
    Listen {
        /// The sandbox.
        id: SandboxId,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Its programs could not be attached or detached.
    #[error("sandbox {id}: {source}")]
    Bpf {
        /// The sandbox.
        id: SandboxId,
        /// The underlying error.
        source: BpfError,
    },
}

#[derive(Debug)]
struct Running {
    spec: SandboxSpec,
    attachment: Attachment,
    cancel: CancellationToken,
}

/// The set of sandboxes this agent serves.
#[derive(Debug)]
pub struct Registry {
    bpf: Bpf,
    proxy: Arc<Proxy>,
    backlog: u32,
    running: BTreeMap<SandboxId, Running>,
}

impl Registry {
    /// An empty registry over loaded programs.
    pub fn new(bpf: Bpf, proxy: Arc<Proxy>, backlog: u32) -> Self {
        Self {
            bpf,
            proxy,
            backlog,
            running: BTreeMap::new(),
        }
    }

    /// The loaded programs (for counters).
    pub fn bpf(&self) -> &Bpf {
        &self.bpf
    }

    /// Number of running sandboxes.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether no sandbox runs.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Brings the running set to `desired`; a failing sandbox does not stop the others.
    ///
    /// Must run inside the tokio runtime (listeners register with its reactor).
    pub fn reconcile(&mut self, desired: &[SandboxSpec]) -> Vec<SandboxError> {
        let mut errors = Vec::new();
        let wanted: BTreeMap<&SandboxId, &SandboxSpec> =
            desired.iter().map(|s| (&s.id, s)).collect();
        let stale: Vec<SandboxId> = self
            .running
            .iter()
            .filter(|(id, r)| wanted.get(id).is_none_or(|spec| **spec != r.spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Err(e) = self.remove(&id) {
                errors.push(e);
            }
        }
        for spec in desired {
            if !self.running.contains_key(&spec.id)
                && let Err(e) = self.add(spec.clone())
            {
                errors.push(e);
            }
        }
        errors
    }

    fn add(&mut self, spec: SandboxSpec) -> Result<(), SandboxError> {
        let id = spec.id.clone();
        let socks =
            sockets::open_listeners(spec.netns.as_deref(), self.backlog).map_err(|source| {
                SandboxError::Listen {
                    id: id.clone(),
                    source,
                }
            })?;
        let listen_err = |source| SandboxError::Listen {
            id: id.clone(),
            source,
        };
        let mut listeners = vec![TcpListener::from_std(socks.v4).map_err(listen_err)?];
        if let Some(v6) = socks.v6 {
            listeners.push(TcpListener::from_std(v6).map_err(listen_err)?);
        }
        let port = |l: &TcpListener| l.local_addr().map(|a| a.port()).map_err(listen_err);
        let target = SandboxTarget {
            port_v4: port(&listeners[0])?,
            port_v6: listeners.get(1).map(port).transpose()?.unwrap_or(0),
            _pad: 0,
        };
        let attachment =
            self.bpf
                .attach(&spec.cgroup, target)
                .map_err(|source| SandboxError::Bpf {
                    id: id.clone(),
                    source,
                })?;
        let cancel = CancellationToken::new();
        let tag = Arc::new(SandboxTag {
            id: id.clone(),
            netns_cookie: socks.netns_cookie,
        });
        for listener in listeners {
            tokio::spawn(proxy::serve(
                self.proxy.clone(),
                tag.clone(),
                listener,
                cancel.clone(),
            ));
        }
        info!(sandbox = %id, cgroup = %spec.cgroup.display(),
              netns = ?spec.netns, port_v4 = target.port_v4, port_v6 = target.port_v6,
              "sandbox attached");
        self.running.insert(
            id,
            Running {
                spec,
                attachment,
                cancel,
            },
        );
        Ok(())
    }

    fn remove(&mut self, id: &SandboxId) -> Result<(), SandboxError> {
        let Some(running) = self.running.remove(id) else {
            return Ok(());
        };
        // Close the listeners even when detaching fails: nothing new may reach them.
        let detached = self.bpf.detach(running.attachment);
        running.cancel.cancel();
        detached.map_err(|source| SandboxError::Bpf {
            id: id.clone(),
            source,
        })?;
        info!(sandbox = %id, "sandbox detached");
        Ok(())
    }

    /// Closes every listener but leaves the programs attached, so that while the agent stops,
    /// sandbox connections are refused rather than sent around veil.
    pub fn stop_accepting(&self) {
        for running in self.running.values() {
            running.cancel.cancel();
        }
    }
}
