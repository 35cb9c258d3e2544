//! Plain runc containers for the OCI hook's tests: a bundle made with `runc spec` and edited
//! (shared read-only rootfs from [`crate::oci_image`], the harness's netns, a cgroup path below
//! a harness cgroup), run with the real runc or through `veil-oci-hook runtime`. Drop deletes
//! the container (forced) and its runc state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cmd::output_within;
use crate::env::bin_path;
use crate::oci_image::rootfs;
use crate::owner;

/// Debian's runc.
pub const RUNC: &str = "/usr/sbin/runc";

/// What a container runs and where.
#[derive(Debug, Clone, Default)]
pub struct RuncSpec {
    /// The command.
    pub args: Vec<String>,
    /// `NAME=VALUE` entries (PATH is added).
    pub env: Vec<String>,
    /// cgroup v2 path (relative to the mount, leading `/`), e.g. a harness cgroup's
    /// `relative()` + `/ctr`.
    pub cgroup: String,
    /// Network namespace file to join; `None` = a new, empty one.
    pub netns: Option<PathBuf>,
    /// OCI annotations.
    pub annotations: BTreeMap<String, String>,
    /// Read-write bind mounts (host dir, container dir).
    pub binds: Vec<(PathBuf, String)>,
}

/// One runc container (bundle and state dirs); deleted on drop.
#[derive(Debug)]
pub struct RuncContainer {
    id: String,
    cgroup: String,
    state: tempfile::TempDir,
    bundle: tempfile::TempDir,
}

impl RuncContainer {
    /// Writes the bundle for `spec`.
    pub fn new(tag: &str, spec: &RuncSpec) -> RuncContainer {
        crate::stale::init();
        let id = format!(
            "veil-test-{}-{}-{}",
            owner::pid(),
            owner::next_seq(),
            owner::sanitize_tag(tag)
        );
        let tmp = |what: &str| {
            tempfile::Builder::new()
                .prefix(&format!("{}{what}-", owner::tempdir_prefix()))
                .tempdir()
                .unwrap_or_else(|e| panic!("tempdir: {e}"))
        };
        let state = tmp("runc-state");
        let bundle = tmp("bundle");
        let out = Command::new(RUNC)
            .args(["spec", "--bundle"])
            .arg(bundle.path())
            .output()
            .unwrap_or_else(|e| panic!("{RUNC} spec: {e} (cargo xtask test installs runc)"));
        assert!(
            out.status.success(),
            "runc spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = bundle.path().join("config.json");
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(&file).expect("config.json")).expect("json");
        edit(&mut config, spec);
        std::fs::write(&file, serde_json::to_vec_pretty(&config).expect("json"))
            .expect("config.json");
        RuncContainer {
            id,
            cgroup: spec.cgroup.clone(),
            state,
            bundle,
        }
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bundle's `config.json` as it is now (after the shim edited it, when it ran).
    pub fn config(&self) -> Value {
        let file = self.bundle.path().join("config.json");
        serde_json::from_slice(&std::fs::read(&file).expect("config.json")).expect("json")
    }

    fn run_args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.state.path().display().to_string(),
            "run".into(),
            "--bundle".into(),
            self.bundle.path().display().to_string(),
            self.id.clone(),
        ]
    }

    /// `runc run` (attached; returns when the container exits).
    pub fn run_plain(&self, timeout: Duration) -> Output {
        output_within(Command::new(RUNC).args(self.run_args()), timeout)
    }

    /// `veil-oci-hook runtime --veil-socket=SOCKET … run …` (attached).
    pub fn run_veil(&self, socket: &Path, timeout: Duration) -> Output {
        output_within(
            Command::new(bin_path("veil-oci-hook"))
                .arg("runtime")
                .arg(format!("--veil-socket={}", socket.display()))
                .args(self.run_args()),
            timeout,
        )
    }

    /// As [`Self::run_veil`], with the hook's phase timings appended to `timing`
    /// (`VEIL_OCI_HOOK_TIMING`).
    pub fn run_veil_timed(&self, socket: &Path, timing: &Path, timeout: Duration) -> Output {
        output_within(
            Command::new(bin_path("veil-oci-hook"))
                .env("VEIL_OCI_HOOK_TIMING", timing)
                .arg("runtime")
                .arg(format!("--veil-socket={}", socket.display()))
                .args(self.run_args()),
            timeout,
        )
    }

    /// Starts `veil-oci-hook runtime … run …` without waiting (stdio discarded); the caller
    /// kills it by pid.
    pub fn spawn_veil(&self, socket: &Path) -> std::process::Child {
        Command::new(bin_path("veil-oci-hook"))
            .arg("runtime")
            .arg(format!("--veil-socket={}", socket.display()))
            .args(self.run_args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("veil-oci-hook: {e}"))
    }

    /// Whether runc still knows the container.
    pub fn exists(&self) -> bool {
        self.state.path().join(&self.id).exists()
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        if self.exists() {
            let _ = Command::new(RUNC)
                .arg("--root")
                .arg(self.state.path())
                .args(["delete", "--force", &self.id])
                .output();
        }
        remove_v1_dirs(&self.cgroup);
    }
}

/// On a hybrid host runc's cgroupfs driver also makes the path, parents included, in every v1
/// hierarchy and removes only the leaf: remove the empty ones bottom-up, what a runtime made
/// below it too (a parent another test still uses is not empty and stays).
pub fn remove_v1_dirs(cgroup: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        if h.file_name() == "unified" {
            continue;
        }
        let mut dir = h.path().join(cgroup.trim_start_matches('/'));
        // Children a runtime made below it (Podman's `conmon`) first.
        remove_subdirs(&dir);
        while dir != h.path() {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => break,
                _ => {}
            }
            if !dir.pop() {
                break;
            }
        }
    }
}

fn edit(config: &mut Value, spec: &RuncSpec) {
    let mut env = vec!["PATH=/usr/local/bin:/usr/bin:/bin".to_owned()];
    env.extend(spec.env.iter().cloned());
    config["process"]["terminal"] = json!(false);
    config["process"]["args"] = json!(spec.args);
    config["process"]["env"] = json!(env);
    config["root"] = json!({"path": rootfs(), "readonly": true});
    config["hostname"] = json!("veil-test");
    config["linux"]["cgroupsPath"] = json!(spec.cgroup);
    if let Some(ns) = &spec.netns
        && let Some(list) = config["linux"]["namespaces"].as_array_mut()
    {
        for n in list.iter_mut() {
            if n["type"] == "network" {
                n["path"] = json!(ns);
            }
        }
    }
    config["annotations"] = json!(spec.annotations);
    if let Some(mounts) = config["mounts"].as_array_mut() {
        for (host, dest) in &spec.binds {
            mounts.push(json!({
                "destination": dest, "type": "bind", "source": host,
                "options": ["rbind", "rw"],
            }));
        }
    }
}

/// Removes the (empty) cgroup directories below `dir`, deepest first.
fn remove_subdirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_subdirs(&e.path());
            let _ = std::fs::remove_dir(e.path());
        }
    }
}
