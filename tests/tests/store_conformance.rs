//! Issue 16: the store's conformance suite (`veil_control::store::conformance`, the same cases
//! control's unit tests run on sled) against PostgreSQL: the harness's private server, a fresh
//! database per case, each reopen a new connection (a new pool, as another replica would).

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use veil_control::store::Store;
use veil_control::store::conformance::fixtures::{Backend, run};
use veil_control::store::postgres::{Connection, PgStore};
use veil_tests::postgres::Postgres;

/// One server for the cases that run at the same time; the last case to finish stops it.
static SERVER: Mutex<Weak<Postgres>> = Mutex::new(Weak::new());

fn server() -> Arc<Postgres> {
    let mut slot = SERVER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(pg) = slot.upgrade() {
        return pg;
    }
    let pg = Arc::new(Postgres::start());
    *slot = Arc::downgrade(&pg);
    pg
}

/// A database of its own on the shared server.
struct Pg {
    conn: Connection,
    _server: Arc<Postgres>,
}

impl Pg {
    fn new(database: &str) -> Pg {
        let server = server();
        server.psql(&format!("CREATE DATABASE {database}"));
        let url = server
            .url()
            .strip_suffix("/postgres")
            .map(|base| format!("{base}/{database}"))
            .expect("the harness URL names database postgres");
        // Loopback: no TLS, so no CA file is read.
        let conn = Connection::new(url.parse().expect("URL"), Path::new("")).expect("connection");
        Pg {
            conn,
            _server: server,
        }
    }
}

impl Backend for Pg {
    fn open(&self) -> Box<dyn Store> {
        Box::new(PgStore::connect(&self.conn).expect("connect to the test database"))
    }
}

macro_rules! pg_runner {
    ($($module:ident :: $case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let backend = Pg::new(stringify!($case));
                run(veil_control::store::conformance::$module::$case, &backend);
            }
        )*
    };
}

veil_control::store_conformance_cases!(pg_runner);

/// PostgreSQL's own check: index columns that disagree with their documents, rows that point
/// at nothing, and a write counter that would reuse sequence numbers are all reported.
#[test]
fn consistency_flags_rows_that_contradict_their_documents() {
    use veil_control::store::conformance::fixtures::{
        audit, org, rotated, sandbox, secret, tombstone_of,
    };
    use veil_control::store::{ApiKeyRecord, UsageCounts, UsageDelta};
    let server = server();
    // The database `postgres` itself: psql reaches it (no other case uses it).
    let conn =
        Connection::new(server.url().parse().expect("URL"), Path::new("")).expect("connection");
    let store = PgStore::connect(&conn).expect("connect");
    let gone = rotated(1);
    store.insert_secret(&gone, audit("acme")).expect("insert");
    store
        .delete_secret(&org("acme"), &gone.id, &mut |s| {
            (audit("acme"), Some(tombstone_of(s, 5)))
        })
        .expect("delete");
    let kept = secret("acme", 2, 1);
    store.insert_secret(&kept, audit("acme")).expect("insert");
    let delta = UsageDelta {
        secret_id: kept.id.clone(),
        sandbox: "sb".parse().expect("id"),
        host: "h".into(),
        counts: UsageCounts {
            substituted: 1,
            ..Default::default()
        },
        at: 1,
    };
    store
        .record_usage(&[delta], &mut |_, _| None)
        .expect("usage");
    store
        .put_sandbox(&sandbox("sb", "veil.slice/a", "A"), audit("acme"))
        .expect("sandbox");
    let key = ApiKeyRecord {
        id: "k1".into(),
        org: org("acme"),
        permissions: vec![],
        hash: "h".into(),
        created_at: 1,
    };
    store.create_api_key(&key, audit("acme")).expect("key");
    assert_eq!(
        store.check_consistency().expect("check"),
        Vec::<String>::new()
    );
    server.psql(
        "UPDATE sandboxes SET cgroup = 'veil.slice/b'; \
         UPDATE api_keys SET org = 'ghost'; \
         UPDATE tombstones SET org = 'ghost'; \
         UPDATE audit SET org = 'ghost' WHERE seq = (SELECT min(seq) FROM audit); \
         UPDATE write_counter SET next_seq = 2; \
         DELETE FROM secrets",
    );
    let problems = store.check_consistency().expect("check").join("\n");
    for want in [
        "sandbox sb: columns disagree with the record",
        "api key k1: columns disagree with the record",
        "api key k1: its organization has no record",
        "tombstone id-00001: columns disagree with the record",
        "usage of secret id-00002: the secret does not exist",
        "audit 1: columns disagree with the entry",
        "write counter: next sequence number 2 is not above the newest entry's",
    ] {
        assert!(
            problems.contains(want),
            "{want:?} not reported in:\n{problems}"
        );
    }
}

/// Two replicas (two stores, each its own pool) writing at once, two threads each: every
/// create and every usage report counts exactly once, and each audit entry has its own seq.
#[test]
fn replicas_writing_at_once_lose_nothing() {
    use veil_control::store::conformance::fixtures::{audit, named_secret, org, secret};
    use veil_control::store::{Direction, UsageCounts, UsageDelta};
    const PER_THREAD: usize = 20;
    let backend = Pg::new("replicas_writing_at_once");
    let replicas = [backend.open(), backend.open()];
    let shared = secret("acme", 9_999, 0);
    replicas[0]
        .insert_secret(&shared, audit("acme"))
        .expect("insert");
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (store, shared) = (&*replicas[t % 2], &shared);
            scope.spawn(move || {
                for i in 0..PER_THREAD {
                    let s = named_secret("acme", &format!("r-{t}-{i:03}"), t * 100 + i, 0);
                    store.insert_secret(&s, audit("acme")).expect("insert");
                    let delta = UsageDelta {
                        secret_id: shared.id.clone(),
                        sandbox: "sb".parse().expect("id"),
                        host: "h.test".into(),
                        counts: UsageCounts {
                            substituted: 1,
                            ..Default::default()
                        },
                        at: 1,
                    };
                    store
                        .record_usage(&[delta], &mut |_, _| Some(audit("acme")))
                        .expect("usage");
                }
            });
        }
    });
    let writes = 4 * PER_THREAD;
    for store in &replicas {
        assert_eq!(
            store.list_secrets(&org("acme")).expect("list").len(),
            writes + 1
        );
        let usage = store.secret_usage(&shared.id).expect("usage");
        assert_eq!(usage.hosts["h.test"].counts.substituted, writes as u64);
        let (entries, total) = store
            .audit_page(&org("acme"), None, 10 * writes, Direction::Asc)
            .expect("audit");
        assert_eq!((entries.len(), total), (1 + 2 * writes, 1 + 2 * writes));
        assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(store.check_consistency().expect("check").is_empty());
    }
}
