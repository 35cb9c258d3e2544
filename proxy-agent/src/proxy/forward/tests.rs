use super::*;
use veil_link::SecretValue;
use veil_policy::{HostPattern, MountedSecret};

fn policy() -> SandboxPolicy {
    SandboxPolicy::new(vec![MountedSecret {
        previous: Vec::new(),
        retired: false,
        id: "sec_1".into(),
        name: "KEY".into(),
        placeholder: "veil_ph_0123".into(),
        hosts: vec![HostPattern::parse("api.allowed.test").unwrap()],
        value: SecretValue::new("sk-real".into()),
        body_substitution: false,
        wrong_host: Default::default(),
    }])
    .unwrap()
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = Request::builder().uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap().into_parts().0
}

#[test]
fn substitutes_headers_target_and_basic_only_for_the_sni() {
    let p = policy();
    let sni = ServerName::parse("api.allowed.test").unwrap();
    let mut req = parts(
        "/v1?k=veil_ph_0123",
        &[
            ("host", "API.allowed.test:443"),
            ("x-key", "Bearer veil_ph_0123"),
            // user:veil_ph_0123
            ("authorization", "Basic dXNlcjp2ZWlsX3BoXzAxMjM="),
        ],
    );
    let head = substitute(&p, &sni, 443, &mut req).unwrap();
    assert!(head.host_ok);
    assert_eq!(head.hits[0].substituted, 3);
    assert_eq!(req.uri.to_string(), "/v1?k=sk-real");
    assert_eq!(req.headers["x-key"].as_bytes(), b"Bearer sk-real");
    assert!(req.headers["x-key"].is_sensitive());
    // user:sk-real
    assert_eq!(
        req.headers["authorization"].as_bytes(),
        b"Basic dXNlcjpzay1yZWFs"
    );

    let mut other = parts(
        "/v1",
        &[("host", "evil.test"), ("x-key", "Bearer veil_ph_0123")],
    );
    let head = substitute(&p, &sni, 443, &mut other).unwrap();
    assert!(!head.host_ok);
    assert_eq!(head.hits[0].host_mismatch, 1);
    assert_eq!(other.headers["x-key"].as_bytes(), b"Bearer veil_ph_0123");

    // The Host names the SNI but another port than the connection's.
    let mut port = parts(
        "/v1",
        &[("host", "api.allowed.test:8443"), ("x-key", "veil_ph_0123")],
    );
    let head = substitute(&p, &sni, 443, &mut port).unwrap();
    assert!(!head.host_ok);
    assert_eq!(port.headers["x-key"].as_bytes(), b"veil_ph_0123");
    let head = substitute(&p, &sni, 8443, &mut port).unwrap();
    assert!(head.host_ok);
    assert_eq!(port.headers["x-key"].as_bytes(), b"sk-real");
}

#[test]
fn a_placeholder_after_an_open_escape_is_refused_by_name() {
    let p = policy();
    let sni = ServerName::parse("api.allowed.test").unwrap();
    let mut req = parts("/v1?k=%veil_ph_0123", &[("host", "api.allowed.test")]);
    let e = substitute(&p, &sni, 443, &mut req).unwrap_err().to_string();
    assert!(
        e.contains("secret KEY (sec_1)") && !e.contains("sk-real"),
        "{e}"
    );
    assert_eq!(req.uri.to_string(), "/v1?k=%veil_ph_0123");
}

#[test]
fn upgrades_are_recognised() {
    let req = |method: Method, headers: &[(&str, &str)]| {
        let mut b = Request::builder().method(method).uri("/");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    };
    let ws = req(
        Method::GET,
        &[("connection", "Upgrade"), ("upgrade", "WebSocket")],
    );
    assert_eq!(upgrade_kind(&ws), Some("WebSocket"));
    assert_eq!(
        upgrade_kind(&req(Method::GET, &[("upgrade", "h2c")])),
        Some("Upgrade")
    );
    assert_eq!(upgrade_kind(&req(Method::CONNECT, &[])), Some("CONNECT"));
    let mut ext = req(Method::CONNECT, &[]);
    ext.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    assert_eq!(upgrade_kind(&ext), Some("extended CONNECT"));
    assert_eq!(
        upgrade_kind(&req(Method::POST, &[("connection", "close")])),
        None
    );
    assert!(upgrade_refusal("WebSocket").starts_with("veil: WebSocket is not supported"));
}

#[test]
fn blocked_message_names_the_secret_never_the_value() {
    let sni = ServerName::parse("evil.test").unwrap();
    let m = blocked_message("KEY", "sec_1", &sni);
    assert_eq!(
        m,
        "veil: secret KEY (sec_1) is not allowed for host evil.test\n"
    );
    assert!(!m.contains("sk-real"));
}

#[test]
fn content_length_is_replaced() {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
    set_content_length(&mut h, 40);
    assert_eq!(h.get_all(header::CONTENT_LENGTH).iter().count(), 1);
    assert_eq!(h[header::CONTENT_LENGTH], "40");
}

#[test]
fn strips_hop_by_hop_but_keeps_te_trailers() {
    let mut h = HeaderMap::new();
    h.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
    h.insert("x-hop", HeaderValue::from_static("1"));
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    h.insert("x-keep", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
    assert_eq!(names, ["te", "x-keep"]);
}
