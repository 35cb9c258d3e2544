//! Upstream pools: per-sandbox, verified TLS connections to original destinations.
//!
//! Every upstream socket of a sandbox comes from its [`Connector`] (in the agent a
//! [`Dialer`]: inside its own netns for `egress: "sandbox"`, from the host through the egress
//! rules for `egress: "host"`), and always goes to the original destination the kernel
//! recorded, never to a DNS answer; TLS is verified for the SNI the client sent
//! ([`crate::tls::upstream`]). Pools are per sandbox and keyed by (original destination, SNI):
//! one [`SandboxUpstream`] holds one hyper client per (destination, protocol, SNI); the request
//! URI carries the client's own authority. The upstream is offered h2 only when the client
//! was, so each side speaks the same protocol (h1-only features such as Upgrade keep working).
//! TLS sessions that resume upstream handshakes are kept per sandbox too
//! ([`UpstreamConfigs::for_sandbox`]): never one sandbox's session for another's connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName as TlsName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::dialer::{Connector, Dialer, SocketPlace};
use crate::proxy::body::ProxyBody;
use crate::tls::upstream::{ALPN_H2, UpstreamConfigs};

/// How long an idle pooled upstream connection is kept.
const UPSTREAM_IDLE: Duration = Duration::from_secs(30);
/// How long a connection opened to learn the upstream's protocol waits for its first request.
const PARKED_FOR: Duration = Duration::from_secs(10);

/// A verified TLS connection to an original destination.
#[derive(Debug)]
pub struct UpstreamTls(TlsStream<TcpStream>);

impl UpstreamTls {
    /// Whether the upstream chose h2.
    pub fn is_h2(&self) -> bool {
        self.0.get_ref().1.alpn_protocol() == Some(ALPN_H2)
    }
}

impl Connection for UpstreamTls {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.is_h2() { c.negotiated_h2() } else { c }
    }
}

impl AsyncRead for UpstreamTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Opens a TCP connection to `dst` through `connector` and a TLS session verified for `sni`.
pub async fn connect_tls(
    config: &Arc<rustls::ClientConfig>,
    connector: &dyn Connector,
    dst: SocketAddr,
    sni: &str,
    timeout: Duration,
) -> io::Result<UpstreamTls> {
    let name = TlsName::try_from(sni.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let connect = async {
        let tcp = connector.connect(dst).await?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config.clone()).connect(name, tcp).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(r) => r.map(UpstreamTls),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {dst} timed out"),
        )),
    }
}

type Parked = Arc<Mutex<Vec<(Instant, UpstreamTls)>>>;

/// hyper's connector for one (original destination, SNI): the URI only names the authority
/// the request is for. It first takes a connection parked by [`SandboxUpstream::probe`], if a
/// fresh one is there.
#[derive(Clone, Debug)]
pub struct DstConnector {
    dst: SocketAddr,
    sni: Arc<str>,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
    parked: Parked,
    connector: Arc<dyn Connector>,
}

impl tower_service::Service<Uri> for DstConnector {
    type Response = TokioIo<UpstreamTls>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            if let Some(conn) = this.take_parked() {
                return Ok(TokioIo::new(conn));
            }
            connect_tls(
                &this.config,
                &*this.connector,
                this.dst,
                &this.sni,
                this.timeout,
            )
            .await
            .map(TokioIo::new)
        })
    }
}

impl DstConnector {
    fn take_parked(&self) -> Option<UpstreamTls> {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while let Some((at, conn)) = parked.pop() {
            if now.duration_since(at) < PARKED_FOR {
                return Some(conn);
            }
        }
        None
    }
}

/// A pooled client towards one (original destination, SNI).
pub type DstClient = Client<DstConnector, ProxyBody>;

#[derive(Debug)]
struct PerDst {
    client: DstClient,
    parked: Parked,
}

/// One SNI's pools, by (original destination, whether h2 may be used).
type PoolsBySni = HashMap<(SocketAddr, bool), PerDst>;

/// One sandbox's upstream connections (never shared with another sandbox), pooled by
/// (original destination, whether h2 may be used, SNI).
#[derive(Debug)]
pub struct SandboxUpstream {
    configs: UpstreamConfigs,
    timeout: Duration,
    /// What creates upstream sockets, where the sandbox's egress says.
    connector: Arc<dyn Connector>,
    /// SNI → (destination, h2) → pool. Keyed by SNI first so a connection looks its pool up
    /// by `&str`, without allocating a key.
    per_dst: Mutex<HashMap<String, PoolsBySni>>,
    /// SNI → destination → whether it speaks h2 when offered, learned by the first connection.
    h2: Mutex<HashMap<String, HashMap<SocketAddr, bool>>>,
}

/// What the first contact with an upstream taught.
#[derive(Debug)]
pub enum Probe {
    /// Verified; whether it speaks h2.
    Ready {
        /// The upstream chose h2.
        h2: bool,
    },
    /// Connecting or verifying failed.
    Failed(io::Error),
}

impl SandboxUpstream {
    /// An empty pool set whose sockets are opened at `place`.
    pub fn new(configs: UpstreamConfigs, timeout: Duration, place: &SocketPlace) -> Self {
        let dialer = Arc::new(Dialer::new(place, &configs.egress));
        Self::with_connector(configs, timeout, dialer)
    }

    /// An empty pool set whose sockets come from `connector`; its TLS session cache is its
    /// own (`configs` is the agent-wide template).
    pub fn with_connector(
        configs: UpstreamConfigs,
        timeout: Duration,
        connector: Arc<dyn Connector>,
    ) -> Self {
        Self {
            configs: configs.for_sandbox(),
            timeout,
            connector,
            per_dst: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
        }
    }

    /// What opens this sandbox's upstream sockets.
    pub fn connector(&self) -> &dyn Connector {
        &*self.connector
    }

    fn with_dst<T>(
        &self,
        dst: SocketAddr,
        h2: bool,
        sni: &str,
        f: impl FnOnce(&mut PerDst) -> T,
    ) -> T {
        let mut map = self.per_dst.lock().unwrap_or_else(|p| p.into_inner());
        let by_dst = match map.get_mut(sni) {
            Some(m) => m,
            None => map.entry(sni.to_owned()).or_default(),
        };
        let entry = by_dst.entry((dst, h2)).or_insert_with(|| {
            let parked: Parked = Arc::default();
            let connector = DstConnector {
                dst,
                sni: Arc::from(sni),
                config: if h2 {
                    self.configs.h2.clone()
                } else {
                    self.configs.h1.clone()
                },
                timeout: self.timeout,
                parked: parked.clone(),
                connector: self.connector.clone(),
            };
            let mut builder = Client::builder(TokioExecutor::new());
            // Without a timer hyper only drops idle connections when the pool is next used:
            // a sandbox that stops talking to a host would keep its upstream sockets forever.
            // The timer sweeps once per timeout, so an idle connection lives up to twice this.
            builder
                .pool_idle_timeout(UPSTREAM_IDLE)
                .pool_timer(hyper_util::rt::TokioTimer::new());
            PerDst {
                client: builder.build(connector),
                parked,
            }
        });
        f(entry)
    }

    /// The pooled client for (`dst`, `sni`), speaking h2 upstream when `h2` (and the upstream
    /// agrees).
    pub fn client(&self, dst: SocketAddr, h2: bool, sni: &str) -> DstClient {
        self.with_dst(dst, h2, sni, |d| d.client.clone())
    }

    /// Whether (dst, sni) speaks h2; `None` until a connection told.
    pub fn known_h2(&self, dst: SocketAddr, sni: &str) -> Option<bool> {
        let map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        map.get(sni).and_then(|by_dst| by_dst.get(&dst)).copied()
    }

    /// Connects to (dst, sni) offering h2 to learn its protocol before the client's handshake
    /// is answered; the connection is parked for the pool that will use it, so it serves the
    /// first request instead of being wasted.
    pub async fn probe(&self, dst: SocketAddr, sni: &str) -> Probe {
        match connect_tls(&self.configs.h2, &*self.connector, dst, sni, self.timeout).await {
            Ok(conn) => {
                let h2 = conn.is_h2();
                self.h2
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(sni.to_owned())
                    .or_default()
                    .insert(dst, h2);
                self.with_dst(dst, h2, sni, |d| {
                    let mut parked = d.parked.lock().unwrap_or_else(|p| p.into_inner());
                    parked.push((Instant::now(), conn));
                });
                Probe::Ready { h2 }
            }
            Err(e) => Probe::Failed(e),
        }
    }
}
