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
    veil_sys::cgroup2_mount_in(&mounts).unwrap_or_else(|| {
        panic!(
            "no cgroup2 mount in /proc/self/mounts (was this run under `ip netns exec`, which \
             remounts /sys? use `nsenter --net=`)"
        )
    })
}

/// Path of a binary built into the same profile directory as the running test executable, or
/// in `$VEIL_BIN_DIR` when set (measurements run by hand against release binaries).
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
    if let Some(bins) = std::env::var_os("VEIL_BIN_DIR") {
        dir = PathBuf::from(bins);
    }
    let path = dir.join(name);
    if !path.is_file() {
        let package = match name {
            "veil-agent" => "proxy-agent",
            "veil-control" => "control",
            "veil-probe" | "veil-ws-h2" => "veil-tests",
            "veil-oci-hook" => "veil-oci-hook",
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
