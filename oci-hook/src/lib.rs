//! veil-oci-hook: gives a container the placeholders of the veil sandbox it names and binds the
//! container's cgroup and netns to that sandbox before its workload runs.
//!
//! Three pieces, all talking to veil-agent's root-only local socket ([`veil_link::local`]):
//! the runtime shim ([`runtime`]) edits `config.json` on `create` and execs the real runc; the
//! `createRuntime` hook ([`hooks::create_runtime`]) binds; the `poststop` hook unbinds.

#![forbid(unsafe_code)]

pub mod agent;
pub mod error;
pub mod hooks;
pub mod procfs;
pub mod runc_args;
pub mod rundir;
pub mod runtime;
pub mod settings;
pub mod spec;
pub mod timing;
