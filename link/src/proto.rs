//! The messages of the control ↔ agent channel.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ids::{AgentId, OrgId, Revision, SandboxId, SecretId};
use crate::local::LocalResponse;

/// Version spoken by this build; a Hello with another version is refused.
pub const PROTOCOL_VERSION: u32 = 4;

/// A secret's plaintext: zeroized on drop, redacted in Debug, serialized only onto the channel.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(transparent)]
pub struct SecretValue(String);

impl SecretValue {
    /// Wraps a plaintext (taken by value so no other copy stays behind).
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The plaintext, for the substitution path only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(***)")
    }
}

/// A sandbox as the agent must enforce it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxState {
    /// Sandbox id (unique across organizations).
    pub id: SandboxId,
    /// Organization the sandbox belongs to.
    pub org: OrgId,
    /// cgroup v2 directory, relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    /// Network namespace file; `None` = the sandbox shares the host's.
    pub netns: Option<PathBuf>,
    /// Mounted secrets: environment variable name → secret id.
    pub mounts: BTreeMap<String, SecretId>,
    /// Where the agent opens the sandbox's upstream connections.
    #[serde(default)]
    pub egress: Egress,
    /// The id (inode) of the cgroup2 directory the sandbox was bound to; the agent refuses to
    /// enforce the sandbox on a cgroup with another id (the path was reused by a new cgroup).
    /// `None` = registered by path only (one-step PUT, older peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

/// Where a sandbox's upstream connections leave from (security invariant 7: veil never widens
/// what a sandbox can reach).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Inside the sandbox's own network namespace: its routes, source address and firewall
    /// apply exactly as without veil.
    #[default]
    Sandbox,
    /// From the host, through the agent's egress deny list: for a namespace whose only way out
    /// is veil (what `veil-control run --netns` makes).
    Host,
}

/// A secret mounted in at least one sandbox, as the agent needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretState {
    /// Secret id.
    pub id: SecretId,
    /// Organization the secret belongs to.
    pub org: OrgId,
    /// Secret name (for messages; never the value).
    pub name: String,
    /// The placeholder sandboxes hold.
    pub placeholder: String,
    /// Allowed host patterns (normalised); empty = unrestricted.
    pub hosts: Vec<String>,
    /// The plaintext.
    pub value: SecretValue,
    /// Bumped on every change of the secret.
    pub revision: Revision,
    /// Whether placeholders in request bodies are replaced too (bounded; off by default).
    #[serde(default)]
    pub body_substitution: bool,
    /// What the agent does with this placeholder in a request to a host the secret does not allow.
    #[serde(default)]
    pub wrong_host: WrongHost,
    /// Values this secret had before, still inside control's `rotated_value_grace` (newest
    /// first, at most [`MAX_PREVIOUS_VALUES`]): scrubbed from responses, never substituted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<SecretValue>,
    /// The secret was deleted: `value` is its last value, kept only so that responses are
    /// still scrubbed of it during the grace period, in every sandbox of its organization. Its
    /// placeholder is never honoured.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

/// Most rotated-out values control keeps (and sends) per secret.
pub const MAX_PREVIOUS_VALUES: usize = 4;

/// What happens to a placeholder sent to a host its secret does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WrongHost {
    /// Forwarded unchanged (Daytona's behaviour).
    #[default]
    Forward,
    /// The agent answers 403 naming the secret and control records an audit event.
    Block,
}

/// Messages from control to an agent; each carries a sequence number the agent acknowledges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMsg {
    /// Everything the agent must enforce; it reconciles to exactly this.
    Snapshot {
        /// Sequence number.
        seq: u64,
        /// All registered sandboxes.
        sandboxes: Vec<SandboxState>,
        /// Every secret mounted in one of them, and every retired secret (see
        /// [`SecretState::retired`]) of their organizations.
        secrets: Vec<SecretState>,
        /// veil's own listeners (control's REST and metrics, the agent's metrics): no sandbox
        /// may connect to them, whatever its netns. An unspecified address (`0.0.0.0`, `::`)
        /// means that port on every address of the host.
        #[serde(default)]
        guarded: Vec<SocketAddr>,
    },
    /// A sandbox was registered or its mounts changed.
    PutSandbox {
        /// Sequence number.
        seq: u64,
        /// Its new state.
        sandbox: SandboxState,
    },
    /// A sandbox was removed: detach and close everything for it.
    DeleteSandbox {
        /// Sequence number.
        seq: u64,
        /// Its id.
        id: SandboxId,
    },
    /// A mounted secret is new or changed.
    PutSecret {
        /// Sequence number.
        seq: u64,
        /// Its new state.
        secret: SecretState,
    },
    /// A secret was deleted or is no longer mounted anywhere.
    DeleteSecret {
        /// Sequence number.
        seq: u64,
        /// Its id.
        id: SecretId,
    },
    /// The answer to an agent's request ([`AgentMsg::Bind`], [`AgentMsg::Unbind`],
    /// [`AgentMsg::Describe`]); outside the seq/ack scheme (never acknowledged).
    Reply {
        /// The agent's request number.
        req: u64,
        /// The outcome.
        outcome: LocalResponse,
    },
}

impl ControlMsg {
    /// The sequence number to acknowledge; `None` for a [`ControlMsg::Reply`].
    pub fn seq(&self) -> Option<u64> {
        match self {
            ControlMsg::Snapshot { seq, .. }
            | ControlMsg::PutSandbox { seq, .. }
            | ControlMsg::DeleteSandbox { seq, .. }
            | ControlMsg::PutSecret { seq, .. }
            | ControlMsg::DeleteSecret { seq, .. } => Some(*seq),
            ControlMsg::Reply { .. } => None,
        }
    }
}

/// Messages from an agent to control.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// First message on every connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the agent.
        protocol: u32,
        /// Stable identity of the agent (kept in its state dir).
        agent_id: AgentId,
        /// PEM certificate of the agent's interception CA, which sandboxes must trust.
        ca_pem: String,
    },
    /// Result of applying control's message `seq`. Control knows which secret revisions each
    /// message carried, so an error-free `Applied` is also the acknowledgement of those revisions.
    Applied {
        /// The acknowledged sequence number.
        seq: u64,
        /// Per-sandbox or per-secret failures; empty = fully applied.
        errors: Vec<String>,
    },
    /// Placeholder occurrences since the previous report, aggregated per (sandbox, secret, host).
    /// Not acknowledged: sent at most about once a second, never per request.
    Usage {
        /// When the agent took these counts, ms since the epoch.
        at_ms: i64,
        /// One entry per (sandbox, secret, host) with activity.
        reports: Vec<UsageReport>,
    },
    /// Requests refused because a placeholder went to a host its secret blocks; sent promptly.
    Blocked {
        /// One entry per refused request.
        events: Vec<BlockedReport>,
    },
    /// What a declared sandbox is given (for a host-side tool); answered by a Reply.
    Describe {
        /// The agent's request number, echoed in the Reply.
        req: u64,
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// Binds a declared sandbox to a cgroup (and netns) of this agent's host; answered by a
    /// Reply once this agent acknowledged the resulting PutSandbox (its redirect is live).
    Bind {
        /// The agent's request number, echoed in the Reply.
        req: u64,
        /// The sandbox.
        sandbox: SandboxId,
        /// cgroup v2 directory, relative to the cgroup2 mount, no leading `/`.
        cgroup: PathBuf,
        /// The cgroup directory's id (inode) when the agent checked it.
        cgroup_id: u64,
        /// The agent's pin of the sandbox's network namespace; `None` = the host's.
        netns: Option<PathBuf>,
    },
    /// Unbinds a sandbox; answered by a Reply after the agents detached it.
    Unbind {
        /// The agent's request number, echoed in the Reply.
        req: u64,
        /// The sandbox.
        sandbox: SandboxId,
    },
    /// A bound sandbox's cgroup is gone or was replaced (another id at its path): control
    /// unbinds it if `cgroup_id` is still the binding it holds. Not answered.
    Gone {
        /// The sandbox.
        sandbox: SandboxId,
        /// The id of the cgroup the agent enforced the sandbox on.
        cgroup_id: u64,
    },
}

/// Occurrences of one secret's placeholder in one sandbox towards one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// Sandbox id.
    pub sandbox: SandboxId,
    /// Secret id.
    pub secret_id: SecretId,
    /// The connection's SNI.
    pub host: String,
    /// Replaced by the value.
    pub substituted: u64,
    /// Left alone: the secret does not allow the host.
    pub wrong_host: u64,
    /// Left alone: Host / :authority differed from the SNI.
    pub host_mismatch: u64,
    /// Refused: the secret blocks hosts it does not allow.
    pub blocked: u64,
}

impl UsageReport {
    /// No occurrence yet of `secret_id` in `sandbox` towards `host`.
    pub fn new(sandbox: SandboxId, secret_id: SecretId, host: String) -> Self {
        Self {
            sandbox,
            secret_id,
            host,
            substituted: 0,
            wrong_host: 0,
            host_mismatch: 0,
            blocked: 0,
        }
    }
}

/// One request refused because its placeholder went to a host the secret blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedReport {
    /// Sandbox id.
    pub sandbox: SandboxId,
    /// Secret id.
    pub secret_id: SecretId,
    /// The connection's SNI.
    pub host: String,
    /// When, ms since the epoch.
    pub at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_value_never_prints() {
        let v = SecretValue::new("hunter2-very-secret".into());
        let s = SecretState {
            id: "i".parse().unwrap(),
            org: "o".parse().unwrap(),
            name: "n".into(),
            placeholder: "p".into(),
            hosts: vec![],
            value: v.clone(),
            revision: Revision(1),
            body_substitution: false,
            wrong_host: Default::default(),
            previous: vec![SecretValue::new("hunter2-older".into())],
            retired: false,
        };
        assert!(!format!("{v:?} {s:?}").contains("hunter2"));
        // Older peers' messages (no previous values, not retired, no egress) still parse.
        let j = serde_json::to_string(&s).unwrap();
        let legacy = j.replace(r#","previous":["hunter2-older"]"#, "");
        assert!(
            !legacy.contains("previous") && !legacy.contains("retired"),
            "{legacy}"
        );
        let back: SecretState = serde_json::from_str(&legacy).unwrap();
        assert!(back.previous.is_empty() && !back.retired);
        assert_eq!(v.expose(), "hunter2-very-secret");
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = ControlMsg::DeleteSandbox {
            seq: 7,
            id: "sb".parse().unwrap(),
        };
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"type":"delete_sandbox","seq":7,"id":"sb"}"#);
        assert_eq!(serde_json::from_str::<ControlMsg>(&j).unwrap(), m);
        assert_eq!(m.seq(), Some(7));
        let u = AgentMsg::Usage {
            at_ms: 5,
            reports: vec![UsageReport {
                substituted: 3,
                ..UsageReport::new("sb".parse().unwrap(), "s".parse().unwrap(), "h".into())
            }],
        };
        let j = serde_json::to_string(&u).unwrap();
        assert!(j.starts_with(r#"{"type":"usage","at_ms":5,"#), "{j}");
        assert_eq!(serde_json::from_str::<AgentMsg>(&j).unwrap(), u);
    }

    #[test]
    fn malformed_ids_in_messages_are_refused() {
        let bad = r#"{"type":"delete_sandbox","seq":1,"id":"-x"}"#;
        let e = serde_json::from_str::<ControlMsg>(bad).unwrap_err();
        assert!(e.to_string().contains("sandbox id"), "{e}");
        let hello = r#"{"type":"hello","protocol":4,"agent_id":"not hex","ca_pem":"p"}"#;
        let e = serde_json::from_str::<AgentMsg>(hello).unwrap_err();
        assert!(e.to_string().contains("agent id"), "{e}");
    }

    #[test]
    fn binding_requests_and_replies_round_trip() {
        let bind = AgentMsg::Bind {
            req: 3,
            sandbox: "sb".parse().unwrap(),
            cgroup: "docker/abc".into(),
            cgroup_id: 42,
            netns: Some("/run/veil/netns/sb/42".into()),
        };
        let j = serde_json::to_string(&bind).unwrap();
        assert!(
            j.starts_with(r#"{"type":"bind","req":3,"sandbox":"sb","#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<AgentMsg>(&j).unwrap(), bind);
        let gone = AgentMsg::Gone {
            sandbox: "sb".parse().unwrap(),
            cgroup_id: 42,
        };
        let j = serde_json::to_string(&gone).unwrap();
        assert_eq!(serde_json::from_str::<AgentMsg>(&j).unwrap(), gone);
        // A reply is outside the seq/ack scheme.
        let reply = ControlMsg::Reply {
            req: 3,
            outcome: LocalResponse::Unbound {
                sandbox: "sb".parse().unwrap(),
            },
        };
        assert_eq!(reply.seq(), None);
        let j = serde_json::to_string(&reply).unwrap();
        assert!(
            j.starts_with(r#"{"type":"reply","req":3,"outcome":{"type":"unbound""#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<ControlMsg>(&j).unwrap(), reply);
        // A sandbox from an older peer carries no cgroup id, and one without it writes none.
        let old = r#"{"id":"sb","org":"o","cgroup":"c","netns":null,"mounts":{}}"#;
        let s: SandboxState = serde_json::from_str(old).unwrap();
        assert_eq!(s.cgroup_id, None);
        assert!(!serde_json::to_string(&s).unwrap().contains("cgroup_id"));
    }
}
