//! veil's cgroup programs: send a sandbox's TCP connections to its veil-agent listener and
//! remember where they were going.
//!
//! - `connect4` / `connect6`: refuse connects to veil's own listeners (`VEIL_GUARDED`); redirect
//!   TCP to the sandbox's loopback listener (recording the original destination and the
//!   sandbox by socket cookie) unless its entry is flagged `SANDBOX_DIRECT` (no secret applies:
//!   the connect goes where it was dialled); refuse UDP to port 443 so QUIC falls back to TCP;
//!   leave other loopback destinations alone; refuse when the socket's cgroup names no sandbox.
//! - `sendmsg4` / `sendmsg6`: refuse unconnected UDP datagrams to port 443.
//! - `sockops`: once the redirected connection is established, publish its original
//!   destination keyed by its four-tuple as the agent's accepted socket sees it (netns cookie,
//!   peer, listener); when the socket is reset, or closes after the agent's side, delete that
//!   record so no later connection reusing the tuple can find it; forget the socket.
//! - `getpeername4` / `getpeername6`: report the address the application dialled.
//! - `bind4` / `bind6`: refuse a sandbox process binding any veil listener port of its network
//!   namespace (`VEIL_LISTENERS`: every sandbox's listeners there, and veil's own in the host
//!   netns) or its own sandbox's listener port, on any address, so that while the agent is
//!   down nothing in a sandbox can stand in for it.
//!
//! The contract with the agent (map names, key and value layouts) is `proxy-common`.
#![no_std]
#![no_main]

mod sockops;

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{
    AF_INET, AF_INET6, ConnKey, GUARD_ANY_LOCAL, GuardKey, MAX_CGROUP_DEPTH, MAX_GUARDED,
    MAX_LISTENER_PORTS, MAX_SANDBOXES, MAX_TRACKED_CONNS, OrigDst, PortKey, STAT_BIND_REFUSED,
    STAT_COUNT, STAT_DIRECT, STAT_GUARDED_REFUSED, STAT_NO_SANDBOX, STAT_REDIRECTED,
    STAT_UDP443_REFUSED, SandboxTarget,
};

/// Cgroup programs: let the operation proceed.
const ALLOW: i32 = 1;
/// Cgroup programs: fail the operation with EPERM.
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const QUIC_PORT: u16 = 443;

/// `::ffff:0:0/96` prefix word, network order.
const V4_MAPPED_WORD: u32 = 0x0000_ffff_u32.to_be();
/// 127.0.0.1, network order.
const LOOPBACK_V4: u32 = 0x7f00_0001_u32.to_be();

#[map]
static VEIL_SANDBOXES: HashMap<u64, SandboxTarget> = HashMap::with_max_entries(MAX_SANDBOXES, 0);

#[map]
static VEIL_SOCKS: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_TRACKED_CONNS, 0);

#[map]
static VEIL_ORIG: LruHashMap<ConnKey, OrigDst> = LruHashMap::with_max_entries(MAX_TRACKED_CONNS, 0);

#[map]
static VEIL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[map]
static VEIL_LISTENERS: HashMap<PortKey, u64> = HashMap::with_max_entries(MAX_LISTENER_PORTS, 0);

#[map]
static VEIL_GUARDED: HashMap<GuardKey, u64> = HashMap::with_max_entries(MAX_GUARDED, 0);

fn count(stat: u32) {
    if let Some(counter) = VEIL_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot of a map we own; programs run with migration disabled. (The
        // bpf target has no atomic read-modify-write in Rust; a softirq interrupting this
        // increment on the same CPU could lose one count, acceptable for statistics.)
        unsafe { *counter += 1 };
    }
}

// ---- bpf_sock_addr field access -------------------------------------------------------------
//
// The verifier wants 4-byte accesses to these ctx fields: volatile stops LLVM from merging
// neighbouring words into one wide load or store.

macro_rules! ctx_read {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: the kernel hands the program a valid context; the field is readable.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx.sock_addr).$($field)+) }
    };
}

macro_rules! ctx_write {
    ($ctx:expr, $value:expr, $($field:tt)+) => {
        // SAFETY: as above; the field is writable for this attach type.
        unsafe { core::ptr::write_volatile(&raw mut (*$ctx.sock_addr).$($field)+, $value) }
    };
}

fn user_port(ctx: &SockAddrContext) -> u16 {
    // The low 16 bits hold the port as it sits in sockaddr: network order.
    u16::from_be(ctx_read!(ctx, user_port) as u16)
}

fn set_user_port(ctx: &SockAddrContext, port: u16) {
    ctx_write!(ctx, u32::from(port.to_be()), user_port);
}

fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    [
        ctx_read!(ctx, user_ip6[0]),
        ctx_read!(ctx, user_ip6[1]),
        ctx_read!(ctx, user_ip6[2]),
        ctx_read!(ctx, user_ip6[3]),
    ]
}

fn set_user_ip6(ctx: &SockAddrContext, addr: [u32; 4]) {
    ctx_write!(ctx, addr[0], user_ip6[0]);
    ctx_write!(ctx, addr[1], user_ip6[1]);
    ctx_write!(ctx, addr[2], user_ip6[2]);
    ctx_write!(ctx, addr[3], user_ip6[3]);
}

fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper available to cgroup sock_addr programs; ctx is the program's context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper available to cgroup sock_addr programs; ctx is the program's context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

// ---- address classification -----------------------------------------------------------------

/// 127.0.0.0/8 or 0.0.0.0 (network-order word).
fn is_local_v4(ip: u32) -> bool {
    let host = u32::from_be(ip);
    host >> 24 == 127 || host == 0
}

fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// `::1`, `::`, or an IPv4-mapped local address.
fn is_local_v6(addr: &[u32; 4]) -> bool {
    if addr[0] != 0 || addr[1] != 0 {
        return false;
    }
    match addr[2] {
        0 => addr[3] == 0 || addr[3] == 1_u32.to_be(),
        V4_MAPPED_WORD => is_local_v4(addr[3]),
        _ => false,
    }
}

fn mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

// ---- sandbox lookup ---------------------------------------------------------------------------

/// A registered sandbox: its cgroup id and listener ports.
#[derive(Clone, Copy)]
struct Sandbox {
    cgroup_id: u64,
    target: SandboxTarget,
}

/// The sandbox owning the current task's cgroup: the cgroup itself, else its nearest
/// registered ancestor.
fn find_sandbox() -> Option<Sandbox> {
    // SAFETY: helper without arguments, available to cgroup sock_addr programs.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(target) = lookup_sandbox(own) {
        return Some(Sandbox {
            cgroup_id: own,
            target,
        });
    }
    // Ancestor levels are absolute (0 = root) and yield 0 past the task's own depth; walking
    // down from the deepest level makes the nearest registered ancestor win.
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        // SAFETY: as above; any level is accepted.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id != 0
            && id != own
            && let Some(target) = lookup_sandbox(id)
        {
            return Some(Sandbox {
                cgroup_id: id,
                target,
            });
        }
        level -= 1;
    }
    None
}

fn lookup_sandbox(cgroup_id: u64) -> Option<SandboxTarget> {
    // SAFETY: the value is copied out at once; entries are only replaced whole by userspace.
    unsafe { VEIL_SANDBOXES.get(cgroup_id) }.copied()
}

// ---- connect ----------------------------------------------------------------------------------

/// What to do with a connect() or sendmsg() to a non-local destination.
enum Verdict {
    /// TCP: redirect into veil.
    Redirect,
    /// Let it through untouched.
    Pass,
    /// Fail with EPERM.
    Refuse,
}

/// Decides by socket type and protocol; only called for non-local destinations.
fn classify(ctx: &SockAddrContext, port: u16) -> Verdict {
    let sock_type = ctx_read!(ctx, type_);
    let protocol = ctx_read!(ctx, protocol);
    match (sock_type, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) => Verdict::Redirect,
        (SOCK_DGRAM, IPPROTO_UDP) if port == QUIC_PORT => {
            count(STAT_UDP443_REFUSED);
            debug!(ctx, "veil: refused UDP to port 443");
            Verdict::Refuse
        }
        (SOCK_DGRAM, IPPROTO_UDP) => Verdict::Pass,
        // Stream protocols veil cannot proxy (MPTCP, SCTP) would bypass it: fail closed.
        (SOCK_STREAM, _) => {
            warn!(
                ctx,
                "veil: refused stream socket with protocol {}", protocol
            );
            Verdict::Refuse
        }
        _ => Verdict::Pass,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let ip = ctx_read!(ctx, user_ip4);
    let port = user_port(ctx);
    let local = is_local_v4(ip);
    refuse_guarded(ctx, &mapped(ip), port, local)?;
    if local {
        return Ok(ALLOW);
    }
    match classify(ctx, port) {
        Verdict::Pass => return Ok(ALLOW),
        Verdict::Refuse => return Err(REFUSE),
        Verdict::Redirect => {}
    }
    let sandbox = sandbox_or_refuse(ctx)?;
    if is_direct(&sandbox) {
        return Ok(ALLOW);
    }
    record(
        ctx,
        &OrigDst {
            addr: mapped(ip),
            port,
            family: AF_INET,
            _pad: 0,
            cgroup_id: sandbox.cgroup_id,
        },
    )?;
    ctx_write!(ctx, LOOPBACK_V4, user_ip4);
    set_user_port(ctx, sandbox.target.port_v4);
    count(STAT_REDIRECTED);
    Ok(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let addr = user_ip6(ctx);
    let port = user_port(ctx);
    let local = is_local_v6(&addr);
    refuse_guarded(ctx, &addr, port, local)?;
    if local {
        return Ok(ALLOW);
    }
    match classify(ctx, port) {
        Verdict::Pass => return Ok(ALLOW),
        Verdict::Refuse => return Err(REFUSE),
        Verdict::Redirect => {}
    }
    let sandbox = sandbox_or_refuse(ctx)?;
    if is_direct(&sandbox) {
        return Ok(ALLOW);
    }
    let target = sandbox.target;
    let (new_addr, new_port) = if is_v4_mapped(&addr) {
        (mapped(LOOPBACK_V4), target.port_v4)
    } else if target.port_v6 != 0 {
        ([0, 0, 0, 1_u32.to_be()], target.port_v6)
    } else {
        warn!(
            ctx,
            "veil: refused IPv6 connect: sandbox has no IPv6 listener"
        );
        return Err(REFUSE);
    };
    record(
        ctx,
        &OrigDst {
            addr,
            port,
            family: AF_INET6,
            _pad: 0,
            cgroup_id: sandbox.cgroup_id,
        },
    )?;
    set_user_ip6(ctx, new_addr);
    set_user_port(ctx, new_port);
    count(STAT_REDIRECTED);
    Ok(ALLOW)
}

/// Refuses (counted) a connect to one of veil's own listeners: a host address guarded from
/// every netns, an address guarded in this socket's netns, or — for a local destination — any
/// local address of this netns when the listener is on an unspecified address.
fn refuse_guarded(
    ctx: &SockAddrContext,
    addr: &[u32; 4],
    port: u16,
    local: bool,
) -> Result<(), i32> {
    let netns = netns_cookie(ctx);
    let mut key = GuardKey {
        netns_cookie: 0,
        addr: *addr,
        port,
        _pad: [0; 6],
    };
    let mut hit = is_guarded(&key);
    if !hit {
        key.netns_cookie = netns;
        hit = is_guarded(&key);
    }
    if !hit && local {
        key.addr = GUARD_ANY_LOCAL;
        hit = is_guarded(&key);
    }
    if hit {
        count(STAT_GUARDED_REFUSED);
        warn!(
            ctx,
            "veil: refused connect to veil's own listener on port {}", port
        );
        return Err(REFUSE);
    }
    Ok(())
}

fn is_guarded(key: &GuardKey) -> bool {
    // SAFETY: only the presence of the entry is used.
    unsafe { VEIL_GUARDED.get(key) }.is_some()
}

fn sandbox_or_refuse(ctx: &SockAddrContext) -> Result<Sandbox, i32> {
    find_sandbox().ok_or_else(|| {
        count(STAT_NO_SANDBOX);
        warn!(
            ctx,
            "veil: refused connect: cgroup belongs to no registered sandbox"
        );
        REFUSE
    })
}

/// Whether the sandbox's connects go where they were dialled (counted): no secret applies to
/// it and it leaves from its own netns, so veil would only pass the bytes through. Nothing is
/// recorded, so getpeername and sock_ops leave the socket alone.
fn is_direct(sandbox: &Sandbox) -> bool {
    let direct = sandbox.target.direct();
    if direct {
        count(STAT_DIRECT);
    }
    direct
}

/// Remembers the original destination by socket cookie; a connect we cannot track is refused
/// rather than sent to the agent without an origin.
fn record(ctx: &SockAddrContext, orig: &OrigDst) -> Result<(), i32> {
    VEIL_SOCKS.insert(socket_cookie(ctx), orig, 0).map_err(|_| {
        warn!(ctx, "veil: refused connect: cannot record its destination");
        REFUSE
    })
}

// ---- sendmsg ----------------------------------------------------------------------------------

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    match try_sendmsg4(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_sendmsg4(ctx: &SockAddrContext) -> Result<i32, i32> {
    if is_local_v4(ctx_read!(ctx, user_ip4)) {
        return Ok(ALLOW);
    }
    udp_verdict(ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    match try_sendmsg6(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_sendmsg6(ctx: &SockAddrContext) -> Result<i32, i32> {
    if is_local_v6(&user_ip6(ctx)) {
        return Ok(ALLOW);
    }
    udp_verdict(ctx)
}

/// sendmsg hooks run only for UDP, where the only decision is the QUIC refusal.
fn udp_verdict(ctx: &SockAddrContext) -> Result<i32, i32> {
    match classify(ctx, user_port(ctx)) {
        Verdict::Refuse => Err(REFUSE),
        Verdict::Pass | Verdict::Redirect => Ok(ALLOW),
    }
}

// ---- getpeername ------------------------------------------------------------------------------

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    match try_getpeername4(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_getpeername4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the value is copied out at once.
    if let Some(orig) = unsafe { VEIL_SOCKS.get(socket_cookie(ctx)) }.copied() {
        ctx_write!(ctx, orig.addr[3], user_ip4);
        set_user_port(ctx, orig.port);
    }
    Ok(ALLOW)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    match try_getpeername6(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_getpeername6(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the value is copied out at once.
    if let Some(orig) = unsafe { VEIL_SOCKS.get(socket_cookie(ctx)) }.copied() {
        // IPv4 origins are stored mapped, which is how an IPv6 socket reports them.
        set_user_ip6(ctx, orig.addr);
        set_user_port(ctx, orig.port);
    }
    Ok(ALLOW)
}

// ---- bind ---------------------------------------------------------------------------------------

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    // The verifier wants bind programs to return a value it can bound to 0..=3: constants.
    if bind_allowed(&ctx) { ALLOW } else { REFUSE }
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    if bind_allowed(&ctx) { ALLOW } else { REFUSE }
}

/// Refuses every veil listener port of the socket's netns, and the sandbox's own listener
/// ports in any netns, whatever the address: a dual-stack or wildcard bind would shadow the
/// agent's loopback listener just as well. Port 0 is left to the kernel, which never picks a
/// port the agent has reserved in that netns.
fn bind_allowed(ctx: &SockAddrContext) -> bool {
    let port = user_port(ctx);
    if port == 0 {
        return true;
    }
    let key = PortKey {
        netns_cookie: netns_cookie(ctx),
        port,
        _pad: [0; 6],
    };
    // SAFETY: only the presence of the entry is used.
    let listener = unsafe { VEIL_LISTENERS.get(&key) }.is_some();
    let own = match find_sandbox() {
        Some(s) => port == s.target.port_v4 || (s.target.port_v6 != 0 && port == s.target.port_v6),
        None => false,
    };
    if listener || own {
        count(STAT_BIND_REFUSED);
        warn!(
            ctx,
            "veil: refused bind to the sandbox listener port {}", port
        );
        return false;
    }
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The license the kernel is told: the project's own. None of the helpers used is GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
