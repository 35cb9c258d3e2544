//! What an API key may do, stored in its record: [`crate::auth`] decides with it, the store
//! keeps it; here so that neither module needs the other's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A permission carried by an API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Permission {
    /// Create, read, update and delete secrets.
    #[serde(rename = "manage:secrets")]
    ManageSecrets,
    /// Register sandboxes and mount secrets into them.
    #[serde(rename = "write:sandboxes")]
    WriteSandboxes,
    /// Read the audit log.
    #[serde(rename = "read:audit")]
    ReadAudit,
    /// Everything, including key administration.
    #[serde(rename = "admin")]
    Admin,
}

impl Permission {
    /// Every permission.
    pub const ALL: [Permission; 4] = [
        Self::ManageSecrets,
        Self::WriteSandboxes,
        Self::ReadAudit,
        Self::Admin,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ManageSecrets => "manage:secrets",
            Self::WriteSandboxes => "write:sandboxes",
            Self::ReadAudit => "read:audit",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown permission name.
#[derive(Debug, thiserror::Error)]
#[error("unknown permission {0:?} (expected manage:secrets, write:sandboxes, read:audit or admin)")]
pub struct UnknownPermission(String);

impl FromStr for Permission {
    type Err = UnknownPermission;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPermission(s.to_owned()))
    }
}
