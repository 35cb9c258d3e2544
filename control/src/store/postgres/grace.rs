//! Grace-period state (rotated-out values inside secret documents, tombstones of deleted
//! secrets) and the operations that walk every sealed value: rekey and the sweep.

use std::collections::BTreeSet;

use super::db::{Changed, PgStore, Writer, dec, enc};
use super::error::db_err;
use crate::crypto::Sealed;
use crate::store::fleet::{FleetCaRecord, ca_key_ids};
use crate::store::values::{expire, min_opt, reseal_secret, reseal_tombstone, strictly_older};
use crate::store::{Revision, SealedRef, SecretRecord, StoreError, Swept, TombstoneRecord};

pub(super) async fn tombstones(store: &PgStore) -> Result<Vec<TombstoneRecord>, StoreError> {
    store
        .docs(
            "tombstones",
            "SELECT doc FROM tombstones ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await
}

/// Every secret and tombstone, read inside `w` (under the write lock).
async fn everything(
    w: &Writer<'_>,
) -> Result<(Vec<SecretRecord>, Vec<TombstoneRecord>), StoreError> {
    let secrets =
        w.tx.query("SELECT doc FROM secrets", &[])
            .await
            .map_err(db_err)?
            .into_iter()
            .map(|r| dec("secrets", r.get(0)))
            .collect::<Result<Vec<SecretRecord>, _>>()?;
    let tombstones =
        w.tx.query("SELECT doc FROM tombstones", &[])
            .await
            .map_err(db_err)?
            .into_iter()
            .map(|r| dec("tombstones", r.get(0)))
            .collect::<Result<Vec<TombstoneRecord>, _>>()?;
    Ok((secrets, tombstones))
}

/// Re-seals every value not under `active_key`, in one transaction: every replica sees either
/// the old sealings or the new ones.
pub(super) async fn reseal_all(
    store: &PgStore,
    active_key: &str,
    reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
) -> Result<usize, StoreError> {
    let mut client = store.client().await?;
    let w = Writer::begin(&mut client, &store.replica).await?;
    let (secrets, tombstones) = everything(&w).await?;
    let mut count = 0;
    for mut record in secrets {
        if reseal_secret(&mut record, active_key, reseal)? {
            w.execute(
                "UPDATE secrets SET doc = $2 WHERE id = $1",
                &[&record.id.as_str(), &enc(&record)?],
            )
            .await
            .map_err(db_err)?;
            count += 1;
        }
    }
    for mut t in tombstones {
        if reseal_tombstone(&mut t, active_key, reseal)? {
            w.execute(
                "UPDATE tombstones SET doc = $2 WHERE id = $1",
                &[&t.id.as_str(), &enc(&t)?],
            )
            .await
            .map_err(db_err)?;
            count += 1;
        }
    }
    count += reseal_fleet_ca(&w, active_key, reseal).await?;
    w.commit().await?;
    Ok(count)
}

/// Re-seals the fleet CA's key (it must outlive the key that sealed it, like any value).
async fn reseal_fleet_ca(
    w: &Writer<'_>,
    active_key: &str,
    reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
) -> Result<usize, StoreError> {
    let Some(row) =
        w.tx.query_opt("SELECT doc FROM fleet_ca WHERE id = 1 FOR UPDATE", &[])
            .await
            .map_err(db_err)?
    else {
        return Ok(0);
    };
    let mut ca: FleetCaRecord = dec("fleet_ca", row.get(0))?;
    if ca.key.key_id == active_key {
        return Ok(0);
    }
    let (org, id) = ca_key_ids();
    ca.key = reseal(SealedRef {
        org: &org,
        secret_id: &id,
        revision: Revision(0),
        sealed: &ca.key,
    })?;
    w.execute("UPDATE fleet_ca SET doc = $1 WHERE id = 1", &[&enc(&ca)?])
        .await
        .map_err(db_err)?;
    Ok(1)
}

pub(super) async fn key_ids_in_use(store: &PgStore) -> Result<Vec<String>, StoreError> {
    let mut ids = BTreeSet::new();
    let secrets: Vec<SecretRecord> = store
        .docs("secrets", "SELECT doc FROM secrets", &[])
        .await?;
    for record in secrets {
        ids.extend(record.previous.into_iter().map(|p| p.sealed.key_id));
        ids.insert(record.sealed.key_id);
    }
    for t in tombstones(store).await? {
        ids.extend(t.values.into_iter().map(|v| v.sealed.key_id));
    }
    let ca: Option<FleetCaRecord> = store
        .doc("fleet_ca", "SELECT doc FROM fleet_ca WHERE id = 1", &[])
        .await?;
    ids.extend(ca.map(|ca| ca.key.key_id));
    Ok(ids.into_iter().collect())
}

/// Drops values replaced at or before `cutoff`, under the write lock (a write that came in
/// meanwhile is never undone); changed secrets are announced to every replica.
pub(super) async fn sweep(store: &PgStore, cutoff: i64) -> Result<Swept, StoreError> {
    let mut swept = Swept::default();
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    let (secrets, tombstones) = everything(&w).await?;
    for mut record in secrets {
        let dropped = expire(&mut record.previous, cutoff);
        swept.oldest_kept = min_opt(
            swept.oldest_kept,
            record.previous.iter().map(|v| v.replaced_at).min(),
        );
        if dropped > 0 {
            // `updated_at` stays: an expiry is not a change of the secret.
            w.execute(
                "UPDATE secrets SET doc = $2 WHERE id = $1",
                &[&record.id.as_str(), &enc(&record)?],
            )
            .await
            .map_err(db_err)?;
            swept.dropped += dropped;
            w.notify(Changed::Secret(record.id.clone()));
            swept.changed.push(record.id);
        }
    }
    for mut t in tombstones {
        let dropped = expire(&mut t.values, cutoff);
        swept.oldest_kept = min_opt(
            swept.oldest_kept,
            t.values.iter().map(|v| v.replaced_at).min(),
        );
        if dropped == 0 {
            continue;
        }
        if t.values.is_empty() {
            w.execute("DELETE FROM tombstones WHERE id = $1", &[&t.id.as_str()])
                .await
                .map_err(db_err)?;
        } else {
            w.execute(
                "UPDATE tombstones SET doc = $2 WHERE id = $1",
                &[&t.id.as_str(), &enc(&t)?],
            )
            .await
            .map_err(db_err)?;
        }
        swept.dropped += dropped;
        w.notify(Changed::Secret(t.id.clone()));
        swept.changed.push(t.id);
    }
    if swept.dropped == 0 {
        return Ok(swept);
    }
    w.commit().await?;
    Ok(swept)
}

/// Tombstones that contradict the secrets, and value lists out of shape.
pub(super) async fn check_consistency(store: &PgStore) -> Result<Vec<String>, StoreError> {
    let mut problems = Vec::new();
    let secrets: Vec<SecretRecord> = store
        .docs("secrets", "SELECT doc FROM secrets", &[])
        .await?;
    let ids: BTreeSet<&str> = secrets.iter().map(|s| s.id.as_str()).collect();
    for s in &secrets {
        if s.previous.len() > veil_link::MAX_PREVIOUS_VALUES {
            problems.push(format!("secret {}: too many previous values", s.id));
        }
        if !strictly_older(s.revision, &s.previous) {
            problems.push(format!("secret {}: previous values out of order", s.id));
        }
    }
    for t in tombstones(store).await? {
        if ids.contains(t.id.as_str()) {
            problems.push(format!("tombstone {}: the secret still exists", t.id));
        }
        if t.values.is_empty() || t.values.len() > veil_link::MAX_PREVIOUS_VALUES + 1 {
            problems.push(format!("tombstone {}: wrong number of values", t.id));
        }
        if !strictly_older(t.revision, &t.values) {
            problems.push(format!("tombstone {}: values out of order", t.id));
        }
    }
    Ok(problems)
}
