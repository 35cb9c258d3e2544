//! `/api/audit`: the organization's audit log.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// One audit entry; values are always masked as `***`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// Its sequence number, as text.
    pub id: String,
    /// When (RFC 3339).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// The API key id that made the change (`veil-agent:ID` for agent reports).
    pub actor_key_id: String,
    /// The organization.
    #[schema(value_type = String)]
    pub organization_id: veil_link::OrgId,
    /// Like `secret.create`, `sandbox.put`, `secret.used`.
    pub action: String,
    /// `secret`, `sandbox`, `apikey`.
    pub target_type: String,
    /// The target's id.
    pub target_id: String,
    /// The target's name, when it has one.
    pub target_name: Option<String>,
    /// field → {from, to}; values are always ***. Agent reports (actor veil-agent:ID):
    /// secret.used {sandboxId, host, substituted, wrongHost, hostMismatch, blocked} aggregated
    /// per report interval (about 1 s) and (secret, sandbox, host), never per request;
    /// secret.blocked {sandboxId, host} per refused request.
    #[schema(value_type = Object)]
    pub changes: serde_json::Value,
}

/// A page of the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// The entries.
    pub items: Vec<AuditEntry>,
    /// Entries in the organization's log.
    pub total: u64,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// Query of `GET /api/audit` (kept as text: the server's messages name a bad value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200, default = 100)]
    pub limit: Option<String>,
    /// `asc` or `desc` (default: newest first).
    #[param(value_type = Option<crate::secrets::SortOrder>)]
    pub order: Option<String>,
}
