//! Issue 16: `veil-control rekey` on replicas sharing one PostgreSQL is coordinated. The new key
//! seals nothing until every live replica holds it (the first run says which replicas lack it and
//! changes nothing they use); once they all do, every replica switches to it, every value is
//! re-sealed and the old key is deleted everywhere. An interrupted rekey is finished by the next
//! replica that starts. Values are never printed: `verify` reports whether they decrypt.

use std::path::{Path, PathBuf};
use std::time::Duration;

use veil_tests::cmd::wait_until;
use veil_tests::control::Control;
use veil_tests::postgres::Postgres;
use veil_tests::replicas::{api_only, start_replica};

const PERMS: &[&str] = &["manage:secrets"];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn key_files(data_dir: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(data_dir.join("keys"))
        .expect("keys dir")
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_suffix(".key")
                .map(str::to_owned)
        })
        .collect();
    ids.sort();
    ids
}

fn active(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("keys/active"))
        .expect("active key")
        .trim()
        .to_owned()
}

fn copy_key(from: &Path, to: &Path, id: &str) {
    let target: PathBuf = to.join("keys").join(format!("{id}.key"));
    std::fs::copy(from.join("keys").join(format!("{id}.key")), &target).expect("copy key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn cli(c: &Control, args: &[&str]) -> (bool, String) {
    let mut all = args.to_vec();
    let (config, dir) = (
        c.config_path().to_str().expect("utf-8").to_owned(),
        c.data_dir.to_str().expect("utf-8").to_owned(),
    );
    all.extend(["--config", &config, "--data-dir", &dir]);
    let out = c.cli(&all);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn verified(c: &Control) -> bool {
    cli(c, &["verify"]).0
}

/// Two replicas with a few secrets (one deleted: its tombstone keeps sealed values too).
fn two_replicas(pg: &Postgres) -> (Control, Control) {
    let a = Control::start_with_config(&api_only(pg));
    let b = start_replica(&api_only(pg), &a.data_dir);
    let key = a.apikey("acme", PERMS);
    let rt = rt();
    for i in 0..3 {
        rt.block_on(
            a.api()
                .create_secret(&key, &format!("s{i}"), &format!("value-{i}"), &[]),
        );
    }
    let gone = rt.block_on(a.api().create_secret(&key, "gone", "value-gone", &[]));
    let (status, _) = rt.block_on(a.api().delete(
        &format!("/secret/{}", gone["id"].as_str().expect("id")),
        &key,
    ));
    assert_eq!(status, 204);
    // Every replica reports its keys within seconds of starting.
    std::thread::sleep(Duration::from_secs(3));
    (a, b)
}

#[test]
fn a_rekey_waits_until_every_replica_holds_the_new_key() {
    let pg = Postgres::start();
    let (a, mut b) = two_replicas(&pg);
    let old = active(&a.data_dir);
    // First run: the new key exists on A only; nothing may use it yet.
    let (ok, out) = cli(&a, &["rekey"]);
    assert!(
        !ok,
        "rekey went ahead while a replica lacked the new key: {out}"
    );
    let new: Vec<String> = key_files(&a.data_dir)
        .into_iter()
        .filter(|k| *k != old)
        .collect();
    assert_eq!(new.len(), 1, "one new key file on A: {new:?}");
    let new = new[0].clone();
    assert!(
        out.contains(&format!("keys/{new}.key")) && out.contains("not on replica"),
        "the refusal does not say what to copy: {out}"
    );
    assert_eq!(
        active(&a.data_dir),
        old,
        "A switched before B held the new key"
    );
    assert!(verified(&a) && verified(&b));
    // The operator copies the key; B loads it by itself; the rekey goes through.
    copy_key(&a.data_dir, &b.data_dir, &new);
    let (ok, out) = cli(&a, &["rekey"]);
    assert!(ok, "rekey after the copy: {out}");
    assert!(out.contains(&new), "{out}");
    for c in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(15), || active(&c.data_dir) == new
                && key_files(&c.data_dir) == vec![new.clone()]),
            "a replica still has the old key: active {}, files {:?}",
            active(&c.data_dir),
            key_files(&c.data_dir)
        );
        assert!(verified(c), "a value does not decrypt after the rekey");
    }
    // New writes through B are sealed with the new key; B restarts on it.
    let key = a.apikey("acme", PERMS);
    rt().block_on(b.api().create_secret(&key, "after", "value-after", &[]));
    b.restart();
    assert!(verified(&b));
    let rows = pg.psql("SELECT id || ':' || state FROM master_keys ORDER BY id");
    assert!(
        rows.contains(&format!("{new}:current")) && rows.contains(&format!("{old}:retired")),
        "{rows}"
    );
}

#[test]
fn an_interrupted_rekey_is_finished_by_the_next_replica_to_start() {
    let pg = Postgres::start();
    let (mut a, mut b) = two_replicas(&pg);
    let old = active(&a.data_dir);
    let (ok, _) = cli(&a, &["rekey"]);
    assert!(!ok);
    let new = key_files(&a.data_dir)
        .into_iter()
        .find(|k| *k != old)
        .expect("the new key");
    // Both replicas die before anyone runs rekey again; the key reaches B meanwhile.
    a.kill();
    b.kill();
    copy_key(&a.data_dir, &b.data_dir, &new);
    b.ensure_running();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let rows = pg.psql("SELECT id || ':' || state FROM master_keys ORDER BY id");
            rows.contains(&format!("{new}:current")) && rows.contains(&format!("{old}:retired"))
        }),
        "the replica that started next did not finish the rekey: {}",
        pg.psql("SELECT id || ':' || state FROM master_keys ORDER BY id")
    );
    assert!(verified(&b));
    // A comes back holding both keys: it drops the retired one and seals with the new.
    a.ensure_running();
    assert!(
        wait_until(Duration::from_secs(15), || active(&a.data_dir) == new
            && key_files(&a.data_dir) == vec![new.clone()]),
        "A kept the retired key: {:?}",
        key_files(&a.data_dir)
    );
    assert!(verified(&a));
}
