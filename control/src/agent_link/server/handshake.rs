//! One agent's connection: its peer credentials checked, its Hello read and checked, then its
//! session — control's messages written in order, the agent's acknowledgements and reports
//! read — until either side closes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use veil_link::{
    AgentMsg, ControlMsg, LocalResponse, PROTOCOL_VERSION, RefusalKind, read_frame, write_frame,
};

use crate::agent_link::AgentRequest;
use crate::bind_rules::Requester;

use super::socket::trusted_peer;
use super::state::{AgentInfo, AgentServer, ReportKind};
use super::usage::{blocked_deltas, usage_deltas};
use crate::timefmt::now_ms;

/// Largest accepted CA PEM.
const MAX_CA_PEM: usize = 64 * 1024;

/// Checks a Hello's fields (its agent id was checked as it was read); the message names the
/// problem (never echoing the PEM).
pub fn check_hello(protocol: u32, ca_pem: &str) -> Result<(), String> {
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "protocol {protocol} is not supported (control speaks {PROTOCOL_VERSION})"
        ));
    }
    if ca_pem.len() > MAX_CA_PEM || !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("ca_pem must be a PEM certificate".into());
    }
    Ok(())
}

/// Who is at the other end of an agent connection, as the transport established it (never
/// from anything the agent says).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A process on this host, on the local socket (its pid from the peer credentials).
    Local {
        /// The peer's pid.
        pid: Option<i32>,
    },
    /// An enrolled host over mutual TLS: the host its client certificate was issued to.
    Host {
        /// The host's name.
        name: String,
        /// This replica's id (recorded with the host's presence).
        replica: String,
    },
}

impl Peer {
    /// The fleet host, if the peer is one.
    pub fn host(&self) -> Option<&str> {
        match self {
            Peer::Local { .. } => None,
            Peer::Host { name, .. } => Some(name),
        }
    }

    fn pid(&self) -> Option<i32> {
        match self {
            Peer::Local { pid } => *pid,
            Peer::Host { .. } => None,
        }
    }
}

impl AgentServer {
    pub(super) async fn serve_agent(self, stream: UnixStream) {
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "agent connection without peer credentials");
                return;
            }
        };
        if !trusted_peer(cred.uid(), nix::unistd::geteuid().as_raw()) {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "refused agent connection: only root or control's own user may connect"
            );
            return;
        }
        let peer = Peer::Local { pid: cred.pid() };
        self.serve_link(stream, peer, std::future::pending()).await;
    }

    /// Serves one authenticated agent connection, from its Hello to its close, or until `stop`
    /// resolves (the peer's authorisation ended: its host was revoked).
    pub async fn serve_link<S, F>(self, stream: S, peer: Peer, stop: F)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
        F: std::future::Future<Output = ()> + Send,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let pid = peer.pid();
        let host = peer.host().map(str::to_owned);
        let hello = tokio::time::timeout(
            self.inner.timeout.max(Duration::from_secs(1)),
            read_frame::<AgentMsg, _>(&mut reader),
        )
        .await;
        let (agent_id, ca_pem) = match hello {
            Ok(Ok(Some(AgentMsg::Hello {
                protocol,
                agent_id,
                ca_pem,
            }))) => match check_hello(protocol, &ca_pem) {
                Ok(()) => (agent_id, ca_pem),
                Err(problem) => {
                    tracing::warn!(pid, host, %problem, "refused agent Hello");
                    return;
                }
            },
            Ok(Ok(Some(_))) => {
                tracing::warn!(pid, host, "agent spoke before Hello; closing");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(pid, host, error = %e, "reading agent Hello");
                return;
            }
            Err(_) => {
                tracing::warn!(pid, host, "no Hello from agent in time; closing");
                return;
            }
        };
        let info = AgentInfo {
            agent_id,
            pid,
            host,
            connected_since: now_ms(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<ControlMsg>();
        let replies = tx.clone();
        // The snapshot is read from the store: off the async workers.
        let (this, admitted) = (self.clone(), info.clone());
        let ca_pem_kept = ca_pem.clone();
        let admitted = tokio::task::spawn_blocking(move || this.admit(admitted, ca_pem, tx))
            .await
            .unwrap_or_else(|e| Err(crate::agent_link::BuildError::Task(e.to_string()).into()));
        let conn = match admitted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(agent_id = %info.agent_id, error = %e, "cannot build the agent snapshot");
                return;
            }
        };
        self.record_presence(&peer, &info.agent_id, Some(&ca_pem_kept));
        let write = async {
            while let Some(msg) = rx.recv().await {
                if let Err(e) = write_frame(&mut writer, &msg).await {
                    tracing::warn!(agent_id = %info.agent_id, error = %e, "writing to agent");
                    break;
                }
            }
        };
        // Who the agent's requests come from: its host is the link's, never its own word.
        let who = Requester {
            agent: info.agent_id.clone(),
            host: info.host.clone(),
        };
        let read = async {
            loop {
                match read_frame::<AgentMsg, _>(&mut reader).await {
                    Ok(Some(AgentMsg::Applied { seq, errors })) => self.applied(conn, seq, errors),
                    Ok(Some(AgentMsg::Usage { at_ms, reports })) => self.report(
                        &info.agent_id,
                        ReportKind::Usage,
                        usage_deltas(at_ms, reports),
                    ),
                    Ok(Some(AgentMsg::Blocked { events })) => {
                        self.report(&info.agent_id, ReportKind::Blocked, blocked_deltas(events))
                    }
                    Ok(Some(AgentMsg::Describe { req, sandbox })) => {
                        self.request(
                            &who,
                            &replies,
                            Some(req),
                            AgentRequest::Describe { sandbox },
                        );
                    }
                    Ok(Some(AgentMsg::Bind {
                        req,
                        sandbox,
                        cgroup,
                        cgroup_id,
                        netns,
                    })) => {
                        let request = AgentRequest::Bind {
                            sandbox,
                            cgroup: cgroup.to_string_lossy().into_owned(),
                            cgroup_id,
                            netns: netns.map(|n| n.to_string_lossy().into_owned()),
                        };
                        self.request(&who, &replies, Some(req), request);
                    }
                    Ok(Some(AgentMsg::Unbind { req, sandbox })) => {
                        self.request(&who, &replies, Some(req), AgentRequest::Unbind { sandbox });
                    }
                    Ok(Some(AgentMsg::Gone { sandbox, cgroup_id })) => {
                        self.request(
                            &who,
                            &replies,
                            None,
                            AgentRequest::Gone { sandbox, cgroup_id },
                        );
                    }
                    Ok(Some(AgentMsg::Hello { .. })) => {
                        tracing::warn!(agent_id = %info.agent_id, "second Hello; closing");
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(agent_id = %info.agent_id, error = %e, "reading from agent");
                        break;
                    }
                }
            }
        };
        tokio::select! {
            () = write => {}
            () = read => {}
            () = stop => {
                tracing::warn!(agent_id = %info.agent_id, host = info.host, "agent's host no longer authorised; disconnecting");
            }
        }
        // Dropping the entry fails its pending acknowledgements (the waiters see a disconnect).
        self.lock().agents.remove(&conn);
        self.inner.acked.notify_waiters();
        self.inner.changed.notify_one();
        self.record_presence(&peer, &info.agent_id, None);
        tracing::info!(agent_id = %info.agent_id, "agent disconnected");
    }

    /// Records a fleet host's agent connecting (with its CA) or leaving, for every replica to
    /// see; in the background (presence is information, never a gate of the link).
    fn record_presence(&self, peer: &Peer, agent_id: &veil_link::AgentId, ca_pem: Option<&str>) {
        let Peer::Host { name, replica } = peer else {
            return;
        };
        let (store, name, replica, agent_id, ca_pem) = (
            self.inner.store.clone(),
            name.clone(),
            replica.clone(),
            agent_id.to_string(),
            ca_pem.map(str::to_owned),
        );
        tokio::task::spawn_blocking(move || {
            let Some(fleet) = store.fleet() else { return };
            let done = match &ca_pem {
                Some(ca) => fleet.host_connected(&name, &replica, &agent_id, ca, now_ms()),
                None => fleet.host_disconnected(&name, &replica, &agent_id, now_ms()),
            };
            if let Err(e) = done {
                tracing::warn!(host = %name, error = %e, "recording the fleet host's presence");
            }
        });
    }
}

impl AgentServer {
    /// Hands an agent's request to the binder off the read loop (a bind waits for the agents'
    /// acknowledgements, which this loop reads); the answer, if `req` asks for one, goes back
    /// as a Reply.
    fn request(
        &self,
        agent: &Requester,
        replies: &mpsc::UnboundedSender<ControlMsg>,
        req: Option<u64>,
        request: AgentRequest,
    ) {
        let (binder, agent, replies) = (
            self.inner.binder.get().cloned(),
            agent.clone(),
            replies.clone(),
        );
        tokio::spawn(async move {
            let outcome = match binder {
                Some(binder) => binder.handle(agent, request).await,
                None => LocalResponse::Refused {
                    kind: RefusalKind::Unavailable,
                    message: "veil-control is starting; retry".into(),
                },
            };
            if let Some(req) = req {
                // A closed channel: the agent went away, and its tool sees the link drop.
                let _ = replies.send(ControlMsg::Reply { req, outcome });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_link::server::socket::trusted_peer;

    #[test]
    fn peers_and_hellos() {
        assert!(trusted_peer(0, 0));
        assert!(trusted_peer(1000, 1000));
        assert!(!trusted_peer(65534, 0));
        let pem = "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n";
        check_hello(PROTOCOL_VERSION, pem).unwrap();
        assert!(check_hello(PROTOCOL_VERSION + 1, pem).is_err());
        assert!(check_hello(PROTOCOL_VERSION, "not a pem").is_err());
        // The agent id is checked as the Hello is read: a malformed one is no Hello at all.
        for bad in ["", "a b", "agent-1"] {
            let hello = serde_json::json!({"type": "hello", "protocol": PROTOCOL_VERSION,
                                           "agent_id": bad, "ca_pem": pem});
            assert!(
                serde_json::from_value::<AgentMsg>(hello).is_err(),
                "{bad:?}"
            );
        }
    }
}
