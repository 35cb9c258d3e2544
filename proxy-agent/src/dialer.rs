//! Dialer: where the agent opens a sandbox's upstream connections, by its `egress`.
//!
//! - `egress: "sandbox"` with a netns of its own: the socket is created inside that netns, so
//!   the sandbox's routes, source address and firewall apply exactly as without veil.
//!   `setns(CLONE_NEWNET)` changes only the calling thread and a socket keeps the netns it was
//!   created in, so the calling thread enters the netns just for `socket()` and returns at
//!   once (as Istio ztunnel's in-pod socket factory does); connect and I/O then run on the
//!   runtime like any socket's. Entering costs two `setns` calls (a few µs, see
//!   `examples/netns_connect_cost.rs`), cheaper than handing the work to another thread. The
//!   socket still belongs to the agent's cgroup, so veil's connect hooks (attached to sandbox
//!   cgroups) never redirect it.
//! - `egress: "sandbox"` sharing the agent's netns: an ordinary socket, nothing to switch.
//! - `egress: "host"`: from the agent's netns, through the [`EgressGuard`]; each refusal is
//!   counted (`egress_refused`) and logged with the destination.
//!
//! A sandbox whose netns cannot be opened gets no connection at all: never one from the host.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tracing::{error, warn};
use veil_link::Egress;

use crate::egress::{Denied, EgressRules, Verdict};
use crate::stats::Stats;

/// How long the host's address list is trusted before it is read again.
const HOST_ADDRS_TTL: Duration = Duration::from_secs(1);
/// Refusals logged per second at most (all are counted); the rest are summed in the next line.
const LOG_PER_SECOND: u32 = 20;

/// Why an upstream connection was not opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The egress rules refuse the destination (counted and logged already).
    #[error("veil refused egress to {dst}: {reason}")]
    Refused {
        /// The destination.
        dst: SocketAddr,
        /// Which rule.
        reason: Denied,
    },
    /// The sandbox's netns cannot be entered.
    #[error("sandbox netns {path} is unavailable: {error}")]
    Netns {
        /// Its file.
        path: PathBuf,
        /// What failed.
        error: String,
    },
    /// Connecting failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<DialError> for io::Error {
    fn from(e: DialError) -> Self {
        match e {
            DialError::Io(e) => e,
            e @ DialError::Refused { .. } => io::Error::new(io::ErrorKind::PermissionDenied, e),
            e @ DialError::Netns { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        }
    }
}

/// Where a sandbox's upstream sockets are opened: its egress mode and network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketPlace {
    /// The sandbox's network namespace file; `None` = the agent's own.
    pub netns: Option<std::path::PathBuf>,
    /// Its egress mode.
    pub egress: veil_link::Egress,
}

/// The socket factory of a sandbox's upstream connections: a [`Dialer`] in the agent, an
/// in-process stand-in in tests, so the same connection path runs in both.
pub trait Connector: fmt::Debug + Send + Sync {
    /// Opens a TCP connection to `dst` (no timeout: callers bound it).
    fn connect(&self, dst: SocketAddr) -> ConnectFuture<'_>;
}

/// What [`Connector::connect`] returns.
pub type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TcpStream, DialError>> + Send + 'a>>;

impl Connector for Dialer {
    fn connect(&self, dst: SocketAddr) -> ConnectFuture<'_> {
        Box::pin(Dialer::connect(self, dst))
    }
}

/// Where one sandbox's upstream sockets come from.
#[derive(Debug)]
pub enum Dialer {
    /// The agent's own netns, which the sandbox shares: nothing to switch, nothing to check.
    Local,
    /// Inside the sandbox's own netns.
    Netns(NetnsDialer),
    /// From the host, through the egress rules.
    Host(Arc<EgressGuard>),
    /// The sandbox's netns could not be opened: every connection fails.
    Unavailable {
        /// Its file.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

impl Dialer {
    /// The dialer for a sandbox placed at `place`; `guard` serves `egress: "host"`.
    pub fn new(place: &SocketPlace, guard: &Arc<EgressGuard>) -> Self {
        match (place.egress, &place.netns) {
            (Egress::Host, _) => Dialer::Host(guard.clone()),
            (Egress::Sandbox, None) => Dialer::Local,
            (Egress::Sandbox, Some(path)) => match NetnsDialer::open(path) {
                Ok(d) => Dialer::Netns(d),
                Err(e) => {
                    warn!(netns = %path.display(), error = %e, "sandbox netns unavailable; its upstream connections will fail");
                    Dialer::Unavailable {
                        path: path.clone(),
                        error: e.to_string(),
                    }
                }
            },
        }
    }

    /// Opens a TCP connection to `dst` (no timeout: callers bound it).
    pub async fn connect(&self, dst: SocketAddr) -> Result<TcpStream, DialError> {
        match self {
            Dialer::Local => Ok(TcpStream::connect(dst).await?),
            Dialer::Netns(n) => Ok(n.connect(dst).await?),
            Dialer::Host(guard) => {
                guard.check(dst)?;
                let stream = TcpStream::connect(dst).await?;
                guard.check_connected(&stream, dst)?;
                Ok(stream)
            }
            Dialer::Unavailable { path, error } => Err(DialError::Netns {
                path: path.clone(),
                error: error.clone(),
            }),
        }
    }
}

/// Creates sockets inside one network namespace (held open: it is the netns the sandbox's
/// listeners were made in, even if its name is reused later).
#[derive(Debug)]
pub struct NetnsDialer {
    ns: File,
    path: PathBuf,
}

impl NetnsDialer {
    /// Opens the netns file at `path` and checks that it can be entered.
    pub fn open(path: &Path) -> io::Result<Self> {
        let ns = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", path.display())))?;
        let dialer = Self {
            ns,
            path: path.to_owned(),
        };
        dialer.inside(|| ()).map_err(|e| {
            io::Error::new(e.kind(), format!("enter netns {}: {e}", path.display()))
        })?;
        Ok(dialer)
    }

    /// The netns file this dialer enters.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A non-blocking TCP socket of `domain` created inside the netns.
    pub fn socket(&self, domain: Domain) -> io::Result<Socket> {
        self.inside(|| {
            Socket::new(
                domain,
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )
        })?
    }

    /// Connects to `dst` from inside the netns.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = self.socket(Domain::for_address(dst))?;
        TcpSocket::from_std_stream(socket.into()).connect(dst).await
    }

    /// Runs `f` on this thread while it is inside the netns, then returns to the agent's.
    fn inside<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home()?;
        setns(&self.ns, CloneFlags::CLONE_NEWNET)?;
        let _back = Return(home);
        Ok(f())
    }
}

/// Puts the thread back into the agent's netns when dropped (also when `f` panics).
struct Return(&'static File);

impl Drop for Return {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0, CloneFlags::CLONE_NEWNET) {
            // A runtime thread left in a sandbox's netns would open the agent's later sockets,
            // other sandboxes' included, there: stopping is the only safe outcome.
            error!(error = %e, "cannot return to the agent's netns; aborting");
            eprintln!("veil-agent: cannot return to the agent's netns ({e}); aborting");
            std::process::abort();
        }
    }
}

/// The agent's own netns: that of its main thread, which never enters another.
fn home() -> io::Result<&'static File> {
    static HOME: OnceLock<Result<File, String>> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net").map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| io::Error::other(format!("open the agent's netns: {e}")))
}

/// The egress rules of `egress: "host"` sandboxes, with the host's addresses, the refusal
/// counter and a bounded log.
#[derive(Debug)]
pub struct EgressGuard {
    rules: EgressRules,
    host: Mutex<HostAddrs>,
    stats: Arc<Stats>,
    log: Mutex<LogWindow>,
}

#[derive(Debug, Default)]
struct HostAddrs {
    read_at: Option<Instant>,
    addrs: Arc<BTreeSet<IpAddr>>,
}

#[derive(Debug, Default)]
struct LogWindow {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl EgressGuard {
    /// A guard applying `rules`, counting refusals in `stats`.
    pub fn new(rules: EgressRules, stats: Arc<Stats>) -> Self {
        Self {
            rules,
            host: Mutex::default(),
            stats,
            log: Mutex::default(),
        }
    }

    /// The rules applied.
    pub fn rules(&self) -> &EgressRules {
        &self.rules
    }

    /// `Ok` when `dst` may be opened from the host; a refusal is counted and logged.
    pub fn check(&self, dst: SocketAddr) -> Result<(), DialError> {
        let addrs = self.host_addrs();
        match self.rules.verdict(dst.ip(), |ip| addrs.contains(&ip)) {
            Verdict::Allowed => Ok(()),
            Verdict::Denied(reason) => Err(self.refuse(dst, reason)),
        }
    }

    /// Catches a destination that turned out to be the host itself (an address added since
    /// the list was read, a `local` route): its connection comes from the very address it
    /// reached. Refused unless allowed.
    pub fn check_connected(&self, stream: &TcpStream, dst: SocketAddr) -> Result<(), DialError> {
        let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else {
            return Ok(());
        };
        let peer_ip = peer.ip().to_canonical();
        if local.ip().to_canonical() != peer_ip {
            return Ok(());
        }
        match self.rules.verdict(peer_ip, |_| true) {
            Verdict::Allowed => Ok(()),
            Verdict::Denied(reason) => Err(self.refuse(dst, reason)),
        }
    }

    fn refuse(&self, dst: SocketAddr, reason: Denied) -> DialError {
        Stats::inc(&self.stats.egress_refused);
        if let Some(suppressed) = self.may_log() {
            warn!(%dst, %reason, suppressed, "egress refused");
        }
        DialError::Refused { dst, reason }
    }

    /// Whether this refusal may be logged, and how many were not since the last logged one.
    fn may_log(&self) -> Option<u64> {
        let mut w = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if w.started
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
        {
            w.started = Some(now);
            w.logged = 0;
        }
        if w.logged < LOG_PER_SECOND {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }

    fn host_addrs(&self) -> Arc<BTreeSet<IpAddr>> {
        let mut h = self.host.lock().unwrap_or_else(|p| p.into_inner());
        if h.read_at.is_none_or(|t| t.elapsed() >= HOST_ADDRS_TTL) {
            match crate::hostaddrs::host_addresses() {
                Ok(addrs) => {
                    h.addrs = Arc::new(addrs.into_iter().map(|a| a.to_canonical()).collect());
                    h.read_at = Some(Instant::now());
                }
                // The previous list stays; connections that reach the host are still caught
                // by check_connected().
                Err(e) => warn!(error = %e, "cannot read the host's addresses"),
            }
        }
        h.addrs.clone()
    }

    /// Refusals so far (for tests).
    pub fn refused(&self) -> u64 {
        self.stats.egress_refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(rules: EgressRules) -> EgressGuard {
        EgressGuard::new(rules, Arc::new(Stats::default()))
    }

    #[tokio::test]
    async fn host_egress_refuses_the_host_and_counts() {
        let g = Arc::new(guard(EgressRules::default()));
        let dialer = Dialer::Host(g.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let e = dialer.connect(dst).await.unwrap_err();
        assert!(matches!(e, DialError::Refused { .. }), "{e}");
        assert!(e.to_string().contains(&dst.to_string()), "{e}");
        let mapped = SocketAddr::new(
            std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(),
            dst.port(),
        );
        assert!(dialer.connect(mapped).await.is_err());
        assert_eq!(g.refused(), 2);
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::PermissionDenied);
    }

    #[tokio::test]
    async fn allowed_loopback_connects_and_local_egress_is_unchecked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let open = EgressRules::new(vec![], vec!["127.0.0.0/8".parse().unwrap()]);
        let g = Arc::new(guard(open));
        Dialer::Host(g.clone()).connect(dst).await.unwrap();
        Dialer::Local.connect(dst).await.unwrap();
        assert_eq!(g.refused(), 0);
    }

    #[tokio::test]
    async fn a_connection_that_reached_the_host_is_refused_afterwards() {
        // The address list is not consulted here: the connection itself shows it reached the
        // host (its local address is the one it connected to).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let g = guard(EgressRules::default());
        let stream = TcpStream::connect(dst).await.unwrap();
        assert!(g.check_connected(&stream, dst).is_err());
        assert_eq!(g.refused(), 1);
    }

    #[test]
    fn unavailable_netns_is_an_error_naming_it() {
        let g = Arc::new(guard(EgressRules::default()));
        let place = SocketPlace {
            netns: Some(PathBuf::from("/nonexistent/netns")),
            egress: Egress::Sandbox,
        };
        let d = Dialer::new(&place, &g);
        assert!(matches!(d, Dialer::Unavailable { .. }), "{d:?}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(d.connect("192.0.2.1:443".parse().unwrap()))
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
    }

    #[tokio::test]
    async fn sockets_are_made_inside_the_netns_and_the_thread_comes_back() {
        use std::os::fd::AsFd;
        veil_tests::require_root();
        let thread_ns = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let before = thread_ns();
        let ns = veil_tests::NetNs::new("dialer");
        // Only the netns has this listener: its 127.0.0.1 is not the host's.
        let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let dst = listener.local_addr().unwrap();
        let d = NetnsDialer::open(ns.path()).unwrap();
        let s = d.connect(dst).await.unwrap();
        let (_, peer) = listener.accept().unwrap();
        assert_eq!(peer, s.local_addr().unwrap());
        let cookie = |fd: std::os::fd::BorrowedFd<'_>| crate::bpf::netns_cookie(fd).unwrap();
        assert_eq!(cookie(s.as_fd()), cookie(listener.as_fd()));
        assert_eq!(
            thread_ns(),
            before,
            "the thread stayed in the sandbox netns"
        );
        let here = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_ne!(cookie(here.as_fd()), cookie(s.as_fd()));
        // A file that is not a netns is refused when the dialer is made, not per connection.
        let e = NetnsDialer::open(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert!(e.to_string().contains("/proc/self/ns/uts"), "{e}");
    }

    #[test]
    fn log_lines_are_bounded() {
        let g = guard(EgressRules::default());
        let logged = (0..100).filter(|_| g.may_log().is_some()).count();
        assert_eq!(logged, LOG_PER_SECOND as usize);
    }
}
