//! What to send an agent: the registry as agents must see it, and the pure diff from what one
//! agent holds to what it must hold after a change.
//!
//! Messages are derived from the store's current state, not from the request that caused the
//! change, so concurrent changes can never leave an agent on an older state than the store.
//!
//! A deleted secret inside its grace period (a tombstone) is sent, retired, to the agents that
//! serve a sandbox of its organization, and applied there to every such sandbox: it is sent
//! before a new sandbox of that organization, and dropped once the organization has no sandbox
//! or the grace has passed. What an agent holds of a secret is its [`Stamp`]: a sweep that drops
//! a rotated-out value changes the stamp but not the revision, and is sent all the same.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use veil_link::{Revision, SandboxId, SandboxState, SecretId};

use crate::store::{SandboxRecord, SecretRecord, Store, StoreError, TombstoneRecord};

/// What an agent was sent of one secret: enough to tell whether it must be sent again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The revision (of a tombstone: the revision of the deletion).
    pub revision: Revision,
    /// Revisions of the earlier values that came with it (rotated-out, or a tombstone's).
    pub values: Vec<Revision>,
}

impl Stamp {
    fn of_secret(s: &SecretRecord) -> Self {
        Self {
            revision: s.revision,
            values: s.previous.iter().map(|p| p.revision).collect(),
        }
    }

    fn of_tombstone(t: &TombstoneRecord) -> Self {
        Self {
            revision: t.revision,
            values: t.values.iter().map(|v| v.revision).collect(),
        }
    }
}

/// Secrets one agent holds: id → stamp.
pub type Held = HashMap<SecretId, Stamp>;

/// The registry as agents see it: every sandbox, the secrets mounted in at least one, and the
/// tombstones of organizations with at least one sandbox.
#[derive(Debug, Default)]
pub struct RegistryView {
    /// Registered sandboxes by id.
    pub sandboxes: BTreeMap<SandboxId, SandboxRecord>,
    /// Existing secrets mounted in some sandbox, by id.
    pub mounted: BTreeMap<SecretId, SecretRecord>,
    /// Deleted secrets still scrubbed in their organization's sandboxes, by id.
    pub retired: BTreeMap<SecretId, TombstoneRecord>,
}

impl RegistryView {
    /// Reads the registry from the store.
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut view = RegistryView::default();
        // A declared, unbound sandbox reaches no agent, and neither do the secrets only it
        // mounts: nothing goes to a host before a bind.
        for sb in store.list_sandboxes()?.into_iter().filter(|sb| sb.bound) {
            for m in &sb.mounts {
                if !view.mounted.contains_key(&m.secret_id)
                    && let Some(s) = store.secret(&sb.org, &m.secret_id)?
                {
                    view.mounted.insert(s.id.clone(), s);
                }
            }
            view.sandboxes.insert(sb.id.clone(), sb);
        }
        for t in store.tombstones()? {
            if view.sandboxes.values().any(|sb| sb.org == t.org) {
                view.retired.insert(t.id.clone(), t);
            }
        }
        Ok(view)
    }

    /// The part of the registry the agents of `host` enforce (`None`: the local socket's):
    /// only the sandboxes registered for it, the secrets mounted in those, and the retired
    /// secrets of their organizations. A host never receives another host's secrets.
    pub fn for_host(&self, host: Option<&str>) -> RegistryView {
        let sandboxes: BTreeMap<SandboxId, SandboxRecord> = self
            .sandboxes
            .iter()
            .filter(|(_, sb)| sb.host.as_deref() == host)
            .map(|(id, sb)| (id.clone(), sb.clone()))
            .collect();
        let mounted = self
            .mounted
            .iter()
            .filter(|(id, _)| {
                sandboxes
                    .values()
                    .any(|sb| sb.mounts.iter().any(|m| m.secret_id == **id))
            })
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        let retired = self
            .retired
            .iter()
            .filter(|(_, t)| sandboxes.values().any(|sb| sb.org == t.org))
            .map(|(id, t)| (id.clone(), t.clone()))
            .collect();
        RegistryView {
            sandboxes,
            mounted,
            retired,
        }
    }

    /// What an agent holds of secret `id` once it is up to date; `None` = it must not hold it.
    pub fn stamp(&self, id: &SecretId) -> Option<Stamp> {
        match self.mounted.get(id) {
            Some(s) => Some(Stamp::of_secret(s)),
            None => self.retired.get(id).map(Stamp::of_tombstone),
        }
    }

    /// The revision agents acknowledge for secret `id` (live or retired).
    pub fn revision(&self, id: &SecretId) -> Option<Revision> {
        self.stamp(id).map(|s| s.revision)
    }

    /// The mounts of `sb` agents are sent, as (variable, secret id): those whose secret no
    /// longer exists are left out, except a deleted secret in its grace period (sent retired:
    /// its hosts stay intercepted in the sandboxes that mounted it, so its value is still
    /// scrubbed there).
    pub fn live_mounts<'a>(
        &'a self,
        sb: &'a SandboxRecord,
    ) -> impl Iterator<Item = (&'a str, &'a SecretId)> + 'a {
        sb.mounts
            .iter()
            .filter(|m| {
                self.mounted
                    .get(&m.secret_id)
                    .is_some_and(|s| s.org == sb.org)
                    || self
                        .retired
                        .get(&m.secret_id)
                        .is_some_and(|t| t.org == sb.org)
            })
            .map(|m| (m.env.as_str(), &m.secret_id))
    }

    /// A sandbox as the agent enforces it (see [`Self::live_mounts`]).
    pub fn sandbox_state(&self, sb: &SandboxRecord) -> SandboxState {
        SandboxState {
            id: sb.id.clone(),
            org: sb.org.clone(),
            cgroup: PathBuf::from(&sb.cgroup),
            netns: sb.netns.as_ref().map(PathBuf::from),
            mounts: self
                .live_mounts(sb)
                .map(|(env, id)| (env.to_owned(), id.clone()))
                .collect(),
            egress: sb.egress,
            cgroup_id: sb.cgroup_id,
        }
    }

    /// What an agent holds right after a snapshot of this view.
    pub fn held(&self) -> Held {
        let live = self
            .mounted
            .values()
            .map(|s| (s.id.clone(), Stamp::of_secret(s)));
        let retired = (self.retired.values()).map(|t| (t.id.clone(), Stamp::of_tombstone(t)));
        live.chain(retired).collect()
    }
}

/// The object a change concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// A sandbox (registered, changed or removed).
    Sandbox(&'a SandboxId),
    /// A secret (created, changed or deleted).
    Secret(&'a SecretId),
}

/// One message to send, by id (values are filled in when the message is built).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send the secret's current state.
    PutSecret(SecretId),
    /// Send the sandbox's current state.
    PutSandbox(SandboxId),
    /// The sandbox is gone.
    DeleteSandbox(SandboxId),
    /// The secret is deleted or mounted nowhere.
    DeleteSecret(SecretId),
}

/// The messages that bring an agent holding `held` to `view` for `change`, in sending order:
/// secrets a sandbox needs (its mounts, its organization's retired ones) come before the
/// sandbox; secrets mounted nowhere go last.
pub fn plan(view: &RegistryView, change: Change<'_>, held: &Held) -> Vec<Step> {
    let mut steps = Vec::new();
    let stale = |id: &SecretId| view.stamp(id).as_ref() != held.get(id);
    let put = |steps: &mut Vec<Step>, id: &SecretId| {
        let step = Step::PutSecret(id.clone());
        if stale(id) && !steps.contains(&step) {
            steps.push(step);
        }
    };
    match change {
        Change::Sandbox(id) => match view.sandboxes.get(id) {
            Some(sb) => {
                // In variable order, as the agent's state lists them.
                let mounts: BTreeMap<&str, &SecretId> = view.live_mounts(sb).collect();
                for secret_id in mounts.values() {
                    put(&mut steps, secret_id);
                }
                // Scrubbed in it from its first connection on.
                for t in view.retired.values().filter(|t| t.org == sb.org) {
                    put(&mut steps, &t.id);
                }
                steps.push(Step::PutSandbox(id.clone()));
            }
            None => steps.push(Step::DeleteSandbox(id.clone())),
        },
        Change::Secret(id) => {
            if view.stamp(id).is_some() {
                put(&mut steps, id);
            }
        }
    }
    let mut gone: Vec<&SecretId> = held.keys().filter(|id| view.stamp(id).is_none()).collect();
    gone.sort();
    steps.extend(gone.into_iter().map(|id| Step::DeleteSecret(id.clone())));
    steps
}

/// Updates what the agent holds once `step` is queued to it.
pub fn apply_to_held(held: &mut Held, view: &RegistryView, step: &Step) {
    match step {
        Step::PutSecret(id) => {
            if let Some(stamp) = view.stamp(id) {
                held.insert(id.clone(), stamp);
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
    use crate::store::{Mount, OrgId};

    fn sid(id: &str) -> SecretId {
        SecretId::parse(id).unwrap()
    }

    fn sbid(id: &str) -> SandboxId {
        SandboxId::parse(id).unwrap()
    }

    fn org(name: &str) -> OrgId {
        OrgId::parse(name).unwrap()
    }

    fn secret(id: &str, rev: u64) -> SecretRecord {
        SecretRecord {
            id: sid(id),
            org: org("acme"),
            name: format!("n-{id}"),
            description: None,
            hosts: vec![],
            placeholder: format!("ph-{id}"),
            created_at: 0,
            updated_at: 0,
            revision: Revision(rev),
            sealed: Sealed {
                key_id: "k".into(),
                nonce: String::new(),
                ciphertext: String::new(),
            },
            body_substitution: false,
            wrong_host: Default::default(),
            previous: Vec::new(),
        }
    }

    fn sandbox(id: &str, mounts: &[(&str, &str)]) -> SandboxRecord {
        SandboxRecord {
            egress: Default::default(),
            id: sbid(id),
            org: org("acme"),
            cgroup: format!("veil.slice/{id}"),
            netns: None,
            bound: true,
            keep: false,
            cgroup_id: None,
            mounts: mounts
                .iter()
                .map(|(env, s)| Mount {
                    env: (*env).into(),
                    secret_id: sid(s),
                    secret_name: format!("n-{s}"),
                })
                .collect(),
            host: None,
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

    /// Held at these revisions, without earlier values.
    fn held(pairs: &[(&str, u64)]) -> Held {
        pairs
            .iter()
            .map(|(k, v)| {
                let stamp = Stamp {
                    revision: Revision(*v),
                    values: vec![],
                };
                (sid(k), stamp)
            })
            .collect()
    }

    fn prev(revision: u64) -> crate::store::PreviousValue {
        crate::store::PreviousValue {
            revision: Revision(revision),
            sealed: secret("x", revision).sealed,
            replaced_at: 0,
        }
    }

    /// The tombstone of secret `id` of `org`, deleted at revision `rev`, with `values` values.
    fn tombstone(id: &str, org_name: &str, rev: u64, values: u64) -> TombstoneRecord {
        TombstoneRecord {
            id: sid(id),
            org: org(org_name),
            name: format!("n-{id}"),
            placeholder: format!("ph-{id}"),
            hosts: vec![],
            revision: Revision(rev),
            deleted_at: 0,
            values: (0..values).map(|i| prev(rev - 1 - i)).collect(),
        }
    }

    #[test]
    fn a_host_sees_only_its_sandboxes_and_their_secrets() {
        let mut on_h1 = sandbox("sb1", &[("A", "s1")]);
        on_h1.host = Some("h1".into());
        let mut on_h2 = sandbox("sb2", &[("B", "s2")]);
        on_h2.host = Some("h2".into());
        let local = sandbox("sb0", &[("C", "s0")]);
        let view = RegistryView {
            sandboxes: [on_h1, on_h2, local]
                .into_iter()
                .map(|sb| (sb.id.clone(), sb))
                .collect(),
            mounted: ["s0", "s1", "s2"]
                .iter()
                .map(|s| (sid(s), secret(s, 1)))
                .collect(),
            retired: BTreeMap::new(),
        };
        let ids = |v: &RegistryView| -> (Vec<String>, Vec<String>) {
            (
                v.sandboxes.keys().map(ToString::to_string).collect(),
                v.mounted.keys().map(ToString::to_string).collect(),
            )
        };
        assert_eq!(
            ids(&view.for_host(Some("h1"))),
            (vec!["sb1".into()], vec!["s1".into()])
        );
        assert_eq!(
            ids(&view.for_host(Some("h2"))),
            (vec!["sb2".into()], vec!["s2".into()])
        );
        assert_eq!(
            ids(&view.for_host(None)),
            (vec!["sb0".into()], vec!["s0".into()])
        );
        assert!(view.for_host(Some("h3")).held().is_empty());
    }

    fn with_org(mut sb: SandboxRecord, name: &str) -> SandboxRecord {
        sb.org = org(name);
        sb
    }

    fn put_secret(id: &str) -> Step {
        Step::PutSecret(sid(id))
    }

    #[test]
    fn new_sandbox_sends_unheld_secrets_first() {
        let v = view(
            &[sandbox("sb", &[("A", "s1"), ("B", "s2"), ("C", "s1")])],
            &[secret("s1", 1), secret("s2", 4)],
        );
        let steps = plan(&v, Change::Sandbox(&sbid("sb")), &held(&[("s2", 4)]));
        assert_eq!(steps, vec![put_secret("s1"), Step::PutSandbox(sbid("sb"))]);
        // A secret held at an older revision is resent.
        let steps = plan(
            &v,
            Change::Sandbox(&sbid("sb")),
            &held(&[("s1", 1), ("s2", 3)]),
        );
        assert_eq!(steps, vec![put_secret("s2"), Step::PutSandbox(sbid("sb"))]);
    }

    #[test]
    fn removed_sandbox_releases_secrets_mounted_nowhere() {
        let v = view(&[sandbox("other", &[("A", "s1")])], &[secret("s1", 1)]);
        let steps = plan(
            &v,
            Change::Sandbox(&sbid("gone")),
            &held(&[("s1", 1), ("s2", 1)]),
        );
        assert_eq!(
            steps,
            vec![
                Step::DeleteSandbox(sbid("gone")),
                Step::DeleteSecret(sid("s2"))
            ]
        );
    }

    #[test]
    fn secret_changes_reach_only_agents_that_need_them() {
        let v = view(&[sandbox("sb", &[("A", "s1")])], &[secret("s1", 2)]);
        assert_eq!(
            plan(&v, Change::Secret(&sid("s1")), &held(&[("s1", 1)])),
            vec![put_secret("s1")]
        );
        assert!(plan(&v, Change::Secret(&sid("s1")), &held(&[("s1", 2)])).is_empty());
        // Not mounted: nothing to send; deleted while held: delete it.
        assert!(plan(&v, Change::Secret(&sid("s9")), &held(&[("s1", 2)])).is_empty());
        assert_eq!(
            plan(
                &v,
                Change::Secret(&sid("s9")),
                &held(&[("s1", 2), ("s9", 1)])
            ),
            vec![Step::DeleteSecret(sid("s9"))]
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
        for step in plan(&v, Change::Sandbox(&sbid("sb")), &h) {
            apply_to_held(&mut h, &v, &step);
        }
        assert_eq!(h, held(&[("s1", 3)]));
        assert!(
            plan(&v, Change::Sandbox(&sbid("sb")), &h)
                .iter()
                .all(|s| matches!(s, Step::PutSandbox(_)))
        );
    }

    #[test]
    fn an_expired_previous_value_is_sent_though_the_revision_stays() {
        let mut s1 = secret("s1", 3);
        s1.previous = vec![prev(2), prev(1)];
        let v = view(&[sandbox("sb", &[("A", "s1")])], &[s1.clone()]);
        let mut h = v.held();
        assert!(plan(&v, Change::Secret(&sid("s1")), &h).is_empty());
        // The sweep dropped revision 1's value: same revision, new stamp.
        s1.previous.pop();
        let swept = view(&[sandbox("sb", &[("A", "s1")])], &[s1]);
        let steps = plan(&swept, Change::Secret(&sid("s1")), &h);
        assert_eq!(steps, vec![put_secret("s1")]);
        apply_to_held(&mut h, &swept, &steps[0]);
        assert_eq!(h["s1"].values, [Revision(2)]);
        assert_eq!(swept.revision(&sid("s1")), Some(Revision(3)));
    }

    #[test]
    fn retired_secrets_go_to_agents_with_a_sandbox_of_their_org() {
        let mut v = view(
            &[
                sandbox("sb", &[("A", "s1")]),
                with_org(sandbox("other", &[]), "globex"),
            ],
            &[secret("s1", 1)],
        );
        // s1 deleted at revision 2: in the view only as a tombstone.
        v.mounted.remove("s1");
        v.retired.insert(sid("s1"), tombstone("s1", "acme", 2, 1));
        let mut h = held(&[("s1", 1)]);
        let steps = plan(&v, Change::Secret(&sid("s1")), &h);
        assert_eq!(steps, vec![put_secret("s1")], "retired, not deleted");
        apply_to_held(&mut h, &v, &steps[0]);
        assert_eq!(h["s1"].revision, Revision(2));
        // The sandbox that mounted it keeps the mount while the tombstone lasts (its hosts stay
        // intercepted there); the agent scrubs it in the org's other sandboxes too.
        assert_eq!(v.sandbox_state(&v.sandboxes["sb"]).mounts["A"], "s1");
        // A new sandbox of the org gets the tombstones it lacks first; another org's none.
        v.retired.insert(sid("s7"), tombstone("s7", "acme", 5, 2));
        v.sandboxes.insert(sbid("new"), sandbox("new", &[]));
        assert_eq!(
            plan(&v, Change::Sandbox(&sbid("new")), &h),
            vec![put_secret("s7"), Step::PutSandbox(sbid("new"))]
        );
        v.retired.insert(sid("g1"), tombstone("g1", "globex", 3, 1));
        let steps = plan(&v, Change::Sandbox(&sbid("other")), &h);
        assert_eq!(
            steps,
            vec![put_secret("g1"), Step::PutSandbox(sbid("other"))]
        );
        // The snapshot holds live and retired secrets alike.
        let snap = v.held();
        assert_eq!(snap["s7"].revision, Revision(5));
        assert_eq!(snap["s7"].values, [Revision(4), Revision(3)]);
        // Past the grace (or no sandbox of the org left): the tombstone is deleted.
        v.retired.remove("s1");
        assert_eq!(
            plan(&v, Change::Secret(&sid("s1")), &h),
            vec![Step::DeleteSecret(sid("s1"))]
        );
    }

    #[test]
    fn tombstones_load_only_for_orgs_with_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sled::SledStore::open(dir.path()).unwrap();
        let audit = || crate::store::conformance::fixtures::audit("acme");
        let mut globex = secret("g1", 1);
        globex.org = org("globex");
        for s in [secret("s1", 1), globex] {
            store.insert_secret(&s, audit()).unwrap();
            let t = TombstoneRecord {
                org: s.org.clone(),
                ..tombstone(s.id.as_str(), "acme", 2, 1)
            };
            store
                .delete_secret(&s.org, &s.id, &mut |_| (audit(), Some(t.clone())))
                .unwrap();
        }
        store.put_sandbox(&sandbox("sb", &[]), audit()).unwrap();
        let v = RegistryView::load(&store).unwrap();
        assert_eq!(v.retired.keys().collect::<Vec<_>>(), ["s1"]);
        assert_eq!(v.stamp(&sid("s1")).map(|s| s.revision), Some(Revision(2)));
        assert_eq!(v.stamp(&sid("g1")), None);
    }

    #[test]
    fn declared_sandboxes_and_their_only_secrets_reach_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sled::SledStore::open(dir.path()).unwrap();
        let audit = || crate::store::conformance::fixtures::audit("acme");
        for s in [secret("only-declared", 1), secret("shared", 1)] {
            store.insert_secret(&s, audit()).unwrap();
        }
        let declared = SandboxRecord {
            cgroup: String::new(),
            bound: false,
            ..sandbox("declared", &[("A", "only-declared"), ("B", "shared")])
        };
        store.put_sandbox(&declared, audit()).unwrap();
        store
            .put_sandbox(&sandbox("bound", &[("B", "shared")]), audit())
            .unwrap();
        let v = RegistryView::load(&store).unwrap();
        assert_eq!(v.sandboxes.keys().collect::<Vec<_>>(), ["bound"]);
        assert_eq!(v.mounted.keys().collect::<Vec<_>>(), ["shared"]);
        assert_eq!(
            plan(&v, Change::Sandbox(&sbid("declared")), &Held::new()),
            vec![Step::DeleteSandbox(sbid("declared"))],
            "a declared sandbox is nothing an agent holds"
        );
    }
}
