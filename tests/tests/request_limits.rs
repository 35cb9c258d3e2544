//! Per-connection and per-sandbox limits on intercepted traffic (issue 6): a sandbox flooding
//! connections hits its own limit without starving another, request heads over the configured
//! size are refused, idle connections are closed and busy ones are not. Real clients in
//! sandboxes, a real TLS upstream; assertions never print a value.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::json;
use veil_tests::output_within;
use veil_tests::request_policy::{ALLOWED, TIMEOUT, last_for, setup};

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
    let mut s = setup("max_connections_per_sandbox = 32\n");
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
fn request_heads_over_the_configured_size_are_refused() {
    let mut s = setup("max_header_bytes = 16384\n");
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
    let mut s = setup("idle_timeout_ms = 1000\n");
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
