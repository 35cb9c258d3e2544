//! The sled store itself: its trees and write lock, the key encodings shared by every resource,
//! and the one lock → transaction → audit → commit path each change takes.

use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::TransactionError;
use sled::{Db, Tree};

use crate::store::{AuditRecord, StoreError};

/// An audit entry encoded for a transaction, emitted as an event once committed.
#[derive(Debug)]
pub(super) struct PendingAudit {
    pub(super) key: Vec<u8>,
    pub(super) value: Vec<u8>,
    pub(super) record: AuditRecord,
}

/// The sled-backed store.
#[derive(Debug)]
pub struct SledStore {
    pub(super) db: Db,
    pub(super) orgs: Tree,
    pub(super) apikeys: Tree,
    pub(super) secrets: Tree,
    pub(super) secret_names: Tree,
    pub(super) by_created: Tree,
    pub(super) by_updated: Tree,
    pub(super) org_counts: Tree,
    pub(super) placeholders: Tree,
    pub(super) sandboxes: Tree,
    pub(super) sandbox_cgroups: Tree,
    pub(super) audit: Tree,
    pub(super) usage: Tree,
    /// Deleted secrets inside their grace period, by id.
    pub(super) tombstones: Tree,
    pub(super) write_lock: Mutex<()>,
}

pub(super) fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e)
}

pub(super) fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

pub(super) fn enc<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(StoreError::Encode)
}

pub(super) fn dec<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        detail: e.to_string(),
    })
}

pub(super) fn pair(a: &(impl AsRef<str> + ?Sized), b: &str) -> Vec<u8> {
    let a = a.as_ref();
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

pub(super) fn org_prefix(org: &(impl AsRef<str> + ?Sized)) -> Vec<u8> {
    let mut k = org.as_ref().as_bytes().to_vec();
    k.push(0);
    k
}

/// End (exclusive) of an org's key range: org names never contain bytes below `-`.
pub(super) fn org_end(org: &(impl AsRef<str> + ?Sized)) -> Vec<u8> {
    let mut k = org.as_ref().as_bytes().to_vec();
    k.push(1);
    k
}

/// Index key ordering by time then id; the sign bit is flipped so negative times sort first.
pub(super) fn time_key(
    org: &(impl AsRef<str> + ?Sized),
    ms: i64,
    id: &(impl AsRef<str> + ?Sized),
) -> Vec<u8> {
    let mut k = org_prefix(org);
    k.extend_from_slice(&((ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(id.as_ref().as_bytes());
    k
}

pub(super) fn count_of(v: Option<sled::IVec>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

pub(super) fn audit_key(org: &(impl AsRef<str> + ?Sized), seq: u64) -> Vec<u8> {
    let mut k = org_prefix(org);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Version of the on-disk layout (trees, keys, record encoding).
pub(super) const SCHEMA_VERSION: u64 = 1;

/// Stamps a new store with the layout version; refuses a store written by another layout.
pub(super) fn check_schema(db: &Db) -> Result<(), StoreError> {
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while holding the lock cannot leave sled half-written (transactions are
        // atomic), so a poisoned lock is safe to reuse.
        self.write_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    pub(super) fn next_seq(&self) -> Result<u64, StoreError> {
        self.db.generate_id().map_err(backend)
    }

    /// Assigns the entry its sequence number and encodes it for the change's transaction.
    pub(super) fn audit_entry(&self, mut audit: AuditRecord) -> Result<PendingAudit, StoreError> {
        audit.seq = self.next_seq()?;
        Ok(PendingAudit {
            key: audit_key(&audit.org, audit.seq),
            value: enc(&audit)?,
            record: audit,
        })
    }

    /// Makes the change durable, then emits its audit entry as a tracing event.
    pub(super) fn commit(&self, pending: &PendingAudit) -> Result<(), StoreError> {
        self.flush()?;
        Self::emit(pending);
        Ok(())
    }

    /// Emits a committed audit entry as a tracing event.
    pub(super) fn emit(pending: &PendingAudit) {
        crate::store::emit_audit(&pending.record);
    }
}
