//! Self-tests of the harness fixtures: each creates real kernel objects, checks they work, and
//! checks that nothing is left once they are dropped (also after a panic, and for leftovers of
//! dead processes).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use veil_tests::bpfq::{self, AttachType};
use veil_tests::cmd::{run_probe, wait_until};
use veil_tests::{
    Agent, AgentOptions, HttpHello, NetNs, Sandbox, TcpEcho, TcpHello, UdpEcho, World,
    cgroup2_mount, cleanup_stale, output_within, require_root,
};

const PROBE: &str = env!("CARGO_BIN_EXE_veil-probe");
const T: Duration = Duration::from_secs(20);

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn root_link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Process state letter from /proc/<pid>/stat, `None` when the process is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Gone or a zombie (killed, not yet reaped by whoever spawned it).
fn dead(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z'))
}

fn probe_host(args: &[&str]) -> veil_tests::ProbeOutput {
    let mut cmd = Command::new(PROBE);
    cmd.args(args);
    run_probe(&mut cmd, T)
}

fn str_field<'a>(v: &'a serde_json::Value, name: &str) -> &'a str {
    v.get(name)
        .and_then(|f| f.as_str())
        .unwrap_or_else(|| panic!("{v} has no string field {name}"))
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast::<&str>()
            .map(|s| (*s).to_owned())
            .unwrap_or_default(),
    }
}

#[test]
fn netns_is_created_usable_and_removed() {
    require_root();
    let ns = NetNs::new("selftest");
    let name = ns.name().to_owned();
    assert!(netns_exists(&name));
    assert_eq!(ns.path(), Path::new("/run/netns").join(&name));
    let lo = ns.ip(&["-o", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("127.0.0.1") && lo.contains("::1/128"), "{lo}");

    let host_ns = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let (inside, echoed) = ns.run(|| {
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.write_all(b"x").unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        (
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            b[0],
        )
    });
    assert_ne!(inside, host_ns, "run() must execute inside the namespace");
    assert_eq!(inside, PathBuf::from(format!("net:[{}]", ns.inode())));
    assert_eq!(echoed, b'x');
    // The calling thread is untouched.
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        host_ns
    );

    // nsenter keeps the cgroup2 mount visible (ip netns exec would hide it).
    let out = output_within(
        ns.command("cat")
            .arg(cgroup2_mount().join("cgroup.controllers")),
        T,
    );
    assert!(out.status.success(), "{out:?}");

    // Listeners are visible per namespace, and a dropped server's listener is gone.
    let echo = TcpEcho::start(&ns, "::1".parse().unwrap());
    assert!(
        ns.tcp_listeners().contains(&echo.addr()),
        "{:?}",
        ns.tcp_listeners()
    );
    assert!(!veil_tests::netns::current_tcp_listeners().contains(&echo.addr()));
    let addr = echo.addr();
    drop(echo);
    assert!(!ns.tcp_listeners().contains(&addr));

    drop(ns);
    assert!(!netns_exists(&name), "netns {name} left behind");
}

#[test]
fn world_is_reachable_from_the_host_and_removed() {
    require_root();
    let world = World::new();
    let (ns_name, host_if) = (world.netns().name().to_owned(), world.host_if().to_owned());
    assert!(root_link_exists(&host_if), "host veth {host_if} missing");
    assert!(host_if.len() <= 15);
    let lock = veil_tests::alloc::lock_path(world.block_index());
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        std::process::id().to_string(),
        "the block lock names its owner"
    );

    // TCP echo over IPv4 and IPv6, from the host netns; the server records the host's address.
    for (ip, host) in [
        (world.upstream_ip4(), IpAddr::V4(world.host_v4())),
        (world.upstream_ip6(), IpAddr::V6(world.host_v6())),
    ] {
        let echo = TcpEcho::start(world.netns(), ip);
        assert_eq!(echo.addr().ip(), ip);
        assert_ne!(echo.addr().port(), 0);
        let mut s = TcpStream::connect_timeout(&echo.addr(), T).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"hello world").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        assert_eq!(back, "hello world");
        assert_eq!(echo.peers(), vec![s.local_addr().unwrap()]);
        assert_eq!(echo.peers()[0].ip(), host);
        let addr = echo.addr();
        drop(echo);
        let refused = TcpStream::connect_timeout(&addr, T).unwrap_err();
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "a dropped server must stop listening"
        );
    }

    // Hello over TCP via veil-probe, HTTP via curl, UDP echo.
    let hello = TcpHello::start(world.netns(), world.upstream_ip4(), "N");
    let out = probe_host(&["tcp", "--addr", &hello.addr().to_string()]);
    let json = out.expect_ok();
    let local = str_field(json, "local");
    assert_eq!(str_field(json, "reply"), format!("N {local}"));
    assert_eq!(
        str_field(json, "peer_from_getpeername"),
        hello.addr().to_string()
    );

    let http = HttpHello::start(world.netns(), world.upstream_ip6(), "H");
    let out = output_within(
        Command::new("curl").args(["-sS", "--max-time", "10", &http.url()]),
        T,
    );
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl: {out:?}");
    assert!(
        body.starts_with(&format!("H [{}]:", world.host_v6())),
        "body {body:?}"
    );
    assert_eq!(http.peers().len(), 1);

    let udp = UdpEcho::start(world.netns(), world.upstream_ip4(), 0);
    let c = UdpSocket::bind("0.0.0.0:0").unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.send_to(b"dgram", udp.addr()).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = c.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"dgram"[..], udp.addr()));
    assert_eq!(udp.count(), 1);
    assert_eq!(udp.peers()[0].ip(), IpAddr::V4(world.host_v4()));

    drop((hello, http, udp));
    drop(world);
    assert!(
        !root_link_exists(&host_if),
        "host veth {host_if} left behind"
    );
    assert!(!netns_exists(&ns_name), "world netns {ns_name} left behind");
    assert!(!lock.exists(), "lock {} not released", lock.display());
}

#[test]
fn parallel_worlds_get_distinct_blocks() {
    require_root();
    let worlds: Vec<World> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(World::new)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let range = |a: Ipv4Addr| {
        let o = a.octets();
        o[0] == 198 && (o[1] == 18 || o[1] == 19)
    };
    let mut v4_blocks = HashSet::new();
    let mut v6_blocks = HashSet::new();
    for w in &worlds {
        assert!(range(w.upstream_v4()) && range(w.host_v4()));
        assert_eq!(u32::from(w.upstream_v4()) & !3, u32::from(w.host_v4()) & !3);
        assert!(
            v4_blocks.insert(u32::from(w.upstream_v4()) & !3),
            "v4 block reused"
        );
        let seg = w.upstream_v6().segments();
        assert_eq!(&seg[..3], &[0xfd76, 0x6569, 0x006c]);
        assert!(v6_blocks.insert(seg[3]), "v6 /64 reused");
    }
    // All four are reachable at once.
    let servers: Vec<_> = worlds
        .iter()
        .map(|w| TcpHello::start(w.netns(), w.upstream_ip4(), "P"))
        .collect();
    for s in &servers {
        let out = probe_host(&["tcp", "--addr", &s.addr().to_string()]);
        assert!(str_field(out.expect_ok(), "reply").starts_with("P "));
    }
}

#[test]
fn sandbox_commands_run_in_its_cgroup_and_netns() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("sbx");
    let link = world.link_sandbox(&ns);
    let sb = Sandbox::new("sbx", Some(&ns));
    assert_eq!(sb.netns_path(), Some(ns.path()));
    assert!(sb.cgroup().path().starts_with(cgroup2_mount()));

    let out = sb.run(&["cat", "/proc/self/cgroup"], T);
    let cg = String::from_utf8_lossy(&out.stdout);
    assert!(
        cg.lines()
            .any(|l| l == format!("0::{}", sb.cgroup().relative())),
        "not in the sandbox cgroup: {cg}"
    );
    let out = sb.run(&["readlink", "/proc/self/ns/net"], T);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("net:[{}]", ns.inode())
    );

    // Outside the cgroup, same netns.
    let out = sb.run_outside(&["cat", "/proc/self/cgroup"], T);
    let cg = String::from_utf8_lossy(&out.stdout);
    assert!(!cg.contains(&sb.cgroup().relative()), "{cg}");
    let out = sb.run_outside(&["readlink", "/proc/self/ns/net"], T);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("net:[{}]", ns.inode())
    );

    // pids() and id().
    let mut sleeper = sb.command("sleep").arg("60").spawn().unwrap();
    assert!(wait_until(T, || sb.cgroup().pids().contains(&sleeper.id())));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        sb.cgroup().id(),
        std::fs::metadata(sb.cgroup().path()).unwrap().ino()
    );
    sb.cgroup().kill_all();
    assert!(sb.cgroup().pids().is_empty());
    assert!(
        sleeper.wait().unwrap().code().is_none(),
        "killed by a signal"
    );

    // Through the link, directly (no agent), over IPv4 and IPv6.
    for (ip, me) in [
        (world.upstream_ip4(), IpAddr::V4(link.sandbox_v4())),
        (world.upstream_ip6(), IpAddr::V6(link.sandbox_v6())),
    ] {
        let hello = TcpHello::start(world.netns(), ip, "D");
        let out = sb.probe(&["tcp", "--addr", &hello.addr().to_string()]);
        let reply = str_field(out.expect_ok(), "reply").to_owned();
        let peer: SocketAddr = reply.strip_prefix("D ").unwrap().parse().unwrap();
        assert_eq!(
            peer.ip(),
            me,
            "the sandbox reached the world from its link address"
        );
    }

    // A sandbox sharing the host netns.
    let host_sb = Sandbox::new("hostsb", None);
    assert_eq!(host_sb.netns_path(), None);
    let out = host_sb.run(&["readlink", "/proc/self/ns/net"], T);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        std::fs::read_link("/proc/self/ns/net")
            .unwrap()
            .to_string_lossy()
    );
}

#[test]
fn dropping_a_sandbox_kills_its_processes_and_removes_its_cgroup() {
    require_root();
    let ns = NetNs::new("kill");
    let sb = Sandbox::new("kill", Some(&ns));
    let cg = sb.cgroup().path().to_owned();
    let mut child = sb
        .command("sh")
        .args(["-c", "sleep 100 & sleep 100"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(T, || sb.cgroup().pids().len() == 3));
    let pids = sb.cgroup().pids();
    drop(sb);
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    assert!(child.wait().unwrap().code().is_none());
    for p in pids {
        assert!(wait_until(T, || dead(p)), "pid {p} survived its sandbox");
    }
}

#[test]
fn panic_inside_a_test_still_cleans_up() {
    require_root();
    let record = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let world = World::new();
        let ns = NetNs::new("panic");
        let _link = world.link_sandbox(&ns);
        let sb = Sandbox::new("panic", Some(&ns));
        let _echo = TcpEcho::start(world.netns(), world.upstream_ip4());
        let child: Child = sb.command("sleep").arg("100").spawn().unwrap();
        *record.lock().unwrap() = Some((
            world.netns().name().to_owned(),
            ns.name().to_owned(),
            world.host_if().to_owned(),
            sb.cgroup().path().to_owned(),
            child,
        ));
        panic!("deliberate panic inside a test");
    });
    assert!(result.is_err());
    let (world_ns, sb_ns, host_if, cg, mut child) = record.lock().unwrap().take().unwrap();
    assert!(!netns_exists(&world_ns), "{world_ns} left behind");
    assert!(!netns_exists(&sb_ns), "{sb_ns} left behind");
    assert!(!root_link_exists(&host_if), "{host_if} left behind");
    assert!(!cg.exists(), "{} left behind", cg.display());
    assert!(dead(child.id()), "sandbox process {} survived", child.id());
    assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
}

/// A pid that belonged to a process which has exited.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    assert!(!veil_tests::owner::pid_alive(pid));
    pid
}

fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn leftovers_of_dead_test_processes_are_removed() {
    require_root();
    // Make sure this process's one-time cleanup has already run, so that only the explicit
    // call below can remove what we plant.
    drop(NetNs::new("warmup"));
    let dead = dead_pid();
    let dead36 = veil_tests::owner::base36(u64::from(dead));

    let netns = format!("veil-{dead}-0-stale");
    veil_tests::cmd::ip(&["netns", "add", &netns]);
    let live_netns = format!("veil-1-{}-liveowner", std::process::id());
    veil_tests::cmd::ip(&["netns", "add", &live_netns]);
    let (veth, peer) = (format!("vh-{dead36}-0"), format!("vq-{dead36}-0"));
    veil_tests::cmd::ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
    let cg = cgroup2_mount().join(format!("veil-test-{dead}-0-stale"));
    std::fs::create_dir(&cg).unwrap();
    std::fs::create_dir(cg.join("nested")).unwrap();
    let mut in_cgroup = Command::new("sleep").arg("100").spawn().unwrap();
    std::fs::write(cg.join("nested/cgroup.procs"), in_cgroup.id().to_string()).unwrap();
    let mut fake_agent = Command::new("sleep").arg("100").spawn().unwrap();
    std::fs::create_dir_all("/run/veil-tests").unwrap();
    let pidfile = PathBuf::from(format!("/run/veil-tests/agent-{dead}-0.pid"));
    std::fs::write(
        &pidfile,
        format!("{} {}\n", fake_agent.id(), start_time(fake_agent.id())),
    )
    .unwrap();
    let tmp = std::env::temp_dir().join(format!("veil-test-{dead}-abc"));
    std::fs::create_dir_all(tmp.join("state")).unwrap();
    // A block lock whose owner died without unlinking it (nobody holds its flock).
    let lock = PathBuf::from(format!(
        "/run/veil-tests/block-{}.lock",
        veil_tests::alloc::BLOCKS - 1
    ));
    let planted_lock = !lock.exists();
    if planted_lock {
        std::fs::write(&lock, format!("{dead}\n")).unwrap();
    }

    cleanup_stale();

    let kept = netns_exists(&live_netns);
    let _ = veil_tests::cmd::try_run("ip", &["netns", "del", &live_netns]);
    assert!(kept, "a live owner's netns must be kept");
    assert!(!netns_exists(&netns), "stale netns kept");
    assert!(
        !root_link_exists(&veth) && !root_link_exists(&peer),
        "stale veth kept"
    );
    assert!(!cg.exists(), "stale cgroup kept");
    assert!(
        in_cgroup.wait().unwrap().code().is_none(),
        "process in stale cgroup not killed"
    );
    assert!(
        fake_agent.wait().unwrap().code().is_none(),
        "stale agent not killed"
    );
    assert!(!pidfile.exists());
    assert!(!tmp.exists(), "stale temp dir kept");
    if planted_lock {
        assert!(!lock.exists(), "unheld block lock kept");
    }
}

/// Writes an executable fake agent: a python script speaking the notify protocol.
fn fake_agent(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-agent");
    let script = format!(
        "#!/usr/bin/env python3\n\
         import os, signal, socket, sys, time\n\
         addr = os.environ['NOTIFY_SOCKET']\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         def notify(m): s.sendto(m.encode(), addr)\n\
         args = sys.argv[1:]\n\
         cfg = args[args.index('--config') + 1]\n\
         state = args[args.index('--state-dir') + 1]\n\
         def pins(): return open(cfg).read().count('bpf_pin_dir')\n\
         {body}\n"
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

const WELL_BEHAVED: &str = "\
def hup(*_):
    notify('RELOADING=1')
    print('reloaded with', pins(), flush=True)
    time.sleep(0.2)
    notify('READY=1')
def term(*_):
    notify('STOPPING=1')
    print('stopping', flush=True)
    sys.exit(0)
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, term)
print('started with', pins(), 'rust_log', os.environ.get('RUST_LOG'), flush=True)
time.sleep(0.3)
notify('STATUS=attached\\nREADY=1')
while True:
    signal.pause()
";

#[test]
fn agent_fixture_follows_the_notify_protocol() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let bin = fake_agent(dir.path(), WELL_BEHAVED);
    let agent = Agent::start_with_binary(&bin);
    assert!(
        agent
            .log()
            .contains("started with 1 rust_log info,proxy_agent=debug"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.notifications(), vec!["STATUS=attached", "READY=1"]);
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(agent.config_path()).unwrap()).unwrap();
    assert_eq!(
        config["agent"]["bpf_pin_dir"].as_str(),
        Some(agent.pin_dir().to_str().unwrap())
    );
    assert!(config["agent"].get("control_socket").is_none());

    // A killed agent comes back with the same config and state dir.
    let first = agent.pid();
    assert!(agent.kill().is_some());
    agent.respawn();
    assert_ne!(agent.pid(), first);
    assert_eq!(
        agent.log().matches("started with 1").count(),
        2,
        "{}",
        agent.log()
    );

    let pid = agent.pid();
    let status = std::thread::spawn(move || {
        let status = agent.terminate();
        assert!(agent.notifications().contains(&"STOPPING=1".to_owned()));
        status
    })
    .join()
    .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(proc_state(pid).is_none(), "terminated agent not reaped");
}

#[test]
fn agent_fixture_reports_early_exit_and_timeouts_with_the_log() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let failing = fake_agent(
        dir.path(),
        "print('boom: bad config', file=sys.stderr, flush=True)\nsys.exit(3)",
    );
    let msg =
        panic_message(std::panic::catch_unwind(|| Agent::start_with_binary(&failing)).unwrap_err());
    assert!(msg.contains("exit code 3"), "{msg}");
    assert!(msg.contains("boom: bad config"), "{msg}");

    let silent_dir = tempfile::tempdir().unwrap();
    let silent = fake_agent(
        silent_dir.path(),
        "print('never ready', flush=True)\nwhile True: time.sleep(1)",
    );
    let options = AgentOptions {
        binary: Some(silent),
        // Long enough for Python to start and print under a loaded machine (at 1 s the log
        // tail was sometimes still empty), short enough for a test.
        ready_timeout: Duration::from_secs(5),
        ..AgentOptions::default()
    };
    let msg = panic_message(std::panic::catch_unwind(|| Agent::start_with(options)).unwrap_err());
    assert!(msg.contains("did not send READY=1 within 5s"), "{msg}");
    assert!(msg.contains("never ready"), "{msg}");
    let pid: u32 = msg
        .split("pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        proc_state(pid).is_none(),
        "timed-out agent {pid} not killed and reaped"
    );
}

#[test]
fn veil_probe_echo_and_udp_report_results_and_errors() {
    require_root();
    let world = World::new();
    let echo = TcpEcho::start(world.netns(), world.upstream_ip4());
    let out = probe_host(&[
        "echo",
        "--addr",
        &echo.addr().to_string(),
        "--conns",
        "50",
        "--bytes",
        "300000",
        "--seed",
        "7",
    ]);
    let json = out.expect_ok();
    assert_eq!(json["ok"], 50);
    assert_eq!(json["failed"], 0);
    assert_eq!(json["bytes"], 50 * 300_000);
    assert_eq!(echo.peers().len(), 50);

    // Line mode over the echo server, with a bound source address.
    let bind = SocketAddr::new(IpAddr::V4(world.host_v4()), 0).to_string();
    let out = probe_host(&[
        "tcp",
        "--addr",
        &echo.addr().to_string(),
        "--bind",
        &bind,
        "--send",
        "ping\n",
    ]);
    let json = out.expect_ok();
    assert_eq!(str_field(json, "reply"), "ping");
    assert!(str_field(json, "local").starts_with(&format!("{}:", world.host_v4())));

    // A server that does not echo: every connection is a hash mismatch, and the exit says so.
    let hello = TcpHello::start(world.netns(), world.upstream_ip4(), "X");
    let out = probe_host(&[
        "echo",
        "--addr",
        &hello.addr().to_string(),
        "--conns",
        "3",
        "--bytes",
        "10",
    ]);
    assert!(!out.ok());
    assert_eq!(out.error(), Some("CONNECTIONS_FAILED"));
    assert_eq!(out.json["failed"], 3);
    assert!(out.json["errors"][0].as_str().unwrap().contains("MISMATCH"));

    let udp = UdpEcho::start(world.netns(), world.upstream_ip6(), 0);
    let out = probe_host(&["udp", "--addr", &udp.addr().to_string(), "--send", "q"]);
    assert_eq!(str_field(out.expect_ok(), "reply"), "q");
    let out = probe_host(&[
        "udp",
        "--addr",
        &udp.addr().to_string(),
        "--send",
        "q",
        "--connect",
    ]);
    assert_eq!(str_field(out.expect_ok(), "reply"), "q");
    assert_eq!(udp.count(), 2);

    // Nobody listening: unconnected → timeout, connected → the ICMP error.
    let closed = SocketAddr::new(world.upstream_ip4(), 9).to_string();
    let out = probe_host(&[
        "udp",
        "--addr",
        &closed,
        "--send",
        "q",
        "--timeout-ms",
        "300",
    ]);
    assert_eq!(out.error(), Some("ETIMEDOUT"), "{}", out.json);
    assert_eq!(out.json["sent"], true);
    let out = probe_host(&[
        "udp",
        "--addr",
        &closed,
        "--send",
        "q",
        "--connect",
        "--timeout-ms",
        "2000",
    ]);
    assert_eq!(out.error(), Some("ECONNREFUSED"), "{}", out.json);
    let out = probe_host(&["tcp", "--addr", &closed]);
    assert_eq!(out.error(), Some("ECONNREFUSED"), "{}", out.json);
    let out = probe_host(&["tcp"]);
    assert_eq!(out.error(), Some("USAGE"));
}

// ---- raw bpf(2) helpers to give bpfq something real to find ----

fn sys_bpf(cmd: i64, attr: &mut [u8]) -> i64 {
    // SAFETY: attr is a zeroed, correctly laid out bpf_attr prefix for `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    assert!(rc >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
    rc
}

fn put32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Loads a CGROUP_SOCK_ADDR program for `attach_type` that returns `verdict`; returns its fd.
fn load_verdict_prog(attach_type: u32, verdict: i32) -> OwnedFd {
    // r0 = verdict; exit
    let mut insns = [0u8; 16];
    insns[0] = 0xb7;
    insns[4..8].copy_from_slice(&verdict.to_ne_bytes());
    insns[8] = 0x95;
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, 18); // BPF_PROG_TYPE_CGROUP_SOCK_ADDR
    put32(&mut attr, 4, 2);
    put64(&mut attr, 8, insns.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    attr[48..48 + 11].copy_from_slice(b"veil_selfts");
    put32(&mut attr, 68, attach_type);
    let fd = sys_bpf(5, &mut attr); // BPF_PROG_LOAD
    // SAFETY: the kernel just returned this new fd to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn prog_id(fd: &OwnedFd) -> u32 {
    let mut info = [0u8; 256];
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, fd.as_raw_fd() as u32);
    put32(&mut attr, 4, info.len() as u32);
    put64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(15, &mut attr); // BPF_OBJ_GET_INFO_BY_FD
    u32::from_ne_bytes(info[4..8].try_into().unwrap())
}

#[test]
fn bpfq_sees_attached_programs_and_map_entries_and_probe_reports_eperm() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("bpfq");
    let _link = world.link_sandbox(&ns);
    let sb = Sandbox::new("bpfq", Some(&ns));
    let cg = sb.cgroup().path().to_owned();
    for t in AttachType::ALL {
        assert!(
            bpfq::attached_prog_ids(&cg, t).is_empty(),
            "{t:?} on a new cgroup"
        );
    }

    // Deny UDP sendmsg (IPv4) in the sandbox cgroup, as veil does for port 443.
    let prog = load_verdict_prog(AttachType::Sendmsg4.kernel_value(), 0);
    let cg_dir = std::fs::File::open(&cg).unwrap();
    let mut attr = [0u8; 16];
    put32(&mut attr, 0, cg_dir.as_raw_fd() as u32);
    put32(&mut attr, 4, prog.as_raw_fd() as u32);
    put32(&mut attr, 8, AttachType::Sendmsg4.kernel_value());
    sys_bpf(8, &mut attr); // BPF_PROG_ATTACH
    assert_eq!(
        bpfq::attached_prog_ids(&cg, AttachType::Sendmsg4),
        vec![prog_id(&prog)]
    );
    assert_eq!(bpfq::attached_progs(&cg).len(), 1);

    let udp = UdpEcho::start(world.netns(), world.upstream_ip4(), 0);
    let out = sb.probe(&["udp", "--addr", &udp.addr().to_string(), "--send", "q"]);
    assert_eq!(out.error(), Some("EPERM"), "{}", out.json);
    assert_eq!(out.json["stage"], "sendto");
    let out = sb.probe_outside(&["udp", "--addr", &udp.addr().to_string(), "--send", "q"]);
    assert_eq!(str_field(out.expect_ok(), "reply"), "q");
    assert_eq!(udp.count(), 1);

    // A hash map with 8-byte keys holding this cgroup's id.
    let name = "VEIL_SELFTEST";
    let mut attr = [0u8; 64];
    put32(&mut attr, 0, 1); // BPF_MAP_TYPE_HASH
    put32(&mut attr, 4, 8);
    put32(&mut attr, 8, 8);
    put32(&mut attr, 12, 16);
    attr[28..28 + name.len()].copy_from_slice(name.as_bytes());
    let map_fd = sys_bpf(0, &mut attr); // BPF_MAP_CREATE
    // SAFETY: new fd from the kernel.
    let map = unsafe { OwnedFd::from_raw_fd(map_fd as i32) };
    let before = bpfq::map_len_by_name(name);
    let key = sb.cgroup().id();
    assert!(!bpfq::map_has_u64(name, key));
    let value = 1u64;
    let mut attr = [0u8; 32];
    put32(&mut attr, 0, map.as_raw_fd() as u32);
    put64(&mut attr, 8, &key as *const u64 as u64);
    put64(&mut attr, 16, &value as *const u64 as u64);
    sys_bpf(2, &mut attr); // BPF_MAP_UPDATE_ELEM
    assert!(bpfq::map_has_u64(name, key));
    assert_eq!(bpfq::map_len_by_name(name), before + 1);
    let mine = bpfq::process_maps(std::process::id());
    let entry = mine.iter().find(|m| m.name == name).unwrap();
    assert_eq!(bpfq::map_len(entry.id), 1);
    assert!(!bpfq::sandbox_map_has(key), "no agent ever saw this cgroup");
}

#[test]
fn commands_are_bounded_even_when_a_grandchild_keeps_the_pipes() {
    require_root();
    let sb = Sandbox::new("bounded", None);
    let started = std::time::Instant::now();
    let out = sb.run(&["sh", "-c", "echo hi; sleep 60 & exit 4"], T);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    let msg = panic_message(
        std::panic::catch_unwind(|| {
            sb.run(
                &["sh", "-c", "echo partial; echo oops >&2; sleep 60"],
                Duration::from_millis(500),
            )
        })
        .unwrap_err(),
    );
    assert!(msg.contains("timed out after 500ms"), "{msg}");
    assert!(msg.contains("partial") && msg.contains("oops"), "{msg}");
    let cg = sb.cgroup().path().to_owned();
    drop(sb);
    assert!(!cg.exists());
}

#[test]
fn https_upstream_serves_real_curl_over_h1_and_h2_by_test_name() {
    require_root();
    let world = veil_tests::World::new();
    let ns = NetNs::new("tls");
    let _link = world.link_sandbox(&ns);
    let ca = veil_tests::TestCa::new("harness test CA");
    let up = veil_tests::HttpsUpstream::start(
        world.netns(),
        world.upstream_v4().into(),
        &ca,
        &["api.allowed.test"],
    );
    let sb = Sandbox::new("tls", Some(&ns)).with_hosts(&[("api.allowed.test", up.addr().ip())]);
    for (flag, version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2.0")] {
        let url = format!("https://api.allowed.test:{}/p?q=1", up.addr().port());
        let out = sb.run_outside(
            &[
                "curl",
                "-sS",
                flag,
                "--cacert",
                ca.pem_path().to_str().unwrap(),
                "-H",
                "x-probe: yes",
                &url,
            ],
            Duration::from_secs(20),
        );
        assert!(
            out.status.success(),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["version"], version);
        assert_eq!(summary["target_len"], "/p?q=1".len());
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.sni.as_deref() == Some("api.allowed.test"))
    );
    assert_eq!(seen[1].header("x-probe"), Some("yes"));
}
