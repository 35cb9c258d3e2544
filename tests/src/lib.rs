//! End-to-end test harness for veil.
//!
//! Every fixture here creates real kernel objects (network namespaces, veth pairs, cgroups,
//! processes, eBPF queries) and removes them on `Drop`, also when a test panics. Names encode the
//! owning test process's pid, so [`cleanup_stale`] (run once per process by the constructors)
//! removes what dead test processes left behind. Fixtures panic with a specific message when
//! setup fails: a failed setup is a failed test. Everything needs root: see [`require_root`].
//!
//! ```no_run
//! use veil_tests::{NetNs, Sandbox, TcpHello, Veil, World, require_root};
//!
//! require_root();
//! let world = World::new(); // upstream netns, veth to the host netns
//! let ns = NetNs::new("app");
//! let sb = Sandbox::new("app", Some(&ns)); // a cgroup + that netns
//! let hello = TcpHello::start(world.netns(), world.upstream_ip4(), "up");
//! // veil-control + veil-agent; the sandbox is registered through REST (answers once live).
//! let _veil = Veil::start(&[sb.agent_entry("app")]);
//! let out = sb.probe(&["tcp", "--addr", &hello.addr().to_string()]);
//! // The upstream saw the agent's (host-side) address, the app saw what it dialled.
//! let json = out.expect_ok();
//! assert!(json["reply"].as_str().unwrap().starts_with(&format!("up {}:", world.host_v4())));
//! assert_eq!(json["peer_from_getpeername"], hello.addr().to_string());
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![warn(missing_docs)]
pub mod adversary;
pub mod agent;
pub mod alloc;
pub mod bind;
pub mod bpfq;
pub mod bulk_upstream;
pub mod cgroup;
pub mod clients;
pub mod clock;
pub mod cmd;
pub mod control;
pub mod decoding;
pub mod dockerd;
pub mod egress;
pub mod env;
pub mod fleet;
pub mod grpc_upstream;
pub mod hostlink;
pub mod https;
pub mod interactive;
pub mod intercept_world;
pub mod netns;
pub mod oci_image;
pub mod oci_world;
pub mod owner;
pub mod pod;
pub mod podman;
pub mod postgres;
pub mod replicas;
pub mod request_policy;
pub mod runc;
pub mod runcli;
pub mod sandbox;
pub mod servers;
pub mod sse_upstream;
pub mod stale;
pub mod veil;
pub mod world;
pub mod ws_clients;
pub mod ws_upstream;

pub use agent::{Agent, AgentOptions, AgentSandbox};
pub use bpfq::{AttachType, attached_prog_ids, orig_map_len, sandbox_map_has};
pub use cgroup::Cgroup;
pub use cmd::{ProbeOutput, output_within};
pub use env::{bin_path, cgroup2_mount, require_root};
pub use https::{HttpsUpstream, Reply as UpstreamReply, Seen, TestCa};
pub use netns::NetNs;
pub use sandbox::{Sandbox, probe_host};
pub use servers::{HttpHello, TcpEcho, TcpHello, UdpEcho};
pub use stale::cleanup_stale;
pub use veil::Veil;
pub use world::{SandboxLink, World};
