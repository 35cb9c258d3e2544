//! Adversarial: identity follows the socket, never a guess (issue 13 item 2).
//!
//! Two sandboxes share a network namespace, as the containers of a pod do. A (no secret)
//! attacks B (a secret for `api.pod.test`) from inside A: it leaves an original-destination
//! record behind — a connection the agent drops over A's connection limit — then reuses the
//! record's local port to dial B's listener straight (loopback is never redirected), speaks
//! TLS to `api.pod.test` with B's placeholder, and hopes to be served as B. The upstream must
//! never see B's value, and the hijacked connection must not be served at all.

use std::time::Duration;

use serde_json::{Value, json};
use veil_tests::agent::AgentOptions;
use veil_tests::pod::{HOST, Pod};
use veil_tests::{Sandbox, output_within};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Each sandbox's connection limit: small, so a sandbox reaches it with a few connections.
const LIMIT: u32 = 2;

/// The attacker's (and the unlucky victim's) steps, in one program run inside a sandbox:
/// - `fill`: hold `limit` connections to the greeting server (each greeted, so admitted);
/// - `drop`: one more from `127.0.0.1:port` to the TLS upstream, which the agent closes over the
///   limit; then close it (`close`) or reset it (`linger0`);
/// - `hijack`: from the same port, dial `127.0.0.1:victim` straight, speak TLS for `host` and
///   send a request carrying `placeholder`; report whether anything was served.
///
/// Prints one JSON object; never anything the upstream or veil sent beyond the status line.
const SCRIPT: &str = r#"
import json, socket, ssl, struct, sys
cfg = json.loads(sys.argv[1])
def addr(s):
    h, p = s.rsplit(":", 1)
    return (h, int(p))
def bound():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", cfg["port"]))
    s.settimeout(10)
    return s
out = {}
held = []
if "fill" in cfg["steps"]:
    for _ in range(cfg["limit"]):
        s = socket.create_connection(addr(cfg["hello"]), timeout=10)
        out.setdefault("greeted", 0)
        out["greeted"] += 1 if s.recv(64) else 0
        held.append(s)
if "drop" in cfg["steps"]:
    s = bound()
    s.connect(addr(cfg["up"]))
    try:
        out["dropped"] = s.recv(1) == b""
    except OSError:
        out["dropped"] = True
    if cfg["close"] == "linger0":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
if "hijack" in cfg["steps"]:
    t = bound()
    t.connect(("127.0.0.1", cfg["victim"]))
    ctx = ssl.create_default_context(cafile=cfg["cafile"])
    out["served"] = False
    try:
        tls = ctx.wrap_socket(t, server_hostname=cfg["host"])
        req = "GET /steal HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n" % (cfg["authority"], cfg["placeholder"])
        tls.sendall(req.encode())
        head = tls.recv(4096)
        out["served"] = bool(head)
        out["status"] = head.split(b"\r\n", 1)[0].decode(errors="replace")
    except (OSError, ssl.SSLError) as e:
        out["error"] = type(e).__name__
for s in held:
    s.close()
print(json.dumps(out))
"#;

fn pod() -> Pod {
    Pod::start(AgentOptions {
        extra_config: format!("max_connections_per_sandbox = {LIMIT}"),
        ..AgentOptions::default()
    })
}

/// Runs [`SCRIPT`] in `sandbox` with `steps`, reusing local `port`; returns its JSON.
fn run(pod: &Pod, sandbox: &Sandbox, steps: &[&str], close: &str, port: u16) -> Value {
    let (victim, _) = pod.listener_ports("pod-b");
    let cfg = json!({
        "steps": steps,
        "limit": LIMIT,
        "hello": pod.hello.addr().to_string(),
        "up": pod.up.addr().to_string(),
        "port": port,
        "close": close,
        "victim": victim,
        "host": HOST,
        "authority": format!("{HOST}:{}", pod.up.addr().port()),
        "placeholder": pod.b_placeholder(),
        "cafile": pod.bundle(),
    });
    let mut cmd = sandbox.command("python3");
    cmd.arg("-c").arg(SCRIPT).arg(cfg.to_string());
    let out = output_within(&mut cmd, TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "attack script failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The verdict shared by every attack: nothing was served as B, and B's value never left.
fn assert_not_served_as_b(pod: &Pod, report: &Value) {
    assert!(
        !pod.upstream_saw_b_value(),
        "A was served as B: the upstream received B's value through A's connection ({report})"
    );
    assert_eq!(
        report["served"], false,
        "the hijacked connection was served: {report}"
    );
}

/// A local port from outside the ephemeral range, fresh for each test.
fn port(n: u16) -> u16 {
    20000 + (std::process::id() % 5000) as u16 * 2 + n
}

#[test]
fn over_the_limit_then_the_same_port_straight_to_the_other_sandboxs_listener() {
    let pod = pod();
    let report = run(&pod, &pod.a, &["fill", "drop", "hijack"], "close", port(0));
    assert_eq!(
        report["greeted"], LIMIT,
        "A did not reach its limit: {report}"
    );
    assert_eq!(
        report["dropped"], true,
        "not dropped over the limit: {report}"
    );
    assert_not_served_as_b(&pod, &report);
}

#[test]
fn a_reset_over_the_limit_then_the_same_port_straight_to_the_other_sandboxs_listener() {
    let pod = pod();
    let report = run(
        &pod,
        &pod.a,
        &["fill", "drop", "hijack"],
        "linger0",
        port(1),
    );
    assert_eq!(
        report["dropped"], true,
        "not dropped over the limit: {report}"
    );
    assert_not_served_as_b(&pod, &report);
}

#[test]
fn the_other_sandboxs_dropped_connection_is_not_replayed_from_its_own_port() {
    let pod = pod();
    // B, busy, has one connection dropped over its limit: an accident, not an attack.
    let victim = run(&pod, &pod.b, &["fill", "drop"], "close", port(2));
    assert_eq!(
        victim["dropped"], true,
        "not dropped over the limit: {victim}"
    );
    // A saw B's port (the pod shares /proc/net/tcp) and replays B's exact four-tuple.
    let report = run(&pod, &pod.a, &["hijack"], "close", port(2));
    assert_not_served_as_b(&pod, &report);
}

#[test]
fn both_sandboxes_are_still_served_as_themselves() {
    let pod = pod();
    // Each sandbox's own redirected connection is served, and as itself: B's value goes out
    // from B only.
    let script = r#"
import json, socket, ssl, sys
cfg = json.loads(sys.argv[1])
h, p = cfg["up"].rsplit(":", 1)
ctx = ssl.create_default_context(cafile=cfg["cafile"])
t = ctx.wrap_socket(socket.create_connection((h, int(p)), timeout=10), server_hostname=cfg["host"])
t.sendall(("GET /own HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n" % (cfg["authority"], cfg["placeholder"])).encode())
print(json.dumps({"status": t.recv(4096).split(b"\r\n", 1)[0].decode()}))
"#;
    let cfg = json!({
        "up": pod.up.addr().to_string(),
        "cafile": pod.bundle(),
        "host": HOST,
        "authority": format!("{HOST}:{}", pod.up.addr().port()),
        "placeholder": pod.b_placeholder(),
    });
    for (sandbox, gets_value) in [(&pod.a, false), (&pod.b, true)] {
        let mut cmd = sandbox.command("python3");
        cmd.arg("-c").arg(script).arg(cfg.to_string());
        let out = output_within(&mut cmd, TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("200"), "{stdout}");
        assert_eq!(pod.upstream_saw_b_value(), gets_value, "{stdout}");
    }
}
