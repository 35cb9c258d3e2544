//! Agent-reported usage, kept beside the secret records.

use sled::transaction::{ConflictableTransactionError, Transactional};
use veil_link::SecretId;

use super::db::{SledStore, backend, dec, enc, tx_err};
use crate::store::{AuditRecord, SecretRecord, SecretUsage, StoreError, UsageDelta};

pub(super) fn record_usage(
    store: &SledStore,
    deltas: &[UsageDelta],
    audit: &mut dyn FnMut(&SecretRecord, &UsageDelta) -> Option<AuditRecord>,
) -> Result<usize, StoreError> {
    let _guard = store.lock();
    let mut usages: std::collections::BTreeMap<SecretId, SecretUsage> = Default::default();
    let mut audits = Vec::new();
    let mut recorded = 0;
    for d in deltas {
        // Under the write lock: a secret seen here cannot be deleted before the commit.
        let Some(secret) = store.get_secret_raw(d.secret_id.as_str())? else {
            continue;
        };
        recorded += 1;
        if let Some(a) = audit(&secret, d) {
            audits.push(store.audit_entry(a)?);
        }
        if d.counts.is_zero() {
            continue;
        }
        if !usages.contains_key(&d.secret_id) {
            let current = secret_usage(store, &d.secret_id)?;
            usages.insert(d.secret_id.clone(), current);
        }
        if let Some(u) = usages.get_mut(&d.secret_id) {
            u.add(&d.host, &d.counts, d.at);
        }
    }
    if usages.is_empty() && audits.is_empty() {
        return Ok(recorded);
    }
    let encoded = usages
        .iter()
        .map(|(id, u)| Ok((id.as_str().as_bytes().to_vec(), enc(u)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    (&store.usage, &store.audit)
        .transaction(|(usage, audit)| {
            for (k, v) in &encoded {
                usage.insert(k.as_slice(), v.as_slice())?;
            }
            for a in &audits {
                audit.insert(a.key.as_slice(), a.value.as_slice())?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })
        .map_err(tx_err)?;
    store.flush()?;
    for a in &audits {
        SledStore::emit(a);
    }
    Ok(recorded)
}

pub(super) fn secret_usage(store: &SledStore, id: &SecretId) -> Result<SecretUsage, StoreError> {
    match store.usage.get(id.as_str().as_bytes()).map_err(backend)? {
        Some(bytes) => dec("secret_usage", &bytes),
        None => Ok(SecretUsage::default()),
    }
}
