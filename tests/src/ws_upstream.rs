//! A WebSocket upstream (`wss://`, HTTP/1.1 by ALPN) in a namespace for the websocket scenarios
//! (issue 20): it accepts an upgrade only with `Authorization: Bearer <value>` (the value veil
//! substitutes), records what it received, and answers text commands the way a hostile or
//! careless server would, with the value it knows:
//! - `leak`: the value in every encoding the scrubber covers ([`crate::adversary::encodings`]),
//!   one message each (text when UTF-8, binary otherwise), the raw value as binary, the value
//!   split across fragments of a text and of a binary message (a ping carrying the value
//!   between two fragments), a ping carrying the value, then `done`;
//! - `close`: a close frame (1000) whose reason carries the value;
//! - `compressed`: a frame with RSV1 set (permessage-deflate) although none was negotiated;
//! - `big:N`: a binary message of N bytes, then `done`;
//! - anything else is echoed back as it came.
//!
//! On [`NEGOTIATE_DEFLATE`] its 101 names `permessage-deflate` although nobody offered it.
//!
//! [`WsUpstream::start_h2`] also speaks h2 (ALPN `h2` first, `http/1.1` still served): a
//! WebSocket opens there by extended CONNECT (RFC 8441, answered 200), when it advertises
//! SETTINGS_ENABLE_CONNECT_PROTOCOL; without it, h2 resets such a stream (`PROTOCOL_ERROR`),
//! as a server that does not support WebSocket over h2 does.
//!
//! Its [`WsSeen`] never prints a payload (they may carry the value).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper::body::Incoming;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_util::sync::DropGuard;

use crate::adversary::encodings;
use crate::https::{TestCa, serve_tcp, tls_acceptor};
use crate::intercept_world::Upstream;
use crate::netns::NetNs;

/// The path on which the upstream's 101 negotiates `permessage-deflate` whatever was offered.
pub const NEGOTIATE_DEFLATE: &str = "/negotiate-deflate";

/// What the upstream received, over all its connections.
#[derive(Default, Clone)]
pub struct WsSeen {
    /// Upgrade requests.
    pub upgrades: usize,
    /// Upgrade requests whose `Authorization` carried the value.
    pub authorized: usize,
    /// WebSockets opened over h2 (extended CONNECT, answered 200).
    pub h2: usize,
    /// Upgrade requests that offered an extension (`Sec-WebSocket-Extensions`).
    pub offered_extensions: usize,
    /// Data messages received, in order (pong payloads as `pong:` + payload).
    pub messages: Vec<Vec<u8>>,
}

impl std::fmt::Debug for WsSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Lengths only: a payload may carry the value.
        let lens: Vec<usize> = self.messages.iter().map(Vec::len).collect();
        f.debug_struct("WsSeen")
            .field("upgrades", &self.upgrades)
            .field("authorized", &self.authorized)
            .field("h2", &self.h2)
            .field("offered_extensions", &self.offered_extensions)
            .field("message_lengths", &lens)
            .finish()
    }
}

/// The upstream; stops on drop.
pub struct WsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<WsSeen>>,
    _stop: DropGuard,
}

impl std::fmt::Debug for WsUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Upstream for WsUpstream {
    fn addr(&self) -> SocketAddr {
        WsUpstream::addr(self)
    }
}

type Seen = Arc<Mutex<WsSeen>>;

impl WsUpstream {
    /// Serves `wss` for `names` (certificate from `ca`) on `ip`:0 in `ns`, knowing `value`.
    pub fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa, names: &[&str], value: String) -> Self {
        Self::start_mode(ns, ip, ca, names, value, None)
    }

    /// Like [`WsUpstream::start`], speaking h2 too; `extended_connect` says whether it enables
    /// WebSocket over h2.
    pub fn start_h2(
        ns: &NetNs,
        ip: IpAddr,
        ca: &TestCa,
        names: &[&str],
        value: String,
        extended_connect: bool,
    ) -> Self {
        Self::start_mode(ns, ip, ca, names, value, Some(extended_connect))
    }

    fn start_mode(
        ns: &NetNs,
        ip: IpAddr,
        ca: &TestCa,
        names: &[&str],
        value: String,
        h2: Option<bool>,
    ) -> Self {
        let alpn: &[&[u8]] = if h2.is_some() {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        let acceptor = tls_acceptor(ca, names, alpn);
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        let value: Arc<str> = value.into();
        let (addr, stop) = serve_tcp(ns, ip, "WebSocket upstream", move |tcp| {
            let (acceptor, seen, value) = (acceptor.clone(), seen2.clone(), value.clone());
            async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    serve_h2(tls, seen, value, h2 == Some(true)).await;
                } else {
                    serve(tls, seen, &value).await;
                }
            }
        });
        WsUpstream {
            addr,
            seen,
            _stop: stop,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it received so far.
    pub fn seen(&self) -> WsSeen {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[expect(
    clippy::result_large_err,
    reason = "tungstenite's handshake callback returns its own ErrorResponse"
)]
async fn serve<S>(io: S, seen: Seen, value: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let expected = format!("Bearer {value}");
    let seen_hs = seen.clone();
    let check = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let mut s = seen_hs.lock().unwrap_or_else(|p| p.into_inner());
        s.upgrades += 1;
        if req.headers().contains_key("sec-websocket-extensions") {
            s.offered_extensions += 1;
        }
        let auth = req.headers().get("authorization").map(|v| v.as_bytes());
        if auth == Some(expected.as_bytes()) {
            s.authorized += 1;
            let mut resp = resp;
            if req.uri().path() == NEGOTIATE_DEFLATE {
                resp.headers_mut().insert(
                    "sec-websocket-extensions",
                    tokio_tungstenite::tungstenite::http::HeaderValue::from_static(
                        "permessage-deflate",
                    ),
                );
            }
            Ok(resp)
        } else {
            let mut refused = ErrorResponse::new(Some("unauthorized".into()));
            *refused.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
            Err(refused)
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(io, check).await else {
        return;
    };
    session(ws, &seen, value).await;
}

/// Serves h2 on `io`: an extended CONNECT for `websocket` with the value in `Authorization`
/// is answered 200 and the stream carries the same session as an h1 upgrade; anything else
/// gets 401 or 400.
async fn serve_h2<S>(io: S, seen: Seen, value: Arc<str>, extended_connect: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let (seen, value) = (seen.clone(), value.clone());
        async move {
            let status = {
                let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                let websocket = req.method() == hyper::Method::CONNECT
                    && req
                        .extensions()
                        .get::<hyper::ext::Protocol>()
                        .is_some_and(|p| p.as_str() == "websocket");
                if websocket {
                    s.upgrades += 1;
                    if req.headers().contains_key("sec-websocket-extensions") {
                        s.offered_extensions += 1;
                    }
                }
                let expected = format!("Bearer {value}");
                let auth = req.headers().get("authorization").map(|v| v.as_bytes());
                if !websocket {
                    hyper::StatusCode::BAD_REQUEST
                } else if auth == Some(expected.as_bytes()) {
                    s.authorized += 1;
                    s.h2 += 1;
                    hyper::StatusCode::OK
                } else {
                    hyper::StatusCode::UNAUTHORIZED
                }
            };
            if status == hyper::StatusCode::OK {
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let io = hyper_util::rt::TokioIo::new(upgraded);
                    let ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                    session(ws, &seen, &value).await;
                });
            }
            let mut resp = hyper::Response::new(Empty::<Bytes>::new());
            *resp.status_mut() = status;
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    if extended_connect {
        builder.enable_connect_protocol();
    }
    let _ = builder
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// One WebSocket session after the handshake: records what it gets, answers commands.
async fn session<S>(mut ws: WebSocketStream<S>, seen: &Seen, value: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        let record = |bytes: Vec<u8>| {
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .messages
                .push(bytes);
        };
        let out: Vec<Message> = match msg {
            Message::Text(t) => {
                record(t.as_bytes().to_vec());
                commands(t.as_str(), value).unwrap_or_else(|| vec![Message::Text(t)])
            }
            Message::Binary(b) => {
                record(b.to_vec());
                vec![Message::Binary(b)]
            }
            Message::Pong(p) => {
                record([b"pong:".as_slice(), &p].concat());
                continue;
            }
            Message::Close(_) => break,
            _ => continue,
        };
        for m in out {
            if ws.send(m).await.is_err() {
                return;
            }
        }
    }
}

/// The answer to a command, `None` for anything to echo.
fn commands(cmd: &str, value: &str) -> Option<Vec<Message>> {
    let v = value.as_bytes();
    let frame = |data: &[u8], op: OpCode, fin: bool| {
        Message::Frame(Frame::message(Bytes::copy_from_slice(data), op, fin))
    };
    let text = OpCode::Data(Data::Text);
    let binary = OpCode::Data(Data::Binary);
    let cont = OpCode::Data(Data::Continue);
    let out = match cmd {
        "leak" => {
            let mut out = Vec::new();
            for (name, enc) in encodings(v) {
                let mut msg = format!("{name}:").into_bytes();
                msg.extend_from_slice(&enc);
                out.push(match String::from_utf8(msg) {
                    Ok(t) => Message::Text(t.into()),
                    Err(e) => Message::Binary(e.into_bytes().into()),
                });
            }
            out.push(Message::Binary(Bytes::copy_from_slice(v)));
            let (a, rest) = v.split_at(v.len() / 3);
            let (b, c) = rest.split_at(rest.len() / 2);
            out.push(frame(&[b"frag:".as_slice(), a].concat(), text, false));
            out.push(frame(b, cont, false));
            out.push(frame(c, cont, true));
            out.push(frame(a, binary, false));
            out.push(Message::Ping(Bytes::copy_from_slice(v)));
            out.push(frame(b, cont, false));
            out.push(frame(c, cont, true));
            out.push(Message::Ping(Bytes::copy_from_slice(v)));
            out.push(Message::Text("done".into()));
            out
        }
        "close" => vec![Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: format!("bye {value}").into(),
        }))],
        "compressed" => {
            let mut f = Frame::message(Bytes::copy_from_slice(v), text, true);
            f.header_mut().rsv1 = true;
            vec![Message::Frame(f)]
        }
        _ => {
            let n: usize = cmd.strip_prefix("big:")?.parse().ok()?;
            vec![
                Message::Binary(vec![b'a'; n].into()),
                Message::Text("done".into()),
            ]
        }
    };
    Some(out)
}
