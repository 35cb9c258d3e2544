//! API throughput, measured with `wrk` (Debian package): creates/s and paginated reads/s.
//! Ignored by default; run against a release build:
//!
//! ```sh
//! cargo build --release -p control
//! VEIL_CONTROL_BIN=$CARGO_TARGET_DIR/release/veil-control \
//!   cargo test -p veil-tests --test control_load -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::process::Command;

use veil_tests::control::Control;

const CREATE_LUA: &str = r#"
local counter = 0
local thread_id = 0
local next_id = 0
function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
end
request = function()
  counter = counter + 1
  local body = '{"name":"load-' .. thread_id .. '-' .. counter .. '","value":"load-value-' .. counter .. '","hosts":["api.example.com"]}'
  return wrk.format("POST", "/api/secret", nil, body)
end
"#;

fn wrk(args: &[&str]) -> (f64, String) {
    let out = Command::new("wrk")
        .args(args)
        .output()
        .expect("wrk is installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("Non-2xx"), "errors under load:\n{text}");
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Requests/sec in wrk output");
    (rps, text)
}

#[test]
#[ignore = "load measurement; run explicitly against a release build"]
fn throughput_creates_and_paginated_reads() {
    let secs = std::env::var("VEIL_LOAD_SECS").unwrap_or_else(|_| "10".into());
    let duration = format!("{secs}s");
    let control = Control::start_with(veil_tests::control::TEST_CONFIG, "warn");
    let key = control.apikey("load", &["manage:secrets"]);
    let auth = format!("Authorization: Bearer {key}");
    let script = control.tmp_path().join("create.lua");
    std::fs::write(&script, CREATE_LUA).unwrap();
    let base = format!("http://127.0.0.1:{}", control.port);

    let (creates, text) = wrk(&[
        "-t1",
        "-c16",
        "-d",
        &duration,
        "--latency",
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "-s",
        script.to_str().unwrap(),
        &base,
    ]);
    eprintln!("--- creates (POST /api/secret, 16 connections) ---\n{text}");

    let api = control.api();
    let total = tokio::runtime::Runtime::new().unwrap().block_on(async {
        api.get("/secret/paginated?limit=1", &key).await.1["total"]
            .as_u64()
            .unwrap()
    });
    let (reads, text) = wrk(&[
        "-t1",
        "-c16",
        "-d",
        &duration,
        "--latency",
        "-H",
        &auth,
        &format!("{base}/api/secret/paginated?limit=100"),
    ]);
    eprintln!(
        "--- paginated reads (GET /api/secret/paginated?limit=100 over {total} secrets) ---\n{text}"
    );
    eprintln!(
        "RESULT creates/s = {creates:.0}; paginated reads/s = {reads:.0} (100 items/page, {total} secrets in the org)"
    );
    assert!(creates > 0.0 && reads > 0.0);
}
