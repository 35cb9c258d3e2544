//! Request policy end to end (issue 6): body substitution, wrong-host block mode, WebSocket
//! refusal and per-sandbox connection limits, with real clients in sandboxes and a real TLS
//! upstream. Assertions never print a value: they compare and report booleans.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use veil_tests::agent::AgentOptions;
use veil_tests::control::{free_port, random_token};
use veil_tests::{
    AgentSandbox, HttpsUpstream, NetNs, Sandbox, Seen, TestCa, Veil, World, output_within,
    require_root,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const ALLOWED: &str = "api.allowed.test";
const OTHER: &str = "other.test";
/// The body bound the tests configure.
const BODY_MAX: usize = 4096;

/// A secret as the tests create it.
struct Secret {
    id: String,
    name: String,
    value: String,
    placeholder: String,
}

/// A world with a TLS upstream for both names, veil (agent config `extra`, a metrics endpoint),
/// and sandboxes registered through the API.
struct Setup {
    world: World,
    ca: TestCa,
    up: HttpsUpstream,
    veil: Veil,
    metrics_port: u16,
    bundle: PathBuf,
    dir: tempfile::TempDir,
    _ns: Vec<NetNs>,
    sandboxes: Vec<Sandbox>,
}

impl Setup {
    fn new(extra: &str) -> Setup {
        require_root();
        let world = World::new();
        let ca = TestCa::new("request policy test CA");
        let ip: IpAddr = world.upstream_v4().into();
        let up = HttpsUpstream::start(world.netns(), ip, &ca, &[ALLOWED, OTHER]);
        let metrics_port = free_port();
        let veil = Veil::start_with(
            AgentOptions {
                args: vec!["--upstream-ca".into(), ca.pem_path().into()],
                metrics_listen: Some(([127, 0, 0, 1], metrics_port).into()),
                extra_config: format!("body_substitution_max_bytes = {BODY_MAX}\n{extra}"),
                ..AgentOptions::default()
            },
            &[],
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bundle.pem");
        Setup {
            world,
            ca,
            up,
            veil,
            metrics_port,
            bundle,
            dir,
            _ns: Vec::new(),
            sandboxes: Vec::new(),
        }
    }

    /// Creates a secret through the API; `extra` fields are merged into the request.
    fn secret(&self, name: &str, hosts: &[&str], extra: Value) -> Secret {
        let value = format!("sk-test-{}", random_token(40));
        let mut body = json!({"name": name, "value": value, "hosts": hosts});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let created = self
            .veil
            .block_on(self.veil.api().post("/secret", self.veil.key(), body));
        assert_eq!(
            created.0, 201,
            "create secret {name}: status {} {}",
            created.0, created.1
        );
        Secret {
            id: created.1["id"].as_str().expect("id").to_owned(),
            name: name.to_owned(),
            value,
            placeholder: created.1["placeholder"]
                .as_str()
                .expect("placeholder")
                .to_owned(),
        }
    }

    /// A sandbox (own netns, test names resolving to the world) with `mounts` (ENV, secret
    /// name); writes the client CA bundle from the PUT answer.
    fn add_sandbox(&mut self, id: &str, mounts: &[(&str, &str)]) -> usize {
        let ns = NetNs::new(id);
        let ip: IpAddr = self.world.upstream_v4().into();
        let sb = Sandbox::new(id, Some(&ns)).with_hosts(&[(ALLOWED, ip), (OTHER, ip)]);
        let spec = AgentSandbox {
            id: id.to_owned(),
            cgroup: sb.cgroup().path().to_owned(),
            netns: Some(ns.path().to_owned()),
            egress: None,
        };
        let answer = self.veil.register_with(&spec, mounts);
        let agent_ca = ["caCertificate", "caCert"]
            .iter()
            .find_map(|k| answer[*k].as_str())
            .expect("PUT answer carries the CA")
            .to_owned();
        let test_ca = std::fs::read_to_string(self.ca.pem_path()).expect("test CA");
        std::fs::write(&self.bundle, format!("{agent_ca}\n{test_ca}")).expect("bundle");
        self._ns.push(ns);
        self.sandboxes.push(sb);
        self.sandboxes.len() - 1
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.up.addr().port())
    }

    /// Runs curl in sandbox `i`; (success, stdout + stderr with every value in `redact`
    /// replaced).
    fn curl(&self, i: usize, args: &[&str], redact: &[&Secret]) -> (bool, String) {
        let mut cmd = self.sandboxes[i].command("curl");
        cmd.args(["-sS", "--max-time", "30"])
            .args(args)
            .env("CURL_CA_BUNDLE", &self.bundle);
        let out = output_within(&mut cmd, TIMEOUT);
        let mut text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for s in redact {
            text = text.replace(&s.value, "<VALUE!>");
        }
        (out.status.success(), text)
    }

    /// Writes `body` to a file the sandbox can read (for `--data-binary @file`).
    fn body_file(&self, name: &str, body: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, body).expect("body file");
        path.display().to_string()
    }

    /// The requests the upstream saw, as (target, body) summaries that never print a value.
    fn seen(&self) -> Vec<Seen> {
        self.up.seen()
    }

    /// Value of `veil_agent_<name>_total` on the agent's metrics endpoint.
    fn counter(&self, name: &str) -> f64 {
        let port = self.metrics_port;
        let text = self.veil.block_on(async move {
            reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .expect("scrape")
                .text()
                .await
                .expect("metrics body")
        });
        let metric = format!("veil_agent_{name}_total ");
        text.lines()
            .find_map(|l| l.strip_prefix(&metric))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {metric} in:\n{text}"))
    }
}

/// The last request the upstream saw for `target`.
fn last_for(seen: &[Seen], target: &str) -> Seen {
    seen.iter()
        .rev()
        .find(|s| s.target == target)
        .cloned()
        .unwrap_or_else(|| panic!("the upstream saw no request for {target}"))
}

#[test]
fn json_and_form_bodies_are_substituted_and_a_body_over_the_bound_passes_unchanged() {
    let mut s = Setup::new("");
    let key = s.secret("body-key", &[ALLOWED], json!({"bodySubstitution": true}));
    let plain = s.secret("head-only-key", &[ALLOWED], json!({}));
    let sb = s.add_sandbox("rp-body", &[("K", "body-key"), ("P", "head-only-key")]);
    let url = s.url(ALLOWED, "/json");
    let redact = [&key, &plain];

    // JSON: the placeholder of a secret with body substitution becomes the value, Content-Length
    // follows; a secret without it stays a placeholder.
    let body = format!(
        "{{\"key\":\"{}\",\"other\":\"{}\",\"n\":1}}",
        key.placeholder, plain.placeholder
    );
    for flag in ["--http1.1", "--http2"] {
        let (ok, out) = s.curl(
            sb,
            &[
                flag,
                "-H",
                "content-type: application/json",
                "--data-binary",
                &body,
                &url,
            ],
            &redact,
        );
        assert!(ok, "curl {flag}: {out}");
        let seen = last_for(&s.seen(), "/json");
        let expect = body.replace(&key.placeholder, &key.value);
        assert!(
            seen.body == expect,
            "{flag}: JSON body substituted exactly: false"
        );
        assert!(
            seen.body.contains(&plain.placeholder) && !seen.body.contains(&plain.value),
            "{flag}: a secret without body substitution stays a placeholder"
        );
        if let Some(len) = seen.header("content-length") {
            assert_eq!(len, expect.len().to_string(), "{flag}: Content-Length");
        }
    }

    // Form: the value is percent-encoded where the placeholder was (ours is URL-safe anyway).
    let form = format!("a=1&key={}&z=2", key.placeholder);
    let (ok, out) = s.curl(
        sb,
        &[
            "-H",
            "content-type: application/x-www-form-urlencoded",
            "--data-binary",
            &form,
            &s.url(ALLOWED, "/form"),
        ],
        &redact,
    );
    assert!(ok, "curl form: {out}");
    let seen = last_for(&s.seen(), "/form");
    assert!(
        seen.body == form.replace(&key.placeholder, &key.value),
        "form body substituted: false"
    );

    // Over the bound: forwarded byte for byte, placeholder included, and counted.
    let too_large_before = s.counter("body_too_large");
    let big = format!(
        "{{\"key\":\"{}\",\"pad\":\"{}\"}}",
        key.placeholder,
        "x".repeat(BODY_MAX * 3)
    );
    let file = s.body_file("big.json", &big);
    let data = format!("@{file}");
    let (ok, out) = s.curl(
        sb,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &data,
            &s.url(ALLOWED, "/big"),
        ],
        &redact,
    );
    assert!(ok, "curl big: {out}");
    let seen = last_for(&s.seen(), "/big");
    assert!(seen.body == big, "a body over the bound passes unchanged");
    assert!(!seen.body.contains(&key.value), "no value in it");
    assert!(s.counter("body_too_large") > too_large_before);
    assert!(s.counter("body_substituted") >= 3.0);
}

#[test]
fn block_mode_answers_403_and_leaves_an_audit_record() {
    let mut s = Setup::new("");
    let key = s.secret(
        "blocking-key",
        &[ALLOWED],
        json!({"wrongHost": "block", "bodySubstitution": true}),
    );
    let sb = s.add_sandbox("rp-block", &[("K", "blocking-key")]);
    let redact = [&key];

    // In a header to a host the secret does not allow: 403 naming the secret, nothing sent.
    let before = s.seen().len();
    let header = format!("x-api-key: {}", key.placeholder);
    let (ok, out) = s.curl(
        sb,
        &[
            "-H",
            &header,
            "-w",
            "\nstatus=%{http_code}",
            &s.url(OTHER, "/h"),
        ],
        &redact,
    );
    assert!(ok, "curl: {out}");
    assert!(out.contains("status=403"), "{out}");
    let message = format!(
        "veil: secret {} ({}) is not allowed for host {OTHER}",
        key.name, key.id
    );
    assert!(out.contains(&message), "{out}");
    assert!(!out.contains("<VALUE!>"));
    assert_eq!(s.seen().len(), before, "nothing reached the upstream");

    // In a JSON body (body substitution is on for it): blocked too.
    let body = format!("{{\"k\":\"{}\"}}", key.placeholder);
    let (_, out) = s.curl(
        sb,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            "-w",
            "\nstatus=%{http_code}",
            &s.url(OTHER, "/b"),
        ],
        &redact,
    );
    assert!(out.contains("status=403"), "{out}");
    assert_eq!(s.seen().len(), before, "nothing reached the upstream");

    // Without a placeholder the same host works, and the allowed host still gets the value.
    let (ok, out) = s.curl(sb, &[&s.url(OTHER, "/fine")], &redact);
    assert!(ok && !out.contains("veil:"), "{out}");
    let (ok, out) = s.curl(sb, &["-H", &header, &s.url(ALLOWED, "/ok")], &redact);
    assert!(ok, "{out}");
    let seen = last_for(&s.seen(), "/ok");
    assert!(
        seen.header("x-api-key") == Some(key.value.as_str()),
        "allowed host substituted"
    );
    assert!(s.counter("blocked") >= 2.0);

    // Control records each refusal as secret.blocked, naming the secret and the host.
    let found = veil_tests::cmd::wait_until(Duration::from_secs(20), || {
        let (status, page) = s
            .veil
            .block_on(s.veil.api().get("/audit?limit=100", s.veil.key()));
        status == 200
            && page["items"].as_array().is_some_and(|items| {
                items.iter().any(|i| {
                    i["action"] == "secret.blocked"
                        && i["targetId"] == key.id.as_str()
                        && i["changes"]["host"] == OTHER
                        && i["changes"]["sandboxId"] == "rp-block"
                })
            })
    });
    let (_, page) = s
        .veil
        .block_on(s.veil.api().get("/audit?limit=100", s.veil.key()));
    let actions: Vec<&str> = page["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["action"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        found,
        "no secret.blocked audit record for the secret and {OTHER}; actions: {actions:?}"
    );
    assert!(
        !page.to_string().contains(&key.value),
        "no value in the audit"
    );
}

#[test]
fn default_mode_forwards_the_placeholder_to_other_hosts() {
    let mut s = Setup::new("");
    let key = s.secret("fwd-key", &[ALLOWED], json!({}));
    // A second secret for OTHER makes connections to it intercepted: the first secret's
    // placeholder is then seen by veil and still forwarded unchanged.
    let other = s.secret("other-key", &[OTHER], json!({}));
    let sb = s.add_sandbox("rp-fwd", &[("K", "fwd-key"), ("O", "other-key")]);
    let only = s.add_sandbox("rp-fwd-only", &[("K", "fwd-key")]);
    let header = format!("x-api-key: {}", key.placeholder);
    for (i, path) in [(sb, "/intercepted"), (only, "/passed")] {
        let (ok, out) = s.curl(i, &["-H", &header, &s.url(OTHER, path)], &[&key, &other]);
        assert!(ok && !out.contains("veil:"), "{path}: {out}");
        let seen = last_for(&s.seen(), path);
        assert!(
            seen.header("x-api-key") == Some(key.placeholder.as_str()),
            "{path}: placeholder forwarded unchanged"
        );
    }
    assert_eq!(s.counter("blocked"), 0.0);
}

#[test]
fn websocket_upgrades_are_refused_on_intercepted_connections() {
    let mut s = Setup::new("");
    let key = s.secret("ws-key", &[ALLOWED], json!({}));
    let sb = s.add_sandbox("rp-ws", &[("K", "ws-key")]);
    let before = s.seen().len();
    let (ok, out) = s.curl(
        sb,
        &[
            "--http1.1",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "-w",
            "\nstatus=%{http_code}",
            &s.url(ALLOWED, "/ws"),
        ],
        &[&key],
    );
    assert!(ok, "{out}");
    assert!(out.contains("status=501"), "{out}");
    assert!(out.contains("WebSocket is not supported"), "{out}");
    assert_eq!(s.seen().len(), before, "nothing reached the upstream");
    assert!(s.counter("upgrade_refused") >= 1.0);
}

/// Kills (by pid) and reaps a process this test started, also on panic.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens TCP connections to HOST:PORT from many threads as fast as it can for SECS seconds,
/// holding up to 400 open.
const FLOOD: &str = r#"
import socket, sys, threading, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.time() + secs
held, lock = [], threading.Lock()
def work():
    while time.time() < end:
        try:
            s = socket.create_connection((host, port), timeout=2)
        except OSError:
            continue
        with lock:
            held.append(s)
            if len(held) > 400:
                held.pop(0).close()
for _ in range(16):
    threading.Thread(target=work, daemon=True).start()
time.sleep(secs)
"#;

#[test]
fn a_sandbox_flooding_connections_does_not_stop_another_sandboxs_requests() {
    let mut s = Setup::new("max_connections_per_sandbox = 32\n");
    let key = s.secret("fair-key", &[ALLOWED], json!({}));
    let a = s.add_sandbox("rp-flood", &[("K", "fair-key")]);
    let b = s.add_sandbox("rp-calm", &[("K", "fair-key")]);
    let ip = s.world.upstream_v4().to_string();
    let port = s.up.addr().port().to_string();
    let mut cmd = s.sandboxes[a].command("python3");
    cmd.args(["-c", FLOOD, &ip, &port, "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let flood = Reaped(cmd.spawn().expect("spawn flood"));
    // The flood is on once it hits its sandbox's limit.
    let limited =
        veil_tests::cmd::wait_until(Duration::from_secs(30), || s.counter("limit_refused") > 0.0);
    assert!(limited, "the flood never reached the per-sandbox limit");

    let header = format!("x-api-key: {}", key.placeholder);
    let mut failures = Vec::new();
    for n in 0..20 {
        let path = format!("/calm/{n}");
        let flag = if n % 2 == 0 { "--http1.1" } else { "--http2" };
        let (ok, out) = s.curl(b, &[flag, "-H", &header, &s.url(ALLOWED, &path)], &[&key]);
        let substituted = ok
            && s.seen().iter().any(|seen| {
                seen.target == path && seen.header("x-api-key") == Some(key.value.as_str())
            });
        if !substituted {
            failures.push(format!("{path}: ok={ok} {out}"));
        }
    }
    let refused_during = s.counter("limit_refused");
    drop(flood);
    assert!(
        failures.is_empty(),
        "sandbox B's requests failed during A's flood: {failures:#?}"
    );
    assert!(refused_during > 0.0);
}

#[test]
fn a_value_written_with_body_substitution_and_read_back_on_a_new_connection_is_scrubbed() {
    let mut s = Setup::new("");
    let key = s.secret("store-key", &[ALLOWED], json!({"bodySubstitution": true}));
    let sb = s.add_sandbox("rp-store", &[("K", "store-key")]);
    let body = format!("{{\"saved\":\"{}\"}}", key.placeholder);
    let (ok, out) = s.curl(
        sb,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            &s.url(ALLOWED, "/store"),
        ],
        &[&key],
    );
    assert!(ok, "store: {out}");
    let stored = last_for(&s.seen(), "/store");
    assert!(
        stored.body.contains(&key.value),
        "the upstream stored the value"
    );
    // A new curl process: a new connection, nothing shared with the first request.
    let (ok, out) = s.curl(sb, &[&s.url(ALLOWED, "/load")], &[&key]);
    assert!(ok, "load: {out}");
    assert!(
        !out.contains("<VALUE!>"),
        "value scrubbed from the response"
    );
    assert!(
        out.contains(&key.placeholder),
        "the placeholder came back in its place: {out}"
    );
}

#[test]
fn request_heads_over_the_configured_size_are_refused() {
    let mut s = Setup::new("max_header_bytes = 16384\n");
    let key = s.secret("hdr-key", &[ALLOWED], json!({}));
    let sb = s.add_sandbox("rp-hdr", &[("K", "hdr-key")]);
    let big = format!("x-big: {}", "a".repeat(32 * 1024));
    let before = s.seen().len();
    for flag in ["--http1.1", "--http2"] {
        let (_, out) = s.curl(
            sb,
            &[
                flag,
                "-H",
                &big,
                "-w",
                "\nstatus=%{http_code}",
                &s.url(ALLOWED, "/big-head"),
            ],
            &[&key],
        );
        assert!(!out.contains("status=200"), "{flag}: {}", out.len());
        assert_eq!(
            s.seen().len(),
            before,
            "{flag}: nothing reached the upstream"
        );
    }
    // A head within the bound goes through.
    let small = format!("x-small: {}", "a".repeat(4 * 1024));
    let (ok, out) = s.curl(sb, &["-H", &small, &s.url(ALLOWED, "/small-head")], &[&key]);
    assert!(ok, "{out}");
    last_for(&s.seen(), "/small-head");
}

/// Opens one TLS connection, sends a request every `gap` seconds `n` times (each answered), then
/// waits up to 20 s for veil to close it; prints `answered=N closed=BOOL`.
const IDLE_CLIENT: &str = r#"
import socket, ssl, sys, time
host, ip, port, bundle, n, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
ctx = ssl.create_default_context(cafile=bundle)
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection((ip, port), timeout=20), server_hostname=host)
answered = 0
for i in range(n):
    if i:
        time.sleep(gap)
    s.sendall(f"GET /idle/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, body = buf.split(b"\r\n\r\n", 1)
    lengths = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
    if lengths:
        while len(body) < lengths[0]:
            body += s.recv(4096)
    else:
        while not body.endswith(b"0\r\n\r\n"):
            body += s.recv(4096)
    answered += 1
try:
    closed = s.recv(1) == b""
except (socket.timeout, ssl.SSLError, OSError) as e:
    closed = not isinstance(e, socket.timeout)
print(f"answered={answered} closed={closed}")
"#;

#[test]
fn idle_intercepted_connections_are_closed_and_busy_ones_are_not() {
    let mut s = Setup::new("idle_timeout_ms = 1000\n");
    let key = s.secret("idle-key", &[ALLOWED], json!({}));
    let sb = s.add_sandbox("rp-idle", &[("K", "idle-key")]);
    let ip = s.world.upstream_v4().to_string();
    let port = s.up.addr().port().to_string();
    let bundle = s.bundle.display().to_string();
    // Requests 0.4 s apart for ~2.4 s: longer than the idle timeout in total, never idle that
    // long, so all are answered on the one connection; then, unused, veil closes it.
    let mut cmd = s.sandboxes[sb].command("python3");
    cmd.args(["-c", IDLE_CLIENT, ALLOWED, &ip, &port, &bundle, "7", "0.4"]);
    let out = output_within(&mut cmd, TIMEOUT);
    let text = String::from_utf8_lossy(&out.stdout).replace(&key.value, "<VALUE!>");
    let err = String::from_utf8_lossy(&out.stderr).replace(&key.value, "<VALUE!>");
    assert!(out.status.success(), "{text}\n{err}");
    assert!(text.contains("answered=7 closed=True"), "{text}\n{err}");
}
