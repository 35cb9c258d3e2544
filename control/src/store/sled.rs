//! The embedded backend: sled trees, one transaction per change, flushed before returning.
//!
//! All writes are serialised by one mutex, so uniqueness checks done just before a transaction
//! cannot race another writer; readers never block.

use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::{Db, Tree};

use super::{
    ApiKeyRecord, AuditRecord, Direction, OrgRecord, SandboxChange, SandboxRecord, SecretChange,
    SecretRecord, SecretUsage, Store, StoreError, UsageDelta,
};
use super::{SecretPage, SecretPageQuery};
use crate::crypto::Sealed;
use crate::paginate::{Order, SortField, SortValue};

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

    fn get_secret_raw(&self, id: &str) -> Result<Option<SecretRecord>, StoreError> {
        match self.secrets.get(id.as_bytes()).map_err(backend)? {
            Some(bytes) => Ok(Some(dec("secrets", &bytes)?)),
            None => Ok(None),
        }
    }

    fn put_secret_tx(
        &self,
        old: Option<&SecretRecord>,
        new: &SecretRecord,
        audit: &PendingAudit,
    ) -> Result<(), StoreError> {
        let bytes = enc(new)?;
        let (audit_k, audit_v) = (&audit.key, &audit.value);
        let count = count_of(self.org_counts.get(new.org.as_bytes()).map_err(backend)?);
        (
            &self.secrets,
            &self.secret_names,
            &self.by_created,
            &self.by_updated,
            &self.placeholders,
            &self.org_counts,
            &self.audit,
        )
            .transaction(
                |(secrets, names, created, updated, placeholders, counts, audit)| {
                    match old {
                        None => {
                            names.insert(pair(&new.org, &new.name), new.id.as_bytes())?;
                            created.insert(
                                time_key(&new.org, new.created_at, &new.id),
                                new.name.as_bytes(),
                            )?;
                            placeholders.insert(new.placeholder.as_bytes(), new.id.as_bytes())?;
                            counts.insert(new.org.as_bytes(), &(count + 1).to_be_bytes())?;
                        }
                        Some(old) => {
                            updated.remove(time_key(&old.org, old.updated_at, &old.id))?;
                        }
                    }
                    updated.insert(
                        time_key(&new.org, new.updated_at, &new.id),
                        new.name.as_bytes(),
                    )?;
                    secrets.insert(new.id.as_bytes(), bytes.as_slice())?;
                    audit.insert(audit_k.as_slice(), audit_v.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                },
            )
            .map_err(tx_err)
    }

    /// Number of `org`'s secrets whose name contains `filter` (lower-cased), or all of them.
    fn count_secrets(&self, org: &str, filter: Option<&str>) -> Result<usize, StoreError> {
        let Some(filter) = filter else {
            let n = count_of(self.org_counts.get(org.as_bytes()).map_err(backend)?);
            return Ok(usize::try_from(n).unwrap_or(usize::MAX));
        };
        let prefix = org_prefix(org);
        let mut n = 0;
        for entry in self.secret_names.scan_prefix(&prefix) {
            let (k, _) = entry.map_err(backend)?;
            if String::from_utf8_lossy(&k[prefix.len()..])
                .to_lowercase()
                .contains(filter)
            {
                n += 1;
            }
        }
        Ok(n)
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
        let _guard = self.lock();
        if self
            .secret_names
            .contains_key(pair(&secret.org, &secret.name))
            .map_err(backend)?
        {
            return Err(StoreError::Conflict(format!(
                "a secret named {:?} already exists in this organization",
                secret.name
            )));
        }
        if self
            .secrets
            .contains_key(secret.id.as_bytes())
            .map_err(backend)?
            || self
                .placeholders
                .contains_key(secret.placeholder.as_bytes())
                .map_err(backend)?
        {
            return Err(StoreError::Conflict("generated id collided; retry".into()));
        }
        let pending = self.audit_entry(audit)?;
        self.put_secret_tx(None, secret, &pending)?;
        self.commit(&pending)
    }

    fn secret(&self, org: &str, id: &str) -> Result<Option<SecretRecord>, StoreError> {
        Ok(self.get_secret_raw(id)?.filter(|s| s.org == org))
    }

    fn list_secrets(&self, org: &str) -> Result<Vec<SecretRecord>, StoreError> {
        let prefix = org_prefix(org);
        let mut out = Vec::new();
        for entry in self.by_created.scan_prefix(&prefix) {
            let (k, _) = entry.map_err(backend)?;
            let id = String::from_utf8_lossy(&k[prefix.len() + 8..]).into_owned();
            if let Some(s) = self.get_secret_raw(&id)? {
                out.push(s);
            }
        }
        Ok(out)
    }

    fn secret_by_name(&self, org: &str, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        match self.secret_names.get(pair(org, name)).map_err(backend)? {
            Some(id) => self.secret(org, &String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    fn page_secrets(&self, org: &str, q: &SecretPageQuery<'_>) -> Result<SecretPage, StoreError> {
        let prefix = org_prefix(org);
        let end = org_end(org);
        let malformed = || StoreError::Rejected("cursor does not match the sort".into());
        let (tree, after) = match q.sort {
            SortField::Name => (
                &self.secret_names,
                match q.after {
                    None => None,
                    Some(c) => match &c.v {
                        SortValue::Text(name) => Some(pair(org, name)),
                        SortValue::Time(_) => return Err(malformed()),
                    },
                },
            ),
            SortField::CreatedAt | SortField::UpdatedAt => (
                if q.sort == SortField::CreatedAt {
                    &self.by_created
                } else {
                    &self.by_updated
                },
                match q.after {
                    None => None,
                    Some(c) => match &c.v {
                        SortValue::Time(t) => Some(time_key(org, *t, &c.i)),
                        SortValue::Text(_) => return Err(malformed()),
                    },
                },
            ),
        };
        // Keyset seek: start strictly after the cursor's key in the walking direction, so
        // inserts and deletes elsewhere never shift what comes next.
        let range = match (q.order, after) {
            (Order::Asc, Some(k)) => tree.range((Bound::Excluded(k), Bound::Excluded(end))),
            (Order::Desc, Some(k)) => {
                tree.range((Bound::Included(prefix.clone()), Bound::Excluded(k)))
            }
            (_, None) => tree.range((Bound::Included(prefix.clone()), Bound::Excluded(end))),
        };
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match q.order {
            Order::Asc => Box::new(range),
            Order::Desc => Box::new(range.rev()),
        };
        let mut items = Vec::with_capacity(q.limit);
        let mut more = false;
        for entry in iter {
            let (k, v) = entry.map_err(backend)?;
            let (name, id) = match q.sort {
                SortField::Name => (&k[prefix.len()..], v.as_ref()),
                _ => (v.as_ref(), &k[prefix.len() + 8..]),
            };
            if let Some(f) = q.name_contains
                && !String::from_utf8_lossy(name).to_lowercase().contains(f)
            {
                continue;
            }
            if items.len() == q.limit {
                more = true;
                break;
            }
            if let Some(rec) = self.get_secret_raw(&String::from_utf8_lossy(id))? {
                items.push(rec);
            }
        }
        let total = self.count_secrets(org, q.name_contains)?;
        Ok(SecretPage { items, total, more })
    }

    fn update_secret(
        &self,
        org: &str,
        id: &str,
        change: SecretChange<'_>,
    ) -> Result<SecretRecord, StoreError> {
        let _guard = self.lock();
        let old = self.secret(org, id)?.ok_or(StoreError::NotFound)?;
        let (new, audit) = change(&old)?;
        if new.id != old.id
            || new.org != old.org
            || new.name != old.name
            || new.placeholder != old.placeholder
        {
            return Err(StoreError::Rejected("identity fields are immutable".into()));
        }
        let pending = self.audit_entry(audit)?;
        self.put_secret_tx(Some(&old), &new, &pending)?;
        self.commit(&pending)?;
        Ok(new)
    }

    fn delete_secret(
        &self,
        org: &str,
        id: &str,
        audit: &mut dyn FnMut(&SecretRecord) -> AuditRecord,
    ) -> Result<SecretRecord, StoreError> {
        let _guard = self.lock();
        let old = self.secret(org, id)?.ok_or(StoreError::NotFound)?;
        let pending = self.audit_entry(audit(&old))?;
        let (ak, av) = (&pending.key, &pending.value);
        let count = count_of(self.org_counts.get(old.org.as_bytes()).map_err(backend)?);
        (
            &self.secrets,
            &self.secret_names,
            &self.by_created,
            &self.by_updated,
            &self.placeholders,
            &self.org_counts,
            &self.audit,
            &self.usage,
        )
            .transaction(
                |(secrets, names, created, updated, placeholders, counts, audit, usage)| {
                    usage.remove(old.id.as_bytes())?;
                    secrets.remove(old.id.as_bytes())?;
                    names.remove(pair(&old.org, &old.name))?;
                    created.remove(time_key(&old.org, old.created_at, &old.id))?;
                    updated.remove(time_key(&old.org, old.updated_at, &old.id))?;
                    placeholders.remove(old.placeholder.as_bytes())?;
                    counts.insert(old.org.as_bytes(), &count.saturating_sub(1).to_be_bytes())?;
                    audit.insert(ak.as_slice(), av.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                },
            )
            .map_err(tx_err)?;
        self.commit(&pending)?;
        Ok(old)
    }

    fn reseal_all(
        &self,
        active_key: &str,
        reseal: &mut dyn FnMut(&SecretRecord) -> Result<Sealed, StoreError>,
    ) -> Result<usize, StoreError> {
        let _guard = self.lock();
        let mut count = 0;
        for entry in self.secrets.iter() {
            let (k, v) = entry.map_err(backend)?;
            let mut record: SecretRecord = dec("secrets", &v)?;
            if record.sealed.key_id == active_key {
                continue;
            }
            record.sealed = reseal(&record)?;
            // Each record is replaced atomically: it holds either the old or the new sealing.
            self.secrets.insert(k, enc(&record)?).map_err(backend)?;
            count += 1;
            if count % 64 == 0 {
                self.flush()?;
            }
        }
        self.flush()?;
        Ok(count)
    }

    fn key_ids_in_use(&self) -> Result<Vec<String>, StoreError> {
        let mut ids = std::collections::BTreeSet::new();
        for entry in self.secrets.iter() {
            let (_, v) = entry.map_err(backend)?;
            let record: SecretRecord = dec("secrets", &v)?;
            ids.insert(record.sealed.key_id);
        }
        Ok(ids.into_iter().collect())
    }

    fn all_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.secrets
            .iter()
            .map(|r| dec("secrets", &r.map_err(backend)?.1))
            .collect()
    }

    fn check_consistency(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        let secrets = self.all_secrets()?;
        let ids: std::collections::HashSet<&str> = secrets.iter().map(|s| s.id.as_str()).collect();
        for s in &secrets {
            let name = self
                .secret_names
                .get(pair(&s.org, &s.name))
                .map_err(backend)?;
            if name.as_deref() != Some(s.id.as_bytes()) {
                problems.push(format!("secret {}: name index does not point at it", s.id));
            }
            if !self
                .by_created
                .contains_key(time_key(&s.org, s.created_at, &s.id))
                .map_err(backend)?
            {
                problems.push(format!("secret {}: missing from the createdAt index", s.id));
            }
            if !self
                .by_updated
                .contains_key(time_key(&s.org, s.updated_at, &s.id))
                .map_err(backend)?
            {
                problems.push(format!("secret {}: missing from the updatedAt index", s.id));
            }
            let ph = self
                .placeholders
                .get(s.placeholder.as_bytes())
                .map_err(backend)?;
            if ph.as_deref() != Some(s.id.as_bytes()) {
                problems.push(format!(
                    "secret {}: placeholder index does not point at it",
                    s.id
                ));
            }
        }
        for (tree, name) in [
            (&self.secret_names, "name"),
            (&self.placeholders, "placeholder"),
        ] {
            for entry in tree.iter() {
                let (_, id) = entry.map_err(backend)?;
                if !ids.contains(String::from_utf8_lossy(&id).as_ref()) {
                    problems.push(format!("{name} index points at a missing secret"));
                }
            }
        }
        if self.by_created.len() != secrets.len() || self.by_updated.len() != secrets.len() {
            problems.push("time indexes have dangling entries".into());
        }
        let mut per_org: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for s in &secrets {
            *per_org.entry(s.org.as_str()).or_default() += 1;
        }
        for entry in self.org_counts.iter() {
            let (org, n) = entry.map_err(backend)?;
            let org = String::from_utf8_lossy(&org).into_owned();
            let want = per_org.get(org.as_str()).copied().unwrap_or(0);
            if count_of(Some(n)) != want {
                problems.push(format!("org {org}: secret count is off"));
            }
        }
        for entry in self.sandbox_cgroups.iter() {
            let (_, id) = entry.map_err(backend)?;
            if !self.sandboxes.contains_key(&id).map_err(backend)? {
                problems.push("cgroup index points at a missing sandbox".into());
            }
        }
        Ok(problems)
    }

    fn put_sandbox(&self, sandbox: &SandboxRecord, audit: AuditRecord) -> Result<bool, StoreError> {
        let _guard = self.lock();
        let old: Option<SandboxRecord> =
            match self.sandboxes.get(sandbox.id.as_bytes()).map_err(backend)? {
                Some(b) => Some(dec("sandboxes", &b)?),
                None => None,
            };
        if let Some(old) = &old
            && old.org != sandbox.org
        {
            return Err(StoreError::NotFound);
        }
        if let Some(holder) = self
            .sandbox_cgroups
            .get(sandbox.cgroup.as_bytes())
            .map_err(backend)?
            && holder.as_ref() != sandbox.id.as_bytes()
        {
            return Err(StoreError::Conflict(format!(
                "cgroup {} is already registered to another sandbox",
                sandbox.cgroup
            )));
        }
        let bytes = enc(sandbox)?;
        let pending = self.audit_entry(audit)?;
        let (ak, av) = (&pending.key, &pending.value);
        (&self.sandboxes, &self.sandbox_cgroups, &self.audit)
            .transaction(|(sandboxes, cgroups, audit)| {
                if let Some(old) = &old
                    && old.cgroup != sandbox.cgroup
                {
                    cgroups.remove(old.cgroup.as_bytes())?;
                }
                cgroups.insert(sandbox.cgroup.as_bytes(), sandbox.id.as_bytes())?;
                sandboxes.insert(sandbox.id.as_bytes(), bytes.as_slice())?;
                audit.insert(ak.as_slice(), av.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.commit(&pending)?;
        Ok(old.is_none())
    }

    fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.sandboxes
            .iter()
            .map(|r| dec("sandboxes", &r.map_err(backend)?.1))
            .collect()
    }

    fn sandbox(&self, id: &str) -> Result<Option<SandboxRecord>, StoreError> {
        match self.sandboxes.get(id.as_bytes()).map_err(backend)? {
            Some(b) => Ok(Some(dec("sandboxes", &b)?)),
            None => Ok(None),
        }
    }

    fn update_sandbox(
        &self,
        org: &str,
        id: &str,
        change: SandboxChange<'_>,
    ) -> Result<SandboxRecord, StoreError> {
        let _guard = self.lock();
        let old = self
            .sandbox(id)?
            .filter(|s| s.org == org)
            .ok_or(StoreError::NotFound)?;
        let (new, audit) = change(&old)?;
        if new.cgroup != old.cgroup || new.id != old.id || new.org != old.org {
            return Err(StoreError::Rejected("identity fields are immutable".into()));
        }
        let bytes = enc(&new)?;
        let pending = self.audit_entry(audit)?;
        let (ak, av) = (&pending.key, &pending.value);
        (&self.sandboxes, &self.audit)
            .transaction(|(sandboxes, audit)| {
                sandboxes.insert(new.id.as_bytes(), bytes.as_slice())?;
                audit.insert(ak.as_slice(), av.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.commit(&pending)?;
        Ok(new)
    }

    fn delete_sandbox(&self, org: &str, id: &str, audit: AuditRecord) -> Result<(), StoreError> {
        let _guard = self.lock();
        let old = self
            .sandbox(id)?
            .filter(|s| s.org == org)
            .ok_or(StoreError::NotFound)?;
        let pending = self.audit_entry(audit)?;
        let (ak, av) = (&pending.key, &pending.value);
        (&self.sandboxes, &self.sandbox_cgroups, &self.audit)
            .transaction(|(sandboxes, cgroups, audit)| {
                sandboxes.remove(old.id.as_bytes())?;
                cgroups.remove(old.cgroup.as_bytes())?;
                audit.insert(ak.as_slice(), av.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.commit(&pending)
    }

    fn restore_sandbox(
        &self,
        written: &SandboxRecord,
        previous: Option<&SandboxRecord>,
        audit: AuditRecord,
    ) -> Result<bool, StoreError> {
        let _guard = self.lock();
        if self.sandbox(&written.id)?.as_ref() != Some(written) {
            return Ok(false);
        }
        if let Some(prev) = previous
            && prev.cgroup != written.cgroup
            && let Some(holder) = self
                .sandbox_cgroups
                .get(prev.cgroup.as_bytes())
                .map_err(backend)?
            && holder.as_ref() != prev.id.as_bytes()
        {
            return Err(StoreError::Conflict(format!(
                "cgroup {} was registered to another sandbox meanwhile",
                prev.cgroup
            )));
        }
        let bytes = previous.map(enc).transpose()?;
        let pending = self.audit_entry(audit)?;
        let (ak, av) = (&pending.key, &pending.value);
        (&self.sandboxes, &self.sandbox_cgroups, &self.audit)
            .transaction(|(sandboxes, cgroups, audit)| {
                cgroups.remove(written.cgroup.as_bytes())?;
                match (previous, &bytes) {
                    (Some(prev), Some(bytes)) => {
                        cgroups.insert(prev.cgroup.as_bytes(), prev.id.as_bytes())?;
                        sandboxes.insert(prev.id.as_bytes(), bytes.as_slice())?;
                    }
                    _ => {
                        sandboxes.remove(written.id.as_bytes())?;
                    }
                }
                audit.insert(ak.as_slice(), av.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })
            .map_err(tx_err)?;
        self.commit(&pending)?;
        Ok(true)
    }

    fn record_usage(
        &self,
        deltas: &[UsageDelta],
        audit: &mut dyn FnMut(&SecretRecord, &UsageDelta) -> Option<AuditRecord>,
    ) -> Result<usize, StoreError> {
        let _guard = self.lock();
        let mut usages: std::collections::BTreeMap<String, SecretUsage> = Default::default();
        let mut audits = Vec::new();
        let mut recorded = 0;
        for d in deltas {
            // Under the write lock: a secret seen here cannot be deleted before the commit.
            let Some(secret) = self.get_secret_raw(&d.secret_id)? else {
                continue;
            };
            recorded += 1;
            if let Some(a) = audit(&secret, d) {
                audits.push(self.audit_entry(a)?);
            }
            if d.counts.is_zero() {
                continue;
            }
            if !usages.contains_key(&d.secret_id) {
                let current = self.secret_usage(&d.secret_id)?;
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
            .map(|(id, u)| Ok((id.as_bytes().to_vec(), enc(u)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        (&self.usage, &self.audit)
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
        self.flush()?;
        for a in &audits {
            Self::emit(a);
        }
        Ok(recorded)
    }

    fn secret_usage(&self, id: &str) -> Result<SecretUsage, StoreError> {
        match self.usage.get(id.as_bytes()).map_err(backend)? {
            Some(bytes) => dec("secret_usage", &bytes),
            None => Ok(SecretUsage::default()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paginate::Cursor;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn audit(org: &str) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time: 0,
            actor: "t".into(),
            org: org.into(),
            action: "t".into(),
            target_type: "secret".into(),
            target_id: String::new(),
            target_name: None,
            changes: serde_json::Value::Null,
        }
    }

    fn secret(org: &str, n: usize, time: i64) -> SecretRecord {
        SecretRecord {
            id: format!("id-{n:05}"),
            org: org.into(),
            name: format!("name-{}", (n * 7919) % 10007),
            description: None,
            hosts: vec![],
            placeholder: format!("ph-{n}"),
            created_at: time,
            updated_at: time,
            revision: 1,
            sealed: Sealed {
                key_id: "k".into(),
                nonce: String::new(),
                ciphertext: String::new(),
            },
            body_substitution: false,
            wrong_host: Default::default(),
        }
    }

    fn cursor_of(s: &SecretRecord, sort: SortField, order: Order) -> Cursor {
        let v = match sort {
            SortField::Name => SortValue::Text(s.name.clone()),
            SortField::CreatedAt => SortValue::Time(s.created_at),
            SortField::UpdatedAt => SortValue::Time(s.updated_at),
        };
        Cursor {
            s: sort,
            o: order,
            v,
            i: s.id.clone(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Walking pages while secrets are inserted and deleted between pages returns every
        /// secret that existed throughout exactly once, in order.
        #[test]
        fn pages_stable_under_churn(
            times in prop::collection::vec(-5i64..40, 1..60),
            churn in prop::collection::vec((any::<bool>(), -5i64..40, any::<prop::sample::Index>()), 0..40),
            limit in 1usize..7,
            sort_pick in 0usize..3,
            desc: bool,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = SledStore::open(dir.path()).unwrap();
            let sort = [SortField::Name, SortField::CreatedAt, SortField::UpdatedAt][sort_pick];
            let order = if desc { Order::Desc } else { Order::Asc };
            // Another org's secrets must never show up.
            store.insert_secret(&secret("other", 99_999, 0), audit("other")).unwrap();
            let mut n = 0;
            let mut live = Vec::new();
            for t in &times {
                let s = secret("acme", n, *t);
                store.insert_secret(&s, audit("acme")).unwrap();
                live.push(s.id.clone());
                n += 1;
            }
            let initial: BTreeSet<String> = live.iter().cloned().collect();
            let mut removed = BTreeSet::new();
            let mut seen: Vec<SecretRecord> = Vec::new();
            let mut cursor: Option<Cursor> = None;
            let mut churn = churn.into_iter();
            loop {
                let page = store.page_secrets("acme", &SecretPageQuery {
                    sort, order, after: cursor.as_ref(), limit, name_contains: None,
                }).unwrap();
                prop_assert!(page.items.len() <= limit);
                prop_assert!(page.items.iter().all(|s| s.org == "acme"));
                seen.extend(page.items.iter().cloned());
                if !page.more { break; }
                cursor = page.items.last().map(|s| cursor_of(s, sort, order));
                if let Some((insert, t, idx)) = churn.next() {
                    if insert {
                        let s = secret("acme", n, t);
                        n += 1;
                        store.insert_secret(&s, audit("acme")).unwrap();
                        live.push(s.id.clone());
                    } else if !live.is_empty() {
                        let id = live.remove(idx.index(live.len()));
                        store.delete_secret("acme", &id, &mut |_| audit("acme")).unwrap();
                        removed.insert(id);
                    }
                }
            }
            let ids: Vec<&str> = seen.iter().map(|s| s.id.as_str()).collect();
            let unique: BTreeSet<&str> = ids.iter().copied().collect();
            prop_assert_eq!(unique.len(), ids.len(), "a secret was repeated");
            for id in initial.difference(&removed) {
                prop_assert!(unique.contains(id.as_str()), "secret {} skipped", id);
            }
            let keys: Vec<Cursor> = seen.iter().map(|s| cursor_of(s, sort, order)).collect();
            for w in keys.windows(2) {
                let (a, b) = ((&w[0].v, &w[0].i), (&w[1].v, &w[1].i));
                prop_assert!(if desc { a > b } else { a < b }, "out of order");
            }
            prop_assert!(store.check_consistency().unwrap().is_empty());
        }
    }

    fn sandbox(id: &str, cgroup: &str, env: &str) -> SandboxRecord {
        SandboxRecord {
            egress: Default::default(),
            id: id.into(),
            org: "acme".into(),
            cgroup: cgroup.into(),
            netns: None,
            mounts: vec![super::super::Mount {
                env: env.into(),
                secret_id: "s".into(),
                secret_name: "s".into(),
            }],
            created_at: 1,
            updated_at: 1,
        }
    }

    #[test]
    fn restore_undoes_only_the_write_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        // A new record rolled back: gone, cgroup free.
        let new = sandbox("sb", "veil.slice/a", "A");
        store.put_sandbox(&new, audit("acme")).unwrap();
        assert!(store.restore_sandbox(&new, None, audit("acme")).unwrap());
        assert!(store.sandbox("sb").unwrap().is_none());
        store
            .put_sandbox(&sandbox("other", "veil.slice/a", "A"), audit("acme"))
            .unwrap();
        // A replacement rolled back: the previous record and its cgroup come back.
        let old = sandbox("sb", "veil.slice/b", "A");
        store.put_sandbox(&old, audit("acme")).unwrap();
        let moved = sandbox("sb", "veil.slice/c", "B");
        store.put_sandbox(&moved, audit("acme")).unwrap();
        assert!(
            store
                .restore_sandbox(&moved, Some(&old), audit("acme"))
                .unwrap()
        );
        assert_eq!(store.sandbox("sb").unwrap().as_ref(), Some(&old));
        // A write that was superseded is left alone.
        assert!(!store.restore_sandbox(&moved, None, audit("acme")).unwrap());
        assert_eq!(store.sandbox("sb").unwrap().as_ref(), Some(&old));
        store
            .put_sandbox(&sandbox("x", "veil.slice/c", "A"), audit("acme"))
            .unwrap();
        assert!(store.check_consistency().unwrap().is_empty());
    }

    #[test]
    fn name_filter_and_total() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        for (i, name) in ["Alpha_DB", "beta", "gamma-db"].iter().enumerate() {
            let mut s = secret("acme", i, i as i64);
            s.name = (*name).to_owned();
            store.insert_secret(&s, audit("acme")).unwrap();
        }
        let q = SecretPageQuery {
            sort: SortField::Name,
            order: Order::Asc,
            after: None,
            limit: 1,
            name_contains: Some("db"),
        };
        let page = store.page_secrets("acme", &q).unwrap();
        assert_eq!(page.total, 2);
        assert!(page.more);
        assert_eq!(page.items[0].name, "Alpha_DB");
        let all = SecretPageQuery {
            name_contains: None,
            limit: 10,
            ..q
        };
        assert_eq!(store.page_secrets("acme", &all).unwrap().total, 3);
        assert_eq!(store.page_secrets("nobody", &all).unwrap().total, 0);
    }

    #[test]
    fn usage_adds_up_audits_and_goes_with_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let s = secret("acme", 1, 1);
        store.insert_secret(&s, audit("acme")).unwrap();
        let delta = |host: &str, substituted: u64, at: i64| UsageDelta {
            secret_id: s.id.clone(),
            sandbox: "sb".into(),
            host: host.into(),
            counts: super::super::UsageCounts {
                substituted,
                wrong_host: 1,
                ..Default::default()
            },
            at,
        };
        let gone = UsageDelta {
            secret_id: "no-such-secret".into(),
            ..delta("h", 1, 1)
        };
        let mut audited = Vec::new();
        let n = store
            .record_usage(
                &[delta("a.test", 2, 10), delta("b.test", 0, 20), gone],
                &mut |sec, d| {
                    audited.push((sec.id.clone(), d.host.clone()));
                    Some(audit(&sec.org))
                },
            )
            .unwrap();
        assert_eq!(n, 2, "the unknown secret is skipped");
        assert_eq!(audited.len(), 2);
        store
            .record_usage(&[delta("a.test", 3, 30)], &mut |_, _| None)
            .unwrap();
        let u = store.secret_usage(&s.id).unwrap();
        assert_eq!(u.last_used_at, Some(30));
        assert_eq!(u.hosts["a.test"].counts.substituted, 5);
        assert_eq!(u.hosts["a.test"].counts.wrong_host, 2);
        // Seen but never substituted: counted, not "used".
        assert_eq!(u.hosts["b.test"].last_used_at, None);
        assert_eq!(u.hosts["b.test"].last_seen_at, Some(20));
        let (entries, _) = store.audit_page("acme", None, 100, Direction::Asc).unwrap();
        assert_eq!(entries.len(), 3, "create + one entry per recorded delta");
        // Durable across a reopen.
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.secret_usage(&s.id).unwrap(), u);
        store
            .delete_secret("acme", &s.id, &mut |_| audit("acme"))
            .unwrap();
        assert_eq!(store.secret_usage(&s.id).unwrap(), SecretUsage::default());
    }

    #[test]
    fn records_without_issue_6_fields_still_load() {
        let mut v = serde_json::to_value(secret("acme", 1, 1)).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("body_substitution");
        o.remove("wrong_host");
        let r: SecretRecord = dec("secrets", v.to_string().as_bytes()).unwrap();
        assert!(!r.body_substitution);
        assert_eq!(r.wrong_host, super::super::WrongHost::Forward);
    }

    #[test]
    fn usage_hosts_are_bounded() {
        let mut u = SecretUsage::default();
        let one = super::super::UsageCounts {
            substituted: 1,
            ..Default::default()
        };
        for i in 0..super::super::MAX_USAGE_HOSTS + 10 {
            u.add(&format!("h{i}.test"), &one, 1);
        }
        assert_eq!(u.hosts.len(), super::super::MAX_USAGE_HOSTS + 1);
        assert_eq!(u.hosts[super::super::OTHER_HOSTS].counts.substituted, 10);
    }
}
