//! Issue 17: a fleet of sandbox hosts. Agents of enrolled hosts connect to veil-control
//! replicas on one PostgreSQL over mutual TLS; a secret created through one replica is
//! substituted for a sandbox on a host whose agent is connected to the other; a rotation is
//! acknowledged by every agent that mounts it and by no other; `kill -9` of a replica moves
//! its agents to the other while sandbox traffic continues; bad agent configs exit 2.
//! Two "hosts" = two agents with their own pin dirs, state dirs and certificates, sandboxes in
//! their own netns and cgroups. Values are compared, never printed.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use veil_tests::agent::{Agent, AgentOptions};
use veil_tests::cmd::wait_until;
use veil_tests::control::random_token;
use veil_tests::fleet::{HostCreds, Replica};
use veil_tests::intercept_world::run_text;
use veil_tests::postgres::Postgres;
use veil_tests::{HttpsUpstream, NetNs, Sandbox, TestCa, World, cgroup2_mount, require_root};

const HOST: &str = "api.fleet.test";
const ORG: &str = "fleet-e2e";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The upstream world and the CA its certificates chain to.
struct Upstream {
    world: World,
    ca: TestCa,
    up: HttpsUpstream,
}

impl Upstream {
    fn start() -> Upstream {
        require_root();
        let world = World::new();
        let ca = TestCa::new("fleet test CA");
        let ip: IpAddr = world.upstream_v4().into();
        let up = HttpsUpstream::start(world.netns(), ip, &ca, &[HOST]);
        Upstream { world, ca, up }
    }

    fn ip(&self) -> IpAddr {
        self.world.upstream_v4().into()
    }
}

/// A host's agent reaching `urls`, trusting the upstream's CA.
fn host_agent(creds: &HostCreds, urls: &[String], up: &Upstream) -> Agent {
    let options = AgentOptions {
        args: vec!["--upstream-ca".into(), up.ca.pem_path().into()],
        ..creds.agent_options(urls, None)
    };
    let agent = Agent::start_with(options);
    let linked = wait_until(Duration::from_secs(20), || {
        agent.log().contains("in sync with control")
    });
    assert!(linked, "host agent never linked:\n{}", agent.log_tail(30));
    agent
}

fn agent_id(agent: &Agent) -> String {
    let log = agent.log();
    let at = log.find("agent_id=").expect("agent id in the log") + "agent_id=".len();
    log[at..at + 32].to_owned()
}

/// Waits until `fleet hosts` shows an agent of `host` connected.
fn wait_connected(replica: &Replica, host: &str) {
    let ok =
        wait_until(Duration::from_secs(10), || {
            replica.hosts().as_array().into_iter().flatten().any(|h| {
                h["host"] == host && h["connected"].as_array().is_some_and(|c| !c.is_empty())
            })
        });
    assert!(ok, "{host} never showed connected: {}", replica.hosts());
}

/// A sandbox of a host: its netns, cgroup and the PUT answer.
struct HostSandbox {
    _ns: NetNs,
    sb: Sandbox,
    answer: Value,
    bundle: tempfile::NamedTempFile,
}

fn put_sandbox(
    replica: &Replica,
    key: &str,
    id: &str,
    host: &str,
    mounts: &[(&str, &str)],
    up: &Upstream,
) -> HostSandbox {
    let ns = NetNs::new(id);
    let sb = Sandbox::new(id, Some(&ns)).with_hosts(&[(HOST, up.ip())]);
    let cgroup = sb
        .cgroup()
        .path()
        .strip_prefix(cgroup2_mount())
        .expect("cgroup under the mount")
        .to_string_lossy()
        .into_owned();
    let secrets: Vec<Value> = mounts
        .iter()
        .map(|(env, name)| json!({ *env: name }))
        .collect();
    let body = json!({"cgroup": cgroup, "netns": ns.path(), "host": host, "secrets": secrets,
                      "egress": veil_tests::egress::for_netns(Some(ns.path()))});
    let (status, answer) = rt().block_on(replica.control.api().put(
        &format!("/sandbox/{id}"),
        key,
        body,
    ));
    assert_eq!(status, 200, "PUT {id} on {host}: {answer}");
    let ca = answer["caCertificate"]
        .as_str()
        .unwrap_or_else(|| panic!("the PUT answer carries no CA for {host}: {answer}"));
    let test_ca = std::fs::read_to_string(up.ca.pem_path()).expect("test CA");
    let bundle = tempfile::NamedTempFile::new().expect("bundle");
    std::fs::write(bundle.path(), format!("{ca}\n{test_ca}")).expect("bundle");
    HostSandbox {
        _ns: ns,
        sb,
        answer,
        bundle,
    }
}

impl HostSandbox {
    /// The header value the upstream saw for a request with the placeholder of `env`.
    fn carried(&self, up: &Upstream, env: &str, n: usize) -> Option<String> {
        let placeholder = self.answer["env"][env].as_str().expect("placeholder");
        let path = format!("/fleet/{n}");
        let url = format!("https://{HOST}:{}{path}", up.up.addr().port());
        let mut cmd = self.sb.command("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "20",
            "-H",
            &format!("x-api-key: {placeholder}"),
            &url,
        ])
        .env("CURL_CA_BUNDLE", self.bundle.path());
        let (ok, _) = run_text(&mut cmd);
        if !ok {
            return None;
        }
        up.up
            .seen()
            .iter()
            .rev()
            .find(|s| s.target == path)
            .and_then(|s| s.header("x-api-key").map(str::to_owned))
    }
}

#[test]
fn a_secret_made_through_one_replica_is_substituted_on_a_host_linked_to_the_other() {
    let up = Upstream::start();
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let b = Replica::other(&pg, &a.control.data_dir);
    let dir = tempfile::tempdir().expect("tempdir");
    let h1 = a.enroll("host-one", dir.path());
    let h2 = a.enroll("host-two", dir.path());
    let agent1 = host_agent(&h1, &[a.url()], &up);
    let agent2 = host_agent(&h2, &[b.url()], &up);
    wait_connected(&a, "host-one");
    wait_connected(&a, "host-two");
    let key = a.control.apikey(ORG, &["admin"]);
    let rt = rt();
    let first = format!("fleet-v1-{}", random_token(32));
    let created = rt.block_on(a.control.api().post(
        "/secret",
        &key,
        json!({"name": "fleet-key", "value": first, "hosts": [HOST]}),
    ));
    assert_eq!(created.0, 201, "{}", created.1);
    let id = created.1["id"].as_str().expect("id").to_owned();
    // Host 2's sandbox, registered through the replica its agent is linked to.
    let sb2 = put_sandbox(
        &b,
        &key,
        "fleet-sb2",
        "host-two",
        &[("MY_KEY", "fleet-key")],
        &up,
    );
    assert_eq!(sb2.answer["host"], "host-two");
    assert!(
        sb2.carried(&up, "MY_KEY", 0).as_deref() == Some(first.as_str()),
        "host 2's agent did not substitute the secret created through replica A"
    );
    // Rotated through B, waiting: acknowledged by host 2's agent, the only one that mounts it.
    let second = format!("fleet-v2-{}", random_token(32));
    let rotated = rt.block_on(b.control.api().patch(
        &format!("/secret/{id}?wait=10s"),
        &key,
        json!({"value": second}),
    ));
    assert_eq!(rotated.0, 200, "{}", rotated.1);
    let revision = rotated.1["revision"].clone();
    let agents: Vec<(String, Value)> = rotated.1["propagation"]["agents"]
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| {
            (
                a["agentId"].as_str().unwrap_or_default().to_owned(),
                a["acknowledgedRevision"].clone(),
            )
        })
        .collect();
    assert_eq!(
        agents,
        vec![(agent_id(&agent2), revision)],
        "the rotation's acknowledgements are not exactly host 2's agent's"
    );
    // Host 1's agent never holds host 2's secret: control never sent it (propagation lists
    // every agent it sent the secret to), through either replica.
    let via_a = rt.block_on(a.control.api().get(&format!("/secret/{id}"), &key));
    let one = agent_id(&agent1);
    assert!(
        !via_a.1["propagation"].to_string().contains(&one),
        "host 1's agent is listed as holding host 2's secret"
    );
    let mut n = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            n += 1;
            sb2.carried(&up, "MY_KEY", n).as_deref() == Some(second.as_str())
        }),
        "host 2's agent never substituted the rotated value"
    );
    // A partitioned host (its agent stopped): the wait answers 504 naming the host.
    agent2.signal(libc::SIGSTOP);
    let third = format!("fleet-v3-{}", random_token(32));
    let waited = rt.block_on(b.control.api().patch(
        &format!("/secret/{id}?wait=2s"),
        &key,
        json!({"value": third}),
    ));
    agent2.signal(libc::SIGCONT);
    assert_eq!(waited.0, 504, "{}", waited.1);
    let message = waited.1["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("{} (host host-two)", agent_id(&agent2))),
        "the 504 does not name the partitioned host: {message}"
    );
    // The hosts list shows both agents on their replicas.
    let hosts = a.hosts();
    assert_eq!(hosts.as_array().map(Vec::len), Some(2), "{hosts}");
    drop(agent1);
}

#[test]
fn kill_9_of_a_replica_moves_its_agents_to_the_other_and_traffic_continues() {
    let up = Upstream::start();
    let pg = Postgres::start();
    let mut a = Replica::first(&pg);
    let b = Replica::other(&pg, &a.control.data_dir);
    let dir = tempfile::tempdir().expect("tempdir");
    let h = a.enroll("host-moving", dir.path());
    let agent = host_agent(&h, &[a.url(), b.url()], &up);
    wait_connected(&a, "host-moving");
    let key = a.control.apikey(ORG, &["admin"]);
    let rt = rt();
    let first = format!("move-v1-{}", random_token(32));
    let created = rt.block_on(a.control.api().post(
        "/secret",
        &key,
        json!({"name": "move-key", "value": first, "hosts": [HOST]}),
    ));
    assert_eq!(created.0, 201, "{}", created.1);
    let id = created.1["id"].as_str().expect("id").to_owned();
    let sb = put_sandbox(
        &a,
        &key,
        "fleet-move",
        "host-moving",
        &[("MY_KEY", "move-key")],
        &up,
    );
    assert!(
        sb.carried(&up, "MY_KEY", 0).as_deref() == Some(first.as_str()),
        "not substituted"
    );
    let on_b = format!("connected to control control={}", b.url());
    assert!(!agent.log().contains(&on_b), "the agent started on B");
    a.control.kill();
    let moved = wait_until(Duration::from_secs(5), || agent.log().contains(&on_b));
    assert!(
        moved,
        "the agent was not on B within 5 s:\n{}",
        agent.log_tail(20)
    );
    // Traffic continues, and B now drives the host: a rotation through B reaches it.
    assert!(
        sb.carried(&up, "MY_KEY", 1).as_deref() == Some(first.as_str()),
        "sandbox traffic stopped with replica A"
    );
    let second = format!("move-v2-{}", random_token(32));
    let rotated = rt.block_on(b.control.api().patch(
        &format!("/secret/{id}?wait=10s"),
        &key,
        json!({"value": second}),
    ));
    assert_eq!(rotated.0, 200, "{}", rotated.1);
    assert!(
        sb.carried(&up, "MY_KEY", 2).as_deref() == Some(second.as_str()),
        "the rotation through B did not reach the moved agent"
    );
}

fn agent_config_error(dir: &Path, text: &str) -> (Option<i32>, String) {
    let config = dir.join(format!("agent-{}.toml", random_token(6)));
    std::fs::write(&config, text).expect("config");
    // A config error is refused before the agent touches the host: no state dir, no pins.
    let (state, pins) = (dir.join("state-never-made"), dir.join("pins-never-made"));
    let out = std::process::Command::new(veil_tests::bin_path("veil-agent"))
        .args(["--config", config.to_str().expect("utf-8")])
        .arg("--state-dir")
        .arg(&state)
        .arg("--pin-dir")
        .arg(&pins)
        .output()
        .expect("run veil-agent");
    assert!(
        !state.exists() && !pins.exists(),
        "a refused config left a state dir or pins"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_socket_and_urls_together_or_urls_without_certificates_exit_2() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = "control_cert = \"/nonexistent/host.pem\"\ncontrol_key = \"/nonexistent/host.key\"\n\
               control_ca = \"/nonexistent/fleet-ca.pem\"\n";
    let (code, err) = agent_config_error(
        dir.path(),
        &format!(
            "[agent]\ncontrol_socket = \"/run/other.sock\"\ncontrol_urls = [\"c1:3901\"]\n{tls}"
        ),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("control_socket") && err.contains("control_urls"),
        "{err}"
    );
    let (code, err) = agent_config_error(dir.path(), "[agent]\ncontrol_urls = [\"c1:3901\"]\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("control_cert"), "{err}");
    // Files that cannot be read are a config error too, naming the key.
    let (code, err) = agent_config_error(
        dir.path(),
        &format!("[agent]\ncontrol_urls = [\"c1:3901\"]\n{tls}"),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("control_ca"), "{err}");
}

#[test]
fn the_fleet_ca_survives_a_rekey_and_its_hosts_stay_admitted() {
    require_root();
    let pg = Postgres::start();
    let mut a = Replica::first(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let before = a.enroll("host-kept", dir.path());
    let ca_before = std::fs::read_to_string(before.ca()).expect("fleet CA");
    let old_key = std::fs::read_to_string(a.control.data_dir.join("keys/active")).expect("active");
    let (config, data) = (
        a.control.config_path().to_str().expect("utf-8").to_owned(),
        a.control.data_dir.to_str().expect("utf-8").to_owned(),
    );
    let out = a
        .control
        .cli(&["rekey", "--config", &config, "--data-dir", &data]);
    assert!(
        out.status.success(),
        "rekey: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_key = std::fs::read_to_string(a.control.data_dir.join("keys/active")).expect("active");
    assert_ne!(old_key, new_key, "the rekey did not switch keys");
    assert!(
        !a.control
            .data_dir
            .join(format!("keys/{}.key", old_key.trim()))
            .exists(),
        "the old key was not retired"
    );
    // The replica restarts (opening the CA with the new key only) and still serves the fleet;
    // enrolling opens the CA key too: the same CA, so existing hosts stay valid.
    a.control.restart();
    let up = wait_until(Duration::from_secs(20), || {
        a.control.log().matches("fleet ready").count() >= 2
    });
    assert!(
        up,
        "the replica did not serve the fleet after the rekey:\n{}",
        a.control.log()
    );
    let after = a.enroll("host-new", dir.path());
    assert_eq!(
        std::fs::read_to_string(after.ca()).expect("fleet CA"),
        ca_before,
        "the fleet CA changed with the rekey"
    );
    let rt = rt();
    let admitted = rt.block_on(veil_tests::fleet::link_connect(
        a.fleet_port,
        veil_tests::fleet::client_tls(&before.ca(), Some((&before.cert(), &before.key()))),
        &veil_tests::fleet::random_agent_id(),
        Duration::from_secs(5),
    ));
    assert!(
        matches!(admitted, veil_tests::fleet::LinkOutcome::Admitted(_)),
        "a host enrolled before the rekey is refused after it"
    );
}
