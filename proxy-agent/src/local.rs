//! The local binding socket ([`veil_link::local`]): host-side tools (the OCI hook,
//! `veil-control run --host`) ask what a declared sandbox gets, bind it to a cgroup and netns,
//! and unbind it. The agent checks the tool is root (or its own user), checks the paths it
//! names, pins the netns, and forwards the request to control over its link; control decides.
//!
//! One request per connection. The socket is 0600 in a 0700 directory; the peer credentials
//! are checked as well, so a socket whose mode was opened still refuses other users.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tracing::{info, warn};
use veil_link::{LocalRequest, LocalResponse, RefusalKind, SandboxId, read_frame, write_frame};
use veil_sys::SocketPathError;

use crate::link::trusted_peer;
use crate::local_channel::{Ask, Pending, ToControl};
use crate::netns_pin::NetnsPins;

/// How long a tool has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long control has to answer (a bind waits for every agent's acknowledgement).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LocalSocketError {
    /// A filesystem or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process listens on it.
    #[error("{0} is in use: is another veil-agent running?")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
}

/// The running local server.
#[derive(Debug, Clone)]
pub struct LocalServer {
    /// Where the cgroup2 file system is mounted.
    pub cgroup2: PathBuf,
    /// The netns pins.
    pub pins: NetnsPins,
    /// The way to control.
    pub control: ToControl,
    /// The agent's CA (what a sandbox must trust), given in every Declared.
    pub ca_pem: String,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LocalSocketError + use<> {
    let path = path.to_owned();
    move |source| LocalSocketError::Io { what, path, source }
}

/// Binds `path` (parent created 0700, socket 0600; a stale socket replaced, a live one or a
/// non-socket refused).
pub fn bind(path: &Path) -> Result<UnixListener, LocalSocketError> {
    let listener = veil_sys::bind_socket(path, 0o600).map_err(|e| match e {
        SocketPathError::Io { what, path, source } => LocalSocketError::Io { what, path, source },
        SocketPathError::InUse(p) => LocalSocketError::InUse(p),
        SocketPathError::NotASocket(p) => LocalSocketError::NotASocket(p),
    })?;
    UnixListener::from_std(listener).map_err(io_err("binding", path))
}

/// A cgroup path a tool named: relative to the cgroup2 root (a leading `/` as in
/// `/proc/PID/cgroup` allowed), plain components only. Returns it relative, without the `/`.
pub fn cgroup_path(cgroup: &Path) -> Result<PathBuf, String> {
    let bad = || {
        format!(
            "cgroup {} must be a path under the cgroup2 root without '.' or '..' components",
            cgroup.display()
        )
    };
    // Split by hand: Path::components() drops interior `.` and repeated `/`.
    let text = cgroup.to_str().ok_or_else(bad)?;
    let rel = text.strip_prefix('/').unwrap_or(text);
    let plain = !rel.is_empty()
        && rel.split('/').all(|c| {
            !c.is_empty() && c != "." && c != ".." && !c.bytes().any(|b| b.is_ascii_control())
        });
    if !plain {
        return Err(bad());
    }
    Ok(PathBuf::from(rel))
}

fn refused(kind: RefusalKind, message: impl Into<String>) -> LocalResponse {
    LocalResponse::Refused {
        kind,
        message: message.into(),
    }
}

impl LocalServer {
    /// Accepts tools until the task is dropped.
    pub async fn serve(self, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.connection(stream).await });
                }
                Err(e) => {
                    warn!(error = %e, "accepting on the local socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(self, mut stream: UnixStream) {
        let own = nix::unistd::geteuid().as_raw();
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let answer = match uid {
            Some(uid) if trusted_peer(uid, own) => {
                match tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    read_frame::<LocalRequest, _>(&mut stream),
                )
                .await
                {
                    Ok(Ok(Some(request))) => self.answer(request).await,
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => refused(RefusalKind::BadRequest, format!("bad request: {e}")),
                    Err(_) => refused(RefusalKind::BadRequest, "no request in time"),
                }
            }
            Some(uid) => {
                warn!(
                    uid,
                    "refused a local socket peer: only root or the agent's user may bind"
                );
                refused(
                    RefusalKind::BadRequest,
                    format!("uid {uid} may not use veil-agent's local socket (root only)"),
                )
            }
            None => refused(RefusalKind::BadRequest, "no peer credentials"),
        };
        if let Err(e) = write_frame(&mut stream, &answer).await {
            warn!(error = %e, "answering on the local socket");
        }
    }

    /// Handles one request from a trusted tool.
    pub async fn answer(&self, request: LocalRequest) -> LocalResponse {
        match request {
            LocalRequest::Describe { sandbox } => self.ask(Ask::Describe { sandbox }).await,
            LocalRequest::Unbind { sandbox } => self.ask(Ask::Unbind { sandbox }).await,
            LocalRequest::Bind {
                sandbox,
                cgroup,
                netns,
            } => self.bind(sandbox, &cgroup, netns.as_deref()).await,
        }
    }

    async fn bind(&self, sandbox: SandboxId, cgroup: &Path, netns: Option<&Path>) -> LocalResponse {
        let rel = match cgroup_path(cgroup) {
            Ok(rel) => rel,
            Err(e) => return refused(RefusalKind::BadTarget, e),
        };
        let cgroup_id = match crate::bpf::cgroup_id(&self.cgroup2.join(&rel)) {
            Ok(id) => id,
            Err(e) => return refused(RefusalKind::BadTarget, e.to_string()),
        };
        if !self.control.synced.load(Ordering::SeqCst) {
            return unavailable();
        }
        let (pinned, _inflight) = match netns {
            Some(n) => match self.pins.pin(sandbox.as_str(), cgroup_id, n) {
                Ok((pin, guard)) => (Some(pin), Some(guard)),
                Err(e @ crate::netns_pin::PinError::Busy(_)) => {
                    return refused(RefusalKind::AlreadyBound, format!("sandbox {sandbox}: {e}"));
                }
                Err(e) => return refused(RefusalKind::BadTarget, e.to_string()),
            },
            None => (None, None),
        };
        let answer = self
            .ask(Ask::Bind {
                sandbox: sandbox.clone(),
                cgroup: rel,
                cgroup_id,
                netns: pinned.clone(),
            })
            .await;
        if let Some(pin) = &pinned
            && !matches!(answer, LocalResponse::Bound(_))
        {
            self.pins.release(pin);
        }
        if matches!(answer, LocalResponse::Bound(_)) {
            info!(sandbox = %sandbox, cgroup = %cgroup.display(), "sandbox bound");
        }
        answer
    }

    /// Sends `ask` to control and waits for its answer.
    async fn ask(&self, ask: Ask) -> LocalResponse {
        if !self.control.synced.load(Ordering::SeqCst) {
            return unavailable();
        }
        let (answer, rx) = oneshot::channel();
        if self.control.tx.try_send(Pending { ask, answer }).is_err() {
            return unavailable();
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(LocalResponse::Declared(mut d))) => {
                d.ca_pem.clone_from(&self.ca_pem);
                LocalResponse::Declared(d)
            }
            Ok(Ok(LocalResponse::Bound(mut d))) => {
                d.ca_pem.clone_from(&self.ca_pem);
                LocalResponse::Bound(d)
            }
            Ok(Ok(other)) => other,
            Ok(Err(_)) => unavailable(),
            Err(_) => refused(
                RefusalKind::Unavailable,
                format!(
                    "veil-control did not answer within {} s",
                    ANSWER_TIMEOUT.as_secs()
                ),
            ),
        }
    }
}

fn unavailable() -> LocalResponse {
    refused(
        RefusalKind::Unavailable,
        "veil-agent is not connected to veil-control",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_are_plain() {
        assert_eq!(
            cgroup_path(Path::new("/docker/abc")).unwrap(),
            Path::new("docker/abc")
        );
        assert_eq!(
            cgroup_path(Path::new("system.slice/docker-1.scope")).unwrap(),
            Path::new("system.slice/docker-1.scope")
        );
        for bad in [
            "",
            "/",
            "/docker/../user.slice",
            "docker/./a",
            "/docker//a",
            "//docker",
        ] {
            assert!(cgroup_path(Path::new(bad)).is_err(), "{bad:?}");
        }
    }
}
