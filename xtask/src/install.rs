//! `cargo xtask install` / `uninstall`: binaries, documented config, state dirs, hardened units.
//!
//! Idempotent: binaries, units and docs are replaced; config files an operator may have
//! edited are only written when missing. `--destdir` stages the tree for packaging (nothing
//! outside it is touched, no service manager is called).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Units, config templates and docs shipped from `xtask/dist` and the README.
const CONTROL_UNIT: &str = include_str!("../dist/veil-control.service");
const AGENT_UNIT: &str = include_str!("../dist/veil-agent.service");
const CONTROL_CONFIG: &str = include_str!("../dist/control.toml");
const AGENT_CONFIG: &str = include_str!("../dist/agent.toml");
const OCI_HOOK_CONFIG: &str = include_str!("../dist/oci-hook.toml");
const README: &str = include_str!("../../README.md");

/// Binaries installed, from the build output directory.
const BINARIES: &[&str] = &["veil-control", "veil-agent", "veil-oci-hook"];

/// Where everything goes, below `destdir` (empty = the live system).
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout below `destdir`, or the live system for `None`.
    pub fn new(destdir: Option<&Path>) -> Layout {
        Layout {
            root: destdir.map_or_else(|| PathBuf::from("/"), Path::to_path_buf),
        }
    }

    fn path(&self, absolute: &str) -> PathBuf {
        self.root.join(absolute.trim_start_matches('/'))
    }

    fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// Installs binaries from `bin_dir` into the layout.
pub fn install(layout: &Layout, bin_dir: &Path) -> Result<()> {
    for bin in BINARIES {
        let from = bin_dir.join(bin);
        if !from.is_file() {
            bail!(
                "{} is missing: build it first (cargo xtask build --release)",
                from.display()
            );
        }
        let to = layout.path(&format!("/usr/local/bin/{bin}"));
        copy_atomically(&from, &to, 0o755)?;
    }
    write(
        layout,
        "/etc/systemd/system/veil-control.service",
        CONTROL_UNIT,
        0o644,
        true,
    )?;
    write(
        layout,
        "/etc/systemd/system/veil-agent.service",
        AGENT_UNIT,
        0o644,
        true,
    )?;
    write(
        layout,
        "/usr/local/share/doc/veil/README.md",
        README,
        0o644,
        true,
    )?;
    // Config holds no secret, but nothing else needs to read it.
    write(
        layout,
        "/etc/veil/control.toml",
        CONTROL_CONFIG,
        0o640,
        false,
    )?;
    write(layout, "/etc/veil/agent.toml", AGENT_CONFIG, 0o640, false)?;
    // Read by the OCI hook, which container runtimes run as root.
    write(
        layout,
        "/etc/veil/oci-hook.toml",
        OCI_HOOK_CONFIG,
        0o644,
        false,
    )?;
    for dir in [
        "/var/lib/veil",
        "/var/lib/veil/control",
        "/var/lib/veil/agent",
    ] {
        mkdir(&layout.path(dir), 0o700)?;
    }
    if layout.is_live() && systemd_running() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        println!("installed; start with: systemctl enable --now veil-control veil-agent");
    } else {
        println!("installed into {}", layout.root.display());
    }
    Ok(())
}

/// Removes binaries, units and docs; with `purge` also config and state (secrets!).
pub fn uninstall(layout: &Layout, purge: bool) -> Result<()> {
    if layout.is_live() && systemd_running() {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "veil-agent", "veil-control"])
            .status();
    }
    if purge {
        // Detach every sandbox for good before the agent binary goes away.
        let agent = layout.path("/usr/local/bin/veil-agent");
        if layout.is_live() && agent.is_file() {
            let _ = Command::new(&agent).args(["teardown", "--all"]).status();
        }
    }
    for file in [
        "/usr/local/bin/veil-control",
        "/usr/local/bin/veil-agent",
        "/usr/local/bin/veil-oci-hook",
        "/etc/systemd/system/veil-control.service",
        "/etc/systemd/system/veil-agent.service",
        "/usr/local/share/doc/veil/README.md",
    ] {
        remove_file(&layout.path(file))?;
    }
    let _ = fs::remove_dir(layout.path("/usr/local/share/doc/veil"));
    if purge {
        for dir in ["/etc/veil", "/var/lib/veil"] {
            match fs::remove_dir_all(layout.path(dir)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {dir}"));
                }
                _ => {}
            }
        }
    } else {
        println!("kept /etc/veil and /var/lib/veil (secrets); --purge removes them");
    }
    if layout.is_live() && systemd_running() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
    }
    Ok(())
}

fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn mkdir(dir: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Writes `text` to `path` (replacing it when `replace`, else only if missing).
fn write(layout: &Layout, path: &str, text: &str, mode: u32, replace: bool) -> Result<()> {
    let to = layout.path(path);
    if !replace && to.exists() {
        return Ok(());
    }
    let parent = to.parent().context("install path has no parent")?;
    mkdir_parents(parent)?;
    let tmp = to.with_extension("veil-tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, &to).with_context(|| format!("installing {}", to.display()))
}

fn copy_atomically(from: &Path, to: &Path, mode: u32) -> Result<()> {
    let parent = to.parent().context("install path has no parent")?;
    mkdir_parents(parent)?;
    // A running binary cannot be overwritten in place (ETXTBSY): copy beside it, rename over.
    let tmp = to.with_extension("veil-tmp");
    fs::copy(from, &tmp).with_context(|| format!("copying {}", from.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))
}

fn mkdir_parents(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
