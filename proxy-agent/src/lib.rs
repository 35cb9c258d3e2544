//! veil-agent: redirects sandbox egress into veil and forwards it.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod bpf;
pub mod config;
pub mod dialer;
pub mod egress;
pub mod guard;
pub mod hostaddrs;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod pins;
pub mod proxy;
pub mod reserved;
pub mod sandbox;
pub mod secrets;
pub mod sockets;
pub mod state;
pub mod stats;
pub mod tls;
