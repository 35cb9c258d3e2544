//! A placeholder sent to a host its secret does not allow (issue 6): with `wrongHost: block` the
//! request is answered 403 and audited, nothing reaches the upstream; by default it is forwarded
//! unchanged. Real curl in sandboxes, a real TLS upstream; assertions never print a value.

use std::time::Duration;

use serde_json::json;
use veil_tests::request_policy::{ALLOWED, OTHER, last_for, setup};

#[test]
fn block_mode_answers_403_and_leaves_an_audit_record() {
    let mut s = setup("");
    let key = s.secret(
        "blocking-key",
        &[ALLOWED],
        json!({"wrongHost": "block", "bodySubstitution": true}),
    );
    let sb = s.add_sandbox("rp-block", &[("K", "blocking-key")]);
    let redact = [&key];

    // In a header to a host the secret does not allow: 403 naming the secret, nothing sent.
    let before = s.seen().len();
    let header = format!("x-api-key: {}", key.placeholder);
    let (ok, out) = s.curl(
        sb,
        &[
            "-H",
            &header,
            "-w",
            "\nstatus=%{http_code}",
            &s.url(OTHER, "/h"),
        ],
        &redact,
    );
    assert!(ok, "curl: {out}");
    assert!(out.contains("status=403"), "{out}");
    let message = format!(
        "veil: secret {} ({}) is not allowed for host {OTHER}",
        key.name, key.id
    );
    assert!(out.contains(&message), "{out}");
    assert!(!out.contains("<VALUE!>"));
    assert_eq!(s.seen().len(), before, "nothing reached the upstream");

    // In a JSON body (body substitution is on for it): blocked too.
    let body = format!("{{\"k\":\"{}\"}}", key.placeholder);
    let (_, out) = s.curl(
        sb,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            "-w",
            "\nstatus=%{http_code}",
            &s.url(OTHER, "/b"),
        ],
        &redact,
    );
    assert!(out.contains("status=403"), "{out}");
    assert_eq!(s.seen().len(), before, "nothing reached the upstream");

    // Without a placeholder the same host works, and the allowed host still gets the value.
    let (ok, out) = s.curl(sb, &[&s.url(OTHER, "/fine")], &redact);
    assert!(ok && !out.contains("veil:"), "{out}");
    let (ok, out) = s.curl(sb, &["-H", &header, &s.url(ALLOWED, "/ok")], &redact);
    assert!(ok, "{out}");
    let seen = last_for(&s.seen(), "/ok");
    assert!(
        seen.header("x-api-key") == Some(key.value.as_str()),
        "allowed host substituted"
    );
    assert!(s.counter("blocked") >= 2.0);

    // Control records each refusal as secret.blocked, naming the secret and the host.
    let found = veil_tests::cmd::wait_until(Duration::from_secs(20), || {
        let (status, page) = s
            .veil
            .block_on(s.veil.api().get("/audit?limit=100", s.veil.key()));
        status == 200
            && page["items"].as_array().is_some_and(|items| {
                items.iter().any(|i| {
                    i["action"] == "secret.blocked"
                        && i["targetId"] == key.id.as_str()
                        && i["changes"]["host"] == OTHER
                        && i["changes"]["sandboxId"] == "rp-block"
                })
            })
    });
    let (_, page) = s
        .veil
        .block_on(s.veil.api().get("/audit?limit=100", s.veil.key()));
    let actions: Vec<&str> = page["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["action"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        found,
        "no secret.blocked audit record for the secret and {OTHER}; actions: {actions:?}"
    );
    assert!(
        !page.to_string().contains(&key.value),
        "no value in the audit"
    );
}

#[test]
fn default_mode_forwards_the_placeholder_to_other_hosts() {
    let mut s = setup("");
    let key = s.secret("fwd-key", &[ALLOWED], json!({}));
    // A second secret for OTHER makes connections to it intercepted: the first secret's
    // placeholder is then seen by veil and still forwarded unchanged.
    let other = s.secret("other-key", &[OTHER], json!({}));
    let sb = s.add_sandbox("rp-fwd", &[("K", "fwd-key"), ("O", "other-key")]);
    let only = s.add_sandbox("rp-fwd-only", &[("K", "fwd-key")]);
    let header = format!("x-api-key: {}", key.placeholder);
    for (i, path) in [(sb, "/intercepted"), (only, "/passed")] {
        let (ok, out) = s.curl(i, &["-H", &header, &s.url(OTHER, path)], &[&key, &other]);
        assert!(ok && !out.contains("veil:"), "{path}: {out}");
        let seen = last_for(&s.seen(), path);
        assert!(
            seen.header("x-api-key") == Some(key.placeholder.as_str()),
            "{path}: placeholder forwarded unchanged"
        );
    }
    assert_eq!(s.counter("blocked"), 0.0);
}
