//! Issue 7 end to end: rotation, delete and detach under continuous traffic, with a real
//! veil-control and veil-agent, real clients in sandboxes (Python `requests` on one keep-alive
//! connection, one new connection per request, and `httpx` over h2) and a TLS upstream that
//! records what it received, in arrival order. Once control answers (the agents acknowledged),
//! every request the agent sends upstream carries the new state; the one request a client may
//! have had in flight at that moment is the only exception allowed.
//! Also: the propagation and usage fields of `GET /api/secret/{id}` and the aggregated usage
//! audit, before and after an agent restart. Values are compared, never printed.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use veil_tests::Seen;
use veil_tests::clients::python_clients;
use veil_tests::control::random_token;
use veil_tests::intercept_world::{InterceptWorld, Secret};

const HOST: &str = "api.rotate.test";
const SECRET: &str = "rotating-key";
/// Requests each client must make after a change before the test judges it.
const AFTER: usize = 4;

/// The client loop run inside a sandbox: GET `URL/MODE/N` with the placeholder in `x-api-key`
/// until the stop file exists. It prints only error kinds (never a header).
const CLIENT: &str = r#"
import os, ssl, sys, time
mode, url, stop = sys.argv[1], sys.argv[2], sys.argv[3]
key, bundle = os.environ["MY_KEY"], os.environ["SSL_CERT_FILE"]
import requests, httpx
session = requests.Session()
h2 = httpx.Client(http2=True, verify=ssl.create_default_context(cafile=bundle), timeout=10)
i = 0
while not os.path.exists(stop):
    i += 1
    u = f"{url}/{mode}/{i}"
    try:
        if mode == "keepalive":
            session.get(u, headers={"x-api-key": key}, timeout=10).content
        elif mode == "fresh":
            requests.get(u, headers={"x-api-key": key, "connection": "close"}, timeout=10).content
        else:
            h2.get(u, headers={"x-api-key": key}).content
    except Exception as e:
        print("request error:", type(e).__name__, flush=True)
        time.sleep(0.05)
    time.sleep(0.005)
"#;

/// What one request carried in `x-api-key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carried {
    /// The n-th value the test set (0 = the first).
    Value(usize),
    /// The placeholder, unsubstituted.
    Placeholder,
    /// Anything else (or nothing): always a failure.
    Other,
}

struct Setup {
    w: InterceptWorld,
    key: Secret,
    /// Every value set so far, in order (index = [`Carried::Value`]).
    values: Vec<String>,
    /// The sandboxes' ids, by index.
    ids: Vec<String>,
}

impl Setup {
    fn new() -> Setup {
        let w = InterceptWorld::builder("rotation test CA", &[HOST]).start();
        let value = format!("rot-v0-{}", random_token(32));
        let key = w.secret_valued(SECRET, value.clone(), &[HOST], json!({}));
        Setup {
            w,
            key,
            values: vec![value],
            ids: Vec::new(),
        }
    }

    /// Registers sandbox `id` with the secret mounted as `MY_KEY`; returns its index.
    fn add_sandbox(&mut self, id: &str) -> usize {
        let i = self.w.add_sandbox(id, &[("MY_KEY", SECRET)]);
        assert_eq!(
            self.w.answer(i)["env"]["MY_KEY"],
            self.key.placeholder.as_str()
        );
        self.ids.push(id.to_owned());
        i
    }

    /// Starts a client loop in sandbox `i`; its requests go to `/<tag>/<mode>/<n>`.
    fn traffic(&self, i: usize, mode: &str) -> Traffic {
        // Unique per call: a stopped loop leaves its stop file behind.
        let tag = format!("{}-{mode}-{}", self.ids[i], random_token(8));
        let stop = self.w.scratch().join(format!("stop-{tag}"));
        let log = self.w.scratch().join(format!("{tag}.log"));
        let out = std::fs::File::create(&log).expect("client log");
        let url = self.w.url(HOST, &format!("/{}", self.ids[i]));
        let mut cmd = self.w.command(i, python_clients().to_str().expect("path"));
        cmd.args(["-c", CLIENT, mode, &url])
            .arg(&stop)
            .env("MY_KEY", &self.key.placeholder)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out);
        let child = cmd.spawn().expect("starting the client");
        Traffic {
            child,
            stop,
            log,
            prefix: format!("/{}/{mode}/", self.ids[i]),
        }
    }

    fn classify(&self, seen: &Seen) -> Carried {
        match seen.header("x-api-key") {
            Some(v) if v == self.key.placeholder => Carried::Placeholder,
            Some(v) => self
                .values
                .iter()
                .position(|x| x == v)
                .map_or(Carried::Other, Carried::Value),
            None => Carried::Other,
        }
    }

    /// What each request of `client` carried, from upstream request `from` on.
    fn carried(&self, client: &Traffic, from: usize) -> Vec<Carried> {
        self.w.up.seen()[from..]
            .iter()
            .filter(|s| s.target.starts_with(&client.prefix))
            .map(|s| self.classify(s))
            .collect()
    }

    /// Waits until every client made [`AFTER`] requests from upstream request `from` on.
    fn wait_requests(&self, clients: &[&Traffic], from: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if clients.iter().all(|c| self.carried(c, from).len() >= AFTER) {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = clients.iter().map(|c| c.log()).collect();
                panic!("clients stopped making requests; their logs: {logs:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// After a change control answered for at upstream request `from`: each client's first
    /// request may predate it (`before`), every later one carries `after`.
    fn assert_switched(&self, clients: &[&Traffic], from: usize, before: Carried, after: Carried) {
        self.wait_requests(clients, from);
        for c in clients {
            let carried = self.carried(c, from);
            assert!(
                carried[0] == before || carried[0] == after,
                "{}: the request in flight carried {:?} (expected {before:?} or {after:?})",
                c.prefix,
                carried[0]
            );
            assert!(
                carried[1..].iter().all(|x| *x == after),
                "{}: after control answered, requests carried {carried:?}, expected only {after:?}",
                c.prefix
            );
        }
    }

    fn api(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let api = self.w.veil.api();
        let key = self.w.veil.key();
        self.w.veil.block_on(async {
            match method {
                "GET" => api.get(path, key).await,
                "PATCH" => api.patch(path, key, body).await,
                "PUT" => api.put(path, key, body).await,
                "DELETE" => api.delete(path, key).await,
                _ => unreachable!("method {method}"),
            }
        })
    }

    fn secret(&self) -> Value {
        let (status, s) = self.api("GET", &format!("/secret/{}", self.key.id), Value::Null);
        assert_eq!(status, 200, "{s}");
        s
    }

    /// Polls the secret until `pred` holds (15 s).
    fn secret_until(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = self.secret();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what} never happened: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// PATCHes a new value with `?wait=5s`; returns the answer (200 asserted).
    fn rotate(&mut self) -> Value {
        let value = format!("rot-v{}-{}", self.values.len(), random_token(32));
        self.values.push(value.clone());
        let (status, answer) = self.api(
            "PATCH",
            &format!("/secret/{}?wait=5s", self.key.id),
            json!({ "value": value }),
        );
        assert_eq!(status, 200, "rotation: {answer}");
        answer
    }

    /// The upstream's `secret.used` audit entries for sandbox `sb`.
    fn used_audit(&self, sb: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/audit?limit=200&order=asc&cursor={c}"),
                None => "/audit?limit=200&order=asc".to_owned(),
            };
            let (status, page) = self.api("GET", &path, Value::Null);
            assert_eq!(status, 200, "{page}");
            out.extend(
                page["items"]
                    .as_array()
                    .expect("items")
                    .iter()
                    .filter(|e| e["action"] == "secret.used" && e["changes"]["sandboxId"] == sb)
                    .cloned(),
            );
            match page["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }
}

/// A client loop in a sandbox; stopped (stop file, then SIGKILL by pid) on drop.
struct Traffic {
    child: Child,
    stop: PathBuf,
    log: PathBuf,
    prefix: String,
}

impl Traffic {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asks the loop to stop and waits for it.
    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.halt();
    }
}

#[test]
fn rotation_under_continuous_traffic_switches_at_the_acknowledgement() {
    let mut s = Setup::new();
    let sb = s.add_sandbox("rot");
    let clients = [
        s.traffic(sb, "keepalive"),
        s.traffic(sb, "fresh"),
        s.traffic(sb, "h2"),
    ];
    let all: Vec<&Traffic> = clients.iter().collect();
    s.wait_requests(&all, 0);
    for c in &clients {
        let carried = s.carried(c, 0);
        assert!(
            carried.iter().all(|x| *x == Carried::Value(0)),
            "{}: before any rotation: {carried:?}",
            c.prefix
        );
    }
    let h2 =
        s.w.up
            .seen()
            .iter()
            .filter(|x| x.target.starts_with(&clients[2].prefix))
            .all(|x| x.version == "HTTP/2.0");
    assert!(h2, "the h2 client's requests reached the upstream over h2");
    for n in 1..=5 {
        let answer = s.rotate();
        // The answer came after the acknowledgement: everything after it is judged.
        let from = s.w.up.seen().len();
        assert_eq!(answer["revision"], n + 1);
        assert_eq!(answer["propagation"]["complete"], true, "{answer}");
        let agents = answer["propagation"]["agents"].as_array().expect("agents");
        assert_eq!(agents.len(), 1, "{answer}");
        assert_eq!(agents[0]["acknowledgedRevision"], n + 1);
        assert_eq!(agents[0]["connected"], true);
        let n = usize::try_from(n).expect("small");
        s.assert_switched(&all, from, Carried::Value(n - 1), Carried::Value(n));
    }
    // No request ever carried anything but a value set by the test, in order.
    let carried: Vec<Carried> = s.w.up.seen().iter().map(|x| s.classify(x)).collect();
    for c in &clients {
        let mine: Vec<usize> =
            s.w.up
                .seen()
                .iter()
                .filter(|x| x.target.starts_with(&c.prefix))
                .map(|x| match s.classify(x) {
                    Carried::Value(i) => i,
                    other => panic!("{}: a request carried {other:?}", c.prefix),
                })
                .collect();
        assert!(
            mine.windows(2).all(|w| w[0] <= w[1]),
            "{}: an older value came back",
            c.prefix
        );
    }
    assert!(
        carried.len() > 20,
        "continuous traffic: {} requests",
        carried.len()
    );
}

#[test]
fn delete_and_detach_stop_resolution_at_the_answer() {
    let mut s = Setup::new();
    let a = s.add_sandbox("keep");
    let b = s.add_sandbox("detach");
    let ta = s.traffic(a, "keepalive");
    let tb = s.traffic(b, "keepalive");
    let tb_fresh = s.traffic(b, "fresh");
    s.wait_requests(&[&ta, &tb, &tb_fresh], 0);

    // Detach from one of the two sandboxes (re-registered without the mount): only it stops
    // resolving the placeholder; the other keeps the value, on the same upstream.
    let detach_id = s.ids[b].clone();
    let entry = s.w.sandboxes[b].agent_entry(&detach_id);
    let answer = s.w.veil.register_with(&entry, &[]);
    assert!(
        answer["env"].as_object().is_none_or(|e| e.is_empty()),
        "{answer}"
    );
    let from = s.w.up.seen().len();
    s.assert_switched(
        &[&tb, &tb_fresh],
        from,
        Carried::Value(0),
        Carried::Placeholder,
    );
    s.assert_switched(&[&ta], from, Carried::Value(0), Carried::Value(0));
    let after = s.secret();
    assert_eq!(after["propagation"]["complete"], true, "{after}");

    // Delete: the placeholder resolves nowhere.
    let (status, body) = s.api("DELETE", &format!("/secret/{}", s.key.id), Value::Null);
    assert_eq!(status, 204, "{body}");
    let from = s.w.up.seen().len();
    s.assert_switched(&[&ta], from, Carried::Value(0), Carried::Placeholder);
    s.assert_switched(
        &[&tb, &tb_fresh],
        from,
        Carried::Placeholder,
        Carried::Placeholder,
    );
    let (status, _) = s.api("GET", &format!("/secret/{}", s.key.id), Value::Null);
    assert_eq!(status, 404);
}

#[test]
fn propagation_and_usage_fields_survive_an_agent_restart() {
    let mut s = Setup::new();
    let sb = s.add_sandbox("usage");
    let id = s.ids[sb].clone();
    let fresh = s.secret();
    assert_eq!(fresh["lastUsedAt"], Value::Null);
    assert_eq!(fresh["usage"], json!({}));
    let agents = fresh["propagation"]["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 1, "{fresh}");
    let agent_id = agents[0]["agentId"].as_str().expect("agentId").to_owned();
    assert_eq!(agents[0]["acknowledgedRevision"], 1);
    assert_eq!(fresh["propagation"]["complete"], true);

    // Traffic for a while, then the agent's reports must add up to what the upstream received.
    let started = Instant::now();
    let t = s.traffic(sb, "keepalive");
    s.wait_requests(&[&t], 0);
    std::thread::sleep(Duration::from_secs(2));
    t.stop();
    let elapsed = started.elapsed();
    let substituted =
        s.w.up
            .seen()
            .iter()
            .filter(|x| s.classify(x) == Carried::Value(0))
            .count() as u64;
    let counted = s.secret_until("usage reported in full", |v| {
        v["usage"][HOST]["substituted"].as_u64() == Some(substituted)
    });
    assert!(counted["lastUsedAt"].is_string(), "{counted}");
    assert_eq!(counted["usage"][HOST]["lastUsedAt"], counted["lastUsedAt"]);
    assert_eq!(counted["usage"][HOST]["wrongHost"], 0);
    assert_eq!(
        counted["revision"], 1,
        "usage is not a change of the secret"
    );
    let audit = s.used_audit(&id);
    let audited: u64 = audit
        .iter()
        .map(|e| e["changes"]["substituted"].as_u64().expect("count"))
        .sum();
    assert_eq!(audited, substituted, "the audit counts every substitution");
    // Aggregated: about one entry per second of traffic, not one per request.
    let bound = elapsed.as_secs() + 3;
    assert!(
        (audit.len() as u64) <= bound && (audit.len() as u64) < substituted,
        "{} usage audit entries for {substituted} requests in {elapsed:?}",
        audit.len()
    );
    assert!(audit.iter().all(|e| e["changes"]["host"] == HOST));
    let acked_at = counted["propagation"]["agents"][0]["acknowledgedAt"]
        .as_str()
        .expect("acknowledgedAt")
        .to_owned();

    // The agent restarts: while it is away control shows it disconnected, still holding the
    // revision it acknowledged; back (same id), it re-acknowledges through its snapshot.
    s.w.veil.agent().terminate();
    let away = s.secret_until("agent shown disconnected", |v| {
        v["propagation"]["agents"][0]["connected"] == false
    });
    assert_eq!(away["propagation"]["agents"][0]["acknowledgedRevision"], 1);
    assert_eq!(
        away["propagation"]["agents"][0]["agentId"],
        agent_id.as_str()
    );
    assert_eq!(away["usage"], counted["usage"], "usage outlives the agent");
    s.w.veil.agent().respawn();
    let back = s.secret_until("agent re-acknowledged", |v| {
        let a = &v["propagation"]["agents"][0];
        a["connected"] == true && a["acknowledgedAt"].as_str() > Some(acked_at.as_str())
    });
    assert_eq!(
        back["propagation"]["agents"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(
        back["propagation"]["agents"][0]["agentId"],
        agent_id.as_str()
    );
    assert_eq!(back["propagation"]["agents"][0]["acknowledgedRevision"], 1);
    assert_eq!(back["propagation"]["complete"], true);

    // The restarted agent rotates and reports like the first one; counts continue.
    let answer = s.rotate();
    assert_eq!(
        answer["propagation"]["agents"][0]["acknowledgedRevision"],
        2
    );
    assert_eq!(answer["propagation"]["agents"][0]["connected"], true);
    let from = s.w.up.seen().len();
    let t = s.traffic(sb, "keepalive");
    s.assert_switched(&[&t], from, Carried::Value(1), Carried::Value(1));
    t.stop();
    let total =
        s.w.up
            .seen()
            .iter()
            .filter(|x| matches!(s.classify(x), Carried::Value(_)))
            .count() as u64;
    let later = s.secret_until("usage after the restart", |v| {
        v["usage"][HOST]["substituted"].as_u64() == Some(total)
    });
    assert!(
        later["lastUsedAt"].as_str() > counted["lastUsedAt"].as_str(),
        "lastUsedAt moved on"
    );
}
