//! `[fleet] agent_listen`: a TCP listener where agents of enrolled hosts connect over mutual
//! TLS 1.3. The handshake requires a client certificate chaining to the fleet CA and valid
//! now; the connection is then admitted only if that exact certificate (its SHA-256) is the
//! current enrollment of a host that is not revoked, and that host becomes the connection's
//! identity. A watcher re-reads the enrollments every [`RECHECK`] and drops every connection
//! whose host was revoked, re-enrolled or whose certificate expired.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::ca::{FleetCa, fingerprint};
use crate::agent_link::server::{AgentServer, Peer};
use crate::store::Store;
use crate::store::fleet::HostRecord;
use crate::timefmt::now_ms;

/// How often the enrollments of connected hosts are re-read (revocation takes effect within
/// this plus a read: the goal is 2 s).
pub const RECHECK: Duration = Duration::from_millis(500);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the fleet listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The TLS configuration could not be built.
    #[error("fleet TLS: {0}")]
    Tls(String),
    /// The address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// The server side's TLS: TLS 1.3 only, client certificates required and verified against
/// the fleet CA, a server certificate for `names` issued by the fleet CA at start.
pub fn server_config(ca: &FleetCa, names: &[String]) -> Result<rustls::ServerConfig, ListenError> {
    let tls = |e: &dyn std::fmt::Display| ListenError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).map_err(|e| tls(&e))?;
    roots.add(ca_der.clone()).map_err(|e| tls(&e))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls(&e))?;
    let issued = ca.issue_server(names).map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).map_err(|e| tls(&e))?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![CertificateDer::from(issued.cert_der), ca_der], key)
        .map_err(|e| tls(&e))
}

/// One admitted connection: its host, its certificate and how to stop it.
struct Admitted {
    host: String,
    cert_sha256: String,
    stop: watch::Sender<bool>,
}

/// The connections this replica admitted, by connection number.
#[derive(Default)]
struct Connections {
    next: u64,
    live: HashMap<u64, Admitted>,
}

/// Why an enrollment no longer admits a certificate; `None` = it does.
pub fn refusal(host: Option<&HostRecord>, cert_sha256: &str, now: i64) -> Option<&'static str> {
    match host {
        None => Some("no enrolled host has this certificate"),
        Some(h) if h.revoked_at.is_some() => Some("host revoked"),
        Some(h) if h.cert_sha256 != cert_sha256 => Some("certificate replaced by a new enrollment"),
        Some(h) if h.not_after <= now => Some("certificate expired"),
        Some(_) => None,
    }
}

/// Binds `addr` and serves agents of enrolled hosts into `server` until aborted.
pub async fn serve(
    addr: SocketAddr,
    config: rustls::ServerConfig,
    server: AgentServer,
    store: Arc<dyn Store>,
    replica: String,
) -> Result<(SocketAddr, JoinHandle<()>), ListenError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ListenError::Bind { addr, source })?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let conns = Arc::new(Mutex::new(Connections::default()));
    let watcher = tokio::spawn(watch_enrollments(store.clone(), conns.clone()));
    let task = tokio::spawn(async move {
        let _watcher = AbortOnDrop(watcher);
        loop {
            match listener.accept().await {
                Ok((tcp, from)) => {
                    let (acceptor, server, store, conns, replica) = (
                        acceptor.clone(),
                        server.clone(),
                        store.clone(),
                        conns.clone(),
                        replica.clone(),
                    );
                    tokio::spawn(async move {
                        serve_one(tcp, from, acceptor, server, store, conns, replica).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a fleet connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    tracing::info!(listen = %local, "fleet agent link listening (mutual TLS)");
    Ok((local, task))
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn lock(conns: &Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    conns
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn serve_one(
    tcp: TcpStream,
    from: SocketAddr,
    acceptor: TlsAcceptor,
    server: AgentServer,
    store: Arc<dyn Store>,
    conns: Arc<Mutex<Connections>>,
    replica: String,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(%from, error = %e, "refused fleet connection: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(%from, "refused fleet connection: no TLS handshake in time");
            return;
        }
    };
    let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        tracing::warn!(%from, "refused fleet connection: no client certificate");
        return;
    };
    let cert_sha256 = fingerprint(cert.as_ref());
    let (s, fp) = (store.clone(), cert_sha256.clone());
    let found = tokio::task::spawn_blocking(move || {
        let fleet = s
            .fleet()
            .ok_or_else(|| "the store keeps no fleet".to_owned())?;
        fleet.host_with_cert(&fp).map_err(|e| e.to_string())
    })
    .await;
    let host = match found {
        Ok(Ok(host)) => host,
        Ok(Err(e)) => {
            tracing::warn!(%from, error = %e, "refused fleet connection: cannot read the enrollments");
            return;
        }
        Err(e) => {
            tracing::warn!(%from, error = %e, "refused fleet connection: store task failed");
            return;
        }
    };
    if let Some(why) = refusal(host.as_ref(), &cert_sha256, now_ms()) {
        tracing::warn!(%from, host = host.as_ref().map(|h| h.name.as_str()), why, "refused fleet connection");
        return;
    }
    let Some(host) = host else { return };
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let id = {
        let mut c = lock(&conns);
        let id = c.next;
        c.next += 1;
        c.live.insert(
            id,
            Admitted {
                host: host.name.clone(),
                cert_sha256,
                stop: stop_tx,
            },
        );
        id
    };
    tracing::info!(%from, host = %host.name, "fleet host connected");
    let stop = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    let peer = Peer::Host {
        name: host.name.clone(),
        replica,
    };
    server.serve_link(tls, peer, stop).await;
    lock(&conns).live.remove(&id);
}

/// Re-reads the enrollments of connected hosts and stops the connections they no longer admit.
async fn watch_enrollments(store: Arc<dyn Store>, conns: Arc<Mutex<Connections>>) {
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if lock(&conns).live.is_empty() {
            continue;
        }
        let s = store.clone();
        let hosts = tokio::task::spawn_blocking(move || s.fleet().map(|f| f.hosts())).await;
        let hosts = match hosts {
            Ok(Some(Ok(hosts))) => hosts,
            Ok(Some(Err(e))) => {
                // The database being away revokes nobody: connected hosts keep their state.
                tracing::warn!(error = %e, "re-reading the fleet enrollments");
                continue;
            }
            _ => continue,
        };
        let by_name: HashMap<&str, &HostRecord> =
            hosts.iter().map(|h| (h.name.as_str(), h)).collect();
        let now = now_ms();
        for c in lock(&conns).live.values() {
            if let Some(why) = refusal(by_name.get(c.host.as_str()).copied(), &c.cert_sha256, now)
                && !*c.stop.borrow()
            {
                tracing::warn!(host = %c.host, why, "dropping a fleet connection");
                let _ = c.stop.send(true);
            }
        }
    }
}
