//! veil-agent: redirects sandbox egress into veil and forwards it.
#![forbid(unsafe_op_in_unsafe_fn)]
// Only the eBPF plumbing and the bind guard's socket-cookie call need unsafe; they say so.
#![deny(unsafe_code)]

#[allow(
    unsafe_code,
    reason = "raw bpf(2) calls and registering the kernel log fd"
)]
pub mod bpf;
pub mod config;
pub mod dialer;
pub mod direct;
pub mod egress;
#[allow(
    unsafe_code,
    reason = "registering its netlink socket with the reactor"
)]
pub mod guard;
pub mod guard_parents;
pub mod hostaddrs;
pub mod identity;
pub mod link;
pub mod local;
pub mod local_channel;
pub mod metrics;
pub mod netns_pin;
pub mod pins;
pub mod proxy;
pub mod reap;
pub mod reserved;
pub mod rlimit;
pub mod sandbox;
pub mod secrets;
pub mod sockets;
pub mod state;
pub mod stats;
pub mod tls;
