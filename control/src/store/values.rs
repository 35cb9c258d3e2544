//! Pure rules on a secret's earlier values, shared by the backends: expiry after the grace
//! period, re-sealing under a new key, and the shape checks of `check_consistency`.

use crate::crypto::Sealed;
use crate::store::{OrgId, PreviousValue, Revision, SealedRef, SecretId, StoreError};

/// Re-seals `v` if its key is not `active_key`; returns whether it changed.
pub(super) fn reseal_value(
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
