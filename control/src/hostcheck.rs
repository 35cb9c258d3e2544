//! Checks control can make itself before a sandbox is stored: its cgroup directory exists under
//! the cgroup2 mount (found in /proc/self/mounts, never assumed) and its netns file is a network
//! namespace. Parsing is pure; the checks read the host.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a sandbox's host paths are not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum HostCheckError {
    /// The request names something that does not exist (a 400).
    #[error("{0}")]
    Invalid(String),
    /// The host cannot be checked (no cgroup2 mount, /proc unreadable).
    #[error("{0}")]
    Unavailable(String),
}

pub use veil_sys::cgroup2_mount_in;

/// The cgroup2 mount of this process's mount namespace.
pub fn cgroup2_mount() -> Result<PathBuf, HostCheckError> {
    veil_sys::cgroup2_mount().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => HostCheckError::Unavailable(
            "no cgroup2 file system is mounted: control cannot check sandbox cgroups".into(),
        ),
        _ => HostCheckError::Unavailable(format!("reading /proc/self/mounts: {e}")),
    })
}

/// Checks that `cgroup` (relative, already validated against the parents) is a directory under
/// `mount`.
pub fn check_cgroup(mount: &Path, cgroup: &str) -> Result<(), HostCheckError> {
    let path = mount.join(cgroup);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(HostCheckError::Invalid(format!(
            "cgroup {cgroup} is not a cgroup directory"
        ))),
        Err(_) => Err(HostCheckError::Invalid(format!(
            "cgroup {cgroup} does not exist (create it before registering the sandbox)"
        ))),
    }
}

/// Checks that `netns` (already validated as /run/netns/NAME or /proc/PID/ns/net) is a
/// network namespace: it lives on nsfs, the file system of this process's own namespaces.
pub fn check_netns(netns: &str) -> Result<(), HostCheckError> {
    let own = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| HostCheckError::Unavailable(format!("stat /proc/self/ns/net: {e}")))?;
    match std::fs::metadata(netns) {
        Ok(m) if m.dev() == own.dev() => Ok(()),
        Ok(_) => Err(HostCheckError::Invalid(format!(
            "netns {netns} is not a network namespace"
        ))),
        Err(_) => Err(HostCheckError::Invalid(format!(
            "netns {netns} does not exist"
        ))),
    }
}

/// Both checks for a sandbox.
pub fn check_sandbox(cgroup: &str, netns: Option<&str>) -> Result<(), HostCheckError> {
    check_cgroup(&cgroup2_mount()?, cgroup)?;
    if let Some(n) = netns {
        check_netns(n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_and_netns_checks_read_the_host() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("veil.slice/sb")).unwrap();
        std::fs::write(dir.path().join("veil.slice/file"), b"").unwrap();
        check_cgroup(dir.path(), "veil.slice/sb").unwrap();
        assert!(matches!(
            check_cgroup(dir.path(), "veil.slice/missing"),
            Err(HostCheckError::Invalid(_))
        ));
        assert!(matches!(
            check_cgroup(dir.path(), "veil.slice/file"),
            Err(HostCheckError::Invalid(_))
        ));
        check_netns(&format!("/proc/{}/ns/net", std::process::id())).unwrap();
        assert!(check_netns("/run/netns/veil-no-such-namespace-x").is_err());
        assert!(check_netns("/proc/self/status").is_err());
    }
}
