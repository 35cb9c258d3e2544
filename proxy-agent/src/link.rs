//! The agent's end of the control channel (`veil-link`): connect, say Hello, apply what control
//! sends, acknowledge each message once it is live.
//!
//! An [`AgentMsg::Applied`] is sent only after the change took effect: for a sandbox, its
//! listeners are listening and every program is linked, so a connection started after the
//! acknowledgement is redirected. While control is down the agent keeps enforcing what it has
//! and reconnects with exponential backoff; a reconnection's snapshot is reconciled against the
//! running set, so nothing is attached twice.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;
use tracing::{info, warn};
use veil_link::{AgentMsg, ControlMsg, FrameError, PROTOCOL_VERSION, read_frame, write_frame};

use crate::config::SandboxSpec;
use crate::sandbox::Registry;
use crate::secrets::SecretStore;

/// Why a session with control ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket could not be reached.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The control socket.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The process behind the socket is neither root nor the agent's own user.
    #[error("control socket peer has uid {0}: only root or the agent's own user is trusted")]
    UntrustedPeer(u32),
    /// A frame could not be read or written.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// What the agent tells control about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Stable agent id.
    pub agent_id: String,
    /// PEM of the interception CA certificate.
    pub ca_pem: String,
}

/// Connects to control and keeps the registry and secrets in line with it.
#[derive(Debug)]
pub struct LinkClient {
    /// Control's socket.
    pub socket: PathBuf,
    /// First and longest reconnection delay.
    pub backoff: (Duration, Duration),
    /// Sent in Hello.
    pub identity: Identity,
    /// cgroup2 mount, against which sandbox cgroups are resolved.
    pub cgroup2: PathBuf,
    /// The data path's counters, whose usage and blocked requests are reported to control.
    pub stats: std::sync::Arc<crate::stats::Stats>,
}

impl LinkClient {
    /// Runs sessions forever, reconnecting after each one ends. Cancel by dropping the future
    /// (it never leaves a message half-applied: applying is synchronous).
    pub async fn run(&self, registry: &mut Registry, secrets: &SecretStore) {
        let (min, max) = self.backoff;
        let mut delay = min;
        let mut last_error = String::new();
        loop {
            let mut synced = false;
            match self.session(registry, secrets, &mut synced).await {
                Ok(()) => info!("control closed the link; reconnecting"),
                Err(e) => {
                    // Logged once per distinct failure: a control that is down for long must
                    // not flood the log at the retry rate.
                    let text = e.to_string();
                    if text != last_error {
                        warn!(error = %text, "control link down; keeping the last state");
                        last_error = text;
                    }
                }
            }
            if synced {
                delay = min;
                last_error.clear();
            }
            tokio::time::sleep(delay).await;
            delay = next_delay(delay, max);
        }
    }

    async fn session(
        &self,
        registry: &mut Registry,
        secrets: &SecretStore,
        synced: &mut bool,
    ) -> Result<(), LinkError> {
        let mut stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| LinkError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let uid = stream
            .peer_cred()
            .map_err(|source| LinkError::Connect {
                path: self.socket.clone(),
                source,
            })?
            .uid();
        if !trusted_peer(uid, nix::unistd::geteuid().as_raw()) {
            return Err(LinkError::UntrustedPeer(uid));
        }
        write_frame(
            &mut stream,
            &AgentMsg::Hello {
                protocol: PROTOCOL_VERSION,
                agent_id: self.identity.agent_id.clone(),
                ca_pem: self.identity.ca_pem.clone(),
            },
        )
        .await?;
        info!(socket = %self.socket.display(), "connected to control");
        while let Some(msg) = read_frame::<ControlMsg, _>(&mut stream).await? {
            let seq = msg.seq();
            let is_snapshot = matches!(msg, ControlMsg::Snapshot { .. });
            let errors = apply(msg, registry, secrets, &self.cgroup2);
            for e in &errors {
                warn!(seq, "applying control's change: {e}");
            }
            write_frame(&mut stream, &AgentMsg::Applied { seq, errors }).await?;
            if is_snapshot {
                *synced = true;
                info!(
                    sandboxes = registry.len(),
                    secrets = secrets.len(),
                    "in sync with control"
                );
            }
        }
        Ok(())
    }
}

/// Control may run as root or as the agent's own user; nobody else may steer the agent.
pub fn trusted_peer(peer_uid: u32, own_euid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_euid
}

/// The next reconnection delay: doubled, capped at `max`.
pub fn next_delay(delay: Duration, max: Duration) -> Duration {
    delay.saturating_mul(2).min(max)
}

/// Applies one message from control; returns the per-item failures for `Applied`.
pub fn apply(
    msg: ControlMsg,
    registry: &mut Registry,
    secrets: &SecretStore,
    cgroup2: &Path,
) -> Vec<String> {
    let mut errors = Vec::new();
    match msg {
        ControlMsg::Snapshot {
            sandboxes,
            secrets: values,
            ..
        } => {
            let mut specs = Vec::with_capacity(sandboxes.len());
            for s in &sandboxes {
                match SandboxSpec::from_state(s, cgroup2) {
                    Ok(spec) => specs.push(spec),
                    Err(e) => errors.push(e),
                }
            }
            errors.extend(registry.reconcile(&specs).iter().map(ToString::to_string));
            secrets.replace(&sandboxes, values);
        }
        ControlMsg::PutSandbox { sandbox, .. } => {
            match SandboxSpec::from_state(&sandbox, cgroup2) {
                Ok(spec) => {
                    if let Err(e) = registry.put(&spec) {
                        errors.push(e.to_string());
                    }
                }
                Err(e) => errors.push(e),
            }
            secrets.put_sandbox(&sandbox);
        }
        ControlMsg::DeleteSandbox { id, .. } => {
            if let Err(e) = registry.delete(&id) {
                errors.push(e.to_string());
            }
            secrets.delete_sandbox(&id);
        }
        ControlMsg::PutSecret { secret, .. } => secrets.put_secret(secret),
        ControlMsg::DeleteSecret { id, .. } => secrets.delete_secret(&id),
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_self_is_trusted() {
        assert!(trusted_peer(0, 1000));
        assert!(trusted_peer(1000, 1000));
        assert!(!trusted_peer(1001, 1000));
        assert!(trusted_peer(0, 0));
        assert!(!trusted_peer(65534, 0));
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let max = Duration::from_secs(1);
        let mut d = Duration::from_millis(25);
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_delay(d, max);
            seen.push(d);
        }
        assert_eq!(seen[1], Duration::from_millis(50));
        assert_eq!(seen[5], Duration::from_millis(800));
        assert_eq!(*seen.last().unwrap(), max);
        assert_eq!(next_delay(Duration::MAX, max), max);
    }
}
