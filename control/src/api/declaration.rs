//! What a sandbox is declared with (its mounted secrets, egress, keep), checked and turned
//! into the record PUT and POST store, and the ids POST generates.

use serde_json::{Value, json};
use veil_api::{MountList, SandboxId};

use super::audit::entry;
use super::error::ApiError;
use super::state::{AppState, Caller};
use crate::store::{Egress, Mount, OrgId, SandboxRecord, StoreError};
use crate::timefmt::now_ms;
use crate::validate;

fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("sandbox {id} not found"))
}

/// Checks `secrets: [{ENV: secret-name}, …]` and turns it into (env, secret name) pairs.
pub(super) fn parse_mount_list(items: MountList) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(items.len());
    for (i, obj) in items.into_iter().enumerate() {
        if obj.len() != 1 {
            return Err(bad(format!("secrets[{i}] must have exactly one key")));
        }
        let Some((env, name)) = obj.into_iter().next() else {
            return Err(bad(format!("secrets[{i}] must have exactly one key")));
        };
        validate::env_name(&env).map_err(bad)?;
        validate::secret_name(&name).map_err(|e| bad(format!("secrets[{i}].{env}: {e}")))?;
        if out.iter().any(|(e, _)| *e == env) {
            return Err(bad(format!("environment variable {env} is mounted twice")));
        }
        out.push((env, name));
    }
    Ok(out)
}

/// Resolves secret names of `org` into mounts; unknown names are a 400 naming them all.
pub(super) fn resolve(
    state: &AppState,
    org: &OrgId,
    wanted: &[(String, String)],
) -> Result<Vec<Mount>, ApiError> {
    let mut mounts = Vec::with_capacity(wanted.len());
    let mut unknown = Vec::new();
    for (env, name) in wanted {
        match state
            .store
            .secret_by_name(org, name)
            .map_err(|e| ApiError::from_store(e, "secret"))?
        {
            Some(s) => mounts.push(Mount {
                env: env.clone(),
                secret_id: s.id,
                secret_name: s.name,
            }),
            None => unknown.push(name.as_str()),
        }
    }
    if !unknown.is_empty() {
        return Err(bad(format!("unknown secret(s): {}", unknown.join(", "))));
    }
    Ok(mounts)
}

/// The mounts as the audit shows them (names and ids, never a value).
pub(super) fn mounts_json(mounts: &[Mount]) -> Value {
    Value::Array(
        mounts
            .iter()
            .map(|m| json!({"env": m.env, "secret": m.secret_name, "secretId": m.secret_id}))
            .collect(),
    )
}

/// What a sandbox is declared with: its secrets, egress, keep and fleet host, checked.
pub(super) struct Declaration {
    wanted: Vec<(String, String)>,
    egress: Egress,
    keep: bool,
    host: Option<String>,
}

impl Declaration {
    pub(super) fn parse(
        secrets: Option<MountList>,
        egress: Option<String>,
        keep: Option<bool>,
        host: Option<String>,
    ) -> Result<Self, ApiError> {
        // Omitted (or null) = the default, as every other field of this full replacement.
        let egress = match egress {
            Some(text) => validate::egress(&text)?,
            None => Egress::default(),
        };
        Ok(Self {
            wanted: parse_mount_list(secrets.unwrap_or_default())?,
            egress,
            keep: keep.unwrap_or(false),
            host,
        })
    }

    /// The fleet host the sandbox is declared for (`None`: this control's own host).
    pub(super) fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// The record to store: placed at `placement` (one-step PUT), or declared keeping the
    /// binding `previous` has (a declaration never silently unbinds).
    pub(super) fn record(
        &self,
        st: &AppState,
        caller: &Caller,
        id: &SandboxId,
        previous: Option<&SandboxRecord>,
        placement: Option<(String, Option<String>)>,
    ) -> Result<SandboxRecord, ApiError> {
        let now = now_ms();
        let mounts = resolve(st, &caller.org, &self.wanted)?;
        let (cgroup, netns, bound, cgroup_id) = match (placement, previous) {
            (Some((cgroup, netns)), _) => (cgroup, netns, true, None),
            (None, Some(p)) if p.bound => (p.cgroup.clone(), p.netns.clone(), true, p.cgroup_id),
            (None, _) => (String::new(), None, false, None),
        };
        Ok(SandboxRecord {
            egress: self.egress,
            id: id.clone(),
            org: caller.org.clone(),
            cgroup,
            netns,
            bound,
            keep: self.keep,
            cgroup_id,
            mounts,
            created_at: previous.map_or(now, |p| p.created_at),
            updated_at: now,
            host: self.host.clone(),
        })
    }
}

/// Stores a PUT or POST record with its `sandbox.put` audit entry.
pub(super) fn store_put(
    st: &AppState,
    caller: &Caller,
    record: &SandboxRecord,
) -> Result<(), ApiError> {
    let audit = entry(
        caller,
        "sandbox.put",
        "sandbox",
        &record.id,
        None,
        json!({
            "cgroup": {"to": record.cgroup},
            "netns": {"to": record.netns},
            "bound": {"to": record.bound},
            "keep": {"to": record.keep},
            "egress": {"to": validate::egress_name(record.egress)},
            "secrets": {"to": mounts_json(&record.mounts)},
        }),
    );
    st.store.put_sandbox(record, audit).map_err(|e| match e {
        StoreError::NotFound => not_found(record.id.as_str()),
        e => ApiError::from_store(e, "sandbox"),
    })?;
    Ok(())
}

/// A fresh sandbox id: 128 random bits as a UUIDv4 (unguessable, so a declared sandbox's id
/// is no handle for anyone who was not told it).
pub(super) fn generated_id() -> SandboxId {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    let text = format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    );
    // 36 characters of hex digits and '-', starting with a hex digit: always a valid id.
    SandboxId::parse(text).unwrap_or_else(|e| unreachable!("generated sandbox id: {e}"))
}
