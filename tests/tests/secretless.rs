//! A sandbox no secret applies to costs nothing (issue 19): with `egress: "sandbox"` its TCP
//! connects skip the redirect (`SANDBOX_DIRECT` in its map entry) and go where they were
//! dialled, while veil's refusals (its own listeners, its listener ports, UDP/443) keep
//! working, also while the agent is down.
//!
//! - A secretless sandbox reaches its upstream directly: the agent accepts nothing, the kernel
//!   counts `direct`, the upstream sees the sandbox's own address.
//! - Security: a PUT that mounts the first secret answers only once new connects are
//!   redirected — the one connection opened right after the answer is intercepted and
//!   substituted; removing the last secret lets new connections go direct again.
//! - Security: an `egress: "host"` sandbox without secrets is still redirected (veil is its
//!   only way out).
//! - A stopped agent leaves a secretless sandbox working directly and one with a secret
//!   refused, as before.
//!
//! Nothing here prints a secret value: outputs are checked for it and reported as booleans.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{Value, json};
use veil_tests::agent::AgentOptions;
use veil_tests::control::{free_port, random_token};
use veil_tests::egress;
use veil_tests::https::SandboxTrust;
use veil_tests::world::SandboxLink;
use veil_tests::{
    HttpsUpstream, NetNs, Sandbox, TcpHello, TestCa, UdpEcho, UpstreamReply, Veil, World,
    output_within, require_root,
};

const TIMEOUT: Duration = Duration::from_secs(60);
/// The host the test secret allows.
const HOST: &str = "api.secretless.test";
const SECRET: &str = "secretless-key";
const DIRECT: &str = "veil_agent_kernel_events_total{event=\"direct\"}";
const REDIRECTED: &str = "veil_agent_kernel_events_total{event=\"redirected\"}";
const ACCEPTED: &str = "veil_agent_accepted_total";

/// Reads one sample of the agent's metrics page (from the host, outside any sandbox).
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("agent metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("metrics request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics page");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in the metrics page"))
}

/// The counters that tell a direct connect from a redirected one.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counts {
    direct: f64,
    redirected: f64,
    accepted: f64,
}

impl Counts {
    fn read(metrics: SocketAddr) -> Counts {
        Counts {
            direct: metric(metrics, DIRECT),
            redirected: metric(metrics, REDIRECTED),
            accepted: metric(metrics, ACCEPTED),
        }
    }

    fn since(self, before: Counts) -> (f64, f64, f64) {
        (
            self.direct - before.direct,
            self.redirected - before.redirected,
            self.accepted - before.accepted,
        )
    }
}

/// veil with metrics, a world with a TCP greeter and an echoing TLS upstream for [`HOST`],
/// one sandbox netns linked to the world (its own way out, as a container has).
struct Fixture {
    // Field order is drop order: veil first, the namespaces last.
    veil: Veil,
    metrics: SocketAddr,
    hello: TcpHello,
    hello6: TcpHello,
    up: HttpsUpstream,
    link: SandboxLink,
    ns: NetNs,
    ca: TestCa,
    world: World,
}

impl Fixture {
    fn start(tag: &str) -> Fixture {
        require_root();
        let world = World::new();
        let ca = TestCa::new("secretless test CA");
        let ns = NetNs::new(tag);
        let link = world.link_sandbox(&ns);
        let hello = TcpHello::start(world.netns(), world.upstream_ip4(), "HELLO");
        let hello6 = TcpHello::start(world.netns(), world.upstream_ip6(), "HELLO6");
        let up = HttpsUpstream::start_with(
            world.netns(),
            world.upstream_ip4(),
            Some((&ca, &[HOST])),
            UpstreamReply::Echo,
        );
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let veil = Veil::start_with(
            AgentOptions {
                args: vec!["--upstream-ca".into(), ca.pem_path().into()],
                metrics_listen: Some(metrics),
                ..AgentOptions::default()
            },
            &[],
        );
        Fixture {
            veil,
            metrics,
            hello,
            hello6,
            up,
            link,
            ns,
            ca,
            world,
        }
    }

    /// A sandbox in the fixture's netns, [`HOST`] resolving to the upstream.
    fn sandbox(&self, tag: &str) -> Sandbox {
        Sandbox::new(tag, Some(&self.ns)).with_hosts(&[(HOST, self.world.upstream_ip4())])
    }

    /// Creates the test secret; (value, placeholder).
    fn secret(&self) -> (String, String) {
        let value = format!("sk-secretless-{}", random_token(32));
        let (status, body) = self.veil.block_on(self.veil.api().post(
            "/secret",
            self.veil.key(),
            json!({"name": SECRET, "value": value, "hosts": [HOST]}),
        ));
        assert_eq!(status, 201, "create secret: status {status}");
        let placeholder = body["placeholder"]
            .as_str()
            .expect("placeholder")
            .to_owned();
        (value, placeholder)
    }

    fn counts(&self) -> Counts {
        Counts::read(self.metrics)
    }

    /// One TCP connection from `sb` to the greeter at `dial`: (local address, what the
    /// upstream saw as its peer).
    fn connect(&self, sb: &Sandbox, dial: SocketAddr) -> (SocketAddr, SocketAddr) {
        let out = sb.probe(&["tcp", "--addr", &dial.to_string()]);
        let (_, peer) = out.expect_hello();
        let local = out.json["local"]
            .as_str()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("no local address: {}", out.json));
        (local, peer)
    }

    /// Asserts one IPv4 connection of `sb` went direct: not accepted by the agent, counted
    /// `direct`, from the sandbox's own address.
    fn assert_direct(&self, sb: &Sandbox, what: &str) {
        let before = self.counts();
        let (local, peer) = self.connect(sb, self.hello.addr());
        let (direct, redirected, accepted) = self.counts().since(before);
        assert_eq!(
            (direct, redirected, accepted),
            (1.0, 0.0, 0.0),
            "{what}: a direct connect is counted `direct` and never reaches the agent \
             (direct, redirected, accepted)"
        );
        assert_eq!(
            peer.ip(),
            IpAddr::from(self.link.sandbox_v4()),
            "{what}: the upstream must see the sandbox's own address"
        );
        assert_eq!(local.ip(), peer.ip(), "{what}: connected through veil");
    }
}

/// One `curl` in the sandbox to the echoing upstream, the placeholder as a bearer token;
/// (HTTP status, output).
fn curl_once(f: &Fixture, sb: &Sandbox, trust: &SandboxTrust, placeholder: &str) -> (u16, String) {
    let url = format!("https://{HOST}:{}/echo", f.up.addr().port());
    trust.curl(sb, placeholder, &url, TIMEOUT)
}

/// `PUT /api/sandbox/{id}/secrets`; panics unless 200. The answer.
fn put_secrets(veil: &Veil, id: &str, mounts: &[(&str, &str)]) -> Value {
    let secrets: Vec<Value> = mounts.iter().map(|(e, n)| json!({ *e: n })).collect();
    let (status, body) = veil.block_on(veil.api().put(
        &format!("/sandbox/{id}/secrets"),
        veil.key(),
        json!({ "secrets": secrets }),
    ));
    assert_eq!(status, 200, "PUT secrets of {id}: {body}");
    body
}

#[test]
fn a_secretless_sandbox_reaches_its_upstream_directly() {
    let f = Fixture::start("sl-direct");
    let sb = f.sandbox("sl-direct");
    let answer = f
        .veil
        .register(&sb.agent_entry("sl-direct").with_egress(egress::SANDBOX));
    assert_eq!(answer["egress"], egress::SANDBOX, "{answer}");

    f.assert_direct(&sb, "IPv4");
    // IPv6 too (connect6), from the sandbox's own IPv6 address.
    let before = f.counts();
    let (_, peer) = f.connect(&sb, f.hello6.addr());
    assert_eq!(f.counts().since(before), (1.0, 0.0, 0.0), "IPv6");
    assert_eq!(peer.ip(), IpAddr::from(f.link.sandbox_v6()), "IPv6");
    assert!(
        !f.veil.log().contains("original destination unknown"),
        "{}",
        f.veil.log()
    );
}

/// Security: mounting the first secret must redirect the sandbox before the PUT answers. Exactly
/// one connection, opened right after the answer, no retry: a flag cleared after the
/// acknowledgement would let it reach the upstream directly, carrying the bare placeholder.
#[test]
fn a_connection_opened_after_the_put_that_mounts_a_secret_is_intercepted() {
    let f = Fixture::start("sl-mount");
    let (value, placeholder) = f.secret();
    let sb = f.sandbox("sl-mount");
    let entry = sb.agent_entry("sl-mount").with_egress(egress::SANDBOX);
    f.veil.register(&entry);
    f.assert_direct(&sb, "before the mount");

    let answer = put_secrets(&f.veil, "sl-mount", &[("MY_KEY", SECRET)]);
    let before = f.counts();
    let trust = SandboxTrust::new(&answer, &f.ca);
    let (status, out) = curl_once(&f, &sb, &trust, &placeholder);
    let (direct, redirected, _) = f.counts().since(before);
    let leaked = out.contains(&value);
    assert!(!leaked, "the value reached the sandbox");
    let got =
        f.up.seen()
            .last()
            .and_then(|r| r.header("authorization"))
            .map(|h| h == format!("Bearer {value}"));
    assert_eq!(
        got,
        Some(true),
        "the first connection after the mount was not substituted (status {status}; \
         connects: {direct} direct, {redirected} redirected)"
    );
    assert_eq!((direct, redirected), (0.0, 1.0), "connects after the mount");
    assert_eq!(status, 200, "{out}");
    assert!(
        out.contains(&format!("Bearer {placeholder}")),
        "the echo was not scrubbed back to the placeholder: {out}"
    );
}

/// Removing the last secret: new connections go direct again.
#[test]
fn removing_the_last_secret_lets_new_connections_go_direct() {
    let f = Fixture::start("sl-unmount");
    f.secret();
    let sb = f.sandbox("sl-unmount");
    let entry = sb.agent_entry("sl-unmount").with_egress(egress::SANDBOX);
    f.veil.register_with(&entry, &[("MY_KEY", SECRET)]);
    let before = f.counts();
    let (local, _) = f.connect(&sb, f.hello.addr());
    assert!(local.ip().is_loopback(), "with a secret: not through veil");
    assert_eq!(f.counts().since(before), (0.0, 1.0, 1.0), "with a secret");

    put_secrets(&f.veil, "sl-unmount", &[]);
    f.assert_direct(&sb, "after the last secret was removed");
    // And back: mounted again, redirected again.
    put_secrets(&f.veil, "sl-unmount", &[("MY_KEY", SECRET)]);
    let before = f.counts();
    let (local, _) = f.connect(&sb, f.hello.addr());
    assert!(local.ip().is_loopback(), "mounted again: not through veil");
    assert_eq!(f.counts().since(before), (0.0, 1.0, 1.0), "mounted again");
}

/// Security: veil is an `egress: "host"` sandbox's only way out; without secrets it is still
/// redirected (its connections leave from the host through the egress rules).
#[test]
fn a_host_egress_sandbox_without_secrets_is_still_redirected() {
    let f = Fixture::start("sl-host");
    let sb = f.sandbox("sl-host");
    let answer = f
        .veil
        .register(&sb.agent_entry("sl-host").with_egress(egress::HOST));
    assert_eq!(answer["egress"], egress::HOST, "{answer}");
    let before = f.counts();
    let (local, peer) = f.connect(&sb, f.hello.addr());
    let (direct, redirected, accepted) = f.counts().since(before);
    assert_eq!(
        (direct, redirected, accepted),
        (0.0, 1.0, 1.0),
        "an egress host sandbox went direct (direct, redirected, accepted)"
    );
    assert!(local.ip().is_loopback(), "not through veil: local {local}");
    assert_eq!(
        peer.ip(),
        IpAddr::from(f.world.host_v4()),
        "a host-egress connection leaves from the host"
    );
}

/// Binds each `host:port` argument; prints one JSON object: argument → errno (0 = bound).
const BINDER: &str = r#"
import json, socket, sys
out = {}
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.bind((host, int(port)))
        out[arg] = 0
    except OSError as e:
        out[arg] = e.errno
    s.close()
print(json.dumps(out))
"#;

/// Connects to each `host:port` argument; prints one JSON object: argument → errno (0 =
/// connected).
const DIALLER: &str = r#"
import json, socket, sys
out = {}
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(10)
    try:
        s.connect((host, int(port)))
        out[arg] = 0
    except OSError as e:
        out[arg] = e.errno or -1
    s.close()
print(json.dumps(out))
"#;

fn python(sb: &Sandbox, script: &str, args: &[String]) -> Value {
    let mut cmd = sb.command("python3");
    cmd.arg("-c").arg(script).args(args);
    let out = output_within(&mut cmd, TIMEOUT);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

const EPERM: i64 = 1;

/// A secretless sandbox going direct still cannot reach veil's listeners, take its listener
/// ports or send UDP to port 443.
#[test]
fn a_direct_sandbox_keeps_every_refusal() {
    let f = Fixture::start("sl-refuse");
    // In the host's netns, where veil's own listeners are on loopback.
    let sb = Sandbox::new("sl-refuse", None);
    f.veil
        .register(&sb.agent_entry("sl-refuse").with_egress(egress::SANDBOX));
    let rest = format!("127.0.0.1:{}", f.veil.control().port);
    let guarded = vec![rest.clone(), f.metrics.to_string()];
    // Control names its listeners to the agent when the link comes up.
    let refused = veil_tests::cmd::wait_until(Duration::from_secs(20), || {
        python(&sb, DIALLER, std::slice::from_ref(&rest))[&rest] == EPERM
    });
    assert!(refused, "a direct sandbox reached control's REST API");
    let dialled = python(&sb, DIALLER, &guarded);
    for target in &guarded {
        assert_eq!(
            dialled[target].as_i64(),
            Some(EPERM),
            "a direct sandbox reached veil's listener {target}: {dialled}"
        );
    }
    // Its own listener ports, on every address.
    let (p4, p6) = veil_tests::pod::listener_ports(&f.veil.agent().state_dir(), "sl-refuse");
    let mut binds = vec![format!("127.0.0.1:{p4}"), format!("0.0.0.0:{p4}")];
    if p6 != 0 {
        binds.push(format!("::1:{p6}"));
    }
    let bound = python(&sb, BINDER, &binds);
    for target in &binds {
        assert_eq!(
            bound[target].as_i64(),
            Some(EPERM),
            "a direct sandbox bound its listener port {target}: {bound}"
        );
    }
    // QUIC is refused; other UDP passes.
    let quic = UdpEcho::start(f.world.netns(), f.world.upstream_ip4(), 443);
    let out = sb.probe(&["udp", "--addr", &quic.addr().to_string(), "--send", "q"]);
    assert_eq!(out.error(), Some("EPERM"), "UDP/443: {}", out.json);
    // And it does go direct: the greeter hears the host's own link address, not via veil.
    let before = f.counts();
    let (local, _) = f.connect(&sb, f.hello.addr());
    assert!(!local.ip().is_loopback(), "through veil: local {local}");
    assert_eq!(f.counts().since(before), (1.0, 0.0, 0.0));
}

/// While the agent is down a secretless sandbox keeps working directly; one with a secret is
/// refused (never sent around veil). A restarted agent keeps the secretless one direct.
#[test]
fn with_the_agent_down_a_secretless_sandbox_works_and_one_with_a_secret_is_refused() {
    let f = Fixture::start("sl-down");
    f.secret();
    let free = f.sandbox("sl-down-free");
    let kept = f.sandbox("sl-down-kept");
    f.veil.register(
        &free
            .agent_entry("sl-down-free")
            .with_egress(egress::SANDBOX),
    );
    f.veil.register_with(
        &kept
            .agent_entry("sl-down-kept")
            .with_egress(egress::SANDBOX),
        &[("MY_KEY", SECRET)],
    );
    let status = f.veil.agent().terminate();
    assert!(status.success(), "agent exit on SIGTERM: {status}");

    let (local, peer) = f.connect(&free, f.hello.addr());
    assert_eq!(
        peer.ip(),
        IpAddr::from(f.link.sandbox_v4()),
        "agent down: the secretless sandbox must still reach its upstream directly"
    );
    assert_eq!(local.ip(), peer.ip());
    let out = kept.probe(&["tcp", "--addr", &f.hello.addr().to_string()]);
    assert!(
        out.hello().is_none(),
        "agent down: a sandbox with a secret reached its upstream around veil: {}",
        out.json
    );
    assert_eq!(out.error(), Some("ECONNREFUSED"), "{}", out.json);

    f.veil.agent().respawn();
    let synced = veil_tests::cmd::wait_until(Duration::from_secs(20), || {
        f.veil.agent().log().matches("in sync with control").count() >= 2
    });
    assert!(synced, "{}", f.veil.agent().log_tail(20));
    f.assert_direct(&free, "after the restart");
    let (local, _) = f.connect(&kept, f.hello.addr());
    assert!(
        local.ip().is_loopback(),
        "after the restart: kept not through veil"
    );
}
