//! `/api/secret…`: Daytona's secret object and veil's additions to it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use veil_link::{Revision, SecretId};

use crate::value::SecretValue;

/// What the agent does with a placeholder sent to a host the secret does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WrongHost {
    /// Forwarded unchanged (Daytona's behaviour).
    #[default]
    Forward,
    /// The request is refused with 403 and audited as `secret.blocked`.
    Block,
}

/// POST body: a new secret.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSecret {
    /// `^[a-zA-Z_][a-zA-Z0-9_-]*$`, unique in the organization.
    #[schema(pattern = "^[a-zA-Z_][a-zA-Z0-9_-]*$", max_length = 255)]
    pub name: String,
    /// At most 64 KiB; write-only.
    #[schema(min_length = 1)]
    pub value: SecretValue,
    /// Free text, at most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Hostnames or `*.wildcards`; omitted or [] = unrestricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// veil: placeholders in request bodies are replaced too (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_substitution: Option<bool>,
    /// veil: default forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub wrong_host: Option<WrongHost>,
}

/// PATCH body: omitted or null fields are unchanged; hosts [] makes the secret unrestricted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateSecret {
    /// A new value (rotation; the placeholder stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<SecretValue>,
    /// A new description; "" clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The new allowed hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// veil: placeholders in request bodies are replaced too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_substitution: Option<bool>,
    /// veil: forward or block a placeholder sent to another host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub wrong_host: Option<WrongHost>,
}

impl UpdateSecret {
    /// Whether the body asks for no change at all.
    pub fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.description.is_none()
            && self.hosts.is_none()
            && self.body_substitution.is_none()
            && self.wrong_host.is_none()
    }
}

/// Query of a PATCH.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UpdateSecretQuery {
    /// Wait up to this long (1 ms to 60 s; a plain number is seconds) for every veil-agent
    /// that holds or held the secret to acknowledge the new revision.
    #[param(pattern = "^[0-9.]+(ms|s)?$", example = "5s")]
    pub wait: Option<String>,
}

/// A secret's metadata: Daytona's fields, then veil's. Never its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    /// The secret's id (a UUID).
    #[schema(value_type = String)]
    pub id: SecretId,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: Option<String>,
    /// What a sandbox holds instead of the value.
    pub placeholder: String,
    /// The hosts it may be sent to; [] = unrestricted.
    pub hosts: Vec<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// veil: bumped on every change of the secret.
    #[schema(value_type = u64)]
    pub revision: Revision,
    /// veil: placeholders in request bodies are replaced too.
    pub body_substitution: bool,
    /// veil: the placeholder sent to a host the secret does not allow is forwarded unchanged
    /// (Daytona's behaviour) or the request is refused with 403 and audited as secret.blocked.
    #[schema(inline)]
    pub wrong_host: WrongHost,
}

/// One agent's acknowledgement of a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentAck {
    /// The agent's stable id.
    pub agent_id: String,
    /// A disconnected agent keeps enforcing the revision it acknowledged.
    pub connected: bool,
    /// null = sent, not acknowledged yet.
    #[schema(value_type = Option<u64>)]
    pub acknowledged_revision: Option<Revision>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub acknowledged_at: Option<String>,
}

/// What the agents acknowledged (in memory in veil-control: after its restart every agent
/// re-acknowledges through its snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Propagation {
    /// No agent may still use an older revision than the secret's.
    pub complete: bool,
    /// Every agent that holds the secret, was sent it, or held it when it disconnected.
    pub agents: Vec<AgentAck>,
}

/// Counts since creation for one host (the SNI), as the agents reported them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostUsage {
    /// Placeholders replaced by the value.
    pub substituted: u64,
    /// Placeholder sent to a host the secret does not allow (forwarded unchanged).
    pub wrong_host: u64,
    /// Host / :authority differed from the SNI (not substituted).
    pub host_mismatch: u64,
    /// Requests refused (wrongHost: block).
    pub blocked: u64,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub last_seen_at: Option<String>,
}

/// The single-secret view (GET, PATCH): the metadata plus what the agents acknowledged and
/// what they reported about its use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretDetail {
    /// The metadata.
    #[serde(flatten)]
    pub secret: Secret,
    /// veil: which revision each veil-agent acknowledged, and when.
    pub propagation: Propagation,
    /// veil: last time an agent substituted the value (reported about once a second).
    #[schema(format = DateTime)]
    pub last_used_at: Option<String>,
    /// veil: per host (the SNI): counts since creation, as the agents reported them.
    pub usage: BTreeMap<String, HostUsage>,
}

/// A page of secrets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretPage {
    /// The secrets.
    pub items: Vec<Secret>,
    /// Secrets that match, over all pages.
    pub total: u64,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// Sort keys of the paginated list.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
pub(crate) enum SortField {
    Name,
    CreatedAt,
    UpdatedAt,
}

/// Sort orders.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "lowercase")]
pub(crate) enum SortOrder {
    Asc,
    Desc,
}

/// Query of `GET /api/secret/paginated` (kept as text: the server's messages name a bad value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SecretPageQuery {
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 200 (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200, default = 100)]
    pub limit: Option<String>,
    /// Case-insensitive partial match on the name.
    pub name: Option<String>,
    /// name, createdAt or updatedAt (default createdAt).
    #[param(value_type = Option<SortField>, inline)]
    pub sort: Option<String>,
    /// asc or desc (default desc).
    #[param(value_type = Option<SortOrder>, inline)]
    pub order: Option<String>,
}
