//! Podman for the OCI hook's tests: private storage (`--root`, `--runroot`, `--tmpdir` under a
//! temp dir), the cgroupfs manager with a harness cgroup as parent, file events. Containers run
//! with `--runtime veil-oci-hook --runtime-flag veil-socket=…` (the binary itself is the
//! runtime: Podman passes no runtime arguments). Drop removes every container and image and
//! the storage, unmounting what is left.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::cmd::output_within;
use crate::env::bin_path;
use crate::owner;

/// Debian's podman.
pub const PODMAN: &str = "/usr/bin/podman";
/// runc cannot raise these rlimits here unless Podman asks for them (ENGINEERING.md).
pub const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=4096:4096",
];

/// Private Podman storage; every command runs against it.
#[must_use = "dropping it removes its containers and images at once"]
#[derive(Debug)]
pub struct Podman {
    dir: tempfile::TempDir,
    // Podman refuses a runroot longer than 50 characters: a short one under /tmp.
    run: tempfile::TempDir,
    /// The cgroup parent of its containers.
    pub parent: Cgroup,
}

impl Podman {
    /// Fresh storage.
    pub fn new() -> Podman {
        crate::stale::init();
        let base = crate::control::target_dir()
            .parent()
            .map(|t| t.join("tmp"))
            .expect("target dir");
        std::fs::create_dir_all(&base).expect("target/tmp");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}podman-", owner::tempdir_prefix()))
            .tempdir_in(&base)
            .expect("tempdir");
        let run = tempfile::Builder::new()
            .prefix(&owner::tempdir_prefix())
            .tempdir()
            .expect("tempdir");
        Podman {
            dir,
            run,
            parent: Cgroup::new("podman"),
        }
    }

    /// A podman command against this storage.
    pub fn command(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new(PODMAN);
        cmd.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(self.run.path().join("rr"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        cmd
    }

    /// `podman args…` (bounded).
    pub fn cli(&self, args: &[&str]) -> Output {
        output_within(self.command().args(args), Duration::from_secs(120))
    }

    /// `podman run` with the veil runtime talking to `socket`, this storage's cgroup parent and
    /// the rlimit flags, then `args`.
    pub fn run_veil(&self, socket: &Path, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.arg("run")
            .arg("--runtime")
            .arg(bin_path("veil-oci-hook"))
            .arg("--runtime-flag")
            .arg(format!("veil-socket={}", socket.display()))
            .arg("--cgroup-parent")
            .arg(self.parent.relative())
            .args(ULIMITS)
            .args(args);
        output_within(&mut cmd, Duration::from_secs(120))
    }

    /// Imports the test rootfs as image `name`.
    pub fn import(&self, name: &str) -> String {
        let tar = crate::oci_image::tarball(self.dir.path());
        let tag = format!("localhost/veil-test-{}-{name}", owner::pid());
        let out = self.cli(&["import", &tar.display().to_string(), &tag]);
        assert!(
            out.status.success(),
            "podman import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(tar);
        tag
    }
}

impl Default for Podman {
    fn default() -> Self {
        Podman::new()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cli(&["rm", "-af", "-t", "0"]);
        let _ = self.cli(&["rmi", "-af"]);
        let _ = self.cli(&["system", "reset", "-f"]);
        crate::dockerd::unmount_below(self.dir.path());
        crate::dockerd::unmount_below(self.run.path());
        crate::runc::remove_v1_dirs(&self.parent.relative());
    }
}
