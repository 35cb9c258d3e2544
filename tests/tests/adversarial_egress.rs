//! veil never widens what a sandbox can reach (issue 14, item 4), tried from inside sandboxes.
//!
//! - `egress: "sandbox"`: a container-style netns with its own route out and a firewall rule of
//!   its own: what the rule drops stays unreachable through veil (passthrough and intercepted),
//!   and upstreams see the sandbox's own address, never the host's.
//! - `egress: "host"`: a netns whose only way out is veil (as `veil-control run --netns` makes)
//!   cannot use veil to reach what only the host reaches: a listener on the host's address or
//!   its loopback, a link-local service (where clouds serve instance credentials); an ordinary
//!   upstream still works, and `egress_allow` opens a range on purpose.
//! - Both modes still substitute and scrub; the mode is part of the sandbox PUT.
//!
//! Nothing here prints a secret value: outputs are checked for it and reported as booleans.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use veil_tests::agent::AgentOptions;
use veil_tests::control::{free_port, random_token};
use veil_tests::egress::{self, LinkLocal, PacketCounters};
use veil_tests::https::SandboxTrust;
use veil_tests::{
    HttpsUpstream, NetNs, Sandbox, TcpHello, TestCa, UpstreamReply, Veil, World, require_root,
};

const TIMEOUT: Duration = Duration::from_secs(60);
/// An API the sandbox is allowed to send its secret to.
const HOST: &str = "api.egress.test";
/// A name the sandbox resolves to a link-local address.
const META: &str = "metadata.egress.test";
const SECRET: &str = "egress-key";
/// How long the agent tries to reach an upstream (a dropped SYN is never answered).
const CONNECT_TIMEOUT_MS: u64 = 2000;

/// `[::ffff:a.b.c.d]:port`, the IPv4-mapped form of an IPv4 destination.
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), addr.port()),
        IpAddr::V6(_) => addr,
    }
}

fn agent_options(ca: &TestCa, egress_allow: &[String]) -> AgentOptions {
    AgentOptions {
        args: vec!["--upstream-ca".into(), ca.pem_path().into()],
        extra_config: format!("connect_timeout_ms = {CONNECT_TIMEOUT_MS}\n"),
        egress_allow: egress_allow.to_vec(),
        ..AgentOptions::default()
    }
}

/// A secret allowed for [`HOST`] and [`META`]; (value, placeholder).
fn create_secret(veil: &Veil) -> (String, String) {
    let value = format!("sk-egress-{}", random_token(24));
    let (status, body) = veil.block_on(veil.api().post(
        "/secret",
        veil.key(),
        json!({"name": SECRET, "value": value, "hosts": [HOST, META]}),
    ));
    assert_eq!(status, 201, "create secret: status {status}");
    let placeholder = body["placeholder"]
        .as_str()
        .expect("placeholder")
        .to_owned();
    (value, placeholder)
}

/// One intercepted request to an echoing upstream: the upstream got the value, the sandbox
/// sees only the placeholder.
fn assert_substitutes_and_scrubs(
    mode: &str,
    sb: &Sandbox,
    trust: &SandboxTrust,
    (value, placeholder): (&str, &str),
    up: &HttpsUpstream,
) {
    let url = format!("https://{HOST}:{}/echo", up.addr().port());
    let (status, out) = trust.curl(sb, placeholder, &url, TIMEOUT);
    let leaked = out.contains(value);
    assert!(!leaked, "egress {mode}: the value reached the sandbox");
    let got = up
        .seen()
        .last()
        .and_then(|r| r.header("authorization"))
        .map(|h| h == format!("Bearer {value}"));
    assert_eq!(
        got,
        Some(true),
        "egress {mode}: the upstream did not get the value (status {status})"
    );
    assert_eq!(status, 200, "egress {mode}: {out}");
    assert!(
        out.contains(&format!("Bearer {placeholder}")),
        "egress {mode}: the echo does not show the placeholder: {out}"
    );
}

/// Registers `sb` as `id` with `egress`, the secret mounted as `MY_KEY`; the PUT answer.
fn register(veil: &Veil, sb: &Sandbox, id: &str, egress: &str) -> Value {
    let answer = veil.register_with(
        &sb.agent_entry(id).with_egress(egress),
        &[("MY_KEY", SECRET)],
    );
    assert_eq!(answer["egress"], egress, "PUT answer: {answer}");
    answer
}

#[test]
fn sandbox_egress_obeys_the_sandboxs_own_firewall_and_source_address() {
    require_root();
    let world = World::new();
    let ca = TestCa::new("egress test CA");
    let ns = NetNs::new("egsb");
    let link = world.link_sandbox(&ns);
    let up = world.upstream_ip4();
    let open = TcpHello::start(world.netns(), up, "OPEN");
    let open6 = TcpHello::start(world.netns(), world.upstream_ip6(), "OPEN6");
    let blocked = TcpHello::start(world.netns(), up, "BLOCKED");
    let https_open =
        HttpsUpstream::start_with(world.netns(), up, Some((&ca, &[HOST])), UpstreamReply::Echo);
    let https_blocked =
        HttpsUpstream::start_with(world.netns(), up, Some((&ca, &[HOST])), UpstreamReply::Echo);
    // The container's own firewall refuses two of the world's ports; the rest is open.
    egress::drop_tcp_to(&ns, &[blocked.addr(), https_blocked.addr()]);
    let heard = PacketCounters::install(
        world.netns(),
        &[
            ("from_sandbox", link.sandbox_v4().into(), https_open.addr()),
            ("from_host", world.host_v4().into(), https_open.addr()),
        ],
    );
    let veil = Veil::start_with(agent_options(&ca, &[]), &[]);
    let secret = create_secret(&veil);
    let sb = Sandbox::new("egsb", Some(&ns)).with_hosts(&[(HOST, up)]);
    let answer = register(&veil, &sb, "egsb", egress::SANDBOX);
    let trust = SandboxTrust::new(&answer, &ca);

    // Without veil (outside the cgroup) the rule holds: the sandbox cannot reach `blocked`.
    let direct = sb.probe_outside(&[
        "tcp",
        "--addr",
        &blocked.addr().to_string(),
        "--timeout-ms",
        "1500",
    ]);
    assert!(
        direct.hello().is_none(),
        "the firewall rule does not work: {}",
        direct.json
    );

    // Passthrough through veil: the same.
    let out = sb.probe(&["tcp", "--addr", &blocked.addr().to_string()]);
    assert!(
        out.hello().is_none(),
        "veil reached a destination the sandbox's firewall drops: {}",
        out.json
    );
    assert!(
        blocked.peers().is_empty(),
        "BLOCKED heard from {:?}",
        blocked.peers()
    );

    // Intercepted through veil: a 502 naming the destination, and nothing reaches it.
    let url = format!("https://{HOST}:{}/echo", https_blocked.addr().port());
    let (status, text) = trust.curl(&sb, &secret.1, &url, TIMEOUT);
    assert!(
        https_blocked.seen().is_empty(),
        "veil sent a request to a destination the sandbox's firewall drops (status {status})"
    );
    assert_eq!(status, 502, "{text}");
    assert!(text.contains(&https_blocked.addr().to_string()), "{text}");

    // What the firewall allows works, and the upstream sees the sandbox's own address.
    for (hello, name, own) in [
        (&open, "OPEN", IpAddr::from(link.sandbox_v4())),
        (&open6, "OPEN6", IpAddr::from(link.sandbox_v6())),
    ] {
        let out = sb.probe(&["tcp", "--addr", &hello.addr().to_string()]);
        let (got, peer) = out.expect_hello();
        assert_eq!(got, name);
        assert_eq!(
            peer.ip(),
            own,
            "the upstream must see the sandbox's own address, not the host's"
        );
        let local: SocketAddr = out.json["local"]
            .as_str()
            .and_then(|l| l.parse().ok())
            .expect("local address");
        assert!(local.ip().is_loopback(), "not through veil: local {local}");
    }
    assert_substitutes_and_scrubs(
        egress::SANDBOX,
        &sb,
        &trust,
        (&secret.0, &secret.1),
        &https_open,
    );
    assert!(
        heard.packets("from_sandbox") > 0,
        "the upstream never heard from the sandbox"
    );
    assert_eq!(
        heard.packets("from_host"),
        0,
        "the upstream heard from the host"
    );
    // The agent's sockets in the sandbox netns are not redirected back into veil.
    assert!(
        !veil.log().contains("original destination unknown"),
        "{}",
        veil.log()
    );
}

#[test]
fn host_egress_cannot_reach_the_host_or_link_local_through_veil() {
    require_root();
    let world = World::new();
    let ca = TestCa::new("egress test CA");
    let ll = LinkLocal::add(&world);
    let up = world.upstream_ip4();
    let open = TcpHello::start(world.netns(), up, "OPEN");
    let meta = TcpHello::start(world.netns(), ll.ip().into(), "META");
    let meta_https = HttpsUpstream::start_with(
        world.netns(),
        ll.ip().into(),
        Some((&ca, &[META])),
        UpstreamReply::Echo,
    );
    let https_open =
        HttpsUpstream::start_with(world.netns(), up, Some((&ca, &[HOST])), UpstreamReply::Echo);
    // Listeners only the host reaches: on its address (the world link's host end) and loopback.
    let host_addr = TcpHello::start_host(world.host_v4().into(), "HOSTADDR");
    let host_lo = TcpHello::start_host(Ipv4Addr::LOCALHOST.into(), "HOSTLO");
    // The host itself reaches the link-local service: the route is real.
    let from_host = veil_tests::probe_host(&["tcp", "--addr", &meta.addr().to_string()]);
    assert_eq!(from_host.expect_hello().0, "META");
    let heard_from_host = meta.peers().len();

    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let veil = Veil::start_with(
        AgentOptions {
            metrics_listen: Some(metrics),
            ..agent_options(&ca, &[])
        },
        &[],
    );
    let secret = create_secret(&veil);
    // No route out: veil is its only way.
    let ns = NetNs::new("eghost");
    let sb = Sandbox::new("eghost", Some(&ns)).with_hosts(&[(HOST, up), (META, ll.ip().into())]);
    let answer = register(&veil, &sb, "eghost", egress::HOST);
    let trust = SandboxTrust::new(&answer, &ca);

    let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, host_lo.addr().port()));
    for (target, what) in [
        (host_addr.addr(), "the host's address"),
        (mapped(host_addr.addr()), "the host's address, IPv4-mapped"),
        (host_lo.addr(), "the host's loopback"),
        (mapped(host_lo.addr()), "the host's loopback, IPv4-mapped"),
        (unspecified, "0.0.0.0"),
        (meta.addr(), "a link-local service"),
        (mapped(meta.addr()), "a link-local service, IPv4-mapped"),
    ] {
        let out = sb.probe(&["tcp", "--addr", &target.to_string(), "--timeout-ms", "5000"]);
        assert!(
            out.hello().is_none(),
            "the sandbox reached {what} ({target}) through veil: {}",
            out.json
        );
    }
    assert!(
        host_addr.peers().is_empty(),
        "HOSTADDR heard from {:?}",
        host_addr.peers()
    );
    assert!(
        host_lo.peers().is_empty(),
        "HOSTLO heard from {:?}",
        host_lo.peers()
    );
    assert_eq!(
        meta.peers().len(),
        heard_from_host,
        "META heard from {:?}",
        meta.peers()
    );

    // Intercepted: answered 502 naming the destination; the service hears nothing.
    let url = format!(
        "https://{META}:{}/latest/meta-data/",
        meta_https.addr().port()
    );
    let (status, text) = trust.curl(&sb, &secret.1, &url, TIMEOUT);
    assert!(
        meta_https.seen().is_empty(),
        "a request reached the link-local service (status {status})"
    );
    assert_eq!(status, 502, "{text}");
    assert!(
        text.contains(&meta_https.addr().to_string()) && text.contains("refused"),
        "the 502 must name the refused destination: {text}"
    );

    // An ordinary upstream works, from the host.
    let out = sb.probe(&["tcp", "--addr", &open.addr().to_string()]);
    let (name, peer) = out.expect_hello();
    assert_eq!(name, "OPEN");
    assert_eq!(peer.ip(), IpAddr::from(world.host_v4()));
    assert_substitutes_and_scrubs(
        egress::HOST,
        &sb,
        &trust,
        (&secret.0, &secret.1),
        &https_open,
    );

    // Each refusal reaching veil is counted (the loopback and 0.0.0.0 ones never leave the
    // sandbox's netns) and logged with its destination.
    let page = scrape(metrics);
    let refused = sample(&page, "veil_agent_egress_refused_total").unwrap_or(0.0);
    assert!(refused >= 5.0, "egress_refused_total {refused}:\n{page}");
    let log = veil.log();
    assert!(
        log.contains("egress refused") && log.contains(&meta.addr().to_string()),
        "refusals must be logged with the destination:\n{log}"
    );
    drop(veil);

    // With egress_allow covering it, the link-local service is reachable on purpose.
    let veil = Veil::start_with(agent_options(&ca, &[format!("{}/32", ll.ip())]), &[]);
    create_secret(&veil);
    register(&veil, &sb, "eghost", egress::HOST);
    let out = sb.probe(&["tcp", "--addr", &meta.addr().to_string()]);
    assert_eq!(
        out.expect_hello().0,
        "META",
        "egress_allow did not open the range"
    );
    let out = sb.probe(&[
        "tcp",
        "--addr",
        &host_addr.addr().to_string(),
        "--timeout-ms",
        "5000",
    ]);
    assert!(
        out.hello().is_none(),
        "allowing one range opened the host: {}",
        out.json
    );
}

#[test]
fn both_egress_modes_substitute_and_scrub() {
    require_root();
    let world = World::new();
    let ca = TestCa::new("egress test CA");
    let up = world.upstream_ip4();
    let echo =
        HttpsUpstream::start_with(world.netns(), up, Some((&ca, &[HOST])), UpstreamReply::Echo);
    let veil = Veil::start_with(agent_options(&ca, &[]), &[]);
    let secret = create_secret(&veil);
    let (ns_own, ns_none) = (NetNs::new("egown"), NetNs::new("egnone"));
    let _link = world.link_sandbox(&ns_own);
    for (ns, id, mode) in [
        (&ns_own, "egown", egress::SANDBOX),
        (&ns_none, "egnone", egress::HOST),
    ] {
        let sb = Sandbox::new(id, Some(ns)).with_hosts(&[(HOST, up)]);
        let answer = register(&veil, &sb, id, mode);
        let trust = SandboxTrust::new(&answer, &ca);
        assert_substitutes_and_scrubs(mode, &sb, &trust, (&secret.0, &secret.1), &echo);
    }
}

#[test]
fn egress_is_part_of_the_sandbox_put_and_a_change_applies_at_once() {
    require_root();
    let world = World::new();
    let ns = NetNs::new("egput");
    let link = world.link_sandbox(&ns);
    let hello = TcpHello::start(world.netns(), world.upstream_ip4(), "U");
    let veil = Veil::start(&[]);
    let sb = Sandbox::new("egput", Some(&ns));
    let path = "/sandbox/egput";
    let cgroup = sb.cgroup().relative().trim_start_matches('/').to_owned();
    let put = |body: Value| veil.block_on(veil.api().put(path, veil.key(), body));

    for (bad, named) in [
        (json!("sideways"), "\"sideways\""),
        (json!(1), "egress must be a string"),
    ] {
        let (status, body) = put(json!({"cgroup": cgroup, "netns": ns.path(), "egress": bad}));
        assert_eq!(status, 400, "{body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("egress") && message.contains(named),
            "{message}"
        );
    }
    let (status, _) = veil.block_on(veil.api().get(path, veil.key()));
    assert_eq!(status, 404, "a refused PUT stored the sandbox");

    let peer = || {
        let out = sb.probe(&["tcp", "--addr", &hello.addr().to_string()]);
        out.expect_hello().1.ip()
    };
    // Omitted: "sandbox".
    let (status, body) = put(json!({"cgroup": cgroup, "netns": ns.path()}));
    assert_eq!(
        (status, body["egress"].as_str()),
        (200, Some("sandbox")),
        "{body}"
    );
    assert_eq!(peer(), IpAddr::from(link.sandbox_v4()));
    for (mode, seen) in [
        (egress::HOST, IpAddr::from(world.host_v4())),
        (egress::SANDBOX, IpAddr::from(link.sandbox_v4())),
    ] {
        let (status, body) = put(json!({"cgroup": cgroup, "netns": ns.path(), "egress": mode}));
        assert_eq!(status, 200, "{body}");
        let (_, got) = veil.block_on(veil.api().get(path, veil.key()));
        assert_eq!(got["egress"], mode, "GET after PUT {mode}: {got}");
        assert_eq!(
            peer(),
            seen,
            "egress {mode} did not apply to the next connection"
        );
    }
}

fn scrape(addr: SocketAddr) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let resp = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("metrics request");
        resp.text().await.expect("metrics body")
    })
}

fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
