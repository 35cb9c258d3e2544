//! Blocking calls to veil-agent's local socket (the hooks are short-lived processes).

use std::path::Path;
use std::time::Duration;

use veil_link::{Declared, LocalRequest, LocalResponse, RefusalKind, SandboxId};

use crate::error::HookError;

/// How long the agent has to answer Describe and Unbind.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent has to make a Bind live.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(10);

fn call(socket: &Path, req: &LocalRequest, timeout: Duration) -> Result<LocalResponse, HookError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HookError::io(socket))?;
    Ok(rt.block_on(veil_link::local::request(socket, req, timeout))?)
}

fn refused(sandbox: &SandboxId, message: String) -> HookError {
    HookError::Refused {
        sandbox: sandbox.to_string(),
        message,
    }
}

/// What `sandbox` is given.
pub fn describe(socket: &Path, sandbox: &SandboxId) -> Result<Declared, HookError> {
    let req = LocalRequest::Describe {
        sandbox: sandbox.clone(),
    };
    match call(socket, &req, ASK_TIMEOUT)? {
        LocalResponse::Declared(d) if d.sandbox == *sandbox => Ok(d),
        LocalResponse::Refused { message, .. } => Err(refused(sandbox, message)),
        _ => Err(HookError::Unexpected("Describe")),
    }
}

/// Binds `sandbox` to `cgroup` and `netns`; returns once the redirect is live.
pub fn bind(
    socket: &Path,
    sandbox: &SandboxId,
    cgroup: &Path,
    netns: &Path,
) -> Result<Declared, HookError> {
    let req = LocalRequest::Bind {
        sandbox: sandbox.clone(),
        cgroup: cgroup.to_owned(),
        netns: Some(netns.to_owned()),
    };
    match call(socket, &req, BIND_TIMEOUT)? {
        LocalResponse::Bound(d) if d.sandbox == *sandbox => Ok(d),
        LocalResponse::Refused { message, .. } => Err(refused(sandbox, message)),
        _ => Err(HookError::Unexpected("Bind")),
    }
}

/// Unbinds `sandbox`; one that is no longer declared counts as unbound.
pub fn unbind(socket: &Path, sandbox: &SandboxId) -> Result<(), HookError> {
    let req = LocalRequest::Unbind {
        sandbox: sandbox.clone(),
    };
    match call(socket, &req, ASK_TIMEOUT)? {
        LocalResponse::Unbound { .. }
        | LocalResponse::Refused {
            kind: RefusalKind::NotDeclared,
            ..
        } => Ok(()),
        LocalResponse::Refused { message, .. } => Err(refused(sandbox, message)),
        _ => Err(HookError::Unexpected("Unbind")),
    }
}
