//! One agent's connection: its peer credentials checked, its Hello read and checked, then its
//! session — control's messages written in order, the agent's acknowledgements and reports
//! read — until either side closes.

use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::mpsc;
use veil_link::{
    AgentId, AgentMsg, ControlMsg, LocalResponse, PROTOCOL_VERSION, RefusalKind, read_frame,
    write_frame,
};

use crate::agent_link::AgentRequest;

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
        let (mut reader, mut writer) = stream.into_split();
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
                    tracing::warn!(pid = cred.pid(), %problem, "refused agent Hello");
                    return;
                }
            },
            Ok(Ok(Some(_))) => {
                tracing::warn!(pid = cred.pid(), "agent spoke before Hello; closing");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(pid = cred.pid(), error = %e, "reading agent Hello");
                return;
            }
            Err(_) => {
                tracing::warn!(pid = cred.pid(), "no Hello from agent in time; closing");
                return;
            }
        };
        let info = AgentInfo {
            agent_id,
            pid: cred.pid(),
            connected_since: now_ms(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<ControlMsg>();
        let replies = tx.clone();
        // The snapshot is read from the store: off the async workers.
        let (this, admitted) = (self.clone(), info.clone());
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
        let write = async {
            while let Some(msg) = rx.recv().await {
                if let Err(e) = write_frame(&mut writer, &msg).await {
                    tracing::warn!(agent_id = %info.agent_id, error = %e, "writing to agent");
                    break;
                }
            }
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
                            &info.agent_id,
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
                        self.request(&info.agent_id, &replies, Some(req), request);
                    }
                    Ok(Some(AgentMsg::Unbind { req, sandbox })) => {
                        self.request(
                            &info.agent_id,
                            &replies,
                            Some(req),
                            AgentRequest::Unbind { sandbox },
                        );
                    }
                    Ok(Some(AgentMsg::Gone { sandbox, cgroup_id })) => {
                        self.request(
                            &info.agent_id,
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
        }
        // Dropping the entry fails its pending acknowledgements (the waiters see a disconnect).
        self.lock().agents.remove(&conn);
        self.inner.acked.notify_waiters();
        self.inner.changed.notify_one();
        tracing::info!(agent_id = %info.agent_id, "agent disconnected");
    }
}

impl AgentServer {
    /// Hands an agent's request to the binder off the read loop (a bind waits for the agents'
    /// acknowledgements, which this loop reads); the answer, if `req` asks for one, goes back
    /// as a Reply.
    fn request(
        &self,
        agent: &AgentId,
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
