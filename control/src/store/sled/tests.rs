//! Unit tests of the sled backend (a fresh store in a temp dir per test).

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::paginate::{Cursor, Order, SortField, SortValue};
use crate::store::{PreviousValue, Revision};

fn org(name: &str) -> OrgId {
    OrgId::parse(name).unwrap()
}

fn sid(id: &str) -> SecretId {
    SecretId::parse(id).unwrap()
}

fn sbid(id: &str) -> SandboxId {
    SandboxId::parse(id).unwrap()
}

fn audit(org: &str) -> AuditRecord {
    AuditRecord {
        seq: 0,
        time: 0,
        actor: "t".into(),
        org: org.into(),
        action: "t".into(),
        target_type: "secret".into(),
        target_id: String::new(),
        target_name: None,
        changes: serde_json::Value::Null,
    }
}

fn secret(org_name: &str, n: usize, time: i64) -> SecretRecord {
    SecretRecord {
        id: sid(&format!("id-{n:05}")),
        org: org(org_name),
        name: format!("name-{}", (n * 7919) % 10007),
        description: None,
        hosts: vec![],
        placeholder: format!("ph-{n}"),
        created_at: time,
        updated_at: time,
        revision: Revision(1),
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

fn cursor_of(s: &SecretRecord, sort: SortField, order: Order) -> Cursor {
    let v = match sort {
        SortField::Name => SortValue::Text(s.name.clone()),
        SortField::CreatedAt => SortValue::Time(s.created_at),
        SortField::UpdatedAt => SortValue::Time(s.updated_at),
    };
    Cursor {
        s: sort,
        o: order,
        v,
        i: s.id.to_string(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Walking pages while secrets are inserted and deleted between pages returns every
    /// secret that existed throughout exactly once, in order.
    #[test]
    fn pages_stable_under_churn(
        times in prop::collection::vec(-5i64..40, 1..60),
        churn in prop::collection::vec((any::<bool>(), -5i64..40, any::<prop::sample::Index>()), 0..40),
        limit in 1usize..7,
        sort_pick in 0usize..3,
        desc: bool,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let sort = [SortField::Name, SortField::CreatedAt, SortField::UpdatedAt][sort_pick];
        let order = if desc { Order::Desc } else { Order::Asc };
        // Another org's secrets must never show up.
        store.insert_secret(&secret("other", 99_999, 0), audit("other")).unwrap();
        let mut n = 0;
        let mut live = Vec::new();
        for t in &times {
            let s = secret("acme", n, *t);
            store.insert_secret(&s, audit("acme")).unwrap();
            live.push(s.id.clone());
            n += 1;
        }
        let initial: BTreeSet<SecretId> = live.iter().cloned().collect();
        let mut removed = BTreeSet::new();
        let mut seen: Vec<SecretRecord> = Vec::new();
        let mut cursor: Option<Cursor> = None;
        let mut churn = churn.into_iter();
        loop {
            let page = store.page_secrets(&org("acme"), &SecretPageQuery {
                sort, order, after: cursor.as_ref(), limit, name_contains: None,
            }).unwrap();
            prop_assert!(page.items.len() <= limit);
            prop_assert!(page.items.iter().all(|s| s.org == "acme"));
            seen.extend(page.items.iter().cloned());
            if !page.more { break; }
            cursor = page.items.last().map(|s| cursor_of(s, sort, order));
            if let Some((insert, t, idx)) = churn.next() {
                if insert {
                    let s = secret("acme", n, t);
                    n += 1;
                    store.insert_secret(&s, audit("acme")).unwrap();
                    live.push(s.id.clone());
                } else if !live.is_empty() {
                    let id = live.remove(idx.index(live.len()));
                    store.delete_secret(&org("acme"), &id, &mut |_| (audit("acme"), None)).unwrap();
                    removed.insert(id);
                }
            }
        }
        let ids: Vec<&str> = seen.iter().map(|s| s.id.as_str()).collect();
        let unique: BTreeSet<&str> = ids.iter().copied().collect();
        prop_assert_eq!(unique.len(), ids.len(), "a secret was repeated");
        for id in initial.difference(&removed) {
            prop_assert!(unique.contains(id.as_str()), "secret {} skipped", id);
        }
        let keys: Vec<Cursor> = seen.iter().map(|s| cursor_of(s, sort, order)).collect();
        for w in keys.windows(2) {
            let (a, b) = ((&w[0].v, &w[0].i), (&w[1].v, &w[1].i));
            prop_assert!(if desc { a > b } else { a < b }, "out of order");
        }
        prop_assert!(store.check_consistency().unwrap().is_empty());
    }
}

fn sandbox(id: &str, cgroup: &str, env: &str) -> SandboxRecord {
    SandboxRecord {
        egress: Default::default(),
        id: sbid(id),
        org: org("acme"),
        cgroup: cgroup.into(),
        netns: None,
        mounts: vec![super::super::Mount {
            env: env.into(),
            secret_id: sid("s"),
            secret_name: "s".into(),
        }],
        created_at: 1,
        updated_at: 1,
    }
}

#[test]
fn restore_undoes_only_the_write_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    // A new record rolled back: gone, cgroup free.
    let new = sandbox("sb", "veil.slice/a", "A");
    store.put_sandbox(&new, audit("acme")).unwrap();
    assert!(store.restore_sandbox(&new, None, audit("acme")).unwrap());
    assert!(store.sandbox(&sbid("sb")).unwrap().is_none());
    store
        .put_sandbox(&sandbox("other", "veil.slice/a", "A"), audit("acme"))
        .unwrap();
    // A replacement rolled back: the previous record and its cgroup come back.
    let old = sandbox("sb", "veil.slice/b", "A");
    store.put_sandbox(&old, audit("acme")).unwrap();
    let moved = sandbox("sb", "veil.slice/c", "B");
    store.put_sandbox(&moved, audit("acme")).unwrap();
    assert!(
        store
            .restore_sandbox(&moved, Some(&old), audit("acme"))
            .unwrap()
    );
    assert_eq!(store.sandbox(&sbid("sb")).unwrap().as_ref(), Some(&old));
    // A write that was superseded is left alone.
    assert!(!store.restore_sandbox(&moved, None, audit("acme")).unwrap());
    assert_eq!(store.sandbox(&sbid("sb")).unwrap().as_ref(), Some(&old));
    store
        .put_sandbox(&sandbox("x", "veil.slice/c", "A"), audit("acme"))
        .unwrap();
    assert!(store.check_consistency().unwrap().is_empty());
}

#[test]
fn name_filter_and_total() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    for (i, name) in ["Alpha_DB", "beta", "gamma-db"].iter().enumerate() {
        let mut s = secret("acme", i, i as i64);
        s.name = (*name).to_owned();
        store.insert_secret(&s, audit("acme")).unwrap();
    }
    let q = SecretPageQuery {
        sort: SortField::Name,
        order: Order::Asc,
        after: None,
        limit: 1,
        name_contains: Some("db"),
    };
    let page = store.page_secrets(&org("acme"), &q).unwrap();
    assert_eq!(page.total, 2);
    assert!(page.more);
    assert_eq!(page.items[0].name, "Alpha_DB");
    let all = SecretPageQuery {
        name_contains: None,
        limit: 10,
        ..q
    };
    assert_eq!(store.page_secrets(&org("acme"), &all).unwrap().total, 3);
    assert_eq!(store.page_secrets(&org("nobody"), &all).unwrap().total, 0);
}

#[test]
fn usage_adds_up_audits_and_goes_with_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let s = secret("acme", 1, 1);
    store.insert_secret(&s, audit("acme")).unwrap();
    let delta = |host: &str, substituted: u64, at: i64| UsageDelta {
        secret_id: s.id.clone(),
        sandbox: "sb".parse().unwrap(),
        host: host.into(),
        counts: super::super::UsageCounts {
            substituted,
            wrong_host: 1,
            ..Default::default()
        },
        at,
    };
    let gone = UsageDelta {
        secret_id: "no-such-secret".parse().unwrap(),
        ..delta("h", 1, 1)
    };
    let mut audited = Vec::new();
    let n = store
        .record_usage(
            &[delta("a.test", 2, 10), delta("b.test", 0, 20), gone],
            &mut |sec, d| {
                audited.push((sec.id.clone(), d.host.clone()));
                Some(audit(sec.org.as_str()))
            },
        )
        .unwrap();
    assert_eq!(n, 2, "the unknown secret is skipped");
    assert_eq!(audited.len(), 2);
    store
        .record_usage(&[delta("a.test", 3, 30)], &mut |_, _| None)
        .unwrap();
    let u = store.secret_usage(&s.id).unwrap();
    assert_eq!(u.last_used_at, Some(30));
    assert_eq!(u.hosts["a.test"].counts.substituted, 5);
    assert_eq!(u.hosts["a.test"].counts.wrong_host, 2);
    // Seen but never substituted: counted, not "used".
    assert_eq!(u.hosts["b.test"].last_used_at, None);
    assert_eq!(u.hosts["b.test"].last_seen_at, Some(20));
    let (entries, _) = store
        .audit_page(&org("acme"), None, 100, Direction::Asc)
        .unwrap();
    assert_eq!(entries.len(), 3, "create + one entry per recorded delta");
    // Durable across a reopen.
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.secret_usage(&s.id).unwrap(), u);
    store
        .delete_secret(&org("acme"), &s.id, &mut |_| (audit("acme"), None))
        .unwrap();
    assert_eq!(store.secret_usage(&s.id).unwrap(), SecretUsage::default());
}

#[test]
fn records_without_issue_6_fields_still_load() {
    let mut v = serde_json::to_value(secret("acme", 1, 1)).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("body_substitution");
    o.remove("wrong_host");
    let r: SecretRecord = dec("secrets", v.to_string().as_bytes()).unwrap();
    assert!(!r.body_substitution);
    assert_eq!(r.wrong_host, super::super::WrongHost::Forward);
}

#[test]
fn usage_hosts_are_bounded() {
    let mut u = SecretUsage::default();
    let one = super::super::UsageCounts {
        substituted: 1,
        ..Default::default()
    };
    for i in 0..super::super::MAX_USAGE_HOSTS + 10 {
        u.add(&format!("h{i}.test"), &one, 1);
    }
    assert_eq!(u.hosts.len(), super::super::MAX_USAGE_HOSTS + 1);
    assert_eq!(u.hosts[super::super::OTHER_HOSTS].counts.substituted, 10);
}

fn sealed(key_id: &str, tag: &str) -> Sealed {
    Sealed {
        key_id: key_id.into(),
        nonce: tag.into(),
        ciphertext: tag.into(),
    }
}

fn prev(revision: u64, replaced_at: i64) -> PreviousValue {
    PreviousValue {
        revision: Revision(revision),
        sealed: sealed("k", &format!("r{revision}")),
        replaced_at,
    }
}

/// A secret at revision 3 with two rotated-out values.
fn rotated(n: usize) -> SecretRecord {
    let mut s = secret("acme", n, 1);
    s.revision = Revision(3);
    s.previous = vec![prev(2, 200), prev(1, 100)];
    s
}

fn tombstone_of(s: &SecretRecord, deleted_at: i64) -> TombstoneRecord {
    let mut values = vec![PreviousValue {
        revision: s.revision,
        sealed: s.sealed.clone(),
        replaced_at: deleted_at,
    }];
    values.extend(s.previous.iter().cloned());
    TombstoneRecord {
        id: s.id.clone(),
        org: s.org.clone(),
        name: s.name.clone(),
        placeholder: s.placeholder.clone(),
        hosts: s.hosts.clone(),
        revision: s.revision.next(),
        deleted_at,
        values,
    }
}

#[test]
fn previous_values_and_tombstones_round_trip_durably() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let kept = rotated(1);
    let gone = rotated(2);
    store.insert_secret(&kept, audit("acme")).unwrap();
    store.insert_secret(&gone, audit("acme")).unwrap();
    let t = tombstone_of(&gone, 300);
    let deleted = store
        .delete_secret(&org("acme"), &gone.id, &mut |_| {
            (audit("acme"), Some(t.clone()))
        })
        .unwrap();
    assert_eq!(deleted.id, gone.id);
    // A tombstone must name the secret it replaces.
    let mut wrong = tombstone_of(&kept, 300);
    wrong.id = sid("other");
    assert!(matches!(
        store.delete_secret(&org("acme"), &kept.id, &mut |_| (
            audit("acme"),
            Some(wrong.clone())
        )),
        Err(StoreError::Rejected(_))
    ));
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(
        store
            .secret(&org("acme"), &kept.id)
            .unwrap()
            .unwrap()
            .previous,
        kept.previous
    );
    assert!(store.secret(&org("acme"), &gone.id).unwrap().is_none());
    assert!(
        store
            .secret_by_name(&org("acme"), &gone.name)
            .unwrap()
            .is_none()
    );
    assert_eq!(store.tombstones().unwrap(), vec![t]);
    assert!(store.check_consistency().unwrap().is_empty());
    // Records written before previous values existed load without them.
    let mut v = serde_json::to_value(secret("acme", 3, 1)).unwrap();
    v.as_object_mut().unwrap().remove("previous");
    let r: SecretRecord = dec("secrets", v.to_string().as_bytes()).unwrap();
    assert!(r.previous.is_empty());
    assert!(
        !enc(&secret("acme", 3, 1))
            .unwrap()
            .windows(8)
            .any(|w| w == b"previous")
    );
}

#[test]
fn sweep_drops_values_past_the_cutoff_and_empty_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let live = rotated(1);
    store.insert_secret(&live, audit("acme")).unwrap();
    let plain = secret("acme", 2, 1);
    store.insert_secret(&plain, audit("acme")).unwrap();
    let gone = rotated(3);
    store.insert_secret(&gone, audit("acme")).unwrap();
    let t = tombstone_of(&gone, 300);
    store
        .delete_secret(&org("acme"), &gone.id, &mut |_| {
            (audit("acme"), Some(t.clone()))
        })
        .unwrap();
    let updated_before = store
        .secret(&org("acme"), &live.id)
        .unwrap()
        .unwrap()
        .updated_at;

    // Nothing is due: nothing changes, the oldest value sets the next deadline.
    let swept = store.sweep_grace(99).unwrap();
    assert_eq!(
        swept,
        Swept {
            changed: vec![],
            dropped: 0,
            oldest_kept: Some(100)
        }
    );
    // Values replaced at or before the cutoff go; the rest stays, in order.
    let swept = store.sweep_grace(100).unwrap();
    let mut changed = swept.changed.clone();
    changed.sort();
    let mut want = vec![live.id.clone(), gone.id.clone()];
    want.sort();
    assert_eq!(
        (changed, swept.dropped, swept.oldest_kept),
        (want, 2, Some(200))
    );
    let now = store.secret(&org("acme"), &live.id).unwrap().unwrap();
    assert_eq!(now.previous, vec![prev(2, 200)]);
    assert_eq!(now.updated_at, updated_before, "an expiry is not an update");
    assert_eq!(store.tombstones().unwrap()[0].values.len(), 2);
    // Past everything: the tombstone goes with its last value.
    let swept = store.sweep_grace(300).unwrap();
    assert_eq!((swept.dropped, swept.oldest_kept), (3, None));
    assert!(store.tombstones().unwrap().is_empty());
    assert!(
        store
            .secret(&org("acme"), &live.id)
            .unwrap()
            .unwrap()
            .previous
            .is_empty()
    );
    assert!(store.sweep_grace(i64::MAX).unwrap().changed.is_empty());
    assert!(store.check_consistency().unwrap().is_empty());
    // Durable.
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert!(store.tombstones().unwrap().is_empty());
    assert!(
        store
            .secret(&org("acme"), &live.id)
            .unwrap()
            .unwrap()
            .previous
            .is_empty()
    );
}

#[test]
fn reseal_and_key_ids_cover_previous_and_tombstoned_values() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut live = rotated(1);
    live.previous[1].sealed.key_id = "old-key".into();
    store.insert_secret(&live, audit("acme")).unwrap();
    let gone = rotated(2);
    let mut t = tombstone_of(&gone, 300);
    t.values[2].sealed.key_id = "older-key".into();
    store.insert_secret(&gone, audit("acme")).unwrap();
    store
        .delete_secret(&org("acme"), &gone.id, &mut |_| {
            (audit("acme"), Some(t.clone()))
        })
        .unwrap();
    assert_eq!(
        store.key_ids_in_use().unwrap(),
        ["k", "old-key", "older-key"]
    );
    let mut seen = Vec::new();
    let n = store
        .reseal_all("new", &mut |v| {
            seen.push((v.secret_id.clone(), v.revision, v.sealed.key_id.clone()));
            Ok(sealed("new", &format!("{}-{}", v.secret_id, v.revision)))
        })
        .unwrap();
    assert_eq!(n, 2, "one secret and one tombstone rewritten");
    assert_eq!(
        seen.len(),
        6,
        "3 values each, each with its own binding revision"
    );
    assert!(seen.contains(&(live.id.clone(), Revision(1), "old-key".into())));
    assert!(seen.contains(&(gone.id.clone(), Revision(3), "k".into())));
    assert_eq!(store.key_ids_in_use().unwrap(), ["new"]);
    assert_eq!(store.reseal_all("new", &mut |_| unreachable!()).unwrap(), 0);
}

#[test]
fn consistency_flags_tombstones_that_contradict_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut s = rotated(1);
    s.previous.reverse();
    store.insert_secret(&s, audit("acme")).unwrap();
    let mut t = tombstone_of(&rotated(1), 1);
    t.values.clear();
    store
        .tombstones
        .insert(t.id.as_str().as_bytes(), enc(&t).unwrap())
        .unwrap();
    let problems = store.check_consistency().unwrap().join("; ");
    assert!(
        problems.contains("previous values out of order"),
        "{problems}"
    );
    assert!(problems.contains("the secret still exists"), "{problems}");
    assert!(problems.contains("wrong number of values"), "{problems}");
}
