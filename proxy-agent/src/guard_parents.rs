//! Guarded runtime parents (`[agent] guard_cgroups`): veil's refusing programs linked to a
//! container runtime's parent cgroup (`docker`, `libpod_parent`, …), so that a container
//! started under it that veil has not bound cannot open a TCP connection, whether or not the
//! agent runs. A bound container's own cgroup carries the full set, which redirects into veil
//! first; the parent's programs then see a loopback destination and let it be.
//!
//! What a guarded parent's unbound container can still do: connect to loopback in its own
//! netns, send UDP other than to port 443 (DNS keeps working), use Unix sockets. The links are
//! pinned under `<pin dir>/guarded/<cgroup id>/`; a parent removed from the config is detached
//! at the next start.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use crate::bpf::{self, Bpf, BpfError};
use crate::pins::{PinLayout, parse_cgroup_dir};

/// The programs linked to a guarded parent: the ones that refuse (connect without a sandbox,
/// UDP to 443, binding veil's listener ports). getpeername and sockops only matter for a
/// redirected socket, which only a bound container's own programs make.
pub const GUARD_PROGRAMS: [&str; 6] = [
    "bind4", "bind6", "sendmsg4", "sendmsg6", "connect4", "connect6",
];

/// Parents that hold the host's own services and sessions: guarding them would cut off the
/// host, so the config refuses them.
const HOST_PARENTS: [&str; 3] = ["system.slice", "user.slice", "init.scope"];

/// Checks one `guard_cgroups` entry (relative to the cgroup2 mount) against `own`, the agent's
/// own cgroup (`/proc/self/cgroup`'s `0::` path). The message names the entry.
pub fn check_entry(entry: &Path, own: &Path) -> Result<(), String> {
    let shown = entry.display();
    if entry.is_absolute() {
        return Err(format!(
            "agent.guard_cgroups: {shown:?} must be relative to the cgroup2 mount (e.g. \"docker\")"
        ));
    }
    if !entry
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "agent.guard_cgroups: {shown:?} must not contain '.' or '..'"
        ));
    }
    if entry.as_os_str().is_empty() {
        return Err(
            "agent.guard_cgroups: \"\" is the cgroup2 root, which holds the whole host".into(),
        );
    }
    if HOST_PARENTS.iter().any(|p| entry == Path::new(p)) {
        return Err(format!(
            "agent.guard_cgroups: {shown:?} holds the host's own services or sessions"
        ));
    }
    let own_rel = own.strip_prefix("/").unwrap_or(own);
    if own_rel.starts_with(entry) {
        return Err(format!(
            "agent.guard_cgroups: {shown:?} contains veil-agent's own cgroup ({}); veil-control \
             must run outside every guarded parent too",
            own.display()
        ));
    }
    Ok(())
}

/// The agent's own cgroup v2 path from a `/proc/self/cgroup` text (`/` when absent).
pub fn own_cgroup(proc_self_cgroup: &str) -> PathBuf {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map_or_else(|| PathBuf::from("/"), |p| PathBuf::from(p.trim_end()))
}

/// Reads this process's cgroup and checks every entry.
pub fn check_entries(entries: &[PathBuf]) -> Result<(), String> {
    if entries.is_empty() {
        return Ok(());
    }
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("agent.guard_cgroups: cannot read /proc/self/cgroup: {e}"))?;
    let own = own_cgroup(&text);
    entries.iter().try_for_each(|e| check_entry(e, &own))
}

/// Why a guard could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum GuardParentError {
    /// The parent cgroup could not be created.
    #[error("guarded parent {path}: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Linking or pinning failed.
    #[error("guarded parent {path}: {source}")]
    Bpf {
        /// The cgroup directory.
        path: PathBuf,
        /// The cause.
        source: BpfError,
    },
}

/// Links the guard to each of `parents` (relative to `cgroup2`; created when missing, so the
/// guard is there before the runtime starts its first container) and detaches it from every
/// parent guarded before but no longer listed. Returns the guarded cgroup directories.
pub fn apply(
    bpf: &mut Bpf,
    cgroup2: &Path,
    parents: &[PathBuf],
) -> Result<Vec<PathBuf>, GuardParentError> {
    let base = bpf.pins().guarded_dir();
    let mut keep = BTreeSet::new();
    let mut guarded = Vec::new();
    for parent in parents {
        let dir = cgroup2.join(parent);
        std::fs::create_dir_all(&dir).map_err(|source| GuardParentError::Cgroup {
            path: dir.clone(),
            source,
        })?;
        let bpf_err = |source| GuardParentError::Bpf {
            path: dir.clone(),
            source,
        };
        let id = bpf::cgroup_id(&dir).map_err(bpf_err)?;
        bpf.ensure_links_at(&dir, &base.join(id.to_string()), &GUARD_PROGRAMS)
            .map_err(bpf_err)?;
        keep.insert(id);
        guarded.push(dir);
    }
    for id in pinned(bpf.pins()) {
        if !keep.contains(&id) {
            let dir = base.join(id.to_string());
            if let Err(e) = bpf::unpin_links(&dir, &GUARD_PROGRAMS) {
                log::warn!("cannot detach the guard of a parent no longer listed: {e}");
            }
        }
    }
    Ok(guarded)
}

/// Detaches every guarded parent (teardown).
pub fn remove_all(pins: &PinLayout) -> Result<(), BpfError> {
    let base = pins.guarded_dir();
    let mut result = Ok(());
    for id in pinned(pins) {
        let r = bpf::unpin_links(&base.join(id.to_string()), &GUARD_PROGRAMS);
        result = result.and(r);
    }
    match std::fs::remove_dir(&base) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => result.and(Err(BpfError::Pin {
            path: base,
            source: e,
        })),
        _ => result,
    }
}

/// Cgroup ids that have a guard directory.
fn pinned(pins: &PinLayout) -> Vec<u64> {
    std::fs::read_dir(pins.guarded_dir())
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| parse_cgroup_dir(&e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_parents_are_accepted() {
        let own = Path::new("/veil.slice/agent");
        for ok in [
            "docker",
            "libpod_parent",
            "machine.slice/runtime",
            "system.slice/docker",
        ] {
            assert_eq!(check_entry(Path::new(ok), own), Ok(()), "{ok}");
        }
    }

    #[test]
    fn the_host_and_veils_own_cgroups_are_refused_by_name() {
        let own = Path::new("/system.slice/veil-agent.service");
        for (bad, why) in [
            ("", "cgroup2 root"),
            ("/docker", "relative"),
            ("/sys/fs/cgroup/docker", "relative"),
            ("../docker", "'..'"),
            ("docker/../system.slice", "'..'"),
            ("./docker", "'.'"),
            ("system.slice", "host's own"),
            ("user.slice", "host's own"),
            ("init.scope", "host's own"),
            ("system.slice/veil-agent.service", "veil-agent's own"),
        ] {
            let e = check_entry(Path::new(bad), own).unwrap_err();
            assert!(
                e.contains(why) && e.starts_with("agent.guard_cgroups: "),
                "{bad}: {e}"
            );
        }
        // An agent in the root cgroup: every parent is outside it except the root.
        assert_eq!(check_entry(Path::new("docker"), Path::new("/")), Ok(()));
        // A sibling whose name extends the agent's parent is not an ancestor.
        let own = Path::new("/veil/agent");
        assert_eq!(check_entry(Path::new("veil-docker"), own), Ok(()));
        assert!(check_entry(Path::new("veil"), own).is_err());
    }

    #[test]
    fn own_cgroup_is_the_unified_line() {
        assert_eq!(
            own_cgroup("5:pids:/x\n0::/veil.slice/agent\n"),
            Path::new("/veil.slice/agent")
        );
        assert_eq!(own_cgroup("5:pids:/x\n"), Path::new("/"));
    }
}
