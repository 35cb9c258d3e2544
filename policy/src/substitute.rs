//! Request-side substitution: placeholders become values, only where the policy allows.
//!
//! Per request: [`crate::SandboxPolicy::begin_request`] checks that every authority of the request
//! (Host headers, `:authority`) names the connection's SNI and port, then
//! [`RequestSubstitution::target`] and [`RequestSubstitution::header`] rewrite the request
//! target and each header value, and [`RequestSubstitution::finish`] reports per-secret counts.
//! [`crate::SandboxPolicy::substitute`] does all of it for a [`RequestView`].
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
//! with `:` in the user-id of Basic credentials next to the sandbox's bytes (a placeholder that
//! is the whole credential, `user:password` in one secret, is fine), and a value with a control
//! character (CR, LF,
//! NUL, or any other except TAB) for a header, which would break its framing. Nothing
//! allocates unless a placeholder is found (except to decode a Basic credential).

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};

use crate::encode::{Encoding, open_percent_escape};
use crate::host::ServerName;
use crate::secret::{ModeOverrides, MountedSecret, Redacted, RedactedString};

/// Accepts Basic credentials with or without padding.
const BASIC_DECODE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The live secrets of a sandbox, the agent's modes, and the automaton over their
/// placeholders (pattern index = secret index).
#[derive(Debug)]
pub(crate) struct Substituter {
    secrets: Vec<MountedSecret>,
    overrides: ModeOverrides,
    pub(crate) ac: Option<AhoCorasick>,
    /// The value may be written into a header value.
    header_safe: Vec<bool>,
    /// The value contains `:` (it splits a Basic user-id it lands in).
    has_colon: Vec<bool>,
    /// Shortest placeholder, and the most a replacement can grow the text (encoded for a
    /// query, the widest encoding of the head), for sizing output buffers once: a
    /// reallocation would leave a copy of a value behind in freed memory.
    min_placeholder_len: usize,
    max_growth: usize,
}

impl Substituter {
    pub(crate) fn new(secrets: Vec<MountedSecret>, overrides: ModeOverrides) -> Self {
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
            secrets,
            overrides,
        }
    }

    /// The live secrets, indexed as in reports ([`SecretHit::secret`]).
    pub(crate) fn secrets(&self) -> &[MountedSecret] {
        &self.secrets
    }

    /// The agent-wide modes.
    pub(crate) fn overrides(&self) -> ModeOverrides {
        self.overrides
    }

    /// Whether the secret at `index` may be sent to `sni`.
    pub(crate) fn allows(&self, index: usize, sni: &ServerName) -> bool {
        self.secrets
            .get(index)
            .is_some_and(|s| s.unrestricted() || s.hosts.iter().any(|p| p.matches_name(sni)))
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
    /// Index into [`crate::SandboxPolicy::secrets`].
    pub secret: usize,
    /// Occurrences replaced by the value.
    pub substituted: u32,
    /// Occurrences left alone: the secret does not allow the SNI (a blocking secret's request
    /// is refused, see [`crate::SandboxPolicy::blocked_by`]).
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
    /// The value contains `:` and its placeholder is in the user-id of Basic credentials,
    /// with other bytes: the upstream would split the value and join its parts with them.
    #[error(
        "secret {name} ({id}) contains ':' and cannot be sent inside the user-id of Basic \
         credentials (as the whole credentials, or in the password, it can)"
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
    /// Inside decoded Basic credentials of `len` bytes (any byte is safe inside base64); the
    /// user-id ends at `user_end` (the first `:`).
    Basic {
        len: usize,
        user_end: usize,
    },
}

/// Substitution state for one request; see the module docs.
#[derive(Debug)]
pub struct RequestSubstitution<'p> {
    sub: &'p Substituter,
    sni: &'p ServerName,
    host_ok: bool,
    hits: Vec<SecretHit>,
}

impl Substituter {
    /// Starts substitution for a request on a connection intercepted for `sni` whose original
    /// destination port is `port`. `authorities` are the request's `:authority` and every Host
    /// header; all must name the SNI (see [`ServerName::matches_authority`]), and a request
    /// with none gets nothing substituted.
    pub(crate) fn begin_request<'p, 'a, I>(
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
            sub: self,
            sni,
            host_ok: any && all,
            hits: Vec::new(),
        }
    }

    /// Substitutes placeholders in a whole request view, on a connection intercepted for `sni`
    /// to port `port`.
    pub(crate) fn substitute(
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
        let place = Place::Basic {
            len: bytes.len(),
            user_end,
        };
        let Some(new) = self.replace(bytes, place)? else {
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
        let Some(ac) = &self.sub.ac else {
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
            if !self.sub.allows(i, self.sni) {
                self.hit(i).wrong_host += 1;
                continue;
            }
            let Some(secret) = self.sub.secrets().get(i) else {
                continue;
            };
            let encoding = self.check(i, secret, place, &input[..m.start()], m.end())?;
            self.hit(i).substituted += 1;
            let buf = out.get_or_insert_with(|| Vec::with_capacity(self.sub.capacity_for(input)));
            buf.extend_from_slice(&input[copied..m.start()]);
            encoding.write(secret.value.expose().as_bytes(), buf);
            copied = m.end();
        }
        Ok(out.map(|mut buf| {
            buf.extend_from_slice(&input[copied..]);
            debug_assert!(buf.len() <= self.sub.capacity_for(input));
            Redacted::new(buf)
        }))
    }

    /// How secret `i`'s value is written at a match preceded by `before` and ending at `end`,
    /// or why it cannot be.
    fn check(
        &self,
        i: usize,
        secret: &MountedSecret,
        place: Place<'_>,
        before: &[u8],
        end: usize,
    ) -> Result<Encoding, SubstituteError> {
        let sub = self.sub;
        match place {
            Place::Header(name) if !sub.header_safe[i] => Err(SubstituteError::UnsafeInHeader {
                id: secret.id.clone(),
                name: secret.name.clone(),
                header: String::from_utf8_lossy(name).into_owned(),
            }),
            Place::Header(_) => Ok(Encoding::Raw),
            Place::Basic { len, user_end }
                if before.len() < user_end
                    && sub.has_colon[i]
                    && !(before.is_empty() && end == len) =>
            {
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
mod tests;
