//! Request-body substitution: placeholders in JSON, form and text bodies become values, encoded
//! for where they land, for secrets whose body substitution is on.
//!
//! Off by default: a secret turns it on by its own field, or the agent's config for every secret
//! ([`crate::ModeOverrides`]). The caller reads the body only when
//! [`crate::SandboxPolicy::body_scan_needed`] says some secret could be replaced (or blocked) in
//! it and [`BodyKind::of`] accepts its content type, and only up to its bound; a body over the
//! bound is forwarded unchanged.
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

use crate::encode::{Encoding, JsonContext, JsonSpot, open_percent_escape};
use crate::host::ServerName;
use crate::secret::{MountedSecret, Redacted};
use crate::substitute::{SecretHit, SubstituteError, Substituter};
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

impl Substituter {
    /// Whether a request body to `sni` is worth reading: some secret with body substitution is
    /// allowed there, or blocks hosts it does not allow (its placeholder in the body must then
    /// refuse the request).
    pub(crate) fn body_scan_needed(&self, sni: &ServerName) -> bool {
        let overrides = self.overrides();
        self.secrets().iter().enumerate().any(|(i, s)| {
            s.body_substitution_with(overrides)
                && (self.allows(i, sni) || s.wrong_host_with(overrides) == WrongHost::Block)
        })
    }

    /// Substitutes placeholders in a whole request body of `kind` sent to `sni`; `host_ok` is
    /// whether the request's authorities name the SNI (see
    /// [`crate::SandboxPolicy::begin_request`]).
    /// Refused (naming the secret) when a placeholder to replace follows an incomplete escape
    /// (`%`, `%X` in a form; a lone `\` or `\u`, `\u0`… in a JSON string) or is outside every
    /// string of a JSON body: the upstream would not decode exactly the value there.
    pub(crate) fn substitute_body(
        &self,
        sni: &ServerName,
        host_ok: bool,
        kind: BodyKind,
        body: &[u8],
    ) -> Result<BodySubstitution, SubstituteError> {
        let overrides = self.overrides();
        let Some(ac) = &self.ac else {
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
            } else if !self.allows(i, sni) {
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
mod tests;
