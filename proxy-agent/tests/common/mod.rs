//! Helpers shared by the agent's kernel tests.
#![allow(dead_code, reason = "each test binary uses a part")]

pub mod fixture;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use proxy_agent::pins::PinLayout;

/// A bpffs pin dir unique to this test (`/sys/fs/bpf/veil-test-<pid>-<n>`), removed with
/// everything in it on drop (which also detaches links pinned there).
pub struct PinDir {
    layout: PinLayout,
}

impl PinDir {
    /// Creates and prepares it (mounting bpffs at /sys/fs/bpf if needed). First removes the
    /// pin dirs of test processes that died without cleaning up (named by their pid).
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale_pin_dirs();
        let root = PathBuf::from(format!(
            "/sys/fs/bpf/veil-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let layout = PinLayout::new(root);
        layout.prepare().expect("preparing the pin dir");
        Self { layout }
    }

    /// Its layout.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// Its root.
    pub fn path(&self) -> &Path {
        self.layout.root()
    }

    /// Every file pinned under it, relative to the root.
    pub fn pinned_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(self.path(), &mut out);
        out.iter()
            .filter_map(|p| p.strip_prefix(self.path()).ok().map(Path::to_path_buf))
            .collect()
    }
}

fn remove_stale_pin_dirs() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("veil-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.path());
    }
}

// ---- the agent process ----------------------------------------------------------------------

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use veil_link::{AgentMsg, ControlMsg, SandboxState, read_frame, write_frame};

/// Everything an agent keeps across restarts: state dir, pin dir, control socket path.
pub struct Dirs {
    /// State directory.
    pub state: tempfile::TempDir,
    /// bpffs pin dir.
    pub pins: PinDir,
    /// Where the (fake) control listens.
    pub control: PathBuf,
    sock_dir: tempfile::TempDir,
}

impl Dirs {
    /// Fresh, unique dirs.
    pub fn new() -> Self {
        let sock_dir = tempfile::tempdir().unwrap();
        Self {
            state: tempfile::tempdir().unwrap(),
            pins: PinDir::new(),
            control: sock_dir.path().join("control.sock"),
            sock_dir,
        }
    }

    /// The common flags of `veil-agent` for these dirs.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--state-dir".into(),
            self.state.path().display().to_string(),
            "--pin-dir".into(),
            self.pins.path().display().to_string(),
            "--control-socket".into(),
            self.control.display().to_string(),
        ]
    }

    /// The listener ports the agent recorded for `id`.
    pub fn ports(&self, id: &str) -> (u16, u16) {
        let text = std::fs::read_to_string(self.state.path().join("sandboxes.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let sb = v["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no record for {id}: {text}"));
        (
            sb["port_v4"].as_u64().unwrap() as u16,
            sb["port_v6"].as_u64().unwrap() as u16,
        )
    }

    /// `veil-agent teardown ARGS` with these dirs.
    pub fn teardown(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_veil-agent"))
            .args(self.args())
            .arg("teardown")
            .args(args)
            .output()
            .unwrap()
    }
}

/// A running `veil-agent`; SIGKILLed on drop if still running.
pub struct AgentProc {
    child: Child,
    notify: UnixDatagram,
    log: PathBuf,
    _notify_dir: tempfile::TempDir,
    /// From spawn to READY=1.
    pub ready_after: Duration,
}

impl AgentProc {
    /// Starts it and waits (≤ 10 s) for READY=1.
    pub fn start(dirs: &Dirs) -> Self {
        Self::start_with(dirs, &[])
    }

    /// Like [`Self::start`], with extra flags (e.g. `--upstream-ca`).
    pub fn start_with(dirs: &Dirs, extra: &[&str]) -> Self {
        let notify_dir = tempfile::tempdir().unwrap();
        let notify_path = notify_dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let log = notify_dir.path().join("agent.log");
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_veil-agent"))
            .args(dirs.args())
            .args(extra)
            .env("NOTIFY_SOCKET", &notify_path)
            .env(
                "RUST_LOG",
                std::env::var("VEIL_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut agent = Self {
            child,
            notify,
            log,
            _notify_dir: notify_dir,
            ready_after: Duration::ZERO,
        };
        agent.wait_for("READY=1", Duration::from_secs(10));
        agent.ready_after = started.elapsed();
        agent
    }

    /// Waits for a notify message containing `what`.
    pub fn wait_for(&mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n]).contains(what)
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited ({status}) before {what}:\n{}", self.log());
            }
        }
        panic!("agent sent no {what} within {timeout:?}:\n{}", self.log());
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (≤ 15 s) for it to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

// ---- a fake veil-control ----------------------------------------------------------------------

/// A Unix listener speaking veil-link, driven synchronously by the test.
pub struct FakeControl {
    rt: Arc<tokio::runtime::Runtime>,
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl FakeControl {
    /// Listens on `path`.
    pub fn bind(path: &Path) -> Self {
        let rt = Arc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        );
        let _ = std::fs::remove_file(path);
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(path).unwrap()
        };
        Self {
            rt,
            listener,
            path: path.to_owned(),
        }
    }

    /// Accepts the agent's connection (≤ `timeout`) and reads its Hello.
    pub fn accept(&self, timeout: Duration) -> ControlConn {
        let rt = self.rt.clone();
        let (mut stream, hello) = rt.block_on(async {
            let (mut stream, _) = tokio::time::timeout(timeout, self.listener.accept())
                .await
                .expect("the agent did not connect")
                .unwrap();
            let hello: AgentMsg = tokio::time::timeout(timeout, read_frame(&mut stream))
                .await
                .expect("no Hello")
                .unwrap()
                .expect("closed before Hello");
            (stream, hello)
        });
        let _ = &mut stream;
        ControlConn { rt, stream, hello }
    }
}

impl Drop for FakeControl {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One agent connection.
pub struct ControlConn {
    rt: Arc<tokio::runtime::Runtime>,
    stream: tokio::net::UnixStream,
    /// The agent's Hello.
    pub hello: AgentMsg,
}

impl ControlConn {
    /// Sends `msg` and waits (≤ 10 s) for its Applied; returns its errors and the round trip.
    pub fn send(&mut self, msg: ControlMsg) -> (Vec<String>, Duration) {
        let seq = msg.seq().expect("control sends no replies here");
        let stream = &mut self.stream;
        self.rt.block_on(async move {
            let sent = Instant::now();
            write_frame(stream, &msg).await.unwrap();
            let reply: AgentMsg = tokio::time::timeout(Duration::from_secs(10), read_frame(stream))
                .await
                .expect("no Applied within 10 s")
                .unwrap()
                .expect("agent closed the link");
            match reply {
                AgentMsg::Applied { seq: got, errors } if got == seq => (errors, sent.elapsed()),
                other => panic!("expected Applied {seq}, got {other:?}"),
            }
        })
    }

    /// Like [`Self::send`], asserting no error.
    pub fn apply(&mut self, msg: ControlMsg) -> Duration {
        let (errors, took) = self.send(msg);
        assert!(errors.is_empty(), "{errors:?}");
        took
    }
}

/// The SandboxState for a test sandbox. It mounts a secret control never sends: that changes
/// nothing on its connections (they pass through), but a sandbox a secret applies to is
/// redirected — one without any, leaving from its own netns, would go direct (issue 19), and
/// these tests are about the redirect.
pub fn sandbox_state(id: &str, sb: &veil_tests::Sandbox) -> SandboxState {
    SandboxState {
        egress: veil_tests::egress::link_egress(sb.netns_path()),
        id: id.parse().unwrap(),
        org: "org-1".parse().unwrap(),
        cgroup: sb.cgroup().path().to_path_buf(),
        netns: sb.netns_path().map(Path::to_path_buf),
        mounts: [(
            "VEIL_REDIRECT_ONLY".to_owned(),
            "sec-redirect-only".parse().unwrap(),
        )]
        .into_iter()
        .collect(),
        cgroup_id: None,
    }
}

/// Number of programs attached directly to `cgroup` at veil's nine attach points.
pub fn attached_programs(cgroup: &Path) -> usize {
    attached_program_ids(cgroup).len()
}

/// Ids of programs attached directly to `cgroup` at veil's nine attach points.
pub fn attached_program_ids(cgroup: &Path) -> Vec<u32> {
    veil_tests::AttachType::ALL
        .iter()
        .flat_map(|t| veil_tests::attached_prog_ids(cgroup, *t))
        .collect()
}

/// p50 and max of durations, in ms.
pub fn p50_max(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(samples[samples.len() / 2]), ms(*samples.last().unwrap()))
}

/// Detaches the link pinned at `path` from its hook (BPF_OBJ_GET + BPF_LINK_DETACH), leaving
/// the pin: what an operator's `bpftool link detach` would do behind the agent's back.
pub fn detach_pinned_link(path: &Path) {
    use std::os::unix::ffi::OsStrExt as _;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut get = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    // SAFETY: a valid BPF_OBJ_GET attr that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, &raw mut get, 24u32) };
    assert!(
        fd >= 0,
        "BPF_OBJ_GET {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let mut detach = [fd as u32, 0u32];
    // SAFETY: a valid BPF_LINK_DETACH attr that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 34, detach.as_mut_ptr(), 8u32) };
    assert_eq!(
        rc,
        0,
        "BPF_LINK_DETACH: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: closing the fd BPF_OBJ_GET returned to us.
    unsafe { libc::close(fd as i32) };
}
