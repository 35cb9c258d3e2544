//! `/api/sandbox/{id}` and `/api/sandbox/{id}/secrets`: veil's sandbox registry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use veil_link::{Egress, SandboxId, SecretId};

/// `[{"ENV_VAR": "secret-name"}, …]`: each entry exactly one key (Daytona's shape).
pub type MountList = Vec<BTreeMap<String, String>>;

/// PUT body: registers or replaces a sandbox (every omitted field takes its default). With a
/// `cgroup` it is declared and bound in one step; without, it is only declared (secrets,
/// egress) and bound later by veil-agent on the host (the container runtime's hook).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSandbox {
    /// cgroup v2 path under a configured parent. Omitted: the sandbox is declared, not bound
    /// (on an existing bound sandbox its binding is kept; secrets, egress and keep change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// veil: keep the declaration when the sandbox is unbound (a restarted container can bind
    /// again); default false (an unbind deletes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<bool>,
    /// /run/netns/NAME or /proc/PID/ns/net (only with cgroup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Mounted secrets: env var → secret name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub secrets: Option<MountList>,
    /// veil: where veil-agent opens the sandbox's upstream connections. sandbox (default):
    /// inside the sandbox's own netns (or the host's when it has none), so its routes, source
    /// address and firewall apply exactly as without veil. host: from the host netns through
    /// the agent's egress rules (loopback, link-local and cloud metadata, the host's own
    /// addresses, private and ULA ranges refused unless agent.egress_allow opens them), for a
    /// netns whose only way out is veil, as veil-control run --netns makes. Omitted or null =
    /// sandbox; changing it on a re-PUT applies to new connections at once. Kept as text so
    /// that the server's message names a bad one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<EgressMode>, inline)]
    pub egress: Option<String>,
    /// veil fleet: the enrolled host whose agent enforces the sandbox (its cgroup and netns
    /// are that host's); only that host's agents receive it and its secrets. Omitted = the
    /// agent on control's own host. A sandbox cannot move to another host (409).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// The egress modes (for the document).
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "lowercase")]
pub(crate) enum EgressMode {
    Sandbox,
    Host,
}

/// PUT body of `/secrets`: replaces the mounted set; [] detaches all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSandboxSecrets {
    /// Mounted secrets: env var → secret name (null detaches all, as []).
    #[serde(deserialize_with = "null_as_empty")]
    #[schema(value_type = Vec<Object>)]
    pub secrets: MountList,
}

/// `null` as an empty list (the field itself stays required).
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<MountList, D::Error> {
    Ok(Option::<MountList>::deserialize(d)?.unwrap_or_default())
}

/// A registered sandbox: placeholders and hosts, never values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// The sandbox's id.
    #[schema(value_type = String)]
    pub id: SandboxId,
    /// Its cgroup (relative to the cgroup2 root); empty while unbound.
    pub cgroup: String,
    /// Its network namespace.
    pub netns: Option<String>,
    /// veil: whether it is bound to a cgroup (only a bound sandbox reaches veil-agent).
    #[serde(default = "yes")]
    pub bound: bool,
    /// veil: whether the declaration outlives an unbind.
    #[serde(default)]
    pub keep: bool,
    /// veil: where the agent opens its upstream connections (see PutSandbox).
    #[schema(value_type = EgressMode, inline)]
    pub egress: Egress,
    /// Mounted secrets: env var → secret name.
    #[schema(value_type = Vec<Object>)]
    pub secrets: MountList,
    /// ENV → placeholder.
    pub env: BTreeMap<String, String>,
    /// PEM of the CA the sandbox must trust (once an agent is linked); same as caCertificate.
    pub ca_cert: Option<String>,
    /// PEM of veil-agent's interception CA, which the sandbox must trust; the last CA an agent
    /// reported (kept across restarts), null until one did.
    pub ca_certificate: Option<String>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// veil fleet: the host whose agent enforces it (absent = control's own host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

fn yes() -> bool {
    true
}

/// POST body of `/sandbox`: declares a sandbox under an id the server generates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeclareSandbox {
    /// Mounted secrets: env var → secret name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub secrets: Option<MountList>,
    /// Where veil-agent opens the sandbox's upstream connections (see PutSandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<EgressMode>, inline)]
    pub egress: Option<String>,
    /// Keep the declaration when the sandbox is unbound (see PutSandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<bool>,
    /// veil fleet: the enrolled host whose agent may bind it (see PutSandbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A mounted secret as the sandbox sees it: env, placeholder, hosts — never a value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MountedSecret {
    /// The environment variable.
    pub env: String,
    /// The placeholder it holds.
    pub placeholder: String,
    /// The hosts the secret may be sent to.
    pub hosts: Vec<String>,
    /// The secret's id.
    #[schema(value_type = String)]
    pub secret_id: SecretId,
    /// The secret's name.
    pub name: String,
}
