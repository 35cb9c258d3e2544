//! Small host infrastructure with one home: control, the agent and the tests all use these,
//! so a fix lands once.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod logging;
pub mod mounts;
pub mod prometheus;
pub mod socket;

pub use logging::LogFormat;
pub use mounts::{cgroup2_mount, cgroup2_mount_in};
pub use socket::{SocketPathError, bind_socket, prepare_socket_path};
