//! `cargo xtask bench`: prepares what the comparison suite runs (Debian packages, mitmproxy in a
//! venv under `target/`) and runs `veil-bench` from the release build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{host, packages};

/// The mitmproxy release compared against (the newest that supports Python 3.11).
pub const MITMPROXY_VERSION: &str = "11.0.2";

/// Debian packages the suite needs beyond `packages::BENCH_PACKAGES`: gnuplot draws the PNG.
pub const SUITE_PACKAGES: &[&str] = &["gnuplot-nox"];

/// Runs benchmark `which` (`all` = the comparison suite writing docs/benchmarks.md).
pub fn run(root: &Path, which: &str, extra: &[String]) -> Result<()> {
    packages::require_root("cargo xtask bench")?;
    packages::ensure_packages(packages::TEST_PACKAGES)?;
    packages::ensure_packages(packages::BENCH_PACKAGES)?;
    crate::cargo::build_ebpf(root)?;
    crate::cargo::cargo(root, &["build", "--release", "--workspace", "--bins"])?;
    let bin = host::release_dir(root).join("veil-bench");
    let mut cmd = Command::new(&bin);
    match which {
        "all" | "suite" => {
            packages::ensure_packages(SUITE_PACKAGES)?;
            let mitmdump = ensure_mitmproxy(root)?;
            cmd.arg("suite")
                .arg("--mitmdump")
                .arg(mitmdump)
                .arg("--out")
                .arg(root.join("docs/benchmarks.md"))
                .arg("--png")
                .arg(root.join("docs/benchmarks.png"));
        }
        other => {
            cmd.arg(other);
        }
    }
    let status = cmd
        .args(extra)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !status.success() {
        bail!("benchmark {which} failed ({status})");
    }
    Ok(())
}

/// Installs mitmproxy [`MITMPROXY_VERSION`] into `target/mitmproxy-venv` (pip, from PyPI) when
/// missing; returns the path of its `mitmdump`.
pub fn ensure_mitmproxy(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/mitmproxy-venv");
    let mitmdump = venv.join("bin/mitmdump");
    let current = Command::new(&mitmdump)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(MITMPROXY_VERSION));
    if current {
        return Ok(mitmdump);
    }
    eprintln!(
        "xtask: installing mitmproxy {MITMPROXY_VERSION} into {}",
        venv.display()
    );
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("cannot run python3 -m venv")?;
    if !status.success() {
        bail!("python3 -m venv failed ({status})");
    }
    let status = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            &format!("mitmproxy=={MITMPROXY_VERSION}"),
        ])
        .status()
        .context("cannot run pip")?;
    if !status.success() {
        bail!("pip install mitmproxy=={MITMPROXY_VERSION} failed ({status})");
    }
    Ok(mitmdump)
}
