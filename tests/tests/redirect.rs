//! The redirect path end to end: real cgroups, namespaces, veth links, clients and upstreams.
//!
//! Each test builds its own world (an upstream namespace linked to the host), its own
//! sandboxes (a cgroup, usually with a netns) and its own veil-agent, and asserts what the
//! upstream saw and what the sandbox saw.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use veil_tests::cmd::run_probe;
use veil_tests::egress;
use veil_tests::{
    AgentSandbox, AttachType, HttpHello, NetNs, Sandbox, TcpEcho, TcpHello, UdpEcho, Veil, World,
    attached_prog_ids, require_root, sandbox_map_has,
};

const PROBE: &str = env!("CARGO_BIN_EXE_veil-probe");
const TIMEOUT: Duration = Duration::from_secs(30);

fn field<'a>(json: &'a serde_json::Value, name: &str) -> &'a str {
    json.get(name)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("probe output {json} has no string field {name:?}"))
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Builds `[::ffff:a.b.c.d]:port`, the IPv4-mapped form a dual-stack client dials.
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => sock(v4.to_ipv6_mapped(), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

#[test]
fn ipv4_ipv6_and_mapped_connections_go_through_the_agent() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("sb");
    let sb = Sandbox::new("v46", Some(&ns));
    let hello4 = TcpHello::start(world.netns(), world.upstream_v4().into(), "U4");
    let hello6 = TcpHello::start(world.netns(), world.upstream_v6().into(), "U6");
    let veil = Veil::start(&[sb.agent_entry("v46")]);

    for (dial, expect_name, agent_ip) in [
        (hello4.addr(), "U4", IpAddr::from(world.host_v4())),
        (hello6.addr(), "U6", IpAddr::from(world.host_v6())),
        (mapped(hello4.addr()), "U4", IpAddr::from(world.host_v4())),
    ] {
        let out = sb.probe(&["tcp", "--addr", &dial.to_string()]);
        let json = out.expect_ok();
        let (name, upstream_saw) = out.expect_hello();
        assert_eq!(name, expect_name, "dialled {dial}: wrong upstream");
        assert_eq!(
            upstream_saw.ip(),
            agent_ip,
            "dialled {dial}: the upstream must see the agent's address"
        );
        let seen: SocketAddr = field(json, "peer_from_getpeername")
            .parse()
            .expect("getpeername address");
        assert_eq!(
            seen, dial,
            "getpeername must return the address the app dialled"
        );
    }
    assert!(!veil.log().contains("original destination unknown"));
}

#[test]
fn real_curl_in_a_sandbox_reaches_its_upstream_through_the_agent() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("curl");
    let sb = Sandbox::new("curl", Some(&ns));
    let http = HttpHello::start(world.netns(), world.upstream_v4().into(), "H");
    let _veil = Veil::start(&[sb.agent_entry("curl")]);

    let mut curl = sb.command("curl");
    curl.args([
        "-sS",
        "--max-time",
        "20",
        &format!("http://{}/", http.addr()),
    ]);
    let out = veil_tests::output_within(&mut curl, TIMEOUT);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        body.starts_with(&format!("H {}:", world.host_v4())),
        "upstream should have seen the agent: {body:?}"
    );
    assert_eq!(http.peers().len(), 1);
}

#[test]
fn loopback_and_processes_outside_the_cgroup_are_not_redirected() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("lo");
    let link = world.link_sandbox(&ns);
    let sb = Sandbox::new("lo", Some(&ns));
    let local = TcpHello::start(&ns, "127.0.0.1".parse().expect("ip"), "LOCAL");
    let remote = TcpHello::start(world.netns(), world.upstream_v4().into(), "R");
    let veil = Veil::start(&[sb.agent_entry("lo")]);

    // Loopback inside the sandbox: straight to the local server, not via the agent.
    let out = sb.probe(&["tcp", "--addr", &local.addr().to_string()]);
    let (name, peer) = out.expect_hello();
    assert_eq!(name, "LOCAL");
    assert!(
        peer.ip().is_loopback(),
        "loopback peer expected, got {peer}"
    );

    // Same netns, outside the cgroup: the upstream sees the sandbox's own link address.
    let out = sb.probe_outside(&["tcp", "--addr", &remote.addr().to_string()]);
    let (name, peer) = out.expect_hello();
    assert_eq!(name, "R");
    assert_eq!(
        peer.ip(),
        IpAddr::from(link.sandbox_v4()),
        "outside the cgroup must go direct"
    );

    // In the cgroup: through the agent (the client's socket is connected to its loopback
    // listener), whose own upstream socket, made in the sandbox's netns (egress "sandbox"), is
    // not redirected again (it would loop back into its listener and be closed as of unknown
    // origin): the upstream sees the sandbox's address, as without veil.
    let out = sb.probe(&["tcp", "--addr", &remote.addr().to_string()]);
    let (_, peer) = out.expect_hello();
    assert_eq!(peer.ip(), IpAddr::from(link.sandbox_v4()));
    assert!(
        field(&out.json, "local").starts_with("127.0.0.1:"),
        "not through the agent: {}",
        out.json
    );
    assert!(
        !veil.log().contains("original destination unknown"),
        "{}",
        veil.log()
    );
}

#[test]
fn sandbox_sharing_the_agents_netns_is_redirected_without_looping() {
    require_root();
    let world = World::new();
    let sb = Sandbox::new("hostns", None);
    let hello = TcpHello::start(world.netns(), world.upstream_v4().into(), "HN");
    let veil = Veil::start(&[sb.agent_entry("hostns")]);

    let out = sb.probe(&["tcp", "--addr", &hello.addr().to_string()]);
    let json = out.expect_ok();
    let (name, _) = out.expect_hello();
    assert_eq!(name, "HN");
    let local: SocketAddr = field(json, "local").parse().expect("local address");
    assert!(
        local.ip().is_loopback(),
        "a redirected socket is connected to the agent's loopback listener, got local {local}"
    );
    assert!(
        !veil.log().contains("original destination unknown"),
        "{}",
        veil.log()
    );
}

#[test]
fn identical_client_addresses_in_two_sandboxes_reach_their_own_destinations() {
    require_root();
    let world = World::new();
    let (ns_a, ns_b) = (NetNs::new("a"), NetNs::new("b"));
    let (sb_a, sb_b) = (
        Sandbox::new("a", Some(&ns_a)),
        Sandbox::new("b", Some(&ns_b)),
    );
    let up_a = TcpHello::start(world.netns(), world.upstream_v4().into(), "A");
    let up_b = TcpHello::start(world.netns(), world.upstream_v4().into(), "B");
    let veil = Veil::start(&[sb_a.agent_entry("a"), sb_b.agent_entry("b")]);

    // Stop the agent so both connections complete their handshakes and record their original
    // destinations before either is looked up: with identical (address, port) client ends,
    // only the netns cookie in the key keeps the two records apart.
    let bind = "127.0.0.1:40000";
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(veil.pid() as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP agent");
    let spawn = |sb: &Sandbox, dst: SocketAddr| {
        let mut cmd = sb.command(PROBE);
        cmd.args(["tcp", "--addr", &dst.to_string(), "--bind", bind]);
        std::thread::spawn(move || run_probe(&mut cmd, TIMEOUT))
    };
    let a = spawn(&sb_a, up_a.addr());
    let b = spawn(&sb_b, up_b.addr());
    // The kernel completes each handshake with the stopped agent's listener, and the sock_ops
    // program records the original destination as the client socket becomes ESTABLISHED: once
    // both sandboxes show theirs, both records exist and neither has been looked up.
    let port = bind.rsplit(':').next().expect("port");
    let both = veil_tests::cmd::wait_until(TIMEOUT, || {
        [&ns_a, &ns_b].iter().all(|ns| established_from(ns, port))
    });
    assert!(both, "the probes' connections were not both established");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(veil.pid() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT agent");
    for (handle, want) in [(a, "A"), (b, "B")] {
        let out = handle.join().expect("probe thread");
        let json = out.expect_ok();
        assert_eq!(field(json, "local"), bind);
        assert_eq!(
            out.expect_hello().0,
            want,
            "a sandbox reached the other's destination"
        );
    }
}

/// Whether a TCP connection from local port `port` is established in `ns` (per `ss`).
fn established_from(ns: &NetNs, port: &str) -> bool {
    let mut cmd = ns.command("ss");
    cmd.args([
        "-Htn",
        "state",
        "established",
        "sport",
        "=",
        &format!(":{port}"),
    ]);
    let out = veil_tests::output_within(&mut cmd, TIMEOUT);
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

#[test]
fn udp_443_is_refused_and_dns_still_works() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("udp");
    let _link = world.link_sandbox(&ns);
    let sb = Sandbox::new("udp", Some(&ns));
    let quic4 = UdpEcho::start(world.netns(), world.upstream_v4().into(), 443);
    let dns4 = UdpEcho::start(world.netns(), world.upstream_v4().into(), 53);
    let quic6 = UdpEcho::start(world.netns(), world.upstream_v6().into(), 443);
    let dns6 = UdpEcho::start(world.netns(), world.upstream_v6().into(), 53);
    let _veil = Veil::start(&[sb.agent_entry("udp")]);

    for quic in [quic4.addr(), quic6.addr()] {
        let out = sb.probe(&["udp", "--addr", &quic.to_string(), "--send", "quic"]);
        assert_eq!(
            out.error(),
            Some("EPERM"),
            "UDP to {quic} must be refused: {}",
            out.json
        );
    }
    for dns in [dns4.addr(), dns6.addr()] {
        let out = sb.probe(&["udp", "--addr", &dns.to_string(), "--send", "dns"]);
        let json = out.expect_ok();
        assert_eq!(field(json, "reply"), "dns", "UDP 53 must pass: {json}");
    }
    // Outside the cgroup nothing is refused.
    let out = sb.probe_outside(&["udp", "--addr", &quic4.addr().to_string(), "--send", "q"]);
    assert_eq!(field(out.expect_ok(), "reply"), "q");
}

#[test]
fn five_hundred_concurrent_connections_across_five_sandboxes_are_byte_exact() {
    require_root();
    let world = World::new();
    let echo = TcpEcho::start(world.netns(), world.upstream_v4().into());
    let namespaces: Vec<NetNs> = (0..5).map(|i| NetNs::new(&format!("c{i}"))).collect();
    let sandboxes: Vec<Sandbox> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| Sandbox::new(&format!("c{i}"), Some(ns)))
        .collect();
    let specs: Vec<AgentSandbox> = sandboxes
        .iter()
        .enumerate()
        .map(|(i, sb)| sb.agent_entry(&format!("c{i}")))
        .collect();
    let veil = Veil::start(&specs);

    let handles: Vec<_> = sandboxes
        .iter()
        .enumerate()
        .map(|(i, sb)| {
            let mut cmd = sb.command(PROBE);
            cmd.args([
                "echo",
                "--addr",
                &echo.addr().to_string(),
                "--conns",
                "100",
                "--bytes",
                "65536",
                "--seed",
                &i.to_string(),
            ]);
            std::thread::spawn(move || run_probe(&mut cmd, Duration::from_secs(120)))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().expect("probe thread");
        let json = out.expect_ok();
        assert_eq!(json["ok"], 100, "sandbox {i}: {json}");
        assert_eq!(json["failed"], 0, "sandbox {i}: {json}");
    }
    assert_eq!(echo.peers().len(), 500);
    assert!(
        echo.peers()
            .iter()
            .all(|p| p.ip() == IpAddr::from(world.host_v4())),
        "every upstream connection must come from the agent"
    );
    assert!(!veil.log().contains("original destination unknown"));
}

#[test]
fn sighup_removal_detaches_programs_closes_listener_and_drains_maps() {
    require_root();
    let world = World::new();
    let (ns_keep, ns_gone) = (NetNs::new("keep"), NetNs::new("gone"));
    let link = world.link_sandbox(&ns_gone);
    let keep = Sandbox::new("keep", Some(&ns_keep));
    let gone = Sandbox::new("gone", Some(&ns_gone));
    let hello = TcpHello::start(world.netns(), world.upstream_v4().into(), "S");
    // Egress from the host: the upstream tells the agent's connections from direct ones.
    let veil = Veil::start(&[
        keep.agent_entry("keep"),
        gone.agent_entry("gone").with_egress(egress::HOST),
    ]);

    let all_types = AttachType::ALL;
    for t in all_types {
        assert_eq!(
            attached_prog_ids(gone.cgroup().path(), t).len(),
            1,
            "{t:?} attached"
        );
    }
    assert!(sandbox_map_has(gone.cgroup().id()));
    assert_eq!(
        ns_gone.tcp_listeners().len(),
        2,
        "v4 and v6 listeners expected"
    );
    let out = gone.probe(&["tcp", "--addr", &hello.addr().to_string()]);
    assert_eq!(out.expect_hello().1.ip(), IpAddr::from(world.host_v4()));

    veil.reconfigure(&[keep.agent_entry("keep")]);

    for t in all_types {
        assert!(
            attached_prog_ids(gone.cgroup().path(), t).is_empty(),
            "{t:?} still attached after removal"
        );
        assert_eq!(
            attached_prog_ids(keep.cgroup().path(), t).len(),
            1,
            "{t:?} kept"
        );
    }
    assert!(
        !sandbox_map_has(gone.cgroup().id()),
        "map entry left behind"
    );
    assert!(sandbox_map_has(keep.cgroup().id()));
    assert!(ns_gone.tcp_listeners().is_empty(), "listener left behind");
    // Its traffic now goes direct; the kept sandbox still goes through the agent.
    let out = gone.probe(&["tcp", "--addr", &hello.addr().to_string()]);
    assert_eq!(out.expect_hello().1.ip(), IpAddr::from(link.sandbox_v4()));
    let out = keep.probe(&["tcp", "--addr", &hello.addr().to_string()]);
    assert_eq!(out.expect_hello().1.ip(), IpAddr::from(world.host_v4()));
}

#[test]
fn connection_of_unknown_origin_is_closed_and_counted() {
    require_root();
    let ns = NetNs::new("unk");
    let sb = Sandbox::new("unk", Some(&ns));
    let veil = Veil::start(&[sb.agent_entry("unk")]);
    let port = ns.tcp_listeners().first().expect("agent listener").port();

    // Outside the cgroup, dialling the agent's listener directly: nothing was recorded for it.
    let out = sb.probe_outside(&["tcp", "--addr", &format!("127.0.0.1:{port}")]);
    let json = out.expect_ok();
    assert_eq!(field(json, "reply"), "", "nothing may be sent back: {json}");
    assert!(
        veil_tests::cmd::wait_until(Duration::from_secs(5), || veil
            .log()
            .contains("original destination unknown")),
        "the agent must log and count it: {}",
        veil.log()
    );
}

#[test]
fn sigterm_drains_open_connections_and_exits_zero() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("drain");
    let sb = Sandbox::new("drain", Some(&ns));
    let echo = TcpEcho::start(world.netns(), world.upstream_v4().into());
    let veil = Veil::start(&[sb.agent_entry("drain")]);

    // A client that connects, waits until told, then uses the connection.
    let script = format!(
        "import socket,sys\n\
         s=socket.create_connection(('{ip}',{port}))\n\
         print('connected',flush=True)\n\
         sys.stdin.readline()\n\
         s.sendall(b'x'*100000); s.shutdown(socket.SHUT_WR)\n\
         n=0\n\
         while True:\n    b=s.recv(65536)\n    if not b: break\n    n+=len(b)\n\
         print(n,flush=True)\n",
        ip = echo.addr().ip(),
        port = echo.addr().port()
    );
    let mut child = sb
        .command("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python3 client");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
    assert_eq!(line.trim(), "connected");

    let pid = veil.pid();
    let status = std::thread::scope(|s| {
        let terminator = s.spawn(|| veil.agent().terminate());
        // Draining: the agent took SIGTERM (STOPPING=1) and stopped accepting (its listeners
        // in the sandbox's netns are closed); only then is the open connection used.
        veil.agent()
            .wait_notify("STOPPING=1", Duration::from_secs(10));
        assert!(
            veil_tests::cmd::wait_until(Duration::from_secs(10), || ns.tcp_listeners().is_empty()),
            "the agent still accepts after SIGTERM: {:?}",
            ns.tcp_listeners()
        );
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"go\n").expect("write");
        line.clear();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("read");
        assert_eq!(
            line.trim(),
            "100000",
            "the open connection must survive SIGTERM until done"
        );
        let _ = child.wait();
        terminator.join().expect("terminate thread")
    });
    assert_eq!(status.code(), Some(0), "agent {pid} exit status");
}
