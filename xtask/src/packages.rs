//! Host preparation: the root check and the Debian packages each task needs, installed with
//! service starts forbidden for the duration of the install.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Debian packages the test suite and benchmarks run: real clients and network tools.
/// The container runtimes (runc, docker.io, podman, busybox-static for the images) are for the
/// OCI hook's tests; `NoServiceStarts` keeps dockerd and containerd from starting on install
/// (the tests run a private dockerd that never touches iptables).
pub const TEST_PACKAGES: &[&str] = &[
    "busybox-static",
    "ca-certificates",
    "curl",
    "docker.io",
    "iproute2",
    "nftables",
    "postgresql",
    "podman",
    "procps",
    "python3",
    "python3-venv",
    "runc",
    "util-linux",
];

/// Extra Debian packages for benchmarks: the load generators and the reference upstream.
pub const BENCH_PACKAGES: &[&str] = &["nginx", "nghttp2-client", "wrk"];

/// Fails with a message naming `what` unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root (cgroups, network namespaces, eBPF): run it as root, e.g. `sudo -E {what}`"
        );
    }
    Ok(())
}

/// Installs whichever of `packages` dpkg does not list as installed.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let _no_daemons = NoServiceStarts::install()?;
    apt(&args)?;
    disable_boot_units(&missing);
    Ok(())
}

/// Units a package enables for boot that this install must not leave enabled: dockerd at boot
/// rewrites iptables (its FORWARD policy breaks the test namespaces); the tests run their own.
const NO_BOOT_UNITS: &[(&str, &[&str])] = &[(
    "docker.io",
    &["docker.service", "docker.socket", "containerd.service"],
)];

/// Disables the boot units of the packages just installed (never those of a package that was
/// already there: an operator's own Docker stays as it was).
fn disable_boot_units(installed_now: &[&str]) {
    for (package, units) in NO_BOOT_UNITS {
        if !installed_now.contains(package) {
            continue;
        }
        // deb-systemd-helper works without a running systemd and records the choice, so an
        // upgrade does not enable them again; it runs only as a maintainer script would.
        let status = Command::new("deb-systemd-helper")
            .env("DPKG_MAINTSCRIPT_PACKAGE", package)
            .arg("disable")
            .args(*units)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!(
                "xtask: could not disable {} (installed by {package}): disable them by hand",
                units.join(" ")
            );
        }
    }
}

/// Where Debian's maintainer scripts ask whether they may start a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// While it lives, packages do not start their services on install (postgresql would start a
/// cluster on port 5432; the tests run private servers instead). Leaves an existing policy alone.
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn install() -> Result<NoServiceStarts> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(NoServiceStarts { created: false });
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(POLICY_RC_D)
            .with_context(|| format!("cannot create {POLICY_RC_D}"))?;
        // 101: "action forbidden by policy" (invoke-rc.d(8)).
        f.write_all(
            b"#!/bin/sh\n# written by cargo xtask for the duration of an install\nexit 101\n",
        )
        .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        Ok(NoServiceStarts { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created
            && let Err(e) = std::fs::remove_file(POLICY_RC_D)
        {
            eprintln!("xtask: cannot remove {POLICY_RC_D}: {e}");
        }
    }
}

/// Installs Debian's `package` when `command` is not on PATH (a newer one may already be there,
/// e.g. Node.js from elsewhere: keep it).
pub fn ensure_command(command: &str, package: &str) -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        Ok(())
    } else {
        ensure_packages(&[package])
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}
