//! Versioned schema migrations, applied at start under an advisory lock so that replicas
//! starting together apply each exactly once; a database newer than this binary is refused.
//!
//! Records are stored as the same JSON documents the sled backend writes (`doc`, `json`), beside the
//! columns that carry uniqueness, ordering and lookups. Audit sequence numbers come from one
//! counter row that every write transaction locks first: writers are serialised, and a
//! sequence number is visible only once every smaller one is (a reader never skips a late
//! commit).

use tokio_postgres::Client;

use super::error::db_err;
use crate::store::StoreError;

/// Migrations in order; `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE orgs (
    name text PRIMARY KEY,
    doc jsonb NOT NULL
);
CREATE TABLE api_keys (
    id text PRIMARY KEY,
    org text NOT NULL,
    doc jsonb NOT NULL
);
CREATE TABLE secrets (
    id text PRIMARY KEY,
    org text NOT NULL,
    name text COLLATE "C" NOT NULL,
    placeholder text NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    doc jsonb NOT NULL,
    CONSTRAINT secrets_org_name UNIQUE (org, name),
    CONSTRAINT secrets_placeholder UNIQUE (placeholder)
);
CREATE INDEX secrets_org_created ON secrets (org, created_at, id COLLATE "C");
CREATE INDEX secrets_org_updated ON secrets (org, updated_at, id COLLATE "C");
CREATE TABLE secret_usage (
    secret_id text PRIMARY KEY,
    doc jsonb NOT NULL
);
CREATE TABLE tombstones (
    id text PRIMARY KEY,
    org text NOT NULL,
    doc jsonb NOT NULL
);
CREATE TABLE sandboxes (
    id text PRIMARY KEY,
    org text NOT NULL,
    cgroup text NOT NULL,
    doc jsonb NOT NULL,
    CONSTRAINT sandboxes_cgroup UNIQUE (cgroup)
);
CREATE TABLE audit (
    seq bigint PRIMARY KEY,
    org text NOT NULL,
    doc jsonb NOT NULL
);
CREATE INDEX audit_org_seq ON audit (org, seq);
CREATE TABLE write_counter (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    next_seq bigint NOT NULL
);
INSERT INTO write_counter (one, next_seq) VALUES (true, 1);
CREATE TABLE master_keys (
    id text PRIMARY KEY,
    fingerprint text NOT NULL,
    added_at bigint NOT NULL
);
"#,
    r#"
CREATE TABLE agent_acks (
    replica text NOT NULL,
    secret_id text NOT NULL,
    agent_id text NOT NULL,
    revision bigint,
    at bigint,
    connected boolean NOT NULL,
    PRIMARY KEY (replica, secret_id, agent_id)
);
CREATE TABLE replicas (
    id text PRIMARY KEY,
    seen_at bigint NOT NULL,
    key_ids text[] NOT NULL DEFAULT '{}',
    active_key text NOT NULL DEFAULT ''
);
ALTER TABLE master_keys ADD COLUMN state text NOT NULL DEFAULT 'current';
CREATE TABLE shared_keyring (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    active text NOT NULL
);
"#,
    // Documents as `json`, the text as written: `jsonb` refuses a string holding U+0000
    // (`\u0000`), which a description, a reported host or an audit entry may hold (sled
    // stores them), and it reorders keys.
    r#"
ALTER TABLE orgs ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE api_keys ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE secrets ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE secret_usage ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE tombstones ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE sandboxes ALTER COLUMN doc TYPE json USING doc::json;
ALTER TABLE audit ALTER COLUMN doc TYPE json USING doc::json;
"#,
    // The fleet: its CA (one row; the key sealed under the data key) and enrolled hosts.
    r#"
CREATE TABLE fleet_ca (
    id integer PRIMARY KEY CHECK (id = 1),
    doc json NOT NULL
);
CREATE TABLE fleet_hosts (
    name text PRIMARY KEY,
    doc json NOT NULL
);
"#,
];

/// The schema version this binary writes.
pub const VERSION: i32 = MIGRATIONS.len() as i32;

/// An arbitrary constant naming veil's migration lock among the database's advisory locks.
const MIGRATION_LOCK: i64 = 0x7665_696c_6d69_6772;

/// Brings the database to [`VERSION`]; refuses one written by a newer veil-control.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(db_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS veil_schema (version integer NOT NULL)")
        .await
        .map_err(db_err)?;
    let current: i32 = match tx
        .query_opt("SELECT version FROM veil_schema", &[])
        .await
        .map_err(db_err)?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO veil_schema (version) VALUES (0)", &[])
                .await
                .map_err(db_err)?;
            0
        }
    };
    if current > VERSION {
        return Err(StoreError::Schema(format!(
            "the database's schema is version {current}, newer than this veil-control's \
             (version {VERSION}): run a veil-control at least as new as the one that wrote it"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await.map_err(db_err)?;
        tracing::info!(version = i + 1, "applied store schema migration");
    }
    tx.execute("UPDATE veil_schema SET version = $1", &[&VERSION])
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)
}
