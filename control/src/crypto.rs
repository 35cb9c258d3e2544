//! Encryption at rest: master keys on disk, sealing and opening of secret values.
//!
//! Values are sealed with XChaCha20-Poly1305 under a random 192-bit nonce per write. The
//! associated data binds a ciphertext to its record (organization, secret id, revision), so a
//! ciphertext copied into another record fails to open.
//!
//! Master keys live in `<data dir>/keys/<id>.key` (32 raw bytes, mode 0600, directory 0700);
//! `keys/active` names the key new writes use. Several keys exist only during a rekey: the new key
//! is durable before any record uses it, and an old key is deleted only after no record
//! references it, so a crash at any point leaves every record openable.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use veil_link::{OrgId, Revision, SecretId};
use zeroize::Zeroizing;

/// Length of a master key in bytes.
const KEY_LEN: usize = 32;
/// Length of an XChaCha20 nonce in bytes.
const NONCE_LEN: usize = 24;
/// Name of the file naming the active key.
const ACTIVE_FILE: &str = "active";

/// Errors of the key store and of sealing/opening.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A filesystem operation on the key directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file or directory is accessible by group or others, or owned by another user.
    #[error(
        "{path} has mode {mode:o} or a foreign owner; key material must be owned by this user and not accessible by group or others (chmod 600 files, 700 the directory)"
    )]
    Permissions {
        /// The offending path.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// A key file has the wrong size or the active pointer is broken.
    #[error("corrupt key store: {0}")]
    Corrupt(String),
    /// A record names a key that is not on disk.
    #[error("master key {0} is missing")]
    UnknownKey(String),
    /// Authentication failed: wrong key, tampered ciphertext or ciphertext moved between records.
    #[error("ciphertext does not authenticate for this record")]
    Open,
    /// Encryption failed (cannot happen with valid lengths).
    #[error("encryption failed")]
    Seal,
    /// The stored nonce or ciphertext is not valid base64 or has the wrong length.
    #[error("malformed sealed value")]
    Malformed,
}

/// A sealed value as stored in a record.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Id of the master key that sealed it.
    pub key_id: String,
    /// Base64 nonce.
    pub nonce: String,
    /// Base64 ciphertext with tag.
    pub ciphertext: String,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// The record a ciphertext is bound to.
#[derive(Clone, Copy, Debug)]
pub struct RecordBinding<'a> {
    /// Owning organization.
    pub org: &'a OrgId,
    /// Secret id.
    pub secret_id: &'a SecretId,
    /// Value revision (bumped on every value change).
    pub revision: Revision,
}

impl RecordBinding<'_> {
    /// The associated data: the ids' text and the revision's number, exactly as when they were
    /// plain strings and integers, so every value sealed before the newtypes still opens.
    fn aad(&self) -> Vec<u8> {
        let (org, secret_id) = (self.org.as_str(), self.secret_id.as_str());
        let mut aad = Vec::with_capacity(32 + org.len() + secret_id.len());
        aad.extend_from_slice(b"veil/secret/v1");
        for part in [org.as_bytes(), secret_id.as_bytes()] {
            aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&self.revision.0.to_be_bytes());
        aad
    }
}

/// All master keys on disk and which one seals new values.
pub struct Keyring {
    dir: PathBuf,
    keys: BTreeMap<String, Zeroizing<[u8; KEY_LEN]>>,
    active: String,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("dir", &self.dir)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CryptoError + use<> {
    let path = path.to_owned();
    move |source| CryptoError::Io { what, path, source }
}

fn check_private(path: &Path) -> Result<(), CryptoError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    let euid = nix::unistd::geteuid().as_raw();
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 || meta.uid() != euid {
        return Err(CryptoError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), CryptoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync dir) with mode 0600.
fn write_private_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CryptoError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dest = dir.join(name);
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, &dest).map_err(io_err("rename", &dest))?;
    sync_dir(dir)
}

/// Reads one key file (its mode already checked).
fn read_key(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len != KEY_LEN as u64 {
        return Err(CryptoError::Corrupt(format!(
            "{} is {len} bytes, expected {KEY_LEN}",
            path.display()
        )));
    }
    file.read_exact(key.as_mut_slice())
        .map_err(io_err("read", path))?;
    Ok(key)
}

fn new_key_id() -> String {
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut id);
    format!("k{}", hex::encode(id))
}

impl Keyring {
    /// Opens `<data_dir>/keys`, creating it and a first key on first start; refuses key material
    /// that group or others can access.
    pub fn open_or_create(data_dir: &Path) -> Result<Self, CryptoError> {
        let dir = data_dir.join("keys");
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err("create", &dir))?;
            sync_dir(data_dir)?;
        }
        check_private(&dir)?;
        let mut keys = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(io_err("read", &dir))? {
            let entry = entry.map_err(io_err("read", &dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A write interrupted before its rename; never referenced by anything.
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                continue;
            }
            check_private(&path)?;
            let Some(id) = name.strip_suffix(".key") else {
                continue;
            };
            keys.insert(id.to_owned(), read_key(&path)?);
        }
        let active_path = dir.join(ACTIVE_FILE);
        let active = match fs::read_to_string(&active_path) {
            Ok(s) => s.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err("read", &active_path)(e)),
        };
        let mut ring = Self { dir, keys, active };
        if ring.active.is_empty() {
            // First start, or a crash between writing the first key and naming it active.
            let id = match ring.keys.len() {
                0 => ring.add_key()?,
                1 => ring.keys.keys().next().cloned().unwrap_or_default(),
                _ => {
                    return Err(CryptoError::Corrupt(
                        "several keys but keys/active is missing".into(),
                    ));
                }
            };
            ring.set_active(&id)?;
        }
        if !ring.keys.contains_key(&ring.active) {
            return Err(CryptoError::UnknownKey(ring.active.clone()));
        }
        Ok(ring)
    }

    /// Id of the key that seals new values.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// Every key's id with its fingerprint: a one-way hash (SHA-256 under a domain prefix) that
    /// tells whether two replicas hold the same key without revealing it.
    pub fn fingerprints(&self) -> Vec<(String, String)> {
        use sha2::Digest;
        self.keys
            .iter()
            .map(|(id, key)| {
                let mut h = sha2::Sha256::new();
                h.update(b"veil/key-fingerprint/v1\0");
                h.update(key.as_slice());
                (id.clone(), hex::encode(h.finalize()))
            })
            .collect()
    }

    /// Ids of every key on disk.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Loads key files that appeared in the keys directory since it was opened (an operator
    /// copying a replica's new key during a coordinated rekey); returns their ids. Files still
    /// being written (`.tmp`) or readable by others are skipped until they are complete.
    pub fn load_new_keys(&mut self) -> Result<Vec<String>, CryptoError> {
        let mut added = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("read", &self.dir))? {
            let entry = entry.map_err(io_err("read", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".key") else {
                continue;
            };
            if self.keys.contains_key(id) {
                continue;
            }
            let path = entry.path();
            if let Err(e) = check_private(&path) {
                tracing::warn!(error = %e, "not loading a new key file");
                continue;
            }
            self.keys.insert(id.to_owned(), read_key(&path)?);
            added.push(id.to_owned());
        }
        Ok(added)
    }

    /// Creates a new key file (durable before this returns); it is not active yet.
    pub fn add_key(&mut self) -> Result<String, CryptoError> {
        let id = new_key_id();
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rng().fill_bytes(key.as_mut_slice());
        write_private_atomic(&self.dir, &format!("{id}.key"), key.as_slice())?;
        self.keys.insert(id.clone(), key);
        Ok(id)
    }

    /// Makes `id` the key for new writes (durably).
    pub fn set_active(&mut self, id: &str) -> Result<(), CryptoError> {
        if !self.keys.contains_key(id) {
            return Err(CryptoError::UnknownKey(id.to_owned()));
        }
        write_private_atomic(&self.dir, ACTIVE_FILE, id.as_bytes())?;
        self.active = id.to_owned();
        Ok(())
    }

    /// Deletes a non-active key; the caller guarantees no record references it any more.
    pub fn remove_key(&mut self, id: &str) -> Result<(), CryptoError> {
        if id == self.active {
            return Err(CryptoError::Corrupt(
                "refusing to remove the active key".into(),
            ));
        }
        let path = self.dir.join(format!("{id}.key"));
        fs::remove_file(&path).map_err(io_err("remove", &path))?;
        sync_dir(&self.dir)?;
        self.keys.remove(id);
        Ok(())
    }

    /// Seals `plaintext` for the record under the active key with a fresh random nonce.
    pub fn seal(
        &self,
        binding: RecordBinding<'_>,
        plaintext: &[u8],
    ) -> Result<Sealed, CryptoError> {
        let key = self
            .keys
            .get(&self.active)
            .ok_or_else(|| CryptoError::UnknownKey(self.active.clone()))?;
        let cipher = XChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = binding.aad();
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Seal)?;
        Ok(Sealed {
            key_id: self.active.clone(),
            nonce: B64.encode(nonce),
            ciphertext: B64.encode(ciphertext),
        })
    }

    /// Opens a sealed value for the record it must belong to.
    pub fn open(
        &self,
        binding: RecordBinding<'_>,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let key = self
            .keys
            .get(&sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.clone()))?;
        let nonce = B64
            .decode(&sealed.nonce)
            .map_err(|_| CryptoError::Malformed)?;
        if nonce.len() != NONCE_LEN {
            return Err(CryptoError::Malformed);
        }
        let ciphertext = B64
            .decode(&sealed.ciphertext)
            .map_err(|_| CryptoError::Malformed)?;
        let cipher = XChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        let aad = binding.aad();
        cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(org: &str, secret_id: &str) -> (&'static OrgId, &'static SecretId) {
        (
            Box::leak(Box::new(OrgId::parse(org).unwrap())),
            Box::leak(Box::new(SecretId::parse(secret_id).unwrap())),
        )
    }

    fn binding(rev: u64) -> RecordBinding<'static> {
        let (org, secret_id) = ids("acme", "s1");
        RecordBinding {
            org,
            secret_id,
            revision: Revision(rev),
        }
    }

    #[test]
    fn the_binding_is_the_bytes_of_the_text_ids_and_the_revision() {
        // Pinned: a change here makes every stored value unopenable.
        let mut want = b"veil/secret/v1".to_vec();
        want.extend_from_slice(&4u64.to_be_bytes());
        want.extend_from_slice(b"acme");
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(b"s1");
        want.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(binding(7).aad(), want);
    }

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open_or_create(dir.path()).unwrap();
        let sealed = ring.seal(binding(1), b"hunter2").unwrap();
        assert_eq!(
            ring.open(binding(1), &sealed).unwrap().as_slice(),
            b"hunter2"
        );
        assert!(matches!(
            ring.open(binding(2), &sealed),
            Err(CryptoError::Open)
        ));
        let (org, secret_id) = ids("acme", "s2");
        let other = RecordBinding {
            org,
            secret_id,
            revision: Revision(1),
        };
        assert!(matches!(ring.open(other, &sealed), Err(CryptoError::Open)));
        let (org, secret_id) = ids("evil", "s1");
        let other_org = RecordBinding {
            org,
            secret_id,
            revision: Revision(1),
        };
        assert!(matches!(
            ring.open(other_org, &sealed),
            Err(CryptoError::Open)
        ));
        let again = ring.seal(binding(1), b"hunter2").unwrap();
        assert_ne!(again.nonce, sealed.nonce, "nonce must be fresh per write");
        assert!(!format!("{sealed:?}").contains(&sealed.ciphertext));
    }

    #[test]
    fn key_file_is_private_and_persistent() {
        let dir = tempfile::tempdir().unwrap();
        let ring = Keyring::open_or_create(dir.path()).unwrap();
        let key_path = dir
            .path()
            .join("keys")
            .join(format!("{}.key", ring.active_id()));
        let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sealed = ring.seal(binding(1), b"v").unwrap();
        let reopened = Keyring::open_or_create(dir.path()).unwrap();
        assert_eq!(reopened.active_id(), ring.active_id());
        assert_eq!(reopened.open(binding(1), &sealed).unwrap().as_slice(), b"v");

        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Keyring::open_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, CryptoError::Permissions { .. }), "{err}");
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(Keyring::open_or_create(dir.path()).is_err());
    }

    #[test]
    fn rekey_keeps_old_key_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = Keyring::open_or_create(dir.path()).unwrap();
        let old = ring.active_id().to_owned();
        let sealed = ring.seal(binding(1), b"v").unwrap();
        let new = ring.add_key().unwrap();
        ring.set_active(&new).unwrap();
        let reopened = Keyring::open_or_create(dir.path()).unwrap();
        assert_eq!(reopened.active_id(), new);
        assert_eq!(reopened.open(binding(1), &sealed).unwrap().as_slice(), b"v");
        let resealed = ring.seal(binding(1), b"v").unwrap();
        assert_eq!(resealed.key_id, new);
        ring.remove_key(&old).unwrap();
        assert!(ring.remove_key(&new).is_err());
        assert!(matches!(
            ring.open(binding(1), &sealed),
            Err(CryptoError::UnknownKey(_))
        ));
        assert_eq!(ring.open(binding(1), &resealed).unwrap().as_slice(), b"v");
    }
}
