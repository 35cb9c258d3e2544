//! The shared backend: a PostgreSQL database that any number of veil-control replicas use at
//! once. Each change is one transaction that also announces what changed (`NOTIFY`, see
//! [`db::Note`]); the replicas push it to their agents.
//!
//! The [`Store`] trait is synchronous: its methods block on the store's own runtime and are
//! called from blocking threads (`spawn_blocking`), never from an async worker. The schema
//! lives in `schema`, the connection and write path in `db`, one file per resource.

mod consistency;
mod db;
mod error;
mod fleet;
mod grace;
mod keys;
mod sandboxes;
pub mod schema;
mod secrets;
mod usage;

pub use db::{CHANNEL, Changed, Connection, Note, PgStore};
use db::{Writer, enc};
use error::{db_err, violated};
pub use fleet::FLEET_CHANNEL;

use super::{
    ApiKeyRecord, AuditRecord, Conflict, Direction, OrgId, OrgRecord, SandboxChange, SandboxId,
    SandboxRecord, SealedRef, SecretChange, SecretDeletion, SecretId, SecretPage, SecretPageQuery,
    SecretRecord, SecretUsage, Store, StoreError, Swept, TombstoneRecord, UsageDelta,
};
use crate::crypto::Sealed;

impl Store for PgStore {
    fn shared_keys(&self) -> Option<&dyn crate::store::shared_keys::SharedKeys> {
        Some(self)
    }

    fn fleet(&self) -> Option<&dyn crate::store::fleet::FleetStore> {
        Some(self)
    }

    fn create_api_key(&self, key: &ApiKeyRecord, audit: AuditRecord) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            let mut w = Writer::begin(&mut client, &self.replica).await?;
            let org = OrgRecord {
                name: key.org.clone(),
                created_at: key.created_at,
            };
            w.execute(
                "INSERT INTO orgs (name, doc) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&key.org.as_str(), &enc(&org)?],
            )
            .await
            .map_err(db_err)?;
            w.execute(
                "INSERT INTO api_keys (id, org, doc) VALUES ($1, $2, $3)",
                &[&key.id.as_str(), &key.org.as_str(), &enc(key)?],
            )
            .await
            .map_err(|e| match violated(&e) {
                Some("api_keys_pkey") => StoreError::Conflict(Conflict::ApiKeyId),
                _ => db_err(e),
            })?;
            w.audit(audit).await?;
            w.commit().await
        })
    }

    fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.run(self.doc("api_keys", "SELECT doc FROM api_keys WHERE id = $1", &[&id]))
    }

    fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.run(self.docs(
            "api_keys",
            "SELECT doc FROM api_keys ORDER BY id COLLATE \"C\"",
            &[],
        ))
    }

    fn revoke_api_key(&self, id: &str, audit: AuditRecord) -> Result<ApiKeyRecord, StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            let mut w = Writer::begin(&mut client, &self.replica).await?;
            let row =
                w.tx.query_opt("DELETE FROM api_keys WHERE id = $1 RETURNING doc", &[&id])
                    .await
                    .map_err(db_err)?
                    .ok_or(StoreError::NotFound)?;
            let key: ApiKeyRecord = db::dec("api_keys", row.get(0))?;
            let mut audit = audit;
            audit.org = key.org.to_string();
            w.audit(audit).await?;
            w.commit().await?;
            Ok(key)
        })
    }

    fn list_orgs(&self) -> Result<Vec<OrgRecord>, StoreError> {
        self.run(self.docs(
            "orgs",
            "SELECT doc FROM orgs ORDER BY name COLLATE \"C\"",
            &[],
        ))
    }

    fn insert_secret(&self, secret: &SecretRecord, audit: AuditRecord) -> Result<(), StoreError> {
        self.run(secrets::insert(self, secret, audit))
    }

    fn secret(&self, org: &OrgId, id: &SecretId) -> Result<Option<SecretRecord>, StoreError> {
        self.run(secrets::get(self, org, id))
    }

    fn list_secrets(&self, org: &OrgId) -> Result<Vec<SecretRecord>, StoreError> {
        self.run(secrets::list(self, org))
    }

    fn secret_by_name(&self, org: &OrgId, name: &str) -> Result<Option<SecretRecord>, StoreError> {
        self.run(secrets::by_name(self, org, name))
    }

    fn page_secrets(&self, org: &OrgId, q: &SecretPageQuery<'_>) -> Result<SecretPage, StoreError> {
        self.run(secrets::page(self, org, q))
    }

    fn update_secret(
        &self,
        org: &OrgId,
        id: &SecretId,
        change: SecretChange<'_>,
    ) -> Result<SecretRecord, StoreError> {
        self.run(secrets::update(self, org, id, change))
    }

    fn delete_secret(
        &self,
        org: &OrgId,
        id: &SecretId,
        deletion: SecretDeletion<'_>,
    ) -> Result<SecretRecord, StoreError> {
        self.run(secrets::delete(self, org, id, deletion))
    }

    fn reseal_all(
        &self,
        active_key: &str,
        reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
    ) -> Result<usize, StoreError> {
        self.run(grace::reseal_all(self, active_key, reseal))
    }

    fn key_ids_in_use(&self) -> Result<Vec<String>, StoreError> {
        self.run(grace::key_ids_in_use(self))
    }

    fn all_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.run(secrets::all(self))
    }

    fn tombstones(&self) -> Result<Vec<TombstoneRecord>, StoreError> {
        self.run(grace::tombstones(self))
    }

    fn sweep_grace(&self, cutoff: i64) -> Result<Swept, StoreError> {
        self.run(grace::sweep(self, cutoff))
    }

    fn check_consistency(&self) -> Result<Vec<String>, StoreError> {
        self.run(async {
            let mut problems = secrets::check_consistency(self).await?;
            problems.extend(grace::check_consistency(self).await?);
            problems.extend(consistency::check(self).await?);
            Ok(problems)
        })
    }

    fn put_sandbox(&self, sandbox: &SandboxRecord, audit: AuditRecord) -> Result<bool, StoreError> {
        self.run(sandboxes::put(self, sandbox, audit))
    }

    fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        self.run(sandboxes::list(self))
    }

    fn sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
        self.run(sandboxes::get(self, id))
    }

    fn update_sandbox(
        &self,
        org: &OrgId,
        id: &SandboxId,
        change: SandboxChange<'_>,
    ) -> Result<SandboxRecord, StoreError> {
        self.run(sandboxes::update(self, org, id, change))
    }

    fn delete_sandbox(
        &self,
        org: &OrgId,
        id: &SandboxId,
        audit: AuditRecord,
    ) -> Result<(), StoreError> {
        self.run(sandboxes::delete(self, org, id, audit))
    }

    fn restore_sandbox(
        &self,
        written: &SandboxRecord,
        previous: Option<&SandboxRecord>,
        audit: AuditRecord,
    ) -> Result<bool, StoreError> {
        self.run(sandboxes::restore(self, written, previous, audit))
    }

    fn record_usage(
        &self,
        deltas: &[UsageDelta],
        audit: &mut dyn FnMut(&SecretRecord, &UsageDelta) -> Option<AuditRecord>,
    ) -> Result<usize, StoreError> {
        self.run(usage::record_usage(self, deltas, audit))
    }

    fn secret_usage(&self, id: &SecretId) -> Result<SecretUsage, StoreError> {
        self.run(usage::secret_usage(self, id))
    }

    fn audit_page(
        &self,
        org: &OrgId,
        after: Option<u64>,
        limit: usize,
        dir: Direction,
    ) -> Result<(Vec<AuditRecord>, usize), StoreError> {
        let org = org.as_str();
        self.run(async {
            let client = self.client().await?;
            let total: i64 = client
                .query_one("SELECT count(*) FROM audit WHERE org = $1", &[&org])
                .await
                .map_err(db_err)?
                .get(0);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let after = after.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
            let sql = match (dir, after.is_some()) {
                (Direction::Asc, true) => {
                    "SELECT doc FROM audit WHERE org = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3"
                }
                (Direction::Desc, true) => {
                    "SELECT doc FROM audit WHERE org = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
                }
                (Direction::Asc, false) => {
                    "SELECT doc FROM audit WHERE org = $1 AND $2::bigint IS NULL \
                     ORDER BY seq ASC LIMIT $3"
                }
                (Direction::Desc, false) => {
                    "SELECT doc FROM audit WHERE org = $1 AND $2::bigint IS NULL \
                     ORDER BY seq DESC LIMIT $3"
                }
            };
            let rows = client
                .query(sql, &[&org, &after, &limit])
                .await
                .map_err(db_err)?;
            let items = rows
                .into_iter()
                .map(|r| db::dec("audit", r.get(0)))
                .collect::<Result<Vec<AuditRecord>, _>>()?;
            Ok((items, usize::try_from(total).unwrap_or(usize::MAX)))
        })
    }
}
