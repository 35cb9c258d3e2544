//! Upstream TLS trust: the roots veil verifies original destinations against, the client
//! configs built on them, and what a verification failure says.
//!
//! Roots are the system bundle ([`crate::config::SYSTEM_ROOTS`]) plus every `--upstream-ca`
//! PEM. A connection is verified for the SNI the client sent, never for the IP it goes to (the
//! pools that open them are in [`crate::proxy::upstream`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::dialer::EgressGuard;

/// ALPN identifier of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN identifier of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// TLS sessions one sandbox keeps for resuming upstream handshakes (rustls keys them by server
/// name, a few per name).
pub const SANDBOX_UPSTREAM_SESSIONS: usize = 256;

/// Why the upstream trust could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    /// A PEM file could not be read or holds no certificate.
    #[error("upstream CA {path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The rustls crypto provider every config of the agent uses (explicit: the build may link
/// more than one provider).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The upstream client configs: system roots (when the bundle exists) plus `extra` PEMs; one
/// offers http/1.1 only, the other h2 and http/1.1. `egress` guards `egress: "host"` sandboxes.
pub fn client_configs(
    system: Option<&Path>,
    extra: &[PathBuf],
    egress: Arc<EgressGuard>,
) -> Result<UpstreamConfigs, RootsError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(system) = system
        && system.exists()
    {
        let certs = read_pem(system)?;
        // A few odd entries in a distribution bundle must not stop the agent.
        roots.add_parsable_certificates(certs);
    }
    for path in extra {
        for cert in read_pem(path)? {
            roots.add(cert).map_err(|e| RootsError::Pem {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
    }
    let mut h1 = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut h2 = h1.clone();
    h1.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    h2.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(UpstreamConfigs {
        h1: Arc::new(h1),
        h2: Arc::new(h2),
        egress,
    })
}

impl UpstreamConfigs {
    /// The same configs with a session cache of their own, for one sandbox: a session one
    /// sandbox's connection got from an upstream never resumes another sandbox's connection
    /// (the cache is per sandbox and server name, like the pools). h1 and h2 share it, so the
    /// h2-offering probe's session serves an h1-only pool too. Never early data.
    pub fn for_sandbox(&self) -> UpstreamConfigs {
        let store = Arc::new(rustls::client::ClientSessionMemoryCache::new(
            SANDBOX_UPSTREAM_SESSIONS,
        ));
        let resumption = rustls::client::Resumption::store(store);
        let own = |shared: &Arc<rustls::ClientConfig>| {
            let mut c = rustls::ClientConfig::clone(shared);
            c.resumption = resumption.clone();
            c.enable_early_data = false;
            Arc::new(c)
        };
        UpstreamConfigs {
            h1: own(&self.h1),
            h2: own(&self.h2),
            egress: self.egress.clone(),
        }
    }
}

/// How upstream connections are made: TLS configs by what the client may be offered, and the
/// egress rules of `egress: "host"` sandboxes. The agent-wide value is a template: each
/// sandbox uses [`UpstreamConfigs::for_sandbox`].
#[derive(Debug, Clone)]
pub struct UpstreamConfigs {
    /// ALPN http/1.1 only.
    pub h1: Arc<rustls::ClientConfig>,
    /// ALPN h2, http/1.1.
    pub h2: Arc<rustls::ClientConfig>,
    /// Egress rules (shared by every sandbox with `egress: "host"`).
    pub egress: Arc<EgressGuard>,
}

fn read_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, RootsError> {
    let err = |message: String| RootsError::Pem {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The certificate-verification failure inside an error chain, as text (names no value).
pub fn verify_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = inner.downcast_ref::<rustls::Error>()
            && let rustls::Error::InvalidCertificate(reason) = tls
        {
            return Some(format!("certificate verification failed: {reason:?}"));
        }
        if let Some(rustls::Error::InvalidCertificate(reason)) = e.downcast_ref::<rustls::Error>() {
            return Some(format!("certificate verification failed: {reason:?}"));
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_ca_must_be_a_pem_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a pem").unwrap();
        let egress = Arc::new(EgressGuard::new(
            crate::egress::EgressRules::default(),
            Arc::default(),
        ));
        let e = client_configs(None, std::slice::from_ref(&bad), egress.clone()).unwrap_err();
        assert!(e.to_string().contains("bad.pem"), "{e}");
        assert!(client_configs(None, &[dir.path().join("missing.pem")], egress.clone()).is_err());
        let c = client_configs(Some(Path::new(crate::config::SYSTEM_ROOTS)), &[], egress).unwrap();
        assert_eq!(c.h1.alpn_protocols, [ALPN_HTTP11.to_vec()]);
    }

    fn configs() -> UpstreamConfigs {
        let egress = Arc::new(EgressGuard::new(
            crate::egress::EgressRules::default(),
            Arc::default(),
        ));
        client_configs(None, &[], egress).unwrap()
    }

    #[test]
    fn no_early_data_towards_upstreams() {
        let shared = configs();
        let sandbox = shared.for_sandbox();
        for c in [&shared.h1, &shared.h2, &sandbox.h1, &sandbox.h2] {
            assert!(
                !c.enable_early_data,
                "0-RTT would let a replayed request out"
            );
        }
    }

    #[test]
    fn a_sandbox_config_keeps_trust_and_alpn() {
        let shared = configs();
        let a = shared.for_sandbox();
        assert_eq!(a.h1.alpn_protocols, [ALPN_HTTP11.to_vec()]);
        assert_eq!(
            a.h2.alpn_protocols,
            [ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
        );
        assert!(Arc::ptr_eq(&a.egress, &shared.egress));
        assert!(!Arc::ptr_eq(&a.h2, &shared.h2));
    }
}
