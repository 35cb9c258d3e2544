//! "Declare, then bind" from the outside: sandboxes declared through the REST API (no cgroup),
//! then bound on the host through the agent's local socket, as a container runtime's hook does.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use veil_link::{LocalRequest, LocalResponse, RefusalKind};

use crate::control::Reply;
use crate::intercept_world::{InterceptWorld, Upstream};
use crate::{NetNs, Sandbox, Veil};

/// How long a local request may take (a bind waits for the agents' acknowledgements).
pub const LOCAL_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `req` to the agent's local socket.
pub fn local(veil: &Veil, req: &LocalRequest) -> LocalResponse {
    local_at(veil, &veil.agent().local_socket(), req)
}

/// Sends `req` to the local socket at `path`.
pub fn local_at(veil: &Veil, path: &Path, req: &LocalRequest) -> LocalResponse {
    veil.block_on(veil_link::local::request(path, req, LOCAL_TIMEOUT))
        .unwrap_or_else(|e| panic!("local request {req:?}: {e}"))
}

/// The refusal kind of `answer`, or a panic naming what came instead.
pub fn refusal(answer: &LocalResponse) -> RefusalKind {
    match answer {
        LocalResponse::Refused { kind, .. } => *kind,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// `PUT /api/sandbox/{id}` with `body`.
pub fn put(veil: &Veil, id: &str, body: Value) -> Reply {
    veil.block_on(veil.api().put(&format!("/sandbox/{id}"), veil.key(), body))
}

/// `GET /api/sandbox/{id}`.
pub fn get(veil: &Veil, id: &str) -> Reply {
    veil.block_on(veil.api().get(&format!("/sandbox/{id}"), veil.key()))
}

/// Declares sandbox `id` (no cgroup) mounting `(ENV, secret name)`; panics unless 200. Its
/// egress is `host`: a [`Container`]'s netns has no way out but veil.
pub fn declare(veil: &Veil, id: &str, mounts: &[(&str, &str)], keep: bool) -> Value {
    let secrets: Vec<Value> = mounts.iter().map(|(e, n)| json!({ *e: n })).collect();
    let body = json!({"secrets": secrets, "keep": keep, "egress": "host"});
    let (status, body) = put(veil, id, body);
    assert_eq!(status, 200, "declaring {id}: {body}");
    body
}

/// A place a container would run in: a fresh cgroup and netns, the world's test names
/// resolving to its upstream; not registered anywhere.
#[derive(Debug)]
pub struct Container {
    /// The sandbox (cgroup + netns); commands run in it.
    pub sandbox: Sandbox,
    /// Its network namespace (outlives the sandbox).
    pub netns: NetNs,
}

impl Container {
    /// A container for `world`'s hosts.
    pub fn new<U: Upstream>(world: &InterceptWorld<U>, tag: &str, hosts: &[&str]) -> Container {
        let netns = NetNs::new(tag);
        let ip: IpAddr = world.world.upstream_v4().into();
        let entries: Vec<(&str, IpAddr)> = hosts.iter().map(|h| (*h, ip)).collect();
        let sandbox = Sandbox::new(tag, Some(&netns)).with_hosts(&entries);
        Container { sandbox, netns }
    }

    /// The Bind request for sandbox `id` here.
    pub fn bind_request(&self, id: &str) -> LocalRequest {
        LocalRequest::Bind {
            sandbox: id.parse().expect("sandbox id"),
            cgroup: PathBuf::from(self.sandbox.cgroup().relative()),
            netns: Some(self.netns.path().to_owned()),
        }
    }

    /// Runs curl here trusting `bundle`; (success, output with `value` redacted).
    pub fn curl(&self, bundle: &Path, args: &[&str], value: &str) -> (bool, String) {
        let mut cmd = self.sandbox.command("curl");
        cmd.args(["-sS", "--max-time", "30"])
            .args(args)
            .env("CURL_CA_BUNDLE", bundle);
        let (ok, text) = crate::intercept_world::run_text(&mut cmd);
        (ok, text.replace(value, "<VALUE!>"))
    }
}

/// Writes the bundle a sandbox's clients trust: the agent's CA `agent_ca` and the test CA.
pub fn write_bundle<U: Upstream>(world: &InterceptWorld<U>, agent_ca: &str) {
    let test_ca = std::fs::read_to_string(world.ca.pem_path()).expect("test CA");
    std::fs::write(&world.bundle, format!("{agent_ca}\n{test_ca}")).expect("bundle");
}

/// The netns pins directory of the agent (beside its local socket).
pub fn pins_dir(veil: &Veil) -> PathBuf {
    veil.agent()
        .local_socket()
        .parent()
        .expect("socket dir")
        .join("netns")
}

/// Whether `path` is a mount point (in /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let wanted = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == wanted))
}

/// Value of the agent's gauge `veil_agent_<name>` (the world needs `.metrics()`).
pub fn gauge<U: Upstream>(world: &InterceptWorld<U>, name: &str) -> f64 {
    let text = world.metrics_text();
    let metric = format!("veil_agent_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&metric))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {metric} in the agent's metrics"))
}

/// Creates the cgroup directory `path` again after it was removed (a restarted container at the
/// same path); its shared parent may be removed meanwhile by another test's cleanup: retried.
pub fn recreate_cgroup(path: &Path) {
    let mut attempts = 0;
    loop {
        match std::fs::create_dir_all(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 10 => attempts += 1,
            Err(e) => panic!("recreating cgroup {}: {e}", path.display()),
        }
    }
}
