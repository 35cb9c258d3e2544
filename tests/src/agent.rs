//! The `veil-agent` process as a fixture: config file, state dir, log, and readiness through the
//! systemd notify protocol (`READY=1`, `RELOADING=1`, `STOPPING=1` on `$NOTIFY_SOCKET`).
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::owner;

/// A sandbox as the tests register it with veil-control (`PUT /api/sandbox/{id}`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentSandbox {
    /// Sandbox id.
    pub id: String,
    /// Cgroup path (absolute under the cgroup2 mount, or relative to it).
    pub cgroup: PathBuf,
    /// Netns path; `None` = the sandbox shares the agent's netns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// `egress` of the PUT; `None` = what a runner would choose ([`crate::egress::for_netns`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<String>,
}

impl AgentSandbox {
    /// The same sandbox registered with `egress` (`"sandbox"` or `"host"`).
    pub fn with_egress(mut self, egress: &str) -> AgentSandbox {
        self.egress = Some(egress.to_owned());
        self
    }

    /// The `egress` its PUT sends.
    pub fn egress(&self) -> String {
        self.egress
            .clone()
            .unwrap_or_else(|| crate::egress::for_netns(self.netns.as_deref()).to_owned())
    }
}

/// How to start the agent; `Default` is the built `veil-agent` with its default settings.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The binary (default: `bin_path("veil-agent")`).
    pub binary: Option<PathBuf>,
    /// `[agent] drain_timeout_ms`, when set.
    pub drain_timeout_ms: Option<u64>,
    /// veil-control's agent socket (`[agent] control_socket`), when set.
    pub control_socket: Option<PathBuf>,
    /// Where the agent pins its eBPF objects (`[agent] bpf_pin_dir`); default: a fresh
    /// `/sys/fs/bpf/veil-test-<pid>-<n>` removed on drop.
    pub pin_dir: Option<PathBuf>,
    /// Extra command-line arguments (e.g. `--upstream-ca PEM`).
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// How long to wait for `READY=1` at start and after a reload.
    pub ready_timeout: Duration,
    /// How long [`Agent::terminate`] waits after SIGTERM.
    pub terminate_timeout: Duration,
    /// `[agent] metrics_listen`, when set; `None` (the default) = no endpoint, so parallel
    /// agents never race for a port. Use [`crate::control::free_port`] for a free one.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Extra TOML lines for the `[agent]` table (keys this fixture has no field for).
    pub extra_config: String,
    /// `[agent] egress_allow`; by default the test world's IPv6 block
    /// ([`crate::egress::WORLD_V6`]), which stands for public addresses.
    pub egress_allow: Vec<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            binary: None,
            drain_timeout_ms: None,
            control_socket: None,
            pin_dir: None,
            args: Vec::new(),
            env: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            terminate_timeout: Duration::from_secs(15),
            metrics_listen: None,
            extra_config: String::new(),
            egress_allow: vec![crate::egress::WORLD_V6.to_owned()],
        }
    }
}

#[derive(Serialize)]
struct ConfigFile<'a> {
    agent: AgentSection<'a>,
}

#[derive(Serialize)]
struct AgentSection<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    control_socket: Option<&'a Path>,
    bpf_pin_dir: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<std::net::SocketAddr>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    egress_allow: &'a [String],
}

/// Renders the agent's TOML config.
pub fn render_config(
    drain_timeout_ms: Option<u64>,
    control_socket: Option<&Path>,
    pin_dir: &Path,
) -> String {
    toml::to_string(&ConfigFile {
        agent: AgentSection {
            drain_timeout_ms,
            control_socket,
            bpf_pin_dir: pin_dir,
            metrics_listen: None,
            egress_allow: &[],
        },
    })
    .unwrap_or_else(|e| panic!("rendering agent config: {e}"))
}

/// Renders the agent's TOML config as `options` say (pin dir resolved by the caller).
pub fn render_options(options: &AgentOptions, pin_dir: &Path) -> String {
    let mut text = toml::to_string(&ConfigFile {
        agent: AgentSection {
            drain_timeout_ms: options.drain_timeout_ms,
            control_socket: options.control_socket.as_deref(),
            bpf_pin_dir: pin_dir,
            metrics_listen: options.metrics_listen,
            egress_allow: &options.egress_allow,
        },
    })
    .unwrap_or_else(|e| panic!("rendering agent config: {e}"));
    // `[agent]` is the only table, so lines appended at the end belong to it.
    if !options.extra_config.is_empty() {
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&options.extra_config);
        text.push('\n');
    }
    text
}

/// Prefix of per-agent pin directories in bpffs.
pub(crate) const PIN_PREFIX: &str = "veil-test-";
/// Where bpffs is mounted (the agent mounts it when missing).
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// A running agent; SIGKILLed (by pid) and reaped on drop if still running.
///
/// Every method takes `&self`, so a test can share it or move it into a thread.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct Agent {
    pid: std::sync::atomic::AtomicU32,
    binary: PathBuf,
    pin_dir: PathBuf,
    owns_pin_dir: bool,
    dir: tempfile::TempDir,
    options: AgentOptions,
    pidfile: PathBuf,
    state: Mutex<State>,
    /// Set once a panic message carried the log tail, so Drop does not print it again.
    log_reported: AtomicBool,
}

#[derive(Debug)]
struct State {
    child: Child,
    exited: Option<ExitStatus>,
    notify: UnixDatagram,
    notifications: Vec<String>,
}

impl State {
    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited = Some(status);
        }
        self.exited
    }

    fn kill(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            // Ours by pid: the child we spawned and have not reaped.
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exited = Some(status);
            }
        }
        self.exited
    }

    /// Receives at most one datagram (waiting ≤ 100 ms unless non-blocking).
    fn recv_one(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        match self.notify.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                self.notifications.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
                true
            }
            Err(_) => false,
        }
    }

    fn poll(&mut self) {
        let _ = self.notify.set_nonblocking(true);
        while self.recv_one() {}
        let _ = self.notify.set_nonblocking(false);
    }

    fn seen_since(&self, from: usize, line: &str) -> bool {
        self.notifications[from.min(self.notifications.len())..]
            .iter()
            .any(|l| l == line)
    }
}

impl Agent {
    /// Starts the built `veil-agent` with default options and waits for `READY=1`.
    pub fn start() -> Agent {
        Agent::start_with(AgentOptions::default())
    }

    /// Starts `binary` (anything speaking the notify protocol) instead of `veil-agent`.
    pub fn start_with_binary(binary: &Path) -> Agent {
        Agent::start_with(AgentOptions {
            binary: Some(binary.to_path_buf()),
            ..AgentOptions::default()
        })
    }

    /// Starts an agent as `options` say and waits for `READY=1`; panics with the log's tail if
    /// it exits first or the wait times out.
    pub fn start_with(options: AgentOptions) -> Agent {
        crate::stale::init();
        let binary = options
            .binary
            .clone()
            .unwrap_or_else(|| crate::env::bin_path("veil-agent"));
        let dir = tempfile::Builder::new()
            .prefix(&owner::tempdir_prefix())
            .tempdir()
            .unwrap_or_else(|e| panic!("creating agent temp dir: {e}"));
        let (pin_dir, owns_pin_dir) = match &options.pin_dir {
            Some(p) => (p.clone(), false),
            None => (
                Path::new(BPFFS).join(format!(
                    "{PIN_PREFIX}{}-{}",
                    owner::pid(),
                    owner::next_seq()
                )),
                true,
            ),
        };
        let config = dir.path().join("agent.toml");
        let mut text = render_options(&options, &pin_dir);
        if !options.extra_config.contains("local_socket") {
            // Each agent its own local socket: parallel agents never race for the default.
            let sock = dir.path().join("local").join("agent-local.sock");
            text.push_str(&format!(
                "local_socket = {:?}\n",
                sock.display().to_string()
            ));
        }
        write_atomically(&config, &text);
        let sock = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock)
            .unwrap_or_else(|e| panic!("binding notify socket {}: {e}", sock.display()));
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap_or_else(|e| panic!("notify socket timeout: {e}"));
        let child = spawn_agent(&binary, dir.path(), &options);
        let pid = child.id();
        let agent = Agent {
            pid: pid.into(),
            binary,
            pin_dir,
            owns_pin_dir,
            pidfile: record_pid(pid),
            dir,
            options,
            state: Mutex::new(State {
                child,
                exited: None,
                notify,
                notifications: Vec::new(),
            }),
            log_reported: AtomicBool::new(false),
        };
        agent.wait_notify("READY=1", agent.options.ready_timeout);
        agent
    }

    /// Starts the agent again (same config, state dir and pin dir) after it exited or was
    /// killed, and waits for its `READY=1`. Panics if it is still running.
    pub fn respawn(&self) {
        let from = {
            let mut st = self.state();
            assert!(
                st.try_wait().is_some(),
                "respawn of agent pid {} which is still running",
                self.pid()
            );
            st.poll();
            let child = spawn_agent(&self.binary, self.dir.path(), &self.options);
            self.pid.store(child.id(), Ordering::Relaxed);
            let _ = std::fs::write(
                &self.pidfile,
                format!("{} {}\n", child.id(), start_time(child.id()).unwrap_or(0)),
            );
            st.child = child;
            st.exited = None;
            st.notifications.len()
        };
        self.wait_notify_from("READY=1", from, self.options.ready_timeout);
    }

    /// `http://ADDR/metrics` when the agent was started with `metrics_listen`.
    pub fn metrics_url(&self) -> Option<String> {
        self.options
            .metrics_listen
            .map(|addr| format!("http://{addr}/metrics"))
    }

    /// The agent's bpffs pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends SIGTERM and waits (≤ `terminate_timeout`, 15 s by default) for the exit.
    ///
    /// Panics with the log's tail if it does not exit in time (it is then SIGKILLed).
    pub fn terminate(&self) -> ExitStatus {
        if let Some(status) = self.state().exited {
            return status;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + self.options.terminate_timeout;
        loop {
            {
                let mut st = self.state();
                st.poll();
                if let Some(status) = st.try_wait() {
                    return status;
                }
                if Instant::now() >= deadline {
                    st.kill();
                    drop(st);
                    panic!(
                        "agent (pid {}) did not exit within {:?} of SIGTERM; killed. Log tail:\n{}",
                        self.pid(),
                        self.options.terminate_timeout,
                        self.tail_for_panic()
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the agent (by pid) and reaps it.
    pub fn kill(&self) -> Option<ExitStatus> {
        self.state().kill()
    }

    /// Sends `signal` to the agent process (panics if it already exited and was reaped).
    pub fn signal(&self, signal: i32) {
        let st = self.state();
        assert!(
            st.exited.is_none(),
            "signal {signal} to agent pid {} which already exited ({:?})",
            self.pid(),
            st.exited
        );
        if let Ok(pid) = i32::try_from(self.pid()) {
            // SAFETY: kill(2) of our own child, not yet reaped (checked under the lock).
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// The exit status if the agent has exited (reaping it).
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.state().try_wait()
    }

    /// Everything the agent wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The log tail for a panic message (Drop then does not repeat it).
    fn tail_for_panic(&self) -> String {
        self.log_reported.store(true, Ordering::Relaxed);
        self.log_tail(60)
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The agent's pid (of the current process, after a respawn).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// The agent's local binding socket (each test agent has its own).
    pub fn local_socket(&self) -> PathBuf {
        self.dir.path().join("local").join("agent-local.sock")
    }

    /// Path of the config file the agent reads.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// The agent's `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Path of the agent's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Every notify message line received so far (e.g. `READY=1`, `STATUS=…`), in order.
    pub fn notifications(&self) -> Vec<String> {
        let mut st = self.state();
        st.poll();
        st.notifications.clone()
    }

    /// Waits until the agent has sent `line` (e.g. `"STOPPING=1"`), counting earlier ones.
    pub fn wait_notify(&self, line: &str, timeout: Duration) {
        self.wait_notify_from(line, 0, timeout);
    }

    /// Ids of the eBPF maps the agent holds open, with their names (from /proc/<pid>/fdinfo).
    pub fn maps(&self) -> Vec<crate::bpfq::MapRef> {
        crate::bpfq::process_maps(self.pid())
    }

    /// Entries in the agent's own map called `name` (e.g. `proxy_common::MAP_ORIG`).
    pub fn map_len(&self, name: &str) -> usize {
        let maps = self.maps();
        let own: Vec<_> = maps.iter().filter(|m| m.name == name).collect();
        assert!(
            !own.is_empty(),
            "agent (pid {}) holds no map named {name}; it holds {maps:?}",
            self.pid()
        );
        own.iter().map(|m| crate::bpfq::map_len(m.id)).sum()
    }

    fn wait_notify_from(&self, line: &str, from: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut st = self.state();
            if st.seen_since(from, line) {
                return;
            }
            if let Some(status) = st.try_wait() {
                st.poll();
                if st.seen_since(from, line) {
                    return;
                }
                let seen = st.notifications.clone();
                drop(st);
                panic!(
                    "agent (pid {}) exited ({}) before sending {line}; notifications: {seen:?}. \
                     Log tail:\n{}",
                    self.pid(),
                    describe_status(status),
                    self.tail_for_panic()
                );
            }
            if Instant::now() >= deadline {
                let seen = st.notifications.clone();
                drop(st);
                panic!(
                    "agent (pid {}) did not send {line} within {timeout:?}; notifications: \
                     {seen:?}. Log tail:\n{}",
                    self.pid(),
                    self.tail_for_panic()
                );
            }
            st.recv_one();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.state().kill();
        if std::thread::panicking() && !self.log_reported.load(Ordering::Relaxed) {
            eprintln!(
                "---- veil-agent (pid {}) log tail ----\n{}\n---- end of agent log ----",
                self.pid(),
                self.log_tail(80)
            );
        }
        let _ = std::fs::remove_file(&self.pidfile);
        if self.owns_pin_dir {
            // The agent is gone: its teardown releases what it holds outside the pin dir (the
            // listener ports it reserved in each netns, the host's included).
            if self.options.binary.is_none() {
                let _ = Command::new(&self.binary)
                    .arg("--config")
                    .arg(self.config_path())
                    .arg("--state-dir")
                    .arg(self.state_dir())
                    .args(["teardown", "--all"])
                    .stdin(Stdio::null())
                    .output();
            }
            // Unpinning its links detaches them, and its maps go with them.
            remove_pin_dir(&self.pin_dir);
        }
        crate::bind::release_pins(&self.local_socket().with_file_name("netns"));
    }
}

/// The agent's `RUST_LOG` when [`set_agent_log`] was not called: debug for veil's own crate,
/// so a failing test's log tail says what the agent did.
const TEST_AGENT_LOG: &str = "info,proxy_agent=debug";

static AGENT_LOG: OnceLock<String> = OnceLock::new();

/// Sets the `RUST_LOG` of every agent this process starts from now on (first call wins).
/// Benchmarks use the production level: a debug line per connection is work nginx, with its
/// access log off, does not do.
pub fn set_agent_log(filter: &str) {
    let _ = AGENT_LOG.set(filter.to_owned());
}

fn spawn_agent(binary: &Path, dir: &Path, options: &AgentOptions) -> Child {
    let log_path = dir.join("agent.log");
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", log_path.display()));
    let log2 = log
        .try_clone()
        .unwrap_or_else(|e| panic!("dup of agent log fd: {e}"));
    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(dir.join("agent.toml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(&options.args)
        .env(
            "RUST_LOG",
            AGENT_LOG.get().map_or(TEST_AGENT_LOG, String::as_str),
        )
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        // Plain text, so tests can match `key=value` in the log.
        .env("NO_COLOR", "1")
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", binary.display()))
}

/// Removes a pin directory tree in bpffs (unlinking pins; links detach once unreferenced).
pub(crate) fn remove_pin_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("veil-tests: cannot remove pin dir {}: {e}", dir.display());
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), path.display()));
}

/// Start time of a process (clock ticks since boot), from /proc/<pid>/stat field 22; tells a
/// recorded pid apart from a later process that reused it.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Records `agent_pid` (with its start time) under the owner's pid, for
/// [`crate::stale::agents::cleanup_stale_agents`].
fn record_pid(agent_pid: u32) -> PathBuf {
    let _ = std::fs::create_dir_all(owner::STATE_DIR);
    let path = Path::new(owner::STATE_DIR).join(format!(
        "agent-{}-{}.pid",
        owner::pid(),
        owner::next_seq()
    ));
    let line = format!("{agent_pid} {}\n", start_time(agent_pid).unwrap_or(0));
    if let Ok(mut f) = File::create(&path) {
        let _ = f.write_all(line.as_bytes());
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_config() {
        let text = render_config(
            Some(5000),
            Some(Path::new("/tmp/x/agent.sock")),
            Path::new("/sys/fs/bpf/veil-test-1-2"),
        );
        let parsed: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(parsed["agent"]["drain_timeout_ms"].as_integer(), Some(5000));
        assert_eq!(
            parsed["agent"]["control_socket"].as_str(),
            Some("/tmp/x/agent.sock")
        );
        assert_eq!(
            parsed["agent"]["bpf_pin_dir"].as_str(),
            Some("/sys/fs/bpf/veil-test-1-2")
        );
        let bare: toml::Value =
            toml::from_str(&render_config(None, None, Path::new("/p"))).unwrap();
        assert!(bare["agent"].get("control_socket").is_none(), "{bare}");
        assert!(bare["agent"].get("metrics_listen").is_none(), "{bare}");
        let options = AgentOptions {
            metrics_listen: Some("127.0.0.1:9999".parse().unwrap()),
            extra_config: "scrub_responses = false".into(),
            ..AgentOptions::default()
        };
        let full: toml::Value = toml::from_str(&render_options(&options, Path::new("/p"))).unwrap();
        assert_eq!(
            full["agent"]["metrics_listen"].as_str(),
            Some("127.0.0.1:9999")
        );
        assert_eq!(full["agent"]["scrub_responses"].as_bool(), Some(false));
    }

    #[test]
    fn reads_own_start_time() {
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
    }
}
