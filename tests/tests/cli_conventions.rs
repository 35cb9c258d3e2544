//! Every binary behaves like one (issue 15, item 9): each binary and each of its subcommands,
//! found by walking the `Commands:` sections of its own `--help`, answers `--help` and
//! `--version` with text on stdout and exit 0 — without running anything or creating anything —
//! and rejects an unknown option with exit 2 and a one-line error naming it. The root `--help`
//! documents the exit status.
//!
//! "Nothing created": each invocation runs in an empty directory (also its HOME and TMPDIR)
//! that must stay empty, and no harness object (netns, cgroup, bpffs pin, veth, state file)
//! named after the invocation's pid may exist once it exited. A benchmark started by mistake is
//! also caught by the time bound: it cannot finish in [`TIMEOUT`].

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use veil_tests::{bin_path, cgroup2_mount, output_within};

/// Far more than printing help takes; far less than any benchmark or daemon start-up.
const TIMEOUT: Duration = Duration::from_secs(20);
/// An option no binary has.
const BAD: &str = "--no-such-option";

#[test]
fn veil_bench_behaves_like_a_binary() {
    check_binary(
        "veil-bench",
        &[
            "suite",
            "soak",
            "passthrough",
            "registration",
            "sandboxes",
            "restart",
            "mitm",
            "rotation",
            "client-bulk",
            "client-connrate",
            "client-idle",
            "client-soak",
        ],
    );
}

#[test]
fn veil_probe_behaves_like_a_binary() {
    check_binary("veil-probe", &["tcp", "echo", "udp"]);
}

#[test]
fn veil_control_behaves_like_a_binary() {
    check_binary(
        "veil-control",
        &[
            "serve",
            "apikey",
            "apikey create",
            "secret",
            "secret get",
            "run",
        ],
    );
}

#[test]
fn veil_agent_behaves_like_a_binary() {
    check_binary("veil-agent", &["teardown"]);
}

#[test]
fn xtask_behaves_like_a_binary() {
    check_binary("xtask", &["build", "test", "bench", "install"]);
}

/// Walks `bin`'s subcommands (each of `expected` must be among them) and checks every one.
fn check_binary(bin: &str, expected: &[&str]) {
    let exe = bin_path(bin);
    let mut found = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(path) = todo.pop() {
        let help = check_help(&exe, bin, &path);
        for sub in subcommands(&help) {
            let mut child = path.clone();
            child.push(sub);
            todo.push(child);
        }
        check_version(&exe, bin, &path);
        check_bad_argument(&exe, bin, &path);
        found.push(path.join(" "));
    }
    for want in expected {
        assert!(
            found.iter().any(|f| f == want),
            "`{bin} --help` does not list `{want}` (found: {found:?})"
        );
    }
}

/// `--help`: exit 0, usage on stdout, nothing on stderr, nothing created. Returns the help.
fn check_help(exe: &Path, bin: &str, path: &[String]) -> String {
    let what = cmdline(bin, path, "--help");
    let out = invoke(exe, path, "--help");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "`{what}` must exit 0; stdout: {stdout} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Usage:"),
        "`{what}` printed no usage on stdout: {stdout:?}"
    );
    assert!(
        out.stderr.is_empty(),
        "`{what}` wrote to stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if path.is_empty() {
        assert!(
            stdout.contains("Exit status:"),
            "`{what}` does not document the exit status: {stdout}"
        );
    }
    stdout
}

/// `--version`: exit 0 and the workspace version on stdout.
fn check_version(exe: &Path, bin: &str, path: &[String]) {
    let what = cmdline(bin, path, "--version");
    let out = invoke(exe, path, "--version");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "`{what}` must exit 0; stdout: {stdout} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        stdout.lines().count() == 1 && stdout.trim_end().ends_with(version),
        "`{what}` must print one line ending in {version}: {stdout:?}"
    );
    assert!(out.stderr.is_empty(), "`{what}` wrote to stderr");
}

/// An unknown option: exit 2, one line naming it (then clap's short usage and hint), never the
/// whole help; stdout stays empty except for veil-probe's one JSON line saying USAGE.
fn check_bad_argument(exe: &Path, bin: &str, path: &[String]) {
    let what = cmdline(bin, path, BAD);
    let out = invoke(exe, path, BAD);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "`{what}` must exit 2 (bad command line); stdout: {stdout} stderr: {stderr}"
    );
    assert_eq!(
        stderr.lines().next(),
        Some(format!("error: unexpected argument '{BAD}' found").as_str()),
        "`{what}` must say in its first line which argument is wrong: {stderr}"
    );
    assert!(
        !stderr.contains("Commands:") && !stderr.contains("Options:"),
        "`{what}` printed the whole help instead of the error: {stderr}"
    );
    if bin == "veil-probe" {
        let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!("`{what}` must print one JSON line on stdout ({e}): {stdout:?}")
        });
        assert_eq!(json["error"], "USAGE", "`{what}`: {json}");
        assert!(
            json["message"].as_str().is_some_and(|m| m.contains(BAD)),
            "`{what}`: the JSON message must name {BAD}: {json}"
        );
    } else {
        assert!(stdout.is_empty(), "`{what}` wrote to stdout: {stdout}");
    }
}

/// `bin path… arg`, for failure messages.
fn cmdline(bin: &str, path: &[String], arg: &str) -> String {
    let mut words = vec![bin];
    words.extend(path.iter().map(String::as_str));
    words.push(arg);
    words.join(" ")
}

/// The subcommands listed in a help text's `Commands:` section (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let mut in_commands = false;
    let mut out = Vec::new();
    for line in help.lines() {
        if line == "Commands:" {
            in_commands = true;
            continue;
        }
        if line.trim().is_empty() {
            in_commands = false;
        }
        if !in_commands || !line.starts_with("  ") || line.starts_with("   ") {
            continue;
        }
        if let Some(name) = line.split_whitespace().next()
            && name != "help"
        {
            out.push(name.to_owned());
        }
    }
    out
}

/// Runs `exe path… arg` in an empty directory (also HOME and TMPDIR), bounded by [`TIMEOUT`];
/// fails when the directory is not empty afterwards or a harness object owned by it remains.
fn invoke(exe: &Path, path: &[String], arg: &str) -> Output {
    let what = cmdline(&exe.display().to_string(), path, arg);
    let dir = tempfile::Builder::new()
        .prefix("veil-cli-")
        .tempdir()
        .unwrap();
    let pid_file = tempfile::NamedTempFile::new().unwrap();
    // sh records its pid and execs the binary, which keeps that pid: the owner pid that
    // harness objects made by the binary are named after.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"echo $$ >"$0" && exec "$@""#])
        .arg(pid_file.path())
        .arg(exe)
        .args(path)
        .arg(arg)
        .current_dir(dir.path())
        .env("HOME", dir.path())
        .env("TMPDIR", dir.path())
        .env_remove("VEIL_API_URL")
        .env_remove("VEIL_API_KEY");
    let out = {
        // Should a benchmark run and be killed at the time bound, what it left is removed.
        let _cleanup = CleanupOnPanic;
        output_within(&mut cmd, TIMEOUT)
    };
    let created: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(created.is_empty(), "`{what}` created {created:?}");
    let pid: u32 = std::fs::read_to_string(pid_file.path())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let left = owned_by(pid);
    if !left.is_empty() {
        veil_tests::cleanup_stale();
        panic!("`{what}` left harness objects behind: {left:?}");
    }
    out
}

/// Harness objects named after owner `pid`: network namespaces, cgroups, bpffs pin dirs,
/// agent pid files and root-netns veths (see tests/src/owner.rs for the naming).
fn owned_by(pid: u32) -> Vec<PathBuf> {
    let decimal = format!("-{pid}-");
    let veth = format!("vh-{}-", veil_tests::owner::base36(u64::from(pid)));
    let dirs = [
        PathBuf::from("/run/netns"),
        cgroup2_mount().join(veil_tests::cgroup::PARENT),
        PathBuf::from("/sys/fs/bpf"),
        PathBuf::from(veil_tests::owner::STATE_DIR),
    ];
    let mut found: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| veil_tests::owner::list_dir(d))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(&decimal))
        })
        .collect();
    found.extend(
        veil_tests::owner::list_dir(Path::new("/sys/class/net"))
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&veth))
            }),
    );
    found
}

/// Removes what dead test processes left behind when the check panics (the child is dead).
struct CleanupOnPanic;

impl Drop for CleanupOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            veil_tests::cleanup_stale();
        }
    }
}

#[test]
fn finds_subcommands_in_help() {
    let help = "About\n\nUsage: x <COMMAND>\n\nCommands:\n  serve   Run\n  apikey  Manage\n          \
                keys\n  help    Print\n\nOptions:\n  -h, --help  Print help\n";
    assert_eq!(subcommands(help), ["serve", "apikey"]);
}
