//! The intercept world most e2e scenarios start from: a [`World`] with a TLS upstream (signed by
//! a test CA) for the hosts secrets allow, a [`Veil`] (control + agent trusting that CA), secrets
//! created through the REST API, sandboxes (own netns, the test names resolving to the world)
//! registered with mounts, and the client CA bundle (the agent's CA from the PUT answer plus the
//! test CA) that clients in those sandboxes trust.
//!
//! ```no_run
//! use veil_tests::intercept_world::InterceptWorld;
//!
//! let mut w = InterceptWorld::builder("my test CA", &["api.allowed.test"]).start();
//! let key = w.secret("upstream-key", &["api.allowed.test"], serde_json::json!({}));
//! let sb = w.add_sandbox("app", &[("MY_KEY", "upstream-key")]);
//! let (ok, _) = w.curl(sb, &[&w.url("api.allowed.test", "/")], &[&key]);
//! assert!(ok);
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::adversary::Adversary;
use crate::agent::AgentOptions;
use crate::control::{free_port, random_token};
use crate::decoding::DecodingUpstream;
use crate::{
    AgentSandbox, HttpsUpstream, NetNs, Sandbox, Seen, TestCa, Veil, World, output_within,
    require_root,
};

/// Bound on each client run.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `cmd` (bounded by [`TIMEOUT`]); its success and stdout + stderr as (lossy) text.
pub fn run_text(cmd: &mut Command) -> (bool, String) {
    let out = output_within(cmd, TIMEOUT);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// An upstream server the world can point clients at.
pub trait Upstream {
    /// Where it listens (in the world's namespace).
    fn addr(&self) -> SocketAddr;
}

impl Upstream for HttpsUpstream {
    fn addr(&self) -> SocketAddr {
        HttpsUpstream::addr(self)
    }
}

impl Upstream for Adversary {
    fn addr(&self) -> SocketAddr {
        Adversary::addr(self)
    }
}

impl Upstream for DecodingUpstream {
    fn addr(&self) -> SocketAddr {
        DecodingUpstream::addr(self)
    }
}

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

/// How to build an [`InterceptWorld`]; see [`InterceptWorld::builder`].
#[derive(Debug)]
pub struct Builder<'a> {
    ca_name: &'a str,
    names: &'a [&'a str],
    resolve: Vec<&'a str>,
    metrics: bool,
    config: String,
    control_config: String,
}

impl<'a> Builder<'a> {
    /// Also resolve `names` to the world in every sandbox (for upstreams the test starts itself).
    pub fn resolve(mut self, names: &[&'a str]) -> Self {
        self.resolve.extend_from_slice(names);
        self
    }

    /// Serve the agent's metrics on a loopback port (read with [`InterceptWorld::counter`]).
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// Append `lines` to the agent's config.
    pub fn config(mut self, lines: &str) -> Self {
        self.config.push_str(lines);
        self
    }

    /// Append `lines` to veil-control's config (top level).
    pub fn control_config(mut self, lines: &str) -> Self {
        self.control_config.push_str(lines);
        self
    }

    /// Starts it all with an [`HttpsUpstream`] answering for the names.
    pub fn start(self) -> InterceptWorld<HttpsUpstream> {
        self.start_with(HttpsUpstream::start)
    }

    /// Starts it all with the upstream `start` returns, given the world's namespace, the
    /// upstream address, the test CA and the names.
    pub fn start_with<U: Upstream>(
        self,
        start: impl FnOnce(&NetNs, IpAddr, &TestCa, &[&str]) -> U,
    ) -> InterceptWorld<U> {
        require_root();
        let world = World::new();
        let ca = TestCa::new(self.ca_name);
        let ip: IpAddr = world.upstream_v4().into();
        let up = start(world.netns(), ip, &ca, self.names);
        let metrics_port = self.metrics.then(free_port);
        let veil = Veil::start_with_control(
            AgentOptions {
                args: vec!["--upstream-ca".into(), ca.pem_path().into()],
                metrics_listen: metrics_port.map(|port| ([127, 0, 0, 1], port).into()),
                extra_config: self.config,
                ..AgentOptions::default()
            },
            &self.control_config,
            &[],
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bundle.pem");
        let mut hosts: Vec<String> = self.names.iter().map(|n| (*n).to_owned()).collect();
        hosts.extend(self.resolve.iter().map(|n| (*n).to_owned()));
        InterceptWorld {
            world,
            ca,
            up,
            veil,
            metrics_port,
            bundle,
            dir,
            hosts,
            answers: Vec::new(),
            _ns: Vec::new(),
            sandboxes: Vec::new(),
        }
    }
}

/// A world with a TLS upstream, veil, and sandboxes registered through the API.
#[derive(Debug)]
pub struct InterceptWorld<U = HttpsUpstream> {
    /// The world the upstream runs in.
    pub world: World,
    /// The CA the upstream's certificates chain to (the agent trusts it).
    pub ca: TestCa,
    /// The upstream.
    pub up: U,
    /// veil-control and veil-agent.
    pub veil: Veil,
    metrics_port: Option<u16>,
    /// The CA bundle clients in the sandboxes trust (the agent's CA and the test CA).
    pub bundle: PathBuf,
    dir: tempfile::TempDir,
    hosts: Vec<String>,
    answers: Vec<Value>,
    _ns: Vec<NetNs>,
    /// The sandboxes, by the index [`InterceptWorld::add_sandbox`] returned.
    pub sandboxes: Vec<Sandbox>,
}

impl InterceptWorld {
    /// A builder: the upstream answers for `names` with certificates from a CA called `ca_name`.
    pub fn builder<'a>(ca_name: &'a str, names: &'a [&'a str]) -> Builder<'a> {
        Builder {
            ca_name,
            names,
            resolve: Vec::new(),
            metrics: false,
            config: String::new(),
            control_config: String::new(),
        }
    }

    /// The requests the upstream saw, as summaries that never print a value.
    pub fn seen(&self) -> Vec<Seen> {
        self.up.seen()
    }
}

impl<U: Upstream> InterceptWorld<U> {
    /// Creates a secret with a random value through the API; `extra` fields are merged in.
    pub fn secret(&self, name: &str, hosts: &[&str], extra: Value) -> Secret {
        let value = format!("sk-test-{}", random_token(40));
        self.secret_valued(name, value, hosts, extra)
    }

    /// Creates a secret holding `value` through the API; `extra` fields are merged in.
    pub fn secret_valued(&self, name: &str, value: String, hosts: &[&str], extra: Value) -> Secret {
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

    /// A sandbox (own netns, the test names resolving to the world) registered with `mounts`
    /// (ENV, secret name); writes the client CA bundle from the PUT answer.
    pub fn add_sandbox(&mut self, id: &str, mounts: &[(&str, &str)]) -> usize {
        let ns = NetNs::new(id);
        let ip: IpAddr = self.world.upstream_v4().into();
        let hosts: Vec<(&str, IpAddr)> = self.hosts.iter().map(|h| (h.as_str(), ip)).collect();
        let sb = Sandbox::new(id, Some(&ns)).with_hosts(&hosts);
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
            .unwrap_or_else(|| {
                let keys: Vec<&String> = answer
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k)
                    .collect();
                panic!("PUT answer carries no CA certificate: keys {keys:?}")
            });
        let test_ca = std::fs::read_to_string(self.ca.pem_path()).expect("test CA");
        std::fs::write(&self.bundle, format!("{agent_ca}\n{test_ca}")).expect("bundle");
        self.answers.push(answer);
        self._ns.push(ns);
        self.sandboxes.push(sb);
        self.sandboxes.len() - 1
    }

    /// The loopback port of the agent's metrics endpoint (with [`Builder::metrics`]).
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_port
    }

    /// The PUT answer that registered sandbox `i` (its `env` carries the placeholders).
    pub fn answer(&self, i: usize) -> &Value {
        &self.answers[i]
    }

    /// `https://host:port/path` of the upstream.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.up.addr().port())
    }

    /// A command running `program` in sandbox `i`, with every client's CA trust set to the
    /// bundle (curl, Python ssl/requests, Node).
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut cmd = self.sandboxes[i].command(program);
        cmd.env("SSL_CERT_FILE", &self.bundle)
            .env("REQUESTS_CA_BUNDLE", &self.bundle)
            .env("CURL_CA_BUNDLE", &self.bundle)
            .env("NODE_EXTRA_CA_CERTS", &self.bundle);
        cmd
    }

    /// Runs curl in sandbox `i`; (success, stdout + stderr with every value in `redact`
    /// replaced).
    pub fn curl(&self, i: usize, args: &[&str], redact: &[&Secret]) -> (bool, String) {
        let mut cmd = self.sandboxes[i].command("curl");
        cmd.args(["-sS", "--max-time", "30"])
            .args(args)
            .env("CURL_CA_BUNDLE", &self.bundle);
        let (ok, mut text) = run_text(&mut cmd);
        for s in redact {
            text = text.replace(&s.value, "<VALUE!>");
        }
        (ok, text)
    }

    /// A directory for the test's own files, removed with the world.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `body` to a file the sandbox can read (for `--data-binary @file`).
    pub fn body_file(&self, name: &str, body: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, body).expect("body file");
        path.display().to_string()
    }

    /// Value of `veil_agent_<name>_total` on the agent's metrics endpoint (needs
    /// [`Builder::metrics`]).
    pub fn counter(&self, name: &str) -> f64 {
        let text = self.metrics_text();
        let metric = format!("veil_agent_{name}_total ");
        text.lines()
            .find_map(|l| l.strip_prefix(&metric))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {metric} in:\n{text}"))
    }

    /// The agent's metrics page (needs [`Builder::metrics`]).
    pub fn metrics_text(&self) -> String {
        let port = self
            .metrics_port
            .expect("the world was built without .metrics()");
        self.veil.block_on(async move {
            reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
                .await
                .expect("scrape")
                .text()
                .await
                .expect("metrics body")
        })
    }
}
