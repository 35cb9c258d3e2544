//! Removing what runs killed outright (SIGKILL, a crash) left behind: their processes and
//! cgroups, registrations, network namespaces (their veth pairs go with them), directories, and
//! last their uid records. Only objects of a run whose pid no longer exists are touched.

use std::path::{Path, PathBuf};

use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::cgroup::SandboxCgroup;
use super::{netns, state, uids};
use veil_client::{Client, ClientError};

/// The pid of the `veil-control run` that made `name` (`<prefix><pid>-<hex>`).
pub fn run_owner(name: &str, prefix: &str) -> Option<u32> {
    let (pid, suffix) = name.strip_prefix(prefix)?.split_once('-')?;
    let ok = !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| pid.parse().ok()).flatten()
}

/// Whether a process with this pid exists (a zombie, or one of another user, counts).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    matches!(
        kill(Pid::from_raw(pid), None),
        Ok(()) | Err(nix::errno::Errno::EPERM)
    )
}

/// Removes sandbox `id` (cgroup `cgroup`, relative to the cgroup2 mount): what runs in it, its
/// registration, its cgroup, netns and directory.
async fn remove_sandbox(client: &Client, mount: Option<&Path>, id: &str, cgroup: &str) {
    let cg = mount.and_then(|m| SandboxCgroup::existing(m, cgroup).ok());
    if let Some(cg) = &cg {
        cg.kill_all().await;
    }
    match client.delete_sandbox(id).await {
        Ok(()) | Err(ClientError::Api { status: 404, .. }) => {}
        Err(e) => eprintln!("veil-control run: unregistering stale sandbox {id}: {e}"),
    }
    if let Some(cg) = cg {
        cg.remove().await;
    }
    let ns = Path::new(netns::NETNS_DIR).join(format!("veil-{id}"));
    if ns.exists() {
        netns::remove_named(&ns);
    }
    let dir = Path::new(state::SHARED_DIR).join(id);
    if dir.exists() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Reaps every dead run's sandbox this run can find: those with a uid record (whatever their
/// cgroup parent), then those under `parent` (runs as a named `--user` have no record), then
/// stray directories and namespaces.
pub async fn reap_stale(
    client: &Client,
    parent: &str,
    cgroup2_mount: fn() -> anyhow::Result<PathBuf>,
) {
    let mount = cgroup2_mount().ok();
    if let Ok(dir) = state::private_dir(Some(state::UID_RECORDS)) {
        for stale in uids::stale(&dir, pid_alive) {
            let record = stale.record.clone();
            remove_sandbox(client, mount.as_deref(), &record.sandbox, &record.cgroup).await;
            // Only now may the uid be taken again.
            stale.release();
        }
    }
    if let Some(mount) = &mount {
        let parent = parent.trim_matches('/');
        let dirs = std::fs::read_dir(mount.join(parent)).into_iter().flatten();
        for entry in dirs.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if run_owner(&name, "run-").is_some_and(|pid| !pid_alive(pid)) {
                let cgroup = format!("{parent}/{name}");
                remove_sandbox(client, Some(mount), &name, &cgroup).await;
            }
        }
    }
    let shared = std::fs::read_dir(state::SHARED_DIR).into_iter().flatten();
    // Directories of earlier versions were `veil-run-<pid>-<hex>` in the temp dir.
    let legacy = std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten();
    for entry in shared.flatten().chain(legacy.flatten()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = run_owner(&name, "run-").or_else(|| run_owner(&name, "veil-run-"));
        if owner.is_some_and(|pid| !pid_alive(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let netns = std::fs::read_dir(netns::NETNS_DIR).into_iter().flatten();
    for entry in netns.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if run_owner(&name, "veil-run-").is_some_and(|pid| !pid_alive(pid)) {
            netns::remove_named(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_owner_of_run_objects() {
        assert_eq!(run_owner("run-123-00ab12cd", "run-"), Some(123));
        assert_eq!(run_owner("veil-run-123-00ab12cd", "veil-run-"), Some(123));
        assert_eq!(run_owner("run-123-", "run-"), None);
        assert_eq!(run_owner("run-x-00ab", "run-"), None);
        assert_eq!(run_owner("docker-123-00ab", "run-"), None);
        assert_eq!(run_owner("run-123-zz", "run-"), None);
    }

    #[test]
    fn our_own_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX));
    }
}
