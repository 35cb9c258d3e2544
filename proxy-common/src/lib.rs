//! Types shared by veil's eBPF programs (`proxy-ebpf`) and `veil-agent`.
//!
//! Every struct is `#[repr(C)]` with explicit padding so that the kernel and userspace agree on
//! its bytes; padding must be zeroed because hash-map keys compare as raw bytes.
#![no_std]

/// Map: cgroup id (inode of the sandbox's cgroup v2 directory) → [`SandboxTarget`].
pub const MAP_SANDBOXES: &str = "VEIL_SANDBOXES";
/// Map: socket cookie of a redirected sandbox socket → [`OrigDst`]; lives until the socket closes.
pub const MAP_SOCKS: &str = "VEIL_SOCKS";
/// Map: [`ConnKey`] (the connection's four-tuple as the agent's accepted socket sees it) →
/// [`OrigDst`]. The agent removes an entry when it accepts the connection (whatever it then
/// does with it); the kernel removes it when the client socket is reset or closed after the
/// agent's side, so no later connection reusing the tuple can find it.
pub const MAP_ORIG: &str = "VEIL_ORIG";
/// Per-CPU array of `u64` counters indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "VEIL_STATS";
/// Map: [`PortKey`] (netns cookie, port) → owner (a sandbox's cgroup id, or
/// [`OWNER_VEIL`]): ports no sandbox process may bind in that network namespace.
pub const MAP_LISTENERS: &str = "VEIL_LISTENERS";
/// Map: [`GuardKey`] → [`OWNER_VEIL`]: veil's own listeners, which no sandbox may connect to.
pub const MAP_GUARDED: &str = "VEIL_GUARDED";

/// Capacity of [`MAP_SANDBOXES`].
pub const MAX_SANDBOXES: u32 = 4096;
/// Capacity of the LRU maps [`MAP_SOCKS`] and [`MAP_ORIG`].
pub const MAX_TRACKED_CONNS: u32 = 65536;
/// Capacity of [`MAP_LISTENERS`]: two listeners per sandbox, plus veil's own ports.
pub const MAX_LISTENER_PORTS: u32 = 2 * MAX_SANDBOXES + 1024;
/// Capacity of [`MAP_GUARDED`]: veil's listeners times the host's addresses.
pub const MAX_GUARDED: u32 = 4096;
/// Deepest cgroup level searched when looking up the sandbox that owns a socket.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Owner of a [`MAP_LISTENERS`] or [`MAP_GUARDED`] entry that belongs to veil itself (control's
/// or the agent's own listeners) rather than to a sandbox.
pub const OWNER_VEIL: u64 = 0;

/// TCP connects redirected to a sandbox listener.
pub const STAT_REDIRECTED: u32 = 0;
/// UDP datagrams or connects to port 443 refused (QUIC falls back to TCP).
pub const STAT_UDP443_REFUSED: u32 = 1;
/// Connects refused because the socket's cgroup matched no registered sandbox (fail closed).
pub const STAT_NO_SANDBOX: u32 = 2;
/// Established redirected connections whose original destination was recorded for the agent.
pub const STAT_ORIG_RECORDED: u32 = 3;
/// Binds refused because a sandbox process asked for a veil listener port.
pub const STAT_BIND_REFUSED: u32 = 4;
/// Connects refused because they went to one of veil's own listeners.
pub const STAT_GUARDED_REFUSED: u32 = 5;
/// Original-destination records the kernel removed because their socket was reset or closed
/// before the agent took them.
pub const STAT_ORIG_FORGOTTEN: u32 = 6;
/// TCP connects of a sandbox flagged [`SANDBOX_DIRECT`] let through untouched.
pub const STAT_DIRECT: u32 = 7;
/// Number of counters in [`MAP_STATS`].
pub const STAT_COUNT: u32 = 8;

/// Metric names of the counters, indexed like [`MAP_STATS`].
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "redirected",
    "udp443_refused",
    "no_sandbox",
    "orig_recorded",
    "bind_refused",
    "guarded_refused",
    "orig_forgotten",
    "direct",
];

/// Every map the agent pins by name (under `<pin dir>/maps/`), so that a restarted agent's
/// programs share them with the links a previous agent left attached.
pub const PINNED_MAPS: [&str; 6] = [
    MAP_SANDBOXES,
    MAP_SOCKS,
    MAP_ORIG,
    MAP_STATS,
    MAP_LISTENERS,
    MAP_GUARDED,
];

/// `AF_INET`, as the kernel numbers it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel numbers it.
pub const AF_INET6: u16 = 10;

/// [`SandboxTarget::flags`] bit: the sandbox's TCP connects may skip the redirect (no secret
/// applies to it and its egress is its own netns), so they go where they were dialled.
///
/// Only a set bit allows it: 0 means redirect, so an entry written by an older agent (whose
/// padding was zero) or one not yet decided fails closed.
pub const SANDBOX_DIRECT: u32 = 1;

/// Where a sandbox's redirected connections go: its listener ports on loopback inside its netns.
///
/// IPv4 connects go to `127.0.0.1:port_v4`, IPv4-mapped IPv6 connects to
/// `[::ffff:127.0.0.1]:port_v4`, native IPv6 connects to `[::1]:port_v6`. Ports in host order.
/// With [`SANDBOX_DIRECT`] in `flags`, connects are not redirected at all (the refusals of
/// veil's listeners, UDP/443 and unknown stream protocols still apply).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxTarget {
    /// Port of the IPv4 listener (host order).
    pub port_v4: u16,
    /// Port of the IPv6 listener (host order); 0 when the netns has no IPv6 loopback.
    pub port_v6: u16,
    /// [`SANDBOX_DIRECT`] or 0 (redirect); other bits are zero.
    pub flags: u32,
}

impl SandboxTarget {
    /// Whether connects of this sandbox skip the redirect.
    pub const fn direct(&self) -> bool {
        self.flags & SANDBOX_DIRECT != 0
    }
}

/// The destination a sandbox process dialled, before redirection, and the sandbox it dialled
/// from.
///
/// `addr` holds an IPv6 address as four network-order words; an IPv4 destination is stored
/// IPv4-mapped (`::ffff:a.b.c.d`). `family` is the family of the socket that dialled it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Destination address, IPv6 or IPv4-mapped, network-order words.
    pub addr: [u32; 4],
    /// Destination port (host order).
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: the family of the dialling socket.
    pub family: u16,
    /// Zero.
    pub _pad: u32,
    /// Cgroup id of the registered sandbox whose listener the connection was redirected to.
    pub cgroup_id: u64,
}

/// Key of [`MAP_ORIG`]: a redirected connection's four-tuple.
///
/// `netns_cookie` tells apart sandboxes whose loopback addresses and ports are identical;
/// addresses are stored IPv6 or IPv4-mapped, ports in host order. The listener end is part of
/// the key, so a record made for one listener is never found by another.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Cookie of the network namespace both ends live in.
    pub netns_cookie: u64,
    /// Client address, network-order words.
    pub client_addr: [u32; 4],
    /// Listener address (where the connection was redirected to), network-order words.
    pub listener_addr: [u32; 4],
    /// Client port (host order).
    pub client_port: u16,
    /// Listener port (host order).
    pub listener_port: u16,
    /// Zero.
    pub _pad: u32,
}

/// Key of [`MAP_LISTENERS`]: a port in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Cookie of the network namespace.
    pub netns_cookie: u64,
    /// The port (host order).
    pub port: u16,
    /// Zero.
    pub _pad: [u8; 6],
}

/// Key of [`MAP_GUARDED`]: a destination no sandbox may connect to.
///
/// `netns_cookie` 0 means "from every network namespace" (a host address reachable over a
/// route); otherwise only sockets of that netns match (a loopback address is another host in
/// another netns). `addr` is IPv6 or IPv4-mapped in network-order words; the all-zero address
/// ([`GUARD_ANY_LOCAL`]) stands for every local destination of that netns (loopback, `0.0.0.0`,
/// `::`), which is what a listener on an unspecified address accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuardKey {
    /// Cookie of the network namespace the rule applies to; 0 = every one.
    pub netns_cookie: u64,
    /// Destination address, network-order words.
    pub addr: [u32; 4],
    /// Destination port (host order).
    pub port: u16,
    /// Zero.
    pub _pad: [u8; 6],
}

/// [`GuardKey::addr`] of a rule that matches every local destination of its netns.
pub const GUARD_ANY_LOCAL: [u32; 4] = [0; 4];

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs with explicit padding, valid for every bit pattern.
    unsafe impl aya::Pod for super::SandboxTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GuardKey {}
}
