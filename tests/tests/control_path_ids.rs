//! Ids in REST paths: control parses them into its id types at the edge. An id no secret or
//! sandbox can have answers exactly like an unknown one (404 naming it, nothing audited), a
//! malformed body still comes first (400), and registering a sandbox under such an id is a 400
//! naming the rule — the status codes clients saw before ids were typed.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use serde_json::json;
use veil_tests::control::{Api, Control, assert_error};

async fn audit_total(api: &Api, key: &str) -> u64 {
    let (status, page) = api.get("/audit?limit=1", key).await;
    assert_eq!(status, 200);
    page["total"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_no_record_can_have_are_not_found_like_unknown_ones() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["manage:secrets", "write:sandboxes", "read:audit"]);
    let before = audit_total(&api, &key).await;
    let too_long_secret = "s".repeat(65);
    let too_long_sandbox = "b".repeat(129);
    // Each breaks the rule differently: first character, a space (sent %-encoded), length.
    let secret_ids = ["-lead", "a%20b", "_x", too_long_secret.as_str()];
    let sandbox_ids = [".hidden", "a%20b", "-x", too_long_sandbox.as_str()];

    for id in secret_ids {
        let path = format!("/secret/{id}");
        let shown = id.replace("%20", " ");
        for reply in [
            api.get(&path, &key).await,
            api.patch(&path, &key, json!({"description": "d"})).await,
            api.patch(&path, &key, json!({})).await,
            api.delete(&path, &key).await,
        ] {
            assert_error(&reply, 404);
            let msg = reply.1["message"].as_str().unwrap();
            assert_eq!(msg, format!("secret {shown} not found"), "{path}");
        }
        // The body is checked before the id, as before.
        assert_error(&api.patch(&path, &key, json!({"value": ""})).await, 400);
    }

    for id in sandbox_ids {
        let path = format!("/sandbox/{id}");
        let shown = id.replace("%20", " ");
        let secrets = format!("{path}/secrets");
        for reply in [
            api.get(&path, &key).await,
            api.delete(&path, &key).await,
            api.get(&secrets, &key).await,
            api.put(&secrets, &key, json!({"secrets": []})).await,
        ] {
            assert_error(&reply, 404);
            let msg = reply.1["message"].as_str().unwrap();
            assert_eq!(msg, format!("sandbox {shown} not found"), "{path}");
        }
        // Registering under it names the rule.
        let reply = api
            .put(&path, &key, json!({"cgroup": "/veil-test.slice/x"}))
            .await;
        assert_error(&reply, 400);
        let msg = reply.1["message"].as_str().unwrap();
        assert!(msg.starts_with("sandbox id"), "{msg}");
    }

    assert_eq!(audit_total(&api, &key).await, before, "nothing was audited");
}
