//! One request on an intercepted connection: substitute per the sandbox's policy, forward to the
//! pooled upstream, stream the response back.
//!
//! In order: a WebSocket over HTTP/1.1 `Upgrade` or h2 extended CONNECT (`:protocol websocket`)
//! goes on like any request (its head substituted, its extension offer removed) and, once the
//! upstream accepts (101, or 200 on h2), is relayed message by message by [`websocket`]
//! (scrubbed one way, substituted the other); an h2 upstream that refuses extended CONNECT gets
//! the client's stream reset with `HTTP_1_1_REQUIRED`, so it retries over HTTP/1.1. Any other
//! protocol switch (another `Upgrade`, plain `CONNECT`, extended CONNECT for another protocol)
//! is refused with 501 — after it the bytes are not HTTP, and a sandbox holding a placeholder must not get an
//! unscrubbed channel to a host its value goes to (a connection to a host no mounted value is
//! allowed for was passed through before interception, so those work). Then the head is
//! substituted with the sandbox's policy as it is now (a rotation or removal acknowledged to
//! control applies to open connections too); a placeholder of a blocking secret sent to a host
//! it does not allow answers 403 naming the secret and nothing is sent upstream. Then, when some
//! secret's body substitution applies and the content type is JSON, form or text, the body is
//! read up to the configured bound and substituted (Content-Length recomputed); a larger body is
//! forwarded unchanged and counted.
//!
//! Errors veil answers itself are plain text naming the host, the secret or the reason — never
//! a value, and never a header value (headers may carry values).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tracing::{debug, info};
use veil_policy::{BodyKind, SandboxPolicy, SecretHit, ServerName, SubstituteError, merge_hits};

use crate::proxy::body::{Bounded, BoxError, ProxyBody, read_bounded, whole};
use crate::proxy::conn::ConnContext;
use crate::proxy::idle::{InflightBody, InflightGuard};
use crate::proxy::scrub;
use crate::proxy::websocket;
use crate::stats::Stats;
use crate::tls::upstream::verify_failure;

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1). `Trailer` is not one: it
/// declares the trailer fields end to end, and hyper's HTTP/1.1 server sends a response's
/// trailers (to a client that sent `TE: trailers`) only when they are declared in it.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Handles one request. Errors become responses, except an extended CONNECT the upstream
/// refused: that `Err` resets the client's h2 stream with `HTTP_1_1_REQUIRED` (see
/// [`websocket::fall_back_to_h1`]).
pub async fn handle(
    ctx: Arc<ConnContext>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, h2::Error> {
    Stats::inc(&ctx.stats.requests);
    // Held until the response body ends (handed to the body below), for the idle timeout.
    let inflight = ctx.activity.begin();
    let started = std::time::Instant::now();
    if let Some(reason) = &ctx.upstream_error {
        return Ok(plain(
            StatusCode::BAD_GATEWAY,
            format!("veil: cannot reach {} securely: {reason}\n", ctx.sni),
        ));
    }
    let websocket = websocket::opening(&req);
    if websocket.is_none()
        && let Some(kind) = upgrade_kind(&req)
    {
        Stats::inc(&ctx.stats.upgrade_refused);
        debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, kind, "protocol upgrade refused");
        return Ok(plain(StatusCode::NOT_IMPLEMENTED, upgrade_refusal(kind)));
    }
    let mut req = req;
    let client_upgrade = websocket.map(|opening| (opening, hyper::upgrade::on(&mut req)));
    let (mut parts, body) = req.into_parts();
    let mut host_ok = false;
    // Read per request: a rotation, delete or detach acknowledged to control applies to open
    // keep-alive and h2 connections too. No policy (every secret gone) = nothing to substitute.
    let policy = ctx.secrets.policy(ctx.sandbox.as_str());
    let body = match &policy {
        Some(policy) => match apply_policy(&ctx, policy, &mut parts, body).await {
            Ok((body, hits, ok)) => {
                host_ok = ok;
                if !hits.is_empty() {
                    ctx.stats
                        .record_hits(ctx.sandbox.as_str(), ctx.sni.as_str(), policy, &hits);
                }
                body
            }
            Err(answer) => return Ok(answer),
        },
        None => body.map_err(BoxError::from).boxed_unsync(),
    };
    let target = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // Both sides speak the same protocol: an h1 request keeps its Host header (hyper sends
    // origin-form), an h2 request its :authority — never both, some servers refuse that.
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    strip_hop_by_hop(&mut parts.headers);
    if let Some(opening) = websocket {
        websocket::prepare_request(&mut parts.headers, opening);
    }
    if let Some(policy) = &policy {
        scrub::request(&ctx, policy, &mut parts.headers);
    }
    parts.uri = match upstream_uri(authority.as_deref(), &ctx.sni, ctx.dst.port(), target) {
        Some(uri) => uri,
        None => {
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                "veil: request target cannot be forwarded\n".into(),
            ));
        }
    };
    parts.version = Version::HTTP_11;
    let req = Request::from_parts(parts, body);
    match ctx.client.request(req).await {
        Ok(resp) => {
            ctx.stats.request_seconds.observe(started.elapsed());
            if let Some((opening, client_upgrade)) = client_upgrade
                && opening.accepted(resp.status())
            {
                return Ok(switch(
                    &ctx,
                    policy,
                    host_ok,
                    (opening, client_upgrade),
                    resp,
                    inflight,
                ));
            }
            let (mut parts, body) = resp.into_parts();
            if let Some(answer) = scrub::refuse_transfer_coding(&ctx, &mut parts) {
                return Ok(Response::from_parts(parts, answer));
            }
            strip_hop_by_hop(&mut parts.headers);
            let body = match &policy {
                Some(policy) => scrub::response(&ctx, policy, &mut parts, body).await,
                None => body.map_err(BoxError::from).boxed_unsync(),
            };
            let body = InflightBody::new(body, inflight).boxed_unsync();
            Ok(Response::from_parts(parts, body))
        }
        Err(e) => {
            if websocket == Some(websocket::Opening::ExtendedConnect)
                && websocket::refused_extended_connect(&e)
            {
                Stats::inc(&ctx.stats.upgrade_refused);
                debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, "upstream refused extended CONNECT; client asked to use HTTP/1.1");
                return Err(websocket::fall_back_to_h1());
            }
            if let Some(reason) = verify_failure(&e) {
                Stats::inc(&ctx.stats.upstream_verify_failed);
                return Ok(plain(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "veil: upstream {} failed TLS verification ({reason}); nothing was sent\n",
                        ctx.sni
                    ),
                ));
            }
            Stats::inc(&ctx.stats.upstream_failed);
            let reason = error_chain(&e);
            debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, dst = %ctx.dst, error = %reason, "upstream request failed");
            Ok(plain(
                StatusCode::BAD_GATEWAY,
                format!("veil: upstream {} failed: {reason}\n", ctx.sni),
            ))
        }
    }
}

/// The 101 to a WebSocket upgrade (200 to an extended CONNECT): its head scrubbed and the
/// relay started on both upgraded streams; a 502 when the upstream negotiated an extension veil
/// removed from the offer.
fn switch(
    ctx: &Arc<ConnContext>,
    policy: Option<Arc<SandboxPolicy>>,
    host_ok: bool,
    (opening, client): (websocket::Opening, hyper::upgrade::OnUpgrade),
    mut resp: Response<Incoming>,
    inflight: InflightGuard,
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Err(why) = websocket::prepare_response(&mut parts.headers, opening) {
        Stats::inc(&ctx.stats.websocket_closed);
        return plain(
            StatusCode::BAD_GATEWAY,
            format!("veil: {why} ({})\n", ctx.sni),
        );
    }
    if ctx.scrub
        && let Some(policy) = &policy
        && policy.scrubs()
    {
        let replaced = scrub::scrub_headers(policy.scrub_patterns(), &mut parts.headers);
        ctx.stats
            .scrubbed
            .fetch_add(replaced, std::sync::atomic::Ordering::Relaxed);
    }
    let relay = websocket::relay(ctx.clone(), policy, host_ok, client, upstream, inflight);
    ctx.upgraded.spawn(relay);
    let body = Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync();
    Response::from_parts(parts, body)
}

/// Substitutes the head and, where it applies, the body; an `Err` is veil's own answer (400
/// refused, 403 blocked) and nothing goes upstream. Also says whether the request's
/// authorities named the SNI.
async fn apply_policy(
    ctx: &ConnContext,
    policy: &SandboxPolicy,
    parts: &mut http::request::Parts,
    body: Incoming,
) -> Result<(ProxyBody, Vec<SecretHit>, bool), Response<ProxyBody>> {
    let head = match substitute(policy, &ctx.sni, ctx.dst.port(), parts) {
        Ok(head) => head,
        Err(e) => return Err(refuse(ctx, &e)),
    };
    let mut hits = head.hits;
    if let Some(answer) = block(ctx, policy, &hits) {
        return Err(answer);
    }
    let kind = BodyKind::of(
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .map(HeaderValue::as_bytes),
        parts
            .headers
            .get(header::CONTENT_ENCODING)
            .map(HeaderValue::as_bytes),
    );
    let kind = match kind {
        Some(kind)
            if head.host_ok && !body.is_end_stream() && policy.body_scan_needed(&ctx.sni) =>
        {
            kind
        }
        _ => {
            return Ok((
                body.map_err(BoxError::from).boxed_unsync(),
                hits,
                head.host_ok,
            ));
        }
    };
    let read = match read_bounded(body, ctx.limits.body_max_bytes).await {
        Ok(read) => read,
        Err(e) => {
            debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, error = %e, "reading the request body failed");
            return Err(plain(
                StatusCode::BAD_REQUEST,
                "veil: reading the request body failed\n".into(),
            ));
        }
    };
    let (data, trailers) = match read {
        Bounded::Over(replay) => {
            Stats::inc(&ctx.stats.body_too_large);
            debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, max = ctx.limits.body_max_bytes, "request body over the substitution bound; forwarded unchanged");
            return Ok((replay.boxed_unsync(), hits, head.host_ok));
        }
        Bounded::Whole(data, trailers) => (data, trailers),
    };
    let sub = match policy.substitute_body(&ctx.sni, head.host_ok, kind, &data) {
        Ok(sub) => sub,
        Err(e) => return Err(refuse(ctx, &RequestError::from(e))),
    };
    merge_hits(&mut hits, &sub.hits);
    if let Some(answer) = block(ctx, policy, &hits) {
        return Err(answer);
    }
    let body = match sub.body {
        Some(new) => {
            Stats::inc(&ctx.stats.body_substituted);
            set_content_length(&mut parts.headers, new.as_bytes().len());
            // The buffer is zeroized when the last reference to it is gone.
            whole(Bytes::from_owner(new), trailers).boxed_unsync()
        }
        None => whole(Bytes::from(data), trailers).boxed_unsync(),
    };
    Ok((body, hits, head.host_ok))
}

/// The 400 answer (counted) when a value cannot be substituted safely; names the secret, never
/// the value.
fn refuse(ctx: &ConnContext, e: &RequestError) -> Response<ProxyBody> {
    Stats::inc(&ctx.stats.refused);
    debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, error = %e, "request refused");
    plain(StatusCode::BAD_REQUEST, format!("veil: {e}\n"))
}

/// The 403 answer (counted, reported to control) when `hits` carry a blocking secret's
/// placeholder to a host it does not allow.
fn block(
    ctx: &ConnContext,
    policy: &SandboxPolicy,
    hits: &[SecretHit],
) -> Option<Response<ProxyBody>> {
    let secret = policy.blocked_by(hits)?;
    ctx.stats
        .record_blocked(ctx.sandbox.as_str(), ctx.sni.as_str(), &secret.id);
    info!(sandbox = %ctx.sandbox, sni = %ctx.sni, secret = %secret.id, name = %secret.name, "request blocked: placeholder sent to a host its secret does not allow");
    Some(plain(
        StatusCode::FORBIDDEN,
        blocked_message(&secret.name, &secret.id, &ctx.sni),
    ))
}

/// The 403 text of a blocked request: the secret's name and id, never its value.
fn blocked_message(name: &str, id: &str, sni: &ServerName) -> String {
    format!("veil: secret {name} ({id}) is not allowed for host {sni}\n")
}

/// Sets Content-Length to `len` (after a body changed size).
fn set_content_length(headers: &mut HeaderMap, len: usize) {
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// What kind of protocol switch a request asks for, if any: HTTP/1.1 `Upgrade` (WebSocket, …),
/// `CONNECT`, or h2's extended CONNECT (`:protocol`).
fn upgrade_kind<B>(req: &Request<B>) -> Option<&'static str> {
    if req.extensions().get::<hyper::ext::Protocol>().is_some() {
        return Some("extended CONNECT");
    }
    if req.method() == Method::CONNECT {
        return Some("CONNECT");
    }
    let upgrade = req.headers().get(header::UPGRADE)?;
    if String::from_utf8_lossy(upgrade.as_bytes())
        .to_ascii_lowercase()
        .contains("websocket")
    {
        Some("WebSocket")
    } else {
        Some("Upgrade")
    }
}

/// The 501 text of a refused upgrade.
fn upgrade_refusal(kind: &str) -> String {
    format!(
        "veil: {kind} is not supported on connections veil intercepts: after a protocol switch the \
         bytes are not HTTP and veil cannot keep secret values out of them\n"
    )
}

/// What head substitution found.
#[derive(Debug)]
pub struct HeadSubstitution {
    /// Per-secret counts.
    pub hits: Vec<SecretHit>,
    /// Whether every authority of the request named the SNI (otherwise nothing was replaced).
    pub host_ok: bool,
}

/// Runs the policy's substitution over the request head on a connection intercepted for `sni`
/// to port `port` (the original destination's); returns the per-secret counts.
pub fn substitute(
    policy: &SandboxPolicy,
    sni: &ServerName,
    port: u16,
    parts: &mut http::request::Parts,
) -> Result<HeadSubstitution, RequestError> {
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let hosts = parts
        .headers
        .get_all(header::HOST)
        .iter()
        .map(HeaderValue::as_bytes);
    let mut sub = policy.begin_request(sni, port, authority.into_iter().chain(hosts));
    if let Some(pq) = parts.uri.path_and_query()
        && let Some(new) = sub.target(pq.as_str())?
    {
        let pq = PathAndQuery::try_from(new.as_str()).map_err(|_| RequestError::Target)?;
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = Some(pq);
        parts.uri = Uri::from_parts(uri).map_err(|_| RequestError::Target)?;
    }
    for (name, value) in parts.headers.iter_mut() {
        if let Some(new) = sub.header(name.as_str().as_bytes(), value.as_bytes())? {
            let mut v = HeaderValue::from_bytes(new.as_bytes())
                .map_err(|_| RequestError::Header(name.as_str().to_owned()))?;
            // Never indexed by HPACK, and redacted in Debug output.
            v.set_sensitive(true);
            *value = v;
        }
    }
    let host_ok = sub.host_matches();
    Ok(HeadSubstitution {
        hits: sub.finish(),
        host_ok,
    })
}

/// Why a request is refused before it is forwarded; names no value.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The policy refused a substitution.
    #[error(transparent)]
    Substitute(#[from] SubstituteError),
    /// The substituted target is not a valid request target.
    #[error("the substituted request target is invalid")]
    Target,
    /// A substituted header value is not valid.
    #[error("the substituted value of header {0} is invalid")]
    Header(String),
}

/// The absolute URI hyper's client needs: the request's own authority (the SNI when it has
/// none or an unusable one); the connection it goes on is chosen by (destination, SNI) anyway.
fn upstream_uri(
    authority: Option<&str>,
    sni: &ServerName,
    port: u16,
    target: PathAndQuery,
) -> Option<Uri> {
    let build = |authority: String| {
        Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query(target.clone())
            .build()
            .ok()
    };
    authority.and_then(|a| build(a.to_owned())).or_else(|| {
        build(if port == 443 {
            sni.as_str().to_owned()
        } else {
            format!("{}:{port}", sni.as_str())
        })
    })
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if name == header::TE
            && headers
                .get(header::TE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            continue;
        }
        headers.remove(name);
    }
}

/// A plain-text answer from veil itself.
pub fn plain(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        text.push_str(": ");
        text.push_str(&s.to_string());
        cur = s.source();
    }
    text
}

#[cfg(test)]
mod tests;
