//! `cargo xtask`: everything a person does with veil, from a fresh machine.
//!
//! `build-ebpf` makes the toolchain and the eBPF object; `build` builds everything; `run` starts
//! veil on its embedded defaults; `test` installs what the suite needs and runs all of it;
//! `bench` measures (`bench` alone: the comparison against direct, nginx and mitmproxy, written
//! to docs/benchmarks.md); `fuzz` runs the cargo-fuzz targets.

mod bench;
mod cargo;
mod ebpf;
mod fuzz;
mod host;
mod install;
mod packages;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

use cargo::{build_ebpf, cargo};

/// What the exit status means; shown under every `--help`.
const EXIT_STATUS: &str = "\
Exit status:
  0    the task ran to the end (tests and checks passed)
  1    the task failed: a step, test or check did not pass (the error names it on stderr)
  2    bad command line (unknown subcommand or option, bad value); nothing was run";

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, run, test and benchmark veil",
    version,
    propagate_version = true,
    after_help = EXIT_STATUS
)]
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
    /// Install test dependencies, then run fmt, clippy, a build check of the fuzz targets and the
    /// whole test suite (needs root).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Run a benchmark at full size: all (the comparison suite, written to docs/benchmarks.md),
    /// passthrough, registration, sandboxes, restart, mitm, rotation, soak, store or transfers.
    Bench {
        /// Which benchmark.
        #[arg(default_value = "all")]
        which: String,
        /// Extra arguments for the benchmark binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the cargo-fuzz targets (nightly), one after the other, each for --seconds.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all): client_hello, host_pattern, scrub_stream, substitute,
        /// rest_json.
        targets: Vec<String>,
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
                    host::release_dir(&root)
                }
            };
            install::install(&install::Layout::new(destdir.as_deref()), &bin_dir)
        }
        Cmd::Uninstall { destdir, purge } => {
            install::uninstall(&install::Layout::new(destdir.as_deref()), purge)
        }
        Cmd::Test { cargo_test_args } => test(&root, &cargo_test_args),
        Cmd::Bench { which, args } => bench::run(&root, &which, &args),
        Cmd::Fuzz { seconds, targets } => fuzz::run(&root, seconds, &targets),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
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
    packages::require_root("cargo xtask run")?;
    build(root, true)?;
    host::run_foreground(root)
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    packages::require_root("cargo xtask test")?;
    packages::ensure_packages(packages::TEST_PACKAGES)?;
    packages::ensure_command("node", "nodejs")?;
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
    fuzz::check_targets(root)?;
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
