//! Passthrough reuses its splice pipes across connections (and so across sandboxes): no byte
//! of one connection may ever reach another. Connections that die with bytes in flight (the
//! client resets while the upstream's echo waits in the agent's pipe) alternate with clean
//! echo connections of another sandbox, which must get back exactly what they sent.

use std::time::Duration;

use veil_tests::cmd::run_probe;
use veil_tests::{NetNs, Sandbox, TcpEcho, Veil, World, require_root};

const PROBE: &str = env!("CARGO_BIN_EXE_veil-probe");

/// Connects, sends 2 MiB of `A`, reads nothing, and closes with a reset (linger 0) while the
/// echo is still coming back: the agent's upstream → client pipe holds bytes when it fails.
const ABORTER: &str = r#"
import socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"A" * (2 << 20))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print("done")
"#;

#[test]
fn reset_connections_never_leak_bytes_into_later_connections_of_another_sandbox() {
    require_root();
    let world = World::new();
    let echo = TcpEcho::start(world.netns(), world.upstream_v4().into());
    let ns_a = NetNs::new("pa");
    let ns_b = NetNs::new("pb");
    let _links = (world.link_sandbox(&ns_a), world.link_sandbox(&ns_b));
    let a = Sandbox::new("pa", Some(&ns_a));
    let b = Sandbox::new("pb", Some(&ns_b));
    let veil = Veil::start(&[a.agent_entry("pa"), b.agent_entry("pb")]);
    let addr = echo.addr();

    for round in 0..5 {
        let out = a
            .command("python3")
            .args([
                "-c",
                ABORTER,
                &addr.ip().to_string(),
                &addr.port().to_string(),
                "20",
            ])
            .output()
            .expect("run the aborting client");
        assert!(
            out.status.success(),
            "round {round}: aborting client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut probe = b.command(PROBE);
        probe.args([
            "echo",
            "--addr",
            &addr.to_string(),
            "--conns",
            "40",
            "--bytes",
            "262144",
            "--seed",
            &round.to_string(),
        ]);
        let result = run_probe(&mut probe, Duration::from_secs(60));
        let json = result.expect_ok();
        assert_eq!(json["ok"], 40, "round {round}: {json}");
        assert_eq!(json["failed"], 0, "round {round}: {json}");
    }
    // A reset client may be gone before the agent takes its record ("original destination
    // unknown" is then logged): that is the identify path's business, not this test's.
    drop(veil);
}
