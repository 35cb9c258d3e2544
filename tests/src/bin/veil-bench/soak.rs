//! `veil-bench soak [--connections N] [--sandboxes S] [--seconds T]`: N concurrent intercepted
//! keep-alive connections spread over S sandboxes (one client process each) for T seconds,
//! every request a random body of 0..64 KiB that the upstream echoes back.
//!
//! Checked: every response equals the request body (nothing corrupted or lost in either
//! direction), the upstream saw the substituted value on every request, and no connection
//! failed. Reported: requests and bytes, the agent's RSS growth per connection at the peak,
//! and its open fds and eBPF map entries before and after (they must come back: no leak).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use rand::{Rng, RngCore};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use veil_client::veil_api::{CreateSecret, SecretValue};
use veil_tests::agent::AgentOptions;
use veil_tests::{NetNs, Sandbox, TestCa, Veil, World};

const HOST: &str = "soak.test";
const VALUE: &str = "sk-soak-0123456789abcdef";
const MAX_BODY: usize = 64 * 1024;

/// The echo upstream: TLS (h1), answers every request with its body when `x-api-key` carries
/// the value, 403 otherwise; counts what it served.
struct Echo {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    wrong_key: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

fn start_echo(ns: &NetNs, ip: IpAddr, ca: &TestCa) -> Result<Echo> {
    let listener = ns.run(move || std::net::TcpListener::bind((ip, 0)))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (certs, key) = ca.issue(&[HOST]);
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let served = Arc::new(AtomicU64::new(0));
    let wrong_key = Arc::new(AtomicU64::new(0));
    let (s, w) = (served.clone(), wrong_key.clone());
    rt.spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, s, w) = (acceptor.clone(), s.clone(), w.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (s, w) = (s.clone(), w.clone());
                        async move {
                            let ok = req
                                .headers()
                                .get("x-api-key")
                                .is_some_and(|v| v.as_bytes() == VALUE.as_bytes());
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut resp = hyper::Response::new(Full::new(body));
                            if ok {
                                s.fetch_add(1, Ordering::Relaxed);
                            } else {
                                w.fetch_add(1, Ordering::Relaxed);
                                *resp.status_mut() = hyper::StatusCode::FORBIDDEN;
                            }
                            Ok::<_, hyper::Error>(resp)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(Echo {
        addr,
        served,
        wrong_key,
        _rt: rt,
    })
}

/// Entries of the agent's per-connection and per-sandbox maps (the others, like the stats
/// array and the socket map, do not grow with connections or cannot be iterated).
fn map_entries(veil: &Veil) -> Vec<(String, usize)> {
    [proxy_common::MAP_ORIG, proxy_common::MAP_SANDBOXES]
        .into_iter()
        .map(|n| (n.to_owned(), veil.agent().map_len(n)))
        .collect()
}

/// Runs the soak and prints its report.
pub fn run(connections: u64, sandboxes: u64, seconds: u64) -> Result<()> {
    veil_tests::require_root();
    crate::host::raise_nofile();
    if sandboxes == 0 || connections < sandboxes {
        bail!("need at least one connection per sandbox");
    }
    let me = std::env::current_exe().context("own path")?;
    let world = World::new();
    let ip: IpAddr = world.upstream_v4().into();
    let ca = TestCa::new("veil soak CA");
    let echo = start_echo(world.netns(), ip, &ca)?;
    let veil = Veil::start_with(
        AgentOptions {
            args: vec!["--upstream-ca".into(), ca.pem_path().into()],
            ..AgentOptions::default()
        },
        &[],
    );
    let placeholder = veil
        .block_on(veil.api().client(veil.key()).create_secret(&CreateSecret {
            name: "soak-key".into(),
            value: SecretValue::new(VALUE),
            hosts: Some(vec![HOST.into()]),
            ..CreateSecret::default()
        }))
        .context("creating the soak secret")?
        .placeholder;
    eprintln!("soak: setting up {sandboxes} sandboxes");
    let mut boxes = Vec::new();
    for i in 0..sandboxes {
        let ns = NetNs::new(&format!("soak{i}"));
        let link = world.link_sandbox(&ns);
        let sb = Sandbox::new(&format!("soak{i}"), Some(&ns));
        veil.register_with(&sb.agent_entry(&format!("soak{i}")), &[("KEY", "soak-key")]);
        boxes.push((ns, link, sb));
    }
    let agent = veil.pid();
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = crate::peers::rss_kib(agent);
    let fds_before = crate::peers::fd_count(agent);
    let maps_before = map_entries(&veil);

    let per = connections / sandboxes;
    let started = Instant::now();
    let mut children = Vec::new();
    for (i, (_, _, sb)) in boxes.iter().enumerate() {
        let mut cmd = sb.command(&me);
        cmd.args(["client-soak", &echo.addr.to_string()])
            .args([
                "--count",
                &per.to_string(),
                "--seconds",
                &seconds.to_string(),
            ])
            .args(["--header", &format!("x-api-key: {placeholder}")])
            .arg("--seed")
            .arg(i.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        children.push(cmd.spawn().context("start client-soak")?);
    }
    // Sample the agent's memory while the connections are open; keep the peak.
    let mut rss_peak = rss_before;
    let mut fds_peak = fds_before;
    while started.elapsed() < Duration::from_secs(seconds) {
        rss_peak = rss_peak.max(crate::peers::rss_kib(agent));
        fds_peak = fds_peak.max(crate::peers::fd_count(agent));
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut totals = [0u64; 5]; // requests, bytes up, bytes down, corrupt, failed conns
    for child in &mut children {
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let _ = child.wait();
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("client-soak output {line:?}"))?;
        for (i, k) in ["requests", "bytes_up", "bytes_down", "corrupt", "failed"]
            .iter()
            .enumerate()
        {
            totals[i] += v[k].as_u64().unwrap_or(0);
        }
    }
    let took = started.elapsed().as_secs_f64();
    // The agent keeps idle upstream connections pooled for 30 s (swept every 30 s): wait for
    // them to go (up to 120 s) before calling anything a leak.
    let closed = Instant::now();
    while crate::peers::fd_count(agent) > fds_before + 8
        && closed.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_secs(1));
    }
    let settle = closed.elapsed().as_secs();
    let rss_after = crate::peers::rss_kib(agent);
    let fds_after = crate::peers::fd_count(agent);
    let maps_after = map_entries(&veil);
    let served = echo.served.load(Ordering::Relaxed);
    let wrong = echo.wrong_key.load(Ordering::Relaxed);

    println!(
        "soak: {connections} connections over {sandboxes} sandboxes for {seconds} s ({took:.0} s with ramp-down)"
    );
    println!(
        "  requests {} ({:.0}/s), bytes up {} MiB, down {} MiB",
        totals[0],
        totals[0] as f64 / took,
        totals[1] >> 20,
        totals[2] >> 20
    );
    println!(
        "  corrupted responses {}, failed connections {}, upstream saw {served} with the value and {wrong} without",
        totals[3], totals[4]
    );
    println!(
        "  agent RSS: {} MiB before, {} MiB peak, {} MiB after; {:.1} KiB per connection at the peak",
        rss_before >> 10,
        rss_peak >> 10,
        rss_after >> 10,
        (rss_peak.saturating_sub(rss_before)) as f64 / connections as f64
    );
    println!(
        "  agent fds: {fds_before} before, {fds_peak} peak, {fds_after} after ({settle} s after the clients closed; idle upstream connections are pooled for up to 60 s)"
    );
    for ((name, before), (_, after)) in maps_before.iter().zip(&maps_after) {
        println!("  map {name}: {before} entries before, {after} after");
    }
    let leaked_maps = maps_before
        .iter()
        .zip(&maps_after)
        .any(|((_, b), (_, a))| a > b);
    let mut problems = Vec::new();
    if totals[3] > 0 || totals[4] > 0 || wrong > 0 {
        problems.push("corrupted, failed or unsubstituted requests");
    }
    if served != totals[0] {
        problems.push("the upstream's count differs from the clients'");
    }
    if fds_after > fds_before + 8 {
        problems.push("agent fds did not come back");
    }
    if leaked_maps {
        problems.push("eBPF map entries did not come back");
    }
    if !problems.is_empty() {
        bail!("soak failed: {}", problems.join("; "));
    }
    println!("  OK: no corruption, no loss, no fd or map-entry leak");
    Ok(())
}

/// One client connection's loop; returns (requests, up, down, corrupt).
async fn soak_conn(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    header: Arc<String>,
    deadline: Instant,
    seed: u64,
) -> Result<[u64; 4]> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(HOST)?;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let mut n = [0u64; 4];
    let mut body = vec![0u8; MAX_BODY];
    while Instant::now() < deadline {
        let len = rng.random_range(0..=MAX_BODY);
        rng.fill_bytes(&mut body[..len]);
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: {HOST}\r\n{header}\r\nContent-Length: {len}\r\n\r\n"
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(&body[..len]).await?;
        let got = crate::idle::read_response(&mut tls).await?;
        n[0] += 1;
        n[1] += len as u64;
        n[2] += got.len() as u64;
        if got != body[..len] {
            n[3] += 1;
        }
        // Some think time, so the connections are concurrent rather than all saturating.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
    }
    Ok(n)
}

/// The `client-soak` subcommand: `count` connections for `seconds`; prints a JSON summary.
pub fn client(addr: SocketAddr, count: u64, seconds: u64, header: &str, seed: u64) -> Result<()> {
    crate::host::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config = crate::idle::insecure_client_config();
    let header = Arc::new(header.to_owned());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (totals, failed) = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..count {
            let (config, header) = (config.clone(), header.clone());
            tasks.push(tokio::spawn(soak_conn(
                addr,
                config,
                header,
                deadline,
                seed * 1_000_003 + c,
            )));
            // Spread the handshakes over the first second.
            tokio::time::sleep(Duration::from_millis(1000 / count.max(1))).await;
        }
        let mut totals = [0u64; 4];
        let mut failed = 0u64;
        for t in tasks {
            match t.await {
                Ok(Ok(n)) => {
                    for i in 0..4 {
                        totals[i] += n[i];
                    }
                }
                Ok(Err(e)) => {
                    failed += 1;
                    eprintln!("client-soak: connection failed: {e:#}");
                }
                Err(_) => failed += 1,
            }
        }
        (totals, failed)
    });
    println!(
        "{}",
        json!({
            "requests": totals[0], "bytes_up": totals[1], "bytes_down": totals[2],
            "corrupt": totals[3], "failed": failed,
        })
    );
    Ok(())
}
