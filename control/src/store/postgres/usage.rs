//! Agent-reported usage, beside the secret rows, added under the write lock so that reports
//! arriving at several replicas at once all count.

use std::collections::BTreeMap;

use super::db::{PgStore, Writer, dec, enc};
use super::error::db_err;
use crate::store::{AuditRecord, SecretId, SecretRecord, SecretUsage, StoreError, UsageDelta};

pub(super) async fn record_usage(
    store: &PgStore,
    deltas: &[UsageDelta],
    audit: &mut dyn FnMut(&SecretRecord, &UsageDelta) -> Option<AuditRecord>,
) -> Result<usize, StoreError> {
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    let mut usages: BTreeMap<String, SecretUsage> = BTreeMap::new();
    let mut recorded = 0;
    for d in deltas {
        let id = d.secret_id.as_str();
        // Under the write lock: a secret seen here cannot be deleted before the commit.
        let Some(row) =
            w.tx.query_opt("SELECT doc FROM secrets WHERE id = $1", &[&id])
                .await
                .map_err(db_err)?
        else {
            continue;
        };
        let secret: SecretRecord = dec("secrets", row.get(0))?;
        recorded += 1;
        if let Some(a) = audit(&secret, d) {
            w.audit(a).await?;
        }
        if d.counts.is_zero() {
            continue;
        }
        if !usages.contains_key(id) {
            let current = match w
                .tx
                .query_opt("SELECT doc FROM secret_usage WHERE secret_id = $1", &[&id])
                .await
                .map_err(db_err)?
            {
                Some(row) => dec("secret_usage", row.get(0))?,
                None => SecretUsage::default(),
            };
            usages.insert(id.to_owned(), current);
        }
        if let Some(u) = usages.get_mut(id) {
            u.add(&d.host, &d.counts, d.at);
        }
    }
    for (id, u) in &usages {
        w.execute(
            "INSERT INTO secret_usage (secret_id, doc) VALUES ($1, $2) \
             ON CONFLICT (secret_id) DO UPDATE SET doc = EXCLUDED.doc",
            &[id, &enc(u)?],
        )
        .await
        .map_err(db_err)?;
    }
    w.commit().await?;
    Ok(recorded)
}

pub(super) async fn secret_usage(
    store: &PgStore,
    id: &SecretId,
) -> Result<SecretUsage, StoreError> {
    Ok(store
        .doc(
            "secret_usage",
            "SELECT doc FROM secret_usage WHERE secret_id = $1",
            &[&id.as_str()],
        )
        .await?
        .unwrap_or_default())
}
