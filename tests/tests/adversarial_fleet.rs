//! Issue 17, as an attacker on the fleet link: whoever reaches a replica's `agent_listen`
//! without an enrolled host's current certificate gets nothing; a revoked, re-enrolled or
//! expired host is dropped and refused; a compromised host receives only its own sandboxes'
//! secrets; an agent refuses a control whose certificate its `control_ca` did not issue.
//! Values are never printed: assertions are on ids and outcomes.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use veil_link::ControlMsg;
use veil_tests::agent::Agent;
use veil_tests::cmd::wait_until;
use veil_tests::control::random_token;
use veil_tests::fleet::{
    LinkOutcome, Replica, client_tls, foreign_creds, link_connect, random_agent_id,
};
use veil_tests::postgres::Postgres;

const WAIT: Duration = Duration::from_secs(5);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn describe(outcome: &LinkOutcome) -> String {
    match outcome {
        LinkOutcome::Handshake(e) => format!("handshake failed: {e}"),
        LinkOutcome::Closed(e) => format!("closed: {e}"),
        LinkOutcome::Admitted(c) => format!("ADMITTED with {c:?}"),
    }
}

#[test]
fn certificates_the_fleet_did_not_issue_or_no_certificate_get_nothing() {
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let enrolled = a.enroll("h-good", dir.path());
    let rt = rt();
    // The control: an enrolled host is admitted.
    let good = rt.block_on(link_connect(
        a.fleet_port,
        client_tls(&enrolled.ca(), Some((&enrolled.cert(), &enrolled.key()))),
        &random_agent_id(),
        WAIT,
    ));
    assert!(
        matches!(good, LinkOutcome::Admitted(_)),
        "an enrolled host is refused: {}",
        describe(&good)
    );
    // A certificate from another CA (with the fleet CA's name), claiming an enrolled host.
    let foreign = foreign_creds(&dir.path().join("foreign"), "h-good");
    let outcome = rt.block_on(link_connect(
        a.fleet_port,
        client_tls(&enrolled.ca(), Some((&foreign.cert(), &foreign.key()))),
        &random_agent_id(),
        WAIT,
    ));
    assert!(
        !matches!(outcome, LinkOutcome::Admitted(_)),
        "a certificate of another CA was admitted: {}",
        describe(&outcome)
    );
    // No client certificate at all.
    let outcome = rt.block_on(link_connect(
        a.fleet_port,
        client_tls(&enrolled.ca(), None),
        &random_agent_id(),
        WAIT,
    ));
    assert!(
        !matches!(outcome, LinkOutcome::Admitted(_)),
        "a client without a certificate was admitted: {}",
        describe(&outcome)
    );
}

#[test]
fn a_plain_tcp_client_on_agent_listen_gets_no_frame() {
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", a.fleet_port)).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    // A veil-link Hello in the clear, as on the local socket.
    let hello = serde_json::to_vec(
        &json!({"type": "hello", "protocol": veil_link::PROTOCOL_VERSION,
        "agent_id": random_agent_id().to_string(), "ca_pem": veil_tests::fleet::HELLO_CA}),
    )
    .expect("json");
    let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&hello);
    let _ = tcp.write_all(&frame);
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got);
    // Whatever comes back (a TLS alert at most) is no veil-link frame of JSON.
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("snapshot") && !text.contains("\"type\""),
        "a plain TCP client got a veil-link message ({} bytes)",
        got.len()
    );
    assert!(got.len() < 64, "a plain TCP client got {} bytes", got.len());
}

#[test]
fn a_revoked_host_is_dropped_while_connected_and_refused_afterwards() {
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let b = Replica::other(&pg, &a.control.data_dir);
    let dir = tempfile::tempdir().expect("tempdir");
    let h = a.enroll("h-revoked", dir.path());
    let tls = client_tls(&h.ca(), Some((&h.cert(), &h.key())));
    let rt = rt();
    // Connected to the replica the revocation does NOT go through.
    let LinkOutcome::Admitted(mut conn) = rt.block_on(link_connect(
        b.fleet_port,
        tls.clone(),
        &random_agent_id(),
        WAIT,
    )) else {
        panic!("the enrolled host was not admitted");
    };
    a.revoke("h-revoked");
    assert!(
        rt.block_on(conn.closed_within(WAIT)),
        "a revoked host's connection was still open after {WAIT:?}"
    );
    for replica in [&a, &b] {
        let outcome = rt.block_on(link_connect(
            replica.fleet_port,
            tls.clone(),
            &random_agent_id(),
            WAIT,
        ));
        assert!(
            !matches!(outcome, LinkOutcome::Admitted(_)),
            "a revoked host was admitted again: {}",
            describe(&outcome)
        );
    }
    let hosts = a.hosts();
    assert!(
        hosts[0]["revoked"].is_string(),
        "fleet hosts does not show the revocation: {hosts}"
    );
}

#[test]
fn a_replaced_certificate_stops_being_accepted() {
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let old = a.enroll("h-renewed", dir.path());
    let old_tls = client_tls(&old.ca(), Some((&old.cert(), &old.key())));
    let rt = rt();
    let LinkOutcome::Admitted(mut conn) = rt.block_on(link_connect(
        a.fleet_port,
        old_tls.clone(),
        &random_agent_id(),
        WAIT,
    )) else {
        panic!("the enrolled host was not admitted");
    };
    let new = a.enroll("h-renewed", dir.path());
    assert!(
        rt.block_on(conn.closed_within(WAIT)),
        "a connection with the replaced certificate stayed open"
    );
    let outcome = rt.block_on(link_connect(
        a.fleet_port,
        old_tls,
        &random_agent_id(),
        WAIT,
    ));
    assert!(
        !matches!(outcome, LinkOutcome::Admitted(_)),
        "the replaced certificate was admitted: {}",
        describe(&outcome)
    );
    let fresh = rt.block_on(link_connect(
        a.fleet_port,
        client_tls(&new.ca(), Some((&new.cert(), &new.key()))),
        &random_agent_id(),
        WAIT,
    ));
    assert!(
        matches!(fresh, LinkOutcome::Admitted(_)),
        "the new certificate is refused: {}",
        describe(&fresh)
    );
}

#[test]
fn an_expired_certificate_is_dropped_and_refused() {
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let h = a.enroll_valid("h-expiring", dir.path(), Some(3));
    let tls = client_tls(&h.ca(), Some((&h.cert(), &h.key())));
    let rt = rt();
    let outcome = rt.block_on(link_connect(
        a.fleet_port,
        tls.clone(),
        &random_agent_id(),
        WAIT,
    ));
    if let LinkOutcome::Admitted(mut conn) = outcome {
        assert!(
            rt.block_on(conn.closed_within(Duration::from_secs(10))),
            "a connection stayed open past its certificate's expiry"
        );
    }
    let mut last = String::new();
    let refused = wait_until(Duration::from_secs(10), || {
        let outcome = rt.block_on(link_connect(
            a.fleet_port,
            tls.clone(),
            &random_agent_id(),
            WAIT,
        ));
        last = describe(&outcome);
        !matches!(outcome, LinkOutcome::Admitted(_))
    });
    assert!(refused, "an expired certificate is still admitted: {last}");
}

/// Runs `call` while `conn` answers what the replica sends; the call's reply and the messages.
/// An admitted link-level agent connection of enrolled host `h` to replica `a`.
fn admitted(
    rt: &tokio::runtime::Runtime,
    a: &Replica,
    h: &veil_tests::fleet::HostCreds,
) -> Box<veil_tests::fleet::LinkConn> {
    match rt.block_on(link_connect(
        a.fleet_port,
        client_tls(&h.ca(), Some((&h.cert(), &h.key()))),
        &random_agent_id(),
        WAIT,
    )) {
        LinkOutcome::Admitted(c) => c,
        other => panic!("host not admitted: {}", describe(&other)),
    }
}

async fn answering(
    conn: &mut veil_tests::fleet::LinkConn,
    call: impl std::future::Future<Output = veil_tests::control::Reply>,
) -> (u16, serde_json::Value, Vec<ControlMsg>) {
    tokio::pin!(call);
    let mut seen = Vec::new();
    loop {
        tokio::select! {
            biased;
            reply = &mut call => return (reply.0, reply.1, seen),
            msg = conn.next(Duration::from_secs(30)) => {
                if let Some(Ok(m)) = msg {
                    seen.push(m);
                }
            }
        }
    }
}

#[test]
fn a_compromised_host_receives_only_its_own_sandboxes_secrets() {
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let h1 = a.enroll("h-one", dir.path());
    let h2 = a.enroll("h-two", dir.path());
    let rt = rt();
    let connect = |h: &veil_tests::fleet::HostCreds| admitted(&rt, &a, h);
    // Root on host 1 holds its certificate: it connects as host 1 and reads everything sent.
    let mut spy = connect(&h1);
    let mut honest = connect(&h2);
    assert!(
        spy.secrets.is_empty(),
        "host 1's first snapshot carries secrets"
    );
    let spied: Arc<Mutex<Vec<ControlMsg>>> = Arc::default();
    let record = spied.clone();
    rt.spawn(async move {
        while let Some(got) = spy.next(Duration::from_secs(120)).await {
            if let Ok(msg) = got {
                record.lock().expect("spied").push(msg);
            }
        }
    });
    let key = a.control.apikey("fleet-org", &["admin"]);
    let api = a.control.api();
    let created = rt.block_on(api.post(
        "/secret",
        &key,
        json!({"name": "h2-only", "value": format!("v-{}", random_token(24)), "hosts": ["x.test"]}),
    ));
    assert_eq!(created.0, 201, "{}", created.1);
    let secret_id = created.1["id"].as_str().expect("id").to_owned();
    // host 2's agent must be seen connected (by any replica) before a PUT may name it.
    let present = wait_until(WAIT, || {
        a.hosts().as_array().into_iter().flatten().any(|h| {
            h["host"] == "h-two" && h["connected"].as_array().is_some_and(|c| !c.is_empty())
        })
    });
    assert!(
        present,
        "host 2's agent never showed as connected: {}",
        a.hosts()
    );
    // host 2's (link-level) agent answers every message while the PUT waits.
    let (status, body, honest_seen) = rt.block_on(answering(
        &mut honest,
        api.put(
            "/sandbox/sb-h2",
            &key,
            json!({"cgroup": "veil-test.slice/fleet-sb-h2", "host": "h-two",
                   "secrets": [{"MY_KEY": "h2-only"}]}),
        ),
    ));
    assert_eq!(status, 200, "PUT for host 2: {body}");
    assert!(
        honest_seen.iter().any(
            |m| matches!(m, ControlMsg::PutSecret { secret, .. } if secret.id.as_str() == secret_id)
        ),
        "host 2's agent never received its sandbox's secret"
    );
    // A rotation too goes to host 2 only.
    let (status, body, rotated_seen) = rt.block_on(answering(
        &mut honest,
        api.patch(
            &format!("/secret/{secret_id}"),
            &key,
            json!({"value": format!("v2-{}", random_token(24))}),
        ),
    ));
    assert_eq!(status, 200, "{body}");
    assert!(
        rotated_seen
            .iter()
            .any(|m| matches!(m, ControlMsg::PutSecret { .. })),
        "host 2's agent never received the rotation"
    );
    // What host 1 read meanwhile (it answered everything, as a real agent would).
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(500)).await });
    let spied = spied.lock().expect("spied").clone();
    let leaked: Vec<String> = spied
        .iter()
        .filter_map(|m| match m {
            ControlMsg::PutSecret { secret, .. } => Some(format!("secret {}", secret.id)),
            ControlMsg::PutSandbox { sandbox, .. } => Some(format!("sandbox {}", sandbox.id)),
            ControlMsg::Snapshot {
                secrets, sandboxes, ..
            } if !secrets.is_empty() || !sandboxes.is_empty() => {
                Some(format!("snapshot of {} secrets", secrets.len()))
            }
            _ => None,
        })
        .collect();
    assert!(leaked.is_empty(), "host 1 received host 2's {leaked:?}");
    // And a fresh connection of host 1 gets a snapshot without it.
    let again = connect(&h1);
    assert!(
        again.secrets.is_empty() && again.sandboxes.is_empty(),
        "host 1's snapshot carries {:?} {:?}",
        again.sandboxes,
        again.secrets
    );
    // Placement refusals: an unenrolled host is a 400, a move a 409.
    let unknown = rt.block_on(api.put(
        "/sandbox/sb-x",
        &key,
        json!({"cgroup": "veil-test.slice/fleet-sb-x", "host": "h-nowhere"}),
    ));
    assert_eq!(unknown.0, 400, "{}", unknown.1);
    let moved = rt.block_on(api.put(
        "/sandbox/sb-h2",
        &key,
        json!({"cgroup": "veil-test.slice/fleet-sb-h2", "host": "h-one"}),
    ));
    assert_eq!(moved.0, 409, "{}", moved.1);
}

#[test]
fn an_agent_refuses_a_control_its_control_ca_did_not_issue() {
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let h = a.enroll("h-wary", dir.path());
    // The agent trusts another CA: the real replica looks like a fake control to it.
    let other = foreign_creds(&dir.path().join("other"), "h-wary");
    let agent = Agent::start_with(h.agent_options(&[a.url()], Some(&other.ca())));
    let refused = wait_until(Duration::from_secs(10), || agent.log().contains("TLS with"));
    assert!(
        refused,
        "the agent did not report a TLS failure:\n{}",
        agent.log_tail(20)
    );
    assert!(
        !agent.log().contains("in sync with control"),
        "the agent took a snapshot from a control it must not trust"
    );
    // And with the fleet CA it links.
    let trusting = Agent::start_with(h.agent_options(&[a.url()], None));
    let linked = wait_until(Duration::from_secs(10), || {
        trusting.log().contains("in sync with control")
    });
    assert!(linked, "the agent never linked:\n{}", trusting.log_tail(20));
}

/// Root on host 1 holds host 1's certificate and speaks the link itself: it cannot see, bind or
/// unbind a sandbox declared for host 2 (nor one of control's own host) — each is answered as an
/// unknown id — while host 2 describes and binds it, once.
#[test]
fn a_host_cannot_describe_bind_or_unbind_another_hosts_sandbox() {
    use veil_link::{AgentMsg, LocalResponse, RefusalKind};
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let dir = tempfile::tempdir().expect("tempdir");
    let h1 = a.enroll("h-one", dir.path());
    let h2 = a.enroll("h-two", dir.path());
    let rt = rt();
    let connect = |h: &veil_tests::fleet::HostCreds| admitted(&rt, &a, h);
    let mut one = connect(&h1);
    let mut two = connect(&h2);
    let key = a.control.apikey("fleet-org", &["admin"]);
    let api = a.control.api();
    let created = rt.block_on(api.post(
        "/secret",
        &key,
        json!({"name": "h2-key", "value": format!("v-{}", random_token(24)), "hosts": ["x.test"]}),
    ));
    assert_eq!(created.0, 201, "{}", created.1);
    // A host that is not enrolled is a 400; one without a connected agent, a 503 (its answer
    // would carry that agent's CA, and only that agent could bind it). Nothing is stored.
    a.enroll("h-three", dir.path());
    for (host, status) in [("h-nowhere", 400), ("h-three", 503)] {
        let got = rt.block_on(api.put(
            "/sandbox/sb-elsewhere",
            &key,
            json!({"host": host, "secrets": [{"MY_KEY": "h2-key"}]}),
        ));
        assert_eq!(got.0, status, "declare for {host}: {}", got.1);
    }
    assert_eq!(rt.block_on(api.get("/sandbox/sb-elsewhere", &key)).0, 404);
    for (id, host) in [("sb-h2", Some("h-two")), ("sb-local", None)] {
        let declared = rt.block_on(api.put(
            &format!("/sandbox/{id}"),
            &key,
            json!({"host": host, "secrets": [{"MY_KEY": "h2-key"}]}),
        ));
        assert_eq!(declared.0, 200, "declare {id}: {}", declared.1);
        assert_eq!(declared.1["bound"], false, "{}", declared.1);
    }
    let bind = |req: u64, sandbox: &str| AgentMsg::Bind {
        req,
        sandbox: sandbox.parse().expect("id"),
        cgroup: "veil-test.slice/fleet-abc".into(),
        cgroup_id: 4242,
        netns: None,
    };
    let ask = |conn: &mut veil_tests::fleet::LinkConn, msg: AgentMsg, req: u64| {
        rt.block_on(conn.request(msg, req, Duration::from_secs(10)))
    };
    let mut req = 0u64;
    for sandbox in ["sb-h2", "sb-local"] {
        for msg in ["describe", "bind", "unbind"] {
            req += 1;
            let m = match msg {
                "describe" => AgentMsg::Describe {
                    req,
                    sandbox: sandbox.parse().expect("id"),
                },
                "bind" => bind(req, sandbox),
                _ => AgentMsg::Unbind {
                    req,
                    sandbox: sandbox.parse().expect("id"),
                },
            };
            let got = ask(&mut one, m, req);
            assert!(
                matches!(
                    &got,
                    Some(LocalResponse::Refused { kind: RefusalKind::NotDeclared, message })
                        if *message == format!("sandbox {sandbox} is not declared")
                ),
                "host 1's {msg} of {sandbox} was not answered as an unknown id: {got:?}"
            );
        }
    }
    // Still declared, unbound: host 1 changed nothing.
    let got = rt.block_on(api.get("/sandbox/sb-h2", &key));
    assert_eq!(got.1["bound"], false, "{}", got.1);
    // Host 2 sees and binds its own sandbox, once.
    req += 1;
    let got = ask(
        &mut two,
        AgentMsg::Describe {
            req,
            sandbox: "sb-h2".parse().expect("id"),
        },
        req,
    );
    assert!(
        matches!(&got, Some(LocalResponse::Declared(d)) if d.env.contains_key("MY_KEY") && !d.bound),
        "host 2 could not describe its sandbox: {got:?}"
    );
    req += 1;
    let got = ask(&mut two, bind(req, "sb-h2"), req);
    assert!(
        matches!(&got, Some(LocalResponse::Bound(_))),
        "host 2 could not bind its sandbox: {got:?}"
    );
    req += 1;
    let got = ask(&mut two, bind(req, "sb-h2"), req);
    assert!(
        matches!(
            &got,
            Some(LocalResponse::Refused {
                kind: RefusalKind::AlreadyBound,
                ..
            })
        ),
        "a second bind was not refused: {got:?}"
    );
}
