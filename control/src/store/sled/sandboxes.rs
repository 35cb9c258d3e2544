//! Sandboxes: records and the cgroup index (one sandbox per cgroup).

use sled::transaction::{ConflictableTransactionError, Transactional};

use super::db::{SledStore, backend, dec, enc, tx_err};
use crate::store::{
    AuditRecord, Conflict, OrgId, Rejected, SandboxChange, SandboxId, SandboxRecord, StoreError,
};

pub(super) fn put(
    store: &SledStore,
    sandbox: &SandboxRecord,
    audit: AuditRecord,
) -> Result<bool, StoreError> {
    let _guard = store.lock();
    let old: Option<SandboxRecord> = match store
        .sandboxes
        .get(sandbox.id.as_str().as_bytes())
        .map_err(backend)?
    {
        Some(b) => Some(dec("sandboxes", &b)?),
        None => None,
    };
    if let Some(old) = &old
        && old.org != sandbox.org
    {
        return Err(StoreError::NotFound);
    }
    if let Some(cgroup) = sandbox.indexed_cgroup()
        && let Some(holder) = store
            .sandbox_cgroups
            .get(cgroup.as_bytes())
            .map_err(backend)?
        && holder.as_ref() != sandbox.id.as_str().as_bytes()
    {
        return Err(StoreError::Conflict(Conflict::Cgroup(cgroup.to_owned())));
    }
    let bytes = enc(sandbox)?;
    let pending = store.audit_entry(audit)?;
    let (ak, av) = (&pending.key, &pending.value);
    (&store.sandboxes, &store.sandbox_cgroups, &store.audit)
        .transaction(|(sandboxes, cgroups, audit)| {
            if let Some(was) = old.as_ref().and_then(SandboxRecord::indexed_cgroup)
                && Some(was) != sandbox.indexed_cgroup()
            {
                cgroups.remove(was.as_bytes())?;
            }
            if let Some(cgroup) = sandbox.indexed_cgroup() {
                cgroups.insert(cgroup.as_bytes(), sandbox.id.as_str().as_bytes())?;
            }
            sandboxes.insert(sandbox.id.as_str().as_bytes(), bytes.as_slice())?;
            audit.insert(ak.as_slice(), av.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })
        .map_err(tx_err)?;
    store.commit(&pending)?;
    Ok(old.is_none())
}

pub(super) fn list(store: &SledStore) -> Result<Vec<SandboxRecord>, StoreError> {
    store
        .sandboxes
        .iter()
        .map(|r| dec("sandboxes", &r.map_err(backend)?.1))
        .collect()
}

pub(super) fn get(store: &SledStore, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
    match store
        .sandboxes
        .get(id.as_str().as_bytes())
        .map_err(backend)?
    {
        Some(b) => Ok(Some(dec("sandboxes", &b)?)),
        None => Ok(None),
    }
}

pub(super) fn update(
    store: &SledStore,
    org: &OrgId,
    id: &SandboxId,
    change: SandboxChange<'_>,
) -> Result<SandboxRecord, StoreError> {
    let _guard = store.lock();
    let old = get(store, id)?
        .filter(|s| s.org == *org)
        .ok_or(StoreError::NotFound)?;
    let (new, audit) = change(&old)?;
    if new.cgroup != old.cgroup || new.bound != old.bound || new.id != old.id || new.org != old.org
    {
        return Err(StoreError::Rejected(Rejected::Identity));
    }
    let bytes = enc(&new)?;
    let pending = store.audit_entry(audit)?;
    let (ak, av) = (&pending.key, &pending.value);
    (&store.sandboxes, &store.audit)
        .transaction(|(sandboxes, audit)| {
            sandboxes.insert(new.id.as_str().as_bytes(), bytes.as_slice())?;
            audit.insert(ak.as_slice(), av.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })
        .map_err(tx_err)?;
    store.commit(&pending)?;
    Ok(new)
}

pub(super) fn delete(
    store: &SledStore,
    org: &OrgId,
    id: &SandboxId,
    audit: AuditRecord,
) -> Result<(), StoreError> {
    let _guard = store.lock();
    let old = get(store, id)?
        .filter(|s| s.org == *org)
        .ok_or(StoreError::NotFound)?;
    let pending = store.audit_entry(audit)?;
    let (ak, av) = (&pending.key, &pending.value);
    (&store.sandboxes, &store.sandbox_cgroups, &store.audit)
        .transaction(|(sandboxes, cgroups, audit)| {
            sandboxes.remove(old.id.as_str().as_bytes())?;
            if let Some(cgroup) = old.indexed_cgroup() {
                cgroups.remove(cgroup.as_bytes())?;
            }
            audit.insert(ak.as_slice(), av.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })
        .map_err(tx_err)?;
    store.commit(&pending)
}

pub(super) fn restore(
    store: &SledStore,
    written: &SandboxRecord,
    previous: Option<&SandboxRecord>,
    audit: AuditRecord,
) -> Result<bool, StoreError> {
    let _guard = store.lock();
    if get(store, &written.id)?.as_ref() != Some(written) {
        return Ok(false);
    }
    if let Some(cgroup) = previous.and_then(SandboxRecord::indexed_cgroup)
        && Some(cgroup) != written.indexed_cgroup()
        && let Some(holder) = store
            .sandbox_cgroups
            .get(cgroup.as_bytes())
            .map_err(backend)?
        && holder.as_ref() != written.id.as_str().as_bytes()
    {
        return Err(StoreError::Conflict(Conflict::CgroupMeanwhile(
            cgroup.to_owned(),
        )));
    }
    let bytes = previous.map(enc).transpose()?;
    let pending = store.audit_entry(audit)?;
    let (ak, av) = (&pending.key, &pending.value);
    (&store.sandboxes, &store.sandbox_cgroups, &store.audit)
        .transaction(|(sandboxes, cgroups, audit)| {
            if let Some(cgroup) = written.indexed_cgroup() {
                cgroups.remove(cgroup.as_bytes())?;
            }
            match (previous, &bytes) {
                (Some(prev), Some(bytes)) => {
                    if let Some(cgroup) = prev.indexed_cgroup() {
                        cgroups.insert(cgroup.as_bytes(), prev.id.as_str().as_bytes())?;
                    }
                    sandboxes.insert(prev.id.as_str().as_bytes(), bytes.as_slice())?;
                }
                _ => {
                    sandboxes.remove(written.id.as_str().as_bytes())?;
                }
            }
            audit.insert(ak.as_slice(), av.as_slice())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })
        .map_err(tx_err)?;
    store.commit(&pending)?;
    Ok(true)
}

/// Index entries that point at no sandbox.
pub(super) fn check_consistency(store: &SledStore) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    for entry in store.sandbox_cgroups.iter() {
        let (_, id) = entry.map_err(backend)?;
        if !store.sandboxes.contains_key(&id).map_err(backend)? {
            problems.push("cgroup index points at a missing sandbox".into());
        }
    }
    Ok(problems)
}
