//! Reaping: the cgroups of sandboxes bound through the local socket are watched (checked once
//! a second, a `statfs` and a `stat` each); one that is gone, or whose path now holds another
//! cgroup (a restarted container), is reported to control once, which unbinds the sandbox if
//! the report matches the binding it holds.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use veil_link::{SandboxId, SandboxState};

use crate::config::resolve_cgroup;

/// The bound sandboxes' cgroups: id → (cgroup directory, the id it was bound with).
#[derive(Debug, Default)]
pub struct BoundCgroups {
    bound: BTreeMap<SandboxId, (PathBuf, u64)>,
    reported: HashSet<SandboxId>,
}

impl BoundCgroups {
    /// Follows `state` (a sandbox bound by id) or stops following it (one registered by path).
    pub fn track(&mut self, state: &SandboxState, cgroup2: &Path) {
        self.reported.remove(&state.id);
        match (state.cgroup_id, resolve_cgroup(&state.cgroup, cgroup2)) {
            (Some(id), Ok(dir)) => {
                self.bound.insert(state.id.clone(), (dir, id));
            }
            _ => {
                self.bound.remove(&state.id);
            }
        }
    }

    /// Follows exactly `states` (a snapshot).
    pub fn replace(&mut self, states: &[SandboxState], cgroup2: &Path) {
        self.bound.clear();
        self.reported.clear();
        for s in states {
            self.track(s, cgroup2);
        }
    }

    /// Stops following `id`.
    pub fn forget(&mut self, id: &SandboxId) {
        self.bound.remove(id);
        self.reported.remove(id);
    }

    /// The bound sandboxes whose cgroup is gone or replaced, not reported yet, with the id
    /// they were bound with; each is reported once.
    pub fn gone(&mut self) -> Vec<(SandboxId, u64)> {
        let mut out = Vec::new();
        for (sandbox, (dir, id)) in &self.bound {
            if self.reported.contains(sandbox) {
                continue;
            }
            if crate::bpf::cgroup_id(dir).is_ok_and(|now| now == *id) {
                continue;
            }
            out.push((sandbox.clone(), *id));
        }
        self.reported.extend(out.iter().map(|(s, _)| s.clone()));
        out
    }

    /// How many sandboxes are followed.
    pub fn len(&self) -> usize {
        self.bound.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.bound.is_empty()
    }
}
