//! Sandboxes: one per cgroup, kept to their organization, immutable identity, and the
//! rollback of a write the agents refused.

use crate::store::conformance::fixtures::{Backend, audit, org, sandbox, sbid};
use crate::store::{Conflict, Rejected, SandboxRecord, StoreError};

/// A rollback undoes exactly the write it names: a new record goes, a replaced one comes
/// back with its cgroup; a superseded write is left alone; a cgroup taken meanwhile refuses.
pub fn restore_undoes_only_the_write_it_names(b: &dyn Backend) {
    let store = b.open();
    // A new record rolled back: gone, cgroup free.
    let new = sandbox("sb", "veil.slice/a", "A");
    assert!(store.put_sandbox(&new, audit("acme")).unwrap(), "new");
    assert!(store.restore_sandbox(&new, None, audit("acme")).unwrap());
    assert!(store.sandbox(&sbid("sb")).unwrap().is_none());
    store
        .put_sandbox(&sandbox("other", "veil.slice/a", "A"), audit("acme"))
        .unwrap();
    // A replacement rolled back: the previous record and its cgroup come back.
    let old = sandbox("sb", "veil.slice/b", "A");
    store.put_sandbox(&old, audit("acme")).unwrap();
    let moved = sandbox("sb", "veil.slice/c", "B");
    assert!(
        !store.put_sandbox(&moved, audit("acme")).unwrap(),
        "replaced"
    );
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
    // The previous cgroup was taken meanwhile: the rollback refuses and changes nothing.
    let moved = sandbox("sb", "veil.slice/d", "B");
    store.put_sandbox(&moved, audit("acme")).unwrap();
    store
        .put_sandbox(&sandbox("y", "veil.slice/b", "A"), audit("acme"))
        .unwrap();
    let r = store.restore_sandbox(&moved, Some(&old), audit("acme"));
    assert!(
        matches!(r, Err(StoreError::Conflict(Conflict::CgroupMeanwhile(ref c))) if c == "veil.slice/b"),
        "{r:?}"
    );
    assert_eq!(store.sandbox(&sbid("sb")).unwrap().as_ref(), Some(&moved));
    drop(store);
    let store = b.open();
    let ids: Vec<String> = store
        .list_sandboxes()
        .unwrap()
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    assert_eq!(ids, ["other", "sb", "x", "y"]);
}

/// A cgroup belongs to one sandbox, whichever organization asks; a refused write changes
/// nothing, and deleting a sandbox frees its cgroup.
pub fn cgroup_is_unique(b: &dyn Backend) {
    let store = b.open();
    let first = sandbox("one", "veil.slice/a", "A");
    store.put_sandbox(&first, audit("acme")).unwrap();
    let r = store.put_sandbox(&sandbox("two", "veil.slice/a", "B"), audit("acme"));
    assert!(
        matches!(r, Err(StoreError::Conflict(Conflict::Cgroup(ref c))) if c == "veil.slice/a"),
        "{r:?}"
    );
    let mut foreign = sandbox("three", "veil.slice/a", "C");
    foreign.org = org("other");
    let r = store.put_sandbox(&foreign, audit("other"));
    assert!(
        matches!(r, Err(StoreError::Conflict(Conflict::Cgroup(_)))),
        "{r:?}"
    );
    // Moving onto a taken cgroup is refused too; re-putting its own is not.
    store
        .put_sandbox(&sandbox("two", "veil.slice/b", "B"), audit("acme"))
        .unwrap();
    let r = store.put_sandbox(&sandbox("two", "veil.slice/a", "B"), audit("acme"));
    assert!(
        matches!(r, Err(StoreError::Conflict(Conflict::Cgroup(_)))),
        "{r:?}"
    );
    store.put_sandbox(&first, audit("acme")).unwrap();
    assert_eq!(
        store.sandbox(&sbid("two")).unwrap().map(|s| s.cgroup),
        Some("veil.slice/b".to_owned())
    );
    assert!(store.sandbox(&sbid("three")).unwrap().is_none());
    store
        .delete_sandbox(&org("acme"), &sbid("one"), audit("acme"))
        .unwrap();
    store
        .put_sandbox(&sandbox("two", "veil.slice/a", "B"), audit("acme"))
        .unwrap();
    // The cgroup `two` left is free again.
    store
        .put_sandbox(&sandbox("four", "veil.slice/b", "B"), audit("acme"))
        .unwrap();
}

/// Another organization's sandbox cannot be replaced, changed or deleted: NotFound, and it
/// stays as it was.
pub fn another_orgs_sandbox_is_not_found(b: &dyn Backend) {
    let store = b.open();
    let mine = sandbox("sb", "veil.slice/a", "A");
    store.put_sandbox(&mine, audit("acme")).unwrap();
    let mut theirs = sandbox("sb", "veil.slice/z", "Z");
    theirs.org = org("thief");
    let r = store.put_sandbox(&theirs, audit("thief"));
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let mut called = false;
    let r = store.update_sandbox(&org("thief"), &sbid("sb"), &mut |old| {
        called = true;
        Ok((old.clone(), audit("thief")))
    });
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert!(!called, "the change must not even see the record");
    let r = store.delete_sandbox(&org("thief"), &sbid("sb"), audit("thief"));
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    let r = store.delete_sandbox(&org("acme"), &sbid("nope"), audit("acme"));
    assert!(matches!(r, Err(StoreError::NotFound)), "{r:?}");
    assert_eq!(store.sandbox(&sbid("sb")).unwrap().as_ref(), Some(&mine));
    // The cgroup the refused write named is still free.
    store
        .put_sandbox(&sandbox("other", "veil.slice/z", "A"), audit("acme"))
        .unwrap();
    assert_eq!(
        store
            .audit_page(&org("thief"), None, 10, crate::store::Direction::Asc)
            .unwrap()
            .1,
        0
    );
}

/// An update may not change a sandbox's id, organization or cgroup; mounts change, durably.
pub fn sandbox_identity_is_immutable(b: &dyn Backend) {
    let store = b.open();
    let sb = sandbox("sb", "veil.slice/a", "A");
    store.put_sandbox(&sb, audit("acme")).unwrap();
    let changes: [&dyn Fn(&mut crate::store::SandboxRecord); 3] =
        [&|r| r.id = sbid("other"), &|r| r.org = org("other"), &|r| {
            r.cgroup = "veil.slice/b".into()
        }];
    for change in changes {
        let r = store.update_sandbox(&org("acme"), &sbid("sb"), &mut |old| {
            let mut new = old.clone();
            change(&mut new);
            new.mounts.clear();
            Ok((new, audit("acme")))
        });
        assert!(
            matches!(r, Err(StoreError::Rejected(Rejected::Identity))),
            "{r:?}"
        );
    }
    assert_eq!(store.sandbox(&sbid("sb")).unwrap().as_ref(), Some(&sb));
    let changed = store
        .update_sandbox(&org("acme"), &sbid("sb"), &mut |old| {
            let mut new = old.clone();
            new.mounts[0].env = "RENAMED".into();
            new.updated_at = 9;
            Ok((new, audit("acme")))
        })
        .unwrap();
    drop(store);
    let store = b.open();
    assert_eq!(store.sandbox(&sbid("sb")).unwrap(), Some(changed));
    assert!(store.sandbox(&sbid("other")).unwrap().is_none());
}

/// Declared sandboxes hold no cgroup (any number of them); a bind (compare-and-swap from the
/// declaration) takes its cgroup, refused when another sandbox holds it or the declaration
/// changed meanwhile; an unbind frees the cgroup, keeping the declaration or removing it.
pub fn declare_bind_unbind(b: &dyn Backend) {
    let store = b.open();
    let declared = |id: &str, keep: bool| SandboxRecord {
        cgroup: String::new(),
        bound: false,
        keep,
        ..sandbox(id, "", "A")
    };
    let d1 = declared("d1", true);
    let d2 = declared("d2", false);
    store.put_sandbox(&d1, audit("acme")).unwrap();
    store.put_sandbox(&d2, audit("acme")).unwrap();
    store
        .put_sandbox(&sandbox("put", "veil.slice/p", "A"), audit("acme"))
        .unwrap();
    // Bind d1 to a free cgroup: the cgroup is taken, the id kept.
    let b1 = SandboxRecord {
        cgroup: "docker/c1".into(),
        netns: Some("/run/veil/netns/d1/7".into()),
        bound: true,
        cgroup_id: Some(7),
        ..d1.clone()
    };
    assert!(
        store
            .restore_sandbox(&d1, Some(&b1), audit("acme"))
            .unwrap()
    );
    // A second bind from the same declaration is stale: nothing changes.
    let again = SandboxRecord {
        cgroup: "docker/c9".into(),
        cgroup_id: Some(9),
        ..b1.clone()
    };
    assert!(
        !store
            .restore_sandbox(&d1, Some(&again), audit("acme"))
            .unwrap()
    );
    // d2 onto d1's cgroup, or a one-step PUT's: refused, d2 stays declared.
    for taken in ["docker/c1", "veil.slice/p"] {
        let onto = SandboxRecord {
            cgroup: taken.into(),
            bound: true,
            cgroup_id: Some(8),
            ..d2.clone()
        };
        let r = store.restore_sandbox(&d2, Some(&onto), audit("acme"));
        assert!(
            matches!(r, Err(StoreError::Conflict(Conflict::CgroupMeanwhile(ref c))) if c == taken),
            "{r:?}"
        );
        let r = store.put_sandbox(&onto, audit("acme"));
        assert!(
            matches!(r, Err(StoreError::Conflict(Conflict::Cgroup(_)))),
            "{r:?}"
        );
    }
    assert_eq!(store.sandbox(&sbid("d2")).unwrap().as_ref(), Some(&d2));
    // An update may not bind or unbind (only the swap does).
    let r = store.update_sandbox(&org("acme"), &sbid("d2"), &mut |old| {
        Ok((
            SandboxRecord {
                bound: true,
                ..old.clone()
            },
            audit("acme"),
        ))
    });
    assert!(
        matches!(r, Err(StoreError::Rejected(Rejected::Identity))),
        "{r:?}"
    );
    drop(store);
    let store = b.open();
    assert_eq!(store.sandbox(&sbid("d1")).unwrap().as_ref(), Some(&b1));
    // Unbind with keep: declared again, the cgroup free for d2.
    assert!(
        store
            .restore_sandbox(&b1, Some(&d1), audit("acme"))
            .unwrap()
    );
    let b2 = SandboxRecord {
        cgroup: "docker/c1".into(),
        bound: true,
        cgroup_id: Some(11),
        ..d2.clone()
    };
    assert!(
        store
            .restore_sandbox(&d2, Some(&b2), audit("acme"))
            .unwrap()
    );
    // Unbind without keep: the record goes, and its cgroup with it.
    assert!(store.restore_sandbox(&b2, None, audit("acme")).unwrap());
    drop(store);
    let store = b.open();
    assert!(store.sandbox(&sbid("d2")).unwrap().is_none());
    assert_eq!(store.sandbox(&sbid("d1")).unwrap().as_ref(), Some(&d1));
    store
        .put_sandbox(&sandbox("free", "docker/c1", "A"), audit("acme"))
        .unwrap();
    let mut ids: Vec<String> = store
        .list_sandboxes()
        .unwrap()
        .iter()
        .map(|s| s.id.to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["d1", "free", "put"]);
}
