//! The embedded backend: sled trees, one transaction per change, flushed before returning.
//!
//! All writes are serialised by one mutex, so uniqueness checks done just before a transaction
//! cannot race another writer; readers never block. One file per resource: `secrets`,
//! `sandboxes`, `usage`, and `grace` (rotated-out values, tombstones, rekey, sweep); the
//! [`Store`] implementation here delegates to them.

mod grace;
mod sandboxes;
mod secrets;
#[cfg(test)]
mod tests;
mod usage;

use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::{Db, Tree};

use super::{
    ApiKeyRecord, AuditRecord, Direction, OrgRecord, SandboxChange, SandboxRecord, SealedRef,
    SecretChange, SecretDeletion, SecretPage, SecretPageQuery, SecretRecord, SecretUsage, Store,
    StoreError, Swept, TombstoneRecord, UsageDelta,
};
use crate::crypto::Sealed;

/// An audit entry encoded for a transaction, emitted as an event once committed.
#[derive(Debug)]
struct PendingAudit {
    key: Vec<u8>,
    value: Vec<u8>,
    record: AuditRecord,
}

/// The sled-backed store.
#[derive(Debug)]
pub struct SledStore {
    db: Db,
    orgs: Tree,
    apikeys: Tree,
    secrets: Tree,
    secret_names: Tree,
    by_created: Tree,
    by_updated: Tree,
    org_counts: Tree,
    placeholders: Tree,
    sandboxes: Tree,
    sandbox_cgroups: Tree,
    audit: Tree,
    usage: Tree,
    /// Deleted secrets inside their grace period, by id.
    tombstones: Tree,
    write_lock: Mutex<()>,
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

fn enc<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("encode: {e}")))
}

fn dec<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        detail: e.to_string(),
    })
}

fn pair(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn org_prefix(org: &str) -> Vec<u8> {
    let mut k = org.as_bytes().to_vec();
    k.push(0);
    k
}

/// End (exclusive) of an org's key range: org names never contain bytes below `-`.
fn org_end(org: &str) -> Vec<u8> {
    let mut k = org.as_bytes().to_vec();
    k.push(1);
    k
}

/// Index key ordering by time then id; the sign bit is flipped so negative times sort first.
fn time_key(org: &str, ms: i64, id: &str) -> Vec<u8> {
    let mut k = org_prefix(org);
    k.extend_from_slice(&((ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

fn count_of(v: Option<sled::IVec>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

fn audit_key(org: &str, seq: u64) -> Vec<u8> {
    let mut k = org_prefix(org);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Version of the on-disk layout (trees, keys, record encoding).
const SCHEMA_VERSION: u64 = 1;

/// Stamps a new store with the layout version; refuses a store written by another layout.
fn check_schema(db: &Db) -> Result<(), StoreError> {
    let meta = db.open_tree("meta").map_err(backend)?;
    match meta.get("schema").map_err(backend)? {
        Some(v) if count_of(Some(v.clone())) == SCHEMA_VERSION => Ok(()),
        Some(v) => Err(StoreError::Corrupt {
            tree: "meta",
            detail: format!(
                "store layout version {} is not supported (expected {SCHEMA_VERSION})",
                count_of(Some(v))
            ),
        }),
        None => {
            let has_data = db
                .tree_names()
                .iter()
                .filter(|n| n.as_ref() != b"meta" && n.as_ref() != b"__sled__default")
                .any(|n| db.open_tree(n).map(|t| !t.is_empty()).unwrap_or(true));
            if has_data {
                return Err(StoreError::Corrupt {
                    tree: "meta",
                    detail: "store has data but no layout version".into(),
                });
            }
            meta.insert("schema", &SCHEMA_VERSION.to_be_bytes())
                .map_err(backend)?;
            db.flush().map_err(backend)?;
            Ok(())
        }
    }
}

impl SledStore {
    /// Opens (or creates) the store in `dir`; fails if another process holds it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(backend)?;
        check_schema(&db)?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        Ok(Self {
            orgs: tree("orgs")?,
            apikeys: tree("apikeys")?,
            secrets: tree("secrets")?,
            secret_names: tree("secret_names")?,
            by_created: tree("secret_by_created")?,
            by_updated: tree("secret_by_updated")?,
            org_counts: tree("org_secret_counts")?,
            placeholders: tree("placeholders")?,
            sandboxes: tree("sandboxes")?,
            sandbox_cgroups: tree("sandbox_cgroups")?,
            audit: tree("audit")?,
            usage: tree("secret_usage")?,
            tombstones: tree("tombstones")?,
            db,
            write_lock: Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while holding the lock cannot leave sled half-written (transactions are
        // atomic), so a poisoned lock is safe to reuse.
        self.write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn next_seq(&self) -> Result<u64, StoreError> {
        self.db.generate_id().map_err(backend)
    }

    /// Assigns the entry its sequence number and encodes it for the change's transaction.
    fn audit_entry(&self, mut audit: AuditRecord) -> Result<PendingAudit, StoreError> {
        audit.seq = self.next_seq()?;
        Ok(PendingAudit {
            key: audit_key(&audit.org, audit.seq),
            value: enc(&audit)?,
            record: audit,
        })
    }

    /// Makes the change durable, then emits its audit entry as a tracing event.
    fn commit(&self, pending: &PendingAudit) -> Result<(), StoreError> {
        self.flush()?;
        Self::emit(pending);
        Ok(())
    }

    /// Emits a committed audit entry as a tracing event.
    fn emit(pending: &PendingAudit) {
        let a = &pending.record;
        tracing::info!(
            target: "veil::audit",
            seq = a.seq,
            actor = %a.actor,
            org = %a.org,
            action = %a.action,
            target_type = %a.target_type,
            target_id = %a.target_id,
            changes = %a.changes,
            "audit"
        );
    }
}

impl Store for SledStore {
    fn create_api_key(&self, key: &ApiKeyRecord, audit: AuditRecord) -> Result<(), StoreError> {
        let _guard = self.lock();
        if self
            .apikeys
            .contains_key(key.id.as_bytes())
            .map_err(backend)?
        {
            return Err(StoreError::Conflict("api key id exists".into()));
        }
        let org_bytes = match self.orgs.get(key.org.as_bytes()).map_err(backend)? {
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
                    orgs.insert(key.org.as_bytes(), org.as_slice())?;
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
        audit.org = key.org.clone();
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

    fn secret(&self, org: &str, id: &str) -> Result<Option<SecretRecord>, StoreError> {
        secrets::get(self, org, id)
    }

    fn list_secrets(&self, org: &str) -> Result<Vec<SecretRecord>, StoreError> {
        secrets::list(self, org)
    }

    fn secret_by_name(&self, org: &str, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        secrets::by_name(self, org, name)
    }

    fn page_secrets(&self, org: &str, q: &SecretPageQuery<'_>) -> Result<SecretPage, StoreError> {
        secrets::page(self, org, q)
    }

    fn update_secret(
        &self,
        org: &str,
        id: &str,
        change: SecretChange<'_>,
    ) -> Result<SecretRecord, StoreError> {
        secrets::update(self, org, id, change)
    }

    fn delete_secret(
        &self,
        org: &str,
        id: &str,
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

    fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        sandboxes::get(self, id)
    }

    fn update_sandbox(
        &self,
        org: &str,
        id: &str,
        change: SandboxChange<'_>,
    ) -> Result<SandboxRecord, StoreError> {
        sandboxes::update(self, org, id, change)
    }

    fn delete_sandbox(&self, org: &str, id: &str, audit: AuditRecord) -> Result<(), StoreError> {
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

    fn secret_usage(&self, id: &str) -> Result<SecretUsage, StoreError> {
        usage::secret_usage(self, id)
    }

    fn audit_page(
        &self,
        org: &str,
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
