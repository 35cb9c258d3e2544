//! The test process's environment: root check, the cgroup2 mount, built binaries.
use std::path::PathBuf;

/// Panics with a clear message unless the process runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF); run `sudo cargo xtask test` \
         (euid is {euid})"
    );
}

/// The cgroup v2 mount point, read from /proc/self/mounts (never assumed).
pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_else(|e| panic!("reading /proc/self/mounts: {e}"));
    parse_cgroup2_mount(&mounts).unwrap_or_else(|| {
        panic!(
            "no cgroup2 mount in /proc/self/mounts (was this run under `ip netns exec`, which \
             remounts /sys? use `nsenter --net=`)"
        )
    })
}

/// The mount point of the first `cgroup2` line of a mounts table.
fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        (fields.next()? == "cgroup2").then(|| PathBuf::from(unescape_mount(target)))
    })
}

/// Undoes the octal escapes (`\040` for a space) the kernel uses in /proc/self/mounts.
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok());
            if let Some(v) = octal {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Path of a binary built into the same profile directory as the running test executable.
///
/// Panics naming the `cargo build` command to run when it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut dir = exe
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", exe.display()))
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        let package = match name {
            "veil-agent" => "proxy-agent",
            "veil-control" => "control",
            "veil-probe" => "veil-tests",
            _ => "<package>",
        };
        panic!(
            "{} is missing: build it first with `cargo build -p {package} --bin {name}` \
             (same profile and CARGO_TARGET_DIR as the tests)",
            path.display()
        );
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_in_unified_layout_with_escapes() {
        let mounts = "cgroup2 /sys/fs/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/my cg"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }
}
