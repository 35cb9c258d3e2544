//! The sandbox's own network: a named network namespace (`/run/netns/<name>`, so veil-agent and
//! control can open it by path) joined to the host netns by a veth pair on a private /30.
//!
//! Everything goes through rtnetlink (never `ip`). The /30 is chosen from a configured range
//! (default 198.19.0.0/16, part of RFC 2544's benchmarking block, never routed on the internet)
//! so that it overlaps no address or route of the host netns; a lock file serializes concurrent
//! `veil-control run`s between choosing and assigning. The lock lives in the root-only state
//! directory (a sandbox that could open it could hold it and stall every later `run --netns`)
//! and is waited for at most a given time. Nothing is forwarded: the sandbox reaches
//! only the host side of its link (the DNS forwarder) and whatever veil-agent opens inside it.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// Where named network namespaces live (as with `ip netns`).
pub const NETNS_DIR: &str = "/run/netns";
/// The lock's file name in [`super::state::PRIVATE_DIR`].
pub const LOCK_FILE: &str = "net.lock";
/// Name of the sandbox's end of the veth pair, inside its netns.
pub const SANDBOX_IF: &str = "eth0";

/// Network set-up errors.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The cause.
        source: rtnetlink::Error,
    },
    /// The address range has no free /30 left.
    #[error("{0}")]
    Range(String),
    /// A link the set-up just made is missing.
    #[error("link {0} not found")]
    NoLink(String),
    /// The helper thread that enters a namespace panicked.
    #[error("the network namespace helper thread panicked")]
    Thread,
    /// The state directory holding the lock is not safe.
    #[error(transparent)]
    State(#[from] super::state::StateError),
    /// Another `veil-control run` held the lock for the whole timeout.
    #[error(
        "timed out after {waited:?} waiting for the lock {path} (another veil-control run is \
         setting up its network, or is stuck holding it)"
    )]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Sys { what, source }
}

fn nix_err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> NetError {
    let what = what.into();
    move |e| NetError::Sys {
        what,
        source: std::io::Error::from(e),
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// An IPv4 prefix like `198.19.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Range {
    /// Network address (host bits zero).
    pub base: Ipv4Addr,
    /// Prefix length (at most 30: a /30 must fit).
    pub len: u8,
}

impl std::str::FromStr for Ipv4Range {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 prefix like 198.19.0.0/16 (at most /30)");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        if len > 30 || u32::from(addr) & !mask(len) != 0 {
            return Err(bad());
        }
        Ok(Ipv4Range { base: addr, len })
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}

/// Whether two prefixes share an address.
fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let m = mask(a.1.min(b.1));
    u32::from(a.0) & m == u32::from(b.0) & m
}

/// The first /30 of `range`, starting the search at block `start` (wrapping), that overlaps
/// none of `taken` (prefixes with length 0, default routes, are ignored). Returns its network
/// address.
pub fn pick_block(range: Ipv4Range, taken: &[(Ipv4Addr, u8)], start: u32) -> Option<Ipv4Addr> {
    let blocks = 1u32 << (30 - range.len);
    (0..blocks).find_map(|k| {
        let i = (start.wrapping_add(k)) % blocks;
        let net = Ipv4Addr::from(u32::from(range.base) + i * 4);
        let free = taken
            .iter()
            .filter(|t| t.1 > 0)
            .all(|t| !overlaps((net, 30), *t));
        free.then_some(net)
    })
}

/// A named network namespace with a veth link to the host netns; removed by [`SandboxNet::remove`].
#[derive(Debug)]
pub struct SandboxNet {
    path: PathBuf,
    file: File,
    host_if: String,
    /// Host side of the /30 (the sandbox's gateway and DNS server).
    pub host_ip: Ipv4Addr,
    /// Sandbox side of the /30.
    pub sandbox_ip: Ipv4Addr,
}

impl SandboxNet {
    /// `/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace, open (for `setns` in the child).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Creates the netns `name` and its link; `host_if` names the host end of the veth.
    /// On failure, what was created is removed again.
    /// The host-wide lock is waited for at most `lock_timeout`.
    pub async fn create(
        name: &str,
        host_if: &str,
        range: Ipv4Range,
        host: &Handle,
        lock_timeout: Duration,
    ) -> Result<SandboxNet, NetError> {
        let path = Path::new(NETNS_DIR).join(name);
        let file = create_named_netns(&path)?;
        let mut net = SandboxNet {
            path,
            file,
            host_if: host_if.to_owned(),
            host_ip: Ipv4Addr::UNSPECIFIED,
            sandbox_ip: Ipv4Addr::UNSPECIFIED,
        };
        if let Err(e) = net.link(range, host, lock_timeout).await {
            net.remove(host).await;
            return Err(e);
        }
        Ok(net)
    }

    async fn link(
        &mut self,
        range: Ipv4Range,
        host: &Handle,
        lock_timeout: Duration,
    ) -> Result<(), NetError> {
        let lock = lock(lock_timeout).await?;
        let taken = host_prefixes(host).await?;
        let net = pick_block(range, &taken, rand::random::<u32>()).ok_or_else(|| {
            NetError::Range(format!("no free /30 left in {}/{}", range.base, range.len))
        })?;
        self.host_ip = Ipv4Addr::from(u32::from(net) + 1);
        self.sandbox_ip = Ipv4Addr::from(u32::from(net) + 2);

        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(SANDBOX_IF.to_owned())
            .setns_by_fd(self.file.as_raw_fd())
            .build();
        let veth = LinkVeth::new(&self.host_if, SANDBOX_IF)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        host.link()
            .add(veth)
            .execute()
            .await
            .map_err(nl(format!("creating veth {}", self.host_if)))?;
        let index = link_index(host, &self.host_if).await?;
        host.address()
            .add(index, IpAddr::V4(self.host_ip), 30)
            .execute()
            .await
            .map_err(nl(format!(
                "adding {}/30 to {}",
                self.host_ip, self.host_if
            )))?;
        host.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("setting {} up", self.host_if)))?;
        // Once the address is on the host, the next run's scan sees it.
        drop(lock);

        let inner = handle_in(&self.file)?;
        let lo = link_index(&inner, "lo").await?;
        inner
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(nl("setting lo up in the sandbox netns"))?;
        let eth = link_index(&inner, SANDBOX_IF).await?;
        inner
            .address()
            .add(eth, IpAddr::V4(self.sandbox_ip), 30)
            .execute()
            .await
            .map_err(nl("adding the sandbox address"))?;
        inner
            .link()
            .set(LinkUnspec::new_with_index(eth).up().build())
            .execute()
            .await
            .map_err(nl("setting the sandbox link up"))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(self.host_ip)
            .output_interface(eth)
            .build();
        inner
            .route()
            .add(route)
            .execute()
            .await
            .map_err(nl("adding the sandbox default route"))?;
        Ok(())
    }

    /// Deletes the veth pair and the namespace (best effort; failures are logged).
    pub async fn remove(self, host: &Handle) {
        if let Ok(index) = link_index(host, &self.host_if).await
            && let Err(e) = host.link().del(index).execute().await
        {
            tracing::warn!(link = %self.host_if, error = %e, "removing the sandbox veth");
        }
        remove_named(&self.path);
    }
}

/// Unbinds and deletes a named netns (its veths go when nothing else holds it).
pub fn remove_named(path: &Path) {
    if let Err(e) = umount2(path, MntFlags::MNT_DETACH) {
        tracing::warn!(netns = %path.display(), error = %e, "unmounting a sandbox netns");
    }
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(netns = %path.display(), error = %e, "removing a sandbox netns file");
    }
}

/// An rtnetlink handle on the calling thread's (host) netns; its connection runs on the runtime.
pub fn host_handle() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(sys("opening rtnetlink"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// An rtnetlink handle whose socket lives in the namespace `ns` (made on a thread that entered it).
fn handle_in(ns: &File) -> Result<Handle, NetError> {
    let rt = tokio::runtime::Handle::current();
    let ns = ns.try_clone().map_err(sys("duplicating the netns fd"))?;
    let made = std::thread::spawn(move || {
        let _guard = rt.enter();
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(nix_err("entering the sandbox netns"))?;
        rtnetlink::new_connection().map_err(sys("opening rtnetlink in the sandbox netns"))
    })
    .join()
    .map_err(|_| NetError::Thread)??;
    let (conn, handle, _) = made;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, NetError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links
        .try_next()
        .await
        .map_err(nl(format!("finding link {name}")))?
    {
        Some(link) => Ok(link.header.index),
        None => Err(NetError::NoLink(name.to_owned())),
    }
}

/// Every IPv4 address and route prefix of the host netns.
async fn host_prefixes(host: &Handle) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
    let mut out = Vec::new();
    let mut addrs = host.address().get().execute();
    while let Some(a) = addrs.try_next().await.map_err(nl("listing addresses"))? {
        for attr in &a.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                out.push((*ip, a.header.prefix_len));
            }
        }
    }
    let mut routes = host
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = routes.try_next().await.map_err(nl("listing routes"))? {
        for attr in &r.attributes {
            if let RouteAttribute::Destination(RouteAddress::Inet(ip)) = attr {
                out.push((*ip, r.header.destination_prefix_length));
            }
        }
    }
    Ok(out)
}

/// An exclusive lock held while a /30 is chosen and assigned: `net.lock` (0600) in the
/// root-only state directory, waited for at most `timeout`.
async fn lock(timeout: Duration) -> Result<nix::fcntl::Flock<File>, NetError> {
    let path = super::state::private_dir(None)?.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(sys(format!("opening {}", path.display())))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(sys(format!("chmod {}", path.display())))?;
    let start = Instant::now();
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
            Err((_, e)) => return Err(nix_err(format!("locking {}", path.display()))(e)),
        }
        if start.elapsed() >= timeout {
            return Err(NetError::LockTimeout {
                path,
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes `/run/netns` a shared mount point as `ip netns add` does, so that namespaces bound there
/// are seen by every mount namespace that copied it.
fn prepare_netns_dir() -> Result<(), NetError> {
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).map_err(sys(format!("creating {NETNS_DIR}")))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    if mount(None::<&str>, dir, None::<&str>, shared, None::<&str>).is_ok() {
        return Ok(());
    }
    // Not a mount point yet: bind it onto itself first.
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(nix_err(format!("bind-mounting {NETNS_DIR}")))?;
    mount(None::<&str>, dir, None::<&str>, shared, None::<&str>)
        .map_err(nix_err(format!("making {NETNS_DIR} shared")))
}

/// Creates a new network namespace and binds it to `path` (which must not exist).
fn create_named_netns(path: &Path) -> Result<File, NetError> {
    prepare_netns_dir()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(sys(format!("creating {}", path.display())))?;
    let _ = f.flush();
    drop(f);
    let target = path.to_path_buf();
    let bound = std::thread::spawn(move || -> Result<(), NetError> {
        // The thread's netns changes, not the process's; the thread ends right after.
        unshare(CloneFlags::CLONE_NEWNET).map_err(nix_err("unshare(CLONE_NEWNET)"))?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(nix_err(format!(
            "binding the netns to {}",
            target.display()
        )))
    })
    .join()
    .map_err(|_| NetError::Thread)
    .and_then(|r| r);
    if let Err(e) = bound {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    File::open(path).map_err(sys(format!("opening {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_ranges() {
        let r: Ipv4Range = "198.19.0.0/16".parse().unwrap();
        assert_eq!(r.base, a("198.19.0.0"));
        assert_eq!(r.len, 16);
        assert!("198.19.0.1/16".parse::<Ipv4Range>().is_err());
        assert!("198.19.0.0/31".parse::<Ipv4Range>().is_err());
        assert!("198.19.0.0".parse::<Ipv4Range>().is_err());
        assert!("x/16".parse::<Ipv4Range>().is_err());
    }

    #[test]
    fn picks_a_block_that_overlaps_nothing() {
        let r: Ipv4Range = "198.19.0.0/29".parse().unwrap();
        assert_eq!(pick_block(r, &[], 0), Some(a("198.19.0.0")));
        assert_eq!(pick_block(r, &[], 1), Some(a("198.19.0.4")));
        // An address inside the first block, and the default route (ignored).
        let taken = [(a("198.19.0.2"), 32), (a("0.0.0.0"), 0)];
        assert_eq!(pick_block(r, &taken, 0), Some(a("198.19.0.4")));
        // A covering route takes everything.
        assert_eq!(pick_block(r, &[(a("198.18.0.0"), 15)], 0), None);
        // A route elsewhere takes nothing.
        assert_eq!(
            pick_block(r, &[(a("10.0.0.0"), 8)], 0),
            Some(a("198.19.0.0"))
        );
    }
}
