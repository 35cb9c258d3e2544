//! TLS upstreams for interception tests: a test CA, and an HTTPS server (HTTP/1.1 and h2 by
//! ALPN) that answers every request with a JSON echo of what it received and records it, so a
//! test can assert both what arrived upstream and what the sandbox saw. On every upstream,
//! `POST|PUT /store` keeps the request body and `GET /load` answers with the last one kept.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::convert::Infallible;
use std::io::Write as _;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::netns::NetNs;

/// A throwaway CA: its certificate is written to a PEM file (for `--upstream-ca` and clients).
#[derive(Debug)]
pub struct TestCa {
    key: KeyPair,
    params: CertificateParams,
    pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    /// Creates the CA and writes `ca.pem` into a fresh temp dir.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("CA key: {e}"));
        let mut params = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| panic!("CA params: {e}"));
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("CA cert: {e}"));
        let dir = tempfile::Builder::new()
            .prefix(&crate::owner::tempdir_prefix())
            .tempdir()
            .unwrap_or_else(|e| panic!("CA temp dir: {e}"));
        let pem_path = dir.path().join("ca.pem");
        std::fs::write(&pem_path, cert.pem()).unwrap_or_else(|e| panic!("writing CA: {e}"));
        TestCa {
            key,
            params,
            pem_path,
            _dir: dir,
        }
    }

    /// Path of the CA certificate (PEM).
    pub fn pem_path(&self) -> &Path {
        &self.pem_path
    }

    /// A leaf certificate and key for `names` as PEM text (for servers like nginx).
    pub fn issue_pem(&self, names: &[&str]) -> (String, String) {
        let (cert, key) = self.leaf(names);
        (cert.pem(), key.serialize_pem())
    }

    fn leaf(&self, names: &[&str]) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("leaf key: {e}"));
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = CertificateParams::new(names).unwrap_or_else(|e| panic!("leaf params: {e}"));
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .unwrap_or_else(|e| panic!("leaf cert: {e}"));
        (cert, key)
    }

    /// A leaf certificate chain and key for `names`, signed by this CA.
    pub fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = self.leaf(names);
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// What the upstream received in one request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Seen {
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Request method.
    pub method: String,
    /// Request target (path and query).
    pub target: String,
    /// Headers in arrival order (names lower-case), including `host` for h1.
    pub headers: Vec<(String, String)>,
    /// Request body, as (lossy) text.
    pub body: String,
    /// The SNI the client sent.
    pub sni: Option<String>,
}

impl Seen {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A small JSON summary without any header value or body (`{"version","sni","target_len"}`),
    /// so a test's output never carries what the client sent.
    Summary,
    /// The whole [`Seen`] record as JSON (for scrubbing tests: values echoed back).
    Echo,
    /// Reflects the request's `x-reflect` header (as it arrived) in the form the path names,
    /// for scrubbing tests; see [`REFLECT_FORMS`]. Other paths answer as [`Reply::Echo`].
    Reflect,
}

/// The request header whose value [`Reply::Reflect`] sends back.
pub const REFLECT_HEADER: &str = "x-reflect";

/// The forms [`Reply::Reflect`] answers in, at `GET /reflect/<form>`:
/// - `header`: response header `x-echo: <v>`;
/// - `reason`: the value as the h1 reason phrase;
/// - `body`: `you sent <v>` as text; `json`: `{"echo": "<v>"}`;
/// - `base64`, `base64url`: `token=<v>` in standard / URL-safe base64 (padded);
/// - `percent`: `q=<v percent-encoded>`;
/// - `gzip`, `deflate`, `br`: the `body` text (repeated) with that `Content-Encoding`;
/// - `zstd`: the `body` text, labelled `Content-Encoding: zstd` (veil cannot decode that);
/// - `chunked`: the `body` text in three frames cut inside the value, 30 ms apart;
/// - `trailer`: a short body and the trailer `x-echo-trailer: <v>`.
pub const REFLECT_FORMS: [&str; 14] = [
    "header",
    "reason",
    "body",
    "json",
    "base64",
    "base64url",
    "percent",
    "gzip",
    "deflate",
    "br",
    "zstd",
    "chunked",
    "trailer",
    "trailer-h1",
];

/// An HTTPS (or plain HTTP) recording server inside a namespace; stops on drop.
#[derive(Debug)]
pub struct HttpsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _stop: DropGuard,
}

/// What the upstream answers with.
type ReplyBody = UnsyncBoxBody<Bytes, Infallible>;

/// The body last sent to `POST|PUT /store` (shared by every connection of one upstream), which
/// `GET /load` returns.
type Stored = Arc<Mutex<Bytes>>;

impl HttpsUpstream {
    /// Serves TLS for `names` (certificate from `ca`) on `ip`:port 0 in `ns`, offering h2 and
    /// http/1.1.
    pub fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa, names: &[&str]) -> HttpsUpstream {
        HttpsUpstream::start_with(ns, ip, Some((ca, names)), Reply::Summary)
    }

    /// Plain HTTP (h1) on `ip`:port 0 in `ns`.
    pub fn start_plain(ns: &NetNs, ip: IpAddr) -> HttpsUpstream {
        HttpsUpstream::start_with(ns, ip, None, Reply::Summary)
    }

    /// TLS for `names` signed by `ca` (or plain HTTP when `None`), answering as `reply` says.
    pub fn start_with(
        ns: &NetNs,
        ip: IpAddr,
        tls: Option<(&TestCa, &[&str])>,
        reply: Reply,
    ) -> HttpsUpstream {
        let acceptor = tls.map(|(ca, names)| tls_acceptor(ca, names, &[b"h2", b"http/1.1"]));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stored: Stored = Arc::default();
        let seen2 = seen.clone();
        let (addr, stop) = serve_tcp(ns, ip, "HTTPS upstream", move |tcp| {
            let (acceptor, seen, stored) = (acceptor.clone(), seen2.clone(), stored.clone());
            async move {
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let Some(acceptor) = acceptor else {
                    let service = hyper::service::service_fn(move |req| {
                        record(req, None, seen.clone(), stored.clone(), reply)
                    });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = builder.serve_connection(io, service).await;
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                let service = hyper::service::service_fn(move |req| {
                    record(req, sni.clone(), seen.clone(), stored.clone(), reply)
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = builder.serve_connection(io, service).await;
            }
        });
        HttpsUpstream {
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
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A TLS acceptor for `names` (certificate from `ca`) offering `alpn` (e.g. `[b"h2", b"http/1.1"]`).
pub fn tls_acceptor(ca: &TestCa, names: &[&str], alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let (chain, key) = ca.issue(names);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| panic!("TLS versions: {e}"))
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap_or_else(|e| panic!("server cert: {e}"));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Serves HTTPS (h1 or h2, as ALPN chose) with `handler` on `ip`:0 inside `ns`, on a runtime of
/// its own, until the returned guard drops; `what` names the server in panics.
pub fn serve_tls<H, F, B>(
    ns: &NetNs,
    ip: IpAddr,
    what: &'static str,
    acceptor: tokio_rustls::TlsAcceptor,
    handler: H,
) -> (SocketAddr, DropGuard)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<B>, hyper::Error>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    serve_tcp(ns, ip, what, move |tcp| {
        let (acceptor, handler) = (acceptor.clone(), handler.clone());
        async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(handler);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let io = hyper_util::rt::TokioIo::new(tls);
            let _ = builder.serve_connection(io, service).await;
        }
    })
}

/// Accepts TCP connections on `ip`:0 inside `ns`, on a runtime of its own, handing each to
/// `on_conn` on its own task, until the returned guard drops; `what` names the server in panics.
/// The one accept loop of the test servers.
pub fn serve_tcp<C, F>(
    ns: &NetNs,
    ip: IpAddr,
    what: &'static str,
    on_conn: C,
) -> (SocketAddr, DropGuard)
where
    C: Fn(tokio::net::TcpStream) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = ns.run(move || {
        let l = std::net::TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("binding {what} on {ip}: {e}"));
        l.set_nonblocking(true)
            .unwrap_or_else(|e| panic!("nonblocking: {e}"));
        l
    });
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    let stopped = CancellationToken::new();
    let stop = stopped.clone().drop_guard();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{what} runtime: {e}"));
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)
                .unwrap_or_else(|e| panic!("tokio listener: {e}"));
            loop {
                let accepted = tokio::select! {
                    () = stopped.cancelled() => break,
                    a = listener.accept() => a,
                };
                let Ok((tcp, _)) = accepted else { continue };
                tokio::spawn(on_conn(tcp));
            }
        });
    });
    (addr, stop)
}

async fn record(
    req: Request<Incoming>,
    sni: Option<String>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stored: Stored,
    reply: Reply,
) -> Result<Response<ReplyBody>, hyper::Error> {
    let version = format!("{:?}", req.version());
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let mut headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    if let Some(authority) = req.uri().authority() {
        headers.push((":authority".to_owned(), authority.to_string()));
    }
    let reflected = req
        .headers()
        .get(REFLECT_HEADER)
        .map(|v| v.as_bytes().to_vec());
    let body = req.into_body().collect().await?.to_bytes();
    // The store/load pair answers on every upstream whatever its reply mode, so a test can send
    // a body through veil and read back what arrived upstream through veil again.
    let stored_reply = match (method.as_str(), target.as_str()) {
        ("POST" | "PUT", "/store") => {
            *stored.lock().unwrap_or_else(|p| p.into_inner()) = body.clone();
            Some(Bytes::from_static(b"{\"stored\":true}"))
        }
        ("GET", "/load") => Some(stored.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        _ => None,
    };
    let record = Seen {
        version,
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        sni,
    };
    if let Some(body) = stored_reply {
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(record);
        return Ok(Response::new(full(body)));
    }
    if reply == Reply::Reflect
        && let Some(form) = record.target.strip_prefix("/reflect/")
    {
        let form = form.to_owned();
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(record);
        return Ok(reflect(&form, &reflected.unwrap_or_default()));
    }
    let json = match reply {
        Reply::Echo | Reply::Reflect => serde_json::to_vec(&record).unwrap_or_default(),
        Reply::Summary => serde_json::to_vec(&serde_json::json!({
            "version": record.version,
            "sni": record.sni,
            "target_len": record.target.len(),
        }))
        .unwrap_or_default(),
    };
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(record);
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(full(Bytes::from(json)))
        .unwrap_or_else(|_| Response::new(full(Bytes::new()))))
}

fn full(bytes: Bytes) -> ReplyBody {
    Full::new(bytes).boxed_unsync()
}

/// The answer of [`Reply::Reflect`] for `form` (see [`REFLECT_FORMS`]) and the value `v`.
fn reflect(form: &str, v: &[u8]) -> Response<ReplyBody> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let text = |v: &[u8]| [b"you sent ".as_slice(), v, b"\n"].concat();
    let mut resp = Response::builder().header("content-type", "text/plain");
    let body = match form {
        "header" => {
            resp = resp.header("x-echo", v);
            full(Bytes::from_static(b"see x-echo\n"))
        }
        "reason" => {
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(v.to_vec()) {
                resp = resp.extension(reason);
            }
            full(Bytes::from_static(b"see the status line\n"))
        }
        "body" => full(Bytes::from(text(v))),
        "json" => {
            let v = String::from_utf8_lossy(v);
            full(Bytes::from(
                serde_json::to_vec(&serde_json::json!({ "echo": v })).unwrap_or_default(),
            ))
        }
        "base64" => full(Bytes::from(STANDARD.encode([b"token=", v].concat()))),
        "base64url" => full(Bytes::from(URL_SAFE.encode([b"token=", v].concat()))),
        "percent" => full(Bytes::from(format!("q={}", percent_encode(v)))),
        "gzip" | "deflate" | "br" | "zstd" => {
            // Long enough to span several compressed blocks and decoded reads.
            let plain = text(v).repeat(2000);
            resp = resp.header("content-encoding", form);
            full(Bytes::from(compress(form, &plain)))
        }
        "chunked" => {
            let third = v.len() / 3;
            let pieces = [
                [b"you sent ".as_slice(), &v[..third]].concat(),
                v[third..2 * third].to_vec(),
                [&v[2 * third..], b"\n".as_slice()].concat(),
            ];
            streamed(pieces.into_iter().map(|p| Frame::data(Bytes::from(p))))
        }
        "trailer" | "trailer-h1" => {
            let mut trailers = hyper::HeaderMap::new();
            if let Ok(v) = hyper::header::HeaderValue::from_bytes(v) {
                trailers.insert("x-echo-trailer", v);
            }
            resp = resp.header("trailer", "x-echo-trailer");
            streamed(
                [
                    Frame::data(Bytes::from_static(b"trailer follows\n")),
                    Frame::trailers(trailers),
                ]
                .into_iter(),
            )
        }
        _ => full(Bytes::from_static(b"unknown reflect form\n")),
    };
    resp.body(body)
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// Frames sent 30 ms apart, so each goes out (h1 chunk, h2 DATA) on its own.
fn streamed(frames: impl Iterator<Item = Frame<Bytes>> + Send + 'static) -> ReplyBody {
    use futures_util::StreamExt as _;
    let stream = futures_util::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, Infallible>(frame)
    });
    StreamBody::new(stream).boxed_unsync()
}

/// RFC 3986 percent-encoding (upper-case hex), unreserved characters kept.
pub fn percent_encode(v: &[u8]) -> String {
    let mut out = String::new();
    for &b in v {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn compress(coding: &str, plain: &[u8]) -> Vec<u8> {
    match coding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = e.write_all(plain);
            e.finish().unwrap_or_default()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = e.write_all(plain);
            e.finish().unwrap_or_default()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                let _ = e.write_all(plain);
            }
            out
        }
        // Not compressed: only the label matters to veil, which must refuse it.
        _ => plain.to_vec(),
    }
}

/// A sandbox's trust bundle for curl: veil's CA from a PUT answer plus the test CA (for the
/// upstreams a secretless or passthrough connection reaches directly).
#[derive(Debug)]
pub struct SandboxTrust {
    /// The PEM bundle.
    pub bundle: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SandboxTrust {
    /// Writes the bundle from a PUT /api/sandbox answer and `ca`.
    pub fn new(answer: &serde_json::Value, ca: &TestCa) -> SandboxTrust {
        let veil_ca = answer["caCertificate"]
            .as_str()
            .expect("PUT answer carries the CA");
        let test_ca = std::fs::read_to_string(ca.pem_path()).expect("test CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, format!("{veil_ca}\n{test_ca}")).expect("bundle");
        SandboxTrust { bundle, _dir: dir }
    }

    /// `curl` in `sb` trusting this bundle, sending `placeholder` as a bearer token to `url`;
    /// (HTTP status, 0 when none, and everything curl printed).
    pub fn curl(
        &self,
        sb: &crate::sandbox::Sandbox,
        placeholder: &str,
        url: &str,
        timeout: Duration,
    ) -> (u16, String) {
        let mut cmd = sb.command("sh");
        cmd.args([
            "-c",
            "curl -sS --max-time 20 --cacert \"$BUNDLE\" -H \"Authorization: Bearer $MY_KEY\" \
             -w '\\nstatus=%{http_code}\\n' \"$URL\"",
        ])
        .env("MY_KEY", placeholder)
        .env("BUNDLE", &self.bundle)
        .env("URL", url);
        let out = crate::cmd::output_within(&mut cmd, timeout);
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let status = text
            .lines()
            .find_map(|l| l.strip_prefix("status="))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        (status, text)
    }
}
