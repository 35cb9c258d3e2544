//! Several writers at once: nothing lost, nothing duplicated, and a reader following the
//! audit log never skips an entry that commits late.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::store::conformance::fixtures::{Backend, audit, audit_of, named_secret, org, secret};
use crate::store::{AuditRecord, Direction, UsageCounts, UsageDelta};

/// Writers on several threads at once: no write is lost or duplicated, every sequence
/// number is distinct and each thread's entries are numbered in the order it wrote them.
pub fn concurrent_writers_lose_nothing(b: &dyn Backend) {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 25;
    let store = b.open();
    let shared = secret("acme", 9_999, 0);
    store.insert_secret(&shared, audit("acme")).unwrap();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (store, shared) = (&*store, &shared);
            scope.spawn(move || {
                for i in 0..PER_THREAD {
                    let n = t * PER_THREAD + i;
                    let s = named_secret("acme", &format!("c-{t}-{i:03}"), n, n as i64);
                    store
                        .insert_secret(&s, audit_of("acme", &format!("t{t}"), &format!("{i:03}")))
                        .unwrap();
                    let d = |id: &crate::store::SecretId| UsageDelta {
                        secret_id: id.clone(),
                        sandbox: "sb".parse().unwrap(),
                        host: format!("h{t}.test"),
                        counts: UsageCounts {
                            substituted: 1,
                            ..Default::default()
                        },
                        at: n as i64,
                    };
                    let recorded = store
                        .record_usage(&[d(&s.id), d(&shared.id)], &mut |_, _| {
                            Some(audit_of("acme", &format!("u{t}"), &format!("{i:03}")))
                        })
                        .unwrap();
                    assert_eq!(recorded, 2);
                }
            });
        }
    });
    drop(store);
    let store = b.open();
    let total = THREADS * PER_THREAD;
    assert_eq!(store.list_secrets(&org("acme")).unwrap().len(), total + 1);
    let u = store.secret_usage(&shared.id).unwrap();
    for t in 0..THREADS {
        assert_eq!(
            u.hosts[&format!("h{t}.test")].counts.substituted,
            PER_THREAD as u64,
            "usage of thread {t} on the shared secret"
        );
    }
    for s in store.list_secrets(&org("acme")).unwrap() {
        if s.id != shared.id {
            let mine = store.secret_usage(&s.id).unwrap();
            let n: u64 = mine.hosts.values().map(|h| h.counts.substituted).sum();
            assert_eq!(n, 1, "usage of {}", s.id);
        }
    }
    let (entries, count) = store
        .audit_page(&org("acme"), None, 10 * total, Direction::Asc)
        .unwrap();
    assert_eq!(
        count,
        1 + 3 * total,
        "one create and two usage entries per write"
    );
    assert_eq!(entries.len(), count);
    let mut seqs: Vec<u64> = entries.iter().map(|a| a.seq).collect();
    seqs.dedup();
    assert_eq!(seqs.len(), count, "a sequence number was repeated");
    for t in 0..THREADS {
        for kind in ["t", "u"] {
            let action = format!("{kind}{t}");
            let mine: Vec<&str> = entries
                .iter()
                .filter(|a| a.action == action)
                .map(|a| a.target_id.as_str())
                .collect();
            let mut sorted = mine.clone();
            sorted.sort();
            assert_eq!(mine, sorted, "{action}: numbered out of its write order");
        }
    }
}

/// A reader that follows the audit log (each page strictly after the last entry it saw)
/// while several writers commit ends up with every entry: a sequence number is never
/// visible before a smaller one.
pub fn audit_reader_never_skips_a_late_commit(b: &dyn Backend) {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 30;
    let store = b.open();
    let done = AtomicBool::new(false);
    let mut seen: Vec<AuditRecord> = Vec::new();
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = &*store;
                scope.spawn(move || {
                    for i in 0..PER_THREAD {
                        let s = named_secret("acme", &format!("w-{t}-{i:03}"), t * 100 + i, 0);
                        store.insert_secret(&s, audit("acme")).unwrap();
                    }
                })
            })
            .collect();
        let reader = scope.spawn(|| {
            let mut seen: Vec<AuditRecord> = Vec::new();
            loop {
                // Read the flag first: a page read after every writer finished sees all.
                let last_round = done.load(Ordering::SeqCst);
                let after = seen.last().map(|a| a.seq);
                let (page, _) = store
                    .audit_page(&org("acme"), after, 7, Direction::Asc)
                    .unwrap();
                let empty = page.is_empty();
                seen.extend(page);
                if last_round && empty {
                    return seen;
                }
            }
        });
        for w in writers {
            w.join().unwrap();
        }
        done.store(true, Ordering::SeqCst);
        seen = reader.join().unwrap();
    });
    let (all, total) = store
        .audit_page(
            &org("acme"),
            None,
            10 * THREADS * PER_THREAD,
            Direction::Asc,
        )
        .unwrap();
    assert_eq!(total, THREADS * PER_THREAD);
    let seqs = |v: &[AuditRecord]| v.iter().map(|a| a.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(&seen),
        seqs(&all),
        "the following reader missed (or repeated) entries"
    );
}
