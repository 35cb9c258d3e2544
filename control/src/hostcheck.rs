//! Checks control can make itself before a sandbox is stored: its cgroup directory exists under
//! the cgroup2 mount (found in /proc/self/mounts, never assumed) and its netns file is a network
//! namespace. Parsing is pure; the checks read the host.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a sandbox's host paths are not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum HostCheckError {
    /// The cgroup path exists but is not a directory.
    #[error("cgroup {0} is not a cgroup directory")]
    NotACgroup(String),
    /// The cgroup does not exist.
    #[error("cgroup {0} does not exist (create it before registering the sandbox)")]
    NoCgroup(String),
    /// The netns path is not on nsfs.
    #[error("netns {0} is not a network namespace")]
    NotANetns(String),
    /// The netns path does not exist.
    #[error("netns {0} does not exist")]
    NoNetns(String),
    /// No cgroup2 file system is mounted here.
    #[error("no cgroup2 file system is mounted: control cannot check sandbox cgroups")]
    NoCgroup2,
    /// The mount table is unreadable.
    #[error("reading /proc/self/mounts: {0}")]
    Mounts(std::io::Error),
    /// control's own network namespace cannot be stat'ed.
    #[error("stat /proc/self/ns/net: {0}")]
    OwnNetns(std::io::Error),
}

impl HostCheckError {
    /// True when the host cannot be checked (a 503), false when the request names something
    /// that does not exist or is of the wrong kind (a 400).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::NoCgroup2 | Self::Mounts(_) | Self::OwnNetns(_))
    }
}

pub use veil_sys::cgroup2_mount_in;

/// The cgroup2 mount of this process's mount namespace.
pub fn cgroup2_mount() -> Result<PathBuf, HostCheckError> {
    veil_sys::cgroup2_mount().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => HostCheckError::NoCgroup2,
        _ => HostCheckError::Mounts(e),
    })
}

/// Checks that `cgroup` (relative, already validated against the parents) is a directory under
/// `mount`.
pub fn check_cgroup(mount: &Path, cgroup: &str) -> Result<(), HostCheckError> {
    let path = mount.join(cgroup);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(HostCheckError::NotACgroup(cgroup.to_owned())),
        Err(_) => Err(HostCheckError::NoCgroup(cgroup.to_owned())),
    }
}

/// Checks that `netns` (already validated as /run/netns/NAME or /proc/PID/ns/net) is a
/// network namespace: it lives on nsfs, the file system of this process's own namespaces.
pub fn check_netns(netns: &str) -> Result<(), HostCheckError> {
    let own = std::fs::metadata("/proc/self/ns/net").map_err(HostCheckError::OwnNetns)?;
    match std::fs::metadata(netns) {
        Ok(m) if m.dev() == own.dev() => Ok(()),
        Ok(_) => Err(HostCheckError::NotANetns(netns.to_owned())),
        Err(_) => Err(HostCheckError::NoNetns(netns.to_owned())),
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
            Err(HostCheckError::NoCgroup(_))
        ));
        assert!(matches!(
            check_cgroup(dir.path(), "veil.slice/file"),
            Err(HostCheckError::NotACgroup(_))
        ));
        check_netns(&format!("/proc/{}/ns/net", std::process::id())).unwrap();
        assert!(check_netns("/run/netns/veil-no-such-namespace-x").is_err());
        assert!(check_netns("/proc/self/status").is_err());
    }
}
