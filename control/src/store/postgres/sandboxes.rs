//! Sandboxes: rows keyed by id, one sandbox per cgroup.

use super::db::{Changed, PgStore, Writer, dec, enc};
use super::error::{db_err, violated};
use crate::store::{
    AuditRecord, Conflict, OrgId, Rejected, SandboxChange, SandboxId, SandboxRecord, StoreError,
};

const TABLE: &str = "sandboxes";

async fn locked(w: &Writer<'_>, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
    match w
        .tx
        .query_opt(
            "SELECT doc FROM sandboxes WHERE id = $1 FOR UPDATE",
            &[&id.as_str()],
        )
        .await
        .map_err(db_err)?
    {
        Some(row) => Ok(Some(dec(TABLE, row.get(0))?)),
        None => Ok(None),
    }
}

/// The `cgroup` column (unique): the cgroup of a bound sandbox; for an unbound one a key no
/// validated cgroup can take (a space is refused in cgroup paths), so the one-sandbox-per-cgroup
/// constraint holds without a schema change.
pub(super) fn index_key(sandbox: &SandboxRecord) -> String {
    match sandbox.indexed_cgroup() {
        Some(cgroup) => cgroup.to_owned(),
        None => format!("unbound {}", sandbox.id),
    }
}

/// Writes `sandbox` (insert or replace) inside `w`.
async fn write(w: &Writer<'_>, sandbox: &SandboxRecord, meanwhile: bool) -> Result<(), StoreError> {
    w.execute(
        "INSERT INTO sandboxes (id, org, cgroup, doc) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO UPDATE SET org = EXCLUDED.org, cgroup = EXCLUDED.cgroup, \
         doc = EXCLUDED.doc",
        &[
            &sandbox.id.as_str(),
            &sandbox.org.as_str(),
            &index_key(sandbox),
            &enc(sandbox)?,
        ],
    )
    .await
    .map_err(|e| match violated(&e) {
        Some("sandboxes_cgroup") if meanwhile => {
            StoreError::Conflict(Conflict::CgroupMeanwhile(sandbox.cgroup.to_string()))
        }
        Some("sandboxes_cgroup") => {
            StoreError::Conflict(Conflict::Cgroup(sandbox.cgroup.to_string()))
        }
        _ => db_err(e),
    })?;
    Ok(())
}

pub(super) async fn put(
    store: &PgStore,
    sandbox: &SandboxRecord,
    audit: AuditRecord,
) -> Result<bool, StoreError> {
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    let old = locked(&w, &sandbox.id).await?;
    if let Some(old) = &old
        && old.org != sandbox.org
    {
        return Err(StoreError::NotFound);
    }
    write(&w, sandbox, false).await?;
    w.audit(audit).await?;
    w.notify(Changed::Sandbox(sandbox.id.clone()));
    w.commit().await?;
    Ok(old.is_none())
}

pub(super) async fn list(store: &PgStore) -> Result<Vec<SandboxRecord>, StoreError> {
    store
        .docs(
            TABLE,
            "SELECT doc FROM sandboxes ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await
}

pub(super) async fn get(
    store: &PgStore,
    id: &SandboxId,
) -> Result<Option<SandboxRecord>, StoreError> {
    store
        .doc(
            TABLE,
            "SELECT doc FROM sandboxes WHERE id = $1",
            &[&id.as_str()],
        )
        .await
}

pub(super) async fn update(
    store: &PgStore,
    org: &OrgId,
    id: &SandboxId,
    change: SandboxChange<'_>,
) -> Result<SandboxRecord, StoreError> {
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    let old = locked(&w, id)
        .await?
        .filter(|s| &s.org == org)
        .ok_or(StoreError::NotFound)?;
    let (new, audit) = change(&old)?;
    if new.cgroup != old.cgroup || new.bound != old.bound || new.id != old.id || new.org != old.org
    {
        return Err(StoreError::Rejected(Rejected::Identity));
    }
    write(&w, &new, false).await?;
    w.audit(audit).await?;
    w.notify(Changed::Sandbox(new.id.clone()));
    w.commit().await?;
    Ok(new)
}

pub(super) async fn delete(
    store: &PgStore,
    org: &OrgId,
    id: &SandboxId,
    audit: AuditRecord,
) -> Result<(), StoreError> {
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    locked(&w, id)
        .await?
        .filter(|s| &s.org == org)
        .ok_or(StoreError::NotFound)?;
    w.execute("DELETE FROM sandboxes WHERE id = $1", &[&id.as_str()])
        .await
        .map_err(db_err)?;
    w.audit(audit).await?;
    w.notify(Changed::Sandbox(id.clone()));
    w.commit().await
}

pub(super) async fn restore(
    store: &PgStore,
    written: &SandboxRecord,
    previous: Option<&SandboxRecord>,
    audit: AuditRecord,
) -> Result<bool, StoreError> {
    let mut client = store.client().await?;
    let mut w = Writer::begin(&mut client, &store.replica).await?;
    if locked(&w, &written.id).await?.as_ref() != Some(written) {
        return Ok(false);
    }
    match previous {
        Some(prev) => write(&w, prev, true).await?,
        None => {
            w.execute(
                "DELETE FROM sandboxes WHERE id = $1",
                &[&written.id.as_str()],
            )
            .await
            .map_err(db_err)?;
        }
    }
    w.audit(audit).await?;
    w.notify(Changed::Sandbox(written.id.clone()));
    w.commit().await?;
    Ok(true)
}
