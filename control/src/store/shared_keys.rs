//! What a shared store (PostgreSQL) keeps about the master keys so that replicas agree on them:
//! each key's fingerprint and state, which key seals new values, and which keys each live
//! replica holds and uses. A coordinated rekey ([`crate::rekey`]) moves through these states.

use super::error::StoreError;

/// A master key's place in the replicas' shared keyring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// In use (sealing or opening values); every replica must hold it.
    Current,
    /// Made by a rekey, not used yet: replicas may hold it before the others.
    Pending,
    /// Nothing references it any more: replicas delete their copy.
    Retired,
}

/// One live replica's keys, as it last reported them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaKeys {
    /// The replica's id.
    pub replica: String,
    /// Key ids it holds.
    pub key_ids: Vec<String>,
    /// The key it seals new values with.
    pub active: String,
}

/// The replicas' shared view of the keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedKeyring {
    /// Every recorded key with its state.
    pub keys: Vec<(String, KeyState)>,
    /// The key every replica must seal new values with (none before the first replica).
    pub active: Option<String>,
    /// The replicas alive now.
    pub replicas: Vec<ReplicaKeys>,
}

impl SharedKeyring {
    /// Ids of the keys in `state`.
    pub fn in_state(&self, state: KeyState) -> Vec<&str> {
        self.keys
            .iter()
            .filter(|(_, s)| *s == state)
            .map(|(id, _)| id.as_str())
            .collect()
    }

    /// Live replicas that do not hold key `id`.
    pub fn lacking(&self, id: &str) -> Vec<&str> {
        self.replicas
            .iter()
            .filter(|r| !r.key_ids.iter().any(|k| k == id))
            .map(|r| r.replica.as_str())
            .collect()
    }

    /// Live replicas not sealing with key `id` yet.
    pub fn not_using(&self, id: &str) -> Vec<&str> {
        self.replicas
            .iter()
            .filter(|r| r.active != id)
            .map(|r| r.replica.as_str())
            .collect()
    }
}

/// Key coordination offered by a store that several replicas share.
pub trait SharedKeys: Send + Sync {
    /// The current shared view.
    fn keyring(&self) -> Result<SharedKeyring, StoreError>;
    /// Records a new key (state [`KeyState::Pending`]) by its fingerprint.
    fn add_pending_key(&self, id: &str, fingerprint: &str) -> Result<(), StoreError>;
    /// Makes a pending key the one every replica seals with (it becomes current).
    fn activate_key(&self, id: &str) -> Result<(), StoreError>;
    /// Marks keys no value references any more as retired.
    fn retire_keys(&self, ids: &[String]) -> Result<(), StoreError>;
    /// Reports this replica's keys (with its presence).
    fn report_keys(&self, key_ids: &[String], active: &str) -> Result<(), StoreError>;
}
