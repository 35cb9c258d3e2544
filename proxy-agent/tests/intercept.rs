//! The interception data path of the real `veil-agent`, fed by an in-test control: real curl in
//! a sandbox (own netns and cgroup) against TLS upstreams in the world netns whose certificates
//! come from a test CA given to the agent with `--upstream-ca`. Needs root.
//!
//! Assertions compare values and print only booleans and placeholders, never a value.
#![allow(clippy::unwrap_used, reason = "tests may unwrap")]

mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{AgentProc, ControlConn, Dirs, FakeControl, sandbox_state};
use veil_link::{ControlMsg, SecretState, SecretValue};
use veil_tests::{HttpsUpstream, NetNs, Sandbox, TestCa, World, require_root};

const ALLOWED: &str = "api.allowed.test";
const OTHER: &str = "other.test";
const BADCERT: &str = "badcert.test";
const PLACEHOLDER: &str = "veil_ph_intercept_0123456789";
const CURL_TIMEOUT: Duration = Duration::from_secs(30);

/// Fields drop in order: the agent and control first, the world (and its netns) last.
struct Setup {
    agent: AgentProc,
    _conn: ControlConn,
    _ctl: FakeControl,
    dirs: Dirs,
    sb: Sandbox,
    ns: NetNs,
    up: HttpsUpstream,
    badcert: HttpsUpstream,
    test_ca: TestCa,
    value: String,
    world: World,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        require_root();
        let world = World::new();
        let test_ca = TestCa::new("proxy-agent intercept test CA");
        let ip: IpAddr = world.upstream_v4().into();
        let up = HttpsUpstream::start(world.netns(), ip, &test_ca, &[ALLOWED, OTHER]);
        let badcert = HttpsUpstream::start(world.netns(), ip, &test_ca, &["somewhere-else.test"]);
        let ns = NetNs::new(tag);
        let sb =
            Sandbox::new(tag, Some(&ns)).with_hosts(&[(ALLOWED, ip), (OTHER, ip), (BADCERT, ip)]);
        let dirs = Dirs::new();
        let ctl = FakeControl::bind(&dirs.control);
        let ca_arg = test_ca.pem_path().display().to_string();
        let agent = AgentProc::start_with(&dirs, &["--upstream-ca", &ca_arg]);
        let mut conn = ctl.accept(Duration::from_secs(5));
        let value = format!("sk-live-{}", std::process::id() * 7919 + 12345);
        let mut state = sandbox_state("sb-int", &sb);
        state
            .mounts
            .insert("MY_KEY".into(), "sec-1".parse().unwrap());
        conn.apply(ControlMsg::Snapshot {
            guarded: Vec::new(),
            seq: 1,
            sandboxes: vec![state],
            secrets: vec![SecretState {
                previous: Vec::new(),
                retired: false,
                id: "sec-1".parse().unwrap(),
                org: "org-1".parse().unwrap(),
                name: "upstream-key".into(),
                placeholder: PLACEHOLDER.into(),
                hosts: vec![ALLOWED.into(), BADCERT.into()],
                value: SecretValue::new(value.clone()),
                revision: 1.into(),
                body_substitution: false,
                wrong_host: Default::default(),
            }],
        });
        Setup {
            world,
            test_ca,
            up,
            badcert,
            value,
            sb,
            ns,
            dirs,
            agent,
            _ctl: ctl,
            _conn: conn,
        }
    }

    fn agent_ca(&self) -> PathBuf {
        self.dirs.state.path().join("ca-cert.pem")
    }

    /// curl in the sandbox; stdout ends with a line holding the HTTP status.
    fn curl(&self, ca: &Path, extra: &[&str], url: &str) -> Output {
        let ca = ca.display().to_string();
        let mut args = vec![
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            &ca,
            "-w",
            "\n%{http_code}",
        ];
        args.extend_from_slice(extra);
        args.push(url);
        self.sb.run(&args, CURL_TIMEOUT)
    }

    fn url(&self, host: &str, up: &HttpsUpstream, path: &str) -> String {
        format!("https://{host}:{}{path}", up.addr().port())
    }
}

fn status(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().last().unwrap_or_default().to_owned()
}

/// Never prints stdout (an upstream echo could carry a value); stderr is curl's own.
fn describe(out: &Output) -> String {
    format!(
        "exit {:?}, status {}, stderr: {}",
        out.status.code(),
        status(out),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn curl_h1_and_h2_get_the_value_substituted_in_header_query_and_basic() {
    let s = Setup::new("ic-sub");
    for (proto, expect_version) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2.0")] {
        let before = s.up.seen().len();
        let out = s.curl(
            &s.agent_ca(),
            &[
                proto,
                "-H",
                &format!("x-api-key: Bearer {PLACEHOLDER}"),
                "-u",
                &format!("user:{PLACEHOLDER}"),
            ],
            &s.url(ALLOWED, &s.up, &format!("/v1/models?key={PLACEHOLDER}")),
        );
        assert!(
            out.status.success() && status(&out) == "200",
            "{proto}: {}",
            describe(&out)
        );
        let seen = s.up.seen();
        assert_eq!(seen.len(), before + 1, "{proto}: one request upstream");
        let req = seen.last().unwrap();
        assert_eq!(
            req.version, expect_version,
            "{proto}: protocol towards upstream"
        );
        assert_eq!(req.sni.as_deref(), Some(ALLOWED));
        let header_ok = req.header("x-api-key") == Some(format!("Bearer {}", s.value).as_str());
        assert!(header_ok, "{proto}: header value not substituted");
        let query_ok = req.target == format!("/v1/models?key={}", s.value);
        assert!(query_ok, "{proto}: query not substituted");
        use base64::Engine as _;
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("user:{}", s.value))
        );
        assert!(
            req.header("authorization") == Some(basic.as_str()),
            "{proto}: Basic credentials not substituted"
        );
    }
    // The value never reached the agent's log.
    assert!(!s.agent.log().contains(&s.value), "value in the agent log");
}

#[test]
fn request_bodies_chunked_and_with_100_continue_arrive_whole() {
    let s = Setup::new("ic-body");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.txt");
    let body: String = (0..300_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    std::fs::write(&file, &body).unwrap();
    let data = format!("@{}", file.display());
    for (proto, extra) in [
        ("--http1.1", vec!["-H", "Transfer-Encoding: chunked"]),
        ("--http1.1", vec!["-H", "Expect: 100-continue"]),
        ("--http2", vec![]),
    ] {
        let mut args = vec![proto, "--data-binary", &data];
        args.extend(extra.iter().copied());
        let out = s.curl(&s.agent_ca(), &args, &s.url(ALLOWED, &s.up, "/upload"));
        assert_eq!(status(&out), "200", "{proto} {extra:?}: {}", describe(&out));
        let req = s.up.seen().last().cloned().unwrap();
        assert_eq!(req.method, "POST");
        assert!(
            req.body == body,
            "{proto} {extra:?}: body differs ({} bytes)",
            req.body.len()
        );
    }
}

#[test]
fn server_speaks_first_protocols_pass_through_without_waiting_for_the_peek() {
    let s = Setup::new("ic-srv1");
    let hello = veil_tests::TcpHello::start(s.world.netns(), s.world.upstream_v4().into(), "up");
    let started = std::time::Instant::now();
    let out = s.sb.probe(&[
        "tcp",
        "--addr",
        &hello.addr().to_string(),
        "--timeout-ms",
        "3000",
    ]);
    let took = started.elapsed();
    assert!(out.ok(), "{out:?}\n{}", s.agent.log());
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn host_not_matching_sni_gets_nothing() {
    let s = Setup::new("ic-host");
    let url = s.url(ALLOWED, &s.up, "/a");
    let out = s.curl(
        &s.agent_ca(),
        &[
            "--http1.1",
            "-H",
            "host: other.test",
            "-H",
            &format!("x-api-key: {PLACEHOLDER}"),
        ],
        &url,
    );
    assert_eq!(status(&out), "200", "{}", describe(&out));
    let req = s.up.seen().last().cloned().unwrap();
    assert_eq!(
        req.header("x-api-key"),
        Some(PLACEHOLDER),
        "substituted despite Host ≠ SNI"
    );
}

#[test]
fn upstream_cert_invalid_for_sni_gives_502_and_nothing_sent() {
    let s = Setup::new("ic-bad");
    for proto in ["--http1.1", "--http2"] {
        let out = s.curl(
            &s.agent_ca(),
            &[proto, "-H", &format!("x-api-key: {PLACEHOLDER}")],
            &s.url(BADCERT, &s.badcert, "/secret"),
        );
        assert_eq!(status(&out), "502", "{proto}: {}", describe(&out));
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(
            body.contains(BADCERT),
            "{proto}: 502 does not name the host: {body}"
        );
        assert!(
            body.contains("verif"),
            "{proto}: 502 does not give the reason: {body}"
        );
        assert!(!body.contains(&s.value), "{proto}: value in the error page");
    }
    assert!(
        s.badcert.seen().is_empty(),
        "a request reached the bad upstream"
    );
}

#[test]
fn sni_not_allowed_passes_through_with_the_upstreams_own_certificate() {
    let s = Setup::new("ic-pass");
    let url = s.url(OTHER, &s.up, "/p");
    // Verifies only against the test CA: succeeds only if veil did not intercept.
    let out = s.curl(
        s.test_ca.pem_path(),
        &["-H", &format!("x-api-key: {PLACEHOLDER}")],
        &url,
    );
    assert_eq!(status(&out), "200", "{}", describe(&out));
    let req = s.up.seen().last().cloned().unwrap();
    assert_eq!(req.sni.as_deref(), Some(OTHER));
    assert_eq!(req.header("x-api-key"), Some(PLACEHOLDER));
    // And veil's CA does not verify it: the certificate is the upstream's own.
    let out = s.curl(&s.agent_ca(), &[], &url);
    assert!(
        !out.status.success(),
        "veil's CA verified a passthrough connection"
    );
    assert_eq!(out.status.code(), Some(60), "{}", describe(&out));
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// nginx (one process) serving TLS for `name` on `ip:port` inside the world netns; killed (by
/// pid) on drop.
struct Nginx {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(world: &World, ca: &TestCa, name: &str, ip: IpAddr, port: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let (chain, key) = ca.issue(&[name]);
        std::fs::write(dir.path().join("cert.pem"), pem("CERTIFICATE", &chain[0])).unwrap();
        std::fs::write(
            dir.path().join("key.pem"),
            pem("PRIVATE KEY", key.secret_der()),
        )
        .unwrap();
        let d = dir.path().display();
        let conf = format!(
            "user root; master_process off; worker_processes 1; daemon off; pid {d}/nginx.pid; error_log stderr error;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; keepalive_requests 10000000;\n\
               client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
               uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen {ip}:{port} ssl http2; server_name {name};\n\
                 ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n\
                 location / {{ return 200 \"ok\\n\"; }} }} }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = world
            .netns()
            .command("nginx")
            .args(["-p", &d.to_string(), "-c", &format!("{d}/nginx.conf")])
            .spawn()
            .unwrap();
        let mut nginx = Nginx { child, _dir: dir };
        // Ready means its socket listens in the world netns (before that a client is refused);
        // an nginx that exited (bad config, port taken) never will.
        let addr = std::net::SocketAddr::new(ip, port);
        let mut exited = None;
        let listening = veil_tests::cmd::wait_until(Duration::from_secs(10), || {
            exited = nginx.child.try_wait().unwrap();
            exited.is_some() || world.netns().tcp_listeners().contains(&addr)
        }) && exited.is_none();
        assert!(
            listening,
            "nginx is not listening on {addr} (exited: {exited:?}); its stderr is above"
        );
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn h2load_rps(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| {
            l.starts_with("finished in")
                || l.starts_with("requests:")
                || l.contains("time for request")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Quick throughput figure: h2load (one thread, 16 connections, 10 s) from the sandbox to
/// nginx, direct (outside the cgroup) and through the agent (intercepted, with a header to
/// substitute). Run: `cargo test --release -p proxy-agent --test intercept -- --ignored
/// --nocapture bench`.
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_h1_keepalive_direct_vs_agent() {
    let s = Setup::new("ic-bench");
    let ip: IpAddr = s.world.upstream_v4().into();
    let _nginx = Nginx::start(&s.world, &s.test_ca, ALLOWED, ip, 8443);
    let _link = s.world.link_sandbox(&s.ns);
    let url = format!("https://{ALLOWED}:8443/");
    let header = format!("x-api-key: Bearer {PLACEHOLDER}");
    for proto in ["--http1.1", "--http2"] {
        let out = s.sb.run(
            &["curl", "-sS", "-k", proto, "-w", "\n%{http_code}", &url],
            CURL_TIMEOUT,
        );
        // nginx answers "ok"; an agent error names no value.
        println!(
            "curl {proto} via agent: {}",
            String::from_utf8_lossy(&out.stdout).replace('\n', " ")
        );
    }
    for (label, extra) in [("h1", vec!["--h1"]), ("h2", vec![])] {
        let mut args = vec!["h2load", "-t1", "-c16", "-D", "10", "-H", &header];
        args.extend(extra.iter().copied());
        args.push(&url);
        let direct = s.sb.run_outside(&args, Duration::from_secs(60));
        let agent = s.sb.run(&args, Duration::from_secs(60));
        println!("{label} direct: {}", h2load_rps(&direct));
        println!("{label} agent:  {}", h2load_rps(&agent));
        for out in [&direct, &agent] {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(" 0 failed, 0 errored"),
                "{label}: requests failed"
            );
        }
    }
}
