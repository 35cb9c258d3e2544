//! What can go wrong in a store, shared by the trait, its backends and the key coordination.

use crate::crypto::CryptoError;
use veil_link::{Revision, SecretId};

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was violated.
    #[error("{0}")]
    Conflict(Conflict),
    /// The object does not exist (or belongs to another organization).
    #[error("not found")]
    NotFound,
    /// The change breaks a rule of the store (checked inside a read-modify-write).
    #[error("{0}")]
    Rejected(Rejected),
    /// The backend failed.
    #[error("storage backend: {0}")]
    Backend(#[from] ::sled::Error),
    /// The database failed a statement (the message is the server's, which never holds a
    /// value: values reach the database sealed).
    #[error("database: {0}")]
    Database(String),
    /// The database cannot be reached now; retrying later may succeed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database was written by a newer veil-control, or lacks what this one needs.
    #[error("{0}")]
    Schema(String),
    /// A record did not encode.
    #[error("storage backend: encode: {0}")]
    Encode(serde_json::Error),
    /// A value being re-sealed did not seal (names no value).
    #[error("storage backend: seal: {0}")]
    Seal(CryptoError),
    /// A stored value being re-sealed did not open.
    #[error("storage backend: open: {0}")]
    Open(CryptoError),
    /// A stored value of a secret's revision did not open (during a key rotation).
    #[error("storage backend: open secret {secret_id} revision {revision}: {source}")]
    OpenSecret {
        /// The secret.
        secret_id: SecretId,
        /// The revision the value was sealed under.
        revision: Revision,
        /// Why.
        source: CryptoError,
    },
    /// A stored record does not parse.
    #[error("corrupt record in {tree}: {detail}")]
    Corrupt {
        /// Where.
        tree: &'static str,
        /// What.
        detail: String,
    },
}

/// Which uniqueness rule a change violated (the message names it).
#[derive(Debug, thiserror::Error)]
pub enum Conflict {
    /// Another secret of the organization has the name.
    #[error("a secret named {0:?} already exists in this organization")]
    SecretName(String),
    /// A generated id or placeholder is taken.
    #[error("generated id collided; retry")]
    GeneratedId,
    /// The API key id is taken.
    #[error("api key id exists")]
    ApiKeyId,
    /// Another sandbox holds the cgroup.
    #[error("cgroup {0} is already registered to another sandbox")]
    Cgroup(String),
    /// Another sandbox took the cgroup while a registration was being rolled back.
    #[error("cgroup {0} was registered to another sandbox meanwhile")]
    CgroupMeanwhile(String),
}

/// Which rule of the store a change broke (the message names it).
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    /// A page cursor made for another sort.
    #[error("cursor does not match the sort")]
    Cursor,
    /// A change tried to alter an id, organization, name or placeholder.
    #[error("identity fields are immutable")]
    Identity,
    /// A tombstone names another secret.
    #[error("a tombstone must keep the secret's id and organization")]
    Tombstone,
}
