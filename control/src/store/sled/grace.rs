//! Grace-period state: rotated-out values inside secret records, tombstones of deleted
//! secrets, and the operations that walk every sealed value (rekey, sweep).

use std::collections::BTreeSet;

use super::db::{SledStore, backend, dec, enc};
use crate::crypto::Sealed;
use crate::store::values::{expire, min_opt, reseal_secret, reseal_tombstone, strictly_older};
use crate::store::{PreviousValue, SealedRef, SecretRecord, StoreError, Swept, TombstoneRecord};

/// Every tombstone.
pub(super) fn tombstones(store: &SledStore) -> Result<Vec<TombstoneRecord>, StoreError> {
    store
        .tombstones
        .iter()
        .map(|r| dec("tombstones", &r.map_err(backend)?.1))
        .collect()
}

/// Re-seals every value not under `active_key`, record by record (see [`crate::store::Store::reseal_all`]).
pub(super) fn reseal_all(
    store: &SledStore,
    active_key: &str,
    reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
) -> Result<usize, StoreError> {
    let _guard = store.lock();
    let mut count = 0;
    let flush_every_64 = |count: usize| {
        if count.is_multiple_of(64) {
            store.flush()
        } else {
            Ok(())
        }
    };
    for entry in store.secrets.iter() {
        let (k, v) = entry.map_err(backend)?;
        let mut record: SecretRecord = dec("secrets", &v)?;
        if !reseal_secret(&mut record, active_key, reseal)? {
            continue;
        }
        // Each record is replaced atomically: it holds either the old or the new sealings.
        store.secrets.insert(k, enc(&record)?).map_err(backend)?;
        count += 1;
        flush_every_64(count)?;
    }
    for entry in store.tombstones.iter() {
        let (k, v) = entry.map_err(backend)?;
        let mut t: TombstoneRecord = dec("tombstones", &v)?;
        if reseal_tombstone(&mut t, active_key, reseal)? {
            store.tombstones.insert(k, enc(&t)?).map_err(backend)?;
            count += 1;
            flush_every_64(count)?;
        }
    }
    store.flush()?;
    Ok(count)
}

/// Keys any current, previous or tombstoned value is sealed with.
pub(super) fn key_ids_in_use(store: &SledStore) -> Result<Vec<String>, StoreError> {
    let mut ids = BTreeSet::new();
    for entry in store.secrets.iter() {
        let (_, v) = entry.map_err(backend)?;
        let record: SecretRecord = dec("secrets", &v)?;
        ids.extend(record.previous.into_iter().map(|p| p.sealed.key_id));
        ids.insert(record.sealed.key_id);
    }
    for t in tombstones(store)? {
        ids.extend(t.values.into_iter().map(|v| v.sealed.key_id));
    }
    Ok(ids.into_iter().collect())
}

/// Drops values replaced at or before `cutoff` (see [`crate::store::Store::sweep_grace`]).
pub(super) fn sweep(store: &SledStore, cutoff: i64) -> Result<Swept, StoreError> {
    let mut swept = Swept::default();
    let mut keep = |values: &[PreviousValue]| {
        let kept = values.iter().filter(|v| v.replaced_at > cutoff);
        swept.oldest_kept = min_opt(swept.oldest_kept, kept.map(|v| v.replaced_at).min());
        values.iter().any(|v| v.replaced_at <= cutoff)
    };
    // Candidates are found without the write lock (a scan must not stall the API), then
    // re-read and rewritten under it, so a write that came in between is never undone. A
    // value added meanwhile expires after every value seen here: the next sweep finds it.
    let mut due_secrets = Vec::new();
    for entry in store.secrets.iter() {
        let (k, v) = entry.map_err(backend)?;
        let record: SecretRecord = dec("secrets", &v)?;
        if keep(&record.previous) {
            due_secrets.push(k);
        }
    }
    let mut due_tombstones = Vec::new();
    for entry in store.tombstones.iter() {
        let (k, v) = entry.map_err(backend)?;
        let t: TombstoneRecord = dec("tombstones", &v)?;
        if keep(&t.values) {
            due_tombstones.push(k);
        }
    }
    if due_secrets.is_empty() && due_tombstones.is_empty() {
        return Ok(swept);
    }
    let _guard = store.lock();
    for k in due_secrets {
        let Some(v) = store.secrets.get(&k).map_err(backend)? else {
            continue;
        };
        let mut record: SecretRecord = dec("secrets", &v)?;
        let dropped = expire(&mut record.previous, cutoff);
        if dropped > 0 {
            // `updated_at` stays: an expiry is not a change of the secret.
            store.secrets.insert(&k, enc(&record)?).map_err(backend)?;
            swept.dropped += dropped;
            swept.changed.push(record.id);
        }
    }
    for k in due_tombstones {
        let Some(v) = store.tombstones.get(&k).map_err(backend)? else {
            continue;
        };
        let mut t: TombstoneRecord = dec("tombstones", &v)?;
        let dropped = expire(&mut t.values, cutoff);
        if dropped == 0 {
            continue;
        }
        if t.values.is_empty() {
            store.tombstones.remove(&k).map_err(backend)?;
        } else {
            store.tombstones.insert(&k, enc(&t)?).map_err(backend)?;
        }
        swept.dropped += dropped;
        swept.changed.push(t.id);
    }
    store.flush()?;
    Ok(swept)
}

/// Tombstones that contradict the secrets, and value lists out of shape.
pub(super) fn check_consistency(store: &SledStore) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    for entry in store.secrets.iter() {
        let (_, v) = entry.map_err(backend)?;
        let s: SecretRecord = dec("secrets", &v)?;
        if s.previous.len() > veil_link::MAX_PREVIOUS_VALUES {
            problems.push(format!("secret {}: too many previous values", s.id));
        }
        if !strictly_older(s.revision, &s.previous) {
            problems.push(format!("secret {}: previous values out of order", s.id));
        }
    }
    for t in tombstones(store)? {
        if store
            .secrets
            .contains_key(t.id.as_str().as_bytes())
            .map_err(backend)?
        {
            problems.push(format!("tombstone {}: the secret still exists", t.id));
        }
        if t.values.is_empty() || t.values.len() > veil_link::MAX_PREVIOUS_VALUES + 1 {
            problems.push(format!("tombstone {}: wrong number of values", t.id));
        }
        if !strictly_older(t.revision, &t.values) {
            problems.push(format!("tombstone {}: values out of order", t.id));
        }
    }
    Ok(problems)
}
