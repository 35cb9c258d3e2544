//! Request-body substitution: placeholders in JSON, form and text bodies become values, encoded
//! for where they land, for secrets whose body substitution is on.
//!
//! Off by default: a secret turns it on by its own field, or the agent's config for every secret
//! ([`ModeOverrides`]). The caller reads the body only when [`SandboxPolicy::body_scan_needed`]
//! says some secret could be replaced (or blocked) in it and [`BodyKind::of`] accepts its
//! content type, and only up to its bound; a body over the bound is forwarded unchanged.
//!
//! How a value is written: into JSON escaped as a JSON string's content (the placeholder sits
//! inside a string), into `application/x-www-form-urlencoded` percent-encoded (placeholders are
//! URL-safe, so they appear literally in a form), into `text/*` as it is. Counts per secret come
//! back as [`SecretHit`]s, exactly as for the head: substituted, `wrong_host` (left alone; a
//! blocking secret's request is then refused by the caller) or `host_mismatch` (the request's
//! authority is not the SNI: nothing is replaced). Placeholders of secrets without body
//! substitution are left alone and not counted: for them a body is data like any other.

use crate::decide::SandboxPolicy;
use crate::host::ServerName;
use crate::secret::{ModeOverrides, Redacted};
use crate::substitute::SecretHit;
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
    pub fn substitute_body(
        &self,
        sni: &ServerName,
        host_ok: bool,
        kind: BodyKind,
        body: &[u8],
        overrides: ModeOverrides,
    ) -> BodySubstitution {
        let Some(ac) = &self.substituter.ac else {
            return BodySubstitution::default();
        };
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
                hit.substituted += 1;
                replace.push((m.start(), m.end(), i));
            }
        }
        if replace.is_empty() {
            return BodySubstitution { body: None, hits };
        }
        let mut encoded: Vec<Option<Redacted>> = vec![None; self.secrets().len()];
        let mut len = body.len();
        for &(start, end, i) in &replace {
            let value = encoded[i]
                .get_or_insert_with(|| encode(kind, self.secrets()[i].value.expose().as_bytes()));
            len = len - (end - start) + value.as_bytes().len();
        }
        let mut out = Vec::with_capacity(len);
        let mut copied = 0;
        for &(start, end, i) in &replace {
            out.extend_from_slice(&body[copied..start]);
            if let Some(v) = &encoded[i] {
                out.extend_from_slice(v.as_bytes());
            }
            copied = end;
        }
        out.extend_from_slice(&body[copied..]);
        debug_assert_eq!(out.len(), len);
        BodySubstitution {
            body: Some(Redacted::new(out)),
            hits,
        }
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

/// A value as it must be written into a body of `kind`.
fn encode(kind: BodyKind, value: &[u8]) -> Redacted {
    match kind {
        BodyKind::Text => Redacted::new(value.to_vec()),
        BodyKind::Json => Redacted::new(json_escape(value)),
        BodyKind::Form => Redacted::new(percent_encode(value)),
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The content of a JSON string holding `value` (RFC 8259 §7); non-ASCII UTF-8 stays as it is.
fn json_escape(value: &[u8]) -> Vec<u8> {
    let extra: usize = value
        .iter()
        .map(|&b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..0x20 => 5,
            _ => 0,
        })
        .sum();
    let mut out = Vec::with_capacity(value.len() + extra);
    for &b in value {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0..0x20 => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
    out
}

/// `value` percent-encoded for a form field: unreserved characters stay, every other byte
/// becomes `%XX` (a space too, never `+`, which decodes the same).
fn percent_encode(value: &[u8]) -> Vec<u8> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    let extra = value.iter().filter(|&&b| !unreserved(b)).count() * 2;
    let mut out = Vec::with_capacity(value.len() + extra);
    for &b in value {
        if unreserved(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::MountedSecret;
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
        let s = p.substitute_body(&sni("api.allowed.test"), true, BodyKind::Json, body, OFF);
        let out = String::from_utf8(s.body.unwrap().as_bytes().to_vec()).unwrap();
        // A JSON parser reads the exact value back.
        let key = out
            .strip_prefix(r#"{"key":""#)
            .and_then(|r| r.split_once(r#"","n""#))
            .unwrap()
            .0;
        assert_eq!(json_unescape(key), V_A);
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
        assert_eq!(
            json_escape(b"\x01\x1f\x7f\x08\x0c"),
            b"\\u0001\\u001F\x7f\\b\\f"
        );
    }

    /// Minimal JSON string unescape for the tests (the forms `json_escape` writes).
    fn json_unescape(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars();
        while let Some(c) = it.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match it.next().unwrap() {
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = it.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                other => out.push(other),
            }
        }
        out
    }

    #[test]
    fn form_values_are_percent_encoded() {
        let p = policy();
        let body = b"a=1&key=ph_a_placeholder&z=ph_a_placeholder";
        let s = p.substitute_body(&sni("x.allowed.test"), true, BodyKind::Form, body, OFF);
        let out = String::from_utf8(s.body.unwrap().as_bytes().to_vec()).unwrap();
        let enc = "sk-A%20%22quoted%22%20%5C%20back%0Anewline%20%C3%A9%26%3D%2B%25";
        assert_eq!(out, format!("a=1&key={enc}&z={enc}"));
        assert_eq!(s.hits[0].substituted, 2);
    }

    #[test]
    fn text_gets_the_value_as_is() {
        let p = policy();
        let s = p.substitute_body(
            &sni("api.allowed.test"),
            true,
            BodyKind::Text,
            b"<ph_a_placeholder>",
            OFF,
        );
        assert_eq!(s.body.unwrap().as_bytes(), format!("<{V_A}>").as_bytes());
    }

    #[test]
    fn wrong_host_and_mismatch_are_counted_not_replaced() {
        let p = policy();
        let body = b"ph_a_placeholder ph_b_placeholder ph_b_placeholder";
        let s = p.substitute_body(&sni("b.test"), true, BodyKind::Text, body, OFF);
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
        let s = p.substitute_body(&sni("api.allowed.test"), true, BodyKind::Text, body, OFF);
        assert_eq!(s.hits[1].wrong_host, 2);
        assert_eq!(p.blocked_by(&s.hits, OFF).unwrap().id, "b");
        // Authority is not the SNI: nothing replaced.
        let s = p.substitute_body(&sni("api.allowed.test"), false, BodyKind::Text, body, OFF);
        assert!(s.body.is_none());
        assert_eq!(s.hits[0].host_mismatch, 1);
        assert_eq!(s.hits[1].host_mismatch, 2);
        assert!(p.blocked_by(&s.hits, OFF).is_none());
    }

    #[test]
    fn secrets_without_body_substitution_are_untouched_unless_configured() {
        let p = SandboxPolicy::new(vec![secret("n", "VN", &[])]).unwrap();
        let n = sni("x.test");
        let s = p.substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder", OFF);
        assert_eq!(s, BodySubstitution::default());
        let all = ModeOverrides {
            body_substitution: true,
            ..OFF
        };
        let s = p.substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder", all);
        assert_eq!(s.body.unwrap().as_bytes(), b"VN");
        assert!(
            !format!(
                "{:?}",
                p.substitute_body(&n, true, BodyKind::Text, b"ph_n_placeholder", all)
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

        /// JSON substitution equals naive replacement by the escaped value, and the escaped
        /// value unescapes to the value.
        #[test]
        fn agrees_with_naive_replacement(
            parts in prop::collection::vec(prop_oneof![
                "[a-z{}\":, ]{0,6}",
                Just("ph_a_placeholder".to_owned()),
                Just("ph_b_placeholder".to_owned()),
                Just("ph_n_placeholder".to_owned()),
            ], 0..8),
            value in "\\PC{1,12}|[\\x00-\\x7f]{1,12}",
            kind in prop::sample::select(vec![BodyKind::Json, BodyKind::Form, BodyKind::Text]),
        ) {
            let p = SandboxPolicy::new(vec![
                with_body(secret("a", &value, &["a.test"])),
                with_body(secret("b", "VB", &["b.test"])),
                secret("n", "VN", &[]),
            ]).unwrap();
            let text = parts.concat();
            let s = p.substitute_body(&sni("a.test"), true, kind, text.as_bytes(), OFF);
            let enc = String::from_utf8(encode(kind, value.as_bytes()).as_bytes().to_vec()).unwrap();
            let expect = text.replace("ph_a_placeholder", &enc);
            let got = s.body.map_or(text.clone(), |b| String::from_utf8(b.as_bytes().to_vec()).unwrap());
            prop_assert_eq!(got, expect);
            prop_assert_eq!(json_unescape(&String::from_utf8(json_escape(value.as_bytes())).unwrap()), value);
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
