//! An in-process world for the connection path: the kernel's records in memory, upstream
//! sockets on loopback behind a [`Connector`], TLS from test CAs. No root, no eBPF, no netns:
//! everything else — accept loop, identify, peek, decide, intercept, forward, scrub, splice —
//! is the agent's own code.
#![allow(clippy::unwrap_used, reason = "tests may unwrap")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName as TlsName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use veil_link::{Egress, SandboxState, SecretState, SecretValue};

use crate::bpf::{BpfError, ConnTuple, Recorded};
use crate::config::{AgentSettings, SandboxId, SandboxSpec};
use crate::dialer::{ConnectFuture, Connector, DialError, EgressGuard};
use crate::proxy::context::{Proxy, SandboxTag};
use crate::proxy::identify::OriginTable;
use crate::proxy::upstream::SandboxUpstream;
use crate::secrets::SecretStore;
use crate::stats::Stats;
use crate::tls::ca::InterceptionCa;
use crate::tls::leaf::LeafCache;
use crate::tls::server::TlsContext;
use crate::tls::upstream::{ALPN_H2, ALPN_HTTP11, UpstreamConfigs, provider};

/// The sandbox's cgroup id (what its records name) and another sandbox's.
pub const CGROUP: u64 = 10;
pub const OTHER_CGROUP: u64 = 20;
const NETNS_COOKIE: u64 = 7;
/// The host a secret allows, and one it does not.
pub const ALLOWED: &str = "api.allowed.test";
pub const OTHER: &str = "other.test";
pub const PLACEHOLDER: &str = "veil_ph_0123456789";
pub const VALUE: &str = "sk-real-value-0123456789";

/// The kernel's original-destination records, in memory.
#[derive(Debug, Default)]
pub struct Records(Mutex<HashMap<ConnTuple, Recorded>>);

impl Records {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnTuple, Recorded>> {
        self.0.lock().unwrap()
    }

    /// How many records are left.
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

impl OriginTable for Records {
    fn take(&self, conn: &ConnTuple) -> Result<Option<Recorded>, BpfError> {
        Ok(self.lock().remove(conn))
    }

    fn forget_listener(&self, netns_cookie: u64, listener: SocketAddr) -> Result<usize, BpfError> {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|k, _| !(k.netns_cookie == netns_cookie && k.listener == listener));
        Ok(before - map.len())
    }
}

/// Opens every upstream socket on loopback: an original destination is routed to the
/// in-process server standing for it. Counts what it was asked for.
#[derive(Debug, Default)]
pub struct Loopback {
    routes: Mutex<HashMap<SocketAddr, SocketAddr>>,
    dials: AtomicUsize,
}

impl Loopback {
    /// How many connections were opened.
    pub fn dials(&self) -> usize {
        self.dials.load(Ordering::SeqCst)
    }
}

impl Connector for Loopback {
    fn connect(&self, dst: SocketAddr) -> ConnectFuture<'_> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        let to = self.routes.lock().unwrap().get(&dst).copied();
        Box::pin(async move {
            let to = to.ok_or_else(|| {
                DialError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            })?;
            Ok(TcpStream::connect(to).await?)
        })
    }
}

/// What an upstream saw of one request.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The `x-key` header.
    pub key: String,
    /// The protocol it was spoken in.
    pub h2: bool,
}

/// A CA of the test world, issuing leaves.
pub struct TestCa {
    ca: Arc<InterceptionCa>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(InterceptionCa::load_or_create(dir.path(), "test").unwrap());
        Self { ca, _dir: dir }
    }

    pub fn root(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.ca.cert_pem().as_bytes()).unwrap()
    }

    fn leaf(&self, name: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &self.ca.issuer().unwrap())
            .unwrap();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![cert.der().clone()], key)
    }
}

/// A rustls client config trusting `root`, offering `alpn`.
pub fn client_config(root: CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// An HTTPS upstream for `name` with a leaf from `ca`, speaking h2 or http/1.1 as the client
/// offers; answers `you sent <x-key>` and logs what it saw.
pub async fn https_upstream(ca: &TestCa, name: &str, seen: Arc<Mutex<Vec<Seen>>>) -> SocketAddr {
    let (chain, key) = ca.leaf(name);
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let key = req
                        .headers()
                        .get("x-key")
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    seen.lock().unwrap().push(Seen {
                        key: key.clone(),
                        h2,
                    });
                    async move {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "you sent {key}"
                        )))))
                    }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    addr
}

/// A TCP upstream that echoes every byte back until the client closes.
pub async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// One sandbox served by the agent's connection path, in-process.
pub struct World {
    pub proxy: Arc<Proxy>,
    pub records: Arc<Records>,
    pub connector: Arc<Loopback>,
    pub listener: SocketAddr,
    /// Veil's interception CA (what sandboxes trust).
    pub veil_ca: TestCa,
    /// The CA upstreams' leaves come from (what veil trusts).
    pub upstream_ca: TestCa,
    cancel: CancellationToken,
}

impl Drop for World {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl World {
    /// A sandbox holding the secret `PLACEHOLDER` → `VALUE` for `ALLOWED` (or no secret), each
    /// allowed at most `max_connections` connections at once.
    pub async fn new(with_secret: bool, max_connections: usize) -> Self {
        let veil_ca = TestCa::new();
        let upstream_ca = TestCa::new();
        let stats = Arc::new(Stats::default());
        let settings = AgentSettings::default();
        let mut limits = settings.request_limits();
        limits.max_connections_per_sandbox = max_connections;
        let upstream = |alpn: &[&[u8]]| client_config(upstream_ca.root(), alpn);
        let configs = UpstreamConfigs {
            h1: upstream(&[ALPN_HTTP11]),
            h2: upstream(&[ALPN_H2, ALPN_HTTP11]),
            egress: Arc::new(EgressGuard::new(Default::default(), stats.clone())),
        };
        let leaves = Arc::new(LeafCache::new(veil_ca.ca.clone(), 16));
        let tls = TlsContext::new(leaves, configs.clone()).unwrap();
        let secrets = SecretStore::with_overrides(limits.overrides);
        let records = Arc::new(Records::default());
        let proxy = Arc::new(Proxy {
            orig: records.clone(),
            stats,
            tracker: TaskTracker::new(),
            connect_timeout: Duration::from_secs(5),
            peek_timeout: Duration::from_secs(5),
            scrub_responses: true,
            secrets: secrets.clone(),
            tls: Arc::new(tls),
            limits,
        });
        let spec = SandboxSpec {
            id: SandboxId::try_from("sb1".to_owned()).unwrap(),
            org: "o1".parse().unwrap(),
            cgroup: "/sys/fs/cgroup/sb1".into(),
            netns: None,
            egress: Egress::Sandbox,
        };
        if with_secret {
            secrets.put_secret(SecretState {
                id: "sec_1".parse().unwrap(),
                org: "o1".parse().unwrap(),
                name: "KEY".into(),
                placeholder: PLACEHOLDER.into(),
                hosts: vec![ALLOWED.into()],
                value: SecretValue::new(VALUE.into()),
                revision: 1.into(),
                body_substitution: false,
                wrong_host: Default::default(),
                previous: Vec::new(),
                retired: false,
            });
        }
        secrets.put_sandbox(&SandboxState {
            id: "sb1".parse().unwrap(),
            org: "o1".parse().unwrap(),
            cgroup: "/sys/fs/cgroup/sb1".into(),
            netns: None,
            mounts: [("KEY".to_owned(), "sec_1".parse().unwrap())].into(),
            egress: Egress::Sandbox,
            cgroup_id: None,
        });
        let connector = Arc::new(Loopback::default());
        let pools =
            SandboxUpstream::with_connector(configs, proxy.connect_timeout, connector.clone());
        let tag = Arc::new(SandboxTag::with_upstream(
            &spec,
            CGROUP,
            NETNS_COOKIE,
            &proxy,
            pools,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(crate::proxy::serve(
            proxy.clone(),
            tag,
            listener,
            cancel.clone(),
        ));
        Self {
            proxy,
            records,
            connector,
            listener: addr,
            veil_ca,
            upstream_ca,
            cancel,
        }
    }

    /// Routes the original destination `dst` to the in-process server at `to`.
    pub fn route(&self, dst: SocketAddr, to: SocketAddr) {
        self.connector.routes.lock().unwrap().insert(dst, to);
    }

    /// A connection from the sandbox to `dst`, as the kernel would redirect it: recorded for
    /// the sandbox with cgroup id `cgroup`, then connected to the sandbox's listener.
    pub async fn dial(&self, dst: SocketAddr, cgroup: u64) -> (TcpStream, ConnTuple) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let conn = ConnTuple {
            netns_cookie: NETNS_COOKIE,
            listener: self.listener,
            peer: socket.local_addr().unwrap(),
        };
        self.records.lock().insert(
            conn,
            Recorded {
                dst,
                cgroup_id: cgroup,
            },
        );
        (socket.connect(self.listener).await.unwrap(), conn)
    }

    /// Whether the record of `conn` is still there.
    pub fn recorded(&self, conn: &ConnTuple) -> bool {
        self.records.lock().contains_key(conn)
    }

    /// A TLS session for `sni` over `tcp`, trusting `root`, offering `alpn`.
    pub async fn tls(
        tcp: TcpStream,
        root: CertificateDer<'static>,
        sni: &str,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = TlsName::try_from(sni.to_owned()).unwrap();
        TlsConnector::from(client_config(root, alpn))
            .connect(name, tcp)
            .await
    }

    /// Waits until `cond` holds (the agent counts asynchronously).
    pub async fn until(&self, what: &str, cond: impl Fn(&Stats) -> bool) {
        for _ in 0..500 {
            if cond(&self.proxy.stats) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }
}

/// Sends one GET with `host` and `x-key` over `io`, in h2 or HTTP/1.1; the status and body.
pub async fn get<S>(io: S, h2: bool, host: &str, key: &str) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let req = |uri: String| {
        Request::get(uri)
            .header("x-key", key)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req(format!("https://{host}/v1")))
            .await
            .unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut r = req("/v1".into());
        r.headers_mut().insert("host", host.parse().unwrap());
        send.send_request(r).await.unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
