//! A stored secret as the API shows it: metadata, propagation and usage, never the value.

use veil_api::{AgentAck, HostUsage, Secret, SecretDetail};

use crate::agent_link::Propagation;
use crate::store::{SecretRecord, SecretUsage, WrongHost};
use crate::timefmt::rfc3339;

/// The public view of a secret: metadata only (Daytona's fields, then veil's extra ones).
pub fn view(s: &SecretRecord) -> Secret {
    Secret {
        id: s.id.clone(),
        name: s.name.clone(),
        description: s.description.clone(),
        placeholder: s.placeholder.clone(),
        hosts: s.hosts.clone(),
        created_at: rfc3339(s.created_at),
        updated_at: rfc3339(s.updated_at),
        revision: s.revision,
        body_substitution: s.body_substitution,
        wrong_host: wrong_host_view(s.wrong_host),
    }
}

/// The single-secret view (GET, PATCH): [`view`] plus what the agents acknowledged and what
/// they reported about its use.
pub fn detail(s: &SecretRecord, propagation: &Propagation, usage: &SecretUsage) -> SecretDetail {
    let agents = propagation
        .agents
        .iter()
        .map(|a| AgentAck {
            agent_id: a.agent_id.to_string(),
            connected: a.connected,
            acknowledged_revision: a.revision,
            acknowledged_at: a.at.map(rfc3339),
        })
        .collect();
    let hosts = usage
        .hosts
        .iter()
        .map(|(host, u)| {
            let counts = HostUsage {
                substituted: u.counts.substituted,
                wrong_host: u.counts.wrong_host,
                host_mismatch: u.counts.host_mismatch,
                blocked: u.counts.blocked,
                last_used_at: u.last_used_at.map(rfc3339),
                last_seen_at: u.last_seen_at.map(rfc3339),
            };
            (host.clone(), counts)
        })
        .collect();
    SecretDetail {
        secret: view(s),
        propagation: veil_api::Propagation {
            complete: propagation.pending(s.revision).is_empty(),
            agents,
        },
        last_used_at: usage.last_used_at.map(rfc3339),
        usage: hosts,
    }
}

pub(super) fn wrong_host_view(w: WrongHost) -> veil_api::WrongHost {
    match w {
        WrongHost::Forward => veil_api::WrongHost::Forward,
        WrongHost::Block => veil_api::WrongHost::Block,
    }
}

pub(super) fn wrong_host_record(w: veil_api::WrongHost) -> WrongHost {
    match w {
        veil_api::WrongHost::Forward => WrongHost::Forward,
        veil_api::WrongHost::Block => WrongHost::Block,
    }
}

pub(super) fn wrong_host_name(w: WrongHost) -> &'static str {
    match w {
        WrongHost::Forward => "forward",
        WrongHost::Block => "block",
    }
}
