//! What a shared store (PostgreSQL) keeps about the fleet: the fleet CA (its key sealed under
//! the data key) and the enrolled hosts, so that every replica accepts the same hosts and
//! answers for their agents.

use serde::{Deserialize, Serialize};

use super::error::StoreError;
use crate::crypto::Sealed;

/// The fleet CA as stored: its certificate and its private key sealed under the data key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCaRecord {
    /// PEM certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key (PEM text), sealed for [`ca_key_ids`] revision 0.
    pub key: Sealed,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// One enrolled host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's name (the CN and DNS SAN of its certificate).
    pub name: String,
    /// SHA-256 (hex) of the DER of the host's current certificate: the only one accepted.
    pub cert_sha256: String,
    /// Serial number of the current certificate (hex, for display).
    pub serial: String,
    /// When the current certificate was issued, ms since the epoch.
    pub enrolled_at: i64,
    /// When it expires, ms since the epoch.
    pub not_after: i64,
    /// When the host was revoked; revoked hosts are refused until enrolled again.
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// PEM of the interception CA its agent reported last (sandboxes on it must trust it).
    #[serde(default)]
    pub agent_ca_pem: Option<String>,
    /// The agents connected as this host now: (replica, agent id, since ms).
    #[serde(default)]
    pub connected: Vec<HostConnection>,
    /// Last connection or disconnection seen, ms since the epoch.
    #[serde(default)]
    pub last_seen: Option<i64>,
    /// Ids of the agents that connected as this host, newest last (at most
    /// [`MAX_HOST_AGENTS`]): names a partitioned host in a wait's answer.
    #[serde(default)]
    pub agents: Vec<String>,
}

/// Most agent ids a host record keeps.
pub const MAX_HOST_AGENTS: usize = 32;

impl HostRecord {
    /// Records agent `agent_id` connected through `replica` at `at`, reporting `ca_pem`.
    pub fn connect(&mut self, replica: &str, agent_id: &str, ca_pem: &str, at: i64) {
        self.disconnect(replica, agent_id, at);
        self.connected.push(HostConnection {
            replica: replica.to_owned(),
            agent_id: agent_id.to_owned(),
            since: at,
        });
        self.agent_ca_pem = Some(ca_pem.to_owned());
        self.agents.retain(|a| a != agent_id);
        self.agents.push(agent_id.to_owned());
        let extra = self.agents.len().saturating_sub(MAX_HOST_AGENTS);
        self.agents.drain(..extra);
    }

    /// Records agent `agent_id` gone from `replica` at `at`.
    pub fn disconnect(&mut self, replica: &str, agent_id: &str, at: i64) {
        self.connected
            .retain(|c| !(c.replica == replica && c.agent_id == agent_id));
        self.last_seen = Some(at);
    }
}

/// One agent connected as a host, as the replica it is connected to recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConnection {
    /// The replica's id.
    pub replica: String,
    /// The agent's id.
    pub agent_id: String,
    /// Connection time, ms since the epoch.
    pub since: i64,
}

/// Fleet state offered by a store that several replicas share.
pub trait FleetStore: Send + Sync {
    /// The fleet CA, if created.
    fn fleet_ca(&self) -> Result<Option<FleetCaRecord>, StoreError>;
    /// Stores `ca` unless one exists; returns the one stored (the first writer wins).
    fn init_fleet_ca(&self, ca: &FleetCaRecord) -> Result<FleetCaRecord, StoreError>;
    /// Creates or replaces a host's enrollment (un-revoking it; its old certificate stops
    /// being accepted).
    fn enroll_host(&self, host: &HostRecord) -> Result<(), StoreError>;
    /// One host.
    fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError>;
    /// Every host, by name.
    fn hosts(&self) -> Result<Vec<HostRecord>, StoreError>;
    /// The host (by name order, the first) whose current certificate is `cert_sha256`.
    fn host_with_cert(&self, cert_sha256: &str) -> Result<Option<HostRecord>, StoreError> {
        Ok(self
            .hosts()?
            .into_iter()
            .find(|h| h.cert_sha256 == cert_sha256))
    }
    /// Marks a host revoked (`NotFound` if never enrolled) and announces it to every replica.
    fn revoke_host(&self, name: &str, at: i64) -> Result<(), StoreError>;
    /// Records an agent connected as `name` on `replica` (its CA kept for sandbox PUTs).
    fn host_connected(
        &self,
        name: &str,
        replica: &str,
        agent_id: &str,
        ca_pem: &str,
        at: i64,
    ) -> Result<(), StoreError>;
    /// Records that agent's disconnection.
    fn host_disconnected(
        &self,
        name: &str,
        replica: &str,
        agent_id: &str,
        at: i64,
    ) -> Result<(), StoreError>;
}

/// The organization the fleet CA key is sealed for (no API key can name it: the record binding
/// only keeps a sealed value from being moved to another record).
pub const CA_KEY_ORG: &str = "veil.fleet";
/// The record id the fleet CA key is sealed for.
pub const CA_KEY_ID: &str = "fleet-ca-key";

/// The binding the fleet CA key is sealed under.
pub fn ca_key_ids() -> (veil_link::OrgId, veil_link::SecretId) {
    match (
        veil_link::OrgId::parse(CA_KEY_ORG),
        veil_link::SecretId::parse(CA_KEY_ID),
    ) {
        (Ok(org), Ok(id)) => (org, id),
        _ => unreachable!("constant ids follow the id rules"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_keeps_one_entry_per_replica_and_agent_and_the_newest_agent_ids() {
        let mut h = HostRecord {
            name: "h".into(),
            cert_sha256: String::new(),
            serial: String::new(),
            enrolled_at: 0,
            not_after: 0,
            revoked_at: None,
            agent_ca_pem: None,
            connected: Vec::new(),
            last_seen: None,
            agents: Vec::new(),
        };
        h.connect("r1", "a", "ca-1", 1);
        h.connect("r1", "a", "ca-2", 2);
        h.connect("r2", "b", "ca-3", 3);
        assert_eq!(h.connected.len(), 2);
        assert_eq!(h.agent_ca_pem.as_deref(), Some("ca-3"));
        h.disconnect("r1", "a", 4);
        assert_eq!(
            h.connected
                .iter()
                .map(|c| c.agent_id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(h.last_seen, Some(4));
        for i in 0..MAX_HOST_AGENTS + 5 {
            h.connect("r1", &format!("x{i}"), "ca", 5);
        }
        assert_eq!(h.agents.len(), MAX_HOST_AGENTS);
        assert_eq!(h.agents.last().map(String::as_str), Some("x36"));
    }
}
