//! Secrets as control sent them, in memory only, and each sandbox's mounts.
//!
//! Never written to disk and never logged: values live in [`SecretValue`]s (zeroized on drop,
//! redacted in Debug). The interception path asks [`SecretStore::for_sandbox`] which
//! placeholders, values and hosts apply to one sandbox; a mount naming a secret of another
//! organization, or one control has not sent, resolves to nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use veil_link::{SandboxState, SecretState, SecretValue};

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
}

/// The agent's in-memory secrets and mounts; cheap to clone, shared with connection tasks.
#[derive(Debug, Clone, Default)]
pub struct SecretStore {
    inner: Arc<RwLock<Inner>>,
}

impl SecretStore {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated (each update is
        // one insert or remove), so the data stays usable.
        self.inner.write().unwrap_or_else(|p| p.into_inner())
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
    }

    /// Sets one sandbox's mounts.
    pub fn put_sandbox(&self, sandbox: &SandboxState) {
        self.write()
            .sandboxes
            .insert(sandbox.id.clone(), mounts_of(sandbox));
    }

    /// Forgets one sandbox's mounts.
    pub fn delete_sandbox(&self, id: &str) {
        self.write().sandboxes.remove(id);
    }

    /// Adds or replaces a secret.
    pub fn put_secret(&self, secret: SecretState) {
        self.write().secrets.insert(secret.id.clone(), secret);
    }

    /// Forgets a secret (its value is zeroized as it drops).
    pub fn delete_secret(&self, id: &str) {
        self.write().secrets.remove(id);
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
            id: id.into(),
            org: org.into(),
            name: format!("name-{id}"),
            placeholder: format!("veil-ph-{id}"),
            hosts: vec!["api.example.com".into()],
            value: SecretValue::new(value.into()),
            revision: 1,
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
