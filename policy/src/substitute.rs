//! Request-side substitution: placeholders become values, only where the policy allows.
//!
//! Per request: [`SandboxPolicy::begin_request`] checks that every authority of the request
//! (Host headers, `:authority`) names the connection's SNI and port, then
//! [`RequestSubstitution::target`] and [`RequestSubstitution::header`] rewrite the request
//! target and each header value, and [`RequestSubstitution::finish`] reports per-secret counts.
//! [`SandboxPolicy::substitute`] does all of it for a [`RequestView`].
//!
//! Where placeholders are replaced: header values (raw), the request target (encoded for where
//! the placeholder sits, see the `encode` module: the path percent-encodes every byte outside
//! `pchar`, the query every byte outside `unreserved`), and inside `Authorization: Basic`
//! credentials (decoded, substituted, re-encoded). A placeholder of a secret that does not
//! allow the SNI stays as it is and is reported as `wrong_host`; when an authority differs from
//! the SNI nothing is replaced and every placeholder is reported as `host_mismatch`.
//!
//! The sandbox chooses the bytes around a placeholder, so a substitution that would let the
//! upstream see the value split, partly decoded or transformed fails the whole request with a
//! [`SubstituteError`] naming the secret (the caller answers 400): a placeholder in the target
//! right after `%` or `%X` (the value's first characters would complete the escape), a value
//! with `:` as the user-id of Basic credentials, and a value with a control character (CR, LF,
//! NUL, or any other except TAB) for a header, which would break its framing. Nothing
//! allocates unless a placeholder is found (except to decode a Basic credential).

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};

use crate::decide::SandboxPolicy;
use crate::encode::{Encoding, open_percent_escape};
use crate::host::ServerName;
use crate::secret::{MountedSecret, Redacted, RedactedString};

/// Accepts Basic credentials with or without padding.
const BASIC_DECODE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The per-sandbox automaton over placeholders (pattern index = secret index).
#[derive(Debug)]
pub(crate) struct Substituter {
    pub(crate) ac: Option<AhoCorasick>,
    /// The value may be written into a header value.
    header_safe: Vec<bool>,
    /// The value contains `:` (it cannot be a Basic user-id).
    has_colon: Vec<bool>,
    /// Shortest placeholder, and the most a replacement can grow the text (encoded for a
    /// query, the widest encoding of the head), for sizing output buffers once: a
    /// reallocation would leave a copy of a value behind in freed memory.
    min_placeholder_len: usize,
    max_growth: usize,
}

impl Substituter {
    pub(crate) fn new(secrets: &[MountedSecret]) -> Self {
        let ac = if secrets.is_empty() {
            None
        } else {
            // Placeholders are validated non-empty and non-overlapping, so building cannot
            // fail for size reasons at the sizes a sandbox has; fall back to "no automaton"
            // (no substitution, never a wrong one) if it ever does.
            AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .build(secrets.iter().map(|s| s.placeholder.as_bytes()))
                .ok()
        };
        fn value(s: &MountedSecret) -> &[u8] {
            s.value.expose().as_bytes()
        }
        Self {
            ac,
            header_safe: secrets
                .iter()
                .map(|s| value(s).iter().copied().all(header_safe_byte))
                .collect(),
            has_colon: secrets.iter().map(|s| value(s).contains(&b':')).collect(),
            min_placeholder_len: secrets
                .iter()
                .map(|s| s.placeholder.len())
                .min()
                .unwrap_or(1)
                .max(1),
            max_growth: secrets
                .iter()
                .map(|s| {
                    Encoding::Query
                        .len(value(s))
                        .saturating_sub(s.placeholder.len())
                })
                .max()
                .unwrap_or(0),
        }
    }

    /// An output capacity no substitution of `input` can exceed.
    fn capacity_for(&self, input: &[u8]) -> usize {
        let max_matches = input.len() / self.min_placeholder_len;
        input
            .len()
            .saturating_add(max_matches.saturating_mul(self.max_growth))
    }
}

/// Bytes `http::HeaderValue` accepts: visible ASCII, space, TAB and obs-text.
fn header_safe_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// A request, abstracted from HTTP/1.1 and h2.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// The request target (origin form: path and query).
    pub target: &'a str,
    /// The h2 `:authority` (or the authority of an absolute-form target); Host headers are
    /// taken from `headers`.
    pub authority: Option<&'a [u8]>,
    /// Header names and values, in order.
    pub headers: &'a [(&'a [u8], &'a [u8])],
}

/// What substitution changed in a [`RequestView`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Substitution {
    /// The new target, if it changed.
    pub target: Option<RedactedString>,
    /// New values of changed headers: (index into `RequestView::headers`, value).
    pub headers: Vec<(usize, Redacted)>,
    /// Per-secret counts, for secrets whose placeholder occurred.
    pub hits: Vec<SecretHit>,
    /// An authority differed from the SNI: nothing was substituted.
    pub host_mismatch: bool,
}

impl Substitution {
    /// Whether anything in the request changed.
    pub fn changed(&self) -> bool {
        self.target.is_some() || !self.headers.is_empty()
    }
}

/// How often one secret's placeholder occurred in a request, and what became of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecretHit {
    /// Index into [`SandboxPolicy::secrets`].
    pub secret: usize,
    /// Occurrences replaced by the value.
    pub substituted: u32,
    /// Occurrences left alone: the secret does not allow the SNI (a blocking secret's request
    /// is refused, see [`SandboxPolicy::blocked_by`]).
    pub wrong_host: u32,
    /// Occurrences left alone: the request's authority differs from the SNI.
    pub host_mismatch: u32,
}

/// Why a request must be refused; names the secret, never its value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubstituteError {
    /// The value contains a byte that would break the header it lands in.
    #[error(
        "secret {name} ({id}) contains a control character and cannot be sent in header {header}"
    )]
    UnsafeInHeader {
        /// Secret id.
        id: String,
        /// Secret name.
        name: String,
        /// The header it would have landed in.
        header: String,
    },
    /// The placeholder follows an incomplete escape the value's first characters would
    /// complete: the upstream would decode part of the value together with the bytes before it.
    #[error(
        "secret {name} ({id}): its placeholder follows an incomplete escape ({escape}) in the {place}; \
         the upstream would decode part of the value with it"
    )]
    OpenEscape {
        /// Secret id.
        id: String,
        /// Secret name.
        name: String,
        /// Where: `request target`, `form body` or `JSON body`.
        place: &'static str,
        /// The kind of escape: `%`, `%X`, `\` or `\u`.
        escape: &'static str,
    },
    /// The placeholder is outside every string of a JSON body: the value would not arrive as
    /// a string.
    #[error(
        "secret {name} ({id}): its placeholder is outside a JSON string in the body; \
         it is only substituted inside a string"
    )]
    OutsideJsonString {
        /// Secret id.
        id: String,
        /// Secret name.
        name: String,
    },
    /// The value contains `:` and its placeholder is the user-id of Basic credentials: the
    /// upstream would split the value between user-id and password.
    #[error(
        "secret {name} ({id}) contains ':' and cannot be sent as the user-id of Basic credentials"
    )]
    ColonInBasicUser {
        /// Secret id.
        id: String,
        /// Secret name.
        name: String,
    },
}

impl SubstituteError {
    /// [`SubstituteError::OpenEscape`] for `secret`.
    pub(crate) fn open_escape(
        secret: &MountedSecret,
        place: &'static str,
        escape: &'static str,
    ) -> Self {
        Self::OpenEscape {
            id: secret.id.clone(),
            name: secret.name.clone(),
            place,
            escape,
        }
    }
}

/// Where a value lands, for its encoding and safety check.
#[derive(Clone, Copy)]
enum Place<'n> {
    Header(&'n [u8]),
    /// The request target; the query starts after this index (the first `?`).
    Target {
        query: Option<usize>,
    },
    /// Inside decoded Basic credentials (any byte is safe inside base64); the user-id ends at
    /// this index (the first `:`).
    Basic {
        user_end: usize,
    },
}

/// Substitution state for one request; see the module docs.
#[derive(Debug)]
pub struct RequestSubstitution<'p> {
    policy: &'p SandboxPolicy,
    sni: &'p ServerName,
    host_ok: bool,
    hits: Vec<SecretHit>,
}

impl SandboxPolicy {
    /// Starts substitution for a request on a connection intercepted for `sni` whose original
    /// destination port is `port`. `authorities` are the request's `:authority` and every Host
    /// header; all must name the SNI (see [`ServerName::matches_authority`]), and a request
    /// with none gets nothing substituted.
    pub fn begin_request<'p, 'a, I>(
        &'p self,
        sni: &'p ServerName,
        port: u16,
        authorities: I,
    ) -> RequestSubstitution<'p>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut any = false;
        let mut all = true;
        for a in authorities {
            any = true;
            all &= sni.matches_authority(a, port);
        }
        RequestSubstitution {
            policy: self,
            sni,
            host_ok: any && all,
            hits: Vec::new(),
        }
    }

    /// Substitutes placeholders in a whole request view, on a connection intercepted for `sni`
    /// to port `port`.
    pub fn substitute(
        &self,
        sni: &ServerName,
        port: u16,
        req: &RequestView<'_>,
    ) -> Result<Substitution, SubstituteError> {
        let hosts = req
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"host"))
            .map(|(_, v)| *v);
        let mut ctx = self.begin_request(sni, port, req.authority.into_iter().chain(hosts));
        let target = ctx.target(req.target)?;
        let mut headers = Vec::new();
        for (i, (name, value)) in req.headers.iter().enumerate() {
            if let Some(v) = ctx.header(name, value)? {
                headers.push((i, v));
            }
        }
        let host_mismatch = !ctx.host_matches();
        Ok(Substitution {
            target,
            headers,
            hits: ctx.finish(),
            host_mismatch,
        })
    }
}

impl RequestSubstitution<'_> {
    /// Whether the request's authorities name the SNI (otherwise nothing is substituted).
    pub fn host_matches(&self) -> bool {
        self.host_ok
    }

    /// Substitutes in the request target; `None` if unchanged.
    pub fn target(&mut self, target: &str) -> Result<Option<RedactedString>, SubstituteError> {
        let query = target.find('?');
        Ok(self
            .replace(target.as_bytes(), Place::Target { query })?
            .map(|bytes| {
                // Percent-encoded values are ASCII and the rest is the original text.
                RedactedString::new(String::from_utf8_lossy(bytes.as_bytes()).into_owned())
            }))
    }

    /// Substitutes in one header value; `None` if unchanged.
    pub fn header(
        &mut self,
        name: &[u8],
        value: &[u8],
    ) -> Result<Option<Redacted>, SubstituteError> {
        if name.eq_ignore_ascii_case(b"authorization")
            && let Some(out) = self.basic(value)?
        {
            return Ok(Some(out));
        }
        self.replace(value, Place::Header(name))
    }

    /// Per-secret counts of this request.
    pub fn finish(self) -> Vec<SecretHit> {
        self.hits
    }

    /// `Authorization: Basic <base64>`: substitute inside the decoded credentials.
    fn basic(&mut self, value: &[u8]) -> Result<Option<Redacted>, SubstituteError> {
        let Some(sp) = value.iter().position(|&b| b == b' ') else {
            return Ok(None);
        };
        let (scheme, rest) = value.split_at(sp);
        if !scheme.eq_ignore_ascii_case(b"basic") {
            return Ok(None);
        }
        let token = rest.trim_ascii();
        let Ok(decoded) = BASIC_DECODE.decode(token) else {
            return Ok(None);
        };
        let decoded = Redacted::new(decoded);
        let bytes = decoded.as_bytes();
        let user_end = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
        let Some(new) = self.replace(bytes, Place::Basic { user_end })? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(scheme.len() + 1 + new.as_bytes().len() * 4 / 3 + 4);
        out.extend_from_slice(scheme);
        out.push(b' ');
        let encoded = Redacted::new(STANDARD.encode(new.as_bytes()).into_bytes());
        out.extend_from_slice(encoded.as_bytes());
        Ok(Some(Redacted::new(out)))
    }

    /// Replaces allowed placeholders in `input`; `None` if nothing was replaced.
    fn replace(
        &mut self,
        input: &[u8],
        place: Place<'_>,
    ) -> Result<Option<Redacted>, SubstituteError> {
        let Some(ac) = &self.policy.substituter.ac else {
            return Ok(None);
        };
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        for m in ac.find_iter(input) {
            let i = m.pattern().as_usize();
            if !self.host_ok {
                self.hit(i).host_mismatch += 1;
                continue;
            }
            if !self.policy.secret_allows(i, self.sni) {
                self.hit(i).wrong_host += 1;
                continue;
            }
            let Some(secret) = self.policy.secrets().get(i) else {
                continue;
            };
            let encoding = self.check(i, secret, place, &input[..m.start()])?;
            self.hit(i).substituted += 1;
            let buf = out.get_or_insert_with(|| {
                Vec::with_capacity(self.policy.substituter.capacity_for(input))
            });
            buf.extend_from_slice(&input[copied..m.start()]);
            encoding.write(secret.value.expose().as_bytes(), buf);
            copied = m.end();
        }
        Ok(out.map(|mut buf| {
            buf.extend_from_slice(&input[copied..]);
            debug_assert!(buf.len() <= self.policy.substituter.capacity_for(input));
            Redacted::new(buf)
        }))
    }

    /// How secret `i`'s value is written at a match preceded by `before`, or why it cannot be.
    fn check(
        &self,
        i: usize,
        secret: &MountedSecret,
        place: Place<'_>,
        before: &[u8],
    ) -> Result<Encoding, SubstituteError> {
        let sub = &self.policy.substituter;
        match place {
            Place::Header(name) if !sub.header_safe[i] => Err(SubstituteError::UnsafeInHeader {
                id: secret.id.clone(),
                name: secret.name.clone(),
                header: String::from_utf8_lossy(name).into_owned(),
            }),
            Place::Header(_) => Ok(Encoding::Raw),
            Place::Basic { user_end } if before.len() < user_end && sub.has_colon[i] => {
                Err(SubstituteError::ColonInBasicUser {
                    id: secret.id.clone(),
                    name: secret.name.clone(),
                })
            }
            Place::Basic { .. } => Ok(Encoding::Raw),
            Place::Target { .. } if open_percent_escape(before) => Err(
                SubstituteError::open_escape(secret, "request target", "`%` or `%X`"),
            ),
            Place::Target { query } if query.is_some_and(|q| before.len() > q) => {
                Ok(Encoding::Query)
            }
            Place::Target { .. } => Ok(Encoding::Path),
        }
    }

    fn hit(&mut self, secret: usize) -> &mut SecretHit {
        let pos = match self.hits.iter().position(|h| h.secret == secret) {
            Some(pos) => pos,
            None => {
                self.hits.push(SecretHit {
                    secret,
                    ..SecretHit::default()
                });
                self.hits.len() - 1
            }
        };
        &mut self.hits[pos]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            .target(
                "/v1/ph_x_placeholder/x?q=ph_x_placeholder&r=%41ph_x_placeholder#ph_x_placeholder",
            )
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
            "ph_c_placeholder",
        ] {
            let e = ctx
                .header(b"authorization", basic(user).as_bytes())
                .unwrap_err();
            assert_eq!(
                e,
                SubstituteError::ColonInBasicUser {
                    id: "c".into(),
                    name: "NAME_c".into()
                }
            );
        }
        // As the password, a colon is data.
        let out = ctx
            .header(b"authorization", basic("user:ph_c_placeholder").as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(out.as_bytes(), basic("user:id:secret").as_bytes());
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
        let hello = include_bytes!("../testdata/curl_http2.bin");
        let iters = 100_000u32;
        let start = Instant::now();
        for _ in 0..iters {
            let peek = crate::client_hello::parse_client_hello(black_box(hello));
            if let crate::client_hello::Peek::Tls(h) = peek {
                black_box(p.decide_hello(&h));
            }
        }
        let ns = start.elapsed().as_nanos() / u128::from(iters);
        println!("parse_client_hello (curl h2, 517 B) + decide: {ns} ns/op");
    }
}
