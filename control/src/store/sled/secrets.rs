//! Secrets: records, the name / time / placeholder indexes and per-organization counts.

use std::ops::Bound;

use sled::transaction::{ConflictableTransactionError, Transactional};

use super::db::{
    PendingAudit, SledStore, backend, count_of, dec, enc, org_end, org_prefix, pair, time_key,
    tx_err,
};
use crate::paginate::{Order, SortField, SortValue};
use crate::store::{
    AuditRecord, Conflict, OrgId, Rejected, SecretChange, SecretDeletion, SecretId, SecretPage,
    SecretPageQuery, SecretRecord, StoreError,
};

impl SledStore {
    pub(super) fn get_secret_raw(&self, id: &str) -> Result<Option<SecretRecord>, StoreError> {
        match self.secrets.get(id.as_bytes()).map_err(backend)? {
            Some(bytes) => Ok(Some(dec("secrets", &bytes)?)),
            None => Ok(None),
        }
    }

    pub(super) fn put_secret_tx(
        &self,
        old: Option<&SecretRecord>,
        new: &SecretRecord,
        audit: &PendingAudit,
    ) -> Result<(), StoreError> {
        let bytes = enc(new)?;
        let (audit_k, audit_v) = (&audit.key, &audit.value);
        let count = count_of(
            self.org_counts
                .get(new.org.as_str().as_bytes())
                .map_err(backend)?,
        );
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
                            names.insert(pair(&new.org, &new.name), new.id.as_str().as_bytes())?;
                            created.insert(
                                time_key(&new.org, new.created_at, &new.id),
                                new.name.as_bytes(),
                            )?;
                            placeholders
                                .insert(new.placeholder.as_bytes(), new.id.as_str().as_bytes())?;
                            counts
                                .insert(new.org.as_str().as_bytes(), &(count + 1).to_be_bytes())?;
                        }
                        Some(old) => {
                            updated.remove(time_key(&old.org, old.updated_at, &old.id))?;
                        }
                    }
                    updated.insert(
                        time_key(&new.org, new.updated_at, &new.id),
                        new.name.as_bytes(),
                    )?;
                    secrets.insert(new.id.as_str().as_bytes(), bytes.as_slice())?;
                    audit.insert(audit_k.as_slice(), audit_v.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                },
            )
            .map_err(tx_err)
    }

    /// Number of `org`'s secrets whose name contains `filter` (lower-cased), or all of them.
    pub(super) fn count_secrets(
        &self,
        org: &OrgId,
        filter: Option<&str>,
    ) -> Result<usize, StoreError> {
        let Some(filter) = filter else {
            let n = count_of(
                self.org_counts
                    .get(org.as_str().as_bytes())
                    .map_err(backend)?,
            );
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

pub(super) fn insert(
    store: &SledStore,
    secret: &SecretRecord,
    audit: AuditRecord,
) -> Result<(), StoreError> {
    let _guard = store.lock();
    if store
        .secret_names
        .contains_key(pair(&secret.org, &secret.name))
        .map_err(backend)?
    {
        return Err(StoreError::Conflict(Conflict::SecretName(
            secret.name.clone(),
        )));
    }
    if store
        .secrets
        .contains_key(secret.id.as_str().as_bytes())
        .map_err(backend)?
        || store
            .placeholders
            .contains_key(secret.placeholder.as_bytes())
            .map_err(backend)?
    {
        return Err(StoreError::Conflict(Conflict::GeneratedId));
    }
    let pending = store.audit_entry(audit)?;
    store.put_secret_tx(None, secret, &pending)?;
    store.commit(&pending)
}

pub(super) fn get(
    store: &SledStore,
    org: &OrgId,
    id: &str,
) -> Result<Option<SecretRecord>, StoreError> {
    Ok(store.get_secret_raw(id)?.filter(|s| s.org == *org))
}

pub(super) fn list(store: &SledStore, org: &OrgId) -> Result<Vec<SecretRecord>, StoreError> {
    let prefix = org_prefix(org);
    let mut out = Vec::new();
    for entry in store.by_created.scan_prefix(&prefix) {
        let (k, _) = entry.map_err(backend)?;
        let id = String::from_utf8_lossy(&k[prefix.len() + 8..]).into_owned();
        if let Some(s) = store.get_secret_raw(&id)? {
            out.push(s);
        }
    }
    Ok(out)
}

pub(super) fn by_name(
    store: &SledStore,
    org: &OrgId,
    name: &str,
) -> Result<Option<SecretRecord>, StoreError> {
    match store.secret_names.get(pair(org, name)).map_err(backend)? {
        Some(id) => get(store, org, &String::from_utf8_lossy(&id)),
        None => Ok(None),
    }
}

pub(super) fn page(
    store: &SledStore,
    org: &OrgId,
    q: &SecretPageQuery<'_>,
) -> Result<SecretPage, StoreError> {
    let prefix = org_prefix(org);
    let end = org_end(org);
    let malformed = || StoreError::Rejected(Rejected::Cursor);
    let (tree, after) = match q.sort {
        SortField::Name => (
            &store.secret_names,
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
                &store.by_created
            } else {
                &store.by_updated
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
        (Order::Desc, Some(k)) => tree.range((Bound::Included(prefix.clone()), Bound::Excluded(k))),
        (_, None) => tree.range((Bound::Included(prefix.clone()), Bound::Excluded(end))),
    };
    // The ids of the entries that pass the name filter, in key order.
    let matching = range.filter_map(|entry| match entry {
        Err(e) => Some(Err(backend(e))),
        Ok((k, v)) => {
            let (name, id) = match q.sort {
                SortField::Name => (&k[prefix.len()..], v.as_ref()),
                _ => (v.as_ref(), &k[prefix.len() + 8..]),
            };
            let keep = q
                .name_contains
                .is_none_or(|f| String::from_utf8_lossy(name).to_lowercase().contains(f));
            keep.then(|| Ok(String::from_utf8_lossy(id).into_owned()))
        }
    });
    // A page is the first `limit` ids in the walking direction, plus whether one more exists.
    // Descending pages walk forward and keep the last ones: sled 0.34's reverse traversal
    // panics when the tree changes under it (seen under churn: "fucked up tree traversal").
    let mut ids = std::collections::VecDeque::with_capacity(q.limit + 1);
    for id in matching {
        ids.push_back(id?);
        match q.order {
            Order::Asc if ids.len() > q.limit => break,
            Order::Desc if ids.len() > q.limit + 1 => {
                ids.pop_front();
            }
            _ => {}
        }
    }
    let more = ids.len() > q.limit;
    let page: Vec<String> = match q.order {
        Order::Asc => ids.into_iter().take(q.limit).collect(),
        Order::Desc => ids.into_iter().rev().take(q.limit).collect(),
    };
    let mut items = Vec::with_capacity(page.len());
    for id in page {
        if let Some(rec) = store.get_secret_raw(&id)? {
            items.push(rec);
        }
    }
    let total = store.count_secrets(org, q.name_contains)?;
    Ok(SecretPage { items, total, more })
}

pub(super) fn update(
    store: &SledStore,
    org: &OrgId,
    id: &SecretId,
    change: SecretChange<'_>,
) -> Result<SecretRecord, StoreError> {
    let _guard = store.lock();
    let old = get(store, org, id.as_str())?.ok_or(StoreError::NotFound)?;
    let (new, audit) = change(&old)?;
    if new.id != old.id
        || new.org != old.org
        || new.name != old.name
        || new.placeholder != old.placeholder
    {
        return Err(StoreError::Rejected(Rejected::Identity));
    }
    let pending = store.audit_entry(audit)?;
    store.put_secret_tx(Some(&old), &new, &pending)?;
    store.commit(&pending)?;
    Ok(new)
}

pub(super) fn delete(
    store: &SledStore,
    org: &OrgId,
    id: &SecretId,
    deletion: SecretDeletion<'_>,
) -> Result<SecretRecord, StoreError> {
    let _guard = store.lock();
    let old = get(store, org, id.as_str())?.ok_or(StoreError::NotFound)?;
    let (audit, tombstone) = deletion(&old);
    if tombstone
        .as_ref()
        .is_some_and(|t| t.id != old.id || t.org != old.org)
    {
        return Err(StoreError::Rejected(Rejected::Tombstone));
    }
    let tombstone = tombstone.map(|t| enc(&t)).transpose()?;
    let pending = store.audit_entry(audit)?;
    let (ak, av) = (&pending.key, &pending.value);
    let count = count_of(
        store
            .org_counts
            .get(old.org.as_str().as_bytes())
            .map_err(backend)?,
    );
    (
        &store.secrets,
        &store.secret_names,
        &store.by_created,
        &store.by_updated,
        &store.placeholders,
        &store.org_counts,
        &store.audit,
        &store.usage,
        &store.tombstones,
    )
        .transaction(
            |(secrets, names, created, updated, placeholders, counts, audit, usage, tombs)| {
                // The values live on in the tombstone, in the same transaction: a crash
                // leaves either the secret or its tombstone, never neither.
                if let Some(t) = &tombstone {
                    tombs.insert(old.id.as_str().as_bytes(), t.as_slice())?;
                }
                usage.remove(old.id.as_str().as_bytes())?;
                secrets.remove(old.id.as_str().as_bytes())?;
                names.remove(pair(&old.org, &old.name))?;
                created.remove(time_key(&old.org, old.created_at, &old.id))?;
                updated.remove(time_key(&old.org, old.updated_at, &old.id))?;
                placeholders.remove(old.placeholder.as_bytes())?;
                counts.insert(
                    old.org.as_str().as_bytes(),
                    &count.saturating_sub(1).to_be_bytes(),
                )?;
                audit.insert(ak.as_slice(), av.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            },
        )
        .map_err(tx_err)?;
    store.commit(&pending)?;
    Ok(old)
}

pub(super) fn all(store: &SledStore) -> Result<Vec<SecretRecord>, StoreError> {
    store
        .secrets
        .iter()
        .map(|r| dec("secrets", &r.map_err(backend)?.1))
        .collect()
}

pub(super) fn check_consistency(store: &SledStore) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    let secrets = all(store)?;
    let ids: std::collections::HashSet<&str> = secrets.iter().map(|s| s.id.as_str()).collect();
    for s in &secrets {
        let name = store
            .secret_names
            .get(pair(&s.org, &s.name))
            .map_err(backend)?;
        if name.as_deref() != Some(s.id.as_str().as_bytes()) {
            problems.push(format!("secret {}: name index does not point at it", s.id));
        }
        if !store
            .by_created
            .contains_key(time_key(&s.org, s.created_at, &s.id))
            .map_err(backend)?
        {
            problems.push(format!("secret {}: missing from the createdAt index", s.id));
        }
        if !store
            .by_updated
            .contains_key(time_key(&s.org, s.updated_at, &s.id))
            .map_err(backend)?
        {
            problems.push(format!("secret {}: missing from the updatedAt index", s.id));
        }
        let ph = store
            .placeholders
            .get(s.placeholder.as_bytes())
            .map_err(backend)?;
        if ph.as_deref() != Some(s.id.as_str().as_bytes()) {
            problems.push(format!(
                "secret {}: placeholder index does not point at it",
                s.id
            ));
        }
    }
    for (tree, name) in [
        (&store.secret_names, "name"),
        (&store.placeholders, "placeholder"),
    ] {
        for entry in tree.iter() {
            let (_, id) = entry.map_err(backend)?;
            if !ids.contains(String::from_utf8_lossy(&id).as_ref()) {
                problems.push(format!("{name} index points at a missing secret"));
            }
        }
    }
    if store.by_created.len() != secrets.len() || store.by_updated.len() != secrets.len() {
        problems.push("time indexes have dangling entries".into());
    }
    let mut per_org: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for s in &secrets {
        *per_org.entry(s.org.as_str()).or_default() += 1;
    }
    for entry in store.org_counts.iter() {
        let (org, n) = entry.map_err(backend)?;
        let org = String::from_utf8_lossy(&org).into_owned();
        let want = per_org.get(org.as_str()).copied().unwrap_or(0);
        if count_of(Some(n)) != want {
            problems.push(format!("org {org}: secret count is off"));
        }
    }
    Ok(problems)
}
