//! The sandbox chooses every byte around a placeholder; whatever it chooses, the upstream's
//! standard decoder of the component — path segments percent-decoded, the query and form bodies
//! form-decoded, JSON bodies parsed — sees exactly the value where the placeholder was, or the
//! request is refused (and only when the original bytes leave an escape open before a
//! placeholder, or put it outside a JSON string).
//!
//! Each property compares the decoding of the substituted text with the decoding of the
//! original text in which the placeholder is then replaced by the value: equal means the value
//! was neither split, partly decoded nor transformed, and the structure (segments, fields, JSON
//! shape) did not change.

use proptest::prelude::*;
use veil_link::proto::SecretValue;
use veil_policy::{
    BodyKind, HostPattern, MountedSecret, RequestView, SandboxPolicy, ServerName, SubstituteError,
};

const HOST: &str = "api.allowed.test";
const PH_A: &str = "ph_a_placeholder";
const PH_B: &str = "ph_b_placeholder";
/// Mounted, but allowed elsewhere: stays as it is.
const PH_W: &str = "ph_w_placeholder";

fn secret(id: &str, value: &str, host: &str) -> MountedSecret {
    MountedSecret {
        id: id.into(),
        name: format!("NAME_{id}"),
        placeholder: format!("ph_{id}_placeholder"),
        hosts: vec![HostPattern::parse(host).expect("test host pattern")],
        value: SecretValue::new(value.into()),
        body_substitution: true,
        wrong_host: Default::default(),
        previous: Vec::new(),
        retired: false,
    }
}

fn policy(a: &str, b: &str) -> SandboxPolicy {
    SandboxPolicy::new(vec![
        secret("a", a, HOST),
        secret("b", b, HOST),
        secret("w", "WRONG-HOST-VALUE", "elsewhere.test"),
    ])
    .expect("test policy")
}

/// Values full of what decoders treat specially, and any Unicode.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-f0-9+/=%&<>:@?#; ]{1,6}",
        "[a-zA-Z0-9+/=%&<>:@?#;~ \\\\\"\\n\\t\\x01\u{e9}\u{20ac}\u{1f600}]{1,20}",
        "\\PC{1,10}",
    ]
}

/// What a sandbox may put around placeholders, for URLs and forms.
fn url_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("%"),
            Just("%4"),
            Just("%41"),
            Just("%2"),
            Just("%25"),
            Just("%C3"),
            Just("%A9"),
            Just("%g"),
            Just("+"),
            Just("&"),
            Just("="),
            Just("/"),
            Just(";"),
            Just(":"),
            Just("a"),
            Just("4"),
            Just("f"),
            Just(PH_A),
            Just(PH_B),
            Just(PH_W),
        ],
        0..10,
    )
    .prop_map(|parts| parts.concat())
}

/// What a sandbox may put around placeholders in a JSON body: mostly valid documents with an
/// attack (an escape left open, a quote that ends the string) right before a placeholder, and
/// free mixes of the same pieces.
fn json_text() -> impl Strategy<Value = String> {
    let safe = || {
        prop::collection::vec(
            prop::sample::select(vec![
                "a", "0", "4", " ", ",", ":", "%", "\u{e9}", "\\n", "\\u0041", "\\\\", "\\\"",
            ]),
            0..3,
        )
        .prop_map(|p| p.concat())
    };
    let attack = prop::sample::select(vec![
        "", "", "", "\\", "\\\\\\", "\\u", "\\u0", "\\u00", "\\u004", "\"", "\",\"",
    ]);
    let ph = prop::sample::select(vec![PH_A, PH_B, PH_W]);
    let shaped = (
        prop::sample::select(vec![
            ("{\"k\":\"", "\"}"),
            ("[\"", "\"]"),
            ("{\"", "\":1}"),
            ("\"", "\""),
            ("{\"k\":", "}"),
            ("[1,", "]"),
        ]),
        prop::collection::vec((safe(), attack, ph, safe()), 1..3),
    )
        .prop_map(|((open, close), parts)| {
            let inner: String = parts
                .into_iter()
                .map(|(a, b, c, d)| format!("{a}{b}{c}{d}"))
                .collect();
            format!("{open}{inner}{close}")
        });
    let free = prop::collection::vec(
        prop::sample::select(vec![
            "\"", "\\", "\\\\", "\\\"", "\\u", "\\u0", "\\u00", "\\u004", "\\u0041", "\\n", "a",
            "0", "4", " ", ",", ":", "{", "}", "[", "]", PH_A, PH_B, PH_W,
        ]),
        0..10,
    )
    .prop_map(|p| p.concat());
    prop_oneof![3 => shaped, 1 => free]
}

/// `text` with the substituted placeholders replaced by their values.
fn expected(text: &str, a: &str, b: &str) -> String {
    text.replace(PH_A, a).replace(PH_B, b)
}

/// Whether some placeholder that is substituted follows an open `%` escape in `text`.
fn open_escape_before_placeholder(text: &str) -> bool {
    [PH_A, PH_B].iter().any(|ph| {
        text.match_indices(ph).any(|(i, _)| {
            let before = &text.as_bytes()[..i];
            before.ends_with(b"%")
                || (before.len() >= 2
                    && before[before.len() - 2] == b'%'
                    && before[before.len() - 1].is_ascii_hexdigit())
        })
    })
}

/// Path segments as a router sees them: split on `/`, then percent-decoded.
fn segments(path: &str) -> Vec<Vec<u8>> {
    path.split('/')
        .map(|s| percent_encoding::percent_decode_str(s).collect())
        .collect()
}

/// Form fields as an application sees them (`+` is a space).
fn fields(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A JSON value with placeholders in every string (keys too) replaced by their values.
fn replace_in_json(v: &serde_json::Value, a: &str, b: &str) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(expected(s, a, b)),
        Value::Array(items) => {
            Value::Array(items.iter().map(|i| replace_in_json(i, a, b)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (expected(k, a, b), replace_in_json(v, a, b)))
                .collect(),
        ),
        other => other.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Request targets: path segments and query fields decode to exactly the values.
    #[test]
    fn targets_decode_to_exactly_the_value(
        a in value(),
        b in value(),
        path in url_text(),
        query in proptest::option::of(url_text()),
    ) {
        let p = policy(&a, &b);
        let sni = ServerName::parse(HOST).unwrap();
        let target = match &query {
            Some(q) => format!("/{path}?{q}"),
            None => format!("/{path}"),
        };
        let headers: [(&[u8], &[u8]); 1] = [(b"host", HOST.as_bytes())];
        let view = RequestView { target: &target, authority: None, headers: &headers };
        match p.substitute(&sni, 443, &view) {
            Err(e) => {
                prop_assert!(matches!(e, SubstituteError::OpenEscape { .. }), "{e}");
                prop_assert!(open_escape_before_placeholder(&target));
            }
            Ok(s) => {
                prop_assert!(!open_escape_before_placeholder(&target));
                let out = s.target.map_or(target.clone(), |t| t.as_str().to_owned());
                let (out_path, out_query) = match out.split_once('?') {
                    Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                    None => (out.clone(), None),
                };
                let want: Vec<Vec<u8>> = segments(&format!("/{path}"))
                    .into_iter()
                    .map(|s| {
                        let s = String::from_utf8_lossy(&s).into_owned();
                        expected(&s, &a, &b).into_bytes()
                    })
                    .collect();
                let got: Vec<Vec<u8>> = segments(&out_path)
                    .into_iter()
                    .map(|s| String::from_utf8_lossy(&s).into_owned().into_bytes())
                    .collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(out_query.is_some(), query.is_some());
                if let (Some(q), Some(out_q)) = (&query, &out_query) {
                    let want: Vec<(String, String)> = fields(q)
                        .into_iter()
                        .map(|(k, v)| (expected(&k, &a, &b), expected(&v, &a, &b)))
                        .collect();
                    prop_assert_eq!(fields(out_q), want);
                }
            }
        }
    }

    /// Form bodies: every field decodes to exactly what it held, placeholders replaced.
    #[test]
    fn form_bodies_decode_to_exactly_the_value(a in value(), b in value(), body in url_text()) {
        let p = policy(&a, &b);
        let sni = ServerName::parse(HOST).unwrap();
        match p.substitute_body(&sni, true, BodyKind::Form, body.as_bytes()) {
            Err(e) => {
                prop_assert!(matches!(e, SubstituteError::OpenEscape { .. }), "{e}");
                prop_assert!(open_escape_before_placeholder(&body));
            }
            Ok(s) => {
                prop_assert!(!open_escape_before_placeholder(&body));
                let out = s.body.map_or(body.clone().into_bytes(), |b| b.as_bytes().to_vec());
                let out = String::from_utf8(out).unwrap();
                let want: Vec<(String, String)> = fields(&body)
                    .into_iter()
                    .map(|(k, v)| (expected(&k, &a, &b), expected(&v, &a, &b)))
                    .collect();
                prop_assert_eq!(fields(&out), want);
            }
        }
    }

    /// JSON bodies: the parsed document is the original one with placeholders replaced in its
    /// strings; a body veil refuses is one no JSON parser accepts as it is.
    #[test]
    fn json_bodies_parse_to_exactly_the_value(a in value(), b in value(), body in json_text()) {
        let p = policy(&a, &b);
        let sni = ServerName::parse(HOST).unwrap();
        let original = serde_json::from_str::<serde_json::Value>(&body);
        match p.substitute_body(&sni, true, BodyKind::Json, body.as_bytes()) {
            Err(e) => {
                prop_assert!(
                    matches!(
                        e,
                        SubstituteError::OpenEscape { .. } | SubstituteError::OutsideJsonString { .. }
                    ),
                    "{e}"
                );
                prop_assert!(original.is_err(), "refused a valid JSON body: {body}");
            }
            Ok(s) => {
                let out = s.body.map_or(body.clone().into_bytes(), |b| b.as_bytes().to_vec());
                let parsed = serde_json::from_slice::<serde_json::Value>(&out);
                prop_assert_eq!(parsed.is_ok(), original.is_ok(), "{}", body);
                if let (Ok(original), Ok(parsed)) = (original, parsed) {
                    prop_assert_eq!(parsed, replace_in_json(&original, &a, &b));
                }
            }
        }
    }
}

#[test]
fn refusals_name_the_secret_never_the_value() {
    let p = policy("VALUE-a", "VALUE-b");
    let sni = ServerName::parse(HOST).unwrap();
    let headers: [(&[u8], &[u8]); 1] = [(b"host", HOST.as_bytes())];
    let view = RequestView {
        target: "/?k=%ph_b_placeholder",
        authority: None,
        headers: &headers,
    };
    let e = p.substitute(&sni, 443, &view).unwrap_err().to_string();
    assert!(e.contains("NAME_b (b)") && !e.contains("VALUE"), "{e}");
    for body in [
        r#"{"k":"\u00ph_a_placeholder"}"#,
        r#"{"k":ph_a_placeholder}"#,
    ] {
        let e = p
            .substitute_body(&sni, true, BodyKind::Json, body.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("NAME_a (a)") && !e.contains("VALUE"), "{e}");
    }
}
