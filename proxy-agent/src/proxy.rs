//! One sandbox connection, top to bottom: accept → identify → forward.
//!
//! The listener names the sandbox; the eBPF map names the original destination. A connection
//! whose destination was not recorded is closed and counted — never guessed.

pub mod passthrough;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::bpf::OrigDstTable;
use crate::config::SandboxId;
use crate::stats::{ActiveGuard, Stats};

/// What every connection task shares.
#[derive(Debug)]
pub struct Proxy {
    /// Original destinations recorded by the kernel.
    pub orig: OrigDstTable,
    /// Counters.
    pub stats: Stats,
    /// Connection tasks, waited for when draining.
    pub tracker: TaskTracker,
    /// Timeout for reaching the original destination.
    pub connect_timeout: Duration,
}

/// The sandbox a listener belongs to.
#[derive(Debug)]
pub struct SandboxTag {
    /// Its id.
    pub id: SandboxId,
    /// Cookie of its network namespace (half of the original-destination key).
    pub netns_cookie: u64,
}

/// Accepts connections on one sandbox listener until `cancel` fires.
pub async fn serve(
    proxy: Arc<Proxy>,
    sandbox: Arc<SandboxTag>,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                Stats::inc(&proxy.stats.accepted);
                let (proxy, sandbox) = (proxy.clone(), sandbox.clone());
                proxy.tracker.clone().spawn(async move {
                    handle(&proxy, &sandbox, stream, peer).await;
                });
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS pass; back off so the loop does not spin on them.
                warn!(sandbox = %sandbox.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(proxy: &Proxy, sandbox: &SandboxTag, client: TcpStream, peer: SocketAddr) {
    let _active = ActiveGuard::new(&proxy.stats);
    let Some(dst) = identify(proxy, sandbox, peer) else {
        return;
    };
    let upstream = match tokio::time::timeout(proxy.connect_timeout, TcpStream::connect(dst)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            Stats::inc(&proxy.stats.upstream_failed);
            debug!(sandbox = %sandbox.id, %dst, error = %e, "upstream connect failed");
            return;
        }
        Err(_) => {
            Stats::inc(&proxy.stats.upstream_failed);
            debug!(sandbox = %sandbox.id, %dst, "upstream connect timed out");
            return;
        }
    };
    // Small writes (TLS records, HTTP heads) must not wait for Nagle on either leg.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    match passthrough::splice_bidirectional(&client, &upstream).await {
        Ok(t) => {
            proxy.stats.bytes_up.fetch_add(t.up, Ordering::Relaxed);
            proxy.stats.bytes_down.fetch_add(t.down, Ordering::Relaxed);
            Stats::inc(&proxy.stats.completed);
            debug!(sandbox = %sandbox.id, %dst, up = t.up, down = t.down, "passthrough done");
        }
        Err(e) => debug!(sandbox = %sandbox.id, %dst, error = %e, "passthrough ended"),
    }
}

/// Finds where the connection from `peer` was going; `None` (counted) when it cannot be known.
fn identify(proxy: &Proxy, sandbox: &SandboxTag, peer: SocketAddr) -> Option<SocketAddr> {
    match proxy.orig.take(sandbox.netns_cookie, peer) {
        Ok(Some(dst)) => Some(dst),
        Ok(None) => {
            Stats::inc(&proxy.stats.origin_unknown);
            warn!(sandbox = %sandbox.id, %peer, "original destination unknown; connection closed");
            None
        }
        Err(e) => {
            Stats::inc(&proxy.stats.origin_unknown);
            warn!(sandbox = %sandbox.id, %peer, error = %e, "original destination lookup failed; connection closed");
            None
        }
    }
}
