//! Intercept: learn what the upstream speaks, terminate the client's TLS with a leaf for its
//! SNI, and serve HTTP/1.1 or h2 to it, each request going through [`forward::handle`].
//!
//! The client is offered h2 only when the upstream speaks h2, and the upstream only when the
//! client offers it. The first h2-offering connection of a sandbox to a (destination, SNI)
//! connects upstream before answering the client's hello (that connection then serves the
//! first request); later ones use what that taught. When the
//! upstream cannot be reached or fails verification, the client's handshake still completes
//! and every request gets a 502 naming the host and the reason: nothing is sent upstream.
//!
//! Limits (agent config): the client's handshake must finish within `handshake_timeout_ms`;
//! request heads are bounded by `max_header_bytes` (HTTP/1.1 read buffer, h2 header list); an
//! h2 connection carries at most `max_streams_per_connection` concurrent streams; a connection
//! with no request in flight (arrival to end of response body) for `idle_timeout_ms` is closed
//! (gracefully: h2 GOAWAY, h1 close between requests). h2 clients are told extended CONNECT
//! is enabled (SETTINGS_ENABLE_CONNECT_PROTOCOL), for WebSocket over h2.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;
use veil_policy::ServerName;

use crate::proxy::conn::ConnContext;
use crate::proxy::context::{Proxy, SandboxTag};
use crate::proxy::forward;
use crate::proxy::idle::Activity;
use crate::proxy::peek::PrefixedStream;
use crate::proxy::upstream::Probe;
use crate::stats::Stats;
use crate::tls::upstream::{ALPN_H2, verify_failure};

/// Runs one intercepted connection to its end.
pub async fn run(
    proxy: &Proxy,
    sandbox: &SandboxTag,
    client: PrefixedStream<TcpStream>,
    dst: SocketAddr,
    sni: ServerName,
    offers_h2: bool,
) {
    let upstream = &sandbox.upstream;
    // A client that does not offer h2 needs no probe: it speaks h1 on both sides, and a
    // verification failure surfaces on its first request, before anything is sent.
    let known = if offers_h2 {
        upstream.known_h2(dst, sni.as_str())
    } else {
        Some(false)
    };
    let (upstream_h2, upstream_error) = match known {
        Some(h2) => (h2, None),
        None => match upstream.probe(dst, sni.as_str()).await {
            Probe::Ready { h2 } => (h2, None),
            Probe::Failed(e) => {
                let reason = match verify_failure(&e) {
                    Some(reason) => {
                        Stats::inc(&proxy.stats.upstream_verify_failed);
                        reason
                    }
                    None => {
                        Stats::inc(&proxy.stats.upstream_failed);
                        e.to_string()
                    }
                };
                debug!(sandbox = %sandbox.id, %sni, %dst, %reason, "upstream unusable; answering 502");
                (false, Some(reason))
            }
        },
    };
    // With an unusable upstream any protocol will do to deliver the 502.
    let config = if offers_h2 && (upstream_h2 || upstream_error.is_some()) {
        sandbox.tls.h2.clone()
    } else {
        sandbox.tls.h1.clone()
    };
    let handshake_started = std::time::Instant::now();
    let limits = proxy.limits;
    let accepted = tokio::time::timeout(
        limits.handshake_timeout,
        TlsAcceptor::from(config).accept(client),
    )
    .await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            Stats::inc(&proxy.stats.client_handshake_failed);
            debug!(sandbox = %sandbox.id, %sni, error = %e, "client TLS handshake failed");
            return;
        }
        Err(_) => {
            Stats::inc(&proxy.stats.client_handshake_failed);
            debug!(sandbox = %sandbox.id, %sni, "client TLS handshake timed out");
            return;
        }
    };
    Stats::inc(&proxy.stats.intercepted);
    proxy
        .stats
        .client_handshake_seconds
        .observe(handshake_started.elapsed());
    let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    let client = upstream.client(dst, h2, sni.as_str());
    let activity = Activity::new();
    let upgraded = tokio_util::task::TaskTracker::new();
    let ctx = Arc::new(ConnContext {
        sandbox: sandbox.id.clone(),
        secrets: proxy.secrets.clone(),
        limits,
        activity: activity.clone(),
        sni,
        dst,
        client,
        upstream_error,
        scrub: proxy.scrub_responses,
        stats: proxy.stats.clone(),
        upgraded: upgraded.clone(),
    });
    let svc = service_fn(move |req| forward::handle(ctx.clone(), req));
    let io = TokioIo::new(tls);
    let idle = activity.idle(limits.idle_timeout);
    // After the idle timeout, a graceful close gets this long before the connection is dropped.
    let grace = limits.handshake_timeout;
    let served = if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .max_concurrent_streams(limits.max_streams_per_connection)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            // WebSocket over h2 (RFC 8441); relayed like an h1 upgrade (`forward`).
            .enable_connect_protocol()
            .serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = idle => {
                debug!(sandbox = %sandbox.id, "idle intercepted connection closed");
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(grace, conn).await.unwrap_or(Ok(()))
            }
        }
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .max_buf_size(limits.max_header_bytes.max(crate::config::MIN_HEADER_BYTES))
            // With a timer set, hyper would otherwise cut a keep-alive connection waiting for
            // its next request after 30 s: the idle timeout decides that.
            .header_read_timeout(limits.idle_timeout)
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = idle => {
                debug!(sandbox = %sandbox.id, "idle intercepted connection closed");
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(grace, conn).await.unwrap_or(Ok(()))
            }
        }
    };
    match served {
        Ok(()) => Stats::inc(&proxy.stats.completed),
        Err(e) => debug!(sandbox = %sandbox.id, error = %e, "intercepted connection ended"),
    }
    // A WebSocket took the connection over: it holds the sandbox's connection permit (and the
    // drain waits for it) until it ends.
    upgraded.close();
    upgraded.wait().await;
}
