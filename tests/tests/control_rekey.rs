//! `veil-control rekey`: every secret moves to a new master key, online (through the daemon's
//! admin socket) and offline; a kill at any point of a rekey leaves every secret decryptable,
//! and the next start completes the rekey.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use veil_tests::control::{Api, Control, control_bin};

fn key_files(data_dir: &Path) -> Vec<String> {
    let mut keys: Vec<String> = std::fs::read_dir(data_dir.join("keys"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".key"))
        .collect();
    keys.sort();
    keys
}

fn verify(control: &Control) -> Value {
    let out = control.cli(&["verify", "--data-dir", control.data_dir.to_str().unwrap()]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success() && report["ok"] == true,
        "verify failed: {report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

fn key_ids_in_use(report: &Value) -> Vec<String> {
    let mut ids: Vec<String> = report["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

async fn populate(api: &Api, key: &str, prefix: &str, n: usize) {
    futures_util::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let key = key.to_owned();
            let name = format!("{prefix}-{i:05}");
            async move {
                api.create_secret(&key, &name, &format!("value-{i}"), &[])
                    .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_rekey_moves_every_secret() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["manage:secrets"]);
    populate(&api, &key, "s", 200).await;
    let before = key_files(&control.data_dir);
    assert_eq!(before.len(), 1);

    let out = control.cli(&["rekey", "--data-dir", control.data_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["resealed"], 200);
    assert_eq!(
        report["retired"],
        json!([before[0].trim_end_matches(".key")])
    );
    let after = key_files(&control.data_dir);
    assert_eq!(after.len(), 1);
    assert_ne!(after, before);
    let v = verify(&control);
    assert_eq!(
        key_ids_in_use(&v),
        vec![report["active_key"].as_str().unwrap().to_owned()]
    );

    // The daemon keeps working with the new key.
    let s = api.create_secret(&key, "after-rekey", "v", &[]).await;
    let (status, _) = api
        .patch(
            &format!("/secret/{}", s["id"].as_str().unwrap()),
            &key,
            json!({"value": "v2"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(verify(&control)["secrets"].as_array().unwrap().len(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_rekey_leaves_everything_decryptable() {
    let mut control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["manage:secrets"]);
    populate(&api, &key, "s", 1000).await;
    control.stop();
    let dir = control.data_dir.to_str().unwrap().to_owned();

    // Time one uninterrupted offline rekey to aim the kills inside the next ones.
    let t = Instant::now();
    let out = control.cli(&["rekey", "--data-dir", &dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full = t.elapsed();
    assert_eq!(key_files(&control.data_dir).len(), 1);

    let mut mid_reseal = 0;
    for i in 0..12u32 {
        let delay = full.mul_f64(f64::from(i) / 10.0);
        let mut child = Command::new(control_bin())
            .args(["rekey", "--data-dir", &dir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL, our own child
        let _ = child.wait();
        let report = verify(&control);
        assert_eq!(report["secrets"].as_array().unwrap().len(), 1000);
        if key_ids_in_use(&report).len() > 1 {
            mid_reseal += 1;
        }
    }
    eprintln!("rekey: {mid_reseal} of 12 kills landed mid-reseal (rekey takes {full:?})");
    assert!(
        mid_reseal > 0,
        "no kill landed inside a reseal; the test did not test anything"
    );

    // A kill of the daemon while it rekeys through the socket.
    control.ensure_running();
    let mut child = Command::new(control_bin())
        .args(["rekey", "--data-dir", &dir])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(full / 3);
    control.kill();
    let _ = child.wait();
    let report = verify(&control);
    assert_eq!(report["secrets"].as_array().unwrap().len(), 1000);

    // The next start completes any interrupted rekey: one key left, every secret under it.
    control.ensure_running();
    let deadline = Instant::now() + Duration::from_secs(10);
    while key_files(&control.data_dir).len() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        key_files(&control.data_dir).len(),
        1,
        "interrupted rekey completed at start"
    );
    let report = verify(&control);
    assert_eq!(key_ids_in_use(&report).len(), 1);
    let (status, list) = api.get("/secret/paginated?limit=1", &key).await;
    assert_eq!(status, 200);
    assert_eq!(list["total"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_rekey_under_concurrent_writes() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["manage:secrets"]);
    populate(&api, &key, "base", 300).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (api, key, stop) = (api.clone(), key.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = api.create_secret(&key, &format!("w-{n}"), "v", &[]).await;
                let path = format!("/secret/{}", s["id"].as_str().unwrap());
                let (status, _) = api.patch(&path, &key, json!({"value": "v2"})).await;
                assert_eq!(status, 200);
                n += 1;
            }
            n
        })
    };
    let dir = control.data_dir.to_str().unwrap().to_owned();
    for _ in 0..3 {
        let d = dir.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(control_bin())
                .args(["rekey", "--data-dir", &d])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 0, "writes ran during the rekeys");
    let report = verify(&control);
    assert_eq!(report["secrets"].as_array().unwrap().len(), 300 + written);
    assert_eq!(
        key_ids_in_use(&report).len(),
        1,
        "every secret under the one active key"
    );
    assert_eq!(key_files(&control.data_dir).len(), 1);
}
