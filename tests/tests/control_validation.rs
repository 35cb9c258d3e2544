//! The validation matrix: every rejected request is a 400/413/415 naming the problem, and
//! nothing is stored or audited.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use serde_json::{Value, json};
use veil_tests::control::{Api, Control, assert_error};

/// POSTs a large body over a raw socket: the server may answer 413 before reading it all, so
/// the body is written from another thread and write errors are ignored.
fn post_raw_tcp(port: u16, key: &str, body: Vec<u8>) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let head = format!(
        "POST /api/secret HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let _ = writer.write_all(&body);
    });
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = t.join();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn audit_total(api: &Api, key: &str) -> u64 {
    let (status, page) = api.get("/audit?limit=1", key).await;
    assert_eq!(status, 200);
    page["total"].as_u64().unwrap()
}

fn expect_mentions(reply: &(u16, Value), needle: &str, case: &str) {
    let msg = reply.1["message"].as_str().unwrap_or("").to_lowercase();
    assert!(
        msg.contains(&needle.to_lowercase()),
        "{case}: message {msg:?} should name {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_validation_matrix() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["manage:secrets", "read:audit"]);
    let audit_before = audit_total(&api, &key).await;
    let long_value = "v".repeat(64 * 1024 + 1);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("name missing", json!({"value": "v"}), "name"),
        ("name empty", json!({"name": "", "value": "v"}), "name"),
        (
            "name leading digit",
            json!({"name": "9abc", "value": "v"}),
            "name",
        ),
        (
            "name leading dash",
            json!({"name": "-abc", "value": "v"}),
            "name",
        ),
        ("name space", json!({"name": "a b", "value": "v"}), "name"),
        ("name dot", json!({"name": "a.b", "value": "v"}), "name"),
        (
            "name unicode",
            json!({"name": "näme", "value": "v"}),
            "name",
        ),
        (
            "name too long",
            json!({"name": "a".repeat(256), "value": "v"}),
            "name",
        ),
        ("name number", json!({"name": 5, "value": "v"}), "name"),
        ("name null", json!({"name": null, "value": "v"}), "name"),
        ("value missing", json!({"name": "n"}), "value"),
        ("value empty", json!({"name": "n", "value": ""}), "value"),
        (
            "value too long",
            json!({"name": "n", "value": long_value}),
            "value",
        ),
        ("value number", json!({"name": "n", "value": 42}), "value"),
        (
            "value object",
            json!({"name": "n", "value": {"a": 1}}),
            "value",
        ),
        (
            "description number",
            json!({"name": "n", "value": "v", "description": 1}),
            "description",
        ),
        (
            "hosts string",
            json!({"name": "n", "value": "v", "hosts": "a.example"}),
            "hosts",
        ),
        (
            "hosts number item",
            json!({"name": "n", "value": "v", "hosts": [1]}),
            "hosts",
        ),
        (
            "scheme",
            json!({"name": "n", "value": "v", "hosts": ["https://a.example"]}),
            "scheme",
        ),
        (
            "port",
            json!({"name": "n", "value": "v", "hosts": ["a.example:443"]}),
            "port",
        ),
        (
            "path",
            json!({"name": "n", "value": "v", "hosts": ["a.example/v1"]}),
            "path",
        ),
        (
            "query",
            json!({"name": "n", "value": "v", "hosts": ["a.example?x=1"]}),
            "query",
        ),
        (
            "whitespace lead",
            json!({"name": "n", "value": "v", "hosts": [" a.example"]}),
            "whitespace",
        ),
        (
            "whitespace mid",
            json!({"name": "n", "value": "v", "hosts": ["a .example"]}),
            "whitespace",
        ),
        (
            "tab",
            json!({"name": "n", "value": "v", "hosts": ["a.example\t"]}),
            "whitespace",
        ),
        (
            "bare star",
            json!({"name": "n", "value": "v", "hosts": ["*"]}),
            "*",
        ),
        (
            "inner star",
            json!({"name": "n", "value": "v", "hosts": ["a.*.example"]}),
            "wildcard",
        ),
        (
            "empty label",
            json!({"name": "n", "value": "v", "hosts": ["a..example"]}),
            "empty label",
        ),
        (
            "leading dot",
            json!({"name": "n", "value": "v", "hosts": [".a.example"]}),
            "empty label",
        ),
        (
            "empty host",
            json!({"name": "n", "value": "v", "hosts": [""]}),
            "empty",
        ),
        (
            "ipv4",
            json!({"name": "n", "value": "v", "hosts": ["127.0.0.1"]}),
            "ip",
        ),
        (
            "ipv4 short",
            json!({"name": "n", "value": "v", "hosts": ["10.1"]}),
            "ip",
        ),
        (
            "ipv6",
            json!({"name": "n", "value": "v", "hosts": ["::1"]}),
            "ip",
        ),
        (
            "ipv6 bracket",
            json!({"name": "n", "value": "v", "hosts": ["[::1]"]}),
            "ip",
        ),
        (
            "unknown field",
            json!({"name": "n", "value": "v", "host": ["a.example"]}),
            "host",
        ),
        (
            "second host bad",
            json!({"name": "n", "value": "v", "hosts": ["ok.example", "x:1"]}),
            "hosts[1]",
        ),
    ];
    for (case, body, needle) in &cases {
        let reply = api.post("/secret", &key, body.clone()).await;
        assert_error(&reply, 400);
        expect_mentions(&reply, needle, case);
        if body["value"].is_string() {
            let v = body["value"].as_str().unwrap();
            if v.len() > 3 {
                assert!(!reply.1.to_string().contains(v), "{case}: value echoed");
            }
        }
    }

    // Transport-level rejections.
    let raw = [
        (
            Some("application/json"),
            b"{\"name\": \"n\", \"value\": ".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            Some("application/json"),
            b"[1,2]".to_vec(),
            400,
            "JSON object",
        ),
        (
            Some("application/json"),
            b"".to_vec(),
            400,
            "malformed JSON",
        ),
        (
            None,
            b"{\"name\":\"n\",\"value\":\"v\"}".to_vec(),
            415,
            "application/json",
        ),
        (
            Some("text/plain"),
            b"{\"name\":\"n\",\"value\":\"v\"}".to_vec(),
            415,
            "application/json",
        ),
        (
            Some("application/x-www-form-urlencoded"),
            b"name=n&value=v".to_vec(),
            415,
            "application/json",
        ),
    ];
    for (ct, body, status, needle) in raw {
        let reply = api.send_raw("POST", "/secret", Some(&key), ct, body).await;
        assert_error(&reply, status);
        expect_mentions(&reply, needle, needle);
    }
    let huge = serde_json::to_vec(&json!({"name": "n", "value": "v".repeat(1024 * 1024)})).unwrap();
    let reply = post_raw_tcp(control.port, &key, huge);
    assert_error(&reply, 413);

    // Nothing was stored or audited.
    let (_, list) = api.get("/secret", &key).await;
    assert_eq!(list, json!([]));
    assert_eq!(audit_total(&api, &key).await, audit_before);

    // The accepted edges and normalisation.
    let (status, s) = api
        .post(
            "/secret",
            &key,
            json!({"name": "_A-z9", "value": "v".repeat(64 * 1024),
                   "hosts": ["API.Example.COM.", "*.Wild.Example", "bücher.example", "api.example.com"]}),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    assert_eq!(
        s["hosts"],
        json!(["api.example.com", "*.wild.example", "xn--bcher-kva.example"]),
        "lower-case, no trailing dot, punycode, deduplicated"
    );
    let (status, _) = api
        .post(
            "/secret",
            &key,
            json!({"name": "a".repeat(255), "value": "v", "hosts": null, "description": null}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, s) = api
        .send_raw(
            "POST",
            "/secret",
            Some(&key),
            Some("application/json; charset=utf-8"),
            br#"{"name":"charset","value":"v"}"#.to_vec(),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    assert_eq!(s["hosts"], json!([]), "omitted hosts → unrestricted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_and_query_validation() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["manage:secrets", "read:audit"]);
    let s = api
        .create_secret(&key, "target", "v1", &["a.example"])
        .await;
    let path = format!("/secret/{}", s["id"].as_str().unwrap());
    // The GET view (with veil's propagation and usage fields) to compare against.
    let (_, s) = api.get(&path, &key).await;
    let audit_before = audit_total(&api, &key).await;
    let cases: Vec<(&str, Value, &str)> = vec![
        ("empty value", json!({"value": ""}), "value"),
        ("value number", json!({"value": 1}), "value"),
        (
            "value too long",
            json!({"value": "x".repeat(64 * 1024 + 1)}),
            "value",
        ),
        ("hosts bad", json!({"hosts": ["a.example:80"]}), "port"),
        ("hosts type", json!({"hosts": {"a": 1}}), "hosts"),
        (
            "description type",
            json!({"description": []}),
            "description",
        ),
        ("rename", json!({"name": "other"}), "name"),
        ("placeholder", json!({"placeholder": "x"}), "placeholder"),
        (
            "valid and invalid",
            json!({"value": "new", "hosts": ["*"]}),
            "*",
        ),
    ];
    for (case, body, needle) in &cases {
        let reply = api.patch(&path, &key, body.clone()).await;
        assert_error(&reply, 400);
        expect_mentions(&reply, needle, case);
    }
    let reply = api
        .send_raw(
            "PATCH",
            &path,
            Some(&key),
            Some("text/plain"),
            b"{}".to_vec(),
        )
        .await;
    assert_error(&reply, 415);
    let reply = api
        .send_raw(
            "PATCH",
            &path,
            Some(&key),
            Some("application/json"),
            b"{".to_vec(),
        )
        .await;
    assert_error(&reply, 400);
    let (_, after) = api.get(&path, &key).await;
    assert_eq!(after, s, "rejected PATCHes change nothing");
    assert_eq!(audit_total(&api, &key).await, audit_before);

    for q in [
        "limit=0",
        "limit=201",
        "limit=abc",
        "limit=-1",
        "sort=size",
        "order=up",
        "cursor=not-a-cursor",
        "cursor=%%%",
    ] {
        let reply = api.get(&format!("/secret/paginated?{q}"), &key).await;
        assert_error(&reply, 400);
    }
    let (_, first) = api
        .get("/secret/paginated?limit=1&sort=name&order=asc", &key)
        .await;
    assert!(first["nextCursor"].is_null());
    for q in [
        "limit=1",
        "limit=200",
        "sort=updatedAt&order=asc",
        "name=tar",
    ] {
        let (status, _) = api.get(&format!("/secret/paginated?{q}"), &key).await;
        assert_eq!(status, 200, "{q}");
    }
}
