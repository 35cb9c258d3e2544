//! The local channel between veil-control and veil-agent.
//!
//! A Unix stream socket owned by root (control listens, agents connect; each side checks the
//! other's peer credentials). Frames are a 4-byte big-endian length and a JSON message. After
//! the agent's [`AgentMsg::Hello`], control sends a [`ControlMsg::Snapshot`] of everything the
//! agent must enforce, then pushes changes; the agent answers every numbered message with
//! [`AgentMsg::Applied`], which for a message carrying secrets also acknowledges their revisions;
//! unprompted, it reports aggregated [`AgentMsg::Usage`] (about once a second) and
//! [`AgentMsg::Blocked`] requests (promptly). Secret values travel only here, only for secrets mounted in some
//! sandbox, and live in [`SecretValue`]s that are zeroized on drop and never printed.

#![forbid(unsafe_code)]

pub mod codec;
pub mod ids;
pub mod local;
pub mod proto;

pub use codec::{FrameError, MAX_FRAME, read_frame, write_frame};
pub use ids::{AgentId, IdError, OrgId, Revision, SandboxId, SecretId};
pub use local::{Declared, LocalError, LocalRequest, LocalResponse, RefusalKind};
pub use proto::{
    AgentMsg, BlockedReport, ControlMsg, Egress, MAX_PREVIOUS_VALUES, PROTOCOL_VERSION,
    SandboxState, SecretState, SecretValue, UsageReport, WrongHost,
};
