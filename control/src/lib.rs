//! veil-control: the encrypted secret store and the Daytona-compatible REST API.
#![forbid(unsafe_op_in_unsafe_fn)]
// Only `run::child` (fork, namespaces, mounts between clone and exec) needs unsafe; it says so.
#![deny(unsafe_code)]
#![deny(missing_docs)]
// Tests may unwrap (house rule); production code is still checked by the non-test build.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod agent_link;
pub mod api;
pub mod auth;
pub mod bind_rules;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod fanout;
pub mod fleet;
pub mod grace;
pub mod hostcheck;
pub mod metrics;
pub mod paginate;
pub mod rekey;
/// `veil-control run` lives in its own crate; control's `[run]` config names its types.
pub use veil_run as run;
pub mod store;
pub mod timefmt;
pub mod validate;
