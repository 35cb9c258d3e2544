//! An allowed upstream that does its worst with what it receives (adversarial scrubbing tests):
//! it echoes the value of the request's `x-reflect` header in every encoding the scrubber
//! covers ([`encodings`], written after the libraries named, independently of veil's own), in
//! response headers, a streamed body and trailers; it echoes the request headers as JSON; and it
//! sends bodies veil must not pass: a `Transfer-Encoding` other than chunked, a body gzipped
//! twice under one `Content-Encoding: gzip`. TLS with h2 and http/1.1 by ALPN.
//!
//! Routes: `/all` (every encoding: a header each, one body line each in a chunked/DATA stream,
//! a trailer each), `/headers` (JSON of the request headers, and `x-echo-authorization`),
//! `/te-gzip` (`Transfer-Encoding: gzip, chunked`, h1), `/gzip2` (gzip of gzip), `/stream`
//! (server-sent events, every 20 ms, carrying the last value `/remember` received, until
//! [`Adversary::stop_streams`] or 30 s).

use std::convert::Infallible;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::https::{TestCa, serve_tls, tls_acceptor};
use crate::netns::NetNs;

/// The request header whose value is echoed.
pub const REFLECT: &str = "x-reflect";

/// The value in every covered encoding: (name, bytes). Header-safe ones have no control
/// characters.
pub fn encodings(v: &[u8]) -> Vec<(String, Vec<u8>)> {
    let s = String::from_utf8_lossy(v).into_owned();
    let mut out: Vec<(String, Vec<u8>)> = vec![("literal".into(), v.to_vec())];
    let json = serde_json::to_string(&s).unwrap_or_default();
    out.push((
        "json-serde".into(),
        json.trim_matches('"').as_bytes().to_vec(),
    ));
    let esc = |slash: bool, ascii: Option<bool>, also: &[char]| -> Vec<u8> {
        let mut o = String::new();
        for c in s.chars() {
            let u = |o: &mut String, upper: bool| {
                let mut b = [0u16; 2];
                for unit in c.encode_utf16(&mut b) {
                    o.push_str(&if upper {
                        format!("\\u{unit:04X}")
                    } else {
                        format!("\\u{unit:04x}")
                    });
                }
            };
            match c {
                '"' => o.push_str("\\\""),
                '\\' => o.push_str("\\\\"),
                '/' if slash => o.push_str("\\/"),
                c if also.contains(&c) => u(&mut o, false),
                c if !c.is_ascii() && ascii.is_some() => u(&mut o, ascii == Some(true)),
                c => o.push(c),
            }
        }
        o.into_bytes()
    };
    out.push(("json-php".into(), esc(true, Some(false), &[])));
    out.push(("json-python".into(), esc(false, Some(false), &[])));
    out.push((
        "json-go".into(),
        esc(false, None, &['<', '>', '&', '\u{2028}', '\u{2029}']),
    ));
    out.push((
        "json-gson".into(),
        esc(
            false,
            None,
            &['<', '>', '&', '=', '\'', '\u{2028}', '\u{2029}'],
        ),
    ));
    out.push(("json-jackson".into(), esc(false, Some(true), &[])));
    let html = |table: &[(char, &str)]| -> Vec<u8> {
        s.chars()
            .map(|c| {
                table
                    .iter()
                    .find(|(k, _)| *k == c)
                    .map_or_else(|| c.to_string(), |(_, r)| (*r).to_owned())
            })
            .collect::<String>()
            .into_bytes()
    };
    let base = [('&', "&amp;"), ('<', "&lt;"), ('>', "&gt;")];
    let with = |extra: &[(char, &'static str)]| -> Vec<(char, &'static str)> {
        base.iter().chain(extra).copied().collect()
    };
    out.push((
        "html-python".into(),
        html(&with(&[('"', "&quot;"), ('\'', "&#x27;")])),
    ));
    out.push((
        "html-go".into(),
        html(&with(&[('"', "&#34;"), ('\'', "&#39;")])),
    ));
    out.push((
        "html-go-template".into(),
        html(&with(&[('"', "&#34;"), ('\'', "&#39;"), ('+', "&#43;")])),
    ));
    out.push((
        "html-php".into(),
        html(&with(&[('"', "&quot;"), ('\'', "&#039;")])),
    ));
    out.push((
        "html-ruby".into(),
        html(&with(&[('"', "&quot;"), ('\'', "&#39;")])),
    ));
    out.push(("html-java".into(), html(&with(&[('"', "&quot;")]))));
    for (name, all) in [("html-numeric", false), ("html-all-numeric", true)] {
        for (style, fmt) in [("dec", 0), ("hex", 1), ("HEX", 2)] {
            let text: String = s
                .chars()
                .map(|c| {
                    if !all && c.is_ascii_alphanumeric() {
                        c.to_string()
                    } else {
                        match fmt {
                            0 => format!("&#{};", c as u32),
                            1 => format!("&#x{:x};", c as u32),
                            _ => format!("&#x{:X};", c as u32),
                        }
                    }
                })
                .collect();
            out.push((format!("{name}-{style}"), text.into_bytes()));
        }
    }
    let percent = |safe: &str, lower: bool, plus: bool| -> Vec<u8> {
        v.iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() || safe.as_bytes().contains(&b) {
                    char::from(b).to_string()
                } else if plus && b == b' ' {
                    "+".into()
                } else if lower {
                    format!("%{b:02x}")
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
            .into_bytes()
    };
    out.push(("percent".into(), percent("-._~", false, false)));
    out.push(("percent-lower".into(), percent("-._~", true, false)));
    out.push(("percent-form".into(), percent("-._~", false, true)));
    out.push((
        "percent-uri-component".into(),
        percent("-_.!~*'()", false, false),
    ));
    out.push(("percent-python".into(), percent("-_.~/", false, false)));
    out.push((
        "percent-go-path".into(),
        percent("-_.~$&+=:@", false, false),
    ));
    out.push(("hex".into(), hex::encode(v).into_bytes()));
    out.push(("HEX".into(), hex::encode_upper(v).into_bytes()));
    for prefix in 0..3 {
        let doc = [&b"tok="[..prefix + 1], v].concat();
        out.push((
            format!("base64-{prefix}"),
            STANDARD.encode(&doc).into_bytes(),
        ));
        out.push((
            format!("base64url-{prefix}"),
            URL_SAFE.encode(&doc).into_bytes(),
        ));
    }
    out.push(("basic".into(), basic_token(v).into_bytes()));
    out.push(("truncated".into(), v[1..v.len() - 1].to_vec()));
    out
}

/// `Basic <base64("user:" ++ v)>`.
pub fn basic_token(v: &[u8]) -> String {
    format!(
        "Basic {}",
        STANDARD.encode([b"user:".as_slice(), v].concat())
    )
}

/// Line-wrapped base64 of `prefix ++ v`: (name, text) for MIME 76 with `\r\n` and `\n` (Python
/// `base64.encodebytes`), PEM 64 with `\n` and `\r\n`. Body only (line breaks).
pub fn wrapped(v: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (columns, eol, name) in [
        (76, "\r\n", "mime-crlf"),
        (76, "\n", "mime-lf"),
        (64, "\n", "pem-lf"),
        (64, "\r\n", "pem-crlf"),
    ] {
        for prefix in [0usize, 41, 70] {
            let doc = [vec![b'p'; prefix], v.to_vec(), b"trailing text".to_vec()].concat();
            let text = STANDARD.encode(&doc);
            let lines: Vec<&str> = text
                .as_bytes()
                .chunks(columns)
                .map(|l| std::str::from_utf8(l).unwrap_or_default())
                .collect();
            out.push((format!("{name}-{prefix}"), lines.join(eol).into_bytes()));
        }
    }
    out
}

/// What the adversary received.
#[derive(Debug, Default, Clone)]
pub struct Received {
    /// `x-reflect` values, in order.
    pub reflected: Vec<Vec<u8>>,
    /// `authorization` values, in order.
    pub authorization: Vec<Vec<u8>>,
    /// The last value `/remember` received.
    pub remembered: Vec<u8>,
    /// Events `/stream` sent carrying the remembered value.
    pub streamed_remembered: u64,
    /// Requests to `/stream` received.
    pub streams: u64,
}

/// State shared by the adversary's connections.
#[derive(Debug, Default)]
struct Shared {
    received: Mutex<Received>,
    /// Cancelled (and replaced) by [`Adversary::stop_streams`].
    stop: Mutex<CancellationToken>,
}

/// The adversarial upstream; stops on drop.
#[derive(Debug)]
pub struct Adversary {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

type ReplyBody = UnsyncBoxBody<Bytes, Infallible>;

impl Adversary {
    /// Serves TLS for `names` (certificate from `ca`) on `ip`:port 0 in `ns`; `alpn` as offered
    /// (e.g. `[b"h2", b"http/1.1"]`, or http/1.1 only for `/te-gzip`).
    pub fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa, names: &[&str], alpn: &[&[u8]]) -> Adversary {
        let acceptor = tls_acceptor(ca, names, alpn);
        let shared: Arc<Shared> = Arc::default();
        let rec = shared.clone();
        let (addr, stop) = serve_tls(ns, ip, "adversary", acceptor, move |req| {
            answer(req, rec.clone())
        });
        Adversary {
            addr,
            shared,
            _stop: stop,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it received so far.
    pub fn received(&self) -> Received {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ends every `/stream` response.
    pub fn stop_streams(&self) {
        let mut stop = self.shared.stop.lock().unwrap_or_else(|p| p.into_inner());
        stop.cancel();
        *stop = CancellationToken::new();
    }
}

fn full(b: impl Into<Bytes>) -> ReplyBody {
    Full::new(b.into()).boxed_unsync()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = e.write_all(data);
    e.finish().unwrap_or_default()
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<ReplyBody>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let v = req
        .headers()
        .get(REFLECT)
        .map(|h| h.as_bytes().to_vec())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, h)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(h.as_bytes()).into_owned(),
            )
        })
        .collect();
    {
        let mut r = shared.received.lock().unwrap_or_else(|p| p.into_inner());
        if !v.is_empty() {
            r.reflected.push(v.clone());
        }
        match path.as_str() {
            "/remember" => r.remembered = v.clone(),
            "/stream" => r.streams += 1,
            _ => {}
        }
        if let Some(a) = req.headers().get("authorization") {
            r.authorization.push(a.as_bytes().to_vec());
        }
    }
    let _ = req.into_body().collect().await?;
    let mut resp = Response::builder();
    if path != "/stream" {
        resp = resp.header("content-type", "text/plain; charset=utf-8");
    }
    let body = match path.as_str() {
        "/all" => {
            let forms = encodings(&v);
            let mut trailers = HeaderMap::new();
            for (name, form) in &forms {
                if let (Ok(n), Ok(h)) = (
                    HeaderName::from_bytes(format!("x-enc-{name}").to_ascii_lowercase().as_bytes()),
                    HeaderValue::from_bytes(form),
                ) {
                    resp = resp.header(n.clone(), h.clone());
                    trailers.insert(
                        HeaderName::from_bytes(
                            format!("x-trailer-{name}").to_ascii_lowercase().as_bytes(),
                        )
                        .unwrap_or(n),
                        h,
                    );
                }
            }
            let declared: Vec<String> = trailers.keys().map(|n| n.as_str().to_owned()).collect();
            if let Ok(h) = HeaderValue::from_str(&declared.join(", ")) {
                resp = resp.header("trailer", h);
            }
            let mut frames: Vec<Frame<Bytes>> = Vec::new();
            for (name, form) in forms.iter().chain(wrapped(&v).iter()) {
                let line = [format!("{name}: ").as_bytes(), form, b"\n"].concat();
                // Cut inside the value's encoding, so it spans two frames.
                let cut = name.len() + 2 + form.len() / 2;
                frames.push(Frame::data(Bytes::from(line[..cut].to_vec())));
                frames.push(Frame::data(Bytes::from(line[cut..].to_vec())));
            }
            frames.push(Frame::trailers(trailers));
            streamed(frames)
        }
        "/headers" => {
            if let Some((_, a)) = headers.iter().find(|(n, _)| n == "authorization")
                && let Ok(h) = HeaderValue::from_str(a)
            {
                resp = resp.header("x-echo-authorization", h);
            }
            full(serde_json::to_vec(&headers).unwrap_or_default())
        }
        "/te-gzip" => {
            resp = resp.header("transfer-encoding", "gzip, chunked");
            full(gzip(&[b"you sent ", v.as_slice()].concat()))
        }
        "/remember" => full(&b"remembered\n"[..]),
        "/stream" => {
            resp = resp.header("content-type", "text/event-stream");
            sse(shared)
        }
        "/gzip2" => {
            resp = resp.header("content-encoding", "gzip");
            full(gzip(&gzip(
                &[b"you sent ", v.as_slice()].concat().repeat(50),
            )))
        }
        _ => full(&b"unknown route\n"[..]),
    };
    Ok(resp
        .body(body)
        .unwrap_or_else(|_| Response::new(full(Bytes::new()))))
}

/// Frames a few milliseconds apart, so each goes out on its own (h1 chunk, h2 DATA).
fn streamed(frames: Vec<Frame<Bytes>>) -> ReplyBody {
    use futures_util::StreamExt as _;
    let stream = futures_util::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok::<_, Infallible>(frame)
    });
    StreamBody::new(stream).boxed_unsync()
}

/// Server-sent events every 20 ms carrying the remembered value, until stopped (or 30 s).
fn sse(shared: Arc<Shared>) -> ReplyBody {
    use futures_util::StreamExt as _;
    let stop = shared
        .stop
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let ticks = futures_util::stream::iter(0..1500).then(move |i| {
        let shared = shared.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut r = shared.received.lock().unwrap_or_else(|p| p.into_inner());
            if !r.remembered.is_empty() {
                r.streamed_remembered += 1;
            }
            let event = [
                format!("id: {i}\ndata: ").as_bytes(),
                &r.remembered,
                b"\n\n",
            ]
            .concat();
            Ok::<_, Infallible>(Frame::data(Bytes::from(event)))
        }
    });
    let ticks = ticks.take_until(async move { stop.cancelled().await });
    StreamBody::new(ticks).boxed_unsync()
}
