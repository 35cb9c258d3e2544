//! The client-facing TLS of interception: server configs that answer a sandbox's hello with a
//! leaf for its SNI, offering h2 or only http/1.1.
//!
//! Sandbox clients may resume their TLS sessions (TLS 1.3 tickets, TLS 1.2 session ids): a
//! resumed handshake skips the leaf's signature. The tickets are stateful — an id into a
//! session cache, single use — and the cache is each sandbox's own ([`TlsContext::for_sandbox`]),
//! so a ticket one sandbox's client got never resumes a session in another sandbox. No early
//! data (0-RTT): a replayed request would reach the upstream twice.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::ServerSessionMemoryCache;

use crate::tls::leaf::{LeafCache, LeafResolver};
use crate::tls::upstream::{ALPN_H2, ALPN_HTTP11, UpstreamConfigs, provider};

/// Sessions one sandbox's clients may resume (each full handshake stores up to
/// `send_tls13_tickets` of them; a resumption consumes one and stores new ones).
pub const SANDBOX_CLIENT_SESSIONS: usize = 256;

/// One sandbox's client-facing configs: the agent's, with a session cache of its own.
#[derive(Debug, Clone)]
pub struct SandboxServers {
    /// Offering h2 and http/1.1.
    pub h2: Arc<ServerConfig>,
    /// Offering http/1.1 only.
    pub h1: Arc<ServerConfig>,
}

/// The TLS material interception needs, built once per agent.
#[derive(Debug)]
pub struct TlsContext {
    /// Leaf certificates by SNI.
    pub leaves: Arc<LeafCache>,
    /// Client-side config offering h2 and http/1.1.
    pub server_h2: Arc<ServerConfig>,
    /// Client-side config offering http/1.1 only.
    pub server_h1: Arc<ServerConfig>,
    /// Upstream configs (roots, ALPN).
    pub upstream: UpstreamConfigs,
}

impl TlsContext {
    /// Builds the server configs over `leaves`.
    pub fn new(leaves: Arc<LeafCache>, upstream: UpstreamConfigs) -> Result<Self, rustls::Error> {
        let mut h1 = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LeafResolver(leaves.clone())));
        let mut h2 = h1.clone();
        h1.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        h2.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Ok(Self {
            leaves,
            server_h2: Arc::new(h2),
            server_h1: Arc::new(h1),
            upstream,
        })
    }

    /// The server configs of one sandbox: the agent's, with a session cache the two share
    /// and no other sandbox sees.
    pub fn for_sandbox(&self) -> SandboxServers {
        let cache = ServerSessionMemoryCache::new(SANDBOX_CLIENT_SESSIONS);
        let own = |shared: &Arc<ServerConfig>| {
            let mut c = ServerConfig::clone(shared);
            c.session_storage = cache.clone();
            c.max_early_data_size = 0;
            Arc::new(c)
        };
        SandboxServers {
            h2: own(&self.server_h2),
            h1: own(&self.server_h1),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests may unwrap")]
mod tests {
    use super::*;
    use crate::dialer::EgressGuard;
    use crate::tls::ca::InterceptionCa;

    fn context() -> (tempfile::TempDir, TlsContext) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(InterceptionCa::load_or_create(dir.path(), "t").unwrap());
        let egress = Arc::new(EgressGuard::new(
            crate::egress::EgressRules::default(),
            Arc::default(),
        ));
        let upstream = crate::tls::upstream::client_configs(None, &[], egress).unwrap();
        let tls = TlsContext::new(Arc::new(LeafCache::new(ca, 4)), upstream).unwrap();
        (dir, tls)
    }

    fn same<T: ?Sized>(a: &Arc<T>, b: &Arc<T>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
    }

    #[test]
    fn no_early_data_from_sandbox_clients() {
        let (_dir, tls) = context();
        let a = tls.for_sandbox();
        for c in [&tls.server_h1, &tls.server_h2, &a.h1, &a.h2] {
            assert_eq!(
                c.max_early_data_size, 0,
                "0-RTT would let a replayed request out"
            );
        }
    }

    #[test]
    fn each_sandbox_has_its_own_session_cache() {
        let (_dir, tls) = context();
        let (a, b) = (tls.for_sandbox(), tls.for_sandbox());
        assert!(same(&a.h1.session_storage, &a.h2.session_storage));
        assert!(!same(&a.h2.session_storage, &b.h2.session_storage));
        assert!(!same(&a.h2.session_storage, &tls.server_h2.session_storage));
        assert_eq!(a.h1.alpn_protocols, tls.server_h1.alpn_protocols);
        assert_eq!(a.h2.alpn_protocols, tls.server_h2.alpn_protocols);
        // Stateful tickets: an id into the sandbox's own cache, never a sealed session that
        // any sandbox's listener would open.
        assert!(!a.h2.ticketer.enabled());
    }
}
