//! Types shared by veil's eBPF programs (`proxy-ebpf`) and `veil-agent`.
//!
//! Every struct is `#[repr(C)]` with explicit padding so that the kernel and userspace agree on
//! its bytes; padding must be zeroed because hash-map keys compare as raw bytes.
#![no_std]

/// Map: cgroup id (inode of the sandbox's cgroup v2 directory) → [`SandboxTarget`].
pub const MAP_SANDBOXES: &str = "VEIL_SANDBOXES";
/// Map: socket cookie of a redirected sandbox socket → [`OrigDst`]; lives until the socket closes.
pub const MAP_SOCKS: &str = "VEIL_SOCKS";
/// Map: [`ConnKey`] (the client end as the agent's accepted socket sees its peer) → [`OrigDst`].
/// The agent removes an entry once it has read it.
pub const MAP_ORIG: &str = "VEIL_ORIG";
/// Per-CPU array of `u64` counters indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "VEIL_STATS";

/// Capacity of [`MAP_SANDBOXES`].
pub const MAX_SANDBOXES: u32 = 4096;
/// Capacity of the LRU maps [`MAP_SOCKS`] and [`MAP_ORIG`].
pub const MAX_TRACKED_CONNS: u32 = 65536;
/// Deepest cgroup level searched when looking up the sandbox that owns a socket.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// TCP connects redirected to a sandbox listener.
pub const STAT_REDIRECTED: u32 = 0;
/// UDP datagrams or connects to port 443 refused (QUIC falls back to TCP).
pub const STAT_UDP443_REFUSED: u32 = 1;
/// Connects refused because the socket's cgroup matched no registered sandbox (fail closed).
pub const STAT_NO_SANDBOX: u32 = 2;
/// Established redirected connections whose original destination was recorded for the agent.
pub const STAT_ORIG_RECORDED: u32 = 3;
/// Binds refused because a sandbox process asked for its own listener port.
pub const STAT_BIND_REFUSED: u32 = 4;
/// Number of counters in [`MAP_STATS`].
pub const STAT_COUNT: u32 = 5;

/// Every map the agent pins by name (under `<pin dir>/maps/`), so that a restarted agent's
/// programs share them with the links a previous agent left attached.
pub const PINNED_MAPS: [&str; 4] = [MAP_SANDBOXES, MAP_SOCKS, MAP_ORIG, MAP_STATS];

/// `AF_INET`, as the kernel numbers it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel numbers it.
pub const AF_INET6: u16 = 10;

/// Where a sandbox's redirected connections go: its listener ports on loopback inside its netns.
///
/// IPv4 connects go to `127.0.0.1:port_v4`, IPv4-mapped IPv6 connects to
/// `[::ffff:127.0.0.1]:port_v4`, native IPv6 connects to `[::1]:port_v6`. Ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxTarget {
    /// Port of the IPv4 listener (host order).
    pub port_v4: u16,
    /// Port of the IPv6 listener (host order); 0 when the netns has no IPv6 loopback.
    pub port_v6: u16,
    /// Zero.
    pub _pad: u32,
}

/// The destination a sandbox process dialled, before redirection.
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
}

/// Key of [`MAP_ORIG`]: the client end of a redirected connection.
///
/// `netns_cookie` tells apart sandboxes whose loopback addresses and ports are identical; `addr`
/// is the client's local address (IPv4 stored IPv4-mapped), `port` its local port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Cookie of the network namespace both ends live in.
    pub netns_cookie: u64,
    /// Client address, IPv6 or IPv4-mapped, network-order words.
    pub addr: [u32; 4],
    /// Client port (host order).
    pub port: u16,
    /// Zero.
    pub _pad: [u8; 6],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data structs with explicit padding, valid for every bit pattern.
    unsafe impl aya::Pod for super::SandboxTarget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
}
