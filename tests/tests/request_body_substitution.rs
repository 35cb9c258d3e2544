//! Body substitution end to end (issue 6): a secret with `bodySubstitution` has its
//! placeholder replaced in JSON and form bodies (not beyond the configured bound), and a value
//! stored upstream that way comes back scrubbed. Real curl in sandboxes, a real TLS upstream;
//! assertions never print a value.

use serde_json::json;
use veil_tests::request_policy::{ALLOWED, BODY_MAX, last_for, setup};

#[test]
fn json_and_form_bodies_are_substituted_and_a_body_over_the_bound_passes_unchanged() {
    let mut s = setup("");
    let key = s.secret("body-key", &[ALLOWED], json!({"bodySubstitution": true}));
    let plain = s.secret("head-only-key", &[ALLOWED], json!({}));
    let sb = s.add_sandbox("rp-body", &[("K", "body-key"), ("P", "head-only-key")]);
    let url = s.url(ALLOWED, "/json");
    let redact = [&key, &plain];

    // JSON: the placeholder of a secret with body substitution becomes the value, Content-Length
    // follows; a secret without it stays a placeholder.
    let body = format!(
        "{{\"key\":\"{}\",\"other\":\"{}\",\"n\":1}}",
        key.placeholder, plain.placeholder
    );
    for flag in ["--http1.1", "--http2"] {
        let (ok, out) = s.curl(
            sb,
            &[
                flag,
                "-H",
                "content-type: application/json",
                "--data-binary",
                &body,
                &url,
            ],
            &redact,
        );
        assert!(ok, "curl {flag}: {out}");
        let seen = last_for(&s.seen(), "/json");
        let expect = body.replace(&key.placeholder, &key.value);
        assert!(
            seen.body == expect,
            "{flag}: JSON body substituted exactly: false"
        );
        assert!(
            seen.body.contains(&plain.placeholder) && !seen.body.contains(&plain.value),
            "{flag}: a secret without body substitution stays a placeholder"
        );
        if let Some(len) = seen.header("content-length") {
            assert_eq!(len, expect.len().to_string(), "{flag}: Content-Length");
        }
    }

    // Form: the value is percent-encoded where the placeholder was (ours is URL-safe anyway).
    let form = format!("a=1&key={}&z=2", key.placeholder);
    let (ok, out) = s.curl(
        sb,
        &[
            "-H",
            "content-type: application/x-www-form-urlencoded",
            "--data-binary",
            &form,
            &s.url(ALLOWED, "/form"),
        ],
        &redact,
    );
    assert!(ok, "curl form: {out}");
    let seen = last_for(&s.seen(), "/form");
    assert!(
        seen.body == form.replace(&key.placeholder, &key.value),
        "form body substituted: false"
    );

    // Over the bound: forwarded byte for byte, placeholder included, and counted.
    let too_large_before = s.counter("body_too_large");
    let big = format!(
        "{{\"key\":\"{}\",\"pad\":\"{}\"}}",
        key.placeholder,
        "x".repeat(BODY_MAX * 3)
    );
    let file = s.body_file("big.json", &big);
    let data = format!("@{file}");
    let (ok, out) = s.curl(
        sb,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &data,
            &s.url(ALLOWED, "/big"),
        ],
        &redact,
    );
    assert!(ok, "curl big: {out}");
    let seen = last_for(&s.seen(), "/big");
    assert!(seen.body == big, "a body over the bound passes unchanged");
    assert!(!seen.body.contains(&key.value), "no value in it");
    assert!(s.counter("body_too_large") > too_large_before);
    assert!(s.counter("body_substituted") >= 3.0);
}

#[test]
fn a_value_written_with_body_substitution_and_read_back_on_a_new_connection_is_scrubbed() {
    let mut s = setup("");
    let key = s.secret("store-key", &[ALLOWED], json!({"bodySubstitution": true}));
    let sb = s.add_sandbox("rp-store", &[("K", "store-key")]);
    let body = format!("{{\"saved\":\"{}\"}}", key.placeholder);
    let (ok, out) = s.curl(
        sb,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            &s.url(ALLOWED, "/store"),
        ],
        &[&key],
    );
    assert!(ok, "store: {out}");
    let stored = last_for(&s.seen(), "/store");
    assert!(
        stored.body.contains(&key.value),
        "the upstream stored the value"
    );
    // A new curl process: a new connection, nothing shared with the first request.
    let (ok, out) = s.curl(sb, &[&s.url(ALLOWED, "/load")], &[&key]);
    assert!(ok, "load: {out}");
    assert!(
        !out.contains("<VALUE!>"),
        "value scrubbed from the response"
    );
    assert!(
        out.contains(&key.placeholder),
        "the placeholder came back in its place: {out}"
    );
}
