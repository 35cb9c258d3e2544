//! Crash safety: a daemon under continuous create/update/delete load is SIGKILLed many times.
//! After each kill every acknowledged write is there, every record decrypts under its binding,
//! and nothing is half-written (value revision and metadata of one PATCH land together).
//!
//! `VEIL_CRASH_KILLS` sets the number of kills (default 20).

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use veil_tests::control::{Api, Control};

#[derive(Clone, Debug, Default)]
struct Tracked {
    /// Highest value update acknowledged (description `rev-N`, revision N+1).
    acked: u64,
    /// Highest value update attempted.
    attempted: u64,
    /// Delete acknowledged.
    deleted: bool,
    /// Delete attempted, outcome unknown.
    maybe_deleted: bool,
    /// The worker that owns it (one writer per secret keeps revisions predictable).
    owner: usize,
}

#[derive(Debug, Default)]
struct Model {
    secrets: HashMap<String, Tracked>,
}

fn rev_of(description: &Value) -> u64 {
    description
        .as_str()
        .and_then(|d| d.strip_prefix("rev-"))
        .and_then(|n| n.parse().ok())
        .expect("description rev-N")
}

async fn worker(
    api: Api,
    key: String,
    w: usize,
    model: Arc<Mutex<Model>>,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicUsize>,
) {
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let live: Vec<(String, Tracked)> = {
            let m = model.lock().unwrap();
            m.secrets
                .iter()
                .filter(|(_, t)| t.owner == w && !t.deleted && !t.maybe_deleted)
                .map(|(id, t)| (id.clone(), t.clone()))
                .collect()
        };
        let roll = rand::rng().random_range(0..10);
        if live.len() < 5 || roll < 4 {
            let name = format!("w{w}-{n}-{}", rand::rng().random::<u32>());
            let value = format!("v-{}", rand::rng().random::<u64>());
            let body = json!({"name": name, "value": value, "description": "rev-0"});
            let Ok(reply) = try_send(&api, "POST", "/secret", &key, Some(body)).await else {
                continue;
            };
            assert_eq!(reply.0, 201, "{}", reply.1);
            let id = reply.1["id"].as_str().unwrap().to_owned();
            model.lock().unwrap().secrets.insert(
                id,
                Tracked {
                    owner: w,
                    ..Tracked::default()
                },
            );
            acks.fetch_add(1, Ordering::Relaxed);
        } else {
            let (id, t) = &live[rand::rng().random_range(0..live.len())];
            if roll < 8 {
                let next = t.attempted + 1;
                model.lock().unwrap().secrets.get_mut(id).unwrap().attempted = next;
                let body = json!({"value": format!("v-{}", rand::rng().random::<u64>()), "description": format!("rev-{next}")});
                let Ok(reply) =
                    try_send(&api, "PATCH", &format!("/secret/{id}"), &key, Some(body)).await
                else {
                    continue;
                };
                assert_eq!(reply.0, 200, "{}", reply.1);
                let mut m = model.lock().unwrap();
                let t = m.secrets.get_mut(id).unwrap();
                t.acked = t.acked.max(next);
                acks.fetch_add(1, Ordering::Relaxed);
            } else {
                model
                    .lock()
                    .unwrap()
                    .secrets
                    .get_mut(id)
                    .unwrap()
                    .maybe_deleted = true;
                let Ok(reply) =
                    try_send(&api, "DELETE", &format!("/secret/{id}"), &key, None).await
                else {
                    continue;
                };
                assert_eq!(reply.0, 204, "{}", reply.1);
                let mut m = model.lock().unwrap();
                let t = m.secrets.get_mut(id).unwrap();
                t.deleted = true;
                t.maybe_deleted = false;
                acks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn try_send(
    api: &Api,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    api.try_send(method, path, Some(key), body.as_ref()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    let kills: usize = std::env::var("VEIL_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut control = Control::start();
    let key = control.apikey("crash", &["manage:secrets"]);
    let model = Arc::new(Mutex::new(Model::default()));
    let total_acks = Arc::new(AtomicUsize::new(0));
    let mut survived = 0;

    for round in 0..kills {
        control.ensure_running();
        let api = control.api();
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                tokio::spawn(worker(
                    api.clone(),
                    key.clone(),
                    w,
                    model.clone(),
                    stop.clone(),
                    acks.clone(),
                ))
            })
            .collect();
        // Let load build up, then kill at a random moment.
        let mut waited = 0;
        while acks.load(Ordering::Relaxed) < 10 && waited < 5000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 10;
        }
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(20..250))).await;
        control.kill();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            // A worker's panic is an assertion failure on a reply: surface it.
            w.await.expect("worker");
        }
        assert!(
            acks.load(Ordering::Relaxed) >= 10,
            "round {round}: no load before the kill"
        );
        total_acks.fetch_add(acks.load(Ordering::Relaxed), Ordering::Relaxed);

        // Offline: every record decrypts and the indexes agree.
        let out = control.cli(&["verify", "--data-dir", control.data_dir.to_str().unwrap()]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert!(
            out.status.success() && report["ok"] == true,
            "round {round}: verify failed: {report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let revisions: HashMap<String, u64> = report["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_owned(),
                    s["revision"].as_u64().unwrap(),
                )
            })
            .collect();

        // Online: acknowledged writes are there; unknown outcomes resolve one way or the other.
        control.ensure_running();
        let api = control.api();
        let mut m = model.lock().unwrap().secrets.clone();
        for (id, t) in m.iter_mut() {
            let (status, body) = api.get(&format!("/secret/{id}"), &key).await;
            if t.deleted {
                assert_eq!(
                    status, 404,
                    "round {round}: acknowledged delete of {id} undone"
                );
                continue;
            }
            if status == 404 {
                assert!(
                    t.maybe_deleted,
                    "round {round}: acknowledged secret {id} lost"
                );
                t.deleted = true;
                t.maybe_deleted = false;
                continue;
            }
            assert_eq!(status, 200);
            t.maybe_deleted = false;
            let rev = rev_of(&body["description"]);
            assert!(
                rev >= t.acked && rev <= t.attempted,
                "round {round}: {id} at rev-{rev}, acked {} attempted {}",
                t.acked,
                t.attempted
            );
            assert_eq!(
                revisions.get(id),
                Some(&(rev + 1)),
                "round {round}: {id}: value revision and metadata diverged (half-written)"
            );
            t.acked = rev;
            t.attempted = rev;
        }
        // Secrets created by an unacknowledged POST may exist: they must be intact too (verify
        // covered decryption); adopt them into the model.
        let (_, all) = api.get("/secret", &key).await;
        for s in all.as_array().unwrap() {
            let id = s["id"].as_str().unwrap();
            if !m.contains_key(id) {
                let rev = rev_of(&s["description"]);
                m.insert(
                    id.to_owned(),
                    Tracked {
                        acked: rev,
                        attempted: rev,
                        owner: usize::MAX,
                        ..Tracked::default()
                    },
                );
            }
        }
        model.lock().unwrap().secrets = m;
        survived += 1;
    }
    let live = model
        .lock()
        .unwrap()
        .secrets
        .values()
        .filter(|t| !t.deleted)
        .count();
    eprintln!(
        "crash test: {survived} SIGKILLs survived, {} acknowledged writes, {live} secrets live",
        total_acks.load(Ordering::Relaxed)
    );
    assert_eq!(survived, kills);
}
