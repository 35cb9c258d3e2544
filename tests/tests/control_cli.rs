//! The CLI: `apikey create|list|revoke` with and without a running daemon (the store is locked
//! while it runs, so the CLI goes through the admin socket), and `secret …` over REST with the
//! value from stdin or a file, never argv.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use serde_json::Value;
use veil_tests::control::{Control, control_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apikeys_with_and_without_daemon() {
    let mut control = Control::start();
    let dir = control.data_dir.to_str().unwrap().to_owned();
    let socket = control.data_dir.join("admin.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket is root-only");

    let online = control.apikey("acme", &["manage:secrets"]);
    control.stop();
    assert!(!socket.exists(), "socket removed on clean stop");
    let offline = control.apikey("newco", &["manage:secrets", "read:audit"]);
    control.ensure_running();
    let api = control.api();
    for key in [&online, &offline] {
        let (status, _) = api.get("/secret", key).await;
        assert_eq!(status, 200);
    }

    let out = control.cli(&["apikey", "list", "--data-dir", &dir]);
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let text = String::from_utf8_lossy(&out.stdout);
    for key in [&online, &offline] {
        let secret_part = key.rsplit('_').next().unwrap();
        assert!(!text.contains(secret_part), "list never shows a key");
    }
    let newco = list.iter().find(|k| k["org"] == "newco").unwrap();
    assert_eq!(
        newco["permissions"],
        serde_json::json!(["manage:secrets", "read:audit"])
    );

    // Revoke while running: the key stops working at once.
    let id = newco["id"].as_str().unwrap();
    let out = control.cli(&["apikey", "revoke", id, "--data-dir", &dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = api.get("/secret", &offline).await;
    assert_eq!(status, 401);
    // Revoke while stopped.
    control.stop();
    let id = online.split('_').nth(1).unwrap();
    let out = control.cli(&["apikey", "revoke", id, "--data-dir", &dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    control.ensure_running();
    let (status, _) = api.get("/secret", &online).await;
    assert_eq!(status, 401);

    // Bad input is refused with a message.
    let out = control.cli(&[
        "apikey",
        "create",
        "--org",
        "x",
        "--permission",
        "root",
        "--data-dir",
        &dir,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("root"));
    let out = control.cli(&[
        "apikey",
        "create",
        "--org",
        "a/b",
        "--permission",
        "admin",
        "--data-dir",
        &dir,
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
}

fn veil(control: &Control, key: &str, args: &[&str], stdin: Option<&str>) -> (bool, Value, String) {
    let mut child = Command::new(control_bin())
        .args(args)
        .env("VEIL_API_URL", control.url())
        .env("VEIL_API_KEY", key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        pipe.write_all(s.as_bytes()).unwrap();
    }
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_commands_over_rest() {
    let control = Control::start();
    let key = control.apikey("acme", &["manage:secrets"]);

    let (ok, s, err) = veil(
        &control,
        &key,
        &[
            "secret",
            "create",
            "--name",
            "cli-one",
            "--host",
            "API.x.example",
            "--description",
            "d",
        ],
        Some("stdin-value\n"),
    );
    assert!(ok, "{err}");
    assert_eq!(s["hosts"], serde_json::json!(["api.x.example"]));
    let id = s["id"].as_str().unwrap().to_owned();

    let file = control.tmp_path().join("v");
    std::fs::write(&file, "file-value").unwrap();
    let (ok, _, err) = veil(
        &control,
        &key,
        &[
            "secret",
            "create",
            "--name",
            "cli-two",
            "--value-file",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "{err}");

    let (ok, _, err) = veil(
        &control,
        &key,
        &["secret", "create", "--name", "cli-empty"],
        Some(""),
    );
    assert!(!ok && err.contains("empty"), "{err}");
    let (ok, _, err) = veil(
        &control,
        &key,
        &["secret", "create", "--name", "cli-one"],
        Some("dup"),
    );
    assert!(!ok && err.contains("409"), "{err}");

    let (ok, list, _) = veil(&control, &key, &["secret", "list"], None);
    assert!(ok);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (ok, list, _) = veil(&control, &key, &["secret", "list", "--name", "two"], None);
    assert!(ok);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let (ok, got, _) = veil(&control, &key, &["secret", "get", &id], None);
    assert!(ok);
    assert_eq!(got["name"], "cli-one");

    let (ok, upd, err) = veil(
        &control,
        &key,
        &["secret", "update", &id, "--value-stdin"],
        Some("rotated"),
    );
    assert!(ok, "{err}");
    assert_eq!(upd["placeholder"], got["placeholder"]);
    assert_eq!(upd["description"], "d");
    let (ok, upd, _) = veil(
        &control,
        &key,
        &["secret", "update", &id, "--unrestricted"],
        None,
    );
    assert!(ok);
    assert_eq!(upd["hosts"], serde_json::json!([]));

    let (ok, _, _) = veil(&control, &key, &["secret", "delete", &id], None);
    assert!(ok);
    let (ok, _, err) = veil(&control, &key, &["secret", "get", &id], None);
    assert!(!ok && err.contains("404"), "{err}");

    // There is no way to pass a value on the command line.
    let (ok, _, err) = veil(
        &control,
        &key,
        &["secret", "create", "--name", "argv", "--value", "x"],
        None,
    );
    assert!(!ok && err.contains("--value"), "{err}");
}

#[test]
fn refuses_key_material_readable_by_others() {
    let mut control = Control::start();
    control.stop();
    let keys = control.data_dir.join("keys");
    let key_file = std::fs::read_dir(&keys)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "key"))
        .unwrap();
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    for (path, mode) in [(&key_file, 0o644), (&key_file, 0o640), (&keys, 0o755)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut child = Command::new(control_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&control.data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill(); // our own child, by PID
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "started with {path:?} at {mode:o}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not accessible by group or others"), "{err}");
        let restore = if path == &keys { 0o700 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(restore)).unwrap();
    }
    control.ensure_running();
}
