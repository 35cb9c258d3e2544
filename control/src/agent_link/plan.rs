//! What to send an agent: the registry as agents must see it, and the pure diff from what one
//! agent holds to what it must hold after a change.
//!
//! Messages are derived from the store's current state, not from the request that caused the
//! change, so concurrent changes can never leave an agent on an older state than the store.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use veil_link::SandboxState;

use crate::store::{SandboxRecord, SecretRecord, Store, StoreError};

/// Secrets one agent holds: id → revision.
pub type Held = HashMap<String, u64>;

/// The registry as agents see it: every sandbox, and the secrets mounted in at least one.
#[derive(Debug, Default)]
pub struct RegistryView {
    /// Registered sandboxes by id.
    pub sandboxes: BTreeMap<String, SandboxRecord>,
    /// Existing secrets mounted in some sandbox, by id.
    pub mounted: BTreeMap<String, SecretRecord>,
}

impl RegistryView {
    /// Reads the registry from the store.
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut view = RegistryView::default();
        for sb in store.list_sandboxes()? {
            for m in &sb.mounts {
                if !view.mounted.contains_key(&m.secret_id)
                    && let Some(s) = store.secret(&sb.org, &m.secret_id)?
                {
                    view.mounted.insert(s.id.clone(), s);
                }
            }
            view.sandboxes.insert(sb.id.clone(), sb);
        }
        Ok(view)
    }

    /// A sandbox as the agent enforces it: mounts whose secret no longer exists are left out.
    pub fn sandbox_state(&self, sb: &SandboxRecord) -> SandboxState {
        SandboxState {
            id: sb.id.clone(),
            org: sb.org.clone(),
            cgroup: PathBuf::from(&sb.cgroup),
            netns: sb.netns.as_ref().map(PathBuf::from),
            mounts: sb
                .mounts
                .iter()
                .filter(|m| {
                    self.mounted
                        .get(&m.secret_id)
                        .is_some_and(|s| s.org == sb.org)
                })
                .map(|m| (m.env.clone(), m.secret_id.clone()))
                .collect(),
            egress: sb.egress,
        }
    }

    /// What an agent holds right after a snapshot of this view.
    pub fn held(&self) -> Held {
        self.mounted
            .values()
            .map(|s| (s.id.clone(), s.revision))
            .collect()
    }
}

/// The object a change concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// A sandbox (registered, changed or removed).
    Sandbox(&'a str),
    /// A secret (created, changed or deleted).
    Secret(&'a str),
}

/// One message to send, by id (values are filled in when the message is built).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the secret's current state.
    PutSecret(String),
    /// Send the sandbox's current state.
    PutSandbox(String),
    /// The sandbox is gone.
    DeleteSandbox(String),
    /// The secret is deleted or mounted nowhere.
    DeleteSecret(String),
}

/// The messages that bring an agent holding `held` to `view` for `change`, in sending order:
/// secrets a sandbox needs come before the sandbox; secrets mounted nowhere go last.
pub fn plan(view: &RegistryView, change: Change<'_>, held: &Held) -> Vec<Step> {
    let mut steps = Vec::new();
    let stale = |id: &str| view.mounted.get(id).map(|s| s.revision) != held.get(id).copied();
    match change {
        Change::Sandbox(id) => match view.sandboxes.get(id) {
            Some(sb) => {
                let state = view.sandbox_state(sb);
                for secret_id in state.mounts.values() {
                    let queued = steps.contains(&Step::PutSecret(secret_id.clone()));
                    if stale(secret_id) && !queued {
                        steps.push(Step::PutSecret(secret_id.clone()));
                    }
                }
                steps.push(Step::PutSandbox(id.to_owned()));
            }
            None => steps.push(Step::DeleteSandbox(id.to_owned())),
        },
        Change::Secret(id) => {
            if view.mounted.contains_key(id) && stale(id) {
                steps.push(Step::PutSecret(id.to_owned()));
            }
        }
    }
    let mut gone: Vec<&String> = held
        .keys()
        .filter(|id| !view.mounted.contains_key(*id))
        .collect();
    gone.sort();
    steps.extend(gone.into_iter().map(|id| Step::DeleteSecret(id.clone())));
    steps
}

/// Updates what the agent holds once `step` is queued to it.
pub fn apply_to_held(held: &mut Held, view: &RegistryView, step: &Step) {
    match step {
        Step::PutSecret(id) => {
            if let Some(s) = view.mounted.get(id) {
                held.insert(id.clone(), s.revision);
            }
        }
        Step::DeleteSecret(id) => {
            held.remove(id);
        }
        Step::PutSandbox(_) | Step::DeleteSandbox(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Sealed;
    use crate::store::Mount;

    fn secret(id: &str, rev: u64) -> SecretRecord {
        SecretRecord {
            id: id.into(),
            org: "acme".into(),
            name: format!("n-{id}"),
            description: None,
            hosts: vec![],
            placeholder: format!("ph-{id}"),
            created_at: 0,
            updated_at: 0,
            revision: rev,
            sealed: Sealed {
                key_id: "k".into(),
                nonce: String::new(),
                ciphertext: String::new(),
            },
            body_substitution: false,
            wrong_host: Default::default(),
        }
    }

    fn sandbox(id: &str, mounts: &[(&str, &str)]) -> SandboxRecord {
        SandboxRecord {
            egress: Default::default(),
            id: id.into(),
            org: "acme".into(),
            cgroup: format!("veil.slice/{id}"),
            netns: None,
            mounts: mounts
                .iter()
                .map(|(env, s)| Mount {
                    env: (*env).into(),
                    secret_id: (*s).into(),
                    secret_name: format!("n-{s}"),
                })
                .collect(),
            created_at: 0,
            updated_at: 0,
        }
    }

    fn view(sandboxes: &[SandboxRecord], secrets: &[SecretRecord]) -> RegistryView {
        let mut v = RegistryView::default();
        for sb in sandboxes {
            v.sandboxes.insert(sb.id.clone(), sb.clone());
        }
        for s in secrets {
            let used = sandboxes
                .iter()
                .any(|sb| sb.mounts.iter().any(|m| m.secret_id == s.id));
            if used {
                v.mounted.insert(s.id.clone(), s.clone());
            }
        }
        v
    }

    fn held(pairs: &[(&str, u64)]) -> Held {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    fn put_secret(id: &str) -> Step {
        Step::PutSecret(id.into())
    }

    #[test]
    fn new_sandbox_sends_unheld_secrets_first() {
        let v = view(
            &[sandbox("sb", &[("A", "s1"), ("B", "s2"), ("C", "s1")])],
            &[secret("s1", 1), secret("s2", 4)],
        );
        let steps = plan(&v, Change::Sandbox("sb"), &held(&[("s2", 4)]));
        assert_eq!(steps, vec![put_secret("s1"), Step::PutSandbox("sb".into())]);
        // A secret held at an older revision is resent.
        let steps = plan(&v, Change::Sandbox("sb"), &held(&[("s1", 1), ("s2", 3)]));
        assert_eq!(steps, vec![put_secret("s2"), Step::PutSandbox("sb".into())]);
    }

    #[test]
    fn removed_sandbox_releases_secrets_mounted_nowhere() {
        let v = view(&[sandbox("other", &[("A", "s1")])], &[secret("s1", 1)]);
        let steps = plan(&v, Change::Sandbox("gone"), &held(&[("s1", 1), ("s2", 1)]));
        assert_eq!(
            steps,
            vec![
                Step::DeleteSandbox("gone".into()),
                Step::DeleteSecret("s2".into())
            ]
        );
    }

    #[test]
    fn secret_changes_reach_only_agents_that_need_them() {
        let v = view(&[sandbox("sb", &[("A", "s1")])], &[secret("s1", 2)]);
        assert_eq!(
            plan(&v, Change::Secret("s1"), &held(&[("s1", 1)])),
            vec![put_secret("s1")]
        );
        assert!(plan(&v, Change::Secret("s1"), &held(&[("s1", 2)])).is_empty());
        // Not mounted: nothing to send; deleted while held: delete it.
        assert!(plan(&v, Change::Secret("s9"), &held(&[("s1", 2)])).is_empty());
        assert_eq!(
            plan(&v, Change::Secret("s9"), &held(&[("s1", 2), ("s9", 1)])),
            vec![Step::DeleteSecret("s9".into())]
        );
    }

    #[test]
    fn deleted_secret_drops_out_of_the_sandbox_state() {
        let v = view(
            &[sandbox("sb", &[("A", "s1"), ("B", "gone")])],
            &[secret("s1", 1)],
        );
        let state = v.sandbox_state(&v.sandboxes["sb"]);
        assert_eq!(state.mounts.len(), 1);
        assert_eq!(state.mounts["A"], "s1");
        assert_eq!(v.held(), held(&[("s1", 1)]));
    }

    #[test]
    fn held_follows_the_steps() {
        let v = view(&[sandbox("sb", &[("A", "s1")])], &[secret("s1", 3)]);
        let mut h = held(&[("old", 1)]);
        for step in plan(&v, Change::Sandbox("sb"), &h) {
            apply_to_held(&mut h, &v, &step);
        }
        assert_eq!(h, held(&[("s1", 3)]));
        assert!(
            plan(&v, Change::Sandbox("sb"), &h)
                .iter()
                .all(|s| matches!(s, Step::PutSandbox(_)))
        );
    }
}
