//! The permission matrix: each route × missing / invalid / insufficient key × another
//! organization; `admin` implies every permission; revoked keys stop working.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use serde_json::{Value, json};
use veil_tests::control::{Control, assert_error};

struct Route {
    method: &'static str,
    path: String,
    body: Option<Value>,
    needs: &'static str,
    /// Whether the route names an object (another org's object must be a 404).
    object: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_matrix() {
    let control = Control::start();
    let api = control.api();
    let owner = control.apikey("acme", &["manage:secrets", "write:sandboxes", "read:audit"]);
    let secret = api.create_secret(&owner, "s1", "value-1", &[]).await;
    let sid = secret["id"].as_str().unwrap().to_owned();
    let (status, _) = api
        .put(
            "/sandbox/sb1",
            &owner,
            json!({"cgroup": "/veil-test.slice/sb1", "secrets": [{"E": "s1"}]}),
        )
        .await;
    assert_eq!(status, 200);

    let spare = control.apikey("acme", &["read:audit"]);
    let spare_id = spare.split('_').nth(1).unwrap().to_owned();
    let routes = vec![
        Route {
            method: "POST",
            path: "/secret".into(),
            body: Some(json!({"name": "new1", "value": "v"})),
            needs: "manage:secrets",
            object: false,
        },
        Route {
            method: "GET",
            path: "/secret".into(),
            body: None,
            needs: "manage:secrets",
            object: false,
        },
        Route {
            method: "GET",
            path: "/secret/paginated".into(),
            body: None,
            needs: "manage:secrets",
            object: false,
        },
        Route {
            method: "GET",
            path: format!("/secret/{sid}"),
            body: None,
            needs: "manage:secrets",
            object: true,
        },
        Route {
            method: "PATCH",
            path: format!("/secret/{sid}"),
            body: Some(json!({"description": "d"})),
            needs: "manage:secrets",
            object: true,
        },
        Route {
            method: "PUT",
            path: "/sandbox/sb1".into(),
            body: Some(json!({"cgroup": "/veil-test.slice/sb1"})),
            needs: "write:sandboxes",
            object: true,
        },
        Route {
            method: "GET",
            path: "/sandbox/sb1".into(),
            body: None,
            needs: "write:sandboxes",
            object: true,
        },
        Route {
            method: "PUT",
            path: "/sandbox/sb1/secrets".into(),
            body: Some(json!({"secrets": [{"E": "s1"}]})),
            needs: "write:sandboxes",
            object: true,
        },
        Route {
            method: "GET",
            path: "/sandbox/sb1/secrets".into(),
            body: None,
            needs: "write:sandboxes",
            object: true,
        },
        Route {
            method: "GET",
            path: "/audit".into(),
            body: None,
            needs: "read:audit",
            object: false,
        },
        Route {
            method: "POST",
            path: "/api-keys".into(),
            body: Some(json!({"permissions": ["read:audit"]})),
            needs: "admin",
            object: false,
        },
        Route {
            method: "GET",
            path: "/api-keys".into(),
            body: None,
            needs: "admin",
            object: false,
        },
        Route {
            method: "DELETE",
            path: format!("/api-keys/{spare_id}"),
            body: None,
            needs: "admin",
            object: true,
        },
        // Deletes last: they succeed for the admin key.
        Route {
            method: "DELETE",
            path: "/sandbox/sb1".into(),
            body: None,
            needs: "write:sandboxes",
            object: true,
        },
        Route {
            method: "DELETE",
            path: format!("/secret/{sid}"),
            body: None,
            needs: "manage:secrets",
            object: true,
        },
    ];
    let all = ["manage:secrets", "write:sandboxes", "read:audit"];
    let revoked = control.apikey("acme", &["admin"]);
    let revoked_id = revoked.split('_').nth(1).unwrap().to_owned();
    let out = control.cli(&[
        "apikey",
        "revoke",
        &revoked_id,
        "--data-dir",
        control.data_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut forged = owner.clone();
    forged.pop();
    forged.push(if owner.ends_with('0') { '1' } else { '0' });
    let invalid: Vec<(&str, String)> = vec![
        ("garbage", "Bearer nonsense".into()),
        ("forged", format!("Bearer {forged}")),
        ("revoked", format!("Bearer {revoked}")),
        ("basic scheme", format!("Basic {owner}")),
        ("no scheme", owner.clone()),
        ("empty bearer", "Bearer ".into()),
    ];
    let admin = control.apikey("acme", &["admin"]);
    let http = reqwest::Client::new();

    for r in &routes {
        let label = format!("{} {}", r.method, r.path);
        // Missing key.
        assert_error(
            &api.send(r.method, &r.path, None, r.body.as_ref()).await,
            401,
        );
        // Invalid keys.
        for (what, header) in &invalid {
            let mut req = http
                .request(
                    r.method.parse().unwrap(),
                    format!("{}{}", control.url(), r.path),
                )
                .header("authorization", header);
            if let Some(b) = &r.body {
                req = req.json(b);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert_error(&(status, body), 401);
            let _ = what;
        }
        // Insufficient: every permission but the needed one.
        let others: Vec<&str> = all.iter().copied().filter(|p| *p != r.needs).collect();
        let weak = control.apikey("acme", &others);
        let reply = api
            .send(r.method, &r.path, Some(&weak), r.body.as_ref())
            .await;
        assert_error(&reply, 403);
        assert!(
            reply.1["message"].as_str().unwrap().contains(r.needs),
            "{label}: {}",
            reply.1
        );
        // Another organization, with every permission.
        if r.object {
            let stranger = control.apikey("globex", &["admin"]);
            let reply = api
                .send(r.method, &r.path, Some(&stranger), r.body.as_ref())
                .await;
            assert_error(&reply, 404);
        }
        // The needed permission alone suffices, and admin implies it.
        let exact = control.apikey("acme", &[r.needs]);
        let key = if r.method == "DELETE" { &admin } else { &exact };
        let (status, body) = api
            .send(r.method, &r.path, Some(key), r.body.as_ref())
            .await;
        assert!((200..300).contains(&status), "{label}: {status} {body}");
        if r.method == "GET" {
            let (status, _) = api.send(r.method, &r.path, Some(&admin), None).await;
            assert_eq!(status, 200, "{label} with admin");
        }
    }

    assert_error(&api.get("/audit", &spare).await, 401);

    // The organization header cannot switch organizations.
    let stranger = control.apikey("globex", &["admin"]);
    let (status, list) = http
        .get(format!("{}/secret", control.url()))
        .bearer_auth(&stranger)
        .header("X-Daytona-Organization-ID", "acme")
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(list.json::<Value>().await.unwrap(), json!([]));
}
