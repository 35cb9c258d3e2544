//! Issue 16: veil-control replicas on one PostgreSQL. Any replica serves any REST call; a change
//! made through one reaches the agents of the others (NOTIFY, and a snapshot after every
//! reconnect); an acknowledged write survives `kill -9` of the replica that made it; a
//! PostgreSQL outage is a 503 that heals by itself while sandboxes keep working; and a replica
//! refuses to start with other keys, on a newer schema, or with a password in its config.
//! Values are compared, never printed.

use std::time::Duration;

use serde_json::{Value, json};
use veil_tests::agent::AgentOptions;
use veil_tests::cmd::wait_until;
use veil_tests::control::{Control, random_token};
use veil_tests::intercept_world::InterceptWorld;
use veil_tests::postgres::Postgres;
use veil_tests::replicas::{api_only, start_replica, store_config};
use veil_tests::veil::Veil;
use veil_tests::{AgentSandbox, Sandbox};

const PERMS: &[&str] = &["manage:secrets", "write:sandboxes", "read:audit"];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn any_replica_serves_any_call() {
    let pg = Postgres::start();
    let a = Control::start_with_config(&api_only(&pg));
    let b = start_replica(&api_only(&pg), &a.data_dir);
    let key = a.apikey("acme", PERMS);
    let rt = rt();
    let (api_a, api_b) = (a.api(), b.api());
    let created = rt.block_on(api_a.create_secret(&key, "shared", "v-one", &["api.example.com"]));
    let id = created["id"].as_str().expect("id").to_owned();
    // The key made on A's host authenticates on B; the secret made through A reads through B.
    let (status, got) = rt.block_on(api_b.get(&format!("/secret/{id}"), &key));
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["placeholder"], created["placeholder"]);
    assert_eq!(got["revision"], created["revision"]);
    // A change through B is what A answers next.
    let (status, _) = rt.block_on(api_b.patch(
        &format!("/secret/{id}"),
        &key,
        json!({"description": "changed through B"}),
    ));
    assert_eq!(status, 200);
    let (_, via_a) = rt.block_on(api_a.get(&format!("/secret/{id}"), &key));
    assert_eq!(via_a["description"], "changed through B");
    // A name is unique across replicas.
    let (status, body) =
        rt.block_on(api_b.post("/secret", &key, json!({"name": "shared", "value": "other"})));
    assert_eq!(status, 409, "{body}");
    // One audit log, in one order, whichever replica answers.
    let (_, audit_a) = rt.block_on(api_a.get("/audit?limit=100", &key));
    let (_, audit_b) = rt.block_on(api_b.get("/audit?limit=100", &key));
    assert_eq!(audit_a, audit_b);
    let actions: Vec<&str> = audit_a["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.starts_with(&["secret.update", "secret.create"]),
        "{actions:?}"
    );
    // Deleted through A, gone through B.
    let (status, _) = rt.block_on(api_a.delete(&format!("/secret/{id}"), &key));
    assert_eq!(status, 204);
    let (status, _) = rt.block_on(api_b.get(&format!("/secret/{id}"), &key));
    assert_eq!(status, 404);
    // Every value still opens with the replicas' shared key.
    for c in [&a, &b] {
        let out = c.cli(&["verify", "--data-dir", c.data_dir.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_change_through_one_replica_reaches_the_agents_of_another() {
    const HOST: &str = "api.replicas.test";
    let pg = Postgres::start();
    let mut w = InterceptWorld::builder("replicas test CA", &[HOST])
        .control_config(&store_config(&pg))
        .start();
    // Replica A has no agent; B (the world's control) has the one agent.
    let a = start_replica(&api_only(&pg), &w.veil.control().data_dir);
    let key = w.veil.key().to_owned();
    let first = format!("rep-v1-{}", random_token(32));
    let rt = rt();
    let created = rt.block_on(a.api().post(
        "/secret",
        &key,
        json!({"name": "rep", "value": first, "hosts": [HOST]}),
    ));
    assert_eq!(created.0, 201, "{}", created.1);
    let id = created.1["id"].as_str().expect("id").to_owned();
    let sb = w.add_sandbox("rep-sb", &[("MY_KEY", "rep")]);
    let placeholder = w.answer(sb)["env"]["MY_KEY"]
        .as_str()
        .expect("placeholder in the PUT answer")
        .to_owned();
    let header = format!("x-api-key: {placeholder}");
    let carried = |w: &InterceptWorld, n: usize| -> Option<String> {
        let url = w.url(HOST, &format!("/probe/{n}"));
        let (ok, _) = w.curl(sb, &["-H", &header, &url], &[]);
        assert!(ok, "request {n} through the agent failed");
        w.seen()
            .iter()
            .rev()
            .find(|s| s.target == format!("/probe/{n}"))
            .and_then(|s| s.header("x-api-key").map(str::to_owned))
    };
    assert!(
        carried(&w, 0).as_deref() == Some(first.as_str()),
        "not substituted at first"
    );
    // Rotated through A: B's agent substitutes the new value once B heard of it.
    let second = format!("rep-v2-{}", random_token(32));
    let (status, _) = rt.block_on(a.api().patch(
        &format!("/secret/{id}"),
        &key,
        json!({"value": second}),
    ));
    assert_eq!(status, 200);
    let mut n = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            n += 1;
            carried(&w, n).as_deref() == Some(second.as_str())
        }),
        "B's agent never substituted the value rotated through A"
    );
    // Both replicas show the same secret, with the usage B's agent reported (kept in the
    // store, so A, which has no agent, shows it too).
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (_, via_a) = rt.block_on(a.api().get(&format!("/secret/{id}"), &key));
            via_a["lastUsedAt"].is_string()
        }),
        "the usage B's agent reported never showed through A"
    );
    // Acknowledgements reach the other replica within tens of milliseconds; then both agree.
    let fields = [
        "revision",
        "updatedAt",
        "lastUsedAt",
        "usage",
        "propagation",
    ];
    let mut differ = Vec::new();
    let agree = wait_until(Duration::from_secs(5), || {
        let (_, via_a) = rt.block_on(a.api().get(&format!("/secret/{id}"), &key));
        let (_, via_b) = rt.block_on(w.veil.api().get(&format!("/secret/{id}"), &key));
        differ = fields
            .iter()
            .filter(|f| via_a[**f] != via_b[**f])
            .copied()
            .collect();
        differ.is_empty()
    });
    assert!(agree, "the replicas differ in {differ:?}");
}

#[test]
fn a_replica_with_other_keys_refuses_to_start_and_names_the_key() {
    let pg = Postgres::start();
    let a = Control::start_with_config(&api_only(&pg));
    let key = a.apikey("acme", PERMS);
    let created = rt().block_on(a.api().create_secret(&key, "k", "value-sealed-by-a", &[]));
    assert!(created["id"].is_string());
    // B makes its own key instead of holding A's.
    let mut b = Control::prepared(&api_only(&pg), "info", &[]);
    let err = b
        .try_start()
        .expect_err("a replica with another key started");
    let key_id = std::fs::read_to_string(a.data_dir.join("keys/active")).expect("active key");
    assert!(
        err.contains("master key") && err.contains(key_id.trim()),
        "the refusal does not name the missing key: {err}"
    );
}

#[test]
fn a_database_written_by_a_newer_veil_control_is_refused_naming_both_versions() {
    let pg = Postgres::start();
    let mut a = Control::start_with_config(&api_only(&pg));
    a.stop();
    pg.psql("UPDATE veil_schema SET version = 99");
    let err = a.try_start().expect_err("started on a newer schema");
    assert!(
        err.contains("version 99") && err.contains("this veil-control's (version "),
        "{err}"
    );
}

#[test]
fn a_password_in_the_config_file_is_refused_naming_the_file() {
    let pg = Postgres::start();
    let config = format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgresql://postgres:hunter2-{}@127.0.0.1:{}/postgres\"\n",
        random_token(8),
        pg.port()
    );
    let mut c = Control::prepared(&config, "info", &[]);
    let err = c
        .try_start()
        .expect_err("started with a password in its config");
    let file = c.config_path().display().to_string();
    assert!(err.contains(&file) && err.contains("password"), "{err}");
    assert!(!err.contains("hunter2"), "the refusal repeats the password");
}

#[test]
fn an_acknowledged_write_survives_kill_9_of_the_replica_that_made_it() {
    let pg = Postgres::start();
    let mut a = Control::start_with_config(&api_only(&pg));
    let b = start_replica(&api_only(&pg), &a.data_dir);
    let key = a.apikey("acme", PERMS);
    let api_a = a.api();
    let rt = rt();
    // Writes through A until it dies; every write A answered is recorded.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Option<String>)>::new()));
    // The delete sent when A died, if any: it may or may not have been committed (it was never
    // acknowledged), so its secret may be found either way.
    let unacked_delete = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let writer = {
        let (acked, key) = (acked.clone(), key.clone());
        let unacked_delete = unacked_delete.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            for i in 0.. {
                let name = format!("w{i}");
                let Ok((201, body)) = rt.block_on(api_a.try_send(
                    "POST",
                    "/secret",
                    Some(&key),
                    Some(&json!({"name": name, "value": format!("value-{i}")})),
                )) else {
                    return;
                };
                let id = body["id"].as_str().unwrap_or_default().to_owned();
                acked.lock().expect("lock").push((id.clone(), None));
                // Every third one changed, every fifth deleted: all three kinds of write.
                if i % 3 == 0 {
                    let desc = format!("d{i}");
                    match rt.block_on(api_a.try_send(
                        "PATCH",
                        &format!("/secret/{id}"),
                        Some(&key),
                        Some(&json!({"description": desc})),
                    )) {
                        Ok((200, _)) => acked.lock().expect("lock").push((id.clone(), Some(desc))),
                        _ => return,
                    }
                }
                if i % 5 == 0 {
                    *unacked_delete.lock().expect("lock") = Some(id.clone());
                    match rt.block_on(api_a.try_send(
                        "DELETE",
                        &format!("/secret/{id}"),
                        Some(&key),
                        None,
                    )) {
                        Ok((204, _)) => {
                            *unacked_delete.lock().expect("lock") = None;
                            acked
                                .lock()
                                .expect("lock")
                                .push((id, Some("<deleted>".into())));
                        }
                        _ => return,
                    }
                }
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || acked
            .lock()
            .expect("lock")
            .len()
            >= 40),
        "the writer made too few writes"
    );
    a.kill();
    writer.join().expect("writer");
    let acked = acked.lock().expect("lock").clone();
    let mut last: std::collections::BTreeMap<&str, Option<&str>> = Default::default();
    for (id, change) in &acked {
        let entry = last.entry(id.as_str()).or_insert(None);
        if change.is_some() {
            *entry = change.as_deref();
        }
    }
    let unacked_delete = unacked_delete.lock().expect("lock").clone();
    for (id, change) in last {
        let (status, got) = rt.block_on(b.api().get(&format!("/secret/{id}"), &key));
        if status == 404 && unacked_delete.as_deref() == Some(id) {
            continue;
        }
        match change {
            Some("<deleted>") => assert_eq!(status, 404, "an acknowledged delete of {id} was lost"),
            Some(desc) => {
                assert_eq!(status, 200, "an acknowledged secret {id} was lost");
                assert_eq!(
                    got["description"], desc,
                    "an acknowledged update of {id} was lost"
                );
            }
            None => assert_eq!(status, 200, "an acknowledged secret {id} was lost"),
        }
    }
    let out = b.cli(&["verify", "--data-dir", b.data_dir.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "a value does not decrypt after the kill: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_wait_on_one_replica_waits_for_the_agents_of_every_replica() {
    const HOST: &str = "api.replicas-wait.test";
    let pg = Postgres::start();
    let mut w = InterceptWorld::builder("replicas wait test CA", &[HOST])
        .control_config(&store_config(&pg))
        .start();
    // A second replica with an agent of its own, on the same store and keys.
    let other = Veil::start_replica(
        AgentOptions::default(),
        &store_config(&pg),
        &w.veil.control().data_dir,
    );
    let secret = w.secret("waited", &[HOST], json!({}));
    w.add_sandbox("wait-a", &[("MY_KEY", "waited")]);
    let sb = Sandbox::new("wait-b", None);
    other.register_with(
        &AgentSandbox {
            id: "wait-b".into(),
            cgroup: sb.cgroup().path().to_owned(),
            netns: None,
            egress: None,
        },
        &[("MY_KEY", "waited")],
    );
    let key = w.veil.key().to_owned();
    let path = format!("/secret/{}", secret.id);
    let agents_of = |v: &Value| -> Vec<(String, Value, Value)> {
        v["propagation"]["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .map(|a| {
                (
                    a["agentId"].as_str().unwrap_or_default().to_owned(),
                    a["acknowledgedRevision"].clone(),
                    a["connected"].clone(),
                )
            })
            .collect()
    };
    // Rotated through the world's replica, waiting: acknowledged by both agents, the other
    // replica's included, when the answer comes.
    let rotated = w.veil.block_on(w.veil.api().patch(
        &format!("{path}?wait=10s"),
        &key,
        json!({"value": format!("waited-v2-{}", random_token(24))}),
    ));
    assert_eq!(rotated.0, 200, "{}", rotated.1);
    let revision = rotated.1["revision"].clone();
    let agents = agents_of(&rotated.1);
    assert_eq!(agents.len(), 2, "both agents are listed: {agents:?}");
    assert!(
        agents
            .iter()
            .all(|(_, r, c)| *r == revision && *c == Value::Bool(true)),
        "an agent had not acknowledged when the wait returned: {agents:?}"
    );
    assert_eq!(rotated.1["propagation"]["complete"], true);
    // The other replica shows the same propagation once it read the answering replica's
    // acknowledgements (published within tens of milliseconds).
    let mut mine: Vec<(String, Value)> =
        agents.iter().map(|a| (a.0.clone(), a.1.clone())).collect();
    mine.sort_by(|a, b| a.0.cmp(&b.0));
    let mut theirs = Vec::new();
    let same = wait_until(Duration::from_secs(5), || {
        let (status, via_other) = other.block_on(other.api().get(&path, &key));
        assert_eq!(status, 200);
        theirs = agents_of(&via_other)
            .into_iter()
            .map(|a| (a.0, a.1))
            .collect();
        theirs.sort_by(|a, b| a.0.cmp(&b.0));
        theirs == mine
    });
    assert!(
        same,
        "the other replica shows {theirs:?}, the answering one {mine:?}"
    );
}

#[test]
fn a_postgres_outage_is_a_503_that_heals_while_sandboxes_keep_working() {
    const HOST: &str = "api.replicas-outage.test";
    let pg = Postgres::start();
    let mut w = InterceptWorld::builder("replicas outage test CA", &[HOST])
        .control_config(&store_config(&pg))
        .start();
    let secret = w.secret("outage", &[HOST], json!({}));
    let sb = w.add_sandbox("outage-sb", &[("MY_KEY", "outage")]);
    let placeholder = w.answer(sb)["env"]["MY_KEY"]
        .as_str()
        .expect("placeholder")
        .to_owned();
    let header = format!("x-api-key: {placeholder}");
    let mut n = 0;
    let mut request = |w: &InterceptWorld| -> Option<String> {
        n += 1;
        let target = format!("/outage/{n}");
        let (ok, _) = w.curl(sb, &["-H", &header, &w.url(HOST, &target)], &[]);
        assert!(ok, "request {n} through the agent failed");
        w.seen()
            .iter()
            .rev()
            .find(|s| s.target == target)
            .and_then(|s| s.header("x-api-key").map(str::to_owned))
    };
    assert_eq!(request(&w).as_deref(), Some(secret.value.as_str()));
    let key = w.veil.key().to_owned();
    let path = format!("/secret/{}", secret.id);
    pg.stop();
    // While the database is away: sandboxes keep their secrets; REST says 503 with a message.
    let (status, body) = w.veil.block_on(w.veil.api().get(&path, &key));
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("unavailable")),
        "{body}"
    );
    let down_since = std::time::Instant::now();
    while down_since.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            request(&w).as_deref(),
            Some(secret.value.as_str()),
            "a substituted request failed while PostgreSQL was down"
        );
    }
    pg.start_again();
    // It heals by itself: no restart of veil-control.
    assert!(
        wait_until(Duration::from_secs(30), || {
            w.veil.block_on(w.veil.api().get(&path, &key)).0 == 200
        }),
        "REST did not recover after PostgreSQL came back"
    );
    // Acknowledgements resume: a rotation with wait is acknowledged and applied.
    let value = format!("outage-v2-{}", random_token(24));
    let (status, body) = w.veil.block_on(w.veil.api().patch(
        &format!("{path}?wait=10s"),
        &key,
        json!({"value": value}),
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["propagation"]["complete"], true, "{body}");
    assert_eq!(request(&w).as_deref(), Some(value.as_str()));
}
