//! Persistent state behind a backend-neutral trait; every write is durable when it returns.
//!
//! Records hold only sealed values (see [`crate::crypto`]); the store never sees plaintext.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod error;
pub mod fleet;
mod permission;
pub mod postgres;
pub mod shared_keys;
pub mod sled;
mod values;

use serde::{Deserialize, Serialize};

use crate::crypto::Sealed;
use crate::paginate::{Cursor, Order, SortField};
pub use error::{Conflict, Rejected, StoreError};
pub use permission::{Permission, UnknownPermission};
pub use veil_link::{Egress, OrgId, Revision, SandboxId, SecretId, WrongHost};

/// An organization; created implicitly with its first API key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrgRecord {
    /// Organization name (its id).
    pub name: OrgId,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// An API key; only the SHA-256 of the key is stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public key id (part of the key string).
    pub id: String,
    /// Owning organization.
    pub org: OrgId,
    /// Granted permissions.
    pub permissions: Vec<Permission>,
    /// Hex SHA-256 of the full key.
    pub hash: String,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// A secret: metadata plus its sealed value.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretRecord {
    /// Globally unique id.
    pub id: SecretId,
    /// Owning organization.
    pub org: OrgId,
    /// Name, unique per organization.
    pub name: String,
    /// Optional description.
    pub description: Option<String>,
    /// Normalised host patterns; empty = unrestricted.
    pub hosts: Vec<String>,
    /// Placeholder token, unique across the store, never changes.
    pub placeholder: String,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
    /// Last update time, ms since the epoch.
    pub updated_at: i64,
    /// Revision, bumped on every change of the secret; part of the ciphertext binding.
    pub revision: Revision,
    /// The sealed value.
    pub sealed: Sealed,
    /// Whether placeholders in request bodies are replaced too (issue 6; records written
    /// before the field existed load as `false`).
    #[serde(default)]
    pub body_substitution: bool,
    /// What the agent does with the placeholder towards a host the secret does not allow.
    #[serde(default)]
    pub wrong_host: WrongHost,
    /// Values this secret had before, newest first, kept for `rotated_value_grace` so that
    /// agents scrub them too (see [`crate::grace`]); never shown by the API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous: Vec<PreviousValue>,
}

/// A value a secret no longer has, still scrubbed during the grace period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousValue {
    /// The revision it was sealed under (its ciphertext binding; unique within the secret).
    pub revision: Revision,
    /// The sealed value.
    pub sealed: Sealed,
    /// When it stopped being the secret's value, ms since the epoch; the grace counts from here.
    pub replaced_at: i64,
}

/// A deleted secret whose last values are still scrubbed, in every sandbox of its
/// organization, during the grace period; its placeholder is never honoured again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneRecord {
    /// The deleted secret's id.
    pub id: SecretId,
    /// Its organization.
    pub org: OrgId,
    /// Its name (for messages; a new secret may take it at once).
    pub name: String,
    /// Its placeholder.
    pub placeholder: String,
    /// Its host patterns: connections to them stay intercepted so responses are scrubbed.
    pub hosts: Vec<String>,
    /// The secret's last revision + 1: agents acknowledge the deletion like a change.
    pub revision: Revision,
    /// When the secret was deleted, ms since the epoch.
    pub deleted_at: i64,
    /// Its last value (replaced at `deleted_at`), then its previous ones; newest first.
    pub values: Vec<PreviousValue>,
}

/// One sealed value with the record binding it was sealed under (for rekey).
#[derive(Clone, Copy, Debug)]
pub struct SealedRef<'a> {
    /// Owning organization.
    pub org: &'a OrgId,
    /// Secret id.
    pub secret_id: &'a SecretId,
    /// The revision it was sealed under.
    pub revision: Revision,
    /// The sealed value.
    pub sealed: &'a Sealed,
}

/// What a grace sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Secrets and tombstones that lost values (tombstones possibly removed), by id.
    pub changed: Vec<SecretId>,
    /// Values dropped.
    pub dropped: usize,
    /// The oldest `replaced_at` still kept, if any value is (the next sweep is due one grace
    /// period after it).
    pub oldest_kept: Option<i64>,
}

/// Placeholder occurrences, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCounts {
    /// Replaced by the value.
    pub substituted: u64,
    /// Left alone: the secret does not allow the host.
    pub wrong_host: u64,
    /// Left alone: Host / :authority differed from the SNI.
    pub host_mismatch: u64,
    /// Refused: the secret blocks hosts it does not allow.
    pub blocked: u64,
}

impl UsageCounts {
    /// Adds `other` (saturating: counters never wrap).
    pub fn add(&mut self, other: &UsageCounts) {
        self.substituted = self.substituted.saturating_add(other.substituted);
        self.wrong_host = self.wrong_host.saturating_add(other.wrong_host);
        self.host_mismatch = self.host_mismatch.saturating_add(other.host_mismatch);
        self.blocked = self.blocked.saturating_add(other.blocked);
    }

    /// Whether every count is zero.
    pub fn is_zero(&self) -> bool {
        *self == UsageCounts::default()
    }
}

/// One host's share of a secret's usage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUsage {
    /// Counts since the secret was created.
    pub counts: UsageCounts,
    /// Last time the value was substituted towards this host, ms since the epoch.
    pub last_used_at: Option<i64>,
    /// Last time the placeholder was seen towards this host (any outcome).
    pub last_seen_at: Option<i64>,
}

/// What agents reported about one secret's use, kept beside (not in) the secret record so
/// usage never bumps its revision or `updatedAt`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretUsage {
    /// Last time the value was substituted anywhere, ms since the epoch.
    pub last_used_at: Option<i64>,
    /// Per host (the connection's SNI); at most [`MAX_USAGE_HOSTS`] entries, further hosts are
    /// counted under [`OTHER_HOSTS`].
    pub hosts: std::collections::BTreeMap<String, HostUsage>,
}

/// Most hosts tracked per secret: a sandbox choosing SNIs must not grow a record without bound.
pub const MAX_USAGE_HOSTS: usize = 256;
/// The bucket for hosts beyond [`MAX_USAGE_HOSTS`].
pub const OTHER_HOSTS: &str = "(other hosts)";

impl SecretUsage {
    /// Adds `counts` seen towards `host` at `at`.
    pub fn add(&mut self, host: &str, counts: &UsageCounts, at: i64) {
        let key = if self.hosts.contains_key(host) || self.hosts.len() < MAX_USAGE_HOSTS {
            host
        } else {
            OTHER_HOSTS
        };
        let entry = self.hosts.entry(key.to_owned()).or_default();
        entry.counts.add(counts);
        entry.last_seen_at = entry.last_seen_at.max(Some(at));
        if counts.substituted > 0 {
            entry.last_used_at = entry.last_used_at.max(Some(at));
            self.last_used_at = self.last_used_at.max(Some(at));
        }
    }
}

/// Usage an agent reported for one (secret, sandbox, host) over one report interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageDelta {
    /// Secret id.
    pub secret_id: SecretId,
    /// Sandbox id.
    pub sandbox: SandboxId,
    /// The connection's SNI.
    pub host: String,
    /// What to add (all zero: nothing is counted, only the audit entry is written).
    pub counts: UsageCounts,
    /// When, ms since the epoch.
    pub at: i64,
}

/// One environment variable of a sandbox bound to a secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Environment variable name.
    pub env: String,
    /// The secret's id (a deleted and recreated name does not silently re-attach).
    pub secret_id: SecretId,
    /// The secret's name at mount time.
    pub secret_name: String,
}

/// A registered sandbox: declared (secrets, egress) and, once bound, placed (cgroup, netns).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox id, unique across organizations.
    pub id: SandboxId,
    /// Owning organization.
    pub org: OrgId,
    /// cgroup v2 path relative to the cgroup2 root (no leading `/`); empty while unbound.
    pub cgroup: String,
    /// Network namespace path, if the sandbox has its own.
    pub netns: Option<String>,
    /// Whether the sandbox is bound to its cgroup (only bound sandboxes reach agents). Records
    /// written before declarations existed were all bound.
    #[serde(default = "bound_by_default", skip_serializing_if = "is_true")]
    pub bound: bool,
    /// Keep the declaration when the sandbox is unbound (a restarted container binds again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
    /// The id (inode) of the cgroup2 directory it was bound to through an agent; `None` for a
    /// one-step PUT (bound by path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Mounted secrets.
    pub mounts: Vec<Mount>,
    /// Where the agent opens its upstream connections (records written before the field
    /// existed: inside its own netns).
    #[serde(default)]
    pub egress: Egress,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
    /// Last update time, ms since the epoch.
    pub updated_at: i64,
    /// The fleet host whose agents enforce it; `None` = the agents on control's local socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

fn bound_by_default() -> bool {
    true
}

// Serde's skip_serializing_if takes a reference: a bound record is written exactly as before
// declarations existed.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_true(b: &bool) -> bool {
    *b
}

impl SandboxRecord {
    /// The cgroup it holds in the one-sandbox-per-cgroup index: none while unbound.
    pub fn indexed_cgroup(&self) -> Option<&str> {
        self.bound.then_some(self.cgroup.as_str())
    }
}

/// An audit entry; values never appear in it (masked as `***`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, assigned by the store (monotonic).
    #[serde(default)]
    pub seq: u64,
    /// Time, ms since the epoch.
    pub time: i64,
    /// Actor: API key id, or `local-admin` for host administration.
    pub actor: String,
    /// Organization the change happened in.
    pub org: String,
    /// Action, like `secret.create`.
    pub action: String,
    /// Target kind: `secret`, `apikey`, `sandbox`.
    pub target_type: String,
    /// Target id.
    pub target_id: String,
    /// Target name, where it has one.
    pub target_name: Option<String>,
    /// Changed fields: `{field: {"from": …, "to": …}}`, values as `***`.
    pub changes: serde_json::Value,
}

/// Emits a committed audit entry as a tracing event (`veil::audit`).
pub(crate) fn emit_audit(a: &AuditRecord) {
    tracing::info!(
        target: "veil::audit",
        seq = a.seq,
        actor = %a.actor,
        org = %a.org,
        action = %a.action,
        target_type = %a.target_type,
        target_id = %a.target_id,
        changes = %a.changes,
        "audit"
    );
}

/// A request for one page of secrets.
#[derive(Clone, Copy, Debug)]
pub struct SecretPageQuery<'a> {
    /// Sort field.
    pub sort: SortField,
    /// Direction.
    pub order: Order,
    /// Continue strictly after this position.
    pub after: Option<&'a Cursor>,
    /// Page size.
    pub limit: usize,
    /// Lower-cased partial name filter.
    pub name_contains: Option<&'a str>,
}

/// One page of secrets.
#[derive(Debug)]
pub struct SecretPage {
    /// The page.
    pub items: Vec<SecretRecord>,
    /// How many secrets match overall.
    pub total: usize,
    /// Whether more follow.
    pub more: bool,
}

/// Direction of an audit page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Asc,
    /// Newest first.
    Desc,
}

/// A read-modify-write step for a secret: the new record and its audit entry.
pub type SecretChange<'a> =
    &'a mut dyn FnMut(&SecretRecord) -> Result<(SecretRecord, AuditRecord), StoreError>;
/// The deletion step for a secret: its audit entry, and the tombstone to keep (none when the
/// grace period is off).
pub type SecretDeletion<'a> =
    &'a mut dyn FnMut(&SecretRecord) -> (AuditRecord, Option<TombstoneRecord>);
/// A read-modify-write step for a sandbox: the new record and its audit entry.
pub type SandboxChange<'a> =
    &'a mut dyn FnMut(&SandboxRecord) -> Result<(SandboxRecord, AuditRecord), StoreError>;

/// The storage interface; implementations make each write durable before returning.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The key coordination of a store other veil-control replicas use at the same time
    /// (PostgreSQL); none for a store of one replica.
    fn shared_keys(&self) -> Option<&dyn shared_keys::SharedKeys> {
        None
    }
    /// The fleet's CA and hosts (PostgreSQL only); none for a store of one replica.
    fn fleet(&self) -> Option<&dyn fleet::FleetStore> {
        None
    }
    /// Stores a new API key, creating its organization if new.
    fn create_api_key(&self, key: &ApiKeyRecord, audit: AuditRecord) -> Result<(), StoreError>;
    /// Looks up an API key by id.
    fn api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Every API key.
    fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Deletes an API key.
    fn revoke_api_key(&self, id: &str, audit: AuditRecord) -> Result<ApiKeyRecord, StoreError>;
    /// Every organization.
    fn list_orgs(&self) -> Result<Vec<OrgRecord>, StoreError>;

    /// Inserts a secret; `Conflict` if the name exists in its org or the placeholder anywhere.
    fn insert_secret(&self, secret: &SecretRecord, audit: AuditRecord) -> Result<(), StoreError>;
    /// A secret of `org` by id.
    fn secret(&self, org: &OrgId, id: &SecretId) -> Result<Option<SecretRecord>, StoreError>;
    /// Every secret of `org`.
    fn list_secrets(&self, org: &OrgId) -> Result<Vec<SecretRecord>, StoreError>;
    /// A secret of `org` by name.
    fn secret_by_name(&self, org: &OrgId, name: &str) -> Result<Option<SecretRecord>, StoreError>;
    /// One keyset page of `org`'s secrets.
    fn page_secrets(&self, org: &OrgId, q: &SecretPageQuery<'_>) -> Result<SecretPage, StoreError>;
    /// Read-modify-write of one secret; `change` returns the new record and its audit entry.
    fn update_secret(
        &self,
        org: &OrgId,
        id: &SecretId,
        change: SecretChange<'_>,
    ) -> Result<SecretRecord, StoreError>;
    /// Deletes a secret and, in the same transaction, stores the tombstone `deletion` returns.
    fn delete_secret(
        &self,
        org: &OrgId,
        id: &SecretId,
        deletion: SecretDeletion<'_>,
    ) -> Result<SecretRecord, StoreError>;
    /// Re-seals every value (current, previous, tombstoned) whose key is not `active_key`
    /// (rekey); each record is rewritten atomically. Returns how many records changed.
    fn reseal_all(
        &self,
        active_key: &str,
        reseal: &mut dyn FnMut(SealedRef<'_>) -> Result<Sealed, StoreError>,
    ) -> Result<usize, StoreError>;
    /// Ids of keys referenced by any sealed value, tombstones included.
    fn key_ids_in_use(&self) -> Result<Vec<String>, StoreError>;
    /// Every secret of every organization (for verification tools).
    fn all_secrets(&self) -> Result<Vec<SecretRecord>, StoreError>;
    /// Every tombstone (deleted secrets inside their grace period).
    fn tombstones(&self) -> Result<Vec<TombstoneRecord>, StoreError>;
    /// Drops every previous and tombstoned value replaced at or before `cutoff` (ms since the
    /// epoch), and tombstones left without values; each record changes atomically, and a
    /// concurrent write is never overwritten.
    fn sweep_grace(&self, cutoff: i64) -> Result<Swept, StoreError>;
    /// Cross-checks records against their indexes; returns every inconsistency found.
    fn check_consistency(&self) -> Result<Vec<String>, StoreError>;

    /// Creates or replaces a sandbox; `NotFound` if the id belongs to another org, `Conflict`
    /// if another sandbox holds the cgroup.
    fn put_sandbox(&self, sandbox: &SandboxRecord, audit: AuditRecord) -> Result<bool, StoreError>;
    /// Every registered sandbox (for the agent link's snapshot).
    fn list_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError>;
    /// A sandbox by id (any org; the caller checks ownership).
    fn sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError>;
    /// Replaces a sandbox's mounts (read-modify-write).
    fn update_sandbox(
        &self,
        org: &OrgId,
        id: &SandboxId,
        change: SandboxChange<'_>,
    ) -> Result<SandboxRecord, StoreError>;
    /// Deletes a sandbox of `org`.
    fn delete_sandbox(
        &self,
        org: &OrgId,
        id: &SandboxId,
        audit: AuditRecord,
    ) -> Result<(), StoreError>;
    /// Undoes a sandbox write the agents refused: if the stored record still equals `written`,
    /// puts `previous` back (or removes the sandbox when there was none) and returns true; if
    /// another change came in between, leaves it and returns false.
    fn restore_sandbox(
        &self,
        written: &SandboxRecord,
        previous: Option<&SandboxRecord>,
        audit: AuditRecord,
    ) -> Result<bool, StoreError>;

    /// Adds agent-reported usage to each secret's [`SecretUsage`] and writes the audit entries
    /// `audit` builds for them, in one durable transaction. Deltas naming a secret that no
    /// longer exists are skipped. Returns how many deltas were recorded.
    fn record_usage(
        &self,
        deltas: &[UsageDelta],
        audit: &mut dyn FnMut(&SecretRecord, &UsageDelta) -> Option<AuditRecord>,
    ) -> Result<usize, StoreError>;
    /// What agents reported about a secret's use (empty when nothing was reported).
    fn secret_usage(&self, id: &SecretId) -> Result<SecretUsage, StoreError>;

    /// A page of `org`'s audit entries after the cursor sequence, in `dir` order.
    fn audit_page(
        &self,
        org: &OrgId,
        after: Option<u64>,
        limit: usize,
        dir: Direction,
    ) -> Result<(Vec<AuditRecord>, usize), StoreError>;
}
