//! Protocol upgrades on intercepted connections (issue 6): an upgrade veil does not relay (here
//! h2c; WebSocket is relayed since issue 20, see websocket.rs) is refused with 501 and never
//! reaches the upstream. Real curl in a sandbox, a real TLS upstream.

use serde_json::json;
use veil_tests::request_policy::{ALLOWED, setup};

#[test]
fn other_upgrades_are_refused_on_intercepted_connections() {
    let mut s = setup("");
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
            "Upgrade: h2c",
            "-w",
            "\nstatus=%{http_code}",
            &s.url(ALLOWED, "/ws"),
        ],
        &[&key],
    );
    assert!(ok, "{out}");
    assert!(out.contains("status=501"), "{out}");
    assert!(out.contains("Upgrade is not supported"), "{out}");
    assert_eq!(s.seen().len(), before, "nothing reached the upstream");
    assert!(s.counter("upgrade_refused") >= 1.0);
}
