//! Issue 13.1, from inside a sandbox: an allowed upstream that echoes (or stored) what it
//! received must never hand a value back after a change of the secrets.
//!
//! - A keep-alive h1 connection (Python `requests` session) and an h2 connection (`httpx`), both
//!   opened before a rotation, make the upstream echo the new value on the same connection.
//! - The same connections, opened before a second secret was mounted, make the upstream echo
//!   that secret's value.
//! - An upstream that stored a value (`POST /store` with body substitution, then `GET /load`)
//!   hands back the rotated-out value after a rotation, also after an agent restart, and a
//!   deleted secret's last value in every sandbox of its organization — scrubbed during
//!   `rotated_value_grace`; with the grace off, or once it has passed, the value comes back
//!   (so these checks can fail).
//!
//! Values are compared, never printed: outputs are redacted before any message.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use veil_tests::clients::python_clients;
use veil_tests::control::random_token;
use veil_tests::https::REFLECT_HEADER;
use veil_tests::interactive::Interactive;
use veil_tests::intercept_world::{InterceptWorld, run_text};
use veil_tests::{HttpsUpstream, UpstreamReply};

const HOST: &str = "api.echo.test";
const TIMEOUT: Duration = Duration::from_secs(60);

/// The attacker's script: one request on a fresh keep-alive (`h1`, Python `requests`) or h2
/// (`httpx`) connection with `$MY_KEY` in the header the upstream echoes; then, once the test
/// answers `go PLACEHOLDER`, a second request on the same connection with that placeholder.
/// Prints `ready|done STATUS CONNECTION` and the body (JSON-quoted) after each.
const SCRIPT: &str = r#"
import json, os, ssl, sys
mode, url = sys.argv[1], sys.argv[2]
if mode == "h1":
    import requests
    session = requests.Session()
    def get(ph):
        r = session.get(url, headers={"x-reflect": ph}, timeout=20)
        pool = session.get_adapter(url).poolmanager.connection_from_url(url)
        return r.status_code, "h1:connections=%d" % pool.num_connections, r.text
else:
    import httpx
    ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    client = httpx.Client(http2=True, verify=ctx, timeout=20)
    def get(ph):
        r = client.get(url, headers={"x-reflect": ph})
        conn = "%s:connection=%d" % (r.http_version, id(r.extensions["network_stream"]))
        return r.status_code, conn, r.text
def show(step, answer):
    status, conn, text = answer
    print(step, status, conn, flush=True)
    print("body", json.dumps(text), flush=True)
show("ready", get(os.environ["MY_KEY"]))
line = sys.stdin.readline().split()
if len(line) != 2 or line[0] != "go":
    sys.exit(3)
show("done", get(line[1]))
"#;

/// A reflecting TLS upstream for [`HOST`] and veil with `rotated_value_grace = grace`.
struct Attack {
    w: InterceptWorld,
    /// Every value the test set, by name (for leak checks and redaction).
    values: Vec<(String, String)>,
}

/// A sandbox (own netns) registered with veil.
struct Victim {
    id: String,
    /// Its index in the world.
    i: usize,
}

/// A secret the test created.
struct Secret {
    id: String,
    name: String,
    placeholder: String,
}

impl Attack {
    fn new(grace: &str) -> Attack {
        let w = InterceptWorld::builder("adversarial rotation CA", &[HOST])
            .control_config(&format!("rotated_value_grace = {grace:?}"))
            .start_with(|ns, ip, ca, names| {
                HttpsUpstream::start_with(ns, ip, Some((ca, names)), UpstreamReply::Reflect)
            });
        Attack {
            w,
            values: Vec::new(),
        }
    }

    fn api(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let (api, key) = (self.w.veil.api(), self.w.veil.key());
        self.w.veil.block_on(async {
            match method {
                "GET" => api.get(path, key).await,
                "POST" => api.post(path, key, body).await,
                "PATCH" => api.patch(path, key, body).await,
                "PUT" => api.put(path, key, body).await,
                "DELETE" => api.delete(path, key).await,
                _ => unreachable!("method {method}"),
            }
        })
    }

    /// A fresh value named `tag` (letters and digits: every encoding of it is itself).
    fn value(&mut self, tag: &str) -> String {
        let v = format!("{tag}{}", random_token(32));
        self.values.push((tag.to_owned(), v.clone()));
        v
    }

    /// Creates secret `name` (allowed for [`HOST`]) with a new value named `tag`.
    fn secret(&mut self, name: &str, tag: &str, body_substitution: bool) -> (Secret, String) {
        let value = self.value(tag);
        let created = self.w.secret_valued(
            name,
            value.clone(),
            &[HOST],
            json!({"bodySubstitution": body_substitution}),
        );
        let secret = Secret {
            id: created.id,
            name: created.name,
            placeholder: created.placeholder,
        };
        (secret, value)
    }

    /// PATCHes a new value named `tag` into `secret`; answers once the agents acknowledged.
    fn rotate(&mut self, secret: &Secret, tag: &str) -> String {
        let value = self.value(tag);
        let (status, answer) = self.api(
            "PATCH",
            &format!("/secret/{}?wait=5s", secret.id),
            json!({ "value": value }),
        );
        assert_eq!(status, 200, "rotation: {answer}");
        assert_eq!(answer["propagation"]["complete"], true, "{answer}");
        let shown = answer.to_string();
        assert!(self.leaks(&shown).is_empty(), "a REST answer shows a value");
        value
    }

    fn delete(&self, secret: &Secret) {
        let (status, body) = self.api("DELETE", &format!("/secret/{}", secret.id), Value::Null);
        assert_eq!(status, 204, "delete: {body}");
    }

    /// Registers sandbox `id` with `(ENV, secret name)` mounts and writes the CA bundle.
    fn sandbox(&mut self, id: &str, mounts: &[(&str, &str)]) -> Victim {
        let i = self.w.add_sandbox(id, mounts);
        Victim {
            id: id.to_owned(),
            i,
        }
    }

    fn url(&self, path: &str) -> String {
        self.w.url(HOST, path)
    }

    /// `program args` in the victim with `MY_KEY` and the CA trust in its environment.
    fn command(&self, victim: &Victim, my_key: &str, program: &str) -> Command {
        let mut cmd = self.w.command(victim.i, program);
        cmd.env("MY_KEY", my_key);
        cmd
    }

    /// curl in the victim; returns success and stdout + stderr.
    fn curl(&self, victim: &Victim, args: &[&str]) -> (bool, String) {
        let mut cmd = self.command(victim, "", "curl");
        cmd.args(["-sS", "--max-time", "20"]).args(args);
        run_text(&mut cmd)
    }

    /// The sandbox makes the upstream keep `placeholder` (substituted in a JSON body).
    fn store(&self, victim: &Victim, placeholders: &[&str]) {
        let body: serde_json::Map<String, Value> = placeholders
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("k{i}"), json!(p)))
            .collect();
        let (ok, out) = self.curl(
            victim,
            &[
                "-H",
                "content-type: application/json",
                "--data",
                &Value::Object(body).to_string(),
                &self.url("/store"),
            ],
        );
        assert!(ok, "store: {}", self.redact(&out));
    }

    /// Whether the upstream's last `/store` body holds each of `values`.
    fn upstream_stored(&self, values: &[&str]) -> bool {
        let seen = self.w.up.seen();
        let stored = seen.iter().rev().find(|s| s.target == "/store");
        stored.is_some_and(|s| values.iter().all(|v| s.body.contains(v)))
    }

    /// The sandbox asks the upstream for what it stored; returns what the sandbox got.
    fn load(&self, victim: &Victim) -> String {
        let (ok, out) = self.curl(victim, &[&self.url("/load")]);
        assert!(ok, "load: {}", self.redact(&out));
        out
    }

    /// Names of the test's values present in `text`.
    fn leaks(&self, text: &str) -> Vec<&str> {
        self.values
            .iter()
            .filter(|(_, v)| text.contains(v.as_str()))
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// `text` with every value replaced by its name, safe to print.
    fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (name, v) in &self.values {
            text = text.replace(v.as_str(), &format!("<VALUE:{name}>"));
        }
        text
    }

    /// Asserts the sandbox got `placeholders` back and none of the test's values.
    fn assert_scrubbed(&self, what: &str, out: &str, placeholders: &[&str]) {
        let leaks = self.leaks(out);
        let shown = placeholders.iter().all(|p| out.contains(p));
        assert!(
            leaks.is_empty() && shown,
            "{what}: values that reached the sandbox {leaks:?}, placeholders shown {shown}:\n{}",
            self.redact(out)
        );
    }

    /// Starts the attacker's script in `victim` (`mode` h1 or h2) and waits for its first
    /// answer, which must show `placeholder` scrubbed back.
    fn open(&self, victim: &Victim, mode: &str, placeholder: &str) -> (Interactive, String) {
        let mut cmd = self.command(
            victim,
            placeholder,
            python_clients().to_str().expect("path"),
        );
        cmd.args(["-c", SCRIPT, mode, &self.url("/reflect/body")]);
        let mut script = Interactive::spawn(&mut cmd);
        let Some(ready) = script.wait_for("ready ", TIMEOUT) else {
            panic!(
                "{mode}: no first answer:\n{}",
                self.redact(&script.output())
            );
        };
        let body = script.wait_for("body ", TIMEOUT).unwrap_or_default();
        self.assert_scrubbed(&format!("{mode} before the change"), &body, &[placeholder]);
        (script, connection(&ready))
    }

    /// Sends `go placeholder` to an opened script and checks its second answer came on the
    /// same connection, showing only `placeholder`.
    fn finish(&self, mode: &str, mut script: Interactive, conn: &str, placeholder: &str) {
        script.send(&format!("go {placeholder}"));
        let (ok, out) = script.finish(TIMEOUT);
        let done = out.lines().find(|l| l.starts_with("done "));
        assert!(
            ok && done.is_some_and(|d| connection(d) == conn && d.contains(" 200 ")),
            "{mode}: the second request did not answer 200 on the connection of the first \
             ({conn}):\n{}",
            self.redact(&out)
        );
        let body = out
            .lines()
            .rfind(|l| l.starts_with("body "))
            .unwrap_or_default();
        self.assert_scrubbed(
            &format!("{mode} on the open connection"),
            body,
            &[placeholder],
        );
    }

    /// What the upstream received in `x-reflect` in its last `/reflect/body` request over
    /// `version`.
    fn reflected(&self, version: &str) -> Option<String> {
        let seen = self.w.up.seen();
        let last = seen
            .iter()
            .rev()
            .find(|s| s.target == "/reflect/body" && s.version == version)?;
        last.header(REFLECT_HEADER).map(str::to_owned)
    }

    /// The agent restarts (SIGTERM, same state dir) and syncs with control again.
    fn restart_agent(&self) {
        let synced = || self.w.veil.log().matches("in sync with control").count();
        let before = synced();
        self.w.veil.agent().terminate();
        self.w.veil.agent().respawn();
        let back = veil_tests::cmd::wait_until(Duration::from_secs(20), || synced() > before);
        assert!(
            back,
            "the agent never synced again:\n{}",
            self.w.veil.agent().log_tail(20)
        );
    }

    /// `veil-control verify` through the daemon (never shows a value).
    fn verify(&self) -> Value {
        let control = self.w.veil.control();
        let out = control.cli(&[
            "verify",
            "--data-dir",
            control.data_dir.to_str().expect("path"),
        ]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert!(report["ok"] == true, "verify failed: {report}");
        report
    }
}

/// `h1:connections=1` or `HTTP/2:connection=…` from a `ready`/`done` line.
fn connection(line: &str) -> String {
    line.split(' ').nth(2).unwrap_or_default().to_owned()
}

/// A rotation acknowledged to control applies to responses on connections opened before it:
/// the upstream echoes the new value on the same h1 keep-alive and h2 connections, and the
/// sandbox sees only the placeholder.
#[test]
fn rotation_is_scrubbed_on_connections_opened_before_it() {
    let mut w = Attack::new("24h");
    let (key, _) = w.secret("echo-key", "value-before", false);
    let victim = w.sandbox("adv-rot", &[("MY_KEY", &key.name)]);
    let (h1, h1_conn) = w.open(&victim, "h1", &key.placeholder);
    let (h2, h2_conn) = w.open(&victim, "h2", &key.placeholder);
    assert!(h2_conn.starts_with("HTTP/2:"), "{h2_conn}");
    let new = w.rotate(&key, "value-after");
    w.finish("h1", h1, &h1_conn, &key.placeholder);
    w.finish("h2", h2, &h2_conn, &key.placeholder);
    for version in ["HTTP/1.1", "HTTP/2.0"] {
        assert!(
            w.reflected(version).as_deref() == Some(new.as_str()),
            "{version}: the upstream did not get the new value, so nothing was tested"
        );
    }
}

/// A secret mounted after the connection opened (`PUT /api/sandbox/{id}/secrets`): its value,
/// echoed on that connection, is scrubbed.
#[test]
fn a_secret_mounted_later_is_scrubbed_on_connections_opened_before() {
    let mut w = Attack::new("24h");
    let (first, _) = w.secret("first-key", "value-first", false);
    let (later, later_value) = w.secret("later-key", "value-later", false);
    let victim = w.sandbox("adv-mount", &[("MY_KEY", &first.name)]);
    let (h1, h1_conn) = w.open(&victim, "h1", &first.placeholder);
    let (h2, h2_conn) = w.open(&victim, "h2", &first.placeholder);
    let (status, answer) = w.api(
        "PUT",
        &format!("/sandbox/{}/secrets", victim.id),
        json!({"secrets": [{"MY_KEY": first.name}, {"LATER_KEY": later.name}]}),
    );
    assert_eq!(status, 200, "mount: {answer}");
    w.finish("h1", h1, &h1_conn, &later.placeholder);
    w.finish("h2", h2, &h2_conn, &later.placeholder);
    for version in ["HTTP/1.1", "HTTP/2.0"] {
        assert!(
            w.reflected(version).as_deref() == Some(later_value.as_str()),
            "{version}: the upstream did not get the mounted value, so nothing was tested"
        );
    }
}

/// The rotated-out value, handed back by an upstream that stored it, is scrubbed during the
/// grace period — also after the agent restarted (control sends it again).
#[test]
fn a_rotated_out_value_stays_scrubbed_during_the_grace_also_after_an_agent_restart() {
    let mut w = Attack::new("24h");
    let (key, old) = w.secret("stored-key", "value-rotated-out", true);
    let victim = w.sandbox("adv-prev", &[("MY_KEY", &key.name)]);
    w.store(&victim, &[&key.placeholder]);
    assert!(
        w.upstream_stored(&[&old]),
        "the upstream did not store the value"
    );
    w.rotate(&key, "value-current");
    let out = w.load(&victim);
    w.assert_scrubbed("rotated-out value", &out, &[&key.placeholder]);
    // Kept in the store (sealed), never in a REST answer.
    let report = w.verify();
    let kept = report["secrets"][0]["previous"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(kept, 1, "{report}");
    let (_, shown) = w.api("GET", &format!("/secret/{}", key.id), Value::Null);
    assert!(w.leaks(&shown.to_string()).is_empty() && shown.get("previous").is_none());

    w.restart_agent();
    let out = w.load(&victim);
    w.assert_scrubbed(
        "rotated-out value after an agent restart",
        &out,
        &[&key.placeholder],
    );
}

/// A deleted secret's last value is scrubbed during the grace period in every sandbox of its
/// organization (mounted or not), and its placeholder is no longer substituted.
#[test]
fn a_deleted_secret_last_value_is_scrubbed_in_every_sandbox_of_its_org() {
    let mut w = Attack::new("24h");
    let (key, last) = w.secret("deleted-key", "value-deleted", true);
    let victim = w.sandbox("adv-del", &[("MY_KEY", &key.name)]);
    // Another sandbox of the organization whose connections to the host veil intercepts for
    // a secret of its own (a sandbox holding no secret for a host is passed through untouched,
    // for deleted and live values alike: it never held the placeholder).
    let (own, _) = w.secret("other-key", "value-of-the-other", false);
    let other = w.sandbox("adv-del-other", &[("OWN_KEY", &own.name)]);
    w.store(&victim, &[&key.placeholder]);
    assert!(
        w.upstream_stored(&[&last]),
        "the upstream did not store the value"
    );
    w.delete(&key);
    for (who, v) in [
        ("the sandbox that mounted it", &victim),
        ("another sandbox", &other),
    ] {
        let out = w.load(v);
        w.assert_scrubbed(&format!("deleted value, {who}"), &out, &[&key.placeholder]);
    }
    // Scrub-only: the placeholder goes out as it is.
    let header = format!("{REFLECT_HEADER}: {}", key.placeholder);
    let (ok, out) = w.curl(
        &victim,
        &["--http1.1", "-H", &header, &w.url("/reflect/body")],
    );
    assert!(ok, "{}", w.redact(&out));
    assert_eq!(
        w.reflected("HTTP/1.1").as_deref(),
        Some(key.placeholder.as_str())
    );
    let report = w.verify();
    assert_eq!(report["deleted"][0]["id"], key.id.as_str(), "{report}");
    w.restart_agent();
    let out = w.load(&other);
    w.assert_scrubbed(
        "deleted value after an agent restart",
        &out,
        &[&key.placeholder],
    );
}

/// With `rotated_value_grace = "0"` the checks above see the leak: the upstream hands the
/// rotated-out value, then a deleted secret's value, back to the sandbox.
#[test]
fn without_a_grace_rotated_out_and_deleted_values_come_back() {
    let mut w = Attack::new("0");
    let (key, old) = w.secret("stored-key", "value-rotated-out", true);
    let victim = w.sandbox("adv-nograce", &[("MY_KEY", &key.name)]);
    w.store(&victim, &[&key.placeholder]);
    let current = w.rotate(&key, "value-current");
    let out = w.load(&victim);
    assert!(
        w.upstream_stored(&[&old]) && w.leaks(&out) == ["value-rotated-out"],
        "without a grace the rotated-out value should come back: {}",
        w.redact(&out)
    );
    w.store(&victim, &[&key.placeholder]);
    assert!(w.upstream_stored(&[&current]));
    w.delete(&key);
    let out = w.load(&victim);
    assert_eq!(w.leaks(&out), ["value-current"], "{}", w.redact(&out));
    assert_eq!(w.verify()["deleted"], json!([]));
}

/// Past the grace, rotated-out values and tombstones are dropped from the store and the agents
/// are told: the stored values reach the sandbox again (nothing scrubs them any more).
#[test]
fn past_the_grace_values_are_dropped_and_no_longer_sent() {
    let mut w = Attack::new("2s");
    let (kept, old) = w.secret("rotated-key", "value-rotated-out", true);
    let (gone, last) = w.secret("deleted-key", "value-deleted", true);
    let victim = w.sandbox(
        "adv-expiry",
        &[("MY_KEY", &kept.name), ("GONE_KEY", &gone.name)],
    );
    w.store(&victim, &[&kept.placeholder, &gone.placeholder]);
    assert!(
        w.upstream_stored(&[&old, &last]),
        "the upstream did not store the values"
    );
    w.rotate(&kept, "value-current");
    w.delete(&gone);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = w.load(&victim);
        let mut leaks = w.leaks(&out);
        leaks.sort();
        if leaks == ["value-deleted", "value-rotated-out"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "values past the grace are still scrubbed (the agents still hold them): {}",
            w.redact(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = w.verify();
    assert_eq!(report["deleted"], json!([]), "{report}");
    assert_eq!(report["secrets"][0]["previous"], json!([]), "{report}");
}
