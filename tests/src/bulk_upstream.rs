//! A bulk-transfer upstream (h2 and http/1.1 by ALPN) for the large-transfer scenarios (issue
//! 20): `GET /download?n=N` streams N bytes of [`pattern`] in 64 KiB chunks; `POST /upload`
//! streams the request body through SHA-256 and answers `<length> <sha256 hex>`. Neither holds
//! a transfer in memory, so what the agent holds is what a test measures.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use sha2::{Digest, Sha256};
use tokio_util::sync::DropGuard;

use crate::https::{TestCa, serve_tls, tls_acceptor};
use crate::intercept_world::Upstream;
use crate::netns::NetNs;

/// Bytes per streamed chunk.
pub const CHUNK: usize = 64 * 1024;

/// Chunk `i` of the deterministic, incompressible download (xorshift of the chunk index).
pub fn pattern(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The upstream; stops on drop.
pub struct BulkUpstream {
    addr: SocketAddr,
    _stop: DropGuard,
}

impl std::fmt::Debug for BulkUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Upstream for BulkUpstream {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl BulkUpstream {
    /// Serves TLS for `names` (certificate from `ca`) on `ip`:0 in `ns`.
    pub fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa, names: &[&str]) -> Self {
        let acceptor = tls_acceptor(ca, names, &[b"h2", b"http/1.1"]);
        let handler = |req: Request<Incoming>| async move {
            if req.uri().path() == "/upload" {
                let mut body = req.into_body();
                let (mut hash, mut len) = (Sha256::new(), 0u64);
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame?.into_data() {
                        len += data.len() as u64;
                        hash.update(&data);
                    }
                }
                let answer = format!("{len} {}", hex::encode(hash.finalize()));
                return Ok::<Response<Body>, hyper::Error>(Response::new(
                    Full::new(Bytes::from(answer)).boxed_unsync(),
                ));
            }
            let n: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let chunks = n.div_ceil(CHUNK as u64);
            let stream = futures_util::stream::iter((0..chunks).map(move |i| {
                let mut c = pattern(i);
                let left = n - i * CHUNK as u64;
                c.truncate(usize::try_from(left).unwrap_or(CHUNK).min(CHUNK));
                Ok::<_, Infallible>(Frame::data(Bytes::from(c)))
            }));
            let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/octet-stream"),
            );
            Ok(resp)
        };
        let (addr, stop) = serve_tls(ns, ip, "bulk upstream", acceptor, handler);
        BulkUpstream { addr, _stop: stop }
    }
}
