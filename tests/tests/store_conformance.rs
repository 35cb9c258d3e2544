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
