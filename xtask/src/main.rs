//! `cargo xtask`: everything a person does with veil, from a fresh machine.
//!
//! `build-ebpf` makes the toolchain and the eBPF object; `build` builds everything; `run` starts
//! veil on its embedded defaults; `test` installs what the suite needs and runs all of it;
//! `bench` measures.

mod ebpf;
mod host;
mod install;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and benchmark veil")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the pinned nightly + bpf-linker when missing and build the eBPF object.
    BuildEbpf,
    /// Build every binary (release with --release).
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Build in release and run veil-control and veil-agent in the foreground on their defaults.
    Run,
    /// Install veil: binaries, documented config in /etc/veil, state dirs, systemd units.
    Install {
        /// Stage the tree below this directory (packaging); nothing outside it is touched.
        #[arg(long)]
        destdir: Option<PathBuf>,
        /// Install the binaries found here instead of building them in release first.
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
    },
    /// Remove what `install` put in place (config and state are kept unless --purge).
    Uninstall {
        /// The staging directory given to install.
        #[arg(long)]
        destdir: Option<PathBuf>,
        /// Also remove /etc/veil and /var/lib/veil (the encrypted secrets and keys) and detach
        /// every sandbox.
        #[arg(long)]
        purge: bool,
    },
    /// Install test dependencies, then run fmt, clippy and the whole test suite (needs root).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run a benchmark at full size: passthrough, registration, restart or mitm.
    Bench {
        /// Which benchmark.
        #[arg(default_value = "passthrough")]
        which: String,
        /// Extra arguments for the benchmark binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.cmd {
        Cmd::BuildEbpf => build_ebpf(&root).map(|obj| println!("{}", obj.display())),
        Cmd::Build { release } => build(&root, release),
        Cmd::Run => run(&root),
        Cmd::Install { destdir, from } => {
            let bin_dir = match from {
                Some(dir) => dir,
                None => {
                    build(&root, true)?;
                    root.join("target/release")
                }
            };
            install::install(&install::Layout::new(destdir.as_deref()), &bin_dir)
        }
        Cmd::Uninstall { destdir, purge } => {
            install::uninstall(&install::Layout::new(destdir.as_deref()), purge)
        }
        Cmd::Test { cargo_test_args } => test(&root, &cargo_test_args),
        Cmd::Bench { which, args } => bench(&root, &which, &args),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn build_ebpf(root: &Path) -> Result<PathBuf> {
    ebpf::build_object(root, &mut |line| eprintln!("xtask: {line}"))
        .map_err(|e| anyhow::anyhow!("building the eBPF object failed: {e}"))
}

/// Runs `cargo` with `args` in the workspace root, failing on a non-zero exit.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
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

fn build(root: &Path, release: bool) -> Result<()> {
    build_ebpf(root)?;
    let mut args = vec!["build", "--workspace", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(root, &args)
}

fn run(root: &Path) -> Result<()> {
    host::require_root("cargo xtask run")?;
    build(root, true)?;
    host::run_foreground(root)
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    host::require_root("cargo xtask test")?;
    host::ensure_packages(host::TEST_PACKAGES)?;
    host::ensure_command("node", "nodejs")?;
    build_ebpf(root)?;
    cargo(root, &["fmt", "--all", "--check"])?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The e2e tests run the daemons' binaries, which `cargo test` alone does not build.
    cargo(root, &["build", "--workspace", "--bins"])?;
    // Every failing test binary is reported, not only the first.
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    cargo(root, &args)
}

fn bench(root: &Path, which: &str, extra: &[String]) -> Result<()> {
    host::require_root("cargo xtask bench")?;
    host::ensure_packages(host::TEST_PACKAGES)?;
    host::ensure_packages(host::BENCH_PACKAGES)?;
    build_ebpf(root)?;
    cargo(root, &["build", "--release", "--workspace", "--bins"])?;
    let bin = root.join("target/release/veil-bench");
    let status = Command::new(&bin)
        .arg(which)
        .args(extra)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !status.success() {
        bail!("benchmark {which} failed ({status})");
    }
    Ok(())
}
