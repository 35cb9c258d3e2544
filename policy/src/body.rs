//! Request-body substitution: placeholders in JSON, form and text bodies become values, encoded
//! for where they land, for secrets whose body substitution is on.
//!
//! Off by default: a secret turns it on by its own field, or the agent's config for every secret
//! ([`ModeOverrides`]). The caller reads the body only when [`SandboxPolicy::body_scan_needed`]
//! says some secret could be replaced (or blocked) in it and [`BodyKind::of`] accepts its
//! content type, and only up to its bound; a body over the bound is forwarded unchanged.
//!
//! How a value is written: into JSON escaped as a JSON string's content (the placeholder must
//! sit inside a string, between whole characters), into `application/x-www-form-urlencoded`
//! percent-encoded outside `unreserved` (never after an incomplete `%` escape), into `text/*`
//! as it is (see the `encode` module). A placeholder that breaks those rules refuses the
//! request with a [`SubstituteError`] naming the secret. Counts per secret come back as
//! [`SecretHit`]s, exactly as for the head: substituted, `wrong_host` (left alone; a blocking
//! secret's request is then refused by the caller) or `host_mismatch` (the request's authority
//! is not the SNI: nothing is replaced). Placeholders of secrets without body
//! substitution are left alone and not counted: for them a body is data like any other.

use crate::decide::SandboxPolicy;
use crate::encode::{Encoding, JsonContext, JsonSpot, open_percent_escape};
use crate::host::ServerName;
use crate::secret::{ModeOverrides, MountedSecret, Redacted};
use crate::substitute::{SecretHit, SubstituteError};
use veil_link::proto::WrongHost;

/// The body formats substitution understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` and `application/*+json`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// `text/*`.
    Text,
}

impl BodyKind {
    /// The kind of a body from its `Content-Type` and `Content-Encoding` headers; `None` when it
    /// is not substituted (another type, no type, or a compressed body where placeholders do not
    /// appear literally).
    pub fn of(content_type: Option<&[u8]>, content_encoding: Option<&[u8]>) -> Option<Self> {
        if let Some(enc) = content_encoding
            && !enc.trim_ascii().is_empty()
            && !enc.trim_ascii().eq_ignore_ascii_case(b"identity")
        {
            return None;
        }
        let ct = content_type?;
        let essence = ct.split(|&b| b == b';').next()?.trim_ascii();
        let (top, sub) = {
            let slash = essence.iter().position(|&b| b == b'/')?;
            (&essence[..slash], &essence[slash + 1..])
        };
        if sub.is_empty() {
            return None;
        }
        if top.eq_ignore_ascii_case(b"text") {
            return Some(Self::Text);
        }
        if !top.eq_ignore_ascii_case(b"application") {
            return None;
        }
        if sub.eq_ignore_ascii_case(b"json")
            || (sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case(b"+json"))
        {
            return Some(Self::Json);
        }
        if sub.eq_ignore_ascii_case(b"x-www-form-urlencoded") {
            return Some(Self::Form);
        }
        None
    }
}

/// What body substitution changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BodySubstitution {
    /// The new body, if anything was replaced.
    pub body: Option<Redacted>,
    /// Per-secret counts, for secrets with body substitution whose placeholder occurred.
    pub hits: Vec<SecretHit>,
}

impl SandboxPolicy {
    /// Whether a request body to `sni` is worth reading: some secret with body substitution is
    /// allowed there, or blocks hosts it does not allow (its placeholder in the body must then
    /// refuse the request).
    pub fn body_scan_needed(&self, sni: &ServerName, overrides: ModeOverrides) -> bool {
        self.secrets().iter().enumerate().any(|(i, s)| {
            s.body_substitution_with(overrides)
                && (self.secret_allows(i, sni) || s.wrong_host_with(overrides) == WrongHost::Block)
        })
    }

    /// Substitutes placeholders in a whole request body of `kind` sent to `sni`; `host_ok` is
    /// whether the request's authorities name the SNI (see [`SandboxPolicy::begin_request`]).
    /// Refused (naming the secret) when a placeholder to replace follows an incomplete escape
    /// (`%`, `%X` in a form; a lone `\` or `\u`, `\u0`… in a JSON string) or is outside every
    /// string of a JSON body: the upstream would not decode exactly the value there.
    pub fn substitute_body(
        &self,
        sni: &ServerName,
        host_ok: bool,
        kind: BodyKind,
        body: &[u8],
        overrides: ModeOverrides,
    ) -> Result<BodySubstitution, SubstituteError> {
        let Some(ac) = &self.substituter.ac else {
            return Ok(BodySubstitution::default());
        };
        let encoding = match kind {
            BodyKind::Json => Encoding::JsonString,
            BodyKind::Form => Encoding::Query,
            BodyKind::Text => Encoding::Raw,
        };
        let mut json = JsonContext::default();
        let mut hits: Vec<SecretHit> = Vec::new();
        // Matches to replace, found first so the output is allocated once at its exact size: a
        // reallocation would leave a copy of a value behind in freed memory.
        let mut replace: Vec<(usize, usize, usize)> = Vec::new();
        for m in ac.find_iter(body) {
            let i = m.pattern().as_usize();
            let Some(secret) = self.secrets().get(i) else {
                continue;
            };
            if !secret.body_substitution_with(overrides) {
                continue;
            }
            let hit = hit_mut(&mut hits, i);
            if !host_ok {
                hit.host_mismatch += 1;
            } else if !self.secret_allows(i, sni) {
                hit.wrong_host += 1;
            } else {
                check_spot(kind, secret, body, m.start(), &mut json)?;
                hit.substituted += 1;
                replace.push((m.start(), m.end(), i));
            }
        }
        if replace.is_empty() {
            return Ok(BodySubstitution { body: None, hits });
        }
        let value = |i: usize| self.secrets()[i].value.expose().as_bytes();
        let len = replace.iter().fold(body.len(), |len, &(start, end, i)| {
            len - (end - start) + encoding.len(value(i))
        });
        let mut out = Vec::with_capacity(len);
        let mut copied = 0;
        for &(start, end, i) in &replace {
            out.extend_from_slice(&body[copied..start]);
            encoding.write(value(i), &mut out);
            copied = end;
        }
        out.extend_from_slice(&body[copied..]);
        debug_assert_eq!(out.len(), len);
        Ok(BodySubstitution {
            body: Some(Redacted::new(out)),
            hits,
        })
    }
}

/// Whether `secret`'s value may be written at `at` in a body of `kind`.
fn check_spot(
    kind: BodyKind,
    secret: &MountedSecret,
    body: &[u8],
    at: usize,
    json: &mut JsonContext,
) -> Result<(), SubstituteError> {
    match kind {
        BodyKind::Text => Ok(()),
        BodyKind::Form if open_percent_escape(&body[..at]) => Err(SubstituteError::open_escape(
            secret,
            "form body",
            "`%` or `%X`",
        )),
        BodyKind::Form => Ok(()),
        BodyKind::Json => match json.spot(body, at) {
            JsonSpot::InString => Ok(()),
            JsonSpot::OpenEscape => Err(SubstituteError::open_escape(
                secret,
                "JSON body",
                "`\\` or `\\u`",
            )),
            JsonSpot::OutsideString => Err(SubstituteError::OutsideJsonString {
                id: secret.id.clone(),
                name: secret.name.clone(),
            }),
        },
    }
}

/// Adds `more` into `into`, per secret.
pub fn merge_hits(into: &mut Vec<SecretHit>, more: &[SecretHit]) {
    for m in more {
        let h = hit_mut(into, m.secret);
        h.substituted += m.substituted;
        h.wrong_host += m.wrong_host;
        h.host_mismatch += m.host_mismatch;
    }
}

fn hit_mut(hits: &mut Vec<SecretHit>, secret: usize) -> &mut SecretHit {
    let pos = match hits.iter().position(|h| h.secret == secret) {
        Some(pos) => pos,
        None => {
            hits.push(SecretHit {
                secret,
                ..SecretHit::default()
            });
            hits.len() - 1
        }
    };
    &mut hits[pos]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::testing::secret;
    use proptest::prelude::*;

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
        assert!(p.body_scan_needed(&sni("api.allowed.test"), OFF));
        // "b" blocks elsewhere and has body substitution: its placeholder must be looked for.
        assert!(p.body_scan_needed(&sni("elsewhere.test"), OFF));
        let plain = SandboxPolicy::new(vec![
            with_body(secret("a", "v", &["a.test"])),
            secret("u", "w", &[]),
        ])
        .unwrap();
        assert!(plain.body_scan_needed(&sni("a.test"), OFF));
        assert!(!plain.body_scan_needed(&sni("x.test"), OFF));
        let none = SandboxPolicy::new(vec![secret("u", "w", &[])]).unwrap();
        assert!(!none.body_scan_needed(&sni("x.test"), OFF));
        let all = ModeOverrides {
            body_substitution: true,
            ..OFF
        };
        assert!(none.body_scan_needed(&sni("x.test"), all));
    }

    #[test]
    fn json_values_are_escaped_and_parse_back() {
        let p = policy();
        let body = br#"{"key":"ph_a_placeholder","n":"ph_n_placeholder","x":["ph_a_placeholder"]}"#;
        let s = p
            .substitute_body(&sni("api.allowed.test"), true, BodyKind::Json, body, OFF)
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
            .substitute_body(&sni("x.allowed.test"), true, BodyKind::Form, body, OFF)
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
                .substitute_body(&n, true, BodyKind::Json, body.as_bytes(), OFF)
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
            let s = p.substitute_body(&n, true, BodyKind::Json, body.as_bytes(), OFF);
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
                .substitute_body(&n, true, BodyKind::Form, body.as_bytes(), OFF)
                .unwrap_err();
            assert_eq!(e, form_open, "{body}");
        }
        for body in ["k=%25ph_a_placeholder", "k=%gph_a_placeholder"] {
            let s = p.substitute_body(&n, true, BodyKind::Form, body.as_bytes(), OFF);
            assert!(s.is_ok(), "{body}");
        }
        // Text is not decoded: any neighbour goes.
        let s = p.substitute_body(&n, true, BodyKind::Text, br"%\ph_a_placeholder", OFF);
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
                OFF,
            )
            .unwrap();
        assert_eq!(s.body.unwrap().as_bytes(), format!("<{V_A}>").as_bytes());
    }

    #[test]
    fn wrong_host_and_mismatch_are_counted_not_replaced() {
        let p = policy();
        let body = b"ph_a_placeholder ph_b_placeholder ph_b_placeholder";
        let s = p
            .substitute_body(&sni("b.test"), true, BodyKind::Text, body, OFF)
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
        assert!(p.blocked_by(&s.hits, OFF).is_none());
        // To a host "b" does not allow: "b" blocks.
        let s = p
            .substitute_body(&sni("api.allowed.test"), true, BodyKind::Text, body, OFF)
            .unwrap();
        assert_eq!(s.hits[1].wrong_host, 2);
        assert_eq!(p.blocked_by(&s.hits, OFF).unwrap().id, "b");
        // Authority is not the SNI: nothing replaced.
        let s = p
            .substitute_body(&sni("api.allowed.test"), false, BodyKind::Text, body, OFF)
            .unwrap();
        assert!(s.body.is_none());
        assert_eq!(s.hits[0].host_mismatch, 1);
        assert_eq!(s.hits[1].host_mismatch, 2);
        assert!(p.blocked_by(&s.hits, OFF).is_none());
    }

    #[test]
    fn secrets_without_body_substitution_are_untouched_unless_configured() {
        let p = SandboxPolicy::new(vec![secret("n", "VN", &[])]).unwrap();
        let n = sni("x.test");
        let s = p
            .substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder", OFF)
            .unwrap();
        assert_eq!(s, BodySubstitution::default());
        let all = ModeOverrides {
            body_substitution: true,
            ..OFF
        };
        let s = p
            .substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder", all)
            .unwrap();
        assert_eq!(s.body.unwrap().as_bytes(), b"VN");
        assert!(
            !format!(
                "{:?}",
                p.substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder", all)
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
            let s = p.substitute_body(&sni("a.test"), true, kind, text.as_bytes(), OFF).unwrap();
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
            let _ = p.substitute_body(&sni("api.allowed.test"), true, kind, &body, OFF);
        }
    }
}
