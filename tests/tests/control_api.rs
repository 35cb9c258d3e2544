//! Every veil-control route over real HTTP against a real data dir.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use serde_json::{Value, json};
use veil_tests::control::{Control, assert_error};

const ALL: &[&str] = &["manage:secrets", "write:sandboxes", "read:audit"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_crud() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let other = control.apikey("globex", &["manage:secrets"]);

    // Create.
    let (status, created) = api
        .post(
            "/secret",
            &key,
            json!({"name": "anthropic-prod", "value": "v1", "description": "prod key", "hosts": ["API.anthropic.com"]}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["name"], "anthropic-prod");
    assert_eq!(created["description"], "prod key");
    assert_eq!(created["hosts"], json!(["api.anthropic.com"]));
    assert!(created.get("value").is_none());
    let placeholder = created["placeholder"].as_str().unwrap().to_owned();
    let random = placeholder.strip_prefix("veil_secret_").expect("prefix");
    assert!(random.len() * 4 >= 160, "≥ 160 random bits");
    assert!(
        placeholder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "URL- and header-safe"
    );
    for field in ["createdAt", "updatedAt"] {
        let t = created[field].as_str().unwrap();
        assert!(t.ends_with('Z') && t.len() == 24, "{field} = {t}");
    }

    // Duplicate name in the same org: 409; in another org: fine.
    let dup = api
        .post(
            "/secret",
            &key,
            json!({"name": "anthropic-prod", "value": "x"}),
        )
        .await;
    assert_error(&dup, 409);
    let (status, in_other) = api
        .post(
            "/secret",
            &other,
            json!({"name": "anthropic-prod", "value": "x"}),
        )
        .await;
    assert_eq!(status, 201);
    assert_ne!(in_other["placeholder"], created["placeholder"]);

    // Get, list, paginated.
    let (status, got) = api.get(&format!("/secret/{id}"), &key).await;
    assert_eq!(status, 200);
    // The single-secret view is the list view plus veil's propagation and usage fields.
    for (field, v) in created.as_object().unwrap() {
        assert_eq!(&got[field], v, "{field}");
    }
    assert_eq!(got["propagation"]["complete"], true);
    assert_eq!(got["lastUsedAt"], Value::Null);
    assert_eq!(got["usage"], json!({}));
    let (status, list) = api.get("/secret", &key).await;
    assert_eq!(status, 200);
    assert_eq!(list, json!([created.clone()]));
    let (status, page) = api.get("/secret/paginated", &key).await;
    assert_eq!(status, 200);
    assert_eq!(page["total"], 1);
    assert_eq!(page["nextCursor"], Value::Null);
    assert_eq!(page["items"], json!([created.clone()]));

    // PATCH: omitted and null fields unchanged.
    // updatedAt must move: the clock passes the creation's millisecond first.
    veil_tests::clock::next_millisecond().await;
    let (status, patched) = api
        .patch(
            &format!("/secret/{id}"),
            &key,
            json!({"value": "v2", "description": null}),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["description"], "prod key");
    assert_eq!(patched["hosts"], json!(["api.anthropic.com"]));
    assert_eq!(
        patched["placeholder"], placeholder,
        "placeholder survives a rotation"
    );
    assert_eq!(patched["createdAt"], created["createdAt"]);
    assert_ne!(patched["updatedAt"], created["updatedAt"]);
    let (_, patched) = api
        .patch(
            &format!("/secret/{id}"),
            &key,
            json!({"hosts": ["*.anthropic.com", "x.example"]}),
        )
        .await;
    assert_eq!(patched["hosts"], json!(["*.anthropic.com", "x.example"]));
    assert_eq!(patched["description"], "prod key");
    let (_, patched) = api
        .patch(
            &format!("/secret/{id}"),
            &key,
            json!({"description": "new"}),
        )
        .await;
    assert_eq!(patched["description"], "new");
    assert_eq!(patched["hosts"], json!(["*.anthropic.com", "x.example"]));
    let (_, patched) = api
        .patch(&format!("/secret/{id}"), &key, json!({"hosts": []}))
        .await;
    assert_eq!(patched["hosts"], json!([]), "[] makes it unrestricted");
    let (_, patched) = api.patch(&format!("/secret/{id}"), &key, json!({})).await;
    assert_eq!(patched["hosts"], json!([]));
    assert_eq!(patched["description"], "new");

    // 404s: unknown id, other org's id.
    let missing = "00000000-0000-4000-8000-000000000000";
    assert_error(&api.get(&format!("/secret/{missing}"), &key).await, 404);
    assert_error(
        &api.patch(&format!("/secret/{missing}"), &key, json!({"value": "x"}))
            .await,
        404,
    );
    assert_error(&api.delete(&format!("/secret/{missing}"), &key).await, 404);
    let other_id = in_other["id"].as_str().unwrap();
    assert_error(&api.get(&format!("/secret/{other_id}"), &key).await, 404);
    assert_error(
        &api.patch(&format!("/secret/{other_id}"), &key, json!({"value": "x"}))
            .await,
        404,
    );
    assert_error(&api.delete(&format!("/secret/{other_id}"), &key).await, 404);

    // Survives a restart.
    let mut control = control;
    control.restart();
    let (status, got) = api.get(&format!("/secret/{id}"), &key).await;
    assert_eq!(status, 200);
    assert_eq!(got["description"], "new");

    // Delete: 204, then 404; the name is free again.
    let (status, body) = api.delete(&format!("/secret/{id}"), &key).await;
    assert_eq!(status, 204, "{body}");
    assert_error(&api.get(&format!("/secret/{id}"), &key).await, 404);
    assert_error(&api.delete(&format!("/secret/{id}"), &key).await, 404);
    let (status, _) = api
        .post(
            "/secret",
            &key,
            json!({"name": "anthropic-prod", "value": "again"}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, still) = api.get(&format!("/secret/{other_id}"), &other).await;
    assert_eq!(still["name"], "anthropic-prod", "other org untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_registry() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let other = control.apikey("globex", ALL);
    let a = api
        .create_secret(&key, "alpha", "va", &["api.alpha.example"])
        .await;
    let b = api.create_secret(&key, "beta", "vb", &[]).await;
    api.create_secret(&other, "gamma", "vg", &[]).await;

    // PUT answers env → placeholder.
    let (status, sb) = api
        .put(
            "/sandbox/sb-1",
            &key,
            json!({"cgroup": "/veil-test.slice/sb-1", "netns": "/run/netns/sb1",
                   "secrets": [{"MY_A": "alpha"}, {"B_KEY": "beta"}]}),
        )
        .await;
    assert_eq!(status, 200, "{sb}");
    assert_eq!(sb["env"]["MY_A"], a["placeholder"]);
    assert_eq!(sb["env"]["B_KEY"], b["placeholder"]);
    assert_eq!(
        sb["cgroup"], "veil-test.slice/sb-1",
        "relative to the cgroup2 mount"
    );
    assert_eq!(sb["netns"], "/run/netns/sb1");
    assert!(sb.get("caCert").is_some());

    // GET sandbox and its secrets: placeholder and hosts, never a value.
    let (status, got) = api.get("/sandbox/sb-1", &key).await;
    assert_eq!(status, 200);
    assert_eq!(got["env"], sb["env"]);
    let (status, mounted) = api.get("/sandbox/sb-1/secrets", &key).await;
    assert_eq!(status, 200);
    let mounted = mounted.as_array().unwrap().clone();
    assert_eq!(mounted.len(), 2);
    for m in &mounted {
        assert!(m.get("value").is_none(), "{m}");
        assert!(m["placeholder"].is_string() && m["hosts"].is_array() && m["env"].is_string());
    }
    let alpha = mounted.iter().find(|m| m["env"] == "MY_A").unwrap();
    assert_eq!(alpha["hosts"], json!(["api.alpha.example"]));

    // Unknown secret names → 400 naming them; another org's secret is unknown too.
    let (status, err) = api
        .put(
            "/sandbox/sb-2",
            &key,
            json!({"cgroup": "/veil-test.slice/sb-2", "secrets": [{"X": "nope"}, {"Y": "gamma"}]}),
        )
        .await;
    assert_eq!(status, 400);
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains("nope") && msg.contains("gamma"), "{msg}");
    assert_error(&api.get("/sandbox/sb-2", &key).await, 404);

    // Guards: cgroup outside a parent, bad netns, one sandbox per cgroup, ids unique across orgs.
    for body in [
        json!({"cgroup": "/user.slice/x"}),
        json!({"cgroup": "/veil-test.slice"}),
        json!({"cgroup": "/veil-test.slice/../user.slice"}),
        json!({"cgroup": "/veil-test.slice/x", "netns": "/tmp/netns"}),
        json!({"cgroup": "/veil-test.slice/x", "netns": "/proc/self/ns/net"}),
        // Without a cgroup a PUT declares; a netns then has nothing to belong to.
        json!({"netns": "/run/netns/x", "secrets": []}),
        json!({"cgroup": "/veil-test.slice/x", "secrets": [{"A": "alpha", "B": "beta"}]}),
        json!({"cgroup": "/veil-test.slice/x", "secrets": [{"A": "alpha"}, {"A": "beta"}]}),
        json!({"cgroup": "/veil-test.slice/x", "secrets": [{"BAD-ENV": "alpha"}]}),
        json!({"cgroup": "/veil-test.slice/x", "secrets": {"A": "alpha"}}),
    ] {
        let reply = api.put("/sandbox/sb-x", &key, body.clone()).await;
        assert_error(&reply, 400);
    }
    let (status, _) = api
        .put(
            "/sandbox/sb-3",
            &key,
            json!({"cgroup": "/veil-test.slice/x", "netns": "/proc/123/ns/net"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_error(
        &api.put(
            "/sandbox/sb-4",
            &key,
            json!({"cgroup": "veil-test.slice/x"}),
        )
        .await,
        409,
    );
    assert_error(
        &api.put(
            "/sandbox/sb-4",
            &other,
            json!({"cgroup": "/veil-test.slice/x"}),
        )
        .await,
        409,
    );
    assert_error(
        &api.put(
            "/sandbox/sb-1",
            &other,
            json!({"cgroup": "/veil-test.slice/o1"}),
        )
        .await,
        404,
    );
    assert_error(&api.get("/sandbox/sb-1", &other).await, 404);
    assert_error(&api.get("/sandbox/sb-1/secrets", &other).await, 404);
    assert_error(
        &api.put("/sandbox/sb-1/secrets", &other, json!({"secrets": []}))
            .await,
        404,
    );
    assert_error(&api.delete("/sandbox/sb-1", &other).await, 404);

    // PUT …/secrets replaces the mounted set (Daytona's shape); [] detaches all.
    let (status, sb) = api
        .put(
            "/sandbox/sb-1/secrets",
            &key,
            json!({"secrets": [{"ONLY_B": "beta"}]}),
        )
        .await;
    assert_eq!(status, 200, "{sb}");
    assert_eq!(sb["env"], json!({"ONLY_B": b["placeholder"]}));
    assert_error(
        &api.put(
            "/sandbox/sb-1/secrets",
            &key,
            json!({"secrets": [{"Z": "missing"}]}),
        )
        .await,
        400,
    );
    assert_error(
        &api.put("/sandbox/missing/secrets", &key, json!({"secrets": []}))
            .await,
        404,
    );

    // A mounted secret can be deleted; the sandbox then resolves nothing for it.
    let (status, _) = api
        .delete(&format!("/secret/{}", b["id"].as_str().unwrap()), &key)
        .await;
    assert_eq!(status, 204);
    let (_, mounted) = api.get("/sandbox/sb-1/secrets", &key).await;
    assert_eq!(mounted, json!([]));
    let (_, got) = api.get("/sandbox/sb-1", &key).await;
    assert_eq!(got["env"], json!({}));
    // Recreating the name does not silently re-attach the old mount.
    api.create_secret(&key, "beta", "vb2", &[]).await;
    let (_, mounted) = api.get("/sandbox/sb-1/secrets", &key).await;
    assert_eq!(mounted, json!([]));

    let (status, sb) = api
        .put("/sandbox/sb-1/secrets", &key, json!({"secrets": []}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(sb["env"], json!({}));

    // DELETE: 204, then 404; the cgroup is free again.
    let (status, _) = api.delete("/sandbox/sb-3", &key).await;
    assert_eq!(status, 204);
    assert_error(&api.delete("/sandbox/sb-3", &key).await, 404);
    let (status, _) = api
        .put(
            "/sandbox/sb-4",
            &key,
            json!({"cgroup": "/veil-test.slice/x"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", ALL);
    let value = "audit-distinctive-value-93f1";
    let s = api
        .create_secret(&key, "audited", value, &["a.example"])
        .await;
    let id = s["id"].as_str().unwrap();
    api.patch(
        &format!("/secret/{id}"),
        &key,
        json!({"value": "v2-93f1", "hosts": []}),
    )
    .await;
    api.put(
        "/sandbox/aud",
        &key,
        json!({"cgroup": "/veil-test.slice/aud", "secrets": [{"E": "audited"}]}),
    )
    .await;
    api.put("/sandbox/aud/secrets", &key, json!({"secrets": []}))
        .await;
    api.delete("/sandbox/aud", &key).await;
    api.delete(&format!("/secret/{id}"), &key).await;

    let (status, page) = api.get("/audit?limit=3", &key).await;
    assert_eq!(status, 200, "{page}");
    let mut items = page["items"].as_array().unwrap().clone();
    let mut cursor = page["nextCursor"].as_str().map(str::to_owned);
    while let Some(c) = cursor {
        let (_, next) = api.get(&format!("/audit?limit=3&cursor={c}"), &key).await;
        items.extend(next["items"].as_array().unwrap().iter().cloned());
        cursor = next["nextCursor"].as_str().map(str::to_owned);
    }
    assert_eq!(items.len(), page["total"].as_u64().unwrap() as usize);
    let actions: Vec<&str> = items
        .iter()
        .map(|i| i["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "secret.delete",
            "sandbox.delete",
            "sandbox.secrets",
            "sandbox.put",
            "secret.update",
            "secret.create",
            "apikey.create"
        ],
        "newest first"
    );
    let key_id = key.split('_').nth(1).unwrap();
    for item in &items[..6] {
        assert_eq!(item["actorKeyId"], key_id);
        assert_eq!(item["organizationId"], "acme");
        assert!(item["createdAt"].is_string());
    }
    let update = &items[4];
    assert_eq!(update["targetId"], id);
    assert_eq!(update["changes"]["value"]["to"], "***");
    assert_eq!(update["changes"]["hosts"]["from"], json!(["a.example"]));
    assert_eq!(update["changes"]["hosts"]["to"], json!([]));
    assert_eq!(
        update["changes"]["hosts"]["unrestricted"], true,
        "widening is recorded"
    );
    let all = serde_json::to_string(&items).unwrap();
    assert!(!all.contains("93f1"), "no value in the audit");
    assert!(
        control.log().contains("veil::audit"),
        "audit is also emitted as tracing events"
    );

    let (_, asc) = api.get("/audit?order=asc&limit=1", &key).await;
    assert_eq!(asc["items"][0]["action"], "apikey.create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_every_route() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["read:audit"]);
    let (status, doc) = api.get("/openapi.json", &key).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let routes = [
        ("/secret", "post"),
        ("/secret", "get"),
        ("/secret/paginated", "get"),
        ("/secret/{secretId}", "get"),
        ("/secret/{secretId}", "patch"),
        ("/secret/{secretId}", "delete"),
        ("/sandbox", "post"),
        ("/sandbox/{sandboxId}", "put"),
        ("/sandbox/{sandboxId}", "get"),
        ("/sandbox/{sandboxId}", "delete"),
        ("/sandbox/{sandboxId}/secrets", "put"),
        ("/sandbox/{sandboxId}/secrets", "get"),
        ("/audit", "get"),
        ("/api-keys", "post"),
        ("/api-keys", "get"),
        ("/api-keys/{keyId}", "delete"),
        ("/openapi.json", "get"),
    ];
    for (path, method) in routes {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} not described"
        );
    }
    let described: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| {
            p.as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "parameters")
                .count()
        })
        .sum();
    assert_eq!(
        described,
        routes.len(),
        "no undocumented extras, none missing"
    );
    assert_error(&api.send("GET", "/openapi.json", None, None).await, 401);
    assert_error(&api.get("/nope", &key).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_over_rest() {
    let control = Control::start();
    let api = control.api();
    let admin = control.apikey("acme", &["admin"]);
    let (status, created) = api
        .post(
            "/api-keys",
            &admin,
            json!({"permissions": ["read:audit", "manage:secrets"]}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let new_key = created["value"].as_str().unwrap().to_owned();
    assert_eq!(
        created["permissions"],
        json!(["manage:secrets", "read:audit"])
    );
    assert_eq!(created["organizationId"], "acme");
    let (status, _) = api.get("/secret", &new_key).await;
    assert_eq!(status, 200, "the new key works");
    assert_error(&api.get("/api-keys", &new_key).await, 403);

    let (status, list) = api.get("/api-keys", &admin).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        !list.to_string().contains(&new_key[22..]),
        "a listing never shows a key"
    );
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("value").is_none())
    );

    for body in [
        json!({}),
        json!({"permissions": []}),
        json!({"permissions": ["root"]}),
        json!({"permissions": "admin"}),
    ] {
        assert_error(&api.post("/api-keys", &admin, body).await, 400);
    }
    let other = control.apikey("globex", &["admin"]);
    let id = created["id"].as_str().unwrap();
    assert_error(&api.delete(&format!("/api-keys/{id}"), &other).await, 404);
    let (_, other_list) = api.get("/api-keys", &other).await;
    assert_eq!(
        other_list.as_array().unwrap().len(),
        1,
        "only the caller's organization"
    );
    let (status, _) = api.delete(&format!("/api-keys/{id}"), &admin).await;
    assert_eq!(status, 204);
    assert_error(&api.get("/secret", &new_key).await, 401);
    assert_error(&api.delete(&format!("/api-keys/{id}"), &admin).await, 404);
    let (_, audit) = api.get("/audit?limit=2", &admin).await;
    assert_eq!(audit["items"][0]["action"], "apikey.revoke");
    assert_eq!(audit["items"][1]["action"], "apikey.create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_required_refuses_sandboxes_without_an_agent() {
    let config = veil_tests::control::TEST_CONFIG.replace("required = false", "required = true");
    assert!(config.contains("required = true"));
    let control = Control::start_with_config(&config);
    let api = control.api();
    let key = control.apikey("acme", &["admin"]);
    let reply = api
        .put(
            "/sandbox/sb",
            &key,
            json!({"cgroup": "/veil-test.slice/sb"}),
        )
        .await;
    assert_error(&reply, 503);
    assert_error(&api.get("/sandbox/sb", &key).await, 404);
    // Secrets are unaffected.
    api.create_secret(&key, "s", "v", &[]).await;
}
