//! Adversarial: listeners a sandbox must never stand in for or reach.
//!
//! - Issue 13 item 5: while the agent restarts, a sandbox binds another sandbox's listener
//!   port in their shared netns and answers its connections. The bind guard must refuse every
//!   veil listener port of the netns to every sandbox, from pinned state, so it holds while
//!   the agent is down; the other sandbox's connections then fail closed.
//! - Issue 14 item 1, defence in depth: no sandbox, whatever its netns, may connect to veil's
//!   own listeners (control's REST and metrics, the agent's metrics).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::Duration;
use veil_tests::postgres::Postgres;
use veil_tests::replicas::store_config;

use serde_json::Value;
use veil_tests::agent::AgentOptions;
use veil_tests::control::free_port;
use veil_tests::hostlink::HostLink;
use veil_tests::pod::Pod;
use veil_tests::{NetNs, Sandbox, TcpHello, Veil, output_within, require_root};

const TIMEOUT: Duration = Duration::from_secs(60);
const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;

/// Connects to each `host:port` argument (IPv6 hosts in brackets-free form) and reads what the
/// server says first, if anything; one JSON object per line: the argument, the connect's errno
/// (0: connected), the first word received.
const DIALLER: &str = r#"
import json, socket, sys
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    out = {"tag": arg, "errno": 0, "got": ""}
    try:
        s.connect((host, int(port)))
    except OSError as e:
        out["errno"] = e.errno or -1
    if out["errno"] == 0:
        s.settimeout(3)
        try:
            out["got"] = s.recv(64).decode(errors="replace").split(" ")[0].strip()
        except OSError:
            pass
    print(json.dumps(out), flush=True)
"#;

/// Tries to bind each `host:port` argument; on the first success listens there and answers
/// the first connection with `impostor`. Prints the bind results (one JSON line) first.
const IMPOSTOR: &str = r#"
import json, socket, sys
results, listener = {}, None
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
        results[arg] = 0
        if listener is None:
            s.listen(8)
            listener = s
    except OSError as e:
        results[arg] = e.errno
print(json.dumps(results), flush=True)
if listener is not None:
    listener.settimeout(20)
    try:
        c, _ = listener.accept()
        c.sendall(b"impostor \n")
        c.close()
    except OSError:
        pass
"#;

/// Takes a port without naming it: `listen()` on an unbound socket, and `bind()` to port 0.
/// Prints the port each got, or minus the errno.
const AUTOBIND: &str = r#"
import json, socket
out = {}
for how in ("listen", "bind0"):
    s = socket.socket()
    try:
        if how == "bind0":
            s.bind(("127.0.0.1", 0))
        s.listen(8)
        out[how] = s.getsockname()[1]
    except OSError as e:
        out[how] = -e.errno
    s.close()
print(json.dumps(out))
"#;

/// Runs [`DIALLER`] in `sandbox`; (argument → (errno, first word received)).
fn dial(sandbox: &Sandbox, targets: &[String]) -> Vec<(String, i64, String)> {
    let mut cmd = sandbox.command("python3");
    cmd.arg("-c").arg(DIALLER).args(targets);
    let out = output_within(&mut cmd, TIMEOUT);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (
                v["tag"].as_str().unwrap_or_default().to_owned(),
                v["errno"].as_i64().unwrap_or(-2),
                v["got"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The impostor, running in `sandbox` until it answered once or is killed.
struct Impostor {
    child: Child,
    binds: Value,
}

impl Impostor {
    fn start(sandbox: &Sandbox, targets: &[String]) -> Impostor {
        let mut cmd = sandbox.command("python3");
        cmd.arg("-c")
            .arg(IMPOSTOR)
            .args(targets)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawning the impostor");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("impostor stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the impostor's bind results");
        let binds = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        Impostor { child, binds }
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        // Our own child, by pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listener_ports_hold_while_the_agent_is_down(stop: impl FnOnce(&Veil)) {
    let pod = Pod::start(AgentOptions::default());
    let hello = pod.hello.addr().to_string();
    let (b4, b6) = pod.listener_ports("pod-b");
    stop(&pod.veil);

    // From A, without naming the port: the kernel picks one. The odds of it being B's port are
    // made 1 by narrowing the pod's ephemeral range to it (as root, for the test; an attacker
    // loops). Nothing has connected to B's port yet, so no TIME_WAIT keeps it busy either.
    let range = "/proc/sys/net/ipv4/ip_local_port_range";
    let saved = pod
        .netns()
        .run(|| std::fs::read_to_string(range).expect("port range"));
    pod.netns()
        .run(|| std::fs::write(range, format!("{b4} {b4}")).expect("narrowing the port range"));
    let mut cmd = pod.a.command("python3");
    cmd.arg("-c").arg(AUTOBIND);
    let out = output_within(&mut cmd, TIMEOUT);
    pod.netns()
        .run(|| std::fs::write(range, saved.trim()).expect("restoring the port range"));
    let auto: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    for how in ["listen", "bind0"] {
        assert_ne!(
            auto[how].as_i64(),
            Some(i64::from(b4)),
            "a sandbox got another sandbox's listener port from the kernel ({how}): {auto}"
        );
    }

    // From A, naming the port: every way to take B's listener ports in the shared netns.
    let targets = [
        format!("127.0.0.1:{b4}"),
        format!("0.0.0.0:{b4}"),
        format!(":::{b4}"),
        format!("::1:{b6}"),
        format!("0.0.0.0:{b6}"),
    ];
    let impostor = Impostor::start(&pod.a, &targets);
    for t in &targets {
        assert_eq!(
            impostor.binds[t].as_i64(),
            Some(EPERM),
            "a sandbox bound another sandbox's listener port while the agent was down: {}",
            impostor.binds
        );
    }
    // B's connections fail closed: refused, never answered by A.
    let r = dial(&pod.b, std::slice::from_ref(&hello));
    let (_, errno, got) = &r[0];
    assert_ne!(got, "impostor", "A answered B's connection");
    assert_eq!(
        *errno, ECONNREFUSED,
        "B's connection while the agent is down: {r:?}"
    );
    drop(impostor);

    // The restarted agent serves B again, on the same guarded ports.
    pod.veil.agent().respawn();
    assert_eq!(pod.listener_ports("pod-b"), (b4, b6));
    let greeted = || {
        let r = dial(&pod.b, std::slice::from_ref(&hello));
        r.first()
            .is_some_and(|(_, errno, got)| *errno == 0 && got == "hello")
    };
    assert!(
        veil_tests::cmd::wait_until(Duration::from_secs(20), greeted),
        "B is not served after the restart"
    );
}

#[test]
fn a_sandbox_cannot_take_anothers_listener_port_while_the_agent_is_killed() {
    listener_ports_hold_while_the_agent_is_down(|veil| {
        veil.agent().kill();
    });
}

#[test]
fn a_sandbox_cannot_take_anothers_listener_port_while_the_agent_is_stopped() {
    listener_ports_hold_while_the_agent_is_down(|veil| {
        let status = veil.agent().terminate();
        assert!(status.success(), "agent exit on SIGTERM: {status}");
    });
}

/// Reads one counter of the agent's metrics page (from outside any sandbox).
fn agent_metric(addr: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("agent metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("metrics request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics page");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in the metrics page"))
}

#[test]
fn no_sandbox_reaches_veils_own_listeners_whatever_its_netns() {
    require_root();
    let control_metrics = free_port();
    let agent_metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Control's metrics on every address: that port is guarded on every host address.
    let veil = Veil::start_with_control(
        AgentOptions {
            metrics_listen: Some(agent_metrics),
            ..AgentOptions::default()
        },
        &format!("metrics_listen = \"0.0.0.0:{control_metrics}\""),
        &[],
    );
    // A sandbox in the host's netns, and one in its own netns with a route to the host.
    let on_host = Sandbox::new("own-host", None);
    let ns = NetNs::new("own-net");
    let link = HostLink::new(&ns);
    let contained = Sandbox::new("own-net", Some(&ns));
    veil.register(&on_host.agent_entry("own-host"));
    veil.register(&contained.agent_entry("own-net"));
    let (rest, host) = (veil.control().port, link.host_v4());
    // Control tells the agent its listeners when the link comes up; wait until they are in
    // force (the first attack: control's REST API from the host netns).
    let api = vec![format!("127.0.0.1:{rest}")];
    let guarded = veil_tests::cmd::wait_until(Duration::from_secs(20), || {
        dial(&on_host, &api)[0].1 == EPERM
    });
    assert!(
        guarded,
        "a sandbox reached veil's own listener 127.0.0.1:{rest} (control's REST API): {:?}",
        dial(&on_host, &api)
    );
    // An ordinary host service on every address: still reachable.
    let service = TcpHello::start_host(IpAddr::V4(Ipv4Addr::UNSPECIFIED), "service");
    let s = service.addr().port();

    let refused_on_host = vec![
        format!("127.0.0.1:{rest}"),
        format!("127.0.0.1:{control_metrics}"),
        format!("{host}:{control_metrics}"),
        format!("127.0.0.2:{control_metrics}"),
        format!("::1:{control_metrics}"),
        agent_metrics.to_string(),
    ];
    let refused_contained = vec![format!("{host}:{control_metrics}")];
    // The link's address is new to the host: the agent follows address changes as they come.
    let all_refused = veil_tests::cmd::wait_until(Duration::from_secs(10), || {
        dial(&contained, &refused_contained)[0].1 == EPERM
    });
    assert!(
        all_refused,
        "a sandbox reached veil's own listener {} from its own netns: {:?}",
        refused_contained[0],
        dial(&contained, &refused_contained)
    );
    let before = agent_metric(
        agent_metrics,
        "veil_agent_kernel_events_total{event=\"guarded_refused\"}",
    );
    for (sandbox, refused, allowed) in [
        (&on_host, &refused_on_host, format!("127.0.0.1:{s}")),
        (&contained, &refused_contained, format!("{host}:{s}")),
    ] {
        let mut targets = refused.clone();
        targets.push(allowed.clone());
        let results = dial(sandbox, &targets);
        for (tag, errno, _) in &results {
            if tag == &allowed {
                continue;
            }
            assert_eq!(
                *errno, EPERM,
                "a sandbox reached veil's own listener {tag}: {results:?}"
            );
        }
        let ok = results.iter().find(|(t, _, _)| t == &allowed);
        assert!(
            ok.is_some_and(|(_, errno, got)| *errno == 0 && got == "service"),
            "an ordinary host port became unreachable: {results:?}"
        );
    }
    let after = agent_metric(
        agent_metrics,
        "veil_agent_kernel_events_total{event=\"guarded_refused\"}",
    );
    assert_eq!(
        after - before,
        (refused_on_host.len() + refused_contained.len()) as f64,
        "each refusal is counted"
    );
    drop(veil);
}

/// Issue 16: with the store on PostgreSQL, the database holds every sealed value, the API keys'
/// hashes and the audit; a sandbox that could reach it could read or rewrite them. Its port is
/// one of veil's own listeners: refused to every sandbox, whatever its netns.
#[test]
fn no_sandbox_reaches_the_shared_store() {
    require_root();
    let pg = Postgres::start();
    let veil = Veil::start_with_control(AgentOptions::default(), &store_config(&pg), &[]);
    let on_host = Sandbox::new("pg-host", None);
    veil.register(&on_host.agent_entry("pg-host"));
    let db = vec![format!("127.0.0.1:{}", pg.port())];
    let refused = veil_tests::cmd::wait_until(Duration::from_secs(20), || {
        dial(&on_host, &db)[0].1 == EPERM
    });
    assert!(
        refused,
        "a sandbox reached the PostgreSQL store at {}: {:?}",
        db[0],
        dial(&on_host, &db)
    );
    // The host itself (veil-control) still reaches it: the API answers from the database.
    let (status, _) = veil.block_on(veil.api().get("/secret", veil.key()));
    assert_eq!(status, 200);
}

/// The fleet listener (`[fleet] agent_listen`) is one of veil's own: a sandbox on a replica's
/// host cannot even open a TCP connection to it (mutual TLS would refuse it later, but no
/// sandbox may reach veil's listeners at all — invariants 5 and 6).
#[test]
fn no_sandbox_reaches_the_fleet_listener() {
    require_root();
    let pg = Postgres::start();
    let port = free_port();
    let config = format!(
        "{}[fleet]\nagent_listen = \"127.0.0.1:{port}\"\n",
        store_config(&pg)
    );
    let veil = Veil::start_with_control(AgentOptions::default(), &config, &[]);
    let on_host = Sandbox::new("fleet-host", None);
    veil.register(&on_host.agent_entry("fleet-host"));
    let fleet = vec![format!("127.0.0.1:{port}")];
    // The listener is up: the host itself connects.
    assert!(
        TcpStream::connect_timeout(&fleet[0].parse().expect("addr"), TIMEOUT).is_ok(),
        "the fleet listener is not up at {}",
        fleet[0]
    );
    let refused = veil_tests::cmd::wait_until(Duration::from_secs(20), || {
        dial(&on_host, &fleet)[0].1 == EPERM
    });
    assert!(
        refused,
        "a sandbox reached the fleet listener at {}: {:?}",
        fleet[0],
        dial(&on_host, &fleet)
    );
}
