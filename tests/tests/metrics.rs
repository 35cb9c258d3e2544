//! The Prometheus endpoints answer and count what the test did.

use serde_json::json;
use veil_tests::AgentOptions;
use veil_tests::control::{Control, free_port};
use veil_tests::intercept_world::InterceptWorld;

fn scrape(port: u16) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let resp = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .expect("scrape");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("body")
    })
}

#[test]
fn control_metrics_count_requests_by_route_and_status_and_report_gauges() {
    let port = free_port();
    let control = Control::start_with_config(&format!(
        "metrics_listen = \"127.0.0.1:{port}\"\n{}",
        veil_tests::control::TEST_CONFIG
    ));
    let key = control.apikey("metrics-org", &["admin"]);
    let api = control.api();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let created = rt.block_on(api.post(
        "/secret",
        &key,
        json!({"name": "m1", "value": "v-metrics-1", "hosts": ["api.example.test"]}),
    ));
    assert_eq!(created.0, 201);
    let dup = rt.block_on(api.post("/secret", &key, json!({"name": "m1", "value": "x"})));
    assert_eq!(dup.0, 409);
    let id = created.1["id"].as_str().expect("id").to_owned();
    assert_eq!(rt.block_on(api.get(&format!("/secret/{id}"), &key)).0, 200);

    let text = scrape(port);
    for line in [
        "veil_control_http_requests_total{method=\"POST\",route=\"/api/secret\",status=\"201\"} 1",
        "veil_control_http_requests_total{method=\"POST\",route=\"/api/secret\",status=\"409\"} 1",
        "veil_control_http_requests_total{method=\"GET\",route=\"/api/secret/{id}\",status=\"200\"} 1",
        "veil_control_secrets 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert!(!text.contains(&id), "ids must not become labels");
    assert!(!text.contains("v-metrics-1"));
}

/// The value of the sample `key` (name with labels, exactly as rendered) in `text`.
fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(k, _)| *k == key))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn agent_metrics_count_an_intercepted_request() {
    const HOST: &str = "metrics.allowed.test";
    let mut w = InterceptWorld::builder("metrics test CA", &[HOST])
        .metrics()
        .start();
    let port = w.metrics_port().expect("metrics port");
    let url = w.veil.agent().metrics_url().expect("metrics url");
    assert!(url.contains(&port.to_string()));
    let before = scrape(port);
    assert_eq!(sample(&before, "veil_agent_requests_total"), Some(0.0));
    assert_eq!(sample(&before, "veil_agent_sandboxes"), Some(0.0));

    let value = format!("metrics-value-{}", veil_tests::control::random_token(24));
    let key = w.secret_valued("metrics-key", value, &[HOST], json!({}));
    let (id, value, placeholder) = (&key.id, &key.value, &key.placeholder);
    let sb = w.add_sandbox("metrics", &[("MY_KEY", "metrics-key")]);

    let out = veil_tests::output_within(
        w.command(sb, "curl")
            .args(["-sS", "--max-time", "20", "-H"])
            .arg(format!("x-api-key: {placeholder}"))
            .arg(w.url(HOST, "/m")),
        std::time::Duration::from_secs(60),
    );
    assert!(out.status.success(), "curl failed (status {})", out.status);
    let seen = w.seen().pop().expect("the upstream received no request");
    assert!(
        seen.header("x-api-key") == Some(value.as_str()),
        "header not substituted"
    );

    let text = scrape(port);
    assert!(!text.contains(value), "a value on the metrics page");
    assert!(
        !text.contains(placeholder),
        "a placeholder on the metrics page"
    );
    let at_least_one = |key: &str| {
        let v = sample(&text, key);
        assert!(v.is_some_and(|v| v >= 1.0), "{key} = {v:?} in:\n{text}");
    };
    at_least_one("veil_agent_requests_total");
    at_least_one("veil_agent_intercepted_total");
    at_least_one("veil_agent_accepted_total");
    at_least_one("veil_agent_request_seconds_count");
    at_least_one("veil_agent_request_seconds_bucket{le=\"+Inf\"}");
    at_least_one("veil_agent_client_handshake_seconds_count");
    assert_eq!(
        sample(
            &text,
            &format!(
                "veil_agent_secret_placeholders_total{{secret=\"{id}\",outcome=\"substituted\"}}"
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "veil_agent_sandboxes"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "veil_agent_secrets"), Some(1.0), "{text}");

    // Only GET /metrics answers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let status = rt.block_on(async {
        reqwest::get(format!("http://127.0.0.1:{port}/other"))
            .await
            .expect("request")
            .status()
    });
    assert_eq!(status, 404);
}

#[test]
fn agent_refuses_a_non_loopback_metrics_address() {
    veil_tests::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[agent]\nmetrics_listen = \"0.0.0.0:9465\"\n").expect("config");
    let out = std::process::Command::new(veil_tests::bin_path("veil-agent"))
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--pin-dir")
        .arg(dir.path().join("never-used"))
        .output()
        .expect("run veil-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("metrics_listen") && stderr.contains("loopback"),
        "stderr:\n{stderr}"
    );
}

/// Every non-empty line of `log` is a JSON object with a level and a message field.
fn assert_json_lines(who: &str, log: &str) -> usize {
    let mut n = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{who}: not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string(), "{who}: no level: {line}");
        assert!(v["timestamp"].is_string(), "{who}: no timestamp: {line}");
        assert!(v["fields"].is_object(), "{who}: no fields: {line}");
        n += 1;
    }
    n
}

#[test]
fn log_format_json_makes_both_daemons_write_json_lines() {
    veil_tests::require_root();
    let control = Control::start_with_args(
        veil_tests::control::TEST_CONFIG,
        "info",
        &["--log-format", "json"],
    );
    let key = control.apikey("json-org", &["admin"]);
    let api = control.api();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    assert_eq!(rt.block_on(api.get("/secret", &key)).0, 200);
    let log = control.log();
    let n = assert_json_lines("veil-control", &log);
    assert!(n >= 1, "veil-control wrote no log line:\n{log}");
    assert!(
        log.lines().any(|l| l.contains("\"level\":\"INFO\"")),
        "no INFO record:\n{log}"
    );

    let agent = veil_tests::Agent::start_with(AgentOptions {
        args: vec!["--log-format".into(), "json".into()],
        ..AgentOptions::default()
    });
    let ready = veil_tests::cmd::wait_until(std::time::Duration::from_secs(10), || {
        agent.log().contains("veil-agent ready")
    });
    assert!(ready, "agent log:\n{}", agent.log());
    // SIGTERM right after READY=1 drains and exits 0 (handlers are in place before READY).
    let status = agent.terminate();
    assert!(
        status.success(),
        "agent exit: {status}; log:\n{}",
        agent.log()
    );
    let log = agent.log();
    let n = assert_json_lines("veil-agent", &log);
    assert!(n >= 2, "veil-agent wrote {n} lines:\n{log}");
    assert!(log.contains("veil-agent stopped"), "{log}");
}
