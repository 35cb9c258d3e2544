//! `veil-bench fleet --agents N --hosts H --rotations R` (issue 17): two veil-control replicas
//! on a private PostgreSQL and N simulated agents (link-level clients over mutual TLS, no
//! eBPF; each answers Applied to every message) spread over H enrolled hosts, alternately on
//! either replica, one sandbox per host mounting the measured secret. Measures a rotation
//! (`PATCH ?wait=60s`) until every agent acknowledged it (p50/p99, goal p99 ≤ 1 s), the RSS
//! and file descriptors per connected agent on a replica, and the failover time after
//! `kill -9` of a replica (until the last of its agents got a snapshot from the other).
//! Values are never printed.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::json;
use tokio::sync::mpsc;
use veil_tests::control::random_token;
use veil_tests::fleet::{LinkOutcome, Replica, client_tls, link_connect, random_agent_id};
use veil_tests::postgres::Postgres;

use crate::quantile::percentile;

/// What a simulated agent reports.
enum Event {
    /// Admitted by replica `replica` (0 or 1) at `at`.
    Connected {
        agent: usize,
        replica: usize,
        at: Instant,
        /// When the attempt that succeeded started (its connect, TLS and snapshot took the rest).
        attempt: Instant,
        /// Attempts that failed since the agent's previous connection.
        failed: u32,
    },
}

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp ("…T07:50:01.123456Z …").
fn log_time_of_day(line: &str) -> Option<f64> {
    let t = line.get(11..)?.split(['Z', ' ']).next()?;
    let mut parts = t.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Where the failover's time went on the surviving replica: from its log, the first and last
/// TLS-admitted connection and the first and last snapshot queued after `killed_at` (seconds
/// since midnight UTC).
fn replica_timeline(log: &str, killed_at: f64) -> String {
    let times = |what: &str| -> Vec<f64> {
        log.lines()
            .filter(|l| l.contains(what))
            .filter_map(log_time_of_day)
            .filter(|t| *t >= killed_at)
            .map(|t| (t - killed_at) * 1000.0)
            .collect()
    };
    let span = |v: &[f64]| match (v.first(), v.last()) {
        (Some(a), Some(b)) => format!("{} from {a:.0} to {b:.0} ms", v.len()),
        _ => "none".to_owned(),
    };
    format!(
        "TLS+enrollment checked: {}; snapshot queued: {}",
        span(&times("fleet host connected")),
        span(&times("agent connected; snapshot queued"))
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max.max(want));
            lim.rlim_max = lim.rlim_max.max(lim.rlim_cur);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs the benchmark.
pub fn run(agents: u64, hosts: u64, rotations: u64) -> Result<()> {
    veil_tests::require_root();
    let (n, h, r) = (
        usize::try_from(agents)?,
        usize::try_from(hosts)?,
        usize::try_from(rotations)?,
    );
    raise_fd_limit((4 * n as u64) + 4096);
    let pg = Postgres::start();
    let a = Replica::first(&pg);
    let mut b = Replica::other(&pg, &a.control.data_dir);
    let dir = tempfile::tempdir()?;
    let names: Vec<String> = (0..h).map(|i| format!("bench-host-{i}")).collect();
    let creds: Vec<_> = names
        .iter()
        .map(|name| a.enroll(name, dir.path()))
        .collect();
    let tls: Vec<_> = creds
        .iter()
        .map(|c| client_tls(&c.ca(), Some((&c.cert(), &c.key()))))
        .collect();
    let ports = [a.fleet_port, b.fleet_port];
    let pids = [a.control.pid().unwrap_or(0), b.control.pid().unwrap_or(0)];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let before = [
        (rss_kib(pids[0]), fds(pids[0])),
        (rss_kib(pids[1]), fds(pids[1])),
    ];
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    for i in 0..n {
        let (tls, tx) = (tls[i % h].clone(), tx.clone());
        rt.spawn(async move {
            let id = random_agent_id();
            let mut replica = i % 2;
            let mut failed = 0;
            loop {
                let attempt = Instant::now();
                match link_connect(ports[replica], tls.clone(), &id, Duration::from_secs(60)).await
                {
                    LinkOutcome::Admitted(mut conn) => {
                        let _ = tx.send(Event::Connected {
                            agent: i,
                            replica,
                            at: Instant::now(),
                            attempt,
                            failed,
                        });
                        failed = 0;
                        while let Some(Ok(_)) = conn.next(Duration::from_secs(3600)).await {}
                    }
                    _ => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }
                replica = 1 - replica;
            }
        });
    }
    let started = Instant::now();
    let mut on = vec![usize::MAX; n];
    let mut connected = 0;
    while connected < n {
        let Some(Event::Connected { agent, replica, .. }) = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(120), rx.recv())
                .await
                .ok()
                .flatten()
        }) else {
            bail!("only {connected} of {n} agents connected within 120 s");
        };
        if on[agent] == usize::MAX {
            connected += 1;
        }
        on[agent] = replica;
    }
    println!(
        "fleet: {n} agents over {h} hosts connected to 2 replicas in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Let presence records and publications settle before measuring memory.
    std::thread::sleep(Duration::from_secs(3));
    for (i, pid) in pids.iter().enumerate() {
        let agents_here = on.iter().filter(|r| **r == i).count().max(1) as f64;
        let (rss, fd) = (rss_kib(*pid), fds(*pid));
        println!(
            "fleet: replica {i}: {agents_here} agents, RSS {:.1} MiB (+{:.1} KiB per agent), fds {fd} (+{:.2} per agent)",
            rss as f64 / 1024.0,
            (rss.saturating_sub(before[i].0)) as f64 / agents_here,
            (fd.saturating_sub(before[i].1)) as f64 / agents_here,
        );
    }
    let key = a.control.apikey("bench-fleet", &["admin"]);
    let api = a.control.api();
    let created = rt.block_on(api.post(
        "/secret",
        &key,
        json!({"name": "fleet-bench", "value": random_token(32), "hosts": ["x.test"]}),
    ));
    if created.0 != 201 {
        bail!("creating the secret: {}", created.0);
    }
    let id = created.1["id"].as_str().unwrap_or_default().to_owned();
    for (i, name) in names.iter().enumerate() {
        let put = rt.block_on(api.put(
            &format!("/sandbox/bench-sb-{i}"),
            &key,
            json!({"cgroup": format!("veil-test.slice/bench-fleet-{i}-{}", random_token(6)),
                   "host": name, "secrets": [{"MY_KEY": "fleet-bench"}]}),
        ));
        if put.0 != 200 {
            bail!("PUT sandbox on {name}: {} {}", put.0, put.1);
        }
    }
    let mut waits = Vec::with_capacity(r);
    for _ in 0..r {
        let t = Instant::now();
        let rotated = rt.block_on(api.patch(
            &format!("/secret/{id}?wait=60s"),
            &key,
            json!({"value": random_token(32)}),
        ));
        if rotated.0 != 200 {
            bail!("rotation: {} {}", rotated.0, rotated.1["message"]);
        }
        let acked = rotated.1["propagation"]["agents"]
            .as_array()
            .map_or(0, |a| {
                a.iter()
                    .filter(|x| x["acknowledgedRevision"] == rotated.1["revision"])
                    .count()
            });
        if acked < n {
            bail!("only {acked} of {n} agents acknowledged the rotation");
        }
        waits.push(t.elapsed());
    }
    waits.sort();
    println!(
        "fleet: rotation PATCH -> acknowledged by all {n} agents: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({r} rotations)",
        percentile(&waits, 0.5).as_secs_f64() * 1000.0,
        percentile(&waits, 0.99).as_secs_f64() * 1000.0,
        waits.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    );
    // Failover: kill -9 replica 1; its agents reconnect to replica 0.
    let moving: Vec<usize> = (0..n).filter(|i| on[*i] == 1).collect();
    while rx.try_recv().is_ok() {}
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() % 86400.0);
    let killed = Instant::now();
    b.control.kill();
    let mut left: std::collections::BTreeSet<usize> = moving.iter().copied().collect();
    let mut last = Duration::ZERO;
    let (mut back, mut attempts, mut failures) = (Vec::new(), Vec::new(), 0u32);
    while !left.is_empty() {
        let Some(Event::Connected {
            agent,
            replica,
            at,
            attempt,
            failed,
        }) = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .ok()
                .flatten()
        })
        else {
            bail!("{} agents never came back after the kill", left.len());
        };
        if replica == 0 && left.remove(&agent) {
            last = at.duration_since(killed);
            back.push(last);
            attempts.push(at.duration_since(attempt));
            failures += failed;
        }
    }
    back.sort();
    attempts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if !back.is_empty() {
        println!(
            "fleet: failover profile: back on the other p50 {:.0} ms, p90 {:.0} ms; the successful attempt (connect, TLS, snapshot) p50 {:.0} ms, max {:.0} ms; {failures} failed attempts; replica log after the kill: {}",
            ms(percentile(&back, 0.5)),
            ms(percentile(&back, 0.9)),
            ms(percentile(&attempts, 0.5)),
            attempts.last().map_or(0.0, |d| ms(*d)),
            replica_timeline(&a.control.log(), killed_at),
        );
    }
    println!(
        "fleet: kill -9 of a replica: its {} agents on the other within {:.0} ms (the last one's snapshot)",
        moving.len(),
        last.as_secs_f64() * 1000.0
    );
    rt.shutdown_background();
    drop(b);
    drop(a);
    drop(pg);
    Ok(())
}
