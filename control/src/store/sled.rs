//! The embedded backend: sled trees, one transaction per change, flushed before returning.
//!
//! All writes are serialised by one mutex, so uniqueness checks done just before a transaction
//! cannot race another writer; readers never block. The store, its key encodings and the
//! lock → transaction → audit → commit helpers live in `db`; one file per resource: `secrets`,
//! `sandboxes`, `usage`, and `grace` (rotated-out values, tombstones, rekey, sweep); the
//! [`Store`] implementation here delegates to them.

#[cfg(test)]
mod compat;
mod db;
mod grace;
mod sandboxes;
mod secrets;
#[cfg(test)]
mod tests;
mod usage;

use sled::transaction::{ConflictableTransactionError, Transactional};

pub use db::SledStore;
use db::{audit_key, backend, dec, enc, org_prefix, tx_err};

use super::{
    ApiKeyRecord, AuditRecord, Conflict, Direction, OrgId, OrgRecord, SandboxChange, SandboxId,
    SandboxRecord, SealedRef, SecretChange, SecretDeletion, SecretId, SecretPage, SecretPageQuery,
    SecretRecord, SecretUsage, Store, StoreError, Swept, TombstoneRecord, UsageDelta,
};
use crate::crypto::Sealed;

impl Store for SledStore {
    fn create_api_key(&self, key: &ApiKeyRecord, audit: AuditRecord) -> Result<(), StoreError> {
        let _guard = self.lock();
        if self
            .apikeys
            .contains_key(key.id.as_bytes())
            .map_err(backend)?
        {
            return Err(StoreError::Conflict(Conflict::ApiKeyId));
        }
        let org_bytes = match self
            .orgs
            .get(key.org.as_str().as_bytes())
            .map_err(backend)?
        {
            Some(_) => None,
            None => Some(enc(&OrgRecord {
                name: key.org.clone(),
                created_at: key.created_at,
            })?),
        };
        let key_bytes = enc(key)?;
        let pending = self.audit_entry(audit)?;
        let (ak, av) = (&pending.key, &pending.value);
        (&self.orgs, &self.apikeys, &self.audit)
            .transaction(|(orgs, apikeys, audit)| {
                if let Some(org) = &org_bytes {
                    orgs.insert(key.org.as_str().as_bytes(), org.as_slice())?;
                }
                apikeys.insert(key.id.as_bytes(), key_bytes.as_slice())?;
                audit.insert(ak.as_slice(), av.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.commit(&pending)
    }

    fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        match self.apikeys.get(id.as_bytes()).map_err(backend)? {
            Some(bytes) => Ok(Some(dec("apikeys", &bytes)?)),
            None => Ok(None),
        }
    }

    fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.apikeys
            .iter()
            .map(|r| dec("apikeys", &r.map_err(backend)?.1))
            .collect()
    }

    fn revoke_api_key(&self, id: &str, audit: AuditRecord) -> Result<ApiKeyRecord, StoreError> {
        let _guard = self.lock();
        let key = self.api_key(id)?.ok_or(StoreError::NotFound)?;
        let mut audit = audit;
        audit.org = key.org.to_string();
        let pending = self.audit_entry(audit)?;
        let (ak, av) = (&pending.key, &pending.value);
        (&self.apikeys, &self.audit)
            .transaction(|(apikeys, audit)| {
                apikeys.remove(id.as_bytes())?;
                audit.insert(ak.as_slice(), av.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.commit(&pending)?;
        Ok(key)
    }

    fn list_orgs(&self) -> Result<Vec<OrgRecord>, StoreError> {
        self.orgs
            .iter()
            .map(|r| dec("orgs", &r.map_err(backend)?.1))
            .collect()
    }

    fn insert_secret(&self, secret: &SecretRecord, audit: AuditRecord) -> Result<(), StoreError> {
        secrets::insert(self, secret, audit)
    }

    fn secret(&self, org: &OrgId, id: &SecretId) -> Result<Option<SecretRecord>, StoreError> {
        secrets::get(self, org, id.as_str())
    }

    fn list_secrets(&self, org: &OrgId) -> Result<Vec<SecretRecord>, StoreError> {
        secrets::list(self, org)
    }

    fn secret_by_name(&self, org: &OrgId, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        secrets::by_name(self, org, name)
    }

    fn page_secrets(&self, org: &OrgId, q: &SecretPageQuery<'_>) -> Result<SecretPage, StoreError> {
        secrets::page(self, org, q)
    }

    fn update_secret(
        &self,
        org: &OrgId,
        id: &SecretId,
        change: SecretChange<'_>,
    ) -> Result<SecretRecord, StoreError> {
        secrets::update(self, org, id, change)
    }

    fn delete_secret(
        &self,
        org: &OrgId,
        id: &SecretId,
        deletion: SecretDeletion<'_>,
    ) -> Result<SecretRecord, StoreError> {
        secrets::delete(self, org, id, deletion)
    }

    fn reseal_all(
        &self,
        active_key: &str,
        reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
    ) -> Result<usize, StoreError> {
        grace::reseal_all(self, active_key, reseal)
    }

    fn key_ids_in_use(&self) -> Result<Vec<String>, StoreError> {
        grace::key_ids_in_use(self)
    }

    fn all_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        secrets::all(self)
    }

    fn tombstones(&self) -> Result<Vec<TombstoneRecord>, StoreError> {
        grace::tombstones(self)
    }

    fn sweep_grace(&self, cutoff: i64) -> Result<Swept, StoreError> {
        grace::sweep(self, cutoff)
    }

    fn check_consistency(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = secrets::check_consistency(self)?;
        problems.extend(grace::check_consistency(self)?);
        problems.extend(sandboxes::check_consistency(self)?);
        Ok(problems)
    }

    fn put_sandbox(&self, sandbox: &SandboxRecord, audit: AuditRecord) -> Result<bool, StoreError> {
        sandboxes::put(self, sandbox, audit)
    }

    fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        sandboxes::list(self)
    }

    fn sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
        sandboxes::get(self, id)
    }

    fn update_sandbox(
        &self,
        org: &OrgId,
        id: &SandboxId,
        change: SandboxChange<'_>,
    ) -> Result<SandboxRecord, StoreError> {
        sandboxes::update(self, org, id, change)
    }

    fn delete_sandbox(
        &self,
        org: &OrgId,
        id: &SandboxId,
        audit: AuditRecord,
    ) -> Result<(), StoreError> {
        sandboxes::delete(self, org, id, audit)
    }

    fn restore_sandbox(
        &self,
        written: &SandboxRecord,
        previous: Option<&SandboxRecord>,
        audit: AuditRecord,
    ) -> Result<bool, StoreError> {
        sandboxes::restore(self, written, previous, audit)
    }

    fn record_usage(
        &self,
        deltas: &[UsageDelta],
        audit: &mut dyn FnMut(&SecretRecord, &UsageDelta) -> Option<AuditRecord>,
    ) -> Result<usize, StoreError> {
        usage::record_usage(self, deltas, audit)
    }

    fn secret_usage(&self, id: &SecretId) -> Result<SecretUsage, StoreError> {
        usage::secret_usage(self, id)
    }

    fn audit_page(
        &self,
        org: &OrgId,
        after: Option<u64>,
        limit: usize,
        dir: Direction,
    ) -> Result<(Vec<AuditRecord>, usize), StoreError> {
        let prefix = org_prefix(org);
        let total = self.audit.scan_prefix(&prefix).count();
        let start = audit_key(org, 0);
        let end = audit_key(org, u64::MAX);
        let range = match (dir, after) {
            (Direction::Asc, Some(seq)) => self
                .audit
                .range(audit_key(org, seq.saturating_add(1))..=end),
            (Direction::Desc, Some(seq)) => self.audit.range(start..audit_key(org, seq)),
            (_, None) => self.audit.range(start..=end),
        };
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match dir {
            Direction::Asc => Box::new(range),
            Direction::Desc => Box::new(range.rev()),
        };
        let mut items = Vec::new();
        for entry in iter.take(limit) {
            let (_, v) = entry.map_err(backend)?;
            items.push(dec("audit", &v)?);
        }
        Ok((items, total))
    }
}
