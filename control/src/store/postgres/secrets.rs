//! Secrets: rows keyed by id, unique by (org, name) and by placeholder, ordered for keyset
//! pages; deleting one stores its tombstone in the same transaction.

use super::db::{Changed, PgStore, Writer, dec, enc};
use super::error::{db_err, violated};
use crate::paginate::{Order, SortField, SortValue};
use crate::store::{
    AuditRecord, Conflict, OrgId, Rejected, SecretChange, SecretDeletion, SecretId, SecretPage,
    SecretPageQuery, SecretRecord, StoreError,
};

const TABLE: &str = "secrets";

/// A failed insert as the conflict it names.
fn conflict(e: tokio_postgres::Error, secret: &SecretRecord) -> StoreError {
    match violated(&e) {
        Some("secrets_org_name") => {
            StoreError::Conflict(Conflict::SecretName(secret.name.to_string()))
        }
        Some("secrets_pkey" | "secrets_placeholder") => StoreError::Conflict(Conflict::GeneratedId),
        _ => db_err(e),
    }
}

pub(super) async fn insert(
    store: &PgStore,
    secret: &SecretRecord,
    audit: AuditRecord,
) -> Result<(), StoreError> {
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    // A tombstone keeps a deleted secret's id: a new secret never takes it.
    if w.tx
        .query_opt(
            "SELECT 1 FROM tombstones WHERE id = $1",
            &[&secret.id.as_str()],
        )
        .await
        .map_err(db_err)?
        .is_some()
    {
        return Err(StoreError::Conflict(Conflict::GeneratedId));
    }
    w.execute(
        "INSERT INTO secrets (id, org, name, placeholder, created_at, updated_at, doc) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &secret.id.as_str(),
            &secret.org.as_str(),
            &secret.name.as_str(),
            &secret.placeholder.as_str(),
            &secret.created_at,
            &secret.updated_at,
            &enc(secret)?,
        ],
    )
    .await
    .map_err(|e| conflict(e, secret))?;
    w.audit(audit).await?;
    w.notify(Changed::Secret(secret.id.clone()));
    w.commit().await
}

pub(super) async fn get(
    store: &PgStore,
    org: &OrgId,
    id: &SecretId,
) -> Result<Option<SecretRecord>, StoreError> {
    store
        .doc(
            TABLE,
            "SELECT doc FROM secrets WHERE id = $1 AND org = $2",
            &[&id.as_str(), &org.as_str()],
        )
        .await
}

pub(super) async fn list(store: &PgStore, org: &OrgId) -> Result<Vec<SecretRecord>, StoreError> {
    store
        .docs(
            TABLE,
            "SELECT doc FROM secrets WHERE org = $1 ORDER BY created_at, id COLLATE \"C\"",
            &[&org.as_str()],
        )
        .await
}

pub(super) async fn by_name(
    store: &PgStore,
    org: &OrgId,
    name: &str,
) -> Result<Option<SecretRecord>, StoreError> {
    store
        .doc(
            TABLE,
            "SELECT doc FROM secrets WHERE org = $1 AND name = $2",
            &[&org.as_str(), &name],
        )
        .await
}

pub(super) async fn all(store: &PgStore) -> Result<Vec<SecretRecord>, StoreError> {
    store
        .docs(
            TABLE,
            "SELECT doc FROM secrets ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await
}

/// Rows one query fetches while a name filter skips some (without a filter a page is one
/// query of `limit + 1` rows).
const FILTERED_BATCH: usize = 256;

/// One keyset page, in the order and with the filter semantics of the sled backend: names
/// and ids compare as bytes, the name filter is a lower-cased substring. Rows are read in
/// batches from the cursor on, never the rest of the organization at once.
pub(super) async fn page(
    store: &PgStore,
    org: &OrgId,
    q: &SecretPageQuery<'_>,
) -> Result<SecretPage, StoreError> {
    let (column, by_time) = match q.sort {
        SortField::Name => ("name", false),
        SortField::CreatedAt => ("created_at", true),
        SortField::UpdatedAt => ("updated_at", true),
    };
    let (cmp, dir) = match q.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let (order, seek) = if by_time {
        (
            format!("{column} {dir}, id COLLATE \"C\" {dir}"),
            format!("AND ({column}, id COLLATE \"C\") {cmp} ($3, $4 COLLATE \"C\")"),
        )
    } else {
        (format!("name {dir}"), format!("AND name {cmp} $3"))
    };
    let select = format!("SELECT id, name, {column}, doc FROM secrets WHERE org = $1");
    let first = format!("{select} ORDER BY {order} LIMIT $2");
    let next = format!("{select} {seek} ORDER BY {order} LIMIT $2");
    // Where to continue strictly after: the last row read (sort value, id).
    let mut after = match q.after {
        None => None,
        Some(c) => match (&c.v, by_time) {
            (SortValue::Text(_), false) | (SortValue::Time(_), true) => {
                Some((c.v.clone(), c.i.clone()))
            }
            _ => return Err(StoreError::Rejected(Rejected::Cursor)),
        },
    };
    let batch = match q.name_contains {
        None => q.limit.saturating_add(1),
        Some(_) => q.limit.saturating_add(1).max(FILTERED_BATCH),
    };
    let batch_param = i64::try_from(batch).unwrap_or(i64::MAX);
    let org_name = org.as_str();
    let client = store.client().await?;
    let mut items = Vec::with_capacity(q.limit.min(FILTERED_BATCH));
    let mut more = false;
    'pages: loop {
        let rows = match &after {
            None => client.query(&first, &[&org_name, &batch_param]).await,
            Some((SortValue::Text(name), _)) => {
                client
                    .query(&next, &[&org_name, &batch_param, &name.as_str()])
                    .await
            }
            Some((SortValue::Time(t), id)) => {
                client
                    .query(&next, &[&org_name, &batch_param, t, &id.as_str()])
                    .await
            }
        }
        .map_err(db_err)?;
        let fetched = rows.len();
        for row in rows {
            let id: String = row.get(0);
            let name: String = row.get(1);
            let matches = q
                .name_contains
                .is_none_or(|f| name.to_lowercase().contains(f));
            let doc = row.get(3);
            after = Some(if by_time {
                (SortValue::Time(row.get(2)), id)
            } else {
                (SortValue::Text(name), id)
            });
            if !matches {
                continue;
            }
            if items.len() == q.limit {
                more = true;
                break 'pages;
            }
            items.push(dec(TABLE, doc)?);
        }
        if fetched < batch {
            break;
        }
    }
    let total = match q.name_contains {
        None => {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM secrets WHERE org = $1",
                    &[&org.as_str()],
                )
                .await
                .map_err(db_err)?
                .get(0);
            usize::try_from(n).unwrap_or(usize::MAX)
        }
        Some(f) => client
            .query("SELECT name FROM secrets WHERE org = $1", &[&org.as_str()])
            .await
            .map_err(db_err)?
            .iter()
            .filter(|r| r.get::<_, &str>(0).to_lowercase().contains(f))
            .count(),
    };
    Ok(SecretPage { items, total, more })
}

/// Locks and reads a secret of `org` inside `w`'s transaction.
async fn locked(w: &Writer<'_>, org: &OrgId, id: &SecretId) -> Result<SecretRecord, StoreError> {
    let row =
        w.tx.query_opt(
            "SELECT doc FROM secrets WHERE id = $1 AND org = $2 FOR UPDATE",
            &[&id.as_str(), &org.as_str()],
        )
        .await
        .map_err(db_err)?
        .ok_or(StoreError::NotFound)?;
    dec(TABLE, row.get(0))
}

pub(super) async fn update(
    store: &PgStore,
    org: &OrgId,
    id: &SecretId,
    change: SecretChange<'_>,
) -> Result<SecretRecord, StoreError> {
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    let old = locked(&w, org, id).await?;
    let (new, audit) = change(&old)?;
    if new.id != old.id
        || new.org != old.org
        || new.name != old.name
        || new.placeholder != old.placeholder
    {
        return Err(StoreError::Rejected(Rejected::Identity));
    }
    w.execute(
        "UPDATE secrets SET updated_at = $2, doc = $3 WHERE id = $1",
        &[&new.id.as_str(), &new.updated_at, &enc(&new)?],
    )
    .await
    .map_err(db_err)?;
    w.audit(audit).await?;
    w.notify(Changed::Secret(new.id.clone()));
    w.commit().await?;
    Ok(new)
}

pub(super) async fn delete(
    store: &PgStore,
    org: &OrgId,
    id: &SecretId,
    deletion: SecretDeletion<'_>,
) -> Result<SecretRecord, StoreError> {
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    let old = locked(&w, org, id).await?;
    let (audit, tombstone) = deletion(&old);
    if let Some(t) = &tombstone {
        if t.id != old.id || t.org != old.org {
            return Err(StoreError::Rejected(Rejected::Tombstone));
        }
        // The values live on in the tombstone, in the same transaction: a crash leaves
        // either the secret or its tombstone, never neither.
        w.execute(
            "INSERT INTO tombstones (id, org, doc) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET org = EXCLUDED.org, doc = EXCLUDED.doc",
            &[&t.id.as_str(), &t.org.as_str(), &enc(t)?],
        )
        .await
        .map_err(db_err)?;
    }
    w.execute(
        "DELETE FROM secret_usage WHERE secret_id = $1",
        &[&id.as_str()],
    )
    .await
    .map_err(db_err)?;
    w.execute("DELETE FROM secrets WHERE id = $1", &[&id.as_str()])
        .await
        .map_err(db_err)?;
    w.audit(audit).await?;
    w.notify(Changed::Secret(old.id.clone()));
    w.commit().await?;
    Ok(old)
}

/// Rows whose columns disagree with their documents.
pub(super) async fn check_consistency(store: &PgStore) -> Result<Vec<String>, StoreError> {
    let client = store.client().await?;
    let rows = client
        .query(
            "SELECT id, org, name, placeholder, created_at, updated_at, doc FROM secrets",
            &[],
        )
        .await
        .map_err(db_err)?;
    let mut problems = Vec::new();
    for row in rows {
        let id: String = row.get(0);
        let s: SecretRecord = match dec(TABLE, row.get(6)) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("secret {id}: {e}"));
                continue;
            }
        };
        let org: &str = row.get(1);
        let name: &str = row.get(2);
        let placeholder: &str = row.get(3);
        let (created, updated): (i64, i64) = (row.get(4), row.get(5));
        if s.id.as_str() != id
            || s.org.as_str() != org
            || s.name.as_str() != name
            || s.placeholder.as_str() != placeholder
            || s.created_at != created
            || s.updated_at != updated
        {
            problems.push(format!("secret {id}: columns disagree with the record"));
        }
    }
    Ok(problems)
}
