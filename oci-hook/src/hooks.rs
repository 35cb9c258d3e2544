//! The OCI hooks the shim adds: `createRuntime` binds the container's cgroup and netns to its
//! sandbox (the workload has not started: a failure aborts the container), `poststop` unbinds.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use veil_link::SandboxId;

use crate::error::HookError;
use crate::rundir::{BASE, RunDir};
use crate::timing::Timing;
use crate::{agent, procfs, spec};

/// The container state the runtime writes on a hook's stdin (OCI runtime spec, "State").
#[derive(Debug, Deserialize)]
pub struct State {
    /// The container id.
    pub id: String,
    /// The container's init process (absent after it exited).
    #[serde(default)]
    pub pid: Option<u32>,
    /// The bundle directory.
    pub bundle: PathBuf,
}

/// Parses the state JSON.
pub fn parse_state(text: &str) -> Result<State, HookError> {
    serde_json::from_str(text).map_err(|e| {
        HookError::Spec(format!(
            "the container state on stdin is not OCI state JSON: {e}"
        ))
    })
}

/// The sandbox the bundle's (already edited) `config.json` names.
fn sandbox_of(bundle: &Path) -> Result<Option<SandboxId>, HookError> {
    let file = bundle.join("config.json");
    let text = std::fs::read_to_string(&file).map_err(HookError::io(&file))?;
    let spec: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| HookError::Spec(format!("{}: {e}", file.display())))?;
    spec::sandbox_id(&spec)
}

/// `createRuntime`: binds the container's sandbox, or fails (and the runtime aborts it).
pub fn create_runtime(state: &State, socket: &Path) -> Result<(), HookError> {
    let t = Timing::start("create-runtime");
    let Some(sandbox) = sandbox_of(&state.bundle)? else {
        return Ok(());
    };
    let pid = state
        .pid
        .ok_or_else(|| HookError::Spec("the container state has no pid".into()))?;
    let cgroup = procfs::cgroup_of(pid)?;
    let netns = procfs::netns_of(pid);
    t.mark("read");
    agent::bind(socket, &sandbox, &cgroup, &netns)?;
    t.mark("bound");
    RunDir::new(Path::new(BASE), &state.id)?.mark_bound(&sandbox)
}

/// `poststop`: unbinds the sandbox this container bound (best effort) and removes its runtime
/// directory. A container that never bound unbinds nothing: it may have named a sandbox that
/// another container holds.
pub fn poststop(state: &State, socket: &Path) -> Result<(), HookError> {
    let t = Timing::start("poststop");
    let dir = RunDir::new(Path::new(BASE), &state.id)?;
    let unbound = match dir.bound_sandbox() {
        Some(sandbox) => agent::unbind(socket, &sandbox),
        None => Ok(()),
    };
    t.mark("unbound");
    let removed = dir.remove();
    unbound.and(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_state_parses_with_or_without_a_pid() {
        let s = parse_state(
            r#"{"ociVersion":"1.0.2","id":"c1","status":"created","pid":42,"bundle":"/b","annotations":{"dev.veil.sandbox":"sb"}}"#,
        )
        .unwrap();
        assert_eq!((s.id.as_str(), s.pid), ("c1", Some(42)));
        let s = parse_state(r#"{"ociVersion":"1.0.2","id":"c1","status":"stopped","bundle":"/b"}"#)
            .unwrap();
        assert_eq!(s.pid, None);
        let e = parse_state("{}").unwrap_err().to_string();
        assert!(e.contains("OCI state"), "{e}");
    }
}
