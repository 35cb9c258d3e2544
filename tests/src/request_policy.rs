//! The request-policy world (issue 6): a world with one TLS upstream answering for two names,
//! veil with a body-substitution bound, a metrics endpoint and agent config of the test's
//! choosing, secrets and sandboxes created through the API, and curl run in those sandboxes
//! with the client CA bundle. Shared by the request_* scenario files (body substitution,
//! wrong host, limits, upgrades); their output is redacted, so no value is ever printed.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::agent::AgentOptions;
use crate::control::{free_port, random_token};
use crate::{
    AgentSandbox, HttpsUpstream, NetNs, Sandbox, Seen, TestCa, Veil, World, output_within,
    require_root,
};

/// Bound on each client run.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// The host the tests' secrets allow.
pub const ALLOWED: &str = "api.allowed.test";
/// Another host the upstream answers for, which the secrets do not allow.
pub const OTHER: &str = "other.test";
/// The body bound the tests configure.
pub const BODY_MAX: usize = 4096;

/// A secret as the tests create it.
pub struct Secret {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The value (compare with it; never print it).
    pub value: String,
    /// The placeholder sandboxes see.
    pub placeholder: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value: test output must not carry it.
        f.debug_struct("Secret")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("placeholder", &self.placeholder)
            .finish_non_exhaustive()
    }
}

/// A world with a TLS upstream for both names, veil (agent config `extra`, a metrics endpoint),
/// and sandboxes registered through the API.
#[derive(Debug)]
pub struct Setup {
    /// The world the upstream runs in.
    pub world: World,
    ca: TestCa,
    /// The TLS upstream, for [`ALLOWED`] and [`OTHER`].
    pub up: HttpsUpstream,
    /// veil-control and veil-agent.
    pub veil: Veil,
    metrics_port: u16,
    /// The CA bundle clients in the sandboxes trust (the agent's CA and the test CA).
    pub bundle: PathBuf,
    dir: tempfile::TempDir,
    _ns: Vec<NetNs>,
    /// The sandboxes, by the index [`Setup::add_sandbox`] returned.
    pub sandboxes: Vec<Sandbox>,
}

impl Setup {
    /// Starts it all; `extra` is appended to the agent's config.
    pub fn new(extra: &str) -> Setup {
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
    pub fn secret(&self, name: &str, hosts: &[&str], extra: Value) -> Secret {
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
    pub fn add_sandbox(&mut self, id: &str, mounts: &[(&str, &str)]) -> usize {
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

    /// `https://host:port/path` of the upstream.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.up.addr().port())
    }

    /// Runs curl in sandbox `i`; (success, stdout + stderr with every value in `redact`
    /// replaced).
    pub fn curl(&self, i: usize, args: &[&str], redact: &[&Secret]) -> (bool, String) {
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
    pub fn body_file(&self, name: &str, body: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, body).expect("body file");
        path.display().to_string()
    }

    /// The requests the upstream saw, as (target, body) summaries that never print a value.
    pub fn seen(&self) -> Vec<Seen> {
        self.up.seen()
    }

    /// Value of `veil_agent_<name>_total` on the agent's metrics endpoint.
    pub fn counter(&self, name: &str) -> f64 {
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
pub fn last_for(seen: &[Seen], target: &str) -> Seen {
    seen.iter()
        .rev()
        .find(|s| s.target == target)
        .cloned()
        .unwrap_or_else(|| panic!("the upstream saw no request for {target}"))
}
