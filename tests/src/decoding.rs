//! A TLS upstream that decodes what it receives the way real applications do, for the
//! adversarial substitution tests: path segments percent-decoded, the query and
//! `application/x-www-form-urlencoded` bodies form-decoded (`+` is a space), JSON bodies parsed.
//! It records every request (raw and decoded) and answers with what it decoded, one field per
//! line as text, so a value that arrived split or transformed comes back in a form no scrubber
//! knows — which is what the tests must rule out.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use tokio_util::sync::DropGuard;

use crate::https::{TestCa, serve_tls, tls_acceptor};
use crate::netns::NetNs;

/// One request as the decoding upstream received and understood it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The raw request target (path and query).
    pub target: String,
    /// The Host header (h1) or `:authority` (h2), raw.
    pub host: Option<Vec<u8>>,
    /// Every header value, raw (names lower-case).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The raw body.
    pub body: Vec<u8>,
    /// Every field it decoded: path segments, query keys and values, form keys and values,
    /// JSON strings (keys and values) and scalars, in that order.
    pub fields: Vec<Vec<u8>>,
    /// The body was labelled JSON but did not parse.
    pub json_error: bool,
}

impl Decoded {
    /// Whether `needle` occurs anywhere in what arrived: target, headers, body or a field.
    pub fn carries(&self, needle: &[u8]) -> bool {
        let has = |hay: &[u8]| hay.windows(needle.len().max(1)).any(|w| w == needle);
        has(self.target.as_bytes())
            || self.host.as_deref().is_some_and(has)
            || self.headers.iter().any(|(_, v)| has(v))
            || has(&self.body)
            || self.fields.iter().any(|f| has(f))
    }
}

/// The decoding HTTPS upstream (h2 and http/1.1 by ALPN); stops on drop.
#[derive(Debug)]
pub struct DecodingUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Decoded>>>,
    _stop: DropGuard,
}

impl DecodingUpstream {
    /// Serves TLS for `names` (certificate from `ca`) on `ip`:port 0 inside `ns`.
    pub fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa, names: &[&str]) -> DecodingUpstream {
        let acceptor = tls_acceptor(ca, names, &[b"h2", b"http/1.1"]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let (addr, stop) = serve_tls(ns, ip, "decoding upstream", acceptor, move |req| {
            serve(req, recorded.clone())
        });
        DecodingUpstream {
            addr,
            seen,
            _stop: stop,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Decoded> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn serve(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Decoded>>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let version = format!("{:?}", req.version());
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().as_bytes().to_vec())
        .or_else(|| {
            req.headers()
                .get(hyper::header::HOST)
                .map(|h| h.as_bytes().to_vec())
        });
    let headers: Vec<(String, Vec<u8>)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .unwrap_or_default();
    let body = req.into_body().collect().await?.to_bytes().to_vec();

    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.as_str(), None),
    };
    let mut fields: Vec<Vec<u8>> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_encoding::percent_decode_str(s).collect())
        .collect();
    if let Some(q) = query {
        form_fields(q.as_bytes(), &mut fields);
    }
    let mut json_error = false;
    if content_type.starts_with("application/x-www-form-urlencoded") {
        form_fields(&body, &mut fields);
    } else if content_type.starts_with("application/json") {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => json_strings(&v, &mut fields),
            Err(_) => json_error = true,
        }
    }
    let mut answer = b"decoded:\n".to_vec();
    for f in &fields {
        answer.extend_from_slice(f);
        answer.push(b'\n');
    }
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Decoded {
            version,
            target,
            host,
            headers,
            body,
            fields,
            json_error,
        });
    let resp = Response::builder()
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(answer)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
    Ok(resp)
}

fn form_fields(input: &[u8], out: &mut Vec<Vec<u8>>) {
    for (k, v) in form_urlencoded::parse(input) {
        out.push(k.as_bytes().to_vec());
        out.push(v.as_bytes().to_vec());
    }
}

fn json_strings(v: &serde_json::Value, out: &mut Vec<Vec<u8>>) {
    match v {
        serde_json::Value::String(s) => out.push(s.as_bytes().to_vec()),
        serde_json::Value::Array(items) => items.iter().for_each(|i| json_strings(i, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.push(k.as_bytes().to_vec());
                json_strings(v, out);
            }
        }
        // A scalar is what a value placed outside a string would have become.
        other => out.push(other.to_string().into_bytes()),
    }
}
