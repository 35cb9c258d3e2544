//! Secrets: keyset pages, the name filter, uniqueness, organizations kept apart, immutable
//! identity, and records that come back exactly as written.

use std::cell::Cell;
use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::paginate::{Cursor, Order, SortField};
use crate::store::conformance::fixtures::{
    Backend, audit, cursor_of, named_secret, org, secret, sid,
};
use crate::store::{
    Conflict, Rejected, SecretId, SecretPageQuery, SecretRecord, Store, StoreError,
};

/// Walking pages while secrets are inserted and deleted between pages returns every secret
/// that existed throughout (and matches the name filter, if any) exactly once, in order
/// (property test; each round in organizations and ids of its own).
pub fn pages_stable_under_churn(b: &dyn Backend) {
    let store = b.open();
    let round = Cell::new(0usize);
    let config = Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    };
    let strategy = (
        prop::collection::vec(-5i64..40, 1..60),
        prop::collection::vec(
            (any::<bool>(), -5i64..40, any::<prop::sample::Index>()),
            0..40,
        ),
        1usize..7,
        0usize..3,
        any::<bool>(),
        prop::option::of(0u8..10),
    );
    let result =
        TestRunner::new(config).run(&strategy, |(times, churn, limit, sort, desc, digit)| {
            let k = round.get();
            round.set(k + 1);
            let filter = digit.map(|d| d.to_string());
            let shape = Shape {
                limit,
                sort_pick: sort,
                desc,
                filter: filter.as_deref(),
            };
            churn_round(&*store, k, &times, churn, &shape)
        });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// How one round walks its pages.
struct Shape<'a> {
    limit: usize,
    sort_pick: usize,
    desc: bool,
    filter: Option<&'a str>,
}

fn churn_round(
    store: &dyn Store,
    k: usize,
    times: &[i64],
    churn: Vec<(bool, i64, prop::sample::Index)>,
    shape: &Shape<'_>,
) -> Result<(), TestCaseError> {
    let (limit, desc, filter) = (shape.limit, shape.desc, shape.filter);
    let sort_pick = shape.sort_pick;
    let (acme, other) = (format!("acme{k}"), format!("other{k}"));
    let make =
        |org_name: &str, n: usize, t: i64| named_secret(org_name, &format!("r{k}-id-{n:05}"), n, t);
    let sort = [SortField::Name, SortField::CreatedAt, SortField::UpdatedAt][sort_pick];
    let order = if desc { Order::Desc } else { Order::Asc };
    // Another org's secrets must never show up.
    store
        .insert_secret(&make(&other, 99_999, 0), audit(&other))
        .unwrap();
    let mut n = 0;
    let mut live = Vec::new();
    for t in times {
        let s = make(&acme, n, *t);
        store.insert_secret(&s, audit(&acme)).unwrap();
        live.push(s.id.clone());
        n += 1;
    }
    let names: std::collections::BTreeMap<SecretId, String> = (0..n)
        .map(|i| {
            let s = make(&acme, i, 0);
            (s.id, s.name)
        })
        .collect();
    let initial: BTreeSet<SecretId> = live
        .iter()
        .filter(|id| filter.is_none_or(|f| names[*id].contains(f)))
        .cloned()
        .collect();
    let mut removed = BTreeSet::new();
    let mut seen: Vec<SecretRecord> = Vec::new();
    let mut cursor: Option<Cursor> = None;
    let mut churn = churn.into_iter();
    loop {
        let page = store
            .page_secrets(
                &org(&acme),
                &SecretPageQuery {
                    sort,
                    order,
                    after: cursor.as_ref(),
                    limit,
                    name_contains: filter,
                },
            )
            .unwrap();
        prop_assert!(page.items.len() <= limit);
        prop_assert!(page.items.iter().all(|s| s.org == *acme));
        prop_assert!(
            page.items
                .iter()
                .all(|s| filter.is_none_or(|f| s.name.contains(f)))
        );
        seen.extend(page.items.iter().cloned());
        if !page.more {
            break;
        }
        cursor = page.items.last().map(|s| cursor_of(s, sort, order));
        if let Some((insert, t, idx)) = churn.next() {
            if insert {
                let s = make(&acme, n, t);
                n += 1;
                store.insert_secret(&s, audit(&acme)).unwrap();
                live.push(s.id.clone());
            } else if !live.is_empty() {
                let id = live.remove(idx.index(live.len()));
                store
                    .delete_secret(&org(&acme), &id, &mut |_| (audit(&acme), None))
                    .unwrap();
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
    Ok(())
}

/// The name filter is a case-insensitive substring; `total` counts what matches, per org.
pub fn name_filter_and_total(b: &dyn Backend) {
    let store = b.open();
    for (i, name) in ["Alpha_DB", "beta", "gamma-db"].iter().enumerate() {
        let mut s = secret("acme", i, i as i64);
        s.name = (*name).to_owned();
        store.insert_secret(&s, audit("acme")).unwrap();
    }
    // Names between the matches, more than a backend might read in one go.
    for i in 0..300 {
        let mut s = secret("acme", 1000 + i, 0);
        s.name = format!("f-{i:03}");
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
    let next = cursor_of(&page.items[0], SortField::Name, Order::Asc);
    let page = store
        .page_secrets(
            &org("acme"),
            &SecretPageQuery {
                after: Some(&next),
                ..q
            },
        )
        .unwrap();
    assert_eq!(
        (page.items.len(), page.items[0].name.as_str(), page.more),
        (1, "gamma-db", false)
    );
    let all = SecretPageQuery {
        name_contains: None,
        limit: 10,
        ..q
    };
    assert_eq!(store.page_secrets(&org("acme"), &all).unwrap().total, 303);
    assert_eq!(store.page_secrets(&org("nobody"), &all).unwrap().total, 0);
    // A cursor made for another sort is refused.
    let by_time = SecretPageQuery {
        sort: SortField::CreatedAt,
        after: Some(&next),
        ..all
    };
    assert!(matches!(
        store.page_secrets(&org("acme"), &by_time),
        Err(StoreError::Rejected(Rejected::Cursor))
    ));
}

/// A name is unique within its organization (not across them); a taken id or placeholder is
/// a generated-id collision; a refused insert changes nothing.
pub fn secret_uniqueness_conflicts(b: &dyn Backend) {
    let store = b.open();
    let first = secret("acme", 1, 1);
    store.insert_secret(&first, audit("acme")).unwrap();
    let mut same_name = secret("acme", 2, 2);
    same_name.name = first.name.clone();
    match store.insert_secret(&same_name, audit("acme")) {
        Err(StoreError::Conflict(Conflict::SecretName(name))) => assert_eq!(name, first.name),
        other => panic!("a second {:?} in acme: {other:?}", first.name),
    }
    let mut same_id = secret("acme", 3, 3);
    same_id.id = first.id.clone();
    assert!(matches!(
        store.insert_secret(&same_id, audit("acme")),
        Err(StoreError::Conflict(Conflict::GeneratedId))
    ));
    let mut same_placeholder = secret("other", 4, 4);
    same_placeholder.placeholder = first.placeholder.clone();
    assert!(matches!(
        store.insert_secret(&same_placeholder, audit("other")),
        Err(StoreError::Conflict(Conflict::GeneratedId))
    ));
    // Another organization may use the name.
    let mut elsewhere = secret("other", 5, 5);
    elsewhere.name = first.name.clone();
    store.insert_secret(&elsewhere, audit("other")).unwrap();
    // Nothing of the refused inserts was written, audit included.
    assert_eq!(store.list_secrets(&org("acme")).unwrap().len(), 1);
    assert_eq!(
        store
            .secret_by_name(&org("acme"), &first.name)
            .unwrap()
            .map(|s| s.id),
        Some(first.id.clone())
    );
    assert!(store.secret(&org("acme"), &same_name.id).unwrap().is_none());
    let (entries, total) = store
        .audit_page(&org("acme"), None, 100, crate::store::Direction::Asc)
        .unwrap();
    assert_eq!(
        (entries.len(), total),
        (1, 1),
        "only the one create is audited"
    );
    // Deleting frees the name.
    store
        .delete_secret(&org("acme"), &first.id, &mut |_| (audit("acme"), None))
        .unwrap();
    store.insert_secret(&same_name, audit("acme")).unwrap();
}

/// Another organization's secret reads as absent and cannot be changed or deleted.
pub fn another_orgs_secret_is_not_found(b: &dyn Backend) {
    let store = b.open();
    let s = secret("acme", 1, 1);
    store.insert_secret(&s, audit("acme")).unwrap();
    let thief = org("thief");
    assert!(store.secret(&thief, &s.id).unwrap().is_none());
    assert!(store.secret_by_name(&thief, &s.name).unwrap().is_none());
    assert!(store.list_secrets(&thief).unwrap().is_empty());
    let mut called = false;
    let r = store.update_secret(&thief, &s.id, &mut |old| {
        called = true;
        Ok((old.clone(), audit("thief")))
    });
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert!(!called, "the change must not even see the record");
    let r = store.delete_secret(&thief, &s.id, &mut |_| (audit("thief"), None));
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let r = store.update_secret(&org("acme"), &sid("no-such"), &mut |old| {
        Ok((old.clone(), audit("acme")))
    });
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert_eq!(
        store.secret(&org("acme"), &s.id).unwrap().map(|r| r.id),
        Some(s.id)
    );
    assert_eq!(
        store
            .audit_page(&thief, None, 10, crate::store::Direction::Asc)
            .unwrap()
            .1,
        0
    );
}

/// An update may not change a secret's id, organization, name or placeholder; a refused
/// update changes nothing. An allowed one lands, durably.
pub fn secret_identity_is_immutable(b: &dyn Backend) {
    let store = b.open();
    let s = secret("acme", 1, 1);
    store.insert_secret(&s, audit("acme")).unwrap();
    let changes: [&dyn Fn(&mut SecretRecord); 4] = [
        &|r| r.id = sid("id-99999"),
        &|r| r.org = org("other"),
        &|r| r.name = "renamed".into(),
        &|r| r.placeholder = "ph-new".into(),
    ];
    for change in changes {
        let r = store.update_secret(&org("acme"), &s.id, &mut |old| {
            let mut new = old.clone();
            change(&mut new);
            new.description = Some("should not land".into());
            Ok((new, audit("acme")))
        });
        assert!(
            matches!(r, Err(StoreError::Rejected(Rejected::Identity))),
            "{r:?}"
        );
    }
    // A change's own refusal is passed through, and changes nothing either.
    let r = store.update_secret(&org("acme"), &s.id, &mut |_| {
        Err(StoreError::Rejected(Rejected::Tombstone))
    });
    assert!(matches!(r, Err(StoreError::Rejected(Rejected::Tombstone))));
    assert_eq!(
        store
            .secret(&org("acme"), &s.id)
            .unwrap()
            .unwrap()
            .description,
        None
    );
    let updated = store
        .update_secret(&org("acme"), &s.id, &mut |old| {
            let mut new = old.clone();
            new.description = Some("changed".into());
            new.updated_at = 50;
            new.revision = old.revision.next();
            Ok((new, audit("acme")))
        })
        .unwrap();
    drop(store);
    let store = b.open();
    let got = store.secret(&org("acme"), &s.id).unwrap().unwrap();
    assert_eq!(got.description.as_deref(), Some("changed"));
    assert_eq!((got.updated_at, got.revision), (50, updated.revision));
    let (entries, _) = store
        .audit_page(&org("acme"), None, 100, crate::store::Direction::Asc)
        .unwrap();
    assert_eq!(entries.len(), 2, "create + the one update that landed");
}

/// Every field comes back exactly as written, whatever the text holds (NUL, escapes,
/// non-ASCII), and the same after a reopen: the store is not the place that refuses text.
pub fn records_round_trip_exactly(b: &dyn Backend) {
    let store = b.open();
    let odd = "nul\u{0}\u{1}tab\t\"quote\\ é 🗝 \u{fffd}\u{7f}";
    let mut s = secret("acme", 1, -7);
    s.description = Some(odd.into());
    s.hosts = vec!["api.example.com".into(), "*.example.org".into()];
    s.body_substitution = true;
    s.wrong_host = veil_link::WrongHost::Block;
    s.revision = crate::store::Revision(u64::MAX - 1);
    s.updated_at = i64::MAX;
    s.sealed = crate::store::conformance::fixtures::sealed("k", odd);
    let mut a = audit("acme");
    a.target_name = Some(odd.into());
    a.changes = serde_json::json!({"description": {"from": null, "to": odd}});
    store.insert_secret(&s, a).unwrap();
    let usage = crate::store::UsageDelta {
        secret_id: s.id.clone(),
        sandbox: "sb".parse().unwrap(),
        host: odd.into(),
        counts: crate::store::UsageCounts {
            substituted: 1,
            ..Default::default()
        },
        at: 5,
    };
    let recorded = store
        .record_usage(std::slice::from_ref(&usage), &mut |_, _| {
            let mut a = audit("acme");
            a.changes = serde_json::json!({ "host": odd });
            Some(a)
        })
        .unwrap();
    assert_eq!(recorded, 1);
    drop(store);
    let store = b.open();
    let got = store.secret(&org("acme"), &s.id).unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&got).unwrap(),
        serde_json::to_value(&s).unwrap(),
        "the record changed on its way through the store"
    );
    let u = store.secret_usage(&s.id).unwrap();
    assert_eq!(u.hosts.keys().collect::<Vec<_>>(), [odd]);
    let (entries, _) = store
        .audit_page(&org("acme"), None, 10, crate::store::Direction::Asc)
        .unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].target_name.as_deref(), Some(odd));
    assert_eq!(entries[0].changes["description"]["to"], odd);
    assert_eq!(entries[1].changes["host"], odd);
}
