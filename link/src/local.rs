//! The agent's local binding socket: host-side tools (the OCI hook, `veil-control run --host`)
//! ask the agent what a declared sandbox gets, bind it to a cgroup and netns, and unbind it.
//!
//! The socket is root-only (mode 0600, peer credentials checked). One request per connection,
//! framed like the link ([`crate::codec`]): the tool writes a [`LocalRequest`], the agent
//! answers one [`LocalResponse`] and closes. The agent forwards binds and unbinds to control
//! over its own authenticated link; control decides. No API key is involved, and nothing here
//! can choose a sandbox's secrets: those were declared through the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use crate::codec::{FrameError, read_frame, write_frame};
use crate::ids::SandboxId;

/// The variables that point runtimes at a CA bundle (Python requests, curl, OpenSSL, Node, git,
/// cargo, the AWS SDKs, Deno): what every way into a sandbox (`veil-control run`, the OCI hook)
/// sets to a bundle that trusts veil's CA, and never lets the workload's own values override.
pub const CA_VARS: [&str; 8] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "CARGO_HTTP_CAINFO",
    "AWS_CA_BUNDLE",
    "DENO_CERT",
];

/// Where the agent listens unless configured otherwise (`[agent] local_socket`).
pub const DEFAULT_LOCAL_SOCKET: &str = "/run/veil/agent-local.sock";

/// A request from a host-side tool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LocalRequest {
    /// What a declared sandbox must be given: its environment and the CA to trust.
    Describe {
        /// The declared sandbox.
        sandbox: SandboxId,
    },
    /// Binds a declared, unbound sandbox to a cgroup and netns; answered once its redirect is
    /// live (or refused).
    Bind {
        /// The declared sandbox.
        sandbox: SandboxId,
        /// The cgroup v2 directory, relative to the cgroup2 mount (as `/proc/PID/cgroup`'s
        /// `0::` line names it, leading `/` allowed).
        cgroup: PathBuf,
        /// The network namespace file (`/proc/PID/ns/net`, `/run/netns/NAME`); `None` = the
        /// host's.
        netns: Option<PathBuf>,
    },
    /// Unbinds a sandbox (its declaration goes too unless it was declared with `keep`).
    Unbind {
        /// The sandbox.
        sandbox: SandboxId,
    },
}

/// What a declared sandbox is given: placeholders and the CA, never a value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declared {
    /// The sandbox.
    pub sandbox: SandboxId,
    /// Environment variable → placeholder.
    pub env: BTreeMap<String, String>,
    /// PEM of the CA the sandbox must trust (this host's agent's).
    pub ca_pem: String,
    /// Whether the sandbox is bound now.
    pub bound: bool,
}

/// Why a request was refused; the tool prints `message` as its one error line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// No such declared sandbox (for this host).
    NotDeclared,
    /// The sandbox is already bound.
    AlreadyBound,
    /// The cgroup or netns is not acceptable (outside the allowed parents, missing, in use).
    BadTarget,
    /// Control is not reachable, or did not answer in time.
    Unavailable,
    /// The request itself is malformed or not allowed.
    BadRequest,
    /// Anything else; the message says what.
    Failed,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LocalResponse {
    /// Answer to `Describe`.
    Declared(Declared),
    /// Answer to `Bind`: the redirect is live.
    Bound(Declared),
    /// Answer to `Unbind`.
    Unbound {
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// The request was refused; nothing changed.
    Refused {
        /// The class of refusal.
        kind: RefusalKind,
        /// One line naming the problem (never a value).
        message: String,
    },
}

/// Why a local request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The socket could not be reached.
    #[error("cannot reach veil-agent at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("veil-agent at {path}: {source}")]
    Frame {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: FrameError,
    },
    /// The agent closed without answering.
    #[error("veil-agent at {0} closed without answering")]
    NoAnswer(PathBuf),
    /// No answer within the timeout.
    #[error("veil-agent at {path} did not answer within {secs} s")]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The timeout.
        secs: u64,
    },
}

/// Sends one request to the agent's local socket at `path` and reads its answer.
pub async fn request(
    path: &Path,
    req: &LocalRequest,
    timeout: Duration,
) -> Result<LocalResponse, LocalError> {
    let exchange = async {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|source| LocalError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let frame = |source| LocalError::Frame {
            path: path.to_owned(),
            source,
        };
        write_frame(&mut stream, req).await.map_err(frame)?;
        read_frame::<LocalResponse, _>(&mut stream)
            .await
            .map_err(frame)?
            .ok_or_else(|| LocalError::NoAnswer(path.to_owned()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| LocalError::Timeout {
            path: path.to_owned(),
            secs: timeout.as_secs(),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_are_tagged_json() {
        let r = LocalRequest::Bind {
            sandbox: "sb-1".parse().unwrap(),
            cgroup: "/docker/abc".into(),
            netns: Some("/proc/42/ns/net".into()),
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.starts_with(r#"{"type":"bind","sandbox":"sb-1","#), "{j}");
        assert_eq!(serde_json::from_str::<LocalRequest>(&j).unwrap(), r);
        let a = LocalResponse::Refused {
            kind: RefusalKind::AlreadyBound,
            message: "sandbox sb-1 is already bound".into(),
        };
        let j = serde_json::to_string(&a).unwrap();
        assert!(j.contains(r#""kind":"already_bound""#), "{j}");
        assert_eq!(serde_json::from_str::<LocalResponse>(&j).unwrap(), a);
        // A malformed sandbox id is no request at all.
        assert!(
            serde_json::from_str::<LocalRequest>(r#"{"type":"unbind","sandbox":"-x"}"#).is_err()
        );
    }
}
