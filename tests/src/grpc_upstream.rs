//! A gRPC-shaped upstream (h2 only) for the trailer scenarios (issue 20): `POST` with
//! `content-type: application/grpc`; the `authorization` metadata must carry `Bearer <value>`
//! (else a trailers-only answer with `grpc-status: 16`). `/echo.Echo/Unary` answers one
//! length-prefixed message carrying the value, `/echo.Echo/Stream` three; both end with trailers
//! `grpc-status: 0` and a `grpc-message` carrying the value (which veil must scrub);
//! `/echo.Echo/Denied` answers trailers only, `grpc-status: 7` (permission denied) with the
//! value in `grpc-message`; `/echo.Echo/Compressed` one message with the compressed flag set
//! (the value inside, uncompressed, as a server ignoring `grpc-accept-encoding` would);
//! `/echo.Echo/Later` one message with the value, then — once the test hands it a later value
//! ([`GrpcUpstream::release`], e.g. after a rotation) — a second message with that one.
//! Messages are raw bytes (no protobuf), which gRPC clients with generic (bytes in, bytes out)
//! stubs such as grpcio's accept.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::StreamExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response};
use tokio::sync::watch;
use tokio_util::sync::DropGuard;

use crate::https::{TestCa, serve_tls, tls_acceptor};
use crate::intercept_world::Upstream;
use crate::netns::NetNs;

/// The upstream; stops on drop.
pub struct GrpcUpstream {
    addr: SocketAddr,
    later: watch::Sender<Option<String>>,
    _stop: DropGuard,
}

impl std::fmt::Debug for GrpcUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Upstream for GrpcUpstream {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl GrpcUpstream {
    /// Serves h2 for `names` (certificate from `ca`) on `ip`:0 in `ns`, knowing `value`.
    pub fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa, names: &[&str], value: String) -> Self {
        let acceptor = tls_acceptor(ca, names, &[b"h2"]);
        let value: Arc<str> = value.into();
        let (later, later_rx) = watch::channel(None::<String>);
        let handler = move |req: Request<Incoming>| {
            let value = value.clone();
            let later = later_rx.clone();
            async move {
                let path = req.uri().path().to_owned();
                let authorized = req
                    .headers()
                    .get("authorization")
                    .is_some_and(|v| v.as_bytes() == format!("Bearer {value}").as_bytes());
                // Read the request message before answering, as a gRPC server does.
                let _ = req.into_body().collect().await?;
                if authorized && path == "/echo.Echo/Later" {
                    return Ok(answer_later(&value, later));
                }
                Ok::<_, hyper::Error>(answer(&path, authorized, &value))
            }
        };
        let (addr, stop) = serve_tls(ns, ip, "gRPC upstream", acceptor, handler);
        GrpcUpstream {
            addr,
            later,
            _stop: stop,
        }
    }

    /// Lets every waiting `/echo.Echo/Later` call send its second message, carrying `value`.
    pub fn release(&self, value: String) {
        self.later.send_replace(Some(value));
    }
}

/// The first message now, the second once a later value is released, then the trailers.
fn answer_later(value: &str, mut later: watch::Receiver<Option<String>>) -> Response<Body> {
    let first = Frame::data(message(&format!("{{\"n\": 0, \"key\": \"{value}\"}}")));
    let rest = async move {
        let second = match later.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => String::new(),
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        futures_util::stream::iter([
            Frame::data(message(&format!("{{\"n\": 1, \"key\": \"{second}\"}}"))),
            Frame::trailers(trailers),
        ])
    };
    let frames = futures_util::stream::once(async { first })
        .chain(futures_util::stream::once(rest).flatten())
        .map(Ok::<_, Infallible>);
    grpc_response(StreamBody::new(frames).boxed_unsync())
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

fn message(payload: &str) -> Bytes {
    let mut m = vec![0u8];
    m.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_be_bytes());
    m.extend_from_slice(payload.as_bytes());
    m.into()
}

fn answer(path: &str, authorized: bool, value: &str) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    let count = match path {
        "/echo.Echo/Unary" => 1,
        "/echo.Echo/Stream" => 3,
        _ => 0,
    };
    let frames: Vec<Frame<Bytes>> = if authorized && path == "/echo.Echo/Denied" {
        trailers.insert("grpc-status", HeaderValue::from_static("7"));
        let msg = HeaderValue::from_str(&format!("denied for {value}"))
            .unwrap_or_else(|_| HeaderValue::from_static("denied"));
        trailers.insert("grpc-message", msg);
        vec![Frame::trailers(trailers)]
    } else if authorized && path == "/echo.Echo/Compressed" {
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let mut m = message(&format!("{{\"key\": \"{value}\"}}")).to_vec();
        m[0] = 1;
        vec![Frame::data(m.into()), Frame::trailers(trailers)]
    } else if authorized && count > 0 {
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let msg = HeaderValue::from_str(&format!("done for {value}"))
            .unwrap_or_else(|_| HeaderValue::from_static("done"));
        trailers.insert("grpc-message", msg);
        (0..count)
            .map(|i| Frame::data(message(&format!("{{\"n\": {i}, \"key\": \"{value}\"}}"))))
            .chain(std::iter::once(Frame::trailers(trailers)))
            .collect()
    } else {
        trailers.insert("grpc-status", HeaderValue::from_static("16"));
        trailers.insert("grpc-message", HeaderValue::from_static("unauthenticated"));
        vec![Frame::trailers(trailers)]
    };
    let stream = futures_util::stream::iter(frames.into_iter().map(Ok::<_, Infallible>));
    grpc_response(StreamBody::new(stream).boxed_unsync())
}
