//! Grace-period state: rotated-out values and tombstones round trip, the sweep drops what
//! is due, rekey re-seals every value.

use crate::store::conformance::fixtures::{
    Backend, audit, org, prev, rotated, sealed, secret, sid, tombstone_of,
};
use crate::store::{Revision, StoreError, Swept};

/// Previous values and tombstones come back as written after a reopen; a tombstone naming
/// another secret is refused.
pub fn previous_values_and_tombstones_round_trip_durably(b: &dyn Backend) {
    let store = b.open();
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
    let store = b.open();
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
    // The name is free again at once.
    let mut again = secret("acme", 3, 1);
    again.name = gone.name.clone();
    store.insert_secret(&again, audit("acme")).unwrap();
}

/// The sweep drops values replaced at or before the cutoff, and tombstones left empty; it
/// never touches `updated_at`; what it did is durable.
pub fn sweep_drops_values_past_the_cutoff_and_empty_tombstones(b: &dyn Backend) {
    let store = b.open();
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
    let store = b.open();
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

/// Rekey re-seals current, previous and tombstoned values, each with its own binding
/// revision; the key ids in use follow, durably.
pub fn reseal_and_key_ids_cover_previous_and_tombstoned_values(b: &dyn Backend) {
    let store = b.open();
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
    drop(store);
    let store = b.open();
    assert_eq!(store.key_ids_in_use().unwrap(), ["new"]);
    let got = store.secret(&org("acme"), &live.id).unwrap().unwrap();
    assert_eq!(
        got.previous[1].sealed,
        sealed("new", &format!("{}-1", live.id))
    );
    assert_eq!(
        store.tombstones().unwrap()[0].values[2].sealed,
        sealed("new", &format!("{}-1", gone.id))
    );
}
