//! The client-facing TLS of interception: server configs that answer a sandbox's hello with a
//! leaf for its SNI, offering h2 or only http/1.1.

use std::sync::Arc;

use rustls::ServerConfig;

use crate::tls::leaf::{LeafCache, LeafResolver};
use crate::tls::upstream::{ALPN_H2, ALPN_HTTP11, UpstreamConfigs, provider};

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
}
