//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` one after the other, each for a
//! fixed time, and summarises executions and findings.
//!
//! The targets build on the pinned nightly ([`crate::ebpf::NIGHTLY`], the one the eBPF crate
//! uses); cargo-fuzz [`CARGO_FUZZ_VERSION`] is installed into `target/tools` when missing, like
//! bpf-linker. Each target runs single-process (no `-jobs`), so a 2-core machine stays usable.
//! Corpora grow in `fuzz/corpus/<target>` (not committed); seeds come from `fuzz/seeds/<target>`
//! and, for the ClientHello parser, from the captured hellos in `policy/testdata`. A crash
//! leaves its input in `fuzz/artifacts/<target>/`; it becomes a regression test in the crate
//! that owns the code.

use std::env;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// cargo-fuzz release installed into `target/tools`.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target, in the order they run; the second field is the cargo feature it needs.
pub const TARGETS: &[(&str, Option<&str>)] = &[
    ("client_hello", None),
    ("host_pattern", None),
    ("scrub_stream", None),
    ("substitute", None),
    ("rest_json", Some("control")),
];

/// What one target's run produced.
#[derive(Debug)]
struct Outcome {
    target: String,
    seconds: u64,
    execs: Option<u64>,
    corpus: usize,
    findings: Vec<PathBuf>,
    ok: bool,
}

/// Runs `targets` (all when empty) for `seconds` each; fails if any target found something.
pub fn run(root: &Path, seconds: u64, targets: &[String]) -> Result<()> {
    let selected: Vec<(&str, Option<&str>)> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets
            .iter()
            .map(|t| {
                TARGETS
                    .iter()
                    .find(|(name, _)| name == t)
                    .copied()
                    .with_context(|| {
                        let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
                        format!("unknown fuzz target {t}; targets: {}", names.join(", "))
                    })
            })
            .collect::<Result<_>>()?
    };
    let tools = root.join("target/tools");
    ensure_cargo_fuzz(&tools)?;
    let fuzz_dir = root.join("fuzz");
    let logs = root.join("target/fuzz-logs");
    std::fs::create_dir_all(&logs).context("cannot create target/fuzz-logs")?;
    let mut outcomes = Vec::new();
    for (target, feature) in selected {
        outcomes.push(run_target(
            root, &fuzz_dir, &tools, &logs, target, feature, seconds,
        )?);
    }
    println!("\n| target | seconds | executions | corpus | findings |");
    println!("|---|---|---|---|---|");
    for o in &outcomes {
        let findings = if o.findings.is_empty() {
            if o.ok {
                "none".to_owned()
            } else {
                "run failed (see log)".to_owned()
            }
        } else {
            o.findings
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join("<br>")
        };
        println!(
            "| {} | {} | {} | {} | {findings} |",
            o.target,
            o.seconds,
            o.execs.map_or("?".to_owned(), |e| e.to_string()),
            o.corpus
        );
    }
    let bad: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok || !o.findings.is_empty())
        .map(|o| o.target.as_str())
        .collect();
    if !bad.is_empty() {
        bail!(
            "fuzzing found problems in {}: reproduce with `cargo +{} fuzz run <target> <artifact>` in fuzz/ (logs in target/fuzz-logs)",
            bad.join(", "),
            crate::ebpf::NIGHTLY
        );
    }
    Ok(())
}

fn run_target(
    root: &Path,
    fuzz_dir: &Path,
    tools: &Path,
    logs: &Path,
    target: &str,
    feature: Option<&str>,
    seconds: u64,
) -> Result<Outcome> {
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let before = list(&artifacts);
    let mut cmd = nightly(tools, "cargo")?;
    cmd.args(["fuzz", "run", target]).current_dir(fuzz_dir);
    if let Some(f) = feature {
        cmd.args(["--features", f]);
    }
    cmd.arg(&corpus);
    for seeds in [
        fuzz_dir.join("seeds").join(target),
        root.join("policy/testdata"),
    ] {
        let wanted = seeds.ends_with(target) || target == "client_hello";
        if wanted && seeds.is_dir() {
            cmd.arg(seeds);
        }
    }
    cmd.args([
        "--",
        &format!("-max_total_time={seconds}"),
        "-print_final_stats=1",
        "-rss_limit_mb=4096",
        "-timeout=10",
    ]);
    let log_path = logs.join(format!("{target}.log"));
    eprintln!(
        "xtask: fuzzing {target} for {seconds} s (log: {})",
        log_path.display()
    );
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run cargo fuzz")?;
    let mut execs = None;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                execs = n.trim().parse().ok();
            }
            // Progress on the terminal: libFuzzer's periodic pulse lines and anything alarming.
            if line.contains("pulse")
                || line.contains("DONE")
                || line.contains("panicked")
                || line.contains("ERROR")
                || line.starts_with("error")
            {
                eprintln!("  {target}: {line}");
            }
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    let findings: Vec<PathBuf> = list(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    Ok(Outcome {
        target: target.to_owned(),
        seconds: started.elapsed().as_secs(),
        execs,
        corpus: list(&corpus).len(),
        findings,
        ok: status.success(),
    })
}

fn list(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Installs the pinned nightly and cargo-fuzz into `tools` when missing.
fn ensure_cargo_fuzz(tools: &Path) -> Result<()> {
    let nightly_ok = nightly(tools, "rustc")?
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nightly_ok {
        eprintln!("xtask: installing toolchain {}", crate::ebpf::NIGHTLY);
        let status = Command::new("rustup")
            .args(["toolchain", "install", crate::ebpf::NIGHTLY])
            .args(["--profile", "minimal"])
            .status()
            .context("cannot run rustup")?;
        if !status.success() {
            bail!("rustup toolchain install {} failed", crate::ebpf::NIGHTLY);
        }
    }
    let installed = Command::new(tools.join("bin/cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if installed {
        return Ok(());
    }
    eprintln!(
        "xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}",
        tools.display()
    );
    let status = nightly(tools, "cargo")?
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .arg("--root")
        .arg(tools)
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}

/// `rustup run NIGHTLY program`, with what an outer cargo leaks (toolchain, flags, target dir)
/// removed and the tools directory first in PATH, so `cargo fuzz` finds cargo-fuzz.
/// Type-checks every fuzz target (all features) on the pinned nightly, so that a change of a
/// fuzzed API breaks `cargo xtask test` instead of the next fuzzing session.
pub fn check_targets(root: &Path) -> Result<()> {
    let mut cmd = nightly(&root.join("target/tools"), "cargo")?;
    cmd.args(["check", "--bins", "--all-features", "--quiet"])
        .current_dir(root.join("fuzz"))
        .env("CARGO_TARGET_DIR", root.join("target/fuzz-check"));
    let status = cmd.status().context("cannot run cargo check in fuzz/")?;
    if !status.success() {
        bail!("the fuzz targets do not build ({status})");
    }
    Ok(())
}

fn nightly(tools: &Path, program: &str) -> Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", crate::ebpf::NIGHTLY, program]);
    for (name, _) in env::vars_os() {
        let leaky = name.to_str().is_some_and(|n| {
            (n.starts_with("CARGO") && n != "CARGO_HOME")
                || n.starts_with("RUSTC")
                || n.starts_with("RUSTDOC")
                || n == "RUSTFLAGS"
                || n == "RUSTUP_TOOLCHAIN"
        });
        if leaky {
            cmd.env_remove(&name);
        }
    }
    let mut path = vec![tools.join("bin")];
    if let Some(old) = env::var_os("PATH") {
        path.extend(env::split_paths(&old));
    }
    let path: OsString = env::join_paths(path).context("cannot build PATH")?;
    cmd.env("PATH", path);
    Ok(cmd)
}
