//! API keys and permissions: key format, hashing, constant-time verification.
//!
//! A key reads `veil_<id>_<secret>`: the id (16 hex) locates the record, the whole key's SHA-256
//! is compared in constant time with the stored hash. The key itself is never stored.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::store::ApiKeyRecord;

pub use crate::store::{Permission, UnknownPermission};

/// Whether a key with `granted` may do what `needed` guards (`admin` implies all).
pub fn permits(granted: &[Permission], needed: Permission) -> bool {
    granted.contains(&Permission::Admin) || granted.contains(&needed)
}

/// A freshly generated key: the string to hand out once, and its hash to store.
pub struct NewKey {
    /// Record id.
    pub id: String,
    /// The full key; shown once.
    pub key: Zeroizing<String>,
    /// Hex SHA-256 of `key`.
    pub hash: String,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Generates a key with 256 random bits.
pub fn generate_key() -> NewKey {
    let mut id = [0u8; 8];
    let mut secret = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(secret.as_mut_slice());
    let id = hex::encode(id);
    let key = Zeroizing::new(format!("veil_{id}_{}", hex::encode(secret.as_slice())));
    let hash = hash_key(&key);
    NewKey { id, key, hash }
}

/// Hex SHA-256 of a key string.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The record id a presented key claims, if it is well-formed.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("veil_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16
        && secret.len() == 64
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && secret.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some(id)
}

/// Whether `presented` is the key stored in `record` (constant-time on the hash).
pub fn verify(record: &ApiKeyRecord, presented: &str) -> bool {
    let presented = hash_key(presented);
    presented.as_bytes().ct_eq(record.hash.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_and_verify() {
        let k = generate_key();
        assert_eq!(key_id(&k.key), Some(k.id.as_str()));
        let rec = ApiKeyRecord {
            id: k.id.clone(),
            org: veil_link::OrgId::parse("o").unwrap(),
            permissions: vec![],
            hash: k.hash.clone(),
            created_at: 0,
        };
        assert!(verify(&rec, &k.key));
        let mut wrong = k.key.to_string();
        wrong.pop();
        wrong.push('x');
        assert!(!verify(&rec, &wrong));
        assert!(key_id("veil_zz_00").is_none());
        assert!(key_id("Bearer x").is_none());
        assert!(!format!("{k:?}").contains(k.key.as_str()));
    }

    #[test]
    fn admin_implies_all() {
        for p in Permission::ALL {
            assert!(permits(&[Permission::Admin], p));
            assert_eq!(
                permits(&[Permission::ReadAudit], p),
                p == Permission::ReadAudit
            );
            assert_eq!(p.as_str().parse::<Permission>().unwrap(), p);
        }
        assert!("nope".parse::<Permission>().is_err());
    }
}
