//! veil-control replicas on one PostgreSQL: their config, and replicas started with another
//! replica's key files (every replica needs the same keys).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::control::Control;
use crate::postgres::Postgres;

/// The `[store]` table pointing at `pg` (over loopback TCP: no TLS, no password).
pub fn store_config(pg: &Postgres) -> String {
    format!("[store]\nbackend = \"postgres\"\nurl = {:?}\n", pg.url())
}

/// API-only replica config: no agent required, no host-path checks.
pub fn api_only(pg: &Postgres) -> String {
    format!(
        "{}[sandbox]\ncheck_paths = false\n[agent]\nrequired = false\n",
        store_config(pg)
    )
}

/// Copies the key files of `from` (a data dir) into `to` (created 0700; files 0600).
pub fn copy_keys(from: &Path, to: &Path) {
    let (src, dst) = (from.join("keys"), to.join("keys"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dst)
        .expect("keys dir");
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod data dir");
    for entry in std::fs::read_dir(&src).expect("read keys") {
        let entry = entry.expect("key entry");
        let target = dst.join(entry.file_name());
        std::fs::copy(entry.path(), &target).expect("copy key");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
            .expect("chmod key");
    }
}

/// A replica with `config`, holding the keys of the data dir `keys_from`; started.
pub fn start_replica(config: &str, keys_from: &Path) -> Control {
    let mut c = Control::prepared(config, "info", &[]);
    copy_keys(keys_from, &c.data_dir);
    c.ensure_running();
    c
}
