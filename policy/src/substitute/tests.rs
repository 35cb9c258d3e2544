//! Unit and property tests of request-head substitution.

use super::*;
use crate::sandbox::SandboxPolicy;
use crate::secret::testing::secret;
use proptest::prelude::*;

const V_A: &str = "sk-ALLOWED-value-1";
const V_B: &str = "sk-OTHERHOST-value-2";
const V_U: &str = "unrestricted value 3";

fn policy() -> SandboxPolicy {
    SandboxPolicy::new(vec![
        secret("a", V_A, &["*.allowed.test"]),
        secret("b", V_B, &["other.test"]),
        secret("u", V_U, &[]),
    ])
    .unwrap()
}

fn sni(s: &str) -> ServerName {
    ServerName::parse(s).unwrap()
}

fn headers<'a>(v: &'a [(&'a str, &'a str)]) -> Vec<(&'a [u8], &'a [u8])> {
    v.iter()
        .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
        .collect()
}

type Header = (Vec<u8>, Vec<u8>);

/// The request after substitution, as (target, headers).
fn apply(view: &RequestView<'_>, s: &Substitution) -> (String, Vec<Header>) {
    let target = s
        .target
        .as_ref()
        .map_or(view.target.to_owned(), |t| t.as_str().to_owned());
    let mut hs: Vec<Header> = view
        .headers
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    for (i, v) in &s.headers {
        hs[*i].1 = v.as_bytes().to_vec();
    }
    (target, hs)
}

#[test]
fn header_target_and_basic_auth() {
    let p = policy();
    let basic = format!("Basic {}", STANDARD.encode("user:ph_a_placeholder"));
    let h = [
        ("Host", "api.allowed.test:443"),
        ("Authorization", "Bearer ph_a_placeholder"),
        ("X-Two", "ph_a_placeholder,ph_a_placeholder"),
        ("Proxy-Thing", basic.as_str()),
        ("Authorization", basic.as_str()),
        ("Accept", "*/*"),
    ];
    let h = headers(&h);
    let view = RequestView {
        target: "/v1?key=ph_a_placeholder&x=1",
        authority: None,
        headers: &h,
    };
    let s = p.substitute(&sni("api.allowed.test"), 443, &view).unwrap();
    let (target, hs) = apply(&view, &s);
    assert_eq!(target, format!("/v1?key={V_A}&x=1"));
    assert_eq!(hs[1].1, format!("Bearer {V_A}").into_bytes());
    assert_eq!(hs[2].1, format!("{V_A},{V_A}").into_bytes());
    // Basic decoding applies to Authorization only.
    assert_eq!(hs[3].1, basic.as_bytes());
    assert_eq!(
        hs[4].1,
        format!("Basic {}", STANDARD.encode(format!("user:{V_A}"))).into_bytes()
    );
    assert_eq!(
        s.headers.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
    assert_eq!(
        s.hits,
        vec![SecretHit {
            secret: 0,
            substituted: 5,
            wrong_host: 0,
            host_mismatch: 0
        }]
    );
    assert!(!s.host_mismatch);
    assert!(s.changed());
    // Nothing of the value in the Debug output of the result.
    assert!(!format!("{s:?}").contains("ALLOWED"));
}

#[test]
fn basic_variants() {
    let p = policy();
    let n = sni("api.allowed.test");
    let mut ctx = p.begin_request(&n, 443, [&b"api.allowed.test"[..]]);
    let unpadded = format!(
        "basic  {}",
        STANDARD.encode("ph_a_placeholder:x").trim_end_matches('=')
    );
    let out = ctx
        .header(b"authorization", unpadded.as_bytes())
        .unwrap()
        .unwrap();
    assert_eq!(
        out.as_bytes(),
        format!("basic {}", STANDARD.encode(format!("{V_A}:x"))).as_bytes()
    );
    // Not base64: literal substitution still applies.
    let out = ctx
        .header(b"authorization", b"Basic ph_a_placeholder!")
        .unwrap()
        .unwrap();
    assert_eq!(out.as_bytes(), format!("Basic {V_A}!").as_bytes());
    assert!(ctx.header(b"authorization", b"Basic").unwrap().is_none());
    assert!(
        ctx.header(b"authorization", b"Basic dXNlcjpwYXNz")
            .unwrap()
            .is_none()
    );
    // A value with CR/LF is fine inside base64.
    let crlf = SandboxPolicy::new(vec![secret("c", "a\r\nb", &[])]).unwrap();
    let mut ctx = crlf.begin_request(&n, 443, [&b"api.allowed.test"[..]]);
    let v = format!("Basic {}", STANDARD.encode("u:ph_c_placeholder"));
    let out = ctx.header(b"Authorization", v.as_bytes()).unwrap().unwrap();
    assert_eq!(
        out.as_bytes(),
        format!("Basic {}", STANDARD.encode("u:a\r\nb")).as_bytes()
    );
}

#[test]
fn wrong_host_is_reported_not_substituted() {
    let p = policy();
    let h = [
        ("host", "api.allowed.test"),
        ("x-a", "ph_a_placeholder"),
        ("x-b", "ph_b_placeholder ph_b_placeholder"),
    ];
    let h = headers(&h);
    let view = RequestView {
        target: "/ph_b_placeholder",
        authority: None,
        headers: &h,
    };
    let s = p.substitute(&sni("api.allowed.test"), 443, &view).unwrap();
    let (target, hs) = apply(&view, &s);
    assert_eq!(target, "/ph_b_placeholder");
    assert_eq!(hs[2].1, b"ph_b_placeholder ph_b_placeholder");
    assert_eq!(hs[1].1, V_A.as_bytes());
    assert_eq!(
        s.hits,
        vec![
            SecretHit {
                secret: 1,
                substituted: 0,
                wrong_host: 3,
                host_mismatch: 0
            },
            SecretHit {
                secret: 0,
                substituted: 1,
                wrong_host: 0,
                host_mismatch: 0
            },
        ]
    );
    assert_eq!(s.headers.len(), 1);
    assert!(s.target.is_none());
}

#[test]
fn host_must_match_sni() {
    let p = policy();
    let n = sni("api.allowed.test");
    let req = |auth: Option<&'static [u8]>, h: &'static [(&'static [u8], &'static [u8])]| {
        let view = RequestView {
            target: "/?k=ph_a_placeholder",
            authority: auth,
            headers: h,
        };
        p.substitute(&n, 8443, &view).unwrap()
    };
    for ok in [
        req(None, &[(b"Host", b"API.allowed.TEST.:8443")]),
        req(Some(b"api.allowed.test"), &[]),
        req(
            Some(b"api.allowed.test:8443"),
            &[(b"host", b"api.allowed.test")],
        ),
    ] {
        assert!(!ok.host_mismatch);
        assert_eq!(ok.hits[0].substituted, 1);
    }
    for bad in [
        req(None, &[]),
        req(None, &[(b"Host", b"other.allowed.test")]),
        req(Some(b"other.allowed.test"), &[]),
        req(Some(b"api.allowed.test"), &[(b"host", b"evil.test")]),
        req(
            None,
            &[(b"host", b"api.allowed.test"), (b"host", b"evil.test")],
        ),
        req(None, &[(b"host", b"127.0.0.1")]),
        // Another port than the connection's.
        req(None, &[(b"host", b"api.allowed.test:443")]),
        req(Some(b"api.allowed.test:8444"), &[]),
        // Full-width letters IDNA would map to the SNI.
        req(
            None,
            &[(
                b"host",
                b"\xef\xbd\x81\xef\xbd\x90\xef\xbd\x89.allowed.test",
            )],
        ),
        req(None, &[(b"host", b"user@api.allowed.test")]),
        req(None, &[(b"host", b"api.allowed.test..")]),
    ] {
        assert!(bad.host_mismatch);
        assert!(!bad.changed());
        assert_eq!(
            bad.hits,
            vec![SecretHit {
                secret: 0,
                substituted: 0,
                wrong_host: 0,
                host_mismatch: 1
            }]
        );
    }
}

#[test]
fn unsafe_values_are_refused_by_name() {
    for (value, in_header) in [
        ("a\r\nX-Injected: 1", false),
        ("a\nb", false),
        ("a\0b", false),
        ("a\x7fb", false),
        ("a\tb", true),
        ("a b", true),
        ("\u{e4}-value", true),
        ("a/b?c=d", true),
    ] {
        let p = SandboxPolicy::new(vec![secret("x", value, &[])]).unwrap();
        let n = sni("api.test");
        let mut ctx = p.begin_request(&n, 443, [&b"api.test"[..]]);
        let h = ctx.header(b"X-Key", b"ph_x_placeholder");
        assert_eq!(h.is_ok(), in_header, "{value:?}");
        if let Err(e) = h {
            let e = e.to_string();
            assert!(e.contains("NAME_x") && e.contains("(x)"), "{e}");
            assert!(!e.contains(value), "{e}");
        }
        // Any value fits a target, encoded.
        let t = ctx.target("/ph_x_placeholder?ph_x_placeholder").unwrap();
        let t = t.unwrap();
        assert!(!t.as_str().contains(value), "{value:?}");
    }
    // The error names the header.
    let p = SandboxPolicy::new(vec![secret("x", "a\r\nb", &[])]).unwrap();
    let n = sni("api.test");
    let h = headers(&[("host", "api.test"), ("X-Key", "ph_x_placeholder")]);
    let e = p
        .substitute(
            &n,
            443,
            &RequestView {
                target: "/",
                authority: None,
                headers: &h,
            },
        )
        .unwrap_err();
    assert_eq!(
        e,
        SubstituteError::UnsafeInHeader {
            id: "x".into(),
            name: "NAME_x".into(),
            header: "X-Key".into()
        }
    );
    // A placeholder of an unsafe secret that is NOT substituted (wrong host) is no error.
    let p = SandboxPolicy::new(vec![secret("x", "a\r\nb", &["elsewhere.test"])]).unwrap();
    let s = p
        .substitute(
            &n,
            443,
            &RequestView {
                target: "/",
                authority: None,
                headers: &h,
            },
        )
        .unwrap();
    assert_eq!(s.hits[0].wrong_host, 1);
}

#[test]
fn nothing_matches_nothing_changes() {
    let p = policy();
    let n = sni("api.allowed.test");
    let h = headers(&[
        ("host", "api.allowed.test"),
        ("user-agent", "curl/8"),
        ("x", "ph_a_placeholdeR"),
    ]);
    let s = p
        .substitute(
            &n,
            443,
            &RequestView {
                target: "/v1/chat",
                authority: None,
                headers: &h,
            },
        )
        .unwrap();
    assert_eq!(s, Substitution::default());
    assert_eq!(s.headers.capacity(), 0);
    assert_eq!(s.hits.capacity(), 0);
    let empty = SandboxPolicy::new(vec![]).unwrap();
    let s = empty
        .substitute(
            &n,
            443,
            &RequestView {
                target: "/ph_a_placeholder",
                authority: None,
                headers: &h,
            },
        )
        .unwrap();
    assert_eq!(s, Substitution::default());
}

#[test]
fn target_values_are_encoded_for_path_and_query() {
    let p = SandboxPolicy::new(vec![
        secret("x", "a+b/c?d#e%f&g=h;i:j@k l\u{e9}", &[]),
        secret("t", "123456:ABC-DEF_gh", &[]),
    ])
    .unwrap();
    let n = sni("api.test");
    let mut ctx = p.begin_request(&n, 443, [&b"api.test"[..]]);
    let t = ctx
        .target("/v1/ph_x_placeholder/x?q=ph_x_placeholder&r=%41ph_x_placeholder#ph_x_placeholder")
        .unwrap()
        .unwrap();
    let path = "a+b%2Fc%3Fd%23e%25f&g=h;i:j@k%20l%C3%A9";
    let query = "a%2Bb%2Fc%3Fd%23e%25f%26g%3Dh%3Bi%3Aj%40k%20l%C3%A9";
    assert_eq!(
        t.as_str(),
        format!("/v1/{path}/x?q={query}&r=%41{query}#{query}")
    );
    // A bot token keeps its colon in the path.
    let t = ctx.target("/botph_t_placeholder/getMe").unwrap().unwrap();
    assert_eq!(t.as_str(), "/bot123456:ABC-DEF_gh/getMe");
    // `?` inside the path part of a value does not start the query.
    let t = ctx
        .target("/ph_x_placeholder/ph_x_placeholder")
        .unwrap()
        .unwrap();
    assert_eq!(t.as_str(), format!("/{path}/{path}"));
    assert_eq!(ctx.finish()[0].substituted, 6);
}

#[test]
fn placeholders_after_an_open_percent_escape_are_refused() {
    let p = policy();
    let n = sni("api.allowed.test");
    for target in [
        "/%ph_a_placeholder",
        "/x%4ph_a_placeholder",
        "/?k=%ph_a_placeholder",
        "/?k=%Aph_a_placeholder",
        "/?k=%%ph_a_placeholder",
        "/?k=ph_a_placeholder&j=%ph_a_placeholder",
    ] {
        let mut ctx = p.begin_request(&n, 443, [&b"api.allowed.test"[..]]);
        let e = ctx.target(target).unwrap_err();
        assert_eq!(
            e,
            SubstituteError::OpenEscape {
                id: "a".into(),
                name: "NAME_a".into(),
                place: "request target",
                escape: "`%` or `%X`",
            },
            "{target}"
        );
        assert!(!e.to_string().contains(V_A));
    }
    // Complete or impossible escapes are the sandbox's own bytes.
    for target in [
        "/%25ph_a_placeholder",
        "/?k=%gph_a_placeholder",
        "/%%41ph_a_placeholder",
    ] {
        let mut ctx = p.begin_request(&n, 443, [&b"api.allowed.test"[..]]);
        assert!(ctx.target(target).unwrap().is_some(), "{target}");
    }
    // Not substituted (wrong host, host mismatch): nothing to refuse.
    let mut ctx = p.begin_request(&n, 443, [&b"api.allowed.test"[..]]);
    assert!(ctx.target("/%ph_b_placeholder").unwrap().is_none());
    let mut ctx = p.begin_request(&n, 443, [&b"evil.test"[..]]);
    assert!(ctx.target("/%ph_a_placeholder").unwrap().is_none());
}

#[test]
fn basic_user_id_never_splits_a_value() {
    let p = SandboxPolicy::new(vec![secret("c", "id:secret", &[])]).unwrap();
    let n = sni("api.test");
    let mut ctx = p.begin_request(&n, 443, [&b"api.test"[..]]);
    let basic = |creds: &str| format!("Basic {}", STANDARD.encode(creds));
    for user in [
        "ph_c_placeholder:pw",
        "xph_c_placeholder",
        "ph_c_placeholderx",
        "x:y",
    ] {
        let creds = user.replace("x:y", "ph_c_placeholder:");
        let e = ctx
            .header(b"authorization", basic(&creds).as_bytes())
            .unwrap_err();
        assert_eq!(
            e,
            SubstituteError::ColonInBasicUser {
                id: "c".into(),
                name: "NAME_c".into()
            },
            "{creds}"
        );
    }
    // As the password, or as the whole credentials (`user:password` in one secret): fine.
    for (creds, sent) in [
        ("user:ph_c_placeholder", "user:id:secret"),
        ("user:ph_c_placeholder:x", "user:id:secret:x"),
        ("ph_c_placeholder", "id:secret"),
    ] {
        let out = ctx
            .header(b"authorization", basic(creds).as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(out.as_bytes(), basic(sent).as_bytes(), "{creds}");
    }
}

/// Naive reference: plain string replacement of allowed placeholders.
fn reference(p: &SandboxPolicy, n: &ServerName, s: &str) -> String {
    let mut out = s.to_owned();
    for (i, sec) in p.secrets().iter().enumerate() {
        if p.secret_allows(i, n) {
            out = out.replace(&sec.placeholder, sec.value.expose());
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn agrees_with_naive_replacement(
        parts in prop::collection::vec(prop_oneof![
            "[a-z/?=&_-]{0,6}",
            Just("ph_a_placeholder".to_owned()),
            Just("ph_b_placeholder".to_owned()),
            Just("ph_u_placeholder".to_owned()),
            Just("ph_a_placehol".to_owned()),
        ], 0..8),
        host in prop::sample::select(vec!["api.allowed.test", "other.test", "x.test"]),
    ) {
        let p = SandboxPolicy::new(vec![
            secret("a", "VA-a-value-much-longer-than-its-placeholder", &["*.allowed.test"]),
            secret("b", "VB", &["other.test"]),
            secret("u", "VU", &[]),
        ]).unwrap();
        let n = sni(host);
        let text = parts.concat();
        let target = format!("/{text}");
        let h = [(&b"host"[..], host.as_bytes()), (b"x", text.as_bytes())];
        let s = p.substitute(&n, 443, &RequestView { target: &target, authority: None, headers: &h }).unwrap();
        let (t, hs) = apply(&RequestView { target: &target, authority: None, headers: &h }, &s);
        prop_assert_eq!(&t, &reference(&p, &n, &target));
        prop_assert_eq!(String::from_utf8(hs[1].1.clone()).unwrap(), reference(&p, &n, &text));
        let total: u32 = s.hits.iter().map(|h| h.substituted + h.wrong_host).sum();
        let occurrences = ["ph_a_placeholder", "ph_b_placeholder", "ph_u_placeholder"]
            .iter().map(|ph| text.matches(ph).count()).sum::<usize>();
        prop_assert_eq!(total as usize, occurrences * 2);
    }

    #[test]
    fn arbitrary_requests_never_panic(
        target in "\\PC{0,40}",
        vals in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..4),
    ) {
        let p = policy();
        let n = sni("api.allowed.test");
        let h: Vec<(&[u8], &[u8])> = vals.iter().map(|v| (&b"authorization"[..], v.as_slice())).collect();
        let _ = p.substitute(&n, 443, &RequestView { target: &target, authority: Some(b"api.allowed.test"), headers: &h });
    }
}

/// Hot-path timing; run with
/// `cargo test -p veil-policy --release -- --ignored --nocapture perf`.
#[test]
#[ignore = "timing, run by hand in release mode"]
fn perf_substitution() {
    use std::hint::black_box;
    use std::time::Instant;
    let p = SandboxPolicy::new(
        (0..8)
            .map(|i| {
                secret(
                    &format!("s{i}"),
                    "sk-0123456789abcdef0123456789abcdef",
                    &["*.allowed.test"],
                )
            })
            .collect(),
    )
    .unwrap();
    let n = sni("api.allowed.test");
    let plain = [
        (&b"host"[..], &b"api.allowed.test"[..]),
        (b"user-agent", b"python-httpx/0.27.0"),
        (b"accept", b"application/json"),
        (b"accept-encoding", b"gzip, deflate, br"),
        (b"content-type", b"application/json"),
        (b"x-request-id", b"4b9a0b4e-7b2c-4f55-9d0a-3f1d1c2b7e11"),
        (
            b"authorization",
            b"Bearer sk-not-a-placeholder-0123456789abcdef",
        ),
    ];
    let mut with = plain;
    with[6] = (b"authorization", b"Bearer ph_s3_placeholder");
    for (label, h) in [("no match", &plain), ("one match", &with)] {
        let view = RequestView {
            target: "/v1/chat/completions?stream=true",
            authority: None,
            headers: h,
        };
        let iters = 200_000u32;
        let start = Instant::now();
        for _ in 0..iters {
            black_box(p.substitute(black_box(&n), 443, black_box(&view)).unwrap());
        }
        let ns = start.elapsed().as_nanos() / u128::from(iters);
        println!("substitute, 7 headers, 8 secrets, {label}: {ns} ns/op");
    }
    let hello = include_bytes!("../../testdata/curl_http2.bin");
    let iters = 100_000u32;
    let start = Instant::now();
    for _ in 0..iters {
        let peek = crate::client_hello::parse_client_hello(black_box(hello));
        if let crate::client_hello::Peek::Tls(h) = peek {
            black_box(p.decide(h));
        }
    }
    let ns = start.elapsed().as_nanos() / u128::from(iters);
    println!("parse_client_hello (curl h2, 517 B) + decide: {ns} ns/op");
}
