//! Local administration: API keys and rekey, run either directly on the data dir (daemon
//! stopped) or by the daemon on behalf of a client of its root-only admin socket.
//!
//! The socket speaks one JSON request line and one JSON response line per connection. It lives
//! in the data dir with mode 0600, and the daemon also checks the peer's uid.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use zeroize::Zeroizing;

use crate::auth::{self, Permission};
use crate::crypto::{CryptoError, Keyring, RecordBinding};
use crate::rekey;
use crate::store::{
    ApiKeyRecord, AuditRecord, OrgId, PreviousValue, Revision, SecretId, SecretRecord, Store,
    StoreError,
};
use crate::timefmt::{now_ms, rfc3339};

/// Name of the admin socket inside the data dir.
pub const SOCKET_NAME: &str = "admin.sock";
/// Actor recorded in the audit for host administration.
pub const LOCAL_ACTOR: &str = "local-admin";

/// Errors of administrative operations.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A coordinated rekey stopped (it resumes when run again).
    #[error(transparent)]
    Rekey(#[from] crate::rekey::RekeyError),
    /// Key material failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The socket exchange failed.
    #[error("admin socket: {0}")]
    Socket(String),
    /// The daemon reported an error.
    #[error("{0}")]
    Remote(String),
}

/// A request on the admin socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create an API key.
    CreateKey {
        /// Organization (created if new).
        org: String,
        /// Permissions.
        permissions: Vec<Permission>,
    },
    /// List API keys.
    ListKeys,
    /// Revoke an API key.
    RevokeKey {
        /// Key id.
        id: String,
    },
    /// Move every secret to a new master key.
    Rekey,
    /// Check that every secret opens and every index is consistent.
    Verify,
}

/// What a key listing shows (never the key or its hash).
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Key id.
    pub id: String,
    /// Organization.
    pub org: OrgId,
    /// Permissions.
    pub permissions: Vec<Permission>,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

pub use crate::rekey::RekeyReport;

/// How long a coordinated rekey waits for the other replicas at each step.
const SHARED_REKEY_WAIT: std::time::Duration = std::time::Duration::from_secs(6);

/// One secret's verification result (never its value).
#[derive(Debug, Serialize, Deserialize)]
pub struct VerifiedSecret {
    /// Secret id.
    pub id: SecretId,
    /// Organization.
    pub org: OrgId,
    /// Name.
    pub name: String,
    /// Value revision (for a deleted secret: the revision of its deletion).
    pub revision: Revision,
    /// Key that seals it.
    pub key_id: String,
    /// Whether it opened under its record binding.
    pub decrypts: bool,
    /// Rotated-out values still inside the grace period, newest first.
    #[serde(default)]
    pub previous: Vec<VerifiedValue>,
}

/// One kept earlier value's verification result (never the value).
#[derive(Debug, Serialize, Deserialize)]
pub struct VerifiedValue {
    /// The revision it was sealed under.
    pub revision: Revision,
    /// Key that seals it.
    pub key_id: String,
    /// Whether it opened under its record binding.
    pub decrypts: bool,
}

/// What `verify` found.
#[derive(Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Per secret.
    pub secrets: Vec<VerifiedSecret>,
    /// Deleted secrets whose last values are still scrubbed (tombstones): `key_id` and
    /// `decrypts` are those of the last value, `previous` the older ones.
    #[serde(default)]
    pub deleted: Vec<VerifiedSecret>,
    /// Index inconsistencies.
    pub problems: Vec<String>,
    /// Whether everything checked out.
    pub ok: bool,
}

/// Administrative operations over a store and keyring.
#[derive(Clone, Debug)]
pub struct Admin {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The keyring (only needed for rekey).
    pub keyring: Option<Arc<RwLock<Keyring>>>,
}

fn binding(rec: &SecretRecord) -> RecordBinding<'_> {
    RecordBinding {
        org: &rec.org,
        secret_id: &rec.id,
        revision: rec.revision,
    }
}

/// Opens each earlier value of secret `id` (discarding the plaintext).
fn verify_values(
    ring: &Keyring,
    org: &OrgId,
    id: &SecretId,
    values: &[PreviousValue],
) -> Vec<VerifiedValue> {
    values
        .iter()
        .map(|v| VerifiedValue {
            revision: v.revision,
            key_id: v.sealed.key_id.clone(),
            decrypts: ring
                .open(
                    RecordBinding {
                        org,
                        secret_id: id,
                        revision: v.revision,
                    },
                    &v.sealed,
                )
                .is_ok(),
        })
        .collect()
}

fn local_audit(org: &str, action: &str, id: &str, changes: serde_json::Value) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time: now_ms(),
        actor: LOCAL_ACTOR.to_owned(),
        org: org.to_owned(),
        action: action.to_owned(),
        target_type: "apikey".to_owned(),
        target_id: id.to_owned(),
        target_name: None,
        changes,
    }
}

impl Admin {
    /// Creates a key for `org` (creating the org if new); returns the key string, shown once.
    pub fn create_key(
        &self,
        org: &str,
        permissions: &[Permission],
    ) -> Result<Zeroizing<String>, AdminError> {
        let org = OrgId::parse(org).map_err(|e| AdminError::Invalid(e.to_string()))?;
        if permissions.is_empty() {
            return Err(AdminError::Invalid(
                "at least one --permission is required".into(),
            ));
        }
        let mut permissions = permissions.to_vec();
        permissions.sort();
        permissions.dedup();
        let new = auth::generate_key();
        let record = ApiKeyRecord {
            id: new.id.clone(),
            org: org.clone(),
            permissions: permissions.clone(),
            hash: new.hash.clone(),
            created_at: now_ms(),
        };
        let audit = local_audit(
            org.as_str(),
            "apikey.create",
            &new.id,
            json!({"permissions": {"to": permissions}}),
        );
        self.store.create_api_key(&record, audit)?;
        Ok(new.key)
    }

    /// Lists keys.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>, AdminError> {
        let mut keys: Vec<KeyInfo> = self
            .store
            .list_api_keys()?
            .into_iter()
            .map(|k| KeyInfo {
                id: k.id,
                org: k.org,
                permissions: k.permissions,
                created_at: rfc3339(k.created_at),
            })
            .collect();
        keys.sort_by(|a, b| (&a.org, &a.created_at).cmp(&(&b.org, &b.created_at)));
        Ok(keys)
    }

    /// Revokes a key.
    pub fn revoke_key(&self, id: &str) -> Result<(), AdminError> {
        let audit = local_audit("", "apikey.revoke", id, json!({}));
        match self.store.revoke_api_key(id, audit) {
            Err(StoreError::NotFound) => Err(AdminError::Invalid(format!("no API key {id}"))),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    fn ring(&self) -> Result<&Arc<RwLock<Keyring>>, AdminError> {
        self.keyring
            .as_ref()
            .ok_or_else(|| AdminError::Invalid("no keyring opened".into()))
    }

    /// Creates a new master key, makes it active, re-seals every secret and retires old keys;
    /// on a shared store, coordinated with the other replicas (see [`crate::rekey`]).
    pub fn rekey(&self) -> Result<RekeyReport, AdminError> {
        if let Some(keys) = self.store.shared_keys() {
            return rekey::coordinated(self.store.as_ref(), keys, self.ring()?, SHARED_REKEY_WAIT)
                .map_err(AdminError::from);
        }
        {
            let mut ring = self
                .ring()?
                .write()
                .map_err(|_| AdminError::Invalid("keyring poisoned".into()))?;
            let id = ring.add_key()?;
            ring.set_active(&id)?;
        }
        self.finish_rekey()
    }

    /// Re-seals secrets not under the active key and deletes keys nothing references; the
    /// second half of a rekey, also run at start-up to complete an interrupted one.
    /// On a shared store the coordinated rekey does this (see [`crate::rekey`]).
    pub fn finish_rekey(&self) -> Result<RekeyReport, AdminError> {
        let lock = self.ring()?;
        let (active, resealed) = {
            let ring = lock
                .read()
                .map_err(|_| AdminError::Invalid("keyring poisoned".into()))?;
            rekey::reseal_under_active(self.store.as_ref(), &ring)?
        };
        let mut ring = lock
            .write()
            .map_err(|_| AdminError::Invalid("keyring poisoned".into()))?;
        let in_use = self.store.key_ids_in_use()?;
        let mut retired = Vec::new();
        for id in ring.key_ids() {
            if id != active && !in_use.contains(&id) {
                ring.remove_key(&id)?;
                retired.push(id);
            }
        }
        tracing::info!(target: "veil::audit", active = %active, resealed, retired = ?retired, "rekey");
        Ok(RekeyReport {
            active_key: active,
            resealed,
            retired,
        })
    }

    /// Opens every value, previous and tombstoned ones included (discarding the plaintext),
    /// and cross-checks the indexes.
    pub fn verify(&self) -> Result<VerifyReport, AdminError> {
        let ring = self
            .ring()?
            .read()
            .map_err(|_| AdminError::Invalid("keyring poisoned".into()))?;
        let secrets: Vec<VerifiedSecret> = self
            .store
            .all_secrets()?
            .into_iter()
            .map(|s| VerifiedSecret {
                decrypts: ring.open(binding(&s), &s.sealed).is_ok(),
                previous: verify_values(&ring, &s.org, &s.id, &s.previous),
                id: s.id,
                org: s.org,
                name: s.name,
                revision: s.revision,
                key_id: s.sealed.key_id,
            })
            .collect();
        let deleted: Vec<VerifiedSecret> = self
            .store
            .tombstones()?
            .into_iter()
            .map(|t| {
                let mut values = verify_values(&ring, &t.org, &t.id, &t.values).into_iter();
                let last = values.next();
                VerifiedSecret {
                    key_id: last.as_ref().map(|v| v.key_id.clone()).unwrap_or_default(),
                    decrypts: last.is_some_and(|v| v.decrypts),
                    previous: values.collect(),
                    id: t.id,
                    org: t.org,
                    name: t.name,
                    revision: t.revision,
                }
            })
            .collect();
        let problems = self.store.check_consistency()?;
        let opens = |s: &VerifiedSecret| s.decrypts && s.previous.iter().all(|p| p.decrypts);
        let ok = problems.is_empty() && secrets.iter().chain(&deleted).all(opens);
        Ok(VerifyReport {
            secrets,
            deleted,
            problems,
            ok,
        })
    }

    /// Executes one socket request.
    pub fn execute(&self, request: Request) -> Result<serde_json::Value, AdminError> {
        Ok(match request {
            Request::CreateKey { org, permissions } => {
                let key = self.create_key(&org, &permissions)?;
                json!({"key": key.as_str()})
            }
            Request::ListKeys => serde_json::to_value(self.list_keys()?)
                .map_err(|e| AdminError::Socket(e.to_string()))?,
            Request::RevokeKey { id } => {
                self.revoke_key(&id)?;
                json!({})
            }
            Request::Rekey => serde_json::to_value(self.rekey()?)
                .map_err(|e| AdminError::Socket(e.to_string()))?,
            Request::Verify => serde_json::to_value(self.verify()?)
                .map_err(|e| AdminError::Socket(e.to_string()))?,
        })
    }
}

/// Path of the admin socket for a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Binds the admin socket (mode 0600) and serves it until the task is dropped.
pub fn serve(admin: Admin, data_dir: &Path) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(data_dir);
    // We hold the store's lock, so any socket file left here is from a dead daemon.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let euid = nix::unistd::geteuid().as_raw();
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept");
                    continue;
                }
            };
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            if uid != Some(0) && uid != Some(euid) {
                tracing::warn!(?uid, "admin socket: refused peer");
                continue;
            }
            let admin = admin.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(admin, stream).await {
                    tracing::warn!(error = %e, "admin socket connection");
                }
            });
        }
    }))
}

async fn handle(admin: Admin, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        Ok(req) => {
            let result = tokio::task::spawn_blocking(move || admin.execute(req)).await;
            match result {
                Ok(Ok(v)) => json!({"ok": true, "result": v}),
                Ok(Err(e)) => json!({"ok": false, "error": e.to_string()}),
                Err(e) => json!({"ok": false, "error": format!("task: {e}")}),
            }
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Sends one request to a running daemon; `Ok(None)` if no daemon listens.
pub async fn request(
    data_dir: &Path,
    request: &Request,
) -> Result<Option<serde_json::Value>, AdminError> {
    let path = socket_path(data_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(AdminError::Socket(format!("{}: {e}", path.display()))),
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| AdminError::Socket(e.to_string()))?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .map_err(|e| AdminError::Socket(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(|e| AdminError::Socket(e.to_string()))?;
    // The answer may carry a new API key: wipe the buffer after parsing.
    let answer = Zeroizing::new(answer);
    let v: serde_json::Value =
        serde_json::from_str(&answer).map_err(|e| AdminError::Socket(e.to_string()))?;
    if v["ok"] == json!(true) {
        Ok(Some(v["result"].clone()))
    } else {
        Err(AdminError::Remote(
            v["error"].as_str().unwrap_or("unknown error").to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TombstoneRecord;
    use crate::store::sled::SledStore;

    fn audit() -> AuditRecord {
        local_audit("acme", "t", "t", json!({}))
    }

    #[test]
    fn rekey_and_verify_cover_previous_and_deleted_values() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Arc::new(RwLock::new(Keyring::open_or_create(dir.path()).unwrap()));
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
        let admin = Admin {
            store: store.clone(),
            keyring: Some(ring.clone()),
        };
        let acme = OrgId::parse("acme").unwrap();
        let seal = |id: &str, revision: u64| {
            let binding = RecordBinding {
                org: &acme,
                secret_id: &SecretId::parse(id).unwrap(),
                revision: Revision(revision),
            };
            ring.read().unwrap().seal(binding, b"v").unwrap()
        };
        let record = |id: &str| SecretRecord {
            id: SecretId::parse(id).unwrap(),
            org: acme.clone(),
            name: format!("n-{id}"),
            description: None,
            hosts: vec![],
            placeholder: format!("ph-{id}"),
            created_at: 0,
            updated_at: 0,
            revision: Revision(2),
            sealed: seal(id, 2),
            body_substitution: false,
            wrong_host: Default::default(),
            previous: vec![PreviousValue {
                revision: Revision(1),
                sealed: seal(id, 1),
                replaced_at: 0,
            }],
        };
        store.insert_secret(&record("live"), audit()).unwrap();
        let gone = record("gone");
        store.insert_secret(&gone, audit()).unwrap();
        let tombstone = TombstoneRecord {
            id: gone.id.clone(),
            org: gone.org.clone(),
            name: gone.name.clone(),
            placeholder: gone.placeholder.clone(),
            hosts: vec![],
            revision: Revision(3),
            deleted_at: 0,
            values: vec![
                PreviousValue {
                    revision: Revision(2),
                    sealed: gone.sealed.clone(),
                    replaced_at: 0,
                },
                gone.previous[0].clone(),
            ],
        };
        store
            .delete_secret(&acme, &gone.id, &mut |_| (audit(), Some(tombstone.clone())))
            .unwrap();
        let report = admin.verify().unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.secrets[0].previous.len(), 1);
        assert_eq!(report.deleted.len(), 1);
        assert_eq!(report.deleted[0].previous[0].revision, 1);

        let old = ring.read().unwrap().active_id().to_owned();
        let rekey = admin.rekey().unwrap();
        assert_eq!(rekey.resealed, 2, "the secret and the tombstone");
        assert_eq!(rekey.retired, [old], "no value still needs the old key");
        let report = admin.verify().unwrap();
        assert!(report.ok, "{report:?}");
        let keys: Vec<&str> = report
            .secrets
            .iter()
            .chain(&report.deleted)
            .flat_map(|s| std::iter::once(&s.key_id).chain(s.previous.iter().map(|p| &p.key_id)))
            .map(String::as_str)
            .collect();
        assert!(keys.iter().all(|k| *k == rekey.active_key), "{keys:?}");

        // A previous value that does not open fails verification.
        let mut broken = record("broken");
        broken.previous[0].sealed = seal("broken", 7);
        store.insert_secret(&broken, audit()).unwrap();
        let report = admin.verify().unwrap();
        assert!(!report.ok);
        let b = report.secrets.iter().find(|s| s.id == "broken").unwrap();
        assert!(b.decrypts && !b.previous[0].decrypts);
    }
}
