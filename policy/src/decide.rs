//! The intercept decision: for a sandbox and a ClientHello, intercept or pass through.
//!
//! A sandbox's [`Interception`] is precomputed with its [`crate::SandboxPolicy`] (from its
//! mounted secrets and the agent's [`crate::ModeOverrides`]) and consulted per connection;
//! deciding does not allocate, and an intercept decision hands on the hello's server name.
//!
//! Rules, in order:
//! 1. no secret mounted → passthrough;
//! 2. no valid SNI → passthrough (nothing can be proven about the peer);
//! 3. an ALPN list that offers neither `h2` nor `http/1.1` → passthrough (veil only speaks HTTP;
//!    this also covers host-restricted secrets, whose hosts may serve other protocols);
//! 4. a host-restricted secret allows the SNI → intercept (with or without ALPN);
//! 5. an unrestricted secret is mounted, or a secret that blocks hosts it does not allow
//!    ([`WrongHost::Block`](veil_link::proto::WrongHost::Block), by its own field or the agent's
//!    overrides), and the client offers `h2` or `http/1.1` by ALPN → intercept; without ALPN →
//!    passthrough (unknown protocol to an arbitrary host). A placeholder sent to a wrong host
//!    can only be seen, and blocked, on a connection veil terminates;
//! 6. otherwise → passthrough.

use crate::client_hello::ClientHelloInfo;
use crate::host::{HostPattern, ServerName};

const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Terminate TLS and run the request through substitution.
    Intercept(Intercept),
    /// Splice the bytes through untouched.
    Passthrough(PassthroughReason),
}

/// Details of an intercept decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intercept {
    /// The server name the client asked for (what the leaf certificate is issued to).
    pub server_name: ServerName,
    /// The client offers h2.
    pub offers_h2: bool,
    /// The client offers http/1.1 (or offers no ALPN at all, which means HTTP/1.1).
    pub offers_http1: bool,
    /// A host-restricted secret allows the SNI (otherwise only unrestricted secrets apply).
    pub host_match: bool,
}

/// Why a connection is passed through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassthroughReason {
    /// No secret is mounted in the sandbox.
    NoSecrets,
    /// The ClientHello carries no (valid) SNI.
    NoSni,
    /// The client offers ALPN protocols, none of them HTTP.
    AlpnNotHttp,
    /// Only unrestricted secrets apply, and the client offers no ALPN.
    NoAlpn,
    /// No mounted secret allows the SNI.
    HostNotAllowed,
}

/// What a sandbox intercepts for, precomputed from its secrets and the agent's modes.
#[derive(Debug, Default)]
pub(crate) struct Interception {
    /// Something is scrubbed and something decides: otherwise everything passes through.
    pub(crate) active: bool,
    /// Union of the deciding secrets' patterns, deduplicated.
    pub(crate) patterns: Vec<HostPattern>,
    /// Some deciding secret is unrestricted, or some live secret blocks hosts it does not
    /// allow: HTTP to any host is intercepted.
    pub(crate) any_host: bool,
}

impl Interception {
    /// The decision for a connection that sent `hello` (rules in the module docs).
    pub(crate) fn decide(&self, hello: ClientHelloInfo) -> Decision {
        if !self.active {
            return Decision::Passthrough(PassthroughReason::NoSecrets);
        }
        let Some(server_name) = hello.sni else {
            return Decision::Passthrough(PassthroughReason::NoSni);
        };
        let alpn = hello.alpn_present.then_some(hello.alpn.as_slice());
        let (offers_h2, offers_http1) = match alpn {
            None => (false, true),
            Some(list) => (
                list.iter().any(|p| p == ALPN_H2),
                list.iter().any(|p| p == ALPN_HTTP11),
            ),
        };
        if alpn.is_some() && !offers_h2 && !offers_http1 {
            return Decision::Passthrough(PassthroughReason::AlpnNotHttp);
        }
        let host_match = self.patterns.iter().any(|p| p.matches_name(&server_name));
        if !host_match && !self.any_host {
            return Decision::Passthrough(PassthroughReason::HostNotAllowed);
        }
        if !host_match && alpn.is_none() {
            return Decision::Passthrough(PassthroughReason::NoAlpn);
        }
        Decision::Intercept(Intercept {
            server_name,
            offers_h2,
            offers_http1,
            host_match,
        })
    }
}
