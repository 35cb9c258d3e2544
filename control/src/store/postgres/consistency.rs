//! Cross-checks of the rows beside the secrets: index columns against their documents,
//! rows that point at nothing, and the write counter against the audit log.

use super::db::{PgStore, dec};
use super::error::db_err;
use crate::store::{ApiKeyRecord, AuditRecord, SandboxRecord, StoreError, TombstoneRecord};

/// Every inconsistency among sandboxes, API keys, tombstones, usage and audit.
pub(super) async fn check(store: &PgStore) -> Result<Vec<String>, StoreError> {
    let client = store.client().await?;
    let mut problems = Vec::new();
    for row in client
        .query("SELECT id, org, cgroup, doc FROM sandboxes", &[])
        .await
        .map_err(db_err)?
    {
        let (id, org, cgroup): (&str, &str, &str) = (row.get(0), row.get(1), row.get(2));
        match dec::<SandboxRecord>("sandboxes", row.get(3)) {
            Ok(s)
                if s.id.as_str() == id
                    && s.org.as_str() == org
                    && super::sandboxes::index_key(&s) == cgroup => {}
            Ok(_) => problems.push(format!("sandbox {id}: columns disagree with the record")),
            Err(e) => problems.push(format!("sandbox {id}: {e}")),
        }
    }
    for row in client
        .query(
            "SELECT k.id, k.org, k.doc, o.name IS NULL FROM api_keys k \
             LEFT JOIN orgs o ON o.name = k.org",
            &[],
        )
        .await
        .map_err(db_err)?
    {
        let (id, org, orphan): (&str, &str, bool) = (row.get(0), row.get(1), row.get(3));
        match dec::<ApiKeyRecord>("api_keys", row.get(2)) {
            Ok(k) if k.id == id && k.org.as_str() == org => {}
            Ok(_) => problems.push(format!("api key {id}: columns disagree with the record")),
            Err(e) => problems.push(format!("api key {id}: {e}")),
        }
        if orphan {
            problems.push(format!("api key {id}: its organization has no record"));
        }
    }
    for row in client
        .query("SELECT id, org, doc FROM tombstones", &[])
        .await
        .map_err(db_err)?
    {
        let (id, org): (&str, &str) = (row.get(0), row.get(1));
        match dec::<TombstoneRecord>("tombstones", row.get(2)) {
            Ok(t) if t.id.as_str() == id && t.org.as_str() == org => {}
            Ok(_) => problems.push(format!("tombstone {id}: columns disagree with the record")),
            Err(e) => problems.push(format!("tombstone {id}: {e}")),
        }
    }
    for row in client
        .query(
            "SELECT u.secret_id FROM secret_usage u \
             LEFT JOIN secrets s ON s.id = u.secret_id WHERE s.id IS NULL",
            &[],
        )
        .await
        .map_err(db_err)?
    {
        let id: &str = row.get(0);
        problems.push(format!("usage of secret {id}: the secret does not exist"));
    }
    for row in client
        .query("SELECT seq, org, doc FROM audit", &[])
        .await
        .map_err(db_err)?
    {
        let (seq, org): (i64, &str) = (row.get(0), row.get(1));
        match dec::<AuditRecord>("audit", row.get(2)) {
            Ok(a) if i64::try_from(a.seq).ok() == Some(seq) && a.org == org => {}
            Ok(_) => problems.push(format!("audit {seq}: columns disagree with the entry")),
            Err(e) => problems.push(format!("audit {seq}: {e}")),
        }
    }
    // Sequence numbers are handed out from the counter: one at or below the newest entry
    // would number a later entry before an earlier one (or collide).
    let row = client
        .query_one(
            "SELECT (SELECT next_seq FROM write_counter), \
             (SELECT coalesce(max(seq), 0) FROM audit)",
            &[],
        )
        .await
        .map_err(db_err)?;
    let (next, newest): (Option<i64>, i64) = (row.get(0), row.get(1));
    match next {
        Some(next) if next > newest => {}
        Some(next) => problems.push(format!(
            "write counter: next sequence number {next} is not above the newest entry's {newest}"
        )),
        None => problems.push("write counter: the row is missing".into()),
    }
    Ok(problems)
}
