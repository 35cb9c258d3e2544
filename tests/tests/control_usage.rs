//! veil-control's side of issues 6 and 7 against a hand-driven agent connection (a real
//! Unix-socket client speaking veil-link): the per-secret `bodySubstitution` / `wrongHost`
//! fields (validated, stored, pushed), revision acknowledgements and the PATCH `wait`
//! parameter, and agent usage / blocked reports turned into `lastUsedAt`, per-host counts and
//! aggregated audit entries, kept across a control restart. Needs root (real cgroups).
//! Values are compared, never printed.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::unix::OwnedWriteHalf;
use veil_link::{
    AgentMsg, BlockedReport, ControlMsg, PROTOCOL_VERSION, UsageReport, WrongHost, read_frame,
    write_frame,
};
use veil_tests::control::{Api, Control, FAKE_CA_PEM, assert_error, linked_config, random_token};
use veil_tests::{Cgroup, require_root};

const ALL: &[&str] = &["manage:secrets", "write:sandboxes", "read:audit"];

/// An agent connection the test drives: records control's messages, acknowledges them unless
/// `silent`, and sends whatever reports the test writes.
struct Link {
    received: Arc<Mutex<Vec<ControlMsg>>>,
    silent: Arc<AtomicBool>,
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    async fn connect(socket: &Path, agent_id: &str) -> Link {
        let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let hello = AgentMsg::Hello {
            protocol: PROTOCOL_VERSION,
            agent_id: agent_id.parse().expect("a valid agent id"),
            ca_pem: FAKE_CA_PEM.to_owned(),
        };
        write_frame(&mut stream, &hello).await.unwrap();
        let (mut reader, writer) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let received = Arc::new(Mutex::new(Vec::new()));
        let silent = Arc::new(AtomicBool::new(false));
        let (rec, quiet, w) = (received.clone(), silent.clone(), writer.clone());
        let task = tokio::spawn(async move {
            while let Ok(Some(msg)) = read_frame::<ControlMsg, _>(&mut reader).await {
                let Some(seq) = msg.seq() else { continue };
                rec.lock().unwrap().push(msg);
                if quiet.load(Ordering::SeqCst) {
                    continue;
                }
                let applied = AgentMsg::Applied {
                    seq,
                    errors: vec![],
                };
                if write_frame(&mut *w.lock().await, &applied).await.is_err() {
                    break;
                }
            }
        });
        let link = Link {
            received,
            silent,
            writer,
            task,
        };
        link.wait_for(|m| matches!(m, ControlMsg::Snapshot { .. }))
            .await;
        link
    }

    async fn send(&self, msg: &AgentMsg) {
        write_frame(&mut *self.writer.lock().await, msg)
            .await
            .unwrap();
    }

    fn messages(&self) -> Vec<ControlMsg> {
        self.received.lock().unwrap().clone()
    }

    async fn wait_for(&self, pred: impl Fn(&ControlMsg) -> bool) -> ControlMsg {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| pred(m)) {
                return m;
            }
            assert!(Instant::now() < deadline, "expected message never came");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `GET /api/secret/{id}` until `pred` holds (10 s).
async fn get_until(api: &Api, key: &str, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api.get(&format!("/secret/{id}"), key).await;
        assert_eq!(status, 200, "{body}");
        if pred(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "secret never reached the state: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn audit_of(api: &Api, key: &str, action: &str) -> Vec<Value> {
    let (status, page) = api.get("/audit?limit=200&order=asc", key).await;
    assert_eq!(status, 200, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect()
}

fn put_secret(m: &ControlMsg) -> Option<&veil_link::SecretState> {
    match m {
        ControlMsg::PutSecret { secret, .. } => Some(secret),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_options_are_validated_stored_and_pushed() {
    require_root();
    let control = Control::start_with_config(&linked_config(true, 5000));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let value = format!("opt-{}", random_token(24));
    let created = api
        .create_secret(&key, "opts", &value, &["api.example.test"])
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    // Defaults: Daytona's behaviour.
    assert_eq!(created["bodySubstitution"], false);
    assert_eq!(created["wrongHost"], "forward");
    assert_eq!(created["revision"], 1);

    // Set at creation.
    let (status, blocked) = api
        .post(
            "/secret",
            &key,
            json!({"name": "strict", "value": value, "bodySubstitution": true, "wrongHost": "block"}),
        )
        .await;
    assert_eq!(status, 201, "{blocked}");
    assert_eq!(blocked["bodySubstitution"], true);
    assert_eq!(blocked["wrongHost"], "block");

    // Bad values: 400 naming the field, nothing created or changed.
    for body in [
        json!({"name": "bad1", "value": "v", "wrongHost": "drop"}),
        json!({"name": "bad2", "value": "v", "wrongHost": 1}),
        json!({"name": "bad3", "value": "v", "bodySubstitution": "yes"}),
    ] {
        let reply = api.post("/secret", &key, body).await;
        assert_error(&reply, 400);
        let msg = reply.1["message"].as_str().unwrap();
        assert!(
            msg.contains("wrongHost") || msg.contains("bodySubstitution"),
            "{msg}"
        );
    }
    let (_, list) = api.get("/secret", &key).await;
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "a refused create stored nothing"
    );
    for body in [
        json!({"wrongHost": "BLOCK"}),
        json!({"bodySubstitution": 0}),
        json!({"wrongHost": "block", "bodySubstitution": "true"}),
    ] {
        let reply = api.patch(&format!("/secret/{id}"), &key, body).await;
        assert_error(&reply, 400);
    }
    let (_, same) = api.get(&format!("/secret/{id}"), &key).await;
    assert_eq!(same["revision"], 1, "a refused PATCH changed nothing");
    assert_eq!(same["wrongHost"], "forward");

    // Mounted in a sandbox with an agent linked: a change of either field bumps the revision
    // and reaches the agent.
    let link = Link::connect(&control.agent_socket, "a0000000000000000000000000000001").await;
    let cg = Cgroup::new("opts");
    let netns = format!("/proc/{}/ns/net", std::process::id());
    let (status, sb) = api
        .put(
            "/sandbox/sb-opts",
            &key,
            json!({"cgroup": cg.relative(), "netns": netns, "secrets": [{"K": "opts"}]}),
        )
        .await;
    assert_eq!(status, 200, "{sb}");
    let (status, patched) = api
        .patch(
            &format!("/secret/{id}"),
            &key,
            json!({"wrongHost": "block", "bodySubstitution": true}),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["revision"], 2);
    assert_eq!(patched["wrongHost"], "block");
    let pushed = link
        .wait_for(|m| put_secret(m).is_some_and(|s| s.revision == 2))
        .await;
    let s = put_secret(&pushed).unwrap();
    assert_eq!(s.wrong_host, WrongHost::Block);
    assert!(s.body_substitution);
    assert!(s.value.expose() == value, "the value is unchanged");
    let (status, back) = api
        .patch(
            &format!("/secret/{id}"),
            &key,
            json!({"wrongHost": "forward"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(back["revision"], 3);
    assert_eq!(
        back["bodySubstitution"], true,
        "an omitted field is unchanged"
    );
    let updates = audit_of(&api, &key, "secret.update").await;
    assert_eq!(updates.len(), 2);
    assert_eq!(
        updates[0]["changes"]["wrongHost"],
        json!({"from": "forward", "to": "block"})
    );
    assert_eq!(
        updates[0]["changes"]["bodySubstitution"],
        json!({"from": false, "to": true})
    );

    // Documented.
    let (_, doc) = api.get("/openapi.json", &key).await;
    let props = &doc["components"]["schemas"]["Secret"]["properties"];
    assert_eq!(props["wrongHost"]["enum"], json!(["forward", "block"]));
    assert_eq!(props["bodySubstitution"]["type"], "boolean");
    assert!(doc["components"]["schemas"]["UpdateSecret"]["properties"]["wrongHost"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_and_the_wait_parameter() {
    require_root();
    let control = Control::start_with_config(&linked_config(true, 5000));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let created = api
        .create_secret(&key, "rot", &format!("v1-{}", random_token(24)), &[])
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/secret/{id}");
    // Mounted nowhere: nothing to wait for.
    let (status, idle) = api
        .patch(
            &format!("{path}?wait=1s"),
            &key,
            json!({"description": "x"}),
        )
        .await;
    assert_eq!(status, 200, "{idle}");
    assert_eq!(idle["propagation"], json!({"complete": true, "agents": []}));

    let link = Link::connect(&control.agent_socket, "a000000000000000000000000000000a").await;
    let cg = Cgroup::new("rot");
    let netns = format!("/proc/{}/ns/net", std::process::id());
    let (status, _) = api
        .put(
            "/sandbox/sb-rot",
            &key,
            json!({"cgroup": cg.relative(), "netns": netns, "secrets": [{"K": "rot"}]}),
        )
        .await;
    assert_eq!(status, 200);
    let got = get_until(&api, &key, &id, |s| s["propagation"]["complete"] == true).await;
    let agents = got["propagation"]["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["agentId"], "a000000000000000000000000000000a");
    assert_eq!(agents[0]["connected"], true);
    assert_eq!(agents[0]["acknowledgedRevision"], got["revision"]);
    assert!(agents[0]["acknowledgedAt"].is_string());

    // An acknowledging agent: the PATCH with wait answers 200 with the new revision acked.
    let new_value = format!("v2-{}", random_token(24));
    let (status, rotated) = api
        .patch(
            &format!("{path}?wait=5s"),
            &key,
            json!({"value": new_value}),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["propagation"]["complete"], true);
    assert_eq!(
        rotated["propagation"]["agents"][0]["acknowledgedRevision"],
        rotated["revision"]
    );
    let pushed = link
        .wait_for(|m| put_secret(m).is_some_and(|s| s.value.expose() == new_value))
        .await;
    assert_eq!(put_secret(&pushed).unwrap().revision.0, rotated["revision"]);

    // A silent agent: 504 naming it, the change stored; the GET shows it pending.
    link.silent.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let reply = api
        .patch(
            &format!("{path}?wait=300ms"),
            &key,
            json!({"description": "y"}),
        )
        .await;
    assert_error(&reply, 504);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let msg = reply.1["message"].as_str().unwrap();
    assert!(
        msg.contains("a000000000000000000000000000000a") && msg.contains("stored"),
        "{msg}"
    );
    let (_, pending) = api.get(&path, &key).await;
    assert_eq!(pending["description"], "y", "stored despite the 504");
    assert_eq!(pending["propagation"]["complete"], false);
    let behind = pending["propagation"]["agents"][0]["acknowledgedRevision"]
        .as_u64()
        .unwrap();
    assert!(behind < pending["revision"].as_u64().unwrap());
    // Bad wait values: 400 before anything is changed.
    for bad in ["0", "61s", "soon"] {
        let reply = api
            .patch(
                &format!("{path}?wait={bad}"),
                &key,
                json!({"description": "z"}),
            )
            .await;
        assert_error(&reply, 400);
    }

    // The agent goes away while behind: still pending (it may keep using the old value);
    // it comes back (same id) and acknowledges through its snapshot.
    drop(link);
    let gone = get_until(&api, &key, &id, |s| {
        s["propagation"]["agents"][0]["connected"] == false
    })
    .await;
    assert_eq!(gone["propagation"]["complete"], false);
    let _back = Link::connect(&control.agent_socket, "a000000000000000000000000000000a").await;
    let caught_up = get_until(&api, &key, &id, |s| s["propagation"]["complete"] == true).await;
    assert_eq!(
        caught_up["propagation"]["agents"][0]["acknowledgedRevision"],
        caught_up["revision"]
    );
    // A no-op PATCH with wait answers at once when everyone is current.
    let (status, _) = api.patch(&format!("{path}?wait=1s"), &key, json!({})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_blocked_reports_are_aggregated_persisted_and_audited() {
    require_root();
    let mut control = Control::start_with_config(&linked_config(true, 5000));
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let created = api
        .create_secret(&key, "used", &format!("u-{}", random_token(24)), &[])
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        api.get(&format!("/secret/{id}"), &key).await.1["lastUsedAt"],
        Value::Null
    );
    let link = Link::connect(&control.agent_socket, "a0000000000000000000000000000002").await;
    let report = |host: &str, substituted: u64, wrong_host: u64| UsageReport {
        substituted,
        wrong_host,
        ..UsageReport::new("sb-u".parse().unwrap(), id.parse().unwrap(), host.into())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    link.send(&AgentMsg::Usage {
        at_ms: now,
        reports: vec![report("api.a.test", 40, 0), report("other.test", 0, 2)],
    })
    .await;
    link.send(&AgentMsg::Usage {
        at_ms: now + 1000,
        reports: vec![report("api.a.test", 2, 0)],
    })
    .await;
    link.send(&AgentMsg::Blocked {
        events: vec![BlockedReport {
            sandbox: "sb-u".parse().unwrap(),
            secret_id: id.parse().unwrap(),
            host: "evil.test".into(),
            at_ms: now + 1500,
        }],
    })
    .await;
    // A report about a secret that does not exist is ignored.
    link.send(&AgentMsg::Usage {
        at_ms: now,
        reports: vec![UsageReport {
            secret_id: "no-such-secret".parse().unwrap(),
            ..report("x.test", 1, 0)
        }],
    })
    .await;
    let got = get_until(&api, &key, &id, |s| {
        s["usage"]["api.a.test"]["substituted"] == 42
    })
    .await;
    assert_eq!(got["usage"]["other.test"]["wrongHost"], 2);
    assert_eq!(got["usage"]["other.test"]["lastUsedAt"], Value::Null);
    let last_used = got["lastUsedAt"].as_str().unwrap().to_owned();
    assert_eq!(got["usage"]["api.a.test"]["lastUsedAt"], last_used.as_str());
    assert_eq!(got["revision"], 1, "usage is not a change of the secret");
    assert_eq!(got["updatedAt"], created["updatedAt"]);

    // Aggregated audit: one entry per (report, sandbox, host), not one per request.
    let used = audit_of(&api, &key, "secret.used").await;
    assert_eq!(used.len(), 3, "{used:?}");
    let total: u64 = used
        .iter()
        .map(|e| e["changes"]["substituted"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 42);
    assert_eq!(used[0]["targetId"], id.as_str());
    assert_eq!(used[0]["changes"]["sandboxId"], "sb-u");
    assert_eq!(
        used[0]["actorKeyId"],
        "veil-agent:a0000000000000000000000000000002"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = audit_of(&api, &key, "secret.blocked").await;
        if !events.is_empty() || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0]["changes"],
        json!({"sandboxId": "sb-u", "host": "evil.test"})
    );
    assert_eq!(events[0]["targetId"], id.as_str());

    // Durable: the counts survive a control restart.
    drop(link);
    control.restart();
    let api = control.api();
    let (_, after) = api.get(&format!("/secret/{id}"), &key).await;
    assert_eq!(after["usage"], got["usage"]);
    assert_eq!(after["lastUsedAt"], last_used.as_str());

    // Deleting the secret deletes its usage (a new secret of the same name starts at zero).
    let (status, _) = api.delete(&format!("/secret/{id}"), &key).await;
    assert_eq!(status, 204);
    let again = api
        .create_secret(&key, "used", &format!("u-{}", random_token(24)), &[])
        .await;
    let (_, fresh) = api
        .get(&format!("/secret/{}", again["id"].as_str().unwrap()), &key)
        .await;
    assert_eq!(fresh["usage"], json!({}));
}
