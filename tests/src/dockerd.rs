//! A private dockerd for the OCI hook's tests: its own data-root, exec-root, pidfile and socket
//! under a temp dir, its own containerd (spawned by dockerd), no iptables, no bridge, the
//! cgroupfs driver with a harness cgroup as parent, and `veil-oci-hook` registered as the
//! runtime `veil`. Drop removes every container and image, stops dockerd (and so its
//! containerd) by pid, unmounts what is left under its dirs and removes them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::cgroup::Cgroup;
use crate::cmd::{output_within, wait_until};
use crate::env::bin_path;
use crate::owner;

/// Debian's docker CLI (this machine may have another on PATH; a fresh one does not).
pub const DOCKER: &str = "/usr/bin/docker";
/// Debian's dockerd.
pub const DOCKERD: &str = "/usr/sbin/dockerd";

/// A running private dockerd.
#[must_use = "dropping it stops dockerd at once"]
#[derive(Debug)]
pub struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
    /// The cgroup parent of its containers.
    pub parent: Cgroup,
    images: std::sync::Mutex<Vec<String>>,
}

impl Dockerd {
    /// Starts dockerd with `veil-oci-hook` as runtime `veil` talking to `agent_socket`.
    pub fn start(agent_socket: &Path) -> Dockerd {
        crate::stale::init();
        let parent = Cgroup::new("docker");
        // Under target/: overlayfs wants a real file system for its layers.
        let base = crate::control::target_dir()
            .parent()
            .map(|t| t.join("tmp"))
            .expect("target dir");
        std::fs::create_dir_all(&base).expect("target/tmp");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}dockerd-", owner::tempdir_prefix()))
            .tempdir_in(&base)
            .expect("tempdir");
        let d = dir.path();
        let config = json!({
            "iptables": false,
            "ip6tables": false,
            "ip-forward": false,
            "ip-masq": false,
            "bridge": "none",
            "data-root": d.join("data"),
            "exec-root": d.join("exec"),
            "pidfile": d.join("docker.pid"),
            "hosts": [format!("unix://{}", d.join("docker.sock").display())],
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "cgroup-parent": parent.relative(),
            "runtimes": {"veil": {
                "path": bin_path("veil-oci-hook"),
                "runtimeArgs": ["runtime", format!("--veil-socket={}", agent_socket.display())],
            }},
        });
        std::fs::write(d.join("daemon.json"), config.to_string()).expect("daemon.json");
        let log = std::fs::File::create(d.join("dockerd.log")).expect("log");
        let child = Command::new(DOCKERD)
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{DOCKERD}: {e} (cargo xtask test installs docker.io)"));
        let dockerd = Dockerd {
            child,
            dir,
            parent,
            images: std::sync::Mutex::new(Vec::new()),
        };
        let ready = wait_until(Duration::from_secs(60), || {
            dockerd
                .cli(&["version", "--format", "{{.Server.Version}}"])
                .status
                .success()
        });
        assert!(ready, "dockerd did not come up: {}", dockerd.log());
        dockerd
    }

    /// `docker --host … args` (bounded).
    pub fn cli(&self, args: &[&str]) -> Output {
        output_within(self.command().args(args), Duration::from_secs(120))
    }

    /// A docker CLI command against this daemon.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.arg("--host").arg(format!(
            "unix://{}",
            self.dir.path().join("docker.sock").display()
        ));
        cmd
    }

    /// Imports the test rootfs as image `name` (removed on drop).
    pub fn import(&self, name: &str) -> String {
        let tar = crate::oci_image::tarball(self.dir.path());
        let tag = format!("veil-test-{}-{name}", owner::pid());
        let out = self.cli(&["import", &tar.display().to_string(), &tag]);
        assert!(
            out.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(tar);
        self.images.lock().expect("images").push(tag.clone());
        tag
    }

    /// dockerd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// dockerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The cgroup directory of container `id` (full id).
    pub fn cgroup_of(&self, id: &str) -> PathBuf {
        self.parent.path().join(id)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.cli(&["ps", "-aq", "--no-trunc"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.cli(&["rm", "-f", id]);
        }
        for image in self.images.lock().map(|i| i.clone()).unwrap_or_default() {
            let _ = self.cli(&["rmi", "-f", &image]);
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let stopped = wait_until(Duration::from_secs(20), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // dockerd stops the containerd it started; one that outlived it (dockerd killed) is
        // found by its pidfile under our exec-root and killed by pid.
        let exec = self.dir.path().join("exec");
        if let Ok(text) = std::fs::read_to_string(exec.join("containerd/containerd.pid"))
            && let Ok(p) = text.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        unmount_below(self.dir.path());
        crate::runc::remove_v1_dirs(&self.parent.relative());
    }
}

/// Unmounts (lazily, deepest first) every mount below `dir`.
pub fn unmount_below(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}
