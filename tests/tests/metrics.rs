//! The Prometheus endpoints answer and count what the test did.

use serde_json::json;
use veil_tests::control::{Control, free_port};

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
