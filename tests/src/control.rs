//! Fixtures for veil-control tests: a real `veil-control serve` on a temp data dir and a free
//! loopback port, API keys made with `veil-control apikey create`, and a small HTTP helper.
//! The daemon is killed by PID when the fixture drops (also on panic).

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of the `veil-control` binary: `$VEIL_CONTROL_BIN` if set (e.g. a release build for load
/// tests), else the one next to the running test executable.
pub fn control_bin() -> PathBuf {
    match std::env::var_os("VEIL_CONTROL_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => crate::env::bin_path("veil-control"),
    }
}

/// The target profile dir (`target/<profile>`), for shared test state like the Python venv.
pub fn target_dir() -> PathBuf {
    crate::env::bin_path("veil-control")
        .parent()
        .expect("a binary lives in target/<profile>")
        .to_path_buf()
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind :0");
    l.local_addr().expect("local_addr").port()
}

/// Config for API-only tests: sandboxes under `veil-test.slice`, no agent required, and no
/// check that cgroups and netns files exist on this host.
pub const TEST_CONFIG: &str = "[sandbox]\ncgroup_parents = [\"veil-test.slice\", \"veil.slice\"]\n\
    check_paths = false\n[agent]\nrequired = false\n";

/// Config with an agent requirement, real host-path checks and an acknowledgement timeout.
pub fn linked_config(agent_required: bool, timeout_ms: u64) -> String {
    format!(
        "[sandbox]\ncgroup_parents = [\"veil-test.slice\"]\ncheck_paths = true\n\
         [agent]\nrequired = {agent_required}\ntimeout_ms = {timeout_ms}\n"
    )
}

/// A running `veil-control serve`.
#[derive(Debug)]
pub struct Control {
    child: Option<Child>,
    /// Loopback port of the REST API.
    pub port: u16,
    /// The daemon's data dir.
    pub data_dir: PathBuf,
    /// Where the daemon's stderr goes (appended across restarts).
    pub log_path: PathBuf,
    /// The agent link socket (from the config, else one in the temp dir).
    pub agent_socket: PathBuf,
    config_path: PathBuf,
    rust_log: String,
    extra_args: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl Control {
    /// Starts a daemon on a fresh temp data dir.
    pub fn start() -> Self {
        Self::start_with_config(TEST_CONFIG)
    }

    /// Starts a daemon with this TOML config (data dir and listen address are set by flags).
    pub fn start_with_config(config: &str) -> Self {
        Self::start_with(config, "debug")
    }

    /// Starts a daemon with this TOML config and `RUST_LOG` filter.
    pub fn start_with(config: &str, rust_log: &str) -> Self {
        Self::start_with_args(config, rust_log, &[])
    }

    /// Starts a daemon with this TOML config, `RUST_LOG` filter and extra `serve` arguments
    /// (e.g. `--log-format json`).
    pub fn start_with_args(config: &str, rust_log: &str, args: &[&str]) -> Self {
        let mut c = Self::prepared(config, rust_log, args);
        // The free port may be taken between probing and binding: retry on another one.
        for attempt in 0.. {
            match c.try_spawn() {
                Ok(()) => break,
                Err(e) if attempt < 3 && e.contains("binding 127.0.0.1") => c.port = free_port(),
                Err(e) => panic!("{e}"),
            }
        }
        c
    }

    /// A daemon set up like [`Control::start_with_args`] but not started: its data dir can be
    /// prepared first (e.g. a replica's key files); [`Control::ensure_running`] starts it.
    pub fn prepared(config: &str, rust_log: &str, args: &[&str]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("veil-control-test-")
            .tempdir()
            .expect("tempdir");
        let config_path = tmp.path().join("control.toml");
        // Every daemon gets its own agent socket unless the config names one: the default
        // (/run/veil/…) is shared by the host and would collide between tests.
        let table: toml::Table = toml::from_str(config).expect("test config is valid TOML");
        let (config, agent_socket) = match table.get("agent_socket").and_then(|v| v.as_str()) {
            Some(sock) => (config.to_owned(), PathBuf::from(sock)),
            None => {
                let sock = tmp.path().join("agent.sock");
                let line = format!("agent_socket = {:?}\n", sock.display().to_string());
                (format!("{line}{config}"), sock)
            }
        };
        std::fs::write(&config_path, config).expect("write config");
        Self {
            child: None,
            port: free_port(),
            data_dir: tmp.path().join("data"),
            log_path: tmp.path().join("control.log"),
            agent_socket,
            config_path,
            rust_log: rust_log.to_owned(),
            extra_args: args.iter().map(|a| (*a).to_owned()).collect(),
            _tmp: tmp,
        }
    }

    /// The config file the daemon reads.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Temp dir holding data dir, config and log.
    pub fn tmp_path(&self) -> &Path {
        self._tmp.path()
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        let child = Command::new(control_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.extra_args)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn veil-control serve");
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "veil-control exited during start-up ({status}); log:\n{}",
                    self.log()
                ));
            }
            // The REST port is bound before the agent socket: a test may use either at once.
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && self.agent_socket.exists()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "veil-control not ready after 20 s; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// PID of the daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the daemon (our own child, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the daemon and waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same data dir and port (after `kill`/`stop`).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts the daemon; an error (with the log) if it exits during start-up.
    pub fn try_start(&mut self) -> Result<(), String> {
        self.kill();
        self.try_spawn()
    }

    /// Starts the daemon if it is not running.
    pub fn ensure_running(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// The API URL, `http://127.0.0.1:PORT/api`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/api", self.port)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Runs `veil-control ARGS` (with this data dir's env) and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(control_bin())
            .args(args)
            .env("VEIL_API_URL", self.url())
            .stdin(Stdio::null())
            .output()
            .expect("run veil-control")
    }

    /// Creates an API key via `veil-control apikey create` and returns it.
    pub fn apikey(&self, org: &str, permissions: &[&str]) -> String {
        let mut args = vec!["apikey", "create", "--org", org];
        for p in permissions {
            args.push("--permission");
            args.push(p);
        }
        let dir = self.data_dir.to_str().expect("utf-8 path");
        args.extend(["--data-dir", dir]);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "apikey create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key = String::from_utf8(out.stdout).expect("utf-8 key");
        let key = key.trim_end_matches('\n');
        assert!(!key.contains('\n'), "apikey create must print only the key");
        key.to_owned()
    }

    /// An HTTP helper for this daemon.
    pub fn api(&self) -> Api {
        Api::new(&self.url())
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A status and a parsed JSON body (Null when empty or not JSON).
pub type Reply = (u16, Value);

/// Minimal JSON-over-HTTP helper.
#[derive(Clone, Debug)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    /// Helper for the API at `base` (with `/api`).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
        }
    }

    /// Sends a request; `key` None sends no Authorization; `body` is sent as JSON.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        match self.try_send(method, path, key, body).await {
            Ok(reply) => reply,
            Err(e) => panic!("HTTP {method} {path}: {e}"),
        }
    }

    /// Like [`Api::send`], but a transport failure (daemon gone) is an `Err`.
    pub async fn try_send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Reply, String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// Sends raw bytes with a given content type.
    pub async fn send_raw(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// GET.
    pub async fn get(&self, path: &str, key: &str) -> Reply {
        self.send("GET", path, Some(key), None).await
    }

    /// POST JSON.
    pub async fn post(&self, path: &str, key: &str, body: Value) -> Reply {
        self.send("POST", path, Some(key), Some(&body)).await
    }

    /// PATCH JSON.
    pub async fn patch(&self, path: &str, key: &str, body: Value) -> Reply {
        self.send("PATCH", path, Some(key), Some(&body)).await
    }

    /// PUT JSON.
    pub async fn put(&self, path: &str, key: &str, body: Value) -> Reply {
        self.send("PUT", path, Some(key), Some(&body)).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str, key: &str) -> Reply {
        self.send("DELETE", path, Some(key), None).await
    }

    /// The typed client on the same API, for tests that do not pin the wire format (those
    /// speak raw JSON through the methods above: a client and a server sharing the same types
    /// cannot catch a wire bug).
    pub fn client(&self, key: &str) -> veil_client::Client {
        veil_client::Client::new(&self.base, veil_client::Zeroizing::new(key.to_owned()))
            .expect("client")
    }

    /// Creates a secret and returns its JSON, asserting 201.
    pub async fn create_secret(&self, key: &str, name: &str, value: &str, hosts: &[&str]) -> Value {
        let (status, body) = self
            .post(
                "/secret",
                key,
                serde_json::json!({"name": name, "value": value, "hosts": hosts}),
            )
            .await;
        assert_eq!(status, 201, "create {name}: {body}");
        body
    }
}

/// Asserts an error reply has the NestJS shape with this status.
pub fn assert_error(reply: &Reply, status: u16) {
    assert_eq!(reply.0, status, "unexpected reply {}", reply.1);
    assert_eq!(reply.1["statusCode"], status, "statusCode in {}", reply.1);
    assert!(reply.1["message"].is_string(), "message in {}", reply.1);
    assert!(reply.1["error"].is_string(), "error in {}", reply.1);
}

/// A random alphanumeric string of `n` characters (for distinctive test values).
pub fn random_token(n: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// Pinned Daytona SDK version for the compatibility test.
pub const DAYTONA_SDK: &str = "daytona==0.226.1";

/// A Python venv at `<target dir>/test-venv` with the Daytona SDK, created on first use under
/// a file lock (concurrent test binaries wait for one installer). Returns the venv's python.
pub fn daytona_venv() -> PathBuf {
    let target = target_dir().parent().expect("target dir").to_path_buf();
    let venv = target.join("test-venv");
    let python = venv.join("bin").join("python");
    let marker = venv.join(format!(".installed-{DAYTONA_SDK}"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join("test-venv.lock"))
        .expect("open venv lock");
    lock.lock().expect("lock venv");
    if !marker.exists() {
        if !python.exists() {
            let out = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .output()
                .expect("python3 -m venv");
            assert!(
                out.status.success(),
                "python3 -m venv failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = Command::new(venv.join("bin").join("pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                DAYTONA_SDK,
            ])
            .output()
            .expect("pip install");
        assert!(
            out.status.success(),
            "pip install {DAYTONA_SDK} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&marker, b"").expect("write marker");
    }
    drop(lock);
    python
}

/// A PEM-shaped CA certificate for fake agents (control checks the shape, not the contents).
pub const FAKE_CA_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nZmFrZSB2ZWlsIGFnZW50IENB\n-----END CERTIFICATE-----\n";

/// How a [`FakeAgent`] answers control's messages.
#[derive(Clone, Debug, Default)]
pub struct AgentBehaviour {
    /// Never acknowledge (control times out).
    pub silent: bool,
    /// Wait this long before each acknowledgement.
    pub delay: Duration,
    /// Report an error for a PutSandbox of this sandbox id.
    pub fail_sandbox: Option<String>,
}

/// A stand-in veil-agent for control-side tests: a real Unix-socket client speaking veil-link
/// that records every message and acknowledges as told. Dropping it disconnects.
#[derive(Debug)]
pub struct FakeAgent {
    received: std::sync::Arc<std::sync::Mutex<Vec<veil_link::ControlMsg>>>,
    behaviour: std::sync::Arc<std::sync::Mutex<AgentBehaviour>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAgent {
    /// Connects to `socket`, says Hello as `agent_id`, and waits for control's snapshot.
    pub async fn connect(socket: &Path, agent_id: &str, behaviour: AgentBehaviour) -> FakeAgent {
        use veil_link::{AgentMsg, ControlMsg, PROTOCOL_VERSION, read_frame, write_frame};
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
        write_frame(
            &mut stream,
            &AgentMsg::Hello {
                protocol: PROTOCOL_VERSION,
                agent_id: agent_id.parse().expect("a valid agent id"),
                ca_pem: FAKE_CA_PEM.to_owned(),
            },
        )
        .await
        .expect("send Hello");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let behaviour = std::sync::Arc::new(std::sync::Mutex::new(behaviour));
        let (rec, beh) = (received.clone(), behaviour.clone());
        let task = tokio::spawn(async move {
            while let Ok(Some(msg)) = read_frame::<ControlMsg, _>(&mut stream).await {
                let Some(seq) = msg.seq() else { continue };
                let b = beh.lock().expect("behaviour").clone();
                let errors = match (&msg, &b.fail_sandbox) {
                    (ControlMsg::PutSandbox { sandbox, .. }, Some(bad)) if sandbox.id == *bad => {
                        vec![format!("sandbox {bad}: attaching failed (fake agent)")]
                    }
                    _ => Vec::new(),
                };
                rec.lock().expect("received").push(msg);
                if b.silent {
                    continue;
                }
                if !b.delay.is_zero() {
                    tokio::time::sleep(b.delay).await;
                }
                if write_frame(&mut stream, &AgentMsg::Applied { seq, errors })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let agent = FakeAgent {
            received,
            behaviour,
            task,
        };
        agent
            .wait_for("the snapshot", |m| matches!(m, ControlMsg::Snapshot { .. }))
            .await;
        agent
    }

    /// Changes how later messages are answered.
    pub fn set_behaviour(&self, behaviour: AgentBehaviour) {
        *self.behaviour.lock().expect("behaviour") = behaviour;
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<veil_link::ControlMsg> {
        self.received.lock().expect("received").clone()
    }

    /// Messages received after the first `from`.
    pub fn messages_since(&self, from: usize) -> Vec<veil_link::ControlMsg> {
        self.messages().split_off(from)
    }

    /// Waits up to 10 s for a message matching `pred`; panics naming `what` otherwise.
    pub async fn wait_for(
        &self,
        what: &str,
        pred: impl Fn(&veil_link::ControlMsg) -> bool,
    ) -> veil_link::ControlMsg {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| pred(m)) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "fake agent: no {what} within 10 s; got {:?}",
                self.messages()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Closes the connection.
    pub fn disconnect(&self) {
        self.task.abort();
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}
