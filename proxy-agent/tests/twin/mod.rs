//! Fixtures of the userspace twins of `proxy-ebpf`: a netns and a cgroup of their own, client
//! scripts run inside them, listeners standing in for the agent's. Needs root.
#![allow(dead_code, reason = "each test binary uses a part")]

use std::{
    fs::{self, File},
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use proxy_agent::bpf::{ConnTuple, netns_cookie};
use proxy_common::SandboxTarget;

pub const EPERM: i64 = 1;

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads eBPF programs and creates network namespaces and cgroups: run it as root"
    );
}

pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace with `lo` up and no routes; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = unique("veil-ebpf");
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    pub fn open(&self) -> File {
        File::open(Path::new("/run/netns").join(&self.name)).unwrap()
    }

    /// Runs `f` on a short-lived thread that has entered the namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = self.open();
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup v2 directory under the cgroup2 mount; removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new_under(parent: &Path) -> Self {
        let path = parent.join(unique("veil-ebpf"));
        fs::create_dir(&path).unwrap();
        Self { path }
    }

    pub fn id(&self) -> u64 {
        fs::metadata(&self.path).unwrap().ino()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A child that just exited may linger in cgroup.procs for a moment.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn cgroup2_mount() -> PathBuf {
    veil_sys::cgroup2_mount().expect("no cgroup2 mount in /proc/self/mounts")
}

pub fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?}: {status}");
}

/// One line of the client's output.
#[derive(Debug)]
pub struct ClientResult {
    pub peer: Option<String>,
    pub errno: Option<i64>,
}

/// Runs a Python script in `netns`, and in `cgroup` if given (joined before it creates a
/// socket); parses its JSON lines.
pub fn run_script(
    netns: &Netns,
    cgroup: Option<&Path>,
    script: &str,
    args: &[String],
) -> Vec<(String, ClientResult)> {
    let ns: OwnedFd = netns.open().into();
    let procs: Option<OwnedFd> = cgroup.map(|c| {
        fs::OpenOptions::new()
            .write(true)
            .open(c.join("cgroup.procs"))
            .unwrap()
            .into()
    });
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (write, setns) on fds opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                nix::unistd::write(procs, b"0")?;
            }
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    assert!(
        status.success(),
        "client failed: {status}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout)
        .unwrap()
        .lines()
        .map(|line| {
            (
                json_str(line, "tag").unwrap(),
                ClientResult {
                    peer: json_str(line, "peer"),
                    errno: json_int(line, "errno"),
                },
            )
        })
        .collect()
}

/// Tiny extraction from the client's flat JSON lines (keys and values without escapes).
pub fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\": \""))? + key.len() + 5;
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_owned())
}

pub fn json_int(line: &str, key: &str) -> Option<i64> {
    let start = line.find(&format!("\"{key}\": "))? + key.len() + 4;
    let digits: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

pub fn result<'a>(results: &'a [(String, ClientResult)], tag: &str) -> &'a ClientResult {
    &results
        .iter()
        .find(|(t, _)| t == tag)
        .unwrap_or_else(|| panic!("client printed no result for {tag}: {results:?}"))
        .1
}

/// A connection accepted by a stand-in listener.
#[derive(Debug)]
pub struct Accepted {
    /// The one-byte tag the client sent.
    pub tag: char,
    /// Its four-tuple as the listener sees it.
    pub tuple: ConnTuple,
    /// The accepted socket.
    pub stream: TcpStream,
}

/// Accepts `n` connections (nonblocking, with a deadline) from either listener; reads the
/// one-byte tag each sent.
pub fn accept_tagged(listeners: &[&TcpListener], n: usize) -> Vec<Accepted> {
    for l in listeners {
        l.set_nonblocking(true).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut accepted = Vec::new();
    while accepted.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "accepted only {accepted:?}"
        );
        let mut progressed = false;
        for l in listeners {
            match l.accept() {
                Ok((stream, peer)) => {
                    progressed = true;
                    accepted.push(read_tag(stream, peer));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    accepted
}

pub fn read_tag(mut stream: TcpStream, peer: SocketAddr) -> Accepted {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut tag = [0u8; 1];
    stream.read_exact(&mut tag).unwrap();
    Accepted {
        tag: char::from(tag[0]),
        tuple: tuple_of(&stream, peer),
        stream,
    }
}

/// The four-tuple of an accepted socket, as the agent builds it.
pub fn tuple_of(stream: &TcpStream, peer: SocketAddr) -> ConnTuple {
    ConnTuple {
        netns_cookie: netns_cookie(stream.as_fd()).unwrap(),
        listener: stream.local_addr().unwrap(),
        peer,
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Listeners on 127.0.0.1 and [::1] inside `netns`, and the target naming their ports.
pub fn listeners(netns: &Netns) -> (TcpListener, TcpListener, SandboxTarget) {
    let (l4, l6) = netns.within(|| {
        (
            TcpListener::bind("127.0.0.1:0").unwrap(),
            TcpListener::bind("[::1]:0").unwrap(),
        )
    });
    let target = SandboxTarget {
        port_v4: l4.local_addr().unwrap().port(),
        port_v6: l6.local_addr().unwrap().port(),
        flags: 0,
    };
    (l4, l6, target)
}
