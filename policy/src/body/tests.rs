use super::*;
use crate::sandbox::SandboxPolicy;
use crate::secret::ModeOverrides;
use crate::secret::testing::secret;
use proptest::prelude::*;
use veil_link::proto::WrongHost;

const V_A: &str = "sk-A \"quoted\" \\ back\nnewline é&=+%";

fn with_body(mut s: MountedSecret) -> MountedSecret {
    s.body_substitution = true;
    s
}

fn policy() -> SandboxPolicy {
    let mut blocking = with_body(secret("b", "VB", &["b.test"]));
    blocking.wrong_host = WrongHost::Block;
    SandboxPolicy::new(vec![
        with_body(secret("a", V_A, &["*.allowed.test"])),
        blocking,
        secret("n", "VN", &[]),
    ])
    .unwrap()
}

fn sni(s: &str) -> ServerName {
    ServerName::parse(s).unwrap()
}

const OFF: ModeOverrides = ModeOverrides {
    body_substitution: false,
    wrong_host: WrongHost::Forward,
};

#[test]
fn kinds() {
    let of = |ct: &str| BodyKind::of(Some(ct.as_bytes()), None);
    assert_eq!(of("application/json"), Some(BodyKind::Json));
    assert_eq!(of("Application/JSON; charset=utf-8"), Some(BodyKind::Json));
    assert_eq!(of("application/vnd.api+json"), Some(BodyKind::Json));
    assert_eq!(of("application/merge-patch+JSON"), Some(BodyKind::Json));
    assert_eq!(
        of("application/x-www-form-urlencoded"),
        Some(BodyKind::Form)
    );
    assert_eq!(of("text/plain"), Some(BodyKind::Text));
    assert_eq!(of(" text/csv ; q=1"), Some(BodyKind::Text));
    for no in [
        "",
        "application/octet-stream",
        "multipart/form-data; boundary=x",
        "application/+json",
        "text/",
        "json",
        "image/png",
        "application/jsonx",
    ] {
        assert_eq!(of(no), None, "{no}");
    }
    assert_eq!(BodyKind::of(None, None), None);
    let json = Some(&b"application/json"[..]);
    assert_eq!(BodyKind::of(json, Some(b"gzip")), None);
    assert_eq!(BodyKind::of(json, Some(b"identity")), Some(BodyKind::Json));
    assert_eq!(BodyKind::of(json, Some(b"")), Some(BodyKind::Json));
}

#[test]
fn scan_needed_only_for_body_secrets_allowed_or_blocking() {
    let p = policy();
    assert!(p.body_scan_needed(&sni("api.allowed.test")));
    // "b" blocks elsewhere and has body substitution: its placeholder must be looked for.
    assert!(p.body_scan_needed(&sni("elsewhere.test")));
    let plain = SandboxPolicy::new(vec![
        with_body(secret("a", "v", &["a.test"])),
        secret("u", "w", &[]),
    ])
    .unwrap();
    assert!(plain.body_scan_needed(&sni("a.test")));
    assert!(!plain.body_scan_needed(&sni("x.test")));
    let none = SandboxPolicy::new(vec![secret("u", "w", &[])]).unwrap();
    assert!(!none.body_scan_needed(&sni("x.test")));
    let all = ModeOverrides {
        body_substitution: true,
        ..OFF
    };
    let none = SandboxPolicy::build(vec![secret("u", "w", &[])], vec![], all).unwrap();
    assert!(none.body_scan_needed(&sni("x.test")));
}

#[test]
fn json_values_are_escaped_and_parse_back() {
    let p = policy();
    let body = br#"{"key":"ph_a_placeholder","n":"ph_n_placeholder","x":["ph_a_placeholder"]}"#;
    let s = p
        .substitute_body(&sni("api.allowed.test"), true, BodyKind::Json, body)
        .unwrap();
    let out = String::from_utf8(s.body.unwrap().as_bytes().to_vec()).unwrap();
    // A JSON parser reads the exact value back.
    let key = out
        .strip_prefix(r#"{"key":""#)
        .and_then(|r| r.split_once(r#"","n""#))
        .unwrap()
        .0;
    assert_eq!(
        serde_json::from_str::<String>(&format!("\"{key}\"")).unwrap(),
        V_A
    );
    assert!(out.contains(r#""n":"ph_n_placeholder""#));
    assert_eq!(
        s.hits,
        vec![SecretHit {
            secret: 0,
            substituted: 2,
            wrong_host: 0,
            host_mismatch: 0
        }]
    );
}

#[test]
fn form_values_are_percent_encoded() {
    let p = policy();
    let body = b"a=1&key=ph_a_placeholder&z=ph_a_placeholder";
    let s = p
        .substitute_body(&sni("x.allowed.test"), true, BodyKind::Form, body)
        .unwrap();
    let out = String::from_utf8(s.body.unwrap().as_bytes().to_vec()).unwrap();
    let enc = "sk-A%20%22quoted%22%20%5C%20back%0Anewline%20%C3%A9%26%3D%2B%25";
    assert_eq!(out, format!("a=1&key={enc}&z={enc}"));
    assert_eq!(s.hits[0].substituted, 2);
}

#[test]
fn open_escapes_and_non_strings_are_refused() {
    let p = policy();
    let n = sni("api.allowed.test");
    let open = SubstituteError::OpenEscape {
        id: "a".into(),
        name: "NAME_a".into(),
        place: "JSON body",
        escape: "`\\` or `\\u`",
    };
    let outside = SubstituteError::OutsideJsonString {
        id: "a".into(),
        name: "NAME_a".into(),
    };
    for (body, want) in [
        (r#"{"k":"\ph_a_placeholder"}"#, &open),
        (r#"{"k":"\\\ph_a_placeholder"}"#, &open),
        (r#"{"k":"\uph_a_placeholder"}"#, &open),
        (r#"{"k":"\u0ph_a_placeholder"}"#, &open),
        (r#"{"k":"\u00ph_a_placeholder"}"#, &open),
        (r#"{"k":"\u004ph_a_placeholder"}"#, &open),
        (r#"{"k":ph_a_placeholder}"#, &outside),
        (r#"["x",ph_a_placeholder]"#, &outside),
        (r#"{"k":"ph_a_placeholder","j":ph_a_placeholder}"#, &outside),
        ("ph_a_placeholder", &outside),
    ] {
        let e = p
            .substitute_body(&n, true, BodyKind::Json, body.as_bytes())
            .unwrap_err();
        assert_eq!(&e, want, "{body}");
        assert!(!e.to_string().contains(V_A));
    }
    for body in [
        r#"{"k":"\\ph_a_placeholder"}"#,
        r#"{"k":"\u0041ph_a_placeholder"}"#,
        r#"{"k":"\"ph_a_placeholder\""}"#,
        r#"{"ph_a_placeholder":["ph_a_placeholder"]}"#,
        // Not substituted (another secret, wrong host): nothing to refuse.
        r#"{"k":\ph_n_placeholder}"#,
    ] {
        let s = p.substitute_body(&n, true, BodyKind::Json, body.as_bytes());
        assert!(s.is_ok(), "{body}");
    }
    let form_open = SubstituteError::OpenEscape {
        id: "a".into(),
        name: "NAME_a".into(),
        place: "form body",
        escape: "`%` or `%X`",
    };
    for body in [
        "k=%ph_a_placeholder",
        "k=%fph_a_placeholder",
        "a=1&k=x%ph_a_placeholder",
    ] {
        let e = p
            .substitute_body(&n, true, BodyKind::Form, body.as_bytes())
            .unwrap_err();
        assert_eq!(e, form_open, "{body}");
    }
    for body in ["k=%25ph_a_placeholder", "k=%gph_a_placeholder"] {
        let s = p.substitute_body(&n, true, BodyKind::Form, body.as_bytes());
        assert!(s.is_ok(), "{body}");
    }
    // Text is not decoded: any neighbour goes.
    let s = p.substitute_body(&n, true, BodyKind::Text, br"%\ph_a_placeholder");
    assert!(s.is_ok());
}

#[test]
fn text_gets_the_value_as_is() {
    let p = policy();
    let s = p
        .substitute_body(
            &sni("api.allowed.test"),
            true,
            BodyKind::Text,
            b"<ph_a_placeholder>",
        )
        .unwrap();
    assert_eq!(s.body.unwrap().as_bytes(), format!("<{V_A}>").as_bytes());
}

#[test]
fn wrong_host_and_mismatch_are_counted_not_replaced() {
    let p = policy();
    let body = b"ph_a_placeholder ph_b_placeholder ph_b_placeholder";
    let s = p
        .substitute_body(&sni("b.test"), true, BodyKind::Text, body)
        .unwrap();
    assert_eq!(
        s.body.as_ref().map(Redacted::as_bytes),
        Some(&b"ph_a_placeholder VB VB"[..])
    );
    assert_eq!(
        s.hits[0],
        SecretHit {
            secret: 0,
            substituted: 0,
            wrong_host: 1,
            host_mismatch: 0
        }
    );
    assert_eq!(
        s.hits[1],
        SecretHit {
            secret: 1,
            substituted: 2,
            wrong_host: 0,
            host_mismatch: 0
        }
    );
    assert!(p.blocked_by(&s.hits).is_none());
    // To a host "b" does not allow: "b" blocks.
    let s = p
        .substitute_body(&sni("api.allowed.test"), true, BodyKind::Text, body)
        .unwrap();
    assert_eq!(s.hits[1].wrong_host, 2);
    assert_eq!(p.blocked_by(&s.hits).unwrap().id, "b");
    // Authority is not the SNI: nothing replaced.
    let s = p
        .substitute_body(&sni("api.allowed.test"), false, BodyKind::Text, body)
        .unwrap();
    assert!(s.body.is_none());
    assert_eq!(s.hits[0].host_mismatch, 1);
    assert_eq!(s.hits[1].host_mismatch, 2);
    assert!(p.blocked_by(&s.hits).is_none());
}

#[test]
fn secrets_without_body_substitution_are_untouched_unless_configured() {
    let p = SandboxPolicy::new(vec![secret("n", "VN", &[])]).unwrap();
    let n = sni("x.test");
    let s = p
        .substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder")
        .unwrap();
    assert_eq!(s, BodySubstitution::default());
    let all = ModeOverrides {
        body_substitution: true,
        ..OFF
    };
    let p = SandboxPolicy::build(vec![secret("n", "VN", &[])], vec![], all).unwrap();
    let s = p
        .substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder")
        .unwrap();
    assert_eq!(s.body.unwrap().as_bytes(), b"VN");
    assert!(
        !format!(
            "{:?}",
            p.substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder")
                .unwrap()
        )
        .contains("VN")
    );
}

#[test]
fn merges_hits_per_secret() {
    let mut a = vec![SecretHit {
        secret: 1,
        substituted: 1,
        wrong_host: 0,
        host_mismatch: 0,
    }];
    merge_hits(
        &mut a,
        &[
            SecretHit {
                secret: 1,
                substituted: 2,
                wrong_host: 1,
                host_mismatch: 0,
            },
            SecretHit {
                secret: 0,
                substituted: 0,
                wrong_host: 0,
                host_mismatch: 3,
            },
        ],
    );
    assert_eq!(
        a,
        vec![
            SecretHit {
                secret: 1,
                substituted: 3,
                wrong_host: 1,
                host_mismatch: 0
            },
            SecretHit {
                secret: 0,
                substituted: 0,
                wrong_host: 0,
                host_mismatch: 3
            },
        ]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Form and text substitution equal naive replacement by the encoded value (JSON
    /// contexts are covered by `tests/decoders.rs`).
    #[test]
    fn agrees_with_naive_replacement(
        parts in prop::collection::vec(prop_oneof![
            "[a-z{}\":,&= ]{0,6}",
            Just("ph_a_placeholder".to_owned()),
            Just("ph_b_placeholder".to_owned()),
            Just("ph_n_placeholder".to_owned()),
        ], 0..8),
        value in "\\PC{1,12}|[\\x00-\\x7f]{1,12}",
        kind in prop::sample::select(vec![BodyKind::Form, BodyKind::Text]),
    ) {
        let p = SandboxPolicy::new(vec![
            with_body(secret("a", &value, &["a.test"])),
            with_body(secret("b", "VB", &["b.test"])),
            secret("n", "VN", &[]),
        ]).unwrap();
        let text = parts.concat();
        let s = p.substitute_body(&sni("a.test"), true, kind, text.as_bytes()).unwrap();
        let encoding = if kind == BodyKind::Form { Encoding::Query } else { Encoding::Raw };
        let mut enc = Vec::new();
        encoding.write(value.as_bytes(), &mut enc);
        let enc = String::from_utf8(enc).unwrap();
        let expect = text.replace("ph_a_placeholder", &enc);
        let got = s.body.map_or(text.clone(), |b| String::from_utf8(b.as_bytes().to_vec()).unwrap());
        prop_assert_eq!(got, expect);
        let a = text.matches("ph_a_placeholder").count() as u32;
        let b = text.matches("ph_b_placeholder").count() as u32;
        let hits_a = s.hits.iter().find(|h| h.secret == 0).map_or(0, |h| h.substituted);
        let hits_b = s.hits.iter().find(|h| h.secret == 1).map_or(0, |h| h.wrong_host);
        prop_assert_eq!((hits_a, hits_b), (a, b));
        prop_assert!(s.hits.iter().all(|h| h.secret != 2));
    }

    #[test]
    fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..200), ct in "\\PC{0,30}") {
        let p = policy();
        let kind = BodyKind::of(Some(ct.as_bytes()), None).unwrap_or(BodyKind::Text);
        let _ = p.substitute_body(&sni("api.allowed.test"), true, kind, &body);
    }
}
