//! Pagination over 1,000 secrets while others are inserted and deleted: every secret that
//! existed throughout appears exactly once; name filter, sort and order.

#![allow(clippy::unwrap_used)] // tests may unwrap (house rule)

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures_util::StreamExt;
use serde_json::Value;
use veil_tests::control::{Api, Control};

const BASE: usize = 1000;
const VICTIMS: usize = 300;

async fn create_many(api: &Api, key: &str, names: Vec<String>) -> Vec<Value> {
    futures_util::stream::iter(names)
        .map(|name| {
            let api = api.clone();
            let key = key.to_owned();
            async move { api.create_secret(&key, &name, "v", &[]).await }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Walks every page; returns ids in order.
async fn walk(api: &Api, key: &str, query: &str, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/secret/paginated?limit={limit}{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = api.get(&path, key).await;
        assert_eq!(status, 200, "{path}: {page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit);
        out.extend(items.iter().cloned());
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return out,
        }
        // Give the churn task room to interleave between pages.
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_stable_under_concurrent_inserts_and_deletes() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["manage:secrets"]);

    let base = create_many(
        &api,
        &key,
        (0..BASE).map(|i| format!("base-{i:04}")).collect(),
    )
    .await;
    let victims = create_many(
        &api,
        &key,
        (0..VICTIMS).map(|i| format!("victim-{i:04}")).collect(),
    )
    .await;
    let base_ids: HashSet<String> = base
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();

    // Churn: insert new secrets and delete victims until the walks are done.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicUsize::new(0));
    let churn = {
        let api = api.clone();
        let key = key.clone();
        let stop = stop.clone();
        let churned = churned.clone();
        let victim_ids: Vec<String> = victims
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        tokio::spawn(async move {
            let mut i = 0usize;
            let mut victims = victim_ids.into_iter();
            while !stop.load(Ordering::Relaxed) {
                api.create_secret(&key, &format!("churn-{i:05}"), "v", &[])
                    .await;
                if let Some(v) = victims.next() {
                    let (status, _) = api.delete(&format!("/secret/{v}"), &key).await;
                    assert_eq!(status, 204);
                }
                i += 1;
                churned.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    for (query, limit) in [
        ("", 37),
        ("&sort=name&order=asc", 50),
        ("&sort=name&order=desc", 23),
        ("&sort=createdAt&order=asc", 41),
        ("&sort=updatedAt&order=desc", 200),
    ] {
        let items = walk(&api, &key, query, limit).await;
        let ids: Vec<&str> = items.iter().map(|s| s["id"].as_str().unwrap()).collect();
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{query}: a secret was repeated");
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for id in &ids {
            *counts.entry(id).or_default() += 1;
        }
        for id in &base_ids {
            assert_eq!(
                counts.get(id.as_str()),
                Some(&1),
                "{query}: base secret {id} missing"
            );
        }
        assert!(items.iter().all(|s| s.get("value").is_none()));
    }
    stop.store(true, Ordering::Relaxed);
    churn.await.unwrap();
    assert!(
        churned.load(Ordering::Relaxed) > 0,
        "churn ran concurrently"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_sort_order() {
    let control = Control::start();
    let api = control.api();
    let key = control.apikey("acme", &["manage:secrets"]);
    let other = control.apikey("globex", &["manage:secrets"]);
    for name in ["Bravo", "alpha", "charlie_db", "delta-db", "echo"] {
        api.create_secret(&key, name, "v", &[]).await;
        // Distinct createdAt stamps, so the createdAt order is the creation order.
        veil_tests::clock::next_millisecond().await;
    }
    api.create_secret(&other, "alpha_db", "v", &[]).await;

    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, p) = api.get("/secret/paginated", &key).await;
    assert_eq!(p["total"], 5);
    assert_eq!(
        names(&p),
        ["echo", "delta-db", "charlie_db", "alpha", "Bravo"],
        "default createdAt desc"
    );
    let (_, p) = api
        .get("/secret/paginated?sort=createdAt&order=asc", &key)
        .await;
    assert_eq!(
        names(&p),
        ["Bravo", "alpha", "charlie_db", "delta-db", "echo"]
    );
    let (_, p) = api.get("/secret/paginated?sort=name&order=asc", &key).await;
    assert_eq!(
        names(&p),
        ["Bravo", "alpha", "charlie_db", "delta-db", "echo"]
    );
    let (_, p) = api
        .get("/secret/paginated?sort=name&order=desc", &key)
        .await;
    assert_eq!(
        names(&p),
        ["echo", "delta-db", "charlie_db", "alpha", "Bravo"]
    );
    let (_, p) = api
        .get("/secret/paginated?name=DB&sort=name&order=asc", &key)
        .await;
    assert_eq!(
        names(&p),
        ["charlie_db", "delta-db"],
        "partial, case-insensitive, own org only"
    );
    assert_eq!(p["total"], 2);
    let (_, p) = api.get("/secret/paginated?name=zzz", &key).await;
    assert_eq!(p["total"], 0);
    assert_eq!(p["nextCursor"], Value::Null);

    // updatedAt follows updates.
    let (_, all) = api.get("/secret", &key).await;
    let alpha = all
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "alpha")
        .unwrap();
    veil_tests::clock::next_millisecond().await;
    api.patch(
        &format!("/secret/{}", alpha["id"].as_str().unwrap()),
        &key,
        serde_json::json!({"value": "v2"}),
    )
    .await;
    let (_, p) = api
        .get("/secret/paginated?sort=updatedAt&order=desc&limit=1", &key)
        .await;
    assert_eq!(names(&p), ["alpha"]);
    assert_eq!(p["total"], 5);
    let cursor = p["nextCursor"].as_str().unwrap();
    let (_, p2) = api
        .get(&format!("/secret/paginated?limit=10&cursor={cursor}"), &key)
        .await;
    assert_eq!(names(&p2).len(), 4, "cursor carries sort and order");
    let (status, _) = api
        .get(
            &format!("/secret/paginated?sort=name&cursor={cursor}"),
            &key,
        )
        .await;
    assert_eq!(status, 400, "a cursor for another sort is rejected");
}
