//! A pod: two sandboxes sharing one network namespace (as the containers of a Kubernetes pod
//! do), veil serving both, and a TLS upstream that sandbox B's secret allows. The adversarial
//! tests attack B from A, as code running in A would.
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::agent::AgentOptions;
use crate::control::random_token;
use crate::https::{HttpsUpstream, TestCa};
use crate::netns::NetNs;
use crate::sandbox::Sandbox;
use crate::servers::TcpHello;
use crate::veil::Veil;
use crate::world::World;

/// The name B's secret allows (the upstream's certificate is for it).
pub const HOST: &str = "api.pod.test";

/// veil, two sandboxes in one netns, and their upstreams; everything removed on drop.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct Pod {
    // Field order is drop order: veil (agent, control) first, the namespaces last.
    /// veil (control and agent).
    pub veil: Veil,
    /// Sandbox A (no secret for [`HOST`]; one for no test host, so it is redirected): the
    /// attacker.
    pub a: Sandbox,
    /// Sandbox B (a secret for [`HOST`]): the victim.
    pub b: Sandbox,
    /// A TLS upstream for [`HOST`] that records what it receives.
    pub up: HttpsUpstream,
    /// A plain TCP server that greets every connection (to hold connections open).
    pub hello: TcpHello,
    bundle: PathBuf,
    _bundle_dir: tempfile::TempDir,
    b_value: String,
    b_placeholder: String,
    _ca: TestCa,
    netns: NetNs,
    world: World,
}

impl Pod {
    /// Starts it; `options` are the agent's (the upstream CA is added).
    pub fn start(mut options: AgentOptions) -> Pod {
        crate::require_root();
        let world = World::new();
        let netns = NetNs::new("pod");
        // The pod's own way out, as a container runtime gives it.
        world.link_sandbox(&netns);
        let ca = TestCa::new("pod test CA");
        let ip: IpAddr = world.upstream_v4().into();
        let up = HttpsUpstream::start(world.netns(), ip, &ca, &[HOST]);
        let hello = TcpHello::start(world.netns(), ip, "hello");
        options
            .args
            .extend(["--upstream-ca".into(), ca.pem_path().into()]);
        let veil = Veil::start_with(options, &[]);
        let b_value = format!("sk-pod-{}", random_token(40));
        let (status, created) = veil.block_on(veil.api().post(
            "/secret",
            veil.key(),
            json!({"name": "b-key", "value": b_value, "hosts": [HOST]}),
        ));
        assert_eq!(status, 201, "creating B's secret: status {status}");
        let b_placeholder = created["placeholder"]
            .as_str()
            .expect("placeholder")
            .to_owned();
        let a = Sandbox::new("pod-a", Some(&netns));
        let b = Sandbox::new("pod-b", Some(&netns));
        // Redirected like B (its secret allows no test host): a sandbox without any secret
        // would go direct, and the attacks from A need its connections to reach the agent.
        veil.register_redirected(&a.agent_entry("pod-a"));
        let answer = veil.register_with(&b.agent_entry("pod-b"), &[("B_KEY", "b-key")]);
        let bundle_dir = tempfile::Builder::new()
            .prefix(&crate::owner::tempdir_prefix())
            .tempdir()
            .unwrap_or_else(|e| panic!("bundle dir: {e}"));
        let bundle = bundle_dir.path().join("ca.pem");
        let test_ca = std::fs::read_to_string(ca.pem_path()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&bundle, format!("{}\n{test_ca}", ca_pem(&answer)))
            .unwrap_or_else(|e| panic!("writing {}: {e}", bundle.display()));
        Pod {
            veil,
            a,
            b,
            up,
            hello,
            bundle,
            _bundle_dir: bundle_dir,
            b_value,
            b_placeholder,
            _ca: ca,
            netns,
            world,
        }
    }

    /// The pod's network namespace.
    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    /// The upstream world.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// B's placeholder (what B's environment holds; no secret itself).
    pub fn b_placeholder(&self) -> &str {
        &self.b_placeholder
    }

    /// CA bundle trusting veil's interception CA and the upstream's.
    pub fn bundle(&self) -> &Path {
        &self.bundle
    }

    /// Whether any request the upstream received carried B's value anywhere.
    pub fn upstream_saw_b_value(&self) -> bool {
        self.up.seen().iter().any(|s| {
            s.target.contains(&self.b_value)
                || s.body.contains(&self.b_value)
                || s.headers.iter().any(|(_, v)| v.contains(&self.b_value))
        })
    }

    /// The listener ports (v4, v6) the agent recorded for sandbox `id`.
    pub fn listener_ports(&self, id: &str) -> (u16, u16) {
        listener_ports(&self.veil.agent().state_dir(), id)
    }
}

/// The listener ports (v4, v6) an agent with this state dir recorded for sandbox `id`.
pub fn listener_ports(state_dir: &Path, id: &str) -> (u16, u16) {
    let path = state_dir.join("sandboxes.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let sb = v["sandboxes"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no record for {id} in {}", path.display()));
    let port = |k: &str| {
        sb[k]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("{k} of {id}"))
    };
    (port("port_v4"), port("port_v6"))
}

fn ca_pem(answer: &Value) -> String {
    ["caCertificate", "caCert"]
        .iter()
        .find_map(|k| answer[*k].as_str())
        .unwrap_or_else(|| panic!("PUT answer carries no CA certificate"))
        .to_owned()
}
