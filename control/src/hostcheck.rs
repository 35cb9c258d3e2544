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

/// Undoes the octal escapes of /proc/self/mounts (`\040` for a space, etc.).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first cgroup2 mount point listed in a /proc/self/mounts text.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_src, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(target)))
    })
}

/// The cgroup2 mount of this process's mount namespace.
pub fn cgroup2_mount() -> Result<PathBuf, HostCheckError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| HostCheckError::Unavailable(format!("reading /proc/self/mounts: {e}")))?;
    cgroup2_mount_in(&mounts).ok_or_else(|| {
        HostCheckError::Unavailable(
            "no cgroup2 file system is mounted: control cannot check sandbox cgroups".into(),
        )
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
    fn finds_the_cgroup2_mount_wherever_it_is() {
        let hybrid = "sysfs /sys sysfs rw 0 0\n\
            tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "none /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(escaped), Some(PathBuf::from("/mnt/my cg")));
        assert_eq!(
            cgroup2_mount_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(cgroup2_mount_in("garbage\n\n"), None);
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }

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
