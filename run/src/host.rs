//! `veil-control run --host`: the sandbox is declared through the API (no cgroup) and bound on
//! this host through veil-agent's local socket, as a container runtime's hook binds one,
//! instead of the one-step registration.

use std::path::{Path, PathBuf};
use std::time::Duration;

use veil_link::local::{LocalRequest, LocalResponse, request};
use veil_link::{Declared, SandboxId};

/// How long the agent has to answer a bind (it waits for every agent's acknowledgement).
const BIND_TIMEOUT: Duration = Duration::from_secs(60);

/// Binds declared sandbox `id` to `cgroup` (relative to the cgroup2 mount) and `netns`
/// through the agent's local socket at `socket`; answered once its redirect is live.
pub async fn bind(
    socket: &Path,
    id: &str,
    cgroup: &str,
    netns: Option<&str>,
) -> anyhow::Result<Declared> {
    let sandbox = SandboxId::parse(id)?;
    let req = LocalRequest::Bind {
        sandbox,
        cgroup: PathBuf::from(cgroup),
        netns: netns.map(PathBuf::from),
    };
    match request(socket, &req, BIND_TIMEOUT).await? {
        LocalResponse::Bound(declared) => Ok(declared),
        LocalResponse::Refused { kind, message } => {
            anyhow::bail!("veil-agent refused to bind the sandbox ({kind:?}): {message}")
        }
        other => anyhow::bail!("veil-agent answered a bind with {other:?}"),
    }
}
