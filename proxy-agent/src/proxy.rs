//! One sandbox connection, top to bottom: accept → identify → peek → decide → passthrough |
//! intercept.
//!
//! The listener names the sandbox; the eBPF map names the original destination, for this
//! connection's own four-tuple and this sandbox only ([`identify`]). A connection whose
//! destination was not recorded is closed and counted — never guessed. A sandbox without
//! secrets is spliced at once (nothing to decide); otherwise the ClientHello is peeked and the
//! sandbox's policy decides. Everything that is not intercepted passes through byte for byte,
//! the peeked bytes first.
//!
//! Each sandbox may hold `max_connections_per_sandbox` connections at once; one more is closed
//! as soon as it is accepted and counted (`limit_refused`). The limit is per sandbox, and each
//! sandbox has its own listener and accept loop, so a sandbox flooding veil with connections
//! exhausts only its own share. The connection closed over the limit consumes its record all
//! the same, and a listener that closes takes the records of its unaccepted connections along.
//!
//! The two places the path touches the host sit behind small traits, so the whole path runs
//! in-process in tests (`proxy/tests.rs`): the kernel's records ([`identify::OriginTable`],
//! the eBPF map in the agent) and the upstream socket factory ([`crate::dialer::Connector`], a
//! [`crate::dialer::Dialer`] in the agent: the sandbox's netns, or the host through the egress
//! rules).

pub mod body;
pub mod conn;
pub mod connect;
pub mod context;
pub mod forward;
pub mod identify;
pub mod idle;
pub mod intercept;
pub mod passthrough;
pub mod peek;
pub mod pipes;
pub mod scrub;
#[cfg(test)]
mod tests;
pub mod upstream;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use veil_policy::{Decision, PassthroughReason};

use crate::bpf::ConnTuple;
use crate::proxy::identify::Identity;
use crate::proxy::peek::{Peeked, PrefixedStream};
use crate::stats::{ActiveGuard, Stats};

pub use context::{Proxy, SandboxTag};

/// Accepts connections on one sandbox listener until `cancel` fires; then closes it and drops
/// the records of the connections it never accepted.
pub async fn serve(
    proxy: Arc<Proxy>,
    sandbox: Arc<SandboxTag>,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    let local = listener.local_addr();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                Stats::inc(&proxy.stats.accepted);
                let Ok(listener_addr) = stream.local_addr() else {
                    // Reset before we could look at it: nothing to serve, nothing to identify.
                    Stats::inc(&proxy.stats.origin_unknown);
                    continue;
                };
                let conn = ConnTuple {
                    netns_cookie: sandbox.netns_cookie,
                    listener: listener_addr,
                    peer,
                };
                let Some(permit) = admit(&proxy, &sandbox, peer) else {
                    identify::consume(&*proxy.orig, &conn);
                    drop(stream);
                    continue;
                };
                let (proxy, sandbox) = (proxy.clone(), sandbox.clone());
                proxy.tracker.clone().spawn(async move {
                    let _permit = permit;
                    handle(&proxy, &sandbox, stream, conn).await;
                });
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS pass; back off so the loop does not spin on them.
                warn!(sandbox = %sandbox.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    if let Ok(local) = local
        && let Err(e) = proxy.orig.forget_listener(sandbox.netns_cookie, local)
    {
        warn!(sandbox = %sandbox.id, error = %e, "dropping the records of a closed listener failed");
    }
}

/// A permit for one more connection of `sandbox`; `None` (counted) when it has its limit open.
fn admit(proxy: &Proxy, sandbox: &SandboxTag, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
    let permit = sandbox.try_admit();
    if permit.is_none() {
        Stats::inc(&proxy.stats.limit_refused);
        debug!(sandbox = %sandbox.id, %peer, limit = proxy.limits.max_connections_per_sandbox, "connection limit reached; connection closed");
    }
    permit
}

async fn handle(proxy: &Proxy, sandbox: &SandboxTag, mut client: TcpStream, conn: ConnTuple) {
    let _active = ActiveGuard::new(&proxy.stats);
    let Some(dst) = origin(proxy, sandbox, &client, &conn) else {
        return;
    };
    // Small writes (TLS records, HTTP heads) must not wait for Nagle.
    let _ = client.set_nodelay(true);
    let Some(policy) = proxy.secrets.policy(sandbox.id.as_str()) else {
        Stats::inc(&proxy.stats.passthrough_no_secrets);
        return passthrough(proxy, sandbox, client, Vec::new(), dst, None).await;
    };
    let spare = match first_word(proxy, sandbox, &client, dst).await {
        None => return,
        Some(FirstWord::Client(spare)) => spare,
        Some(FirstWord::Server(up) | FirstWord::Neither(up)) => {
            Stats::inc(&proxy.stats.passthrough_silent);
            return passthrough(proxy, sandbox, client, Vec::new(), dst, Some(up)).await;
        }
    };
    let mut prefix = Vec::with_capacity(2048);
    let peeked = match peek::peek_hello(&mut client, &mut prefix, proxy.peek_timeout).await {
        Ok(p) => p,
        Err(e) => {
            debug!(sandbox = %sandbox.id, %dst, error = %e, "reading the client's first bytes failed");
            return;
        }
    };
    let hello = match peeked {
        Peeked::Tls(hello) => hello,
        Peeked::NotTls(_) => {
            Stats::inc(&proxy.stats.passthrough_not_tls);
            return passthrough(proxy, sandbox, client, prefix, dst, spare).await;
        }
        Peeked::Timeout | Peeked::Eof => {
            Stats::inc(&proxy.stats.passthrough_silent);
            return passthrough(proxy, sandbox, client, prefix, dst, spare).await;
        }
    };
    match policy.decide(hello) {
        Decision::Intercept(i) => {
            // The speculative upstream connection is not needed: interception pools its own.
            drop(spare);
            let client = PrefixedStream::new(prefix, client);
            intercept::run(proxy, sandbox, client, dst, i.server_name, i.offers_h2).await;
        }
        Decision::Passthrough(reason) => {
            Stats::inc(match reason {
                PassthroughReason::NoSecrets => &proxy.stats.passthrough_no_secrets,
                PassthroughReason::NoSni => &proxy.stats.passthrough_no_sni,
                PassthroughReason::AlpnNotHttp | PassthroughReason::NoAlpn => {
                    &proxy.stats.passthrough_alpn
                }
                PassthroughReason::HostNotAllowed => &proxy.stats.passthrough_not_allowed,
            });
            passthrough(proxy, sandbox, client, prefix, dst, spare).await;
        }
    }
}

/// Finds where the connection `conn` (accepted as `client`) was going, from its record
/// ([`identify::check`]); `None` (counted, logged) when it may not be served.
fn origin(
    proxy: &Proxy,
    sandbox: &SandboxTag,
    client: &TcpStream,
    conn: &ConnTuple,
) -> Option<SocketAddr> {
    let peer = conn.peer;
    // A socket that went to CLOSE (reset) has no peer any more.
    let alive = || client.peer_addr().is_ok();
    match identify::check(&*proxy.orig, sandbox.cgroup_id, conn, alive) {
        Identity::Known(dst) => Some(dst),
        Identity::Unknown => {
            Stats::inc(&proxy.stats.origin_unknown);
            warn!(sandbox = %sandbox.id, %peer, "original destination unknown; connection closed");
            None
        }
        Identity::Reset => {
            Stats::inc(&proxy.stats.origin_unknown);
            debug!(sandbox = %sandbox.id, %peer, "connection reset before it was identified");
            None
        }
        Identity::Mismatch => {
            Stats::inc(&proxy.stats.origin_mismatch);
            warn!(sandbox = %sandbox.id, %peer, "connection recorded for another sandbox; closed");
            None
        }
        Identity::Failed(e) => {
            Stats::inc(&proxy.stats.origin_unknown);
            warn!(sandbox = %sandbox.id, %peer, error = %e, "original destination lookup failed; connection closed");
            None
        }
    }
}

/// A client silent this long may be waiting for the server to speak first (SMTP, MySQL, ...):
/// veil then connects upstream and lets whichever side speaks first decide. TLS clients send
/// their hello right after connecting, so they almost never get here.
const SPECULATE_AFTER: Duration = Duration::from_millis(100);

/// Who spoke first on a connection.
enum FirstWord {
    /// The client (with the upstream connection opened meanwhile, if any).
    Client(Option<TcpStream>),
    /// The server: not a TLS client, pass through.
    Server(TcpStream),
    /// Nobody within the peek timeout: pass through.
    Neither(TcpStream),
}

/// Waits for the first bytes from either side; `None` (counted) if the upstream is unreachable.
async fn first_word(
    proxy: &Proxy,
    sandbox: &SandboxTag,
    client: &TcpStream,
    dst: SocketAddr,
) -> Option<FirstWord> {
    if tokio::time::timeout(SPECULATE_AFTER, spoke(client))
        .await
        .is_ok()
    {
        return Some(FirstWord::Client(None));
    }
    let up = connect::upstream(proxy, sandbox, dst).await?;
    let rest = proxy.peek_timeout.saturating_sub(SPECULATE_AFTER);
    // An error counts as speaking: the read that follows reports it.
    Some(tokio::select! {
        () = spoke(client) => FirstWord::Client(Some(up)),
        () = spoke(&up) => FirstWord::Server(up),
        () = tokio::time::sleep(rest) => FirstWord::Neither(up),
    })
}

/// Resolves once `s` has bytes (or EOF, or an error) to read; consumes nothing. Readiness
/// alone can be a false positive, so this peeks.
async fn spoke(s: &TcpStream) {
    let mut byte = [0u8; 1];
    let _ = s.peek(&mut byte).await;
}

/// Splices `client` to `dst` untouched (over `upstream` when already connected), after sending
/// the bytes already read from the client.
async fn passthrough(
    proxy: &Proxy,
    sandbox: &SandboxTag,
    client: TcpStream,
    prefix: Vec<u8>,
    dst: SocketAddr,
    upstream: Option<TcpStream>,
) {
    let upstream = match upstream {
        Some(up) => Some(up),
        None => connect::upstream(proxy, sandbox, dst).await,
    };
    let Some(mut upstream) = upstream else {
        return;
    };
    if !prefix.is_empty()
        && let Err(e) = upstream.write_all(&prefix).await
    {
        debug!(sandbox = %sandbox.id, %dst, error = %e, "passthrough ended");
        return;
    }
    match passthrough::splice_bidirectional(&client, &upstream).await {
        Ok(t) => {
            let up = t.up + prefix.len() as u64;
            proxy.stats.bytes_up.fetch_add(up, Ordering::Relaxed);
            proxy.stats.bytes_down.fetch_add(t.down, Ordering::Relaxed);
            Stats::inc(&proxy.stats.completed);
            debug!(sandbox = %sandbox.id, %dst, up, down = t.down, "passthrough done");
        }
        Err(e) => debug!(sandbox = %sandbox.id, %dst, error = %e, "passthrough ended"),
    }
}
