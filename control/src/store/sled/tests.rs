//! Unit tests of the sled backend: the conformance suite (a fresh store in a temp dir per
//! case, reopened from that dir), and what only sled has (raw records, trees written directly).

use super::*;
use crate::store::conformance::fixtures::{Backend, audit, rotated, secret, tombstone_of};
use crate::store::{Store, WrongHost};

/// A store in its own temp dir; every `open` reopens that dir.
struct Sled(tempfile::TempDir);

impl Backend for Sled {
    fn open(&self) -> Box<dyn Store> {
        // sled releases its file lock when its flusher thread lets go of the dropped store,
        // a moment after the drop: a reopen right after may find it still held.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(self.0.path()) {
                Ok(store) => return Box::new(store),
                Err(e)
                    if std::time::Instant::now() < deadline && e.to_string().contains("lock") =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening the sled store: {e}"),
            }
        }
    }
}

macro_rules! sled_runner {
    ($($module:ident :: $case:ident),* $(,)?) => {
        mod conformance {
            $(
                #[test]
                fn $case() {
                    let backend = super::Sled(tempfile::tempdir().unwrap());
                    crate::store::conformance::fixtures::run(
                        crate::store::conformance::$module::$case,
                        &backend,
                    );
                }
            )*
        }
    };
}

crate::store_conformance_cases!(sled_runner);

#[test]
fn records_without_issue_6_fields_still_load() {
    let mut v = serde_json::to_value(secret("acme", 1, 1)).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("body_substitution");
    o.remove("wrong_host");
    let r: SecretRecord = dec("secrets", v.to_string().as_bytes()).unwrap();
    assert!(!r.body_substitution);
    assert_eq!(r.wrong_host, WrongHost::Forward);
}

#[test]
fn records_without_previous_values_load_and_encode_without_them() {
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
