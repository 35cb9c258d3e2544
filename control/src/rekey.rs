//! Rekey: a new master key seals every value, then the old keys are deleted. On one host that is
//! local ([`reseal_under_active`] and the key files). On a store shared by replicas it is
//! coordinated through the store ([`coordinated`]): the new key is used by none until every live
//! replica holds it, re-sealing starts once every replica seals new values with it, and the old
//! keys are retired only then. Each step is recorded in the store, so an interrupted rekey is
//! finished by the next run or by the next replica that starts ([`follow_shared_keyring`]
//! applies the shared state to this replica every few seconds).

use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, Keyring, RecordBinding};
use crate::store::shared_keys::{KeyState, SharedKeys};
use crate::store::{SealedRef, Store, StoreError};

/// What a rekey did.
#[derive(Debug, Serialize, Deserialize)]
pub struct RekeyReport {
    /// The key now active.
    pub active_key: String,
    /// Secrets re-sealed.
    pub resealed: usize,
    /// Keys deleted.
    pub retired: Vec<String>,
}

/// Why a rekey stopped; a coordinated one resumes where it stopped when run again.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Key material failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A thread panicked holding the keyring.
    #[error("keyring poisoned")]
    Poisoned,
    /// Live replicas lack the new key.
    #[error(
        "the new master key {key} is not on replica(s) {}: copy keys/{key}.key from this \
         replica's data dir into theirs (mode 0600; they load it within seconds), then run \
         rekey again — nothing uses the new key until every replica holds it",
        .replicas.join(", ")
    )]
    NotEverywhere {
        /// The new key.
        key: String,
        /// The replicas without it.
        replicas: Vec<String>,
    },
    /// Live replicas did not switch to the new key in time.
    #[error(
        "replica(s) {} do not seal with the new master key {key} yet; run rekey again",
        .replicas.join(", ")
    )]
    NotSwitched {
        /// The new key.
        key: String,
        /// The replicas still on another key.
        replicas: Vec<String>,
    },
    /// Another replica started a rekey whose key this one lacks.
    #[error(
        "a rekey to master key {0} is under way and this replica lacks that key: copy it here \
         from the replica that made it, then run rekey again"
    )]
    ForeignPending(String),
}

fn binding<'a>(v: &SealedRef<'a>) -> RecordBinding<'a> {
    RecordBinding {
        org: v.org,
        secret_id: v.secret_id,
        revision: v.revision,
    }
}

/// Re-seals every value not under the active key with it; returns the active key and how many
/// records changed.
pub fn reseal_under_active(
    store: &dyn Store,
    ring: &Keyring,
) -> Result<(String, usize), StoreError> {
    let active = ring.active_id().to_owned();
    // Previous and tombstoned values too: the old keys are deleted afterwards.
    let resealed = store.reseal_all(&active, &mut |v| {
        let plain = ring
            .open(binding(&v), v.sealed)
            .map_err(|e| StoreError::OpenSecret {
                secret_id: v.secret_id.to_owned(),
                revision: v.revision,
                source: e,
            })?;
        ring.seal(binding(&v), &plain).map_err(StoreError::Seal)
    })?;
    Ok((active, resealed))
}

fn read(ring: &RwLock<Keyring>) -> Result<std::sync::RwLockReadGuard<'_, Keyring>, RekeyError> {
    ring.read().map_err(|_| RekeyError::Poisoned)
}

fn write(ring: &RwLock<Keyring>) -> Result<std::sync::RwLockWriteGuard<'_, Keyring>, RekeyError> {
    ring.write().map_err(|_| RekeyError::Poisoned)
}

/// Polls `check` until it returns an empty list or `wait` passes; the last list.
fn wait_for(
    wait: Duration,
    mut check: impl FnMut() -> Result<Vec<String>, RekeyError>,
) -> Result<Vec<String>, RekeyError> {
    let deadline = Instant::now() + wait;
    loop {
        let left = check()?;
        if left.is_empty() || Instant::now() >= deadline {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A rekey on a shared store, resumed from wherever the store says the last one stopped;
/// `wait` bounds each wait for the other replicas. Blocks.
pub fn coordinated(
    store: &dyn Store,
    keys: &dyn SharedKeys,
    ring: &RwLock<Keyring>,
    wait: Duration,
) -> Result<RekeyReport, RekeyError> {
    let shared = keys.keyring()?;
    let in_use = store.key_ids_in_use()?;
    let unfinished = shared
        .active
        .as_ref()
        .filter(|active| in_use.iter().any(|k| k != *active));
    let new = match (shared.in_state(KeyState::Pending).first(), unfinished) {
        (Some(pending), _) => {
            if !read(ring)?.key_ids().iter().any(|k| k == pending) {
                return Err(RekeyError::ForeignPending((*pending).to_owned()));
            }
            (*pending).to_owned()
        }
        // Activated, not re-sealed yet: go on from there.
        (None, Some(active)) => active.clone(),
        (None, None) => {
            let mut ring = write(ring)?;
            let id = ring.add_key()?;
            let fingerprint = ring
                .fingerprints()
                .into_iter()
                .find(|(k, _)| *k == id)
                .map(|(_, f)| f)
                .unwrap_or_default();
            keys.add_pending_key(&id, &fingerprint)?;
            tracing::info!(target: "veil::audit", key = %id, "rekey: new master key made; waiting for every replica to hold it");
            id
        }
    };
    report(keys, ring)?;
    let lacking = wait_for(wait, || {
        Ok(keys
            .keyring()?
            .lacking(&new)
            .into_iter()
            .map(str::to_owned)
            .collect())
    })?;
    if !lacking.is_empty() {
        return Err(RekeyError::NotEverywhere {
            key: new,
            replicas: lacking,
        });
    }
    if keys.keyring()?.active.as_deref() != Some(new.as_str()) {
        keys.activate_key(&new)?;
    }
    write(ring)?.set_active(&new)?;
    report(keys, ring)?;
    let behind = wait_for(wait, || {
        Ok(keys
            .keyring()?
            .not_using(&new)
            .into_iter()
            .map(str::to_owned)
            .collect())
    })?;
    if !behind.is_empty() {
        return Err(RekeyError::NotSwitched {
            key: new,
            replicas: behind,
        });
    }
    let (active, resealed) = {
        let ring = read(ring)?;
        reseal_under_active(store, &ring)?
    };
    let in_use = store.key_ids_in_use()?;
    let retired: Vec<String> = keys
        .keyring()?
        .in_state(KeyState::Current)
        .into_iter()
        .filter(|k| *k != active && !in_use.iter().any(|u| u == k))
        .map(str::to_owned)
        .collect();
    keys.retire_keys(&retired)?;
    {
        let mut ring = write(ring)?;
        for id in &retired {
            if ring.key_ids().contains(id) {
                ring.remove_key(id)?;
            }
        }
    }
    report(keys, ring)?;
    tracing::info!(target: "veil::audit", active = %active, resealed, retired = ?retired, "rekey");
    Ok(RekeyReport {
        active_key: active,
        resealed,
        retired,
    })
}

fn report(keys: &dyn SharedKeys, ring: &RwLock<Keyring>) -> Result<(), RekeyError> {
    let ring = read(ring)?;
    keys.report_keys(&ring.key_ids(), ring.active_id())?;
    Ok(())
}

/// Applies the shared keyring to this replica (new key files loaded, the agreed active key
/// used, retired keys deleted) and reports this replica's keys; run every few seconds. Blocks.
pub fn follow_shared_keyring(
    keys: &dyn SharedKeys,
    ring: &RwLock<Keyring>,
) -> Result<(), RekeyError> {
    let shared = keys.keyring()?;
    {
        let mut ring = write(ring)?;
        let added = ring.load_new_keys()?;
        if !added.is_empty() {
            tracing::info!(keys = ?added, "loaded new master key file(s)");
        }
        if let Some(active) = &shared.active
            && ring.active_id() != active
            && ring.key_ids().contains(active)
        {
            ring.set_active(active)?;
            tracing::info!(key = %active, "sealing with the master key the replicas agreed on");
        }
        for id in shared.in_state(KeyState::Retired) {
            if id != ring.active_id() && ring.key_ids().iter().any(|k| k == id) {
                ring.remove_key(id)?;
                tracing::info!(key = %id, "deleted a retired master key");
            }
        }
    }
    report(keys, ring)
}

/// Finishes a rekey another run or replica left unfinished (a pending key this replica holds,
/// or values not yet re-sealed under the agreed key); `None` when there is none. Blocks.
pub fn resume_interrupted(
    store: &dyn Store,
    keys: &dyn SharedKeys,
    ring: &RwLock<Keyring>,
    wait: Duration,
) -> Result<Option<RekeyReport>, RekeyError> {
    let shared = keys.keyring()?;
    let held = read(ring)?.key_ids();
    let pending_here = shared
        .in_state(KeyState::Pending)
        .iter()
        .any(|p| held.iter().any(|h| h == p));
    let in_use = store.key_ids_in_use()?;
    let unresealed = shared
        .active
        .as_ref()
        .is_some_and(|active| in_use.iter().any(|k| k != active));
    if !pending_here && !unresealed {
        return Ok(None);
    }
    coordinated(store, keys, ring, wait).map(Some)
}
