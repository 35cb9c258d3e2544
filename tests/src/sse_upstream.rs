//! A server-sent-events upstream (h2 and http/1.1 by ALPN) for the streaming scenarios (issue
//! 20): `GET /events?n=N` streams N events, each carrying the value it knows (and its base64), and
//! sends event i+1 only after `GET /ack?n=i` arrived — so a proxy that holds an event back makes
//! the stream stall instead of merely slowing it. A missing ack ends the stream after
//! [`ACK_WAIT`] with a `data: stalled` event.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use tokio::sync::watch;
use tokio_util::sync::DropGuard;

use crate::https::{TestCa, serve_tls, tls_acceptor};
use crate::intercept_world::Upstream;
use crate::netns::NetNs;

/// How long the upstream waits for the ack of the event it sent.
pub const ACK_WAIT: Duration = Duration::from_secs(20);

/// The upstream; stops on drop.
pub struct SseUpstream {
    addr: SocketAddr,
    _stop: DropGuard,
}

impl std::fmt::Debug for SseUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Upstream for SseUpstream {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl SseUpstream {
    /// Serves TLS for `names` (certificate from `ca`) on `ip`:0 in `ns`, knowing `value`.
    pub fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa, names: &[&str], value: String) -> Self {
        let acceptor = tls_acceptor(ca, names, &[b"h2", b"http/1.1"]);
        // The last acknowledged event, +1 (0 = none yet).
        let (acked, _) = watch::channel(0u64);
        let acked = Arc::new(acked);
        let value: Arc<str> = value.into();
        let handler = move |req: Request<Incoming>| {
            let (acked, value) = (acked.clone(), value.clone());
            async move { Ok::<_, hyper::Error>(answer(&req, &acked, &value)) }
        };
        let (addr, stop) = serve_tls(ns, ip, "SSE upstream", acceptor, handler);
        SseUpstream { addr, _stop: stop }
    }
}

fn answer(req: &Request<Incoming>, acked: &Arc<watch::Sender<u64>>, value: &str) -> Response<Body> {
    let n = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("n="))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    if req.uri().path() == "/ack" {
        acked.send_modify(|a| *a = (*a).max(n + 1));
        return Response::new(Full::new(Bytes::from_static(b"ok")).boxed_unsync());
    }
    acked.send_replace(0);
    let rx = acked.subscribe();
    let value = value.to_owned();
    let events = futures_util::stream::unfold(0u64, move |i| {
        let (mut rx, value) = (rx.clone(), value.clone());
        async move {
            if i >= n {
                return None;
            }
            if i > 0 {
                let acked = tokio::time::timeout(ACK_WAIT, rx.wait_for(|a| *a >= i)).await;
                if !matches!(acked, Ok(Ok(_))) {
                    let stalled = Bytes::from_static(b"data: stalled\n\n");
                    return Some((Ok(Frame::data(stalled)), n));
                }
            }
            let event = format!(
                "id: {i}\ndata: {{\"n\": {i}, \"key\": \"{value}\", \"b64\": \"{}\"}}\n\n",
                STANDARD.encode(&value)
            );
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(event))), i + 1))
        }
    });
    let mut resp = Response::new(StreamBody::new(events).boxed_unsync());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    resp
}
