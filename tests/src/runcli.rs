//! Fixtures for `veil-control run` tests: veil with a secret, the CLI as a child process of the
//! test (VEIL_API_URL / VEIL_API_KEY), runs in the foreground or in the background.
//!
//! Assertions never print the secret value: they compare and report booleans.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::agent::AgentOptions;
use crate::cgroup::PARENT;
use crate::control::{control_bin, random_token};
use crate::env::{cgroup2_mount, require_root};
use crate::veil::Veil;

/// How long one `veil-control run` may take in a test.
pub const TIMEOUT: Duration = Duration::from_secs(90);
/// The host name the secret `run-key` is allowed for.
pub const NAME: &str = "api.run.test";
/// The range `veil-control run` takes sandbox uids from by default.
pub const DEFAULT_UIDS: std::ops::RangeInclusive<u32> = 200_000..=265_535;
/// Where `veil-control run` records the uid each live sandbox holds (root-only).
pub const UID_RECORDS: &str = "/run/veil/run/uids";

/// veil with a secret `run-key` allowed for [`NAME`]; the value and placeholder.
#[derive(Debug)]
pub struct Setup {
    /// The running control + agent.
    pub veil: Veil,
    /// The secret's value (never print it).
    pub value: String,
    /// The secret's placeholder.
    pub placeholder: String,
}

impl Setup {
    /// Starts veil with these agent options and creates the secret.
    pub fn new(options: AgentOptions) -> Setup {
        require_root();
        let veil = Veil::start_with(options, &[]);
        let value = format!("sk-run-{}", random_token(32));
        let created = veil.block_on(veil.api().post(
            "/secret",
            veil.key(),
            json!({"name": "run-key", "value": value, "hosts": [NAME]}),
        ));
        assert_eq!(created.0, 201, "create secret: status {}", created.0);
        let placeholder = created.1["placeholder"]
            .as_str()
            .expect("placeholder")
            .to_owned();
        Setup {
            veil,
            value,
            placeholder,
        }
    }

    /// `veil-control run --cgroup-parent veil-test.slice --secret K=run-key <extra> -- sh -c script`.
    pub fn command(&self, extra: &[&str], script: &str) -> Command {
        self.command_in(PARENT, extra, script)
    }

    /// As [`Setup::command`], under another cgroup parent.
    pub fn command_in(&self, parent: &str, extra: &[&str], script: &str) -> Command {
        let mut extra_all = vec!["--secret", "K=run-key"];
        extra_all.extend(extra);
        self.bare(parent, &extra_all, script)
    }

    /// `veil-control run --cgroup-parent PARENT <extra> -- sh -c script` (no secret), with the
    /// admin key in VEIL_API_KEY.
    pub fn bare(&self, parent: &str, extra: &[&str], script: &str) -> Command {
        let mut cmd = Command::new(control_bin());
        cmd.args(["run", "--cgroup-parent", parent])
            .args(extra)
            .args(["--", "sh", "-c", script])
            .env("VEIL_API_URL", self.veil.control().url())
            .env("VEIL_API_KEY", self.veil.key())
            .env_remove("RUST_LOG");
        cmd
    }

    /// Asserts nothing of sandbox `id` made by the run with pid `pid` is left.
    pub fn assert_gone(&self, id: &str, pid: u32) {
        self.assert_gone_in(PARENT, id, pid);
    }

    /// As [`Setup::assert_gone`], under another cgroup parent.
    pub fn assert_gone_in(&self, parent: &str, id: &str, pid: u32) {
        // Another test's concurrent run may be the one reaping a killed run's leftovers (it
        // holds the uid record's lock meanwhile, so ours skipped it): give it the time to finish.
        let held = || {
            std::fs::read_dir(UID_RECORDS)
                .into_iter()
                .flatten()
                .flatten()
                .any(|r| {
                    std::fs::read_to_string(r.path())
                        .unwrap_or_default()
                        .split_whitespace()
                        .any(|w| w == id)
                })
        };
        let start = Instant::now();
        while held() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let cg = cgroup2_mount().join(parent).join(id);
        assert!(!cg.exists(), "cgroup {} left behind", cg.display());
        let ns = Path::new("/run/netns").join(format!("veil-{id}"));
        assert!(!ns.exists(), "netns {} left behind", ns.display());
        // A netns (and with it the veth) is destroyed asynchronously once released.
        let veth = Path::new("/sys/class/net").join(format!("vrun-{pid}"));
        let start = Instant::now();
        while veth.exists() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!veth.exists(), "veth {} left behind", veth.display());
        let (status, _) = self.veil.block_on(
            self.veil
                .api()
                .get(&format!("/sandbox/{id}"), self.veil.key()),
        );
        assert_eq!(status, 404, "sandbox {id} still registered");
        let records = std::fs::read_dir(UID_RECORDS).into_iter().flatten();
        for record in records.flatten() {
            let text = std::fs::read_to_string(record.path()).unwrap_or_default();
            assert!(
                !text.split_whitespace().any(|w| w == id),
                "uid record {} of sandbox {id} left behind",
                record.path().display()
            );
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Runs create the shared parent when missing but leave it to whoever else uses it;
        // the last test out removes it (EBUSY while another sandbox lives there: fine).
        let _ = std::fs::remove_dir(cgroup2_mount().join(PARENT));
    }
}

/// A `veil-control run` started in the background; stopped (SIGINT, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Running {
    child: std::process::Child,
    /// Its pid.
    pub pid: u32,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    /// Starts `cmd` and waits until its command printed a line `ready`; the lines before it.
    pub fn start(cmd: &mut Command) -> (Running, String) {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn veil-control run");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let run = Running { child, pid, lines };
        let mut seen = String::new();
        let deadline = Instant::now() + TIMEOUT;
        while !seen.contains("ready\n") {
            let left = deadline.saturating_duration_since(Instant::now());
            match run.lines.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(_) => panic!("command never got ready:\n{seen}"),
            }
        }
        (run, seen)
    }

    /// Sends `sig` and waits (≤ 30 s) for the exit; the status and the rest of the output.
    pub fn stop(&mut self, sig: i32) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) of the child this test started and has not reaped.
        unsafe { libc::kill(self.pid as i32, sig) };
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "veil-control run did not exit within 30 s of signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut rest = String::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            rest.push_str(&line);
            rest.push('\n');
        }
        (status, rest)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) of the child this test started and has not reaped.
            unsafe { libc::kill(self.pid as i32, libc::SIGINT) };
            let start = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) {
                if start.elapsed() > Duration::from_secs(20) {
                    // SAFETY: as above.
                    unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Runs `cmd` to its end (≤ [`TIMEOUT`], killed by pid after that); its pid and output.
pub fn run_with_pid(cmd: &mut Command) -> (u32, std::process::Output) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn veil-control run");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(out) => (pid, out.expect("waiting for veil-control run")),
        Err(_) => {
            // SAFETY: kill(2) of the child this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("veil-control run did not finish within {TIMEOUT:?}");
        }
    }
}

/// The sandbox id from a `/proc/self/cgroup` line printed by the command.
pub fn sandbox_id(out: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with("0::/"))
        .unwrap_or_else(|| panic!("no cgroup line in the command's output:\n{out}"));
    let id = line.rsplit('/').next().unwrap_or_default().to_owned();
    assert!(
        line.contains(&format!("/{PARENT}/run-")),
        "command ran in cgroup {line:?}, not a run sandbox under {PARENT}"
    );
    id
}

/// The rest of the first line of `out` that starts with `key`.
pub fn line_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key))
}

/// The host pids of the processes in sandbox `id` (under the test parent).
pub fn sandbox_pids(id: &str) -> Vec<u32> {
    let procs = cgroup2_mount().join(PARENT).join(id).join("cgroup.procs");
    std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}
