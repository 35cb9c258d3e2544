//! veil-client against a real veil-control: every route through the typed client, answers
//! decoded into veil-api's types, errors carrying the status and the server's message.
//!
//! The wire format itself is pinned by the raw-JSON tests (control_api, control_sdk, …): a
//! client and a server sharing the same types cannot catch a wire bug, so this checks only that
//! the client speaks every route and that what it decodes is what the server meant.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::collections::BTreeMap;

use veil_client::ClientError;
use veil_client::veil_api::{
    AuditQuery, CreateApiKey, CreateSecret, Egress, PutSandbox, PutSandboxSecrets, SecretPageQuery,
    SecretValue, UpdateSecret, WrongHost,
};
use veil_tests::control::Control;

fn mount(env: &str, secret: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(env.to_owned(), secret.to_owned())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_through_the_typed_client() {
    let control = Control::start();
    let admin = control.api().client(&control.apikey("acme", &["admin"]));

    // Keys: the new key works at once, is listed without its value, and can be revoked.
    let new = admin
        .create_api_key(&CreateApiKey {
            permissions: vec!["manage:secrets".into(), "write:sandboxes".into()],
        })
        .await
        .unwrap();
    assert_eq!(new.key.organization_id.as_str(), "acme");
    let listed = admin.api_keys().await.unwrap();
    assert!(listed.iter().any(|k| k.id == new.key.id));
    let client = control.api().client(new.value.expose());

    // Secrets.
    let created = client
        .create_secret(&CreateSecret {
            name: "alpha".into(),
            value: SecretValue::new("client-test-value-0123456789"),
            hosts: Some(vec!["API.Alpha.Example".into()]),
            wrong_host: Some(WrongHost::Block),
            ..CreateSecret::default()
        })
        .await
        .unwrap();
    assert_eq!(created.hosts, ["api.alpha.example"], "normalised");
    assert_eq!(created.wrong_host, WrongHost::Block);
    assert_eq!(created.revision.0, 1);
    let id = created.id.to_string();
    let detail = client
        .update_secret(
            &id,
            &UpdateSecret {
                description: Some("rotated".into()),
                value: Some(SecretValue::new("client-test-value-2")),
                ..UpdateSecret::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(detail.secret.revision.0, 2);
    assert_eq!(detail.secret.description.as_deref(), Some("rotated"));
    assert_eq!(detail.secret.placeholder, created.placeholder, "kept");
    assert_eq!(client.secret(&id).await.unwrap(), detail);
    client
        .create_secret(&CreateSecret {
            name: "beta".into(),
            value: SecretValue::new("v"),
            ..CreateSecret::default()
        })
        .await
        .unwrap();
    assert_eq!(client.list_secrets().await.unwrap().len(), 2);
    let page = client
        .secrets_page(&SecretPageQuery {
            limit: Some("1".into()),
            ..SecretPageQuery::default()
        })
        .await
        .unwrap();
    assert_eq!((page.items.len(), page.total), (1, 2));
    assert!(page.next_cursor.is_some());
    assert_eq!(
        client.all_secrets(None).await.unwrap().len(),
        2,
        "follows the cursor"
    );
    assert_eq!(client.all_secrets(Some("ALP")).await.unwrap().len(), 1);

    // Sandboxes.
    let sb = client
        .put_sandbox(
            "sb-client",
            &PutSandbox {
                cgroup: Some("/veil-test.slice/sb-client".into()),
                keep: None,
                netns: None,
                secrets: Some(vec![mount("MY_A", "alpha")]),
                egress: Some("host".into()),
                host: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(sb.env["MY_A"], created.placeholder);
    assert_eq!(sb.egress, Egress::Host);
    assert_eq!(sb.cgroup, "veil-test.slice/sb-client");
    let sb = client
        .put_sandbox_secrets(
            "sb-client",
            &PutSandboxSecrets {
                secrets: vec![mount("MY_A", "alpha"), mount("MY_B", "beta")],
            },
        )
        .await
        .unwrap();
    assert_eq!(sb.env.len(), 2);
    assert_eq!(client.sandbox("sb-client").await.unwrap(), sb);
    let mounted = client.sandbox_secrets("sb-client").await.unwrap();
    assert_eq!(mounted.len(), 2);
    assert!(
        mounted
            .iter()
            .any(|m| m.env == "MY_A" && m.secret_id == created.id)
    );
    client.delete_sandbox("sb-client").await.unwrap();

    // Errors: the status and the server's message, never a value.
    let err = client.sandbox("sb-client").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 404, message } if message.contains("sb-client")),
        "{err}"
    );
    let err = client
        .create_secret(&CreateSecret {
            name: "alpha".into(),
            value: SecretValue::new("client-test-duplicate-value"),
            ..CreateSecret::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(!err.to_string().contains("client-test-duplicate-value"));
    let err = client.audit(&AuditQuery::default()).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");

    client.delete_secret(&id).await.unwrap();
    assert_eq!(client.secret(&id).await.unwrap_err().status(), Some(404));

    // The audit log, through a key that may read it.
    let auditor = control
        .api()
        .client(&control.apikey("acme", &["read:audit"]));
    let audit = auditor
        .audit(&AuditQuery {
            limit: Some("200".into()),
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = audit.items.iter().map(|a| a.action.as_str()).collect();
    for want in [
        "apikey.create",
        "secret.create",
        "secret.update",
        "sandbox.put",
        "secret.delete",
    ] {
        assert!(actions.contains(&want), "{want} not in {actions:?}");
    }
    admin.revoke_api_key(&new.key.id).await.unwrap();
    assert_eq!(client.list_secrets().await.unwrap_err().status(), Some(401));
}
