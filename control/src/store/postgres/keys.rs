//! The replicas' shared keyring in the database: each master key's fingerprint and state, the
//! key every replica seals with, and what each live replica reports holding (see
//! [`crate::rekey`]). Fingerprints are one-way hashes; keys never reach the database.

use super::PgStore;
use super::error::db_err;
use crate::store::StoreError;
use crate::store::shared_keys::{KeyState, ReplicaKeys, SharedKeyring, SharedKeys};

/// A replica not seen for this long counts as gone (it reports every 2 s).
const GONE_AFTER_MS: i64 = 10_000;
/// Current time in the database, ms since the epoch: one clock for every replica.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

fn state_name(state: KeyState) -> &'static str {
    match state {
        KeyState::Current => "current",
        KeyState::Pending => "pending",
        KeyState::Retired => "retired",
    }
}

fn parse_state(text: &str) -> Result<KeyState, StoreError> {
    match text {
        "current" => Ok(KeyState::Current),
        "pending" => Ok(KeyState::Pending),
        "retired" => Ok(KeyState::Retired),
        other => Err(StoreError::Corrupt {
            tree: "master_keys",
            detail: format!("unknown key state {other:?}"),
        }),
    }
}

impl PgStore {
    /// Refuses to serve with master keys that differ from the other replicas': the first
    /// replica records its keys' fingerprints and active key; every later one must hold every
    /// current key (same fingerprint) and no key the others do not know. Pending keys (a rekey
    /// under way) may be held or not; retired ones are deleted by the replica soon after start.
    pub fn check_keys(
        &self,
        fingerprints: &[(String, String)],
        active: &str,
    ) -> Result<(), StoreError> {
        let in_use = crate::store::Store::key_ids_in_use(self)?;
        if let Some(missing) = in_use
            .iter()
            .find(|id| !fingerprints.iter().any(|(have, _)| have == *id))
        {
            return Err(StoreError::Schema(format!(
                "master key {missing} seals values in the database but is not in this \
                 replica's keys directory: copy the keys directory from another replica"
            )));
        }
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db_err)?;
            tx.execute("LOCK TABLE master_keys IN EXCLUSIVE MODE", &[])
                .await
                .map_err(db_err)?;
            let known: Vec<(String, String, String)> = tx
                .query(
                    "SELECT id, fingerprint, state FROM master_keys ORDER BY id",
                    &[],
                )
                .await
                .map_err(db_err)?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            if known.is_empty() {
                for (id, fingerprint) in fingerprints {
                    tx.execute(
                        "INSERT INTO master_keys (id, fingerprint, added_at, state) \
                         VALUES ($1, $2, $3, 'current')",
                        &[id, fingerprint, &crate::timefmt::now_ms()],
                    )
                    .await
                    .map_err(db_err)?;
                }
                tx.execute(
                    "INSERT INTO shared_keyring (one, active) VALUES (true, $1) \
                     ON CONFLICT (one) DO UPDATE SET active = EXCLUDED.active",
                    &[&active],
                )
                .await
                .map_err(db_err)?;
                return tx.commit().await.map_err(db_err);
            }
            for (id, fingerprint, state) in &known {
                let mine = fingerprints.iter().find(|(have, _)| have == id);
                match (parse_state(state)?, mine) {
                    (KeyState::Current, None) => {
                        return Err(StoreError::Schema(format!(
                            "master key {id} is used by the other replicas but is not in this \
                             replica's keys directory: copy the keys directory from another \
                             replica"
                        )));
                    }
                    (KeyState::Current | KeyState::Pending, Some((_, mine)))
                        if mine != fingerprint =>
                    {
                        return Err(StoreError::Schema(format!(
                            "master key {id} differs from the key of that id the other \
                             replicas use: every replica needs the same key files"
                        )));
                    }
                    _ => {}
                }
            }
            if let Some((extra, _)) = fingerprints
                .iter()
                .find(|(id, _)| !known.iter().any(|(k, _, _)| k == id))
            {
                return Err(StoreError::Schema(format!(
                    "master key {extra} is in this replica's keys directory but the other \
                     replicas do not have it: every replica needs the same key files"
                )));
            }
            Ok(())
        })
    }
}

impl SharedKeys for PgStore {
    fn keyring(&self) -> Result<SharedKeyring, StoreError> {
        self.run(async {
            let client = self.client().await?;
            let keys = client
                .query("SELECT id, state FROM master_keys ORDER BY id", &[])
                .await
                .map_err(db_err)?
                .iter()
                .map(|r| Ok((r.get::<_, String>(0), parse_state(r.get(1))?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            let active = client
                .query_opt("SELECT active FROM shared_keyring", &[])
                .await
                .map_err(db_err)?
                .map(|r| r.get::<_, String>(0));
            let replicas = client
                .query(
                    &format!(
                        "SELECT id, key_ids, active_key FROM replicas \
                         WHERE {DB_NOW_MS} - seen_at < $1 ORDER BY id"
                    ),
                    &[&GONE_AFTER_MS],
                )
                .await
                .map_err(db_err)?
                .iter()
                .map(|r| ReplicaKeys {
                    replica: r.get(0),
                    key_ids: r.get(1),
                    active: r.get(2),
                })
                .collect();
            Ok(SharedKeyring {
                keys,
                active,
                replicas,
            })
        })
    }

    fn add_pending_key(&self, id: &str, fingerprint: &str) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO master_keys (id, fingerprint, added_at, state) \
                     VALUES ($1, $2, $3, $4)",
                    &[
                        &id,
                        &fingerprint,
                        &crate::timefmt::now_ms(),
                        &state_name(KeyState::Pending),
                    ],
                )
                .await
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn activate_key(&self, id: &str) -> Result<(), StoreError> {
        self.run(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(db_err)?;
            tx.execute(
                "UPDATE master_keys SET state = 'current' WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO shared_keyring (one, active) VALUES (true, $1) \
                 ON CONFLICT (one) DO UPDATE SET active = EXCLUDED.active",
                &[&id],
            )
            .await
            .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        })
    }

    fn retire_keys(&self, ids: &[String]) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE master_keys SET state = 'retired' WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(db_err)?;
            Ok(())
        })
    }

    fn report_keys(&self, key_ids: &[String], active: &str) -> Result<(), StoreError> {
        self.run(async {
            let client = self.client().await?;
            client
                .execute(
                    &format!(
                        "INSERT INTO replicas (id, seen_at, key_ids, active_key) \
                         VALUES ($1, {DB_NOW_MS}, $2, $3) ON CONFLICT (id) DO UPDATE SET \
                         seen_at = EXCLUDED.seen_at, key_ids = EXCLUDED.key_ids, \
                         active_key = EXCLUDED.active_key"
                    ),
                    &[&self.replica, &key_ids, &active],
                )
                .await
                .map_err(db_err)?;
            Ok(())
        })
    }
}
