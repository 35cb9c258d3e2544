//! `veil-bench store --count N`: the store backends side by side (issue 16). For sled (one
//! veil-control) and PostgreSQL (two replicas on a private server, one agent each): secret
//! creates per second from 8 concurrent clients, full keyset-paginated walks of the list (pages
//! per second), and rotations (`PATCH ?wait=5s`) answered once every agent holding the secret
//! acknowledged it — with PostgreSQL, the agent of the other replica included. Prints one line
//! per measurement and backend. Values are never printed.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use veil_tests::agent::AgentOptions;
use veil_tests::control::{Api, random_token};
use veil_tests::postgres::Postgres;
use veil_tests::replicas::store_config;
use veil_tests::{AgentSandbox, Sandbox, Veil};

use crate::quantile::percentile;

/// Concurrent clients creating secrets.
const CLIENTS: usize = 8;

/// Runs the comparison.
pub fn run(count: u64) -> Result<()> {
    veil_tests::require_root();
    let count = usize::try_from(count)?;
    println!(
        "store: {count} secrets, {CLIENTS} concurrent creators, rotations waited for by every agent"
    );
    let sled = Veil::start_with_control(AgentOptions::default(), "", &[]);
    measure("sled", &sled, None, count)?;
    drop(sled);
    let pg = Postgres::start();
    let a = Veil::start_with_control(AgentOptions::default(), &store_config(&pg), &[]);
    let b = Veil::start_replica(
        AgentOptions::default(),
        &store_config(&pg),
        &a.control().data_dir,
    );
    measure("postgres", &a, Some(&b), count)
}

fn measure(backend: &str, veil: &Veil, other: Option<&Veil>, count: usize) -> Result<()> {
    let api = veil.api();
    let key = veil.key().to_owned();
    let tag = random_token(6);
    // Creates: CLIENTS tasks, each its share of the names.
    let started = Instant::now();
    let failures = veil.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let (api, key, tag) = (api.clone(), key.clone(), tag.clone());
            tasks.push(tokio::spawn(async move {
                let mut failed = 0usize;
                for i in (c..count).step_by(CLIENTS) {
                    let body =
                        json!({"name": format!("b-{tag}-{i:06}"), "value": random_token(32)});
                    if api.post("/secret", &key, body).await.0 != 201 {
                        failed += 1;
                    }
                }
                failed
            }));
        }
        let mut failed = 0;
        for t in tasks {
            failed += t.await.unwrap_or(count);
        }
        failed
    });
    let took = started.elapsed();
    if failures > 0 {
        bail!("{backend}: {failures} creates failed");
    }
    println!(
        "{backend:>8}: creates {:>7.0}/s ({count} in {:.2} s)",
        count as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    );
    // Paginated reads: walk the whole list, 100 per page, a few times.
    let started = Instant::now();
    let mut pages = 0usize;
    for _ in 0..3 {
        pages += veil.block_on(walk(&api, &key))?;
    }
    let took = started.elapsed();
    println!(
        "{backend:>8}: paginated reads {:>7.0} pages/s ({pages} pages of 100)",
        pages as f64 / took.as_secs_f64()
    );
    // Rotations acknowledged by every agent that holds the secret.
    let name = format!("rot-{tag}");
    let (status, created) = veil.block_on(api.post(
        "/secret",
        &key,
        json!({"name": name, "value": random_token(32)}),
    ));
    if status != 201 {
        bail!("{backend}: create the rotated secret: {status} {created}");
    }
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    let mut sandboxes = Vec::new();
    for (i, v) in std::iter::once(veil).chain(other).enumerate() {
        let sb = Sandbox::new(&format!("bench-store-{i}"), None);
        v.register_with(
            &AgentSandbox {
                id: format!("bench-store-{tag}-{i}"),
                cgroup: sb.cgroup().path().to_owned(),
                netns: None,
                egress: None,
            },
            &[("MY_KEY", name.as_str())],
        );
        sandboxes.push(sb);
    }
    let agents = sandboxes.len();
    // Every agent holds the secret, as the replica answering the rotations sees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while veil.block_on(api.get(&format!("/secret/{id}"), &key)).1["propagation"]["agents"]
        .as_array()
        .map_or(0, Vec::len)
        < agents
    {
        if Instant::now() > deadline {
            bail!("{backend}: not every agent holds the secret after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut took = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let (status, answer) = veil.block_on(api.patch(
            &format!("/secret/{id}?wait=5s"),
            &key,
            json!({"value": random_token(32)}),
        ));
        took.push(started.elapsed());
        let acked = answer["propagation"]["agents"]
            .as_array()
            .map_or(0, Vec::len);
        if status != 200
            || answer["propagation"]["complete"] != Value::Bool(true)
            || acked != agents
        {
            bail!("{backend}: rotation not acknowledged by all {agents} agents: {status}");
        }
    }
    took.sort();
    println!(
        "{backend:>8}: rotation → all {agents} agents acknowledged: p50 {:.1} ms, p99 {:.1} ms",
        ms(percentile(&took, 0.5)),
        ms(percentile(&took, 0.99))
    );
    Ok(())
}

/// Walks every page of the list; returns how many pages.
async fn walk(api: &Api, key: &str) -> Result<usize> {
    let mut path = "/secret/paginated?limit=100".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = api.get(&path, key).await;
        if status != 200 {
            bail!("list page: {status}");
        }
        pages += 1;
        match page["nextCursor"].as_str() {
            Some(c) if !c.is_empty() => path = format!("/secret/paginated?limit=100&cursor={c}"),
            _ => return Ok(pages),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
