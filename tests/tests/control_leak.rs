//! No plaintext value anywhere: not in the data dir's bytes, the audit, the daemon's logs (at
//! trace level), any response (including error responses), nor the CLI's output.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use veil_tests::control::{Control, TEST_CONFIG, control_bin, random_token};

fn files_containing(dir: &Path, needles: &[&[u8]]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let ft = entry.file_type().unwrap();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                for n in needles {
                    if bytes.windows(n.len()).any(|w| w == *n) {
                        hits.push(format!(
                            "{} contains {}",
                            path.display(),
                            String::from_utf8_lossy(n)
                        ));
                    }
                }
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_anywhere() {
    let mut control = Control::start_with(TEST_CONFIG, "trace");
    let api = control.api();
    let key = control.apikey("acme", &["admin"]);
    let values: Vec<String> = (0..4)
        .map(|i| format!("LEAKCHECK{i}{}", random_token(32)))
        .collect();
    let mut replies: Vec<Value> = Vec::new();

    // Every route that takes or touches a value, successes and failures.
    let (s, created) = api
        .post("/secret", &key, json!({"name": "leaky", "value": values[0], "description": "d", "hosts": ["a.example"]}))
        .await;
    assert_eq!(s, 201);
    let id = created["id"].as_str().unwrap().to_owned();
    replies.push(created);
    for body in [
        json!({"name": "leaky", "value": values[0]}),    // 409
        json!({"name": "bad name", "value": values[0]}), // 400
        json!({"name": "x", "value": values[0], "hosts": ["https://x"]}), // 400
        json!({"name": "x", "value": values[0], "extra": values[0]}), // 400
    ] {
        replies.push(api.post("/secret", &key, body).await.1);
    }
    replies.push(
        api.patch(&format!("/secret/{id}"), &key, json!({"value": values[1]}))
            .await
            .1,
    );
    replies.push(
        api.patch(
            &format!("/secret/{id}"),
            &key,
            json!({"value": values[1], "hosts": ["*"]}),
        )
        .await
        .1,
    );
    replies.push(
        api.patch("/secret/nope", &key, json!({"value": values[1]}))
            .await
            .1,
    );
    let raw = format!("{{\"name\":\"y\",\"value\":\"{}\"", values[2]); // truncated JSON
    replies.push(
        api.send_raw(
            "POST",
            "/secret",
            Some(&key),
            Some("application/json"),
            raw.clone().into_bytes(),
        )
        .await
        .1,
    );
    replies.push(
        api.send_raw(
            "POST",
            "/secret",
            Some(&key),
            Some("text/plain"),
            raw.into_bytes(),
        )
        .await
        .1,
    );
    let typed = format!(
        "{{\"name\":\"z\",\"value\":\"{}\",\"hosts\":\"{}\"}}",
        values[2], values[2]
    );
    replies.push(
        api.send_raw(
            "POST",
            "/secret",
            Some(&key),
            Some("application/json"),
            typed.into_bytes(),
        )
        .await
        .1,
    );
    replies.push(
        api.put(
            "/sandbox/sb",
            &key,
            json!({"cgroup": "/veil-test.slice/sb", "secrets": [{"E": "leaky"}]}),
        )
        .await
        .1,
    );
    replies.push(
        api.put(
            "/sandbox/sb/secrets",
            &key,
            json!({"secrets": [{"E": "leaky"}]}),
        )
        .await
        .1,
    );
    for path in [
        "/secret",
        "/secret/paginated",
        &format!("/secret/{id}"),
        "/sandbox/sb",
        "/sandbox/sb/secrets",
        "/audit",
        "/openapi.json",
    ] {
        replies.push(api.get(path, &key).await.1);
    }

    // The CLI: value via stdin and via a file; its output must not echo it.
    let value_file = control.tmp_path().join("value.txt");
    std::fs::write(&value_file, &values[3]).unwrap();
    let mut child = Command::new(control_bin())
        .args(["secret", "create", "--name", "from-cli"])
        .env("VEIL_API_URL", control.url())
        .env("VEIL_API_KEY", &key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", values[2]).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_out = Command::new(control_bin())
        .args([
            "secret",
            "update",
            &id,
            "--value-file",
            value_file.to_str().unwrap(),
        ])
        .env("VEIL_API_URL", control.url())
        .env("VEIL_API_KEY", &key)
        .output()
        .unwrap();
    assert!(
        cli_out.status.success(),
        "{}",
        String::from_utf8_lossy(&cli_out.stderr)
    );
    std::fs::remove_file(&value_file).unwrap();

    let all_replies = serde_json::to_string(&replies).unwrap();
    for v in &values {
        assert!(
            !all_replies.contains(v.as_str()),
            "a response contains a value"
        );
        for out in [&out.stdout, &out.stderr, &cli_out.stdout, &cli_out.stderr] {
            assert!(
                !String::from_utf8_lossy(out).contains(v.as_str()),
                "CLI output contains a value"
            );
        }
    }
    assert!(
        all_replies.contains("placeholder"),
        "sanity: the replies were captured"
    );

    // Kill without a clean shutdown, restart, stop cleanly: grep every byte of data and logs.
    control.kill();
    control.ensure_running();
    control.stop();
    let needles: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
    let hits = files_containing(control.tmp_path(), &needles);
    assert!(hits.is_empty(), "plaintext found: {hits:?}");
    let log = control.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "sanity: verbose logging was on"
    );
    assert!(
        log.contains("/api/secret") || log.contains("audit"),
        "sanity: the log saw requests"
    );
}
