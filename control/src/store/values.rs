//! Pure rules on a secret's earlier values, shared by the backends: expiry after the grace
//! period, re-sealing under a new key, and the shape checks of `check_consistency`.

use crate::crypto::Sealed;
use crate::store::{
    OrgId, PreviousValue, Revision, SealedRef, SecretId, SecretRecord, StoreError, TombstoneRecord,
};

/// Re-seals a secret's current and previous values not under `active_key` (a rekey, on any
/// backend); returns whether the record changed.
pub(super) fn reseal_secret(
    record: &mut SecretRecord,
    active_key: &str,
    reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    if record.sealed.key_id != active_key {
        record.sealed = reseal(SealedRef {
            org: &record.org,
            secret_id: &record.id,
            revision: record.revision,
            sealed: &record.sealed,
        })?;
        changed = true;
    }
    for p in &mut record.previous {
        changed |= reseal_value(&record.org, &record.id, p, active_key, reseal)?;
    }
    Ok(changed)
}

/// Re-seals a tombstone's values not under `active_key`; returns whether it changed.
pub(super) fn reseal_tombstone(
    t: &mut TombstoneRecord,
    active_key: &str,
    reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
) -> Result<bool, StoreError> {
    let mut changed = false;
    for value in &mut t.values {
        changed |= reseal_value(&t.org, &t.id, value, active_key, reseal)?;
    }
    Ok(changed)
}

/// Re-seals `v` if its key is not `active_key`; returns whether it changed.
fn reseal_value(
    org: &OrgId,
    secret_id: &SecretId,
    v: &mut PreviousValue,
    active_key: &str,
    reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
) -> Result<bool, StoreError> {
    if v.sealed.key_id == active_key {
        return Ok(false);
    }
    v.sealed = reseal(SealedRef {
        org,
        secret_id,
        revision: v.revision,
        sealed: &v.sealed,
    })?;
    Ok(true)
}

/// Keeps the values replaced after `cutoff`; returns how many were dropped.
pub(super) fn expire(values: &mut Vec<PreviousValue>, cutoff: i64) -> usize {
    let before = values.len();
    values.retain(|v| v.replaced_at > cutoff);
    before - values.len()
}

pub(super) fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether the revisions of `values` are below `revision` and strictly decreasing.
pub(super) fn strictly_older(revision: Revision, values: &[PreviousValue]) -> bool {
    let mut above = revision;
    values.iter().all(|v| {
        let ok = v.revision < above;
        above = v.revision;
        ok
    })
}
