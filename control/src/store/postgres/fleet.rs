//! The fleet's CA and enrolled hosts (see [`crate::store::fleet`]). Host documents change
//! outside the write counter: they carry no audit sequence and no secret.

use super::db::{PgStore, dec, enc};
use super::error::db_err;
use crate::store::StoreError;
use crate::store::fleet::{FleetCaRecord, FleetStore, HostRecord};

/// The channel a revocation is announced on (payload: the host name).
pub const FLEET_CHANNEL: &str = "veil_fleet";

impl PgStore {
    /// Changes one host's document under a row lock; `NotFound` when not enrolled.
    async fn change_host(
        &self,
        name: &str,
        change: impl FnOnce(&mut HostRecord),
        notify: bool,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "SELECT doc FROM fleet_hosts WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .await
            .map_err(db_err)?
            .ok_or(StoreError::NotFound)?;
        let mut host: HostRecord = dec("fleet_hosts", row.get(0))?;
        change(&mut host);
        tx.execute(
            "UPDATE fleet_hosts SET doc = $2 WHERE name = $1",
            &[&name, &enc(&host)?],
        )
        .await
        .map_err(db_err)?;
        if notify {
            tx.execute("SELECT pg_notify($1, $2)", &[&FLEET_CHANNEL, &name])
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }
}

impl FleetStore for PgStore {
    fn fleet_ca(&self) -> Result<Option<FleetCaRecord>, StoreError> {
        self.run(self.doc("fleet_ca", "SELECT doc FROM fleet_ca WHERE id = 1", &[]))
    }

    fn init_fleet_ca(&self, ca: &FleetCaRecord) -> Result<FleetCaRecord, StoreError> {
        self.run(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO fleet_ca (id, doc) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                    &[&enc(ca)?],
                )
                .await
                .map_err(db_err)?;
            self.doc("fleet_ca", "SELECT doc FROM fleet_ca WHERE id = 1", &[])
                .await?
                .ok_or(StoreError::NotFound)
        })
    }

    fn enroll_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db_err)?;
            tx.execute(
                "INSERT INTO fleet_hosts (name, doc) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET doc = EXCLUDED.doc",
                &[&host.name, &enc(host)?],
            )
            .await
            .map_err(db_err)?;
            // Connections made with the previous certificate are dropped as for a revocation.
            tx.execute("SELECT pg_notify($1, $2)", &[&FLEET_CHANNEL, &host.name])
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        })
    }

    fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        self.run(self.doc(
            "fleet_hosts",
            "SELECT doc FROM fleet_hosts WHERE name = $1",
            &[&name],
        ))
    }

    fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.run(self.docs(
            "fleet_hosts",
            "SELECT doc FROM fleet_hosts ORDER BY name COLLATE \"C\"",
            &[],
        ))
    }

    // One row decoded per fleet connection, not every host's document (a failover admits
    // hundreds at once).
    fn host_with_cert(&self, cert_sha256: &str) -> Result<Option<HostRecord>, StoreError> {
        self.run(self.doc(
            "fleet_hosts",
            "SELECT doc FROM fleet_hosts WHERE doc->>'cert_sha256' = $1 \
             ORDER BY name COLLATE \"C\" LIMIT 1",
            &[&cert_sha256],
        ))
    }

    fn revoke_host(&self, name: &str, at: i64) -> Result<(), StoreError> {
        self.run(self.change_host(name, |h| h.revoked_at = Some(at), true))
    }

    fn host_connected(
        &self,
        name: &str,
        replica: &str,
        agent_id: &str,
        ca_pem: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        self.run(self.change_host(name, |h| h.connect(replica, agent_id, ca_pem, at), false))
    }

    fn host_disconnected(
        &self,
        name: &str,
        replica: &str,
        agent_id: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        self.run(self.change_host(name, |h| h.disconnect(replica, agent_id, at), false))
    }
}
