//! API keys and organizations, agent usage, and the audit log's order and pages.

use crate::store::conformance::fixtures::{Backend, audit, audit_of, org, secret};
use crate::store::{
    ApiKeyRecord, AuditRecord, Conflict, Direction, SecretUsage, Store, StoreError, UsageCounts,
    UsageDelta,
};

fn key(id: &str, org_name: &str, created_at: i64) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.into(),
        org: org(org_name),
        permissions: vec![],
        hash: format!("hash-{id}"),
        created_at,
    }
}

/// Keys create their organization once; a taken key id is a conflict that changes nothing;
/// a revoked key is gone, durably, and its revocation is audited in its organization.
pub fn api_keys_and_orgs(b: &dyn Backend) {
    let store = b.open();
    store
        .create_api_key(&key("k1", "acme", 10), audit("acme"))
        .unwrap();
    store
        .create_api_key(&key("k2", "acme", 20), audit("acme"))
        .unwrap();
    store
        .create_api_key(&key("k0", "other", 30), audit("other"))
        .unwrap();
    let r = store.create_api_key(&key("k1", "third", 40), audit("third"));
    assert!(
        matches!(r, Err(StoreError::Conflict(Conflict::ApiKeyId))),
        "{r:?}"
    );
    let orgs: Vec<(String, i64)> = store
        .list_orgs()
        .unwrap()
        .into_iter()
        .map(|o| (o.name.to_string(), o.created_at))
        .collect();
    assert_eq!(orgs, [("acme".into(), 10), ("other".into(), 30)]);
    assert_eq!(
        store.api_key("k1").unwrap().map(|k| k.org),
        Some(org("acme"))
    );
    assert_eq!(
        store
            .audit_page(&org("third"), None, 10, Direction::Asc)
            .unwrap()
            .1,
        0
    );
    let revoked = store
        .revoke_api_key("k2", audit_of("", "revoke", "k2"))
        .unwrap();
    assert_eq!(
        (revoked.id.as_str(), revoked.hash.as_str()),
        ("k2", "hash-k2")
    );
    assert!(matches!(
        store.revoke_api_key("k2", audit("acme")),
        Err(StoreError::NotFound)
    ));
    drop(store);
    let store = b.open();
    let ids: Vec<String> = store
        .list_api_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, ["k0", "k1"]);
    assert!(store.api_key("k2").unwrap().is_none());
    let (entries, total) = store
        .audit_page(&org("acme"), None, 10, Direction::Desc)
        .unwrap();
    assert_eq!(total, 3);
    assert_eq!(
        (entries[0].action.as_str(), entries[0].org.as_str()),
        ("revoke", "acme")
    );
}

/// Usage adds up per host, audits each recorded delta, skips deleted secrets, survives a
/// reopen and goes with its secret.
pub fn usage_adds_up_audits_and_goes_with_the_secret(b: &dyn Backend) {
    let store = b.open();
    let s = secret("acme", 1, 1);
    store.insert_secret(&s, audit("acme")).unwrap();
    let delta = |host: &str, substituted: u64, at: i64| UsageDelta {
        secret_id: s.id.clone(),
        sandbox: "sb".parse().unwrap(),
        host: host.into(),
        counts: UsageCounts {
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
    // Usage never bumps the secret.
    let now = store.secret(&org("acme"), &s.id).unwrap().unwrap();
    assert_eq!((now.revision, now.updated_at), (s.revision, s.updated_at));
    // Durable across a reopen.
    drop(store);
    let store = b.open();
    assert_eq!(store.secret_usage(&s.id).unwrap(), u);
    store
        .delete_secret(&org("acme"), &s.id, &mut |_| (audit("acme"), None))
        .unwrap();
    assert_eq!(store.secret_usage(&s.id).unwrap(), SecretUsage::default());
}

/// Every audit entry of `org`, oldest first, walked in pages of `limit` in `dir`.
fn walk(store: &dyn Store, org_name: &str, limit: usize, dir: Direction) -> Vec<AuditRecord> {
    let mut out: Vec<AuditRecord> = Vec::new();
    loop {
        let after = out.last().map(|a| a.seq);
        let (page, total) = store.audit_page(&org(org_name), after, limit, dir).unwrap();
        assert!(page.len() <= limit);
        assert_eq!(total, 7, "total counts the organization's whole log");
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    out
}

/// Audit pages continue strictly after `after`, oldest-first or newest-first, and only ever
/// hold the organization's own entries.
pub fn audit_pages_in_both_directions(b: &dyn Backend) {
    let store = b.open();
    for i in 0..7 {
        let s = secret("acme", i, i as i64);
        store
            .insert_secret(&s, audit_of("acme", "secret.create", s.id.as_str()))
            .unwrap();
        let o = secret("other", 100 + i, i as i64);
        store.insert_secret(&o, audit("other")).unwrap();
    }
    let asc = walk(&*store, "acme", 3, Direction::Asc);
    let desc = walk(&*store, "acme", 3, Direction::Desc);
    assert_eq!(asc.len(), 7);
    assert!(asc.iter().all(|a| a.org == "acme"));
    assert!(asc.windows(2).all(|w| w[0].seq < w[1].seq), "ascending");
    let targets: Vec<&str> = asc.iter().map(|a| a.target_id.as_str()).collect();
    let want: Vec<String> = (0..7).map(|i| format!("id-{i:05}")).collect();
    assert_eq!(targets, want, "in the order written");
    let mut reversed: Vec<u64> = desc.iter().map(|a| a.seq).collect();
    reversed.reverse();
    assert_eq!(reversed, asc.iter().map(|a| a.seq).collect::<Vec<_>>());
    // From the middle, both ways.
    let mid = asc[3].seq;
    let (after, _) = store
        .audit_page(&org("acme"), Some(mid), 10, Direction::Asc)
        .unwrap();
    assert_eq!(
        after.iter().map(|a| a.seq).collect::<Vec<_>>(),
        [asc[4].seq, asc[5].seq, asc[6].seq]
    );
    let (before, _) = store
        .audit_page(&org("acme"), Some(mid), 2, Direction::Desc)
        .unwrap();
    assert_eq!(
        before.iter().map(|a| a.seq).collect::<Vec<_>>(),
        [asc[2].seq, asc[1].seq]
    );
    let (none, _) = store
        .audit_page(&org("acme"), Some(asc[6].seq), 10, Direction::Asc)
        .unwrap();
    assert!(none.is_empty());
    let (none, _) = store
        .audit_page(&org("acme"), Some(asc[0].seq), 10, Direction::Desc)
        .unwrap();
    assert!(none.is_empty());
    let (page, total) = store
        .audit_page(&org("acme"), None, 0, Direction::Asc)
        .unwrap();
    assert_eq!((page.len(), total), (0, 7));
}

/// One write, named by its audit action.
type Step<'a> = Box<dyn Fn(&dyn Store) + 'a>;

/// Each kind of write appends its audit entry with a sequence number above every earlier
/// one, also after a reopen.
pub fn audit_seq_increases_in_commit_order(b: &dyn Backend) {
    let store = b.open();
    let s = secret("acme", 1, 1);
    let sb = crate::store::conformance::fixtures::sandbox("sb", "veil.slice/a", "A");
    let steps: Vec<(&str, Step<'_>)> = vec![
        (
            "apikey.create",
            Box::new(|st| {
                st.create_api_key(&key("k1", "acme", 1), audit_of("acme", "apikey.create", ""))
                    .unwrap()
            }),
        ),
        (
            "secret.create",
            Box::new(|st| {
                st.insert_secret(&s, audit_of("acme", "secret.create", ""))
                    .unwrap()
            }),
        ),
        (
            "secret.update",
            Box::new(|st| {
                st.update_secret(&org("acme"), &s.id, &mut |old| {
                    Ok((old.clone(), audit_of("acme", "secret.update", "")))
                })
                .unwrap();
            }),
        ),
        (
            "sandbox.put",
            Box::new(|st| {
                st.put_sandbox(&sb, audit_of("acme", "sandbox.put", ""))
                    .unwrap();
            }),
        ),
        (
            "sandbox.update",
            Box::new(|st| {
                st.update_sandbox(&org("acme"), &sb.id, &mut |old| {
                    Ok((old.clone(), audit_of("acme", "sandbox.update", "")))
                })
                .unwrap();
            }),
        ),
        (
            "usage",
            Box::new(|st| {
                let d = UsageDelta {
                    secret_id: s.id.clone(),
                    sandbox: sb.id.clone(),
                    host: "h".into(),
                    counts: UsageCounts::default(),
                    at: 1,
                };
                st.record_usage(&[d], &mut |_, _| Some(audit_of("acme", "usage", "")))
                    .unwrap();
            }),
        ),
        (
            "sandbox.restore",
            Box::new(|st| {
                let now = st.sandbox(&sb.id).unwrap().unwrap();
                assert!(
                    st.restore_sandbox(&now, None, audit_of("acme", "sandbox.restore", ""))
                        .unwrap()
                );
            }),
        ),
        (
            "secret.delete",
            Box::new(|st| {
                st.delete_secret(&org("acme"), &s.id, &mut |_| {
                    (audit_of("acme", "secret.delete", ""), None)
                })
                .unwrap();
            }),
        ),
        (
            "apikey.revoke",
            Box::new(|st| {
                st.revoke_api_key("k1", audit_of("acme", "apikey.revoke", ""))
                    .unwrap();
            }),
        ),
    ];
    let mut store = store;
    for (i, (_, step)) in steps.iter().enumerate() {
        if i == 4 {
            // Half-way through, the store is opened again: numbering continues above.
            drop(store);
            store = b.open();
        }
        step(&*store);
    }
    let (entries, total) = store
        .audit_page(&org("acme"), None, 100, Direction::Asc)
        .unwrap();
    assert_eq!(total, steps.len());
    let actions: Vec<&str> = entries.iter().map(|a| a.action.as_str()).collect();
    let want: Vec<&str> = steps.iter().map(|(a, _)| *a).collect();
    assert_eq!(actions, want, "ordered by seq = committed order");
    assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
}
