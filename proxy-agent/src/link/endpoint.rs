//! Where the link reaches control: the local socket (single host, peer checked by uid), or the
//! fleet's replicas over mutual TLS 1.3 (the agent presents its host certificate and verifies
//! the replica's certificate against `control_ca` for the name in the URL), tried in order.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

use super::error::LinkError;

/// A connected stream to control, whatever the transport.
pub trait ControlStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ControlStream for T {}

/// How the agent reaches control.
#[derive(Clone)]
pub enum Endpoint {
    /// veil-control's local socket.
    Local(PathBuf),
    /// Replicas over mutual TLS, in failover order.
    Fleet {
        /// `host:port` of each replica.
        urls: Vec<String>,
        /// The agent's client configuration (host certificate, `control_ca` as the only root).
        tls: Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Local(p) => f.debug_tuple("Local").field(p).finish(),
            Endpoint::Fleet { urls, .. } => f.debug_struct("Fleet").field("urls", urls).finish(),
        }
    }
}

/// Why the fleet TLS settings are unusable (names the file, never its content).
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {detail}")]
pub struct TlsSetupError {
    what: &'static str,
    path: PathBuf,
    detail: String,
}

/// Control may run as root or as the agent's own user; nobody else may steer the agent.
pub fn trusted_peer(peer_uid: u32, own_euid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_euid
}

/// Splits `host:port` (`[v6]:port` too) into the TLS server name and the port.
pub fn split_url(url: &str) -> Result<(String, u16), String> {
    let (host, port) = url
        .rsplit_once(':')
        .ok_or_else(|| format!("control_urls entry {url:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("control_urls entry {url:?} has no valid port"))?;
    if host.is_empty() || ServerName::try_from(host.to_owned()).is_err() {
        return Err(format!("control_urls entry {url:?} has no valid host name"));
    }
    Ok((host.to_owned(), port))
}

/// The agent's TLS client: TLS 1.3 only, `ca` the only trusted root, `cert`/`key` presented.
pub fn client_config(
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let err = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |e: &dyn std::fmt::Display| TlsSetupError {
            what,
            path,
            detail: e.to_string(),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| err("reading control_ca", ca)(&e))? {
        let c = c.map_err(|e| err("parsing control_ca", ca)(&e))?;
        roots.add(c).map_err(|e| err("adding control_ca", ca)(&e))?;
    }
    if roots.is_empty() {
        return Err(err("control_ca", ca)(&"no certificate in it"));
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err("reading control_cert", cert)(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("parsing control_cert", cert)(&e))?;
    if chain.is_empty() {
        return Err(err("control_cert", cert)(&"no certificate in it"));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| err("reading control_key", key)(&e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err("TLS", cert)(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| err("control_cert/control_key", cert)(&e))
}

impl Endpoint {
    /// How many places there are to try (one per replica).
    pub fn len(&self) -> usize {
        match self {
            Endpoint::Local(_) => 1,
            Endpoint::Fleet { urls, .. } => urls.len().max(1),
        }
    }

    /// Whether there is nowhere to connect (never, once configured).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connects to place `index` (modulo [`Self::len`]); returns the stream and its name.
    pub async fn connect(
        &self,
        index: usize,
    ) -> Result<(Box<dyn ControlStream>, String), LinkError> {
        match self {
            Endpoint::Local(path) => {
                let connect_err = |source: io::Error| LinkError::Connect {
                    path: path.clone(),
                    source,
                };
                let stream = UnixStream::connect(path).await.map_err(connect_err)?;
                let uid = stream.peer_cred().map_err(connect_err)?.uid();
                if !trusted_peer(uid, nix::unistd::geteuid().as_raw()) {
                    return Err(LinkError::UntrustedPeer(uid));
                }
                Ok((Box::new(stream), path.display().to_string()))
            }
            Endpoint::Fleet { urls, tls } => {
                let url = &urls[index % urls.len()];
                let connect_err = |source: io::Error| LinkError::Connect {
                    path: PathBuf::from(url),
                    source,
                };
                let (host, _) = split_url(url)
                    .map_err(|e| connect_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
                let name = ServerName::try_from(host).map_err(|e| {
                    connect_err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
                })?;
                let tcp = TcpStream::connect(url.as_str())
                    .await
                    .map_err(connect_err)?;
                let _ = tcp.set_nodelay(true);
                let stream = TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|source| LinkError::Tls {
                        url: url.clone(),
                        source,
                    })?;
                Ok((Box::new(stream), url.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("c1.example:3901").unwrap(),
            ("c1.example".into(), 3901)
        );
        assert_eq!(split_url("10.0.0.1:1").unwrap(), ("10.0.0.1".into(), 1));
        assert_eq!(split_url("[::1]:3901").unwrap(), ("::1".into(), 3901));
        for bad in ["c1", "c1:0", "c1:x", ":3901", "a b:1"] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }
}
