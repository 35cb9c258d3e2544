//! The PostgreSQL store itself: its pool and the runtime that drives it, the connection
//! settings (TLS unless the server is on this host), and the one write path every change
//! takes: lock the write counter → change → audit → notify → commit.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_postgres::config::Host;
use tokio_postgres::types::{Json, ToSql};

use super::error::db_err;
use super::schema;
use crate::store::{AuditRecord, StoreError};

/// Most connections one replica holds.
const POOL_SIZE: usize = 16;
/// How long a store call waits for a connection before the caller gets a 503.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The channel changes are announced on (see [`Note`]).
pub const CHANNEL: &str = "veil_change";

/// How to reach the database: the settings and whether TLS is required.
#[derive(Clone)]
pub struct Connection {
    /// Server, user, database.
    pub config: tokio_postgres::Config,
    /// TLS connector, when the server is not on this host.
    pub tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the config itself: it may carry a password.
        f.debug_struct("Connection")
            .field("hosts", &self.config.get_hosts())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connection {
    /// Settings for `config`: TLS with full verification (certificate chain to `ca_file`, name
    /// = host) unless every host is a Unix socket or a loopback address.
    pub fn new(mut config: tokio_postgres::Config, ca_file: &Path) -> Result<Self, StoreError> {
        let local = config.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        }) && config.get_hostaddrs().iter().all(IpAddr::is_loopback);
        if config.get_application_name().is_none() {
            config.application_name("veil-control");
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        if local {
            return Ok(Self { config, tls: None });
        }
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        let tls = rustls_connector(ca_file)?;
        Ok(Self {
            config,
            tls: Some(tls),
        })
    }
}

fn rustls_connector(
    ca_file: &Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let unusable =
        |e: String| StoreError::Unavailable(format!("CA file {}: {e}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| unusable(e.to_string()))? {
        let cert = cert.map_err(|e| unusable(e.to_string()))?;
        roots.add(cert).map_err(|e| unusable(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(unusable("no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| unusable(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

/// The PostgreSQL-backed store; any number of replicas share one database.
pub struct PgStore {
    /// Drives the pool's connections; store calls block on it from blocking threads (an
    /// async worker calling the store panics here instead of stalling its runtime).
    rt: Option<tokio::runtime::Runtime>,
    pub(super) pool: Pool,
    /// This replica's id, carried in its notifications so it can skip its own.
    pub(super) replica: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime from async code panics; its threads hold nothing durable.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_err(e),
        e => StoreError::Unavailable(format!("PostgreSQL: {e}")),
    }
}

/// A stored document as a record.
pub(super) fn dec<T: DeserializeOwned>(
    table: &'static str,
    doc: serde_json::Value,
) -> Result<T, StoreError> {
    serde_json::from_value(doc).map_err(|e| StoreError::Corrupt {
        tree: table,
        detail: e.to_string(),
    })
}

/// A record as a document to store.
pub(super) fn enc<T: Serialize>(value: &T) -> Result<Json<serde_json::Value>, StoreError> {
    serde_json::to_value(value)
        .map(Json)
        .map_err(StoreError::Encode)
}

/// What a change announces to every replica (delivered at commit, in commit order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Note {
    /// The replica that made the change.
    pub replica: String,
    /// What changed.
    #[serde(flatten)]
    pub what: Changed,
}

/// The object a notification concerns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "lowercase")]
pub enum Changed {
    /// A secret was created, changed, deleted or lost a grace-period value.
    Secret(veil_link::SecretId),
    /// A sandbox was registered, changed or removed.
    Sandbox(veil_link::SandboxId),
}

/// One write transaction: holds the write counter's row lock from start to commit.
pub(super) struct Writer<'a> {
    pub(super) tx: deadpool_postgres::Transaction<'a>,
    next_seq: i64,
    first_seq: i64,
    audits: Vec<AuditRecord>,
    notes: Vec<Changed>,
    replica: &'a str,
}

impl<'a> Writer<'a> {
    pub(super) async fn begin(
        client: &'a mut deadpool_postgres::Object,
        replica: &'a str,
    ) -> Result<Self, StoreError> {
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_one("SELECT next_seq FROM write_counter FOR UPDATE", &[])
            .await
            .map_err(db_err)?;
        let next_seq: i64 = row.get(0);
        Ok(Self {
            tx,
            next_seq,
            first_seq: next_seq,
            audits: Vec::new(),
            notes: Vec::new(),
            replica,
        })
    }

    /// Adds an audit entry (its sequence number assigned here).
    pub(super) async fn audit(&mut self, mut audit: AuditRecord) -> Result<(), StoreError> {
        audit.seq = u64::try_from(self.next_seq).unwrap_or_default();
        self.tx
            .execute(
                "INSERT INTO audit (seq, org, doc) VALUES ($1, $2, $3)",
                &[&self.next_seq, &audit.org.as_str(), &enc(&audit)?],
            )
            .await
            .map_err(db_err)?;
        self.next_seq += 1;
        self.audits.push(audit);
        Ok(())
    }

    /// Announces `what` to every replica once this transaction commits.
    pub(super) fn notify(&mut self, what: Changed) {
        if !self.notes.contains(&what) {
            self.notes.push(what);
        }
    }

    pub(super) async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        self.tx.execute(sql, params).await
    }

    /// Makes the change durable, then emits its audit entries as tracing events.
    pub(super) async fn commit(self) -> Result<(), StoreError> {
        if self.next_seq != self.first_seq {
            self.tx
                .execute("UPDATE write_counter SET next_seq = $1", &[&self.next_seq])
                .await
                .map_err(db_err)?;
        }
        for what in &self.notes {
            let note = Note {
                replica: self.replica.to_owned(),
                what: what.clone(),
            };
            let payload = serde_json::to_string(&note).map_err(StoreError::Encode)?;
            self.tx
                .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
                .await
                .map_err(db_err)?;
        }
        self.tx.commit().await.map_err(db_err)?;
        for a in &self.audits {
            crate::store::emit_audit(a);
        }
        Ok(())
    }
}

impl PgStore {
    /// Connects, applies pending schema migrations, and returns the store.
    pub fn connect(conn: &Connection) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("veil-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("starting the store runtime: {e}")))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &conn.tls {
            Some(tls) => Manager::from_config(conn.config.clone(), tls.clone(), manager_config),
            None => {
                Manager::from_config(conn.config.clone(), tokio_postgres::NoTls, manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL pool: {e}")))?;
        let mut replica = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut replica);
        let store = Self {
            rt: Some(rt),
            pool,
            replica: hex::encode(replica),
        };
        store.run(async {
            let mut client = store.client().await?;
            schema::migrate(&mut client).await
        })?;
        Ok(store)
    }

    /// This replica's id (in its notifications).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Runs `f` to completion on the store's runtime. Callers run on blocking threads; a call
    /// that still comes from an async worker hands the worker's other tasks to another thread
    /// first (`block_in_place`), so the runtime never stalls on the database.
    pub(super) fn run<F: Future>(&self, f: F) -> F::Output {
        let Some(rt) = &self.rt else {
            unreachable!("the runtime lives until drop")
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| rt.block_on(f))
            }
            _ => rt.block_on(f),
        }
    }

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Reads one document by a text key.
    pub(super) async fn doc<T: DeserializeOwned>(
        &self,
        table: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, StoreError> {
        let client = self.client().await?;
        match client.query_opt(sql, params).await.map_err(db_err)? {
            Some(row) => Ok(Some(dec(table, row.get(0))?)),
            None => Ok(None),
        }
    }

    /// Reads every document a query returns.
    pub(super) async fn docs<T: DeserializeOwned>(
        &self,
        table: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, StoreError> {
        let client = self.client().await?;
        let rows = client.query(sql, params).await.map_err(db_err)?;
        rows.into_iter().map(|r| dec(table, r.get(0))).collect()
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::config::SslMode;

    use super::*;

    fn conn(text: &str, ca: &str) -> Result<Connection, StoreError> {
        Connection::new(text.parse().expect("connection string"), Path::new(ca))
    }

    #[test]
    fn tls_is_required_and_verified_unless_the_server_is_on_this_host() {
        let ca = crate::config::SYSTEM_CA_FILE;
        for local in [
            "host=127.0.0.1 user=veil",
            "host=localhost user=veil",
            "host=::1 user=veil",
            "host=/run/postgresql user=veil",
        ] {
            assert!(conn(local, ca).expect(local).tls.is_none(), "{local}");
        }
        for remote in [
            "host=db.example user=veil",
            "host=10.0.0.5 user=veil",
            "host=127.0.0.1,db.example user=veil",
        ] {
            let c = conn(remote, ca).expect(remote);
            assert!(c.tls.is_some(), "{remote}: no TLS");
            assert_eq!(c.config.get_ssl_mode(), SslMode::Require, "{remote}");
        }
        // Without a usable CA there is no connection at all, never one left unverified.
        let e = conn("host=db.example user=veil", "/nonexistent/ca.pem")
            .expect_err("a missing CA file is refused")
            .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
