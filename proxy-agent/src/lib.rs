//! veil-agent: redirects sandbox egress into veil and forwards it.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod bpf;
pub mod config;
pub mod proxy;
pub mod sandbox;
pub mod sockets;
pub mod stats;
