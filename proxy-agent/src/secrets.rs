//! Secrets as control sent them, in memory only, and each sandbox's mounts.
//!
//! Never written to disk and never logged: values live in [`SecretValue`]s (zeroized on drop,
//! redacted in Debug). The interception path asks [`SecretStore::for_sandbox`] which
//! placeholders, values and hosts apply to one sandbox; a mount naming a secret of another
//! organization, or one control has not sent, resolves to nothing.
//!
//! Each sandbox's [`SandboxPolicy`] is rebuilt here whenever its mounts or one of its secrets
//! change, never per request: a request reads it once ([`SecretStore::policy`]) and keeps that
//! `Arc` until its response ends. A sandbox whose secrets cannot form a policy (overlapping
//! placeholders, say) gets none, so its traffic passes through untouched: fail closed.
//!
//! A retired secret (deleted, inside control's grace period) applies to every sandbox of its
//! organization, mounted or not: its values are scrubbed there, its placeholder is never
//! substituted. Rotated-out values come with their secret and are scrubbed wherever it is.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tracing::warn;
use veil_link::{OrgId, Revision, SandboxId, SandboxState, SecretId, SecretState, SecretValue};
use veil_policy::{ModeOverrides, SandboxPolicy};

/// One secret as it applies to one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedSecret {
    /// The environment variable that holds the placeholder in the sandbox.
    pub env: String,
    /// Secret id.
    pub secret_id: SecretId,
    /// The placeholder the sandbox sends.
    pub placeholder: String,
    /// Allowed host patterns; empty = unrestricted.
    pub hosts: Vec<String>,
    /// The plaintext.
    pub value: SecretValue,
    /// The secret's revision.
    pub revision: Revision,
}

#[derive(Debug)]
struct Mounts {
    org: OrgId,
    env_to_secret: BTreeMap<String, SecretId>,
}

#[derive(Debug, Default)]
struct Inner {
    secrets: BTreeMap<SecretId, SecretState>,
    sandboxes: BTreeMap<SandboxId, Mounts>,
    policies: BTreeMap<SandboxId, Arc<SandboxPolicy>>,
    /// The agent-wide modes every policy is built with.
    overrides: ModeOverrides,
}

/// The policy form of `states`; a secret that cannot take part is left out (never substituted)
/// and the others still apply.
fn policy_secrets<'a>(
    sandbox: &SandboxId,
    states: impl Iterator<Item = &'a SecretState>,
) -> Vec<veil_policy::MountedSecret> {
    states
        .filter_map(|s| match veil_policy::MountedSecret::from_state(s) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(%sandbox, error = %e, "secret left out of the sandbox's policy");
                None
            }
        })
        .collect()
}

impl Inner {
    /// Rebuilds the policy of `sandbox` from its resolved mounts and its organization's retired
    /// secrets.
    fn rebuild(&mut self, sandbox: &SandboxId) {
        self.policies.remove(sandbox);
        let Some(mounts) = self.sandboxes.get(sandbox) else {
            return;
        };
        let mounted = mounts
            .env_to_secret
            .values()
            .filter_map(|id| self.secrets.get(id))
            .filter(|s| s.org == mounts.org);
        let live = policy_secrets(sandbox, mounted);
        // The organization's retired secrets this sandbox did not mount: scrubbed, but they
        // widen nothing (a mounted one came with `live` and keeps its hosts intercepted).
        let retired = self.secrets.values().filter(|s| {
            s.retired && s.org == mounts.org && !mounts.env_to_secret.values().any(|id| *id == s.id)
        });
        let retired = policy_secrets(sandbox, retired);
        if live.is_empty() && retired.is_empty() {
            return;
        }
        let n_retired = retired.len();
        let policy = match SandboxPolicy::build(live.clone(), retired, self.overrides) {
            // A retired secret must never cost the live ones their policy: without it, its
            // values are not scrubbed, but the sandbox keeps working (and without any policy
            // they would not be scrubbed either).
            Err(e) if n_retired > 0 => {
                warn!(%sandbox, error = %e, "retired secrets left out of the sandbox's policy");
                SandboxPolicy::build(live, Vec::new(), self.overrides)
            }
            other => other,
        };
        match policy {
            Ok(p) if p.scrubs() => {
                self.policies.insert(sandbox.clone(), Arc::new(p));
            }
            Ok(_) => {}
            Err(e) => {
                warn!(%sandbox, error = %e, "no policy for the sandbox: nothing is substituted")
            }
        }
    }

    /// Rebuilds the policies of every sandbox `secret` applies to: those that mount it, and
    /// when it is retired (or was), every sandbox of its organization.
    fn rebuild_for(&mut self, secret_id: &str, org_wide: Option<&OrgId>) {
        let ids: Vec<SandboxId> = self
            .sandboxes
            .iter()
            .filter(|(_, m)| {
                org_wide == Some(&m.org) || m.env_to_secret.values().any(|s| s == secret_id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.rebuild(&id);
        }
    }
}

/// The agent's in-memory secrets and mounts; cheap to clone, shared with connection tasks.
#[derive(Debug, Clone, Default)]
pub struct SecretStore {
    inner: Arc<RwLock<Inner>>,
    /// Bumped on every change, so long-lived readers (a streaming response's scrubber) can
    /// notice a new policy without taking the lock.
    generation: Arc<AtomicU64>,
}

impl SecretStore {
    /// An empty store whose policies are built under the agent-wide `overrides`.
    pub fn with_overrides(overrides: ModeOverrides) -> Self {
        let store = Self::default();
        store.write().overrides = overrides;
        store
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated (each update is
        // one insert or remove), so the data stays usable.
        let guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
        // Bumped while the write lock is held: a reader that saw the new generation and then
        // takes the read lock sees the new maps.
        self.generation.fetch_add(1, Ordering::Release);
        guard
    }

    /// A number that changes whenever any secret, mount or policy may have changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces everything (control's snapshot).
    pub fn replace(&self, sandboxes: &[SandboxState], secrets: Vec<SecretState>) {
        let mut inner = self.write();
        inner.secrets = secrets.into_iter().map(|s| (s.id.clone(), s)).collect();
        inner.sandboxes = sandboxes
            .iter()
            .map(|s| (s.id.clone(), mounts_of(s)))
            .collect();
        inner.policies.clear();
        let ids: Vec<SandboxId> = inner.sandboxes.keys().cloned().collect();
        for id in ids {
            inner.rebuild(&id);
        }
    }

    /// Sets one sandbox's mounts.
    pub fn put_sandbox(&self, sandbox: &SandboxState) {
        let mut inner = self.write();
        inner
            .sandboxes
            .insert(sandbox.id.clone(), mounts_of(sandbox));
        inner.rebuild(&sandbox.id);
    }

    /// Forgets one sandbox's mounts.
    pub fn delete_sandbox(&self, id: &str) {
        let mut inner = self.write();
        inner.sandboxes.remove(id);
        inner.policies.remove(id);
    }

    /// Adds or replaces a secret (the values it replaces are zeroized as they drop).
    pub fn put_secret(&self, secret: SecretState) {
        let mut inner = self.write();
        let id = secret.id.clone();
        let org = secret.org.clone();
        let retired = secret.retired;
        let was_retired = inner
            .secrets
            .insert(id.clone(), secret)
            .is_some_and(|s| s.retired);
        inner.rebuild_for(id.as_str(), (retired || was_retired).then_some(&org));
    }

    /// Forgets a secret (its values are zeroized as they drop).
    pub fn delete_secret(&self, id: &str) {
        let mut inner = self.write();
        let gone = inner.secrets.remove(id);
        let org = gone.as_ref().filter(|s| s.retired).map(|s| s.org.clone());
        inner.rebuild_for(id, org.as_ref());
    }

    /// The current policy of `sandbox`; `None` when no usable secret is mounted in it.
    pub fn policy(&self, sandbox: &str) -> Option<Arc<SandboxPolicy>> {
        self.read().policies.get(sandbox).cloned()
    }

    /// Whether any secret applies to `sandbox`: one is mounted (usable or not), or a policy
    /// exists (a retired secret of its organization still scrubbed there). `None` when the
    /// sandbox is unknown here.
    pub fn secrets_apply(&self, sandbox: &str) -> Option<bool> {
        let inner = self.read();
        let mounts = inner.sandboxes.get(sandbox)?;
        Some(!mounts.env_to_secret.is_empty() || inner.policies.contains_key(sandbox))
    }

    /// Number of secrets held (retired ones included).
    pub fn len(&self) -> usize {
        self.read().secrets.len()
    }

    /// Whether no secret is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The secrets mounted in `sandbox` that resolve (same organization, value present, not
    /// retired), ordered by environment variable.
    pub fn for_sandbox(&self, sandbox: &str) -> Vec<MountedSecret> {
        let inner = self.read();
        let Some(mounts) = inner.sandboxes.get(sandbox) else {
            return Vec::new();
        };
        mounts
            .env_to_secret
            .iter()
            .filter_map(|(env, secret_id)| {
                let s = inner.secrets.get(secret_id)?;
                (s.org == mounts.org && !s.retired).then(|| MountedSecret {
                    env: env.clone(),
                    secret_id: secret_id.clone(),
                    placeholder: s.placeholder.clone(),
                    hosts: s.hosts.clone(),
                    value: s.value.clone(),
                    revision: s.revision,
                })
            })
            .collect()
    }
}

fn mounts_of(s: &SandboxState) -> Mounts {
    Mounts {
        org: s.org.clone(),
        env_to_secret: s.mounts.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, org: &str, mounts: &[(&str, &str)]) -> SandboxState {
        SandboxState {
            egress: Default::default(),
            cgroup_id: None,
            id: id.parse().unwrap(),
            org: org.parse().unwrap(),
            cgroup: "x".into(),
            netns: None,
            mounts: mounts
                .iter()
                .map(|(e, s)| ((*e).to_owned(), s.parse().unwrap()))
                .collect(),
        }
    }

    fn secret(id: &str, org: &str, value: &str) -> SecretState {
        SecretState {
            previous: Vec::new(),
            retired: false,
            id: id.parse().unwrap(),
            org: org.parse().unwrap(),
            name: format!("name-{id}"),
            placeholder: format!("veil-ph-{id}"),
            hosts: vec!["api.example.com".into()],
            value: SecretValue::new(value.into()),
            revision: Revision(1),
            body_substitution: false,
            wrong_host: Default::default(),
        }
    }

    #[test]
    fn resolves_mounts_per_sandbox_and_org() {
        let store = SecretStore::default();
        store.replace(
            &[
                sandbox("a", "o1", &[("KEY", "s1"), ("OTHER", "s2"), ("GONE", "s9")]),
                sandbox("b", "o2", &[("KEY", "s1")]),
            ],
            vec![secret("s1", "o1", "v1"), secret("s2", "o1", "v2")],
        );
        let a = store.for_sandbox("a");
        let envs: Vec<&str> = a.iter().map(|m| m.env.as_str()).collect();
        assert_eq!(envs, ["KEY", "OTHER"]);
        assert_eq!(a[0].value.expose(), "v1");
        assert_eq!(a[0].placeholder, "veil-ph-s1");
        // Another organization's sandbox mounting s1 gets nothing.
        assert!(store.for_sandbox("b").is_empty());
        assert!(store.for_sandbox("nope").is_empty());

        store.put_secret(secret("s1", "o1", "v1b"));
        assert_eq!(store.for_sandbox("a")[0].value.expose(), "v1b");
        store.delete_secret("s1");
        assert_eq!(store.for_sandbox("a").len(), 1);
        store.put_sandbox(&sandbox("a", "o1", &[]));
        assert!(store.for_sandbox("a").is_empty());
        store.delete_sandbox("a");
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn policies_follow_mounts_and_secrets() {
        let store = SecretStore::default();
        store.replace(
            &[
                sandbox("a", "o1", &[("KEY", "s1")]),
                sandbox("b", "o2", &[("KEY", "s1")]),
            ],
            vec![secret("s1", "o1", "v1")],
        );
        let p = store.policy("a").unwrap();
        assert_eq!(p.secrets()[0].value.expose(), "v1");
        assert!(store.policy("b").is_none(), "another org's secret applied");
        // Unchanged: connections keep the policy they read; the same one is served.
        assert!(Arc::ptr_eq(&p, &store.policy("a").unwrap()));
        store.put_secret(secret("s1", "o1", "v2"));
        let p2 = store.policy("a").unwrap();
        assert_eq!(p2.secrets()[0].value.expose(), "v2");
        assert_eq!(p.secrets()[0].value.expose(), "v1");
        store.put_sandbox(&sandbox("a", "o1", &[]));
        assert!(store.policy("a").is_none());
        store.put_sandbox(&sandbox("a", "o1", &[("KEY", "s1")]));
        assert!(store.policy("a").is_some());
        store.delete_secret("s1");
        assert!(store.policy("a").is_none());
        // Overlapping placeholders: no policy at all (nothing substituted).
        let mut s2 = secret("s2", "o1", "v");
        s2.placeholder = "veil-ph-s1-longer".into();
        store.put_secret(secret("s1", "o1", "v1"));
        store.put_secret(s2);
        store.put_sandbox(&sandbox("a", "o1", &[("KEY", "s1"), ("K2", "s2")]));
        assert!(store.policy("a").is_none());
        store.delete_sandbox("a");
        assert!(store.policy("a").is_none());
    }

    fn scrubbed(store: &SecretStore, sandbox: &str, text: &str) -> Option<String> {
        let p = store.policy(sandbox)?;
        let out = p.scrub_patterns().scrub_all(text.as_bytes());
        Some(out.map_or_else(|| text.to_owned(), |o| String::from_utf8(o).unwrap()))
    }

    #[test]
    fn rotated_out_values_are_scrubbed_where_the_secret_is_mounted() {
        let store = SecretStore::default();
        let mut s1 = secret("s1", "o1", "value-now-0001");
        s1.previous = vec![SecretValue::new("value-old-0001".into())];
        store.replace(&[sandbox("a", "o1", &[("KEY", "s1")])], vec![s1]);
        assert_eq!(
            scrubbed(&store, "a", "value-old-0001 value-now-0001").as_deref(),
            Some("veil-ph-s1 veil-ph-s1")
        );
        // The sweep's PutSecret without it: no longer known.
        store.put_secret(secret("s1", "o1", "value-now-0001"));
        assert_eq!(
            scrubbed(&store, "a", "value-old-0001").as_deref(),
            Some("value-old-0001")
        );
    }

    #[test]
    fn retired_secrets_apply_to_every_sandbox_of_their_org_scrub_only() {
        let store = SecretStore::default();
        store.replace(
            &[
                sandbox("a", "o1", &[("KEY", "s1")]),
                sandbox("b", "o1", &[]),
                sandbox("c", "o2", &[]),
            ],
            vec![secret("s1", "o1", "live-value-0001")],
        );
        assert!(store.policy("b").is_none() && store.policy("c").is_none());
        let mut gone = secret("s9", "o1", "deleted-value-09");
        gone.retired = true;
        gone.previous = vec![SecretValue::new("deleted-older-09".into())];
        store.put_secret(gone.clone());
        let text = "deleted-value-09 deleted-older-09 live-value-0001";
        // Mounted or not, every sandbox of o1 scrubs it; o2's does not know it.
        assert_eq!(
            scrubbed(&store, "a", text).as_deref(),
            Some("veil-ph-s9 veil-ph-s9 veil-ph-s1")
        );
        assert_eq!(
            scrubbed(&store, "b", text).as_deref(),
            Some("veil-ph-s9 veil-ph-s9 live-value-0001")
        );
        assert!(store.policy("c").is_none());
        let b = store.policy("b").unwrap();
        assert!(
            b.secrets().is_empty(),
            "a retired placeholder is never substituted"
        );
        assert_eq!(b.retired().len(), 1);
        // A sandbox of o1 added later gets it too; a mount naming it resolves to nothing.
        store.put_sandbox(&sandbox("d", "o1", &[("OLD", "s9")]));
        assert_eq!(store.policy("d").unwrap().retired().len(), 1);
        assert!(store.for_sandbox("d").is_empty());
        // Its grace ends: gone everywhere.
        store.delete_secret("s9");
        assert!(store.policy("b").is_none() && store.policy("d").is_none());
        assert_eq!(
            scrubbed(&store, "a", text).as_deref(),
            Some("deleted-value-09 deleted-older-09 veil-ph-s1")
        );
        // A retired secret that cannot join the policy never costs the live ones theirs.
        let mut clash = gone;
        clash.placeholder = "veil-ph-s1-longer".into();
        store.put_secret(clash);
        let a = store.policy("a").unwrap();
        assert_eq!((a.secrets().len(), a.retired().len()), (1, 0));
        assert_eq!(store.policy("b").unwrap().retired().len(), 1);
    }

    #[test]
    fn secrets_apply_follows_mounts_and_retired_secrets() {
        let store = SecretStore::default();
        assert_eq!(store.secrets_apply("a"), None, "unknown");
        store.replace(
            &[sandbox("a", "o1", &[]), sandbox("b", "o1", &[("K", "s9")])],
            vec![],
        );
        assert_eq!(store.secrets_apply("a"), Some(false));
        // A mount whose secret has not arrived (or cannot be used) still counts.
        assert_eq!(store.secrets_apply("b"), Some(true));
        store.put_sandbox(&sandbox("a", "o1", &[("KEY", "s1")]));
        assert_eq!(store.secrets_apply("a"), Some(true));
        store.put_sandbox(&sandbox("a", "o1", &[]));
        assert_eq!(store.secrets_apply("a"), Some(false));
        // A retired secret of its organization is scrubbed there: not direct.
        let mut gone = secret("s8", "o1", "deleted-value-08");
        gone.retired = true;
        store.put_secret(gone);
        assert_eq!(store.secrets_apply("a"), Some(true));
        store.delete_secret("s8");
        assert_eq!(store.secrets_apply("a"), Some(false));
        store.delete_sandbox("a");
        assert_eq!(store.secrets_apply("a"), None);
    }

    #[test]
    fn debug_never_shows_values() {
        let store = SecretStore::default();
        store.replace(
            &[sandbox("a", "o1", &[("KEY", "s1")])],
            vec![secret("s1", "o1", "hunter2-plaintext")],
        );
        let shown = format!("{store:?} {:?}", store.for_sandbox("a"));
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
