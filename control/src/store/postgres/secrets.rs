//! Secrets: rows keyed by id, unique by (org, name) and by placeholder, ordered for keyset
//! pages; deleting one stores its tombstone in the same transaction.

use super::db::{Changed, PgStore, Writer, db_err, dec, enc, violated};
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

/// One keyset page, in the order and with the filter semantics of the sled backend: names
/// and ids compare as bytes, the name filter is a lower-cased substring.
pub(super) async fn page(
    store: &PgStore,
    org: &OrgId,
    q: &SecretPageQuery<'_>,
) -> Result<SecretPage, StoreError> {
    let malformed = || StoreError::Rejected(Rejected::Cursor);
    let (column, tie) = match q.sort {
        SortField::Name => ("name", ""),
        SortField::CreatedAt => ("created_at", ", id COLLATE \"C\""),
        SortField::UpdatedAt => ("updated_at", ", id COLLATE \"C\""),
    };
    let (cmp, dir) = match q.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let order = if tie.is_empty() {
        format!("{column} {dir}")
    } else {
        format!("{column} {dir}, id COLLATE \"C\" {dir}")
    };
    let client = store.client().await?;
    let rows = match q.after {
        None => {
            client
                .query(
                    &format!("SELECT name, doc FROM secrets WHERE org = $1 ORDER BY {order}"),
                    &[&org.as_str()],
                )
                .await
        }
        Some(c) => match (&c.v, q.sort) {
            (SortValue::Text(name), SortField::Name) => {
                client
                    .query(
                        &format!(
                            "SELECT name, doc FROM secrets WHERE org = $1 AND name {cmp} $2 \
                             ORDER BY {order}"
                        ),
                        &[&org.as_str(), &name.as_str()],
                    )
                    .await
            }
            (SortValue::Time(t), SortField::CreatedAt | SortField::UpdatedAt) => {
                client
                    .query(
                        &format!(
                            "SELECT name, doc FROM secrets WHERE org = $1 \
                             AND ({column}{tie}) {cmp} ($2, $3 COLLATE \"C\") ORDER BY {order}"
                        ),
                        &[&org.as_str(), t, &c.i.as_str()],
                    )
                    .await
            }
            _ => return Err(malformed()),
        },
    }
    .map_err(db_err)?;
    let mut items = Vec::with_capacity(q.limit);
    let mut more = false;
    for row in rows {
        let name: &str = row.get(0);
        if let Some(f) = q.name_contains
            && !name.to_lowercase().contains(f)
        {
            continue;
        }
        if items.len() == q.limit {
            more = true;
            break;
        }
        items.push(dec(TABLE, row.get(1))?);
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
