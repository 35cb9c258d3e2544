//! veil-control's side of the agent link, against a fake agent (a real Unix-socket client
//! speaking veil-link): synchronous registration, timeouts, rollback, snapshot and pushes, peer
//! credentials, host-path checks. Needs root (real cgroups). The real control+agent e2e lives
//! elsewhere.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use veil_link::{ControlMsg, SecretState};
use veil_tests::control::{
    AgentBehaviour, Control, FAKE_CA_PEM, FakeAgent, assert_error, linked_config, random_token,
};
use veil_tests::{Cgroup, require_root};

const ALL: &[&str] = &["manage:secrets", "write:sandboxes", "read:audit"];

fn rel(cg: &Cgroup) -> String {
    cg.relative()
}

fn put_secret_of(m: &ControlMsg) -> Option<&SecretState> {
    match m {
        ControlMsg::PutSecret { secret, .. } => Some(secret),
        _ => None,
    }
}

fn kind(m: &ControlMsg) -> String {
    match m {
        ControlMsg::Snapshot { .. } => "snapshot".into(),
        ControlMsg::PutSandbox { sandbox, .. } => format!("put_sandbox {}", sandbox.id),
        ControlMsg::DeleteSandbox { id, .. } => format!("delete_sandbox {id}"),
        ControlMsg::PutSecret { secret, .. } => format!("put_secret {}", secret.id),
        ControlMsg::DeleteSecret { id, .. } => format!("delete_secret {id}"),
        ControlMsg::Reply { req, .. } => format!("reply {req}"),
    }
}

fn kinds(ms: &[ControlMsg]) -> Vec<String> {
    ms.iter().map(kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_waits_for_the_agent_and_pushes_follow_every_change() {
    require_root();
    let control = Control::start_with_config(&linked_config(true, 5000));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let (v_alpha, v_beta, v_spare) = (
        format!("alpha-{}", random_token(24)),
        format!("beta-{}", random_token(24)),
        format!("spare-{}", random_token(24)),
    );
    let alpha = api
        .create_secret(&key, "alpha", &v_alpha, &["api.alpha.example"])
        .await;
    let beta = api.create_secret(&key, "beta", &v_beta, &[]).await;
    let spare = api.create_secret(&key, "spare", &v_spare, &[]).await;
    let (alpha_id, beta_id, spare_id) = (
        alpha["id"].as_str().unwrap().to_owned(),
        beta["id"].as_str().unwrap().to_owned(),
        spare["id"].as_str().unwrap().to_owned(),
    );

    let delay = Duration::from_millis(300);
    let agent = FakeAgent::connect(
        &control.agent_socket,
        "f0000000000000000000000000000001",
        AgentBehaviour {
            delay,
            ..AgentBehaviour::default()
        },
    )
    .await;
    let cg = Cgroup::new("linked");
    let netns = format!("/proc/{}/ns/net", std::process::id());
    let start = Instant::now();
    let (status, sb) = api
        .put(
            "/sandbox/sb-1",
            &key,
            json!({"cgroup": rel(&cg), "netns": netns, "secrets": [{"MY_A": "alpha"}]}),
        )
        .await;
    let took = start.elapsed();
    assert_eq!(status, 200, "{sb}");
    // Two messages (PutSecret, PutSandbox), each acknowledged after the delay.
    assert!(
        took >= delay * 2,
        "answered before the agent acknowledged ({took:?})"
    );
    assert_eq!(sb["id"], "sb-1");
    assert_eq!(sb["env"], json!({"MY_A": alpha["placeholder"]}));
    assert_eq!(sb["caCertificate"], FAKE_CA_PEM);
    assert_eq!(sb["caCert"], FAKE_CA_PEM, "issue 3's field is kept");
    let msgs = agent.messages_since(1);
    assert_eq!(
        kinds(&msgs),
        [format!("put_secret {alpha_id}"), "put_sandbox sb-1".into()],
        "the secret reaches the agent before the sandbox that mounts it"
    );
    let s = put_secret_of(&msgs[0]).unwrap();
    // Values are compared, never printed (house rule: no value in test output).
    assert!(s.value.expose() == v_alpha, "PutSecret carries the value");
    assert_eq!(s.placeholder, alpha["placeholder"].as_str().unwrap());
    assert_eq!(s.hosts, ["api.alpha.example"]);
    assert_eq!(s.org, "acme");
    let ControlMsg::PutSandbox { sandbox, .. } = &msgs[1] else {
        unreachable!()
    };
    assert_eq!(
        sandbox.cgroup.to_str().unwrap(),
        rel(&cg).trim_start_matches('/')
    );
    assert_eq!(sandbox.netns.as_ref().unwrap().to_str().unwrap(), netns);
    assert_eq!(
        sandbox.mounts.get("MY_A").map(|id| id.as_str()),
        Some(alpha_id.as_str())
    );
    agent.set_behaviour(AgentBehaviour::default());

    // A second agent gets a snapshot: every sandbox, only mounted secrets, with values.
    let second = FakeAgent::connect(
        &control.agent_socket,
        "f0000000000000000000000000000002",
        AgentBehaviour::default(),
    )
    .await;
    let ControlMsg::Snapshot {
        sandboxes, secrets, ..
    } = &second.messages()[0]
    else {
        panic!("first message is not a snapshot")
    };
    assert_eq!(sandboxes.len(), 1);
    assert_eq!(sandboxes[0].id, "sb-1");
    assert_eq!(secrets.len(), 1, "only mounted secrets: {secrets:?}");
    assert_eq!(secrets[0].id, alpha_id);
    assert!(
        secrets[0].value.expose() == v_alpha,
        "snapshot carries the value"
    );
    assert_eq!(secrets[0].revision, 1);

    // PATCH of a mounted secret (no value change) → PutSecret with a bumped revision, to both.
    let n1 = agent.messages().len();
    let n2 = second.messages().len();
    let (status, _) = api
        .patch(
            &format!("/secret/{alpha_id}"),
            &key,
            json!({"description": "now described"}),
        )
        .await;
    assert_eq!(status, 200);
    for (a, n) in [(&agent, n1), (&second, n2)] {
        let got = a.messages_since(n);
        assert_eq!(kinds(&got), [format!("put_secret {alpha_id}")]);
        let s = put_secret_of(&got[0]).unwrap();
        assert_eq!(s.revision, 2, "every change bumps the revision");
        assert!(s.value.expose() == v_alpha, "re-sealed value still opens");
    }
    // Value change → revision 3, new value.
    let v_alpha2 = format!("alpha2-{}", random_token(24));
    let n1 = agent.messages().len();
    api.patch(
        &format!("/secret/{alpha_id}"),
        &key,
        json!({"value": v_alpha2}),
    )
    .await;
    let got = agent.messages_since(n1);
    let s = put_secret_of(&got[0]).unwrap();
    assert_eq!(s.revision, 3);
    assert!(s.value.expose() == v_alpha2, "the new value is pushed");
    // An unmounted secret's change is not pushed.
    let n1 = agent.messages().len();
    let (status, _) = api
        .patch(
            &format!("/secret/{spare_id}"),
            &key,
            json!({"hosts": ["x.example"]}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(agent.messages_since(n1).is_empty());

    // Mount change: new secret first, then the sandbox, then the secret mounted nowhere.
    let n1 = agent.messages().len();
    let (status, sb) = api
        .put(
            "/sandbox/sb-1/secrets",
            &key,
            json!({"secrets": [{"B": "beta"}]}),
        )
        .await;
    assert_eq!(status, 200, "{sb}");
    assert_eq!(sb["env"], json!({"B": beta["placeholder"]}));
    assert_eq!(
        kinds(&agent.messages_since(n1)),
        [
            format!("put_secret {beta_id}"),
            "put_sandbox sb-1".into(),
            format!("delete_secret {alpha_id}")
        ]
    );
    // Deleting a mounted secret → PutSecret, retired: its last value is still scrubbed during
    // rotated_value_grace (default 24 h), never substituted.
    let n1 = agent.messages().len();
    let (status, _) = api.delete(&format!("/secret/{beta_id}"), &key).await;
    assert_eq!(status, 204);
    let got = agent.messages_since(n1);
    assert_eq!(kinds(&got), [format!("put_secret {beta_id}")]);
    let s = put_secret_of(&got[0]).unwrap();
    assert!(s.retired && s.revision == 2 && s.value.expose() == v_beta);
    // DELETE sandbox → DeleteSandbox, answered after the acknowledgement.
    let n1 = agent.messages().len();
    agent.set_behaviour(AgentBehaviour {
        delay,
        ..AgentBehaviour::default()
    });
    let start = Instant::now();
    let (status, _) = api.delete("/sandbox/sb-1", &key).await;
    assert_eq!(status, 204);
    assert!(start.elapsed() >= delay);
    // The organization's last sandbox is gone: so is the retired secret.
    assert_eq!(
        kinds(&agent.messages_since(n1)),
        [
            "delete_sandbox sb-1".into(),
            format!("delete_secret {beta_id}")
        ]
    );

    // No value ever reached control's log (debug level).
    let log = control.log();
    for v in [&v_alpha, &v_alpha2, &v_beta, &v_spare] {
        assert!(
            !log.contains(v.as_str()),
            "a value leaked into control's log"
        );
    }
    assert!(log.contains("agent connected"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_or_no_acknowledgement_is_a_503() {
    require_root();
    let control = Control::start_with_config(&linked_config(true, 400));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let cg = Cgroup::new("timeout");
    let body = json!({"cgroup": rel(&cg)});

    // No agent at all: 503, nothing stored.
    let reply = api.put("/sandbox/sb-t", &key, body.clone()).await;
    assert_error(&reply, 503);
    assert!(
        reply.1["message"]
            .as_str()
            .unwrap()
            .contains("no veil-agent is connected")
    );
    assert_error(&api.get("/sandbox/sb-t", &key).await, 404);

    // An agent that never answers: 503 after the timeout; the registration is kept.
    let agent = FakeAgent::connect(
        &control.agent_socket,
        "f0000000000000000000000000000003",
        AgentBehaviour {
            silent: true,
            ..AgentBehaviour::default()
        },
    )
    .await;
    let start = Instant::now();
    let reply = api.put("/sandbox/sb-t", &key, body.clone()).await;
    let took = start.elapsed();
    assert_error(&reply, 503);
    let msg = reply.1["message"].as_str().unwrap();
    assert!(
        msg.contains("no veil-agent acknowledged within 400 ms") && msg.contains("stored"),
        "{msg}"
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let (status, _) = api.get("/sandbox/sb-t", &key).await;
    assert_eq!(status, 200, "kept: the agent converges to the store");

    // Once the agent answers, retrying the PUT succeeds.
    agent.set_behaviour(AgentBehaviour::default());
    let (status, sb) = api.put("/sandbox/sb-t", &key, body.clone()).await;
    assert_eq!(status, 200, "{sb}");

    // The agent goes away: a DELETE still removes the record and says so.
    agent.disconnect();
    let reply = api.delete("/sandbox/sb-t", &key).await;
    assert_error(&reply, 503);
    assert!(
        reply.1["message"]
            .as_str()
            .unwrap()
            .contains("removed from the registry")
    );
    assert_error(&api.get("/sandbox/sb-t", &key).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_error_rolls_the_registration_back() {
    require_root();
    let control = Control::start_with_config(&linked_config(true, 5000));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    api.create_secret(&key, "one", "v-one-rollback", &[]).await;
    api.create_secret(&key, "two", "v-two-rollback", &[]).await;
    let agent = FakeAgent::connect(
        &control.agent_socket,
        "f0000000000000000000000000000004",
        AgentBehaviour {
            fail_sandbox: Some("bad".into()),
            ..AgentBehaviour::default()
        },
    )
    .await;
    let cg = Cgroup::new("rollback");

    // A new registration the agent cannot enforce: 502 with its report, nothing kept, and the
    // agent is told to drop it.
    let reply = api
        .put(
            "/sandbox/bad",
            &key,
            json!({"cgroup": rel(&cg), "secrets": [{"E": "one"}]}),
        )
        .await;
    assert_error(&reply, 502);
    let msg = reply.1["message"].as_str().unwrap();
    assert!(
        msg.contains("attaching failed (fake agent)") && msg.contains("rolled back"),
        "{msg}"
    );
    assert_error(&api.get("/sandbox/bad", &key).await, 404);
    agent
        .wait_for(
            "the rollback",
            |m| matches!(m, ControlMsg::DeleteSandbox { id, .. } if id == "bad"),
        )
        .await;
    // The cgroup is free again.
    let (status, _) = api
        .put(
            "/sandbox/good",
            &key,
            json!({"cgroup": rel(&cg), "secrets": [{"E": "one"}]}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api.delete("/sandbox/good", &key).await;
    assert_eq!(status, 204);

    // A change to an existing sandbox the agent refuses: the previous record comes back.
    agent.set_behaviour(AgentBehaviour::default());
    let (status, before) = api
        .put(
            "/sandbox/bad",
            &key,
            json!({"cgroup": rel(&cg), "secrets": [{"E": "one"}]}),
        )
        .await;
    assert_eq!(status, 200, "{before}");
    agent.set_behaviour(AgentBehaviour {
        fail_sandbox: Some("bad".into()),
        ..AgentBehaviour::default()
    });
    let n = agent.messages().len();
    let reply = api
        .put(
            "/sandbox/bad/secrets",
            &key,
            json!({"secrets": [{"F": "two"}]}),
        )
        .await;
    assert_error(&reply, 502);
    let (status, after) = api.get("/sandbox/bad", &key).await;
    assert_eq!(status, 200);
    assert_eq!(after["env"], before["env"], "mounts restored");
    assert_eq!(after["secrets"], json!([{"E": "one"}]));
    // The restored state was pushed after the refused one.
    let last_put = agent
        .messages_since(n)
        .into_iter()
        .rev()
        .filter_map(|m| match m {
            ControlMsg::PutSandbox { sandbox, .. } => Some(sandbox),
            _ => None,
        })
        .next()
        .unwrap();
    assert!(last_put.mounts.contains_key("E") && !last_put.mounts.contains_key("F"));
    let (_, audit) = api.get("/audit?limit=5", &key).await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "sandbox.rollback"),
        "{audit}"
    );
    agent.set_behaviour(AgentBehaviour::default());
    let (status, _) = api.delete("/sandbox/bad", &key).await;
    assert_eq!(status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_and_ownership_are_checked_before_anything_is_stored() {
    require_root();
    let control = Control::start_with_config(&linked_config(true, 5000));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let other = control.apikey("globex", ALL);
    let _agent = FakeAgent::connect(
        &control.agent_socket,
        "f000000000000000000000000000000a",
        AgentBehaviour::default(),
    )
    .await;
    let cg = Cgroup::new("paths");
    let missing = format!("{}-missing", rel(&cg));
    for (body, needle) in [
        (
            json!({"cgroup": "/user.slice/x"}),
            "not under a configured sandbox parent",
        ),
        (json!({"cgroup": missing}), "does not exist"),
        (
            json!({"cgroup": rel(&cg), "netns": "/run/netns/veil-no-such-netns-x"}),
            "does not exist",
        ),
        (
            json!({"cgroup": format!("{}/cgroup.procs", rel(&cg))}),
            "not a cgroup directory",
        ),
    ] {
        let reply = api.put("/sandbox/p", &key, body.clone()).await;
        assert_error(&reply, 400);
        let msg = reply.1["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    assert_error(&api.get("/sandbox/p", &key).await, 404);
    let (status, _) = api
        .put("/sandbox/p", &key, json!({"cgroup": rel(&cg)}))
        .await;
    assert_eq!(status, 200);
    // Another organization naming this id: 404, nothing changed.
    let cg2 = Cgroup::new("paths2");
    assert_error(
        &api.put("/sandbox/p", &other, json!({"cgroup": rel(&cg2)}))
            .await,
        404,
    );
    let (_, got) = api.get("/sandbox/p", &key).await;
    assert_eq!(got["cgroup"], rel(&cg).trim_start_matches('/'));
    let (status, _) = api.delete("/sandbox/p", &key).await;
    assert_eq!(status, 204);
}

/// A client that connects as `nobody` and sends a valid Hello: control must close the
/// connection without a snapshot.
const NOBODY_CLIENT: &str = r#"
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
hello = json.dumps({"type": "hello", "protocol": 1, "agent_id": "intruder",
                    "ca_pem": "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"}).encode()
try:
    s.sendall(struct.pack(">I", len(hello)) + hello)
    data = s.recv(4)
    print("uid=%d %s" % (os.geteuid(), "closed" if not data else "got=%d" % len(data)))
except (ConnectionResetError, BrokenPipeError):
    print("uid=%d closed" % os.geteuid())
except Exception as e:
    print("uid=%d error=%s" % (os.geteuid(), type(e).__name__))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_not_root_is_refused() {
    require_root();
    let control = Control::start_with_config(&linked_config(true, 5000));
    let sock = control.agent_socket.clone();
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600,
        "the socket is private"
    );
    // Open the file permissions so that only the peer-credential check stands in the way.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(control.tmp_path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = control.tmp_path().join("nobody.py");
    std::fs::write(&script, NOBODY_CLIENT).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = tokio::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(&sock)
        .uid(65534)
        .gid(65534)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "uid=65534 closed",
        "control must close without a snapshot"
    );
    assert!(
        control.log().contains("refused agent connection"),
        "{}",
        control.log()
    );
    // Root still gets in.
    let agent = FakeAgent::connect(
        &sock,
        "f0000000000000000000000000000005",
        AgentBehaviour::default(),
    )
    .await;
    assert!(matches!(agent.messages()[0], ControlMsg::Snapshot { .. }));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let cg = Cgroup::new("peer");
    let (status, sb) = api
        .put("/sandbox/ok", &key, json!({"cgroup": rel(&cg)}))
        .await;
    assert_eq!(status, 200, "{sb}");
    assert_eq!(
        sb["caCertificate"], FAKE_CA_PEM,
        "the intruder's CA was not taken"
    );
    api.delete("/sandbox/ok", &key).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// PUT → answer latency through a fake agent that acknowledges at once (control's share of
/// the registration latency). Prints p50/p99 over 120 registrations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_latency_through_the_link() {
    require_root();
    let control = Control::start_with(&linked_config(true, 5000), "info");
    let api = control.api();
    let key = control.apikey("acme", ALL);
    api.create_secret(&key, "lat", "latency-value", &[]).await;
    let _agent = FakeAgent::connect(
        &control.agent_socket,
        "f0000000000000000000000000000006",
        AgentBehaviour::default(),
    )
    .await;
    const N: usize = 120;
    let cgroups: Vec<Cgroup> = (0..N).map(|i| Cgroup::new(&format!("lat{i}"))).collect();
    let mut put = Vec::with_capacity(N);
    let mut del = Vec::with_capacity(N);
    for (i, cg) in cgroups.iter().enumerate() {
        let start = Instant::now();
        let (status, body): (u16, Value) = api
            .put(
                &format!("/sandbox/lat-{i}"),
                &key,
                json!({"cgroup": rel(cg), "secrets": [{"K": "lat"}]}),
            )
            .await;
        put.push(start.elapsed());
        assert_eq!(status, 200, "{body}");
    }
    for i in 0..N {
        let start = Instant::now();
        let (status, _) = api.delete(&format!("/sandbox/lat-{i}"), &key).await;
        del.push(start.elapsed());
        assert_eq!(status, 204);
    }
    put.sort();
    del.sort();
    println!(
        "registration PUT→answer over {N}: p50 {:?} p99 {:?} max {:?}; DELETE p50 {:?} p99 {:?}",
        percentile(&put, 0.5),
        percentile(&put, 0.99),
        put[N - 1],
        percentile(&del, 0.5),
        percentile(&del, 0.99),
    );
    assert!(percentile(&put, 0.5) < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_ca_survives_a_control_restart() {
    require_root();
    let mut control = Control::start_with_config(&linked_config(true, 5000));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let cg = Cgroup::new("restart");
    let agent = FakeAgent::connect(
        &control.agent_socket,
        "f000000000000000000000000000000a",
        AgentBehaviour::default(),
    )
    .await;
    let (status, _) = api
        .put("/sandbox/keep", &key, json!({"cgroup": rel(&cg)}))
        .await;
    assert_eq!(status, 200);
    drop(agent);
    // SIGKILL: the socket file stays behind and must be replaced on start.
    control.restart();
    let (status, sb) = api.get("/sandbox/keep", &key).await;
    assert_eq!(status, 200);
    assert_eq!(
        sb["caCertificate"], FAKE_CA_PEM,
        "known before any agent reconnects"
    );
    // A reconnecting agent finds the registered sandbox in its snapshot.
    let agent = FakeAgent::connect(
        &control.agent_socket,
        "f000000000000000000000000000000a",
        AgentBehaviour::default(),
    )
    .await;
    let ControlMsg::Snapshot { sandboxes, .. } = &agent.messages()[0] else {
        panic!("no snapshot")
    };
    assert_eq!(sandboxes.len(), 1);
    assert_eq!(sandboxes[0].id, "keep");
    let (status, _) = api.delete("/sandbox/keep", &key).await;
    assert_eq!(status, 204);
}
