//! Adversarial: a sandbox tries to bind, through veil-agent's local socket, itself or another
//! declared sandbox (whose secrets it would then be given), and a host tool is handed paths a
//! sandbox controls. Run as the attacker would: a process inside a bound sandbox (its cgroup and
//! netns) that drops to uid nobody, speaking the local protocol itself.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;
use veil_link::{LocalRequest, LocalResponse, RefusalKind};
use veil_tests::bind::{Container, declare, get, local, pins_dir, refusal, write_bundle};
use veil_tests::intercept_world::{InterceptWorld, run_text};
use veil_tests::sandbox_map_has;

const ALLOWED: &str = "api.allowed.test";

/// Drops to nobody, then sends one local request (argv[2], JSON) to the socket argv[1]; prints
/// `errno=N` if it cannot connect, else the answer.
const ATTACKER: &str = r#"
import json, os, socket, struct, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("uid=%d errno=%d" % (os.geteuid(), e.errno)); sys.exit(0)
body = sys.argv[2].encode()
try:
    s.sendall(struct.pack(">I", len(body)) + body)
except (BrokenPipeError, ConnectionResetError):
    pass  # refused before the request was read: the answer is still there to read
head = b""
while len(head) < 4:
    chunk = s.recv(4 - len(head))
    if not chunk:
        print("uid=%d closed" % os.geteuid()); sys.exit(0)
    head += chunk
n = struct.unpack(">I", head)[0]
data = b""
while len(data) < n:
    chunk = s.recv(n - len(data))
    if not chunk:
        break
    data += chunk
print("uid=%d answer=%s" % (os.geteuid(), data.decode()))
"#;

/// The attacker's bound sandbox, and a declared sandbox ("victim", of the same organization,
/// not bound, mounting the secret) it wants.
struct Setup {
    w: InterceptWorld,
    /// The attacker's own sandbox: declared, bound; processes run in it.
    c: Container,
    script: PathBuf,
}

fn setup() -> Setup {
    let w = InterceptWorld::builder("adversarial bind CA", &[ALLOWED]).start();
    let key = w.secret("upstream-key", &[ALLOWED], json!({}));
    declare(&w.veil, "attacker", &[], false);
    let declared = declare(&w.veil, "victim", &[("MY_KEY", "upstream-key")], false);
    assert_eq!(declared["env"]["MY_KEY"], key.placeholder.as_str());
    let c = Container::new(&w, "attacker", &[ALLOWED]);
    let LocalResponse::Bound(d) = local(&w.veil, &c.bind_request("attacker")) else {
        panic!("binding the attacker's sandbox");
    };
    write_bundle(&w, &d.ca_pem);
    let script = w.scratch().join("attacker.py");
    std::fs::write(&script, ATTACKER).expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(w.scratch(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Setup { w, c, script }
}

impl Setup {
    /// Runs the attacker script in the sandbox against `socket` with `request`.
    fn attack(&self, socket: &Path, request: &LocalRequest) -> String {
        let body = serde_json::to_string(request).expect("request");
        let mut cmd = self.c.sandbox.command("/usr/bin/python3");
        cmd.arg(&self.script).arg(socket).arg(body);
        let (ok, out) = run_text(&mut cmd);
        assert!(ok, "attacker script failed: {out}");
        out.trim().to_owned()
    }

    /// The requests an attacker would send: bind the victim (or itself again) to its own
    /// cgroup and netns.
    fn binds(&self) -> Vec<LocalRequest> {
        vec![
            self.c.bind_request("victim"),
            LocalRequest::Unbind {
                sandbox: "attacker".parse().expect("id"),
            },
            LocalRequest::Describe {
                sandbox: "victim".parse().expect("id"),
            },
        ]
    }

    fn assert_unchanged(&self) {
        let veil = &self.w.veil;
        let (status, victim) = get(veil, "victim");
        assert_eq!(status, 200);
        assert_eq!(victim["bound"], false, "the sandbox bound the victim");
        assert_eq!(
            get(veil, "attacker").1["bound"],
            true,
            "the sandbox unbound itself"
        );
        assert!(
            !pins_dir(veil).join("victim").exists(),
            "a pin was made for the victim"
        );
        assert!(sandbox_map_has(self.c.sandbox.cgroup().id()));
    }
}

#[test]
fn a_sandbox_cannot_reach_the_local_socket() {
    let s = setup();
    let socket = s.w.veil.agent().local_socket();
    for request in s.binds() {
        let out = s.attack(&socket, &request);
        // EACCES: the 0700 directory and the 0600 socket keep it from even connecting.
        assert_eq!(out, "uid=65534 errno=13", "{request:?}: {out}");
    }
    s.assert_unchanged();
}

#[test]
fn an_opened_socket_still_refuses_other_users() {
    let s = setup();
    let socket = s.w.veil.agent().local_socket();
    // A misconfigured host opened the modes: only the peer-credential check stands in the way.
    let dir = socket.parent().expect("dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    for request in s.binds() {
        let out = s.attack(&socket, &request);
        let answer = out
            .strip_prefix("uid=65534 answer=")
            .unwrap_or_else(|| panic!("{request:?}: {out}"));
        let answer: LocalResponse = serde_json::from_str(answer).expect("an answer");
        assert_eq!(
            refusal(&answer),
            RefusalKind::BadRequest,
            "{request:?} from uid nobody was not refused: {answer:?}"
        );
    }
    s.assert_unchanged();
}

#[test]
fn a_regular_file_is_no_netns() {
    let s = setup();
    // A file the sandbox wrote, handed to the host tool as the container's netns.
    let planted = s.w.scratch().join("planted-netns");
    std::fs::write(&planted, b"").expect("planted");
    let request = LocalRequest::Bind {
        sandbox: "victim".parse().expect("id"),
        cgroup: s.c.sandbox.cgroup().relative().into(),
        netns: Some(planted.clone()),
    };
    let answer = local(&s.w.veil, &request);
    assert_eq!(refusal(&answer), RefusalKind::BadTarget, "{answer:?}");
    let LocalResponse::Refused { message, .. } = &answer else {
        unreachable!()
    };
    assert!(
        message.contains("not a namespace file"),
        "the agent pinned a planted file before control refused it: {message}"
    );
    assert!(!pins_dir(&s.w.veil).join("victim").exists());
    s.assert_unchanged();
}

#[test]
fn a_cgroup_path_with_dotdot_is_refused() {
    let s = setup();
    let own = s.c.sandbox.cgroup().relative();
    // Climbs out of the allowed parent to a cgroup the sandbox does not own.
    for cgroup in [
        format!("{own}/../../init.scope"),
        "/veil-test.slice/../init.scope".to_owned(),
        format!("{own}/./"),
    ] {
        let request = LocalRequest::Bind {
            sandbox: "victim".parse().expect("id"),
            cgroup: cgroup.clone().into(),
            netns: None,
        };
        let answer = local(&s.w.veil, &request);
        assert_eq!(
            refusal(&answer),
            RefusalKind::BadTarget,
            "{cgroup}: {answer:?}"
        );
        let LocalResponse::Refused { message, .. } = &answer else {
            unreachable!()
        };
        assert!(
            message.contains("under the cgroup2 root without '.' or '..'"),
            "{cgroup}: the agent did not refuse the path itself: {message}"
        );
    }
    s.assert_unchanged();
}
