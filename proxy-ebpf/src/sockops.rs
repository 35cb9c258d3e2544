//! `sockops`: publishes each redirected connection's original destination once it is
//! established, keyed by its four-tuple as the agent's accepted socket sees it, and deletes
//! that record when the socket is reset or closes after the agent's side.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1,
        BPF_TCP_FIN_WAIT2,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use proxy_common::{AF_INET, ConnKey, OrigDst, STAT_ORIG_FORGOTTEN, STAT_ORIG_RECORDED};

use crate::{VEIL_ORIG, VEIL_SOCKS, count, mapped};

/// sock_ops programs always return 1.
const SOCK_OPS_DONE: u32 = 1;

macro_rules! ops_read {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: the kernel hands the program a valid context; the field is readable.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx.ops).$($field)+) }
    };
}

#[sock_ops]
pub fn veil_sockops(ctx: SockOpsContext) -> u32 {
    match try_sockops(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_sockops(ctx: &SockOpsContext) -> Result<u32, u32> {
    match ctx.op() {
        // Before the SYN: watch the socket's state so it is forgotten even if it never connects.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if tracked(ctx).is_some() {
                let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
                let _ = ctx.set_cb_flags(flags as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if let Some(orig) = tracked(ctx)
                && VEIL_ORIG.insert(conn_key(ctx), orig, 0).is_ok()
            {
                count(STAT_ORIG_RECORDED);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ops_read!(ctx, __bindgen_anon_1.args[1]) == BPF_TCP_CLOSE => {
            // SAFETY: helper available to sock_ops programs.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if tracked(ctx).is_some() {
                let _ = VEIL_SOCKS.remove(cookie);
                forget(ctx);
            }
        }
        _ => {}
    }
    Ok(SOCK_OPS_DONE)
}

/// Deletes the connection's record once nothing can take it rightfully any more: the socket
/// was reset (by either end) or closed after the agent's side. A client that closed first
/// with a FIN (FIN_WAIT1/2, CLOSING) may still have its bytes waiting in the agent's accept
/// queue, so its record stays for the agent to take; the agent also drops the records of a
/// listener it closes, and every record when it starts.
fn forget(ctx: &SockOpsContext) {
    let old = ops_read!(ctx, __bindgen_anon_1.args[0]);
    if old == BPF_TCP_FIN_WAIT1 || old == BPF_TCP_FIN_WAIT2 || old == BPF_TCP_CLOSING {
        return;
    }
    if VEIL_ORIG.remove(conn_key(ctx)).is_ok() {
        count(STAT_ORIG_FORGOTTEN);
    }
}

fn tracked(ctx: &SockOpsContext) -> Option<OrigDst> {
    // SAFETY: helper available to sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    unsafe { VEIL_SOCKS.get(cookie) }.copied()
}

/// The connection's four-tuple as the agent's accepted socket sees it.
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    let (client_addr, listener_addr) = addrs(ctx);
    ConnKey {
        // SAFETY: helper available to sock_ops programs; ctx is the program's context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        client_addr,
        listener_addr,
        client_port: ops_read!(ctx, local_port) as u16,
        // The network-order port sits in the upper half of the word on little-endian.
        listener_port: u16::from_be((ops_read!(ctx, remote_port) >> 16) as u16),
        _pad: 0,
    }
}

/// The client's local and remote addresses, IPv4 as `::ffff:a.b.c.d` whichever family the
/// socket has, so they match what the agent's IPv4 listener sees.
fn addrs(ctx: &SockOpsContext) -> ([u32; 4], [u32; 4]) {
    // Every field is read on every path: LLVM otherwise merges the two branches' loads into
    // one load at a computed ctx offset, which the verifier rejects.
    let family = ops_read!(ctx, family);
    let local4 = ops_read!(ctx, local_ip4);
    let remote4 = ops_read!(ctx, remote_ip4);
    let local6 = [
        ops_read!(ctx, local_ip6[0]),
        ops_read!(ctx, local_ip6[1]),
        ops_read!(ctx, local_ip6[2]),
        ops_read!(ctx, local_ip6[3]),
    ];
    let remote6 = [
        ops_read!(ctx, remote_ip6[0]),
        ops_read!(ctx, remote_ip6[1]),
        ops_read!(ctx, remote_ip6[2]),
        ops_read!(ctx, remote_ip6[3]),
    ];
    if family == u32::from(AF_INET) {
        (mapped(local4), mapped(remote4))
    } else {
        (local6, remote6)
    }
}
