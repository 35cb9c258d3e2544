//! Running the build tools: cargo in the workspace root, and the eBPF object's build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::ebpf;

/// Builds the eBPF object (the toolchain first when missing) and returns its path.
pub(crate) fn build_ebpf(root: &Path) -> Result<PathBuf> {
    ebpf::build_object(root, &mut |line| eprintln!("xtask: {line}"))
        .map_err(|e| anyhow::anyhow!("building the eBPF object failed: {e}"))
}

/// Runs `cargo` with `args` in the workspace root, failing on a non-zero exit.
pub(crate) fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
