//! Secrets as control sent them, in memory only, and each sandbox's mounts.
//!
//! Never written to disk and never logged: values live in [`SecretValue`]s (zeroized on drop,
//! redacted in Debug). The interception path asks [`SecretStore::for_sandbox`] which
//! placeholders, values and hosts apply to one sandbox; a mount naming a secret of another
//! organization, or one control has not sent, resolves to nothing.
//!
//! Each sandbox's [`SandboxPolicy`] is rebuilt here whenever its mounts or one of its secrets
//! change, never per connection: a connection reads it once ([`SecretStore::policy`]) and keeps
//! that `Arc` for its life. A sandbox whose secrets cannot form a policy (overlapping
//! placeholders, say) gets none, so its traffic passes through untouched: fail closed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tracing::warn;
use veil_link::{SandboxState, SecretState, SecretValue};
use veil_policy::SandboxPolicy;

/// One secret as it applies to one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedSecret {
    /// The environment variable that holds the placeholder in the sandbox.
    pub env: String,
    /// Secret id.
    pub secret_id: String,
    /// The placeholder the sandbox sends.
    pub placeholder: String,
    /// Allowed host patterns; empty = unrestricted.
    pub hosts: Vec<String>,
    /// The plaintext.
    pub value: SecretValue,
    /// The secret's revision.
    pub revision: u64,
}

#[derive(Debug, Default)]
struct Mounts {
    org: String,
    env_to_secret: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct Inner {
    secrets: BTreeMap<String, SecretState>,
    sandboxes: BTreeMap<String, Mounts>,
    policies: BTreeMap<String, Arc<SandboxPolicy>>,
}

impl Inner {
    /// Rebuilds the policy of `sandbox` from its resolved mounts.
    fn rebuild(&mut self, sandbox: &str) {
        self.policies.remove(sandbox);
        let Some(mounts) = self.sandboxes.get(sandbox) else {
            return;
        };
        let mut mounted = Vec::new();
        for secret_id in mounts.env_to_secret.values() {
            let Some(s) = self.secrets.get(secret_id) else {
                continue;
            };
            if s.org != mounts.org {
                continue;
            }
            match veil_policy::MountedSecret::from_state(s) {
                Ok(m) => mounted.push(m),
                // The secret is left out (never substituted); the others still apply.
                Err(e) => warn!(sandbox, error = %e, "secret left out of the sandbox's policy"),
            }
        }
        if mounted.is_empty() {
            return;
        }
        match SandboxPolicy::new(mounted) {
            Ok(p) => {
                self.policies.insert(sandbox.to_owned(), Arc::new(p));
            }
            Err(e) => {
                warn!(sandbox, error = %e, "no policy for the sandbox: nothing is substituted")
            }
        }
    }

    /// Rebuilds the policies of every sandbox that mounts `secret_id`.
    fn rebuild_mounting(&mut self, secret_id: &str) {
        let ids: Vec<String> = self
            .sandboxes
            .iter()
            .filter(|(_, m)| m.env_to_secret.values().any(|s| s == secret_id))
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
        let ids: Vec<String> = inner.sandboxes.keys().cloned().collect();
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

    /// Adds or replaces a secret.
    pub fn put_secret(&self, secret: SecretState) {
        let mut inner = self.write();
        let id = secret.id.clone();
        inner.secrets.insert(id.clone(), secret);
        inner.rebuild_mounting(&id);
    }

    /// Forgets a secret (its value is zeroized as it drops).
    pub fn delete_secret(&self, id: &str) {
        let mut inner = self.write();
        inner.secrets.remove(id);
        inner.rebuild_mounting(id);
    }

    /// The current policy of `sandbox`; `None` when no usable secret is mounted in it.
    pub fn policy(&self, sandbox: &str) -> Option<Arc<SandboxPolicy>> {
        self.read().policies.get(sandbox).cloned()
    }

    /// Number of secrets held.
    pub fn len(&self) -> usize {
        self.read().secrets.len()
    }

    /// Whether no secret is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The secrets mounted in `sandbox` that resolve (same organization, value present),
    /// ordered by environment variable.
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
                (s.org == mounts.org).then(|| MountedSecret {
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
            id: id.into(),
            org: org.into(),
            cgroup: "x".into(),
            netns: None,
            mounts: mounts
                .iter()
                .map(|(e, s)| ((*e).to_owned(), (*s).to_owned()))
                .collect(),
        }
    }

    fn secret(id: &str, org: &str, value: &str) -> SecretState {
        SecretState {
            previous: Vec::new(),
            retired: false,
            id: id.into(),
            org: org.into(),
            name: format!("name-{id}"),
            placeholder: format!("veil-ph-{id}"),
            hosts: vec!["api.example.com".into()],
            value: SecretValue::new(value.into()),
            revision: 1,
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
