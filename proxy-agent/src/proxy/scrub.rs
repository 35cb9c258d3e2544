//! Response scrubbing on intercepted connections (issues 6 and 13): every scrubbed value in a
//! response reaches the sandbox as its placeholder.
//!
//! What is scrubbed, with the patterns of the request's policy snapshot (every form listed in
//! `veil_policy::scrub`) — and, when the sandbox's policy changed since (a rotation, a mount),
//! with the union of the snapshot's values and the current policy's
//! ([`SandboxPolicy::scrub_union`]),
//! for the head and, from the first poll after the change, for the rest of the body:
//! - **head**: every response header's value and name, and an h1 reason phrase. A header whose
//!   scrubbed name or value is no longer valid is dropped rather than passed on; a reason phrase
//!   carrying a value is replaced by the canonical one.
//! - **body**: [`ScrubBody`] scrubs DATA streaming, holding back only what may still begin a
//!   match (a value split across chunks is still found, bounded by the patterns' `max_len`),
//!   scrubs trailers (h2, or chunked h1) like headers, and flushes what it holds at the end.
//!   While it streams, one atomic load per poll tells it whether the agent's secrets changed;
//!   then it takes up the union patterns and rescans what it holds. When the scrubbed length
//!   may differ, `Content-Length` is removed and hyper re-frames the body (h1 chunked, h2 DATA
//!   frames). Bodies that are empty by protocol (HEAD, 204, 304, length 0) pass unchanged.
//! - **compressed bodies**: `gzip`/`x-gzip`, `deflate` (zlib) and `br` are decoded streaming
//!   (bounded: one upstream chunk, the decoder's window, and [`body::DECODE_BUF`] decoded bytes
//!   at a time), scrubbed, and forwarded as identity: `Content-Encoding` and `Content-Length` are
//!   removed and a strong `ETag` becomes weak (the representation changed). Not re-compressed:
//!   the hop to the sandbox is on the same host, where size does not matter, while compressing
//!   costs CPU on the data path and a compressor holds data back until it flushes, which would
//!   delay streamed responses (server-sent events, long polls). A decoded body that still starts
//!   with a gzip, zlib or zstd magic (compressed twice under one coding) is answered 502 when its
//!   first bytes arrive within [`START_CHECK_WAIT`], and cut off with an error otherwise; so is
//!   a body that fails to decode (the client never sees undecoded bytes).
//! - **other codings** (`zstd`, `compress`, stacked codings): the response is withheld and the
//!   sandbox gets a 502 naming the coding. [`request`] makes that rare: it rewrites
//!   `Accept-Encoding` to the codings veil can decode, and drops `Range`/`If-Range` so a value
//!   cannot be fetched piecewise, a few bytes per partial response, past the scrubber.
//! - **gRPC** (`application/grpc…`): scrubbed message by message by [`grpc::GrpcScrubBody`],
//!   each sent on with its new length prefix (a placeholder's length differs from the value's);
//!   [`request`] asks for uncompressed messages (`grpc-accept-encoding: identity`) and a
//!   compressed one ends the stream with a `veil:` gRPC error instead of passing.
//! - **transfer codings**: a response whose `Transfer-Encoding` is not exactly `chunked`
//!   (`gzip, chunked`) is answered 502 ([`refuse_transfer_coding`]): the HTTP client removes
//!   only the chunked framing and would pass the coded bytes on.
//!
//! Scrubbing is skipped, at no cost, when the sandbox has no value to scrub or when it is
//! switched off in config (`scrub_responses = false`, for measurements only). A WebSocket's
//! 101 head is scrubbed here ([`scrub_headers`]) and its messages by `websocket`.

mod body;
mod grpc;
mod headers;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::response::Parts;
use http::{StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tracing::debug;
use veil_policy::scrub::{ContentCoding, UnsupportedCoding, accept_encoding, transfer_coding_ok};
use veil_policy::{SandboxPolicy, ScrubPatterns};
use zeroize::Zeroizing;

use crate::proxy::body::{Bounded, BoxError, ProxyBody, read_bounded, whole};
use crate::proxy::conn::ConnContext;
use crate::stats::Stats;

pub use body::{ScrubBody, StillCompressed, Watch};
pub use headers::scrub_headers;

/// How long a compressed body's first decoded bytes are waited for before the head is sent;
/// after that, a body found still compressed is cut off instead of answered 502.
const START_CHECK_WAIT: Duration = Duration::from_secs(2);

/// Scrubs an upstream response's head in place and wraps its body so it is scrubbed as it
/// streams, with `policy` (the snapshot its request was substituted with) — and with the
/// current policy's values too when the sandbox's policy changed since (a rotation or mount
/// during the request), for the head and for the body as it streams.
pub async fn response(
    ctx: &ConnContext,
    policy: &Arc<SandboxPolicy>,
    parts: &mut Parts,
    body: Incoming,
) -> ProxyBody {
    if !ctx.scrub || !policy.scrubs() {
        return passthrough(body);
    }
    // Generation first: a change after it is seen by the body's next poll.
    let generation = ctx.secrets.generation();
    let union = match ctx.secrets.policy(ctx.sandbox.as_str()) {
        Some(now) if !Arc::ptr_eq(&now, policy) => Some(Box::new(policy.scrub_union(&now))),
        _ => None,
    };
    let patterns = union.as_deref().unwrap_or(policy.scrub_patterns());
    let (plan, replaced) = plan_response(patterns, parts, body.is_end_stream());
    ctx.stats.scrubbed.fetch_add(replaced, Ordering::Relaxed);
    let (coding, keep_length) = match plan {
        BodyPlan::Pass => return passthrough(body),
        BodyPlan::Scrub {
            coding,
            keep_length,
        } => (coding, keep_length),
        BodyPlan::Withhold(reason) => {
            Stats::inc(&ctx.stats.scrub_withheld);
            return withhold(ctx, parts, reason);
        }
    };
    if coding == ContentCoding::Identity && is_grpc(&parts.headers) {
        // Message by message: a scrubbed message changes length, its prefix must follow.
        parts.headers.remove(header::CONTENT_LENGTH);
        let watch = Watch {
            store: ctx.secrets.clone(),
            sandbox: ctx.sandbox.as_str().to_owned(),
            generation,
        };
        return grpc::GrpcScrubBody::new(body, policy.clone(), union, watch, ctx.stats.clone())
            .boxed_unsync();
    }
    if coding == ContentCoding::Identity
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= WHOLE_BODY_MAX as u64)
    {
        return scrub_whole(ctx, patterns, parts, body).await;
    }
    let watch = Watch {
        store: ctx.secrets.clone(),
        sandbox: ctx.sandbox.as_str().to_owned(),
        generation,
    };
    let mut body = ScrubBody::new(body, coding, policy.clone(), ctx.stats.clone(), keep_length)
        .watching(watch, union);
    if coding != ContentCoding::Identity {
        // A body compressed twice is answered 502 when its start arrives in time, and cut off
        // (by the body itself) when it arrives later.
        if let Ok(Err(e)) = tokio::time::timeout(START_CHECK_WAIT, body.check_start()).await {
            return withhold(ctx, parts, e.to_string());
        }
    }
    body.boxed_unsync()
}

/// Largest identity body (by its `Content-Length`) read whole before the head is sent.
const WHOLE_BODY_MAX: usize = 64 * 1024;

/// A small identity body is read whole, scrubbed at once and sent with its exact new
/// `Content-Length`: one frame (one write) instead of a stream re-framed as chunks, which
/// costs a system call per piece and holds nothing back anyway once the body has ended.
async fn scrub_whole(
    ctx: &ConnContext,
    patterns: &ScrubPatterns,
    parts: &mut Parts,
    body: Incoming,
) -> ProxyBody {
    match read_bounded(body, WHOLE_BODY_MAX).await {
        Ok(Bounded::Whole(data, trailers)) => {
            let data = Zeroizing::new(data);
            let (out, mut replaced) = match patterns.scrub_counted(&data) {
                Some((out, n)) => (out, n),
                None => (data.to_vec(), 0),
            };
            let trailers = trailers.map(|mut t| {
                replaced += scrub_headers(patterns, &mut t);
                t
            });
            ctx.stats.scrubbed.fetch_add(replaced, Ordering::Relaxed);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
            whole(Bytes::from(out), trailers).boxed_unsync()
        }
        // The upstream sent more than its Content-Length said: hyper's framing refuses it.
        Ok(Bounded::Over(_)) => failed("the upstream body is longer than its content-length"),
        Err(e) => {
            debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, error = %e, "reading the response body failed");
            failed("reading the upstream response body failed")
        }
    }
}

/// A body that fails at once: the client sees the response cut off, never unscrubbed bytes.
fn failed(why: &'static str) -> ProxyBody {
    Failed(Some(why)).boxed_unsync()
}

/// See [`failed`].
#[derive(Debug)]
struct Failed(Option<&'static str>);

impl http_body::Body for Failed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::task::Poll::Ready(self.0.take().map(|why| Err(why.into())))
    }
}

/// The 502 answer to an upstream response whose `Transfer-Encoding` is not exactly
/// `chunked`, if it is not: the HTTP client removes only the chunked framing, so any other
/// transfer coding would reach the sandbox coded, past the scrubber.
pub fn refuse_transfer_coding(ctx: &ConnContext, parts: &mut Parts) -> Option<ProxyBody> {
    let ok = transfer_coding_ok(
        parts
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    if ok {
        return None;
    }
    Stats::inc(&ctx.stats.scrub_withheld);
    let reason = "its transfer-encoding is not chunked, which veil cannot scrub".to_owned();
    Some(withhold(ctx, parts, reason))
}

/// What becomes of a response body, decided from the head.
#[derive(Debug, PartialEq, Eq)]
enum BodyPlan {
    /// Empty by protocol (HEAD, 204, 304, length 0): passed as it is.
    Pass,
    /// Decoded from `coding` and scrubbed; `keep_length` when `Content-Length` still holds.
    Scrub {
        coding: ContentCoding,
        keep_length: bool,
    },
    /// Not forwarded, for this reason (names no value).
    Withhold(String),
}

/// Scrubs a response head with the sandbox's `patterns` and adjusts its framing headers for
/// the plan it returns, with the number of occurrences replaced. `empty`: the body is empty by
/// protocol.
fn plan_response(patterns: &ScrubPatterns, parts: &mut Parts, empty: bool) -> (BodyPlan, u64) {
    if !patterns.is_active() {
        // Secrets are mounted but their patterns could not be built: nothing can be scrubbed.
        let reason = "veil cannot scrub responses for this sandbox".to_owned();
        return (BodyPlan::Withhold(reason), 0);
    }
    let mut replaced = scrub_headers(patterns, &mut parts.headers);
    if let Some(reason) = parts.extensions.get::<hyper::ext::ReasonPhrase>()
        && patterns.scrub_counted(reason.as_bytes()).is_some()
    {
        parts.extensions.remove::<hyper::ext::ReasonPhrase>();
        replaced += 1;
    }
    // Whole representations are asked for (see `request`).
    parts.headers.remove(header::ACCEPT_RANGES);
    if empty {
        return (BodyPlan::Pass, replaced);
    }
    let coding = match patterns.content_coding(
        parts
            .headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .map(HeaderValue::as_bytes),
    ) {
        Ok(coding) => coding,
        Err(e) => return (BodyPlan::Withhold(unsupported_message(&e)), replaced),
    };
    let keep_length = coding == ContentCoding::Identity && patterns.preserves_length();
    if !keep_length {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    if coding != ContentCoding::Identity {
        parts.headers.remove(header::CONTENT_ENCODING);
        weaken_etag(&mut parts.headers);
    }
    let plan = BodyPlan::Scrub {
        coding,
        keep_length,
    };
    (plan, replaced)
}

/// Prepares a request's headers so that its response can be scrubbed: only encodings veil can
/// decode are offered, and whole representations are asked for.
pub fn request(ctx: &ConnContext, policy: &SandboxPolicy, headers: &mut HeaderMap) {
    if ctx.scrub && policy.scrubs() {
        restrict_request(headers);
    }
}

/// See [`request`]. Without `Range`, a value cannot be fetched a few bytes per partial
/// response, each too short for the scrubber to recognise.
fn restrict_request(headers: &mut HeaderMap) {
    let offer = accept_encoding(
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let offer = HeaderValue::from_str(&offer).unwrap_or(HeaderValue::from_static("identity"));
    headers.insert(header::ACCEPT_ENCODING, offer);
    headers.remove(header::RANGE);
    headers.remove(header::IF_RANGE);
    // gRPC messages are scrubbed whole; a compressed one could not be.
    if is_grpc(headers) {
        headers.insert(grpc::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
}

/// Whether a message's `Content-Type` is gRPC's (length-prefixed messages).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| veil_policy::grpc::is_grpc(v.as_bytes()))
}

fn passthrough(body: Incoming) -> ProxyBody {
    body.map_err(BoxError::from).boxed_unsync()
}

fn unsupported_message(e: &UnsupportedCoding) -> String {
    format!("the upstream answered with {e}; veil offers only gzip, deflate and br")
}

/// Replaces the response by a 502 saying why it was withheld; the upstream body is dropped.
fn withhold(ctx: &ConnContext, parts: &mut Parts, reason: String) -> ProxyBody {
    debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, reason = %reason, "response withheld");
    parts.status = StatusCode::BAD_GATEWAY;
    parts.headers.clear();
    parts.extensions.remove::<hyper::ext::ReasonPhrase>();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if parts.version < Version::HTTP_2 {
        parts.version = Version::HTTP_11;
    }
    let text = format!(
        "veil: response from {} withheld: {reason}\n",
        ctx.sni.as_str()
    );
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A strong validator no longer matches a decoded representation; a weak one still may.
fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(etag) = headers.get(header::ETAG)
        && etag.as_bytes().starts_with(b"\"")
    {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(etag.as_bytes());
        match HeaderValue::from_bytes(&weak) {
            Ok(v) => {
                headers.insert(header::ETAG, v);
            }
            Err(_) => {
                headers.remove(header::ETAG);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;
    use veil_link::SecretValue;
    use veil_policy::MountedSecret;

    pub(super) const VALUE: &str = "sk-real/0123456789";
    pub(super) const PLACEHOLDER: &str = "veil_ph_abcdef";

    pub(super) fn patterns() -> ScrubPatterns {
        ScrubPatterns::new(&[MountedSecret {
            previous: Vec::new(),
            retired: false,
            id: "sec_1".into(),
            name: "KEY".into(),
            placeholder: PLACEHOLDER.into(),
            hosts: vec![],
            value: SecretValue::new(VALUE.into()),
            body_substitution: false,
            wrong_host: Default::default(),
        }])
    }

    #[test]
    fn headers_names_and_values_are_scrubbed_or_dropped() {
        let p = patterns();
        let mut h = HeaderMap::new();
        h.append("x-echo", HeaderValue::from_str(VALUE).unwrap());
        h.append("x-echo", HeaderValue::from_static("second"));
        h.append(
            "x-b64",
            HeaderValue::from_static("Bearer c2stcmVhbC8wMTIzNDU2Nzg5"),
        );
        h.append(
            HeaderName::from_bytes(b"x-sk-real/0123456789").unwrap_or(header::WARNING),
            HeaderValue::from_static("name"),
        );
        h.append("x-clean", HeaderValue::from_static("ok"));
        let n = scrub_headers(&p, &mut h);
        assert!(n >= 2);
        let all: Vec<(String, Vec<u8>)> = h
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        for (n, v) in &all {
            assert!(!n.contains("sk-real") && !v.windows(7).any(|w| w == b"sk-real"));
        }
        let echo: Vec<&[u8]> = h.get_all("x-echo").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(echo, [PLACEHOLDER.as_bytes(), b"second"]);
        assert_eq!(h["x-clean"], "ok");
        assert!(!h["x-b64"].as_bytes().windows(8).any(|w| w == b"c2stcmVh"));
    }

    #[test]
    fn clean_headers_are_untouched() {
        let p = patterns();
        let mut h = HeaderMap::new();
        h.append("a", HeaderValue::from_static("1"));
        h.append("a", HeaderValue::from_static("2"));
        let before = h.clone();
        assert_eq!(scrub_headers(&p, &mut h), 0);
        assert_eq!(h, before);
    }

    fn head(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Response::builder();
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn response_plans() {
        let p = patterns();
        let mut parts = head(&[
            ("content-length", "120"),
            ("content-encoding", "gzip"),
            ("etag", "\"v1\""),
            ("accept-ranges", "bytes"),
            ("x-echo", VALUE),
        ]);
        let (plan, n) = plan_response(&p, &mut parts, false);
        assert_eq!(
            plan,
            BodyPlan::Scrub {
                coding: ContentCoding::Gzip,
                keep_length: false
            }
        );
        assert_eq!(n, 1);
        let mut names: Vec<&str> = parts.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["etag", "x-echo"]);
        assert_eq!(parts.headers["etag"], "W/\"v1\"");

        // Identity keeps nothing it cannot vouch for: the placeholder is shorter.
        let mut parts = head(&[("content-length", "5")]);
        let (plan, _) = plan_response(&p, &mut parts, false);
        assert!(matches!(
            plan,
            BodyPlan::Scrub {
                keep_length: false,
                coding: ContentCoding::Identity
            }
        ));
        assert!(parts.headers.get("content-length").is_none());

        // Empty by protocol (HEAD, 304): framing untouched, headers still scrubbed.
        let mut parts = head(&[
            ("content-length", "120"),
            ("content-encoding", "zstd"),
            ("x-echo", VALUE),
        ]);
        let (plan, n) = plan_response(&p, &mut parts, true);
        assert_eq!((plan, n), (BodyPlan::Pass, 1));
        assert_eq!(parts.headers["content-length"], "120");

        // An undecodable coding is withheld, named, without the value.
        for coding in ["zstd", "gzip, br", VALUE] {
            let mut parts = head(&[("content-encoding", coding)]);
            let (plan, _) = plan_response(&p, &mut parts, false);
            let BodyPlan::Withhold(reason) = plan else {
                panic!("{coding}: not withheld")
            };
            assert!(reason.contains("content-encoding") && !reason.contains("sk-real"));
        }
    }

    #[test]
    fn reason_phrase_with_a_value_is_dropped() {
        let p = patterns();
        let mut parts = head(&[]);
        let reason =
            hyper::ext::ReasonPhrase::try_from(format!("OK {VALUE}").into_bytes()).unwrap();
        parts.extensions.insert(reason);
        let (_, n) = plan_response(&p, &mut parts, false);
        assert_eq!(n, 1);
        assert!(parts.extensions.get::<hyper::ext::ReasonPhrase>().is_none());

        let mut parts = head(&[]);
        parts
            .extensions
            .insert(hyper::ext::ReasonPhrase::from_static(b"Fine"));
        plan_response(&p, &mut parts, false);
        assert!(parts.extensions.get::<hyper::ext::ReasonPhrase>().is_some());
    }

    #[test]
    fn requests_offer_only_decodable_codings_and_whole_ranges() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("zstd, gzip;q=0.5, *"),
        );
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-3"));
        h.insert(header::IF_RANGE, HeaderValue::from_static("\"v1\""));
        h.insert("x-keep", HeaderValue::from_static("1"));
        restrict_request(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "gzip;q=0.5");
        assert!(h.get(header::RANGE).is_none() && h.get(header::IF_RANGE).is_none());
        assert_eq!(h["x-keep"], "1");

        let mut h = HeaderMap::new();
        restrict_request(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "identity");
    }

    #[test]
    fn etag_weakened() {
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
    }
}
