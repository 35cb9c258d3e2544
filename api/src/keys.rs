//! `/api/api-keys`: an organization's API keys.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::value::SecretValue;

/// POST body: the new key's permissions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    /// Each one of `manage:secrets`, `write:sandboxes`, `read:audit`, `admin`; at least one.
    #[schema(min_items = 1, inline, value_type = Vec<PermissionName>)]
    pub permissions: Vec<String>,
}

/// The permission names (for the document; the server parses them).
#[derive(ToSchema)]
#[schema(as = PermissionName)]
#[allow(dead_code)]
enum PermissionName {
    #[schema(rename = "manage:secrets")]
    ManageSecrets,
    #[schema(rename = "write:sandboxes")]
    WriteSandboxes,
    #[schema(rename = "read:audit")]
    ReadAudit,
    #[schema(rename = "admin")]
    Admin,
}

/// An API key as listed: never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    /// The key's id (the audit's actor).
    pub id: String,
    /// The key's organization.
    #[schema(value_type = String)]
    pub organization_id: veil_link::OrgId,
    /// Its permissions.
    pub permissions: Vec<String>,
    /// When it was created (RFC 3339).
    #[schema(format = DateTime)]
    pub created_at: String,
}

/// The answer to a POST: the key, shown this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NewApiKey {
    /// The key's metadata.
    #[serde(flatten)]
    pub key: ApiKey,
    /// The key itself; only in the creation response.
    pub value: SecretValue,
}
