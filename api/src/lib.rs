//! The bodies of veil-control's REST API (`/api/...`), shared by the server and its clients so
//! that one place knows the wire format.
//!
//! Field names are Daytona's (camelCase); veil's additions are documented as such. Request
//! bodies reject unknown fields; responses never carry a secret value.

#![forbid(unsafe_code)]

pub mod audit;
pub mod error;
pub mod keys;
pub mod names;
pub mod sandboxes;
pub mod secrets;
pub mod value;

pub use audit::{AuditEntry, AuditPage, AuditQuery};
pub use error::ErrorBody;
pub use keys::{ApiKey, CreateApiKey, NewApiKey};
pub use sandboxes::{
    DeclareSandbox, MountList, MountedSecret, PutSandbox, PutSandboxSecrets, Sandbox,
};
pub use secrets::{
    AgentAck, CreateSecret, HostUsage, Propagation, Secret, SecretDetail, SecretPage,
    SecretPageQuery, UpdateSecret, UpdateSecretQuery, WrongHost,
};
pub use value::SecretValue;
pub use veil_link::{Egress, OrgId, Revision, SandboxId, SecretId};
