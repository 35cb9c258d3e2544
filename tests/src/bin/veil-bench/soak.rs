//! `veil-bench soak [--connections N] [--sandboxes S] [--seconds T]`: N concurrent intercepted
//! keep-alive connections spread over S sandboxes (one client process each) for T seconds,
//! every request a random body of 0..64 KiB that the upstream echoes back, then a random think
//! time of 0..=`--think-ms`.
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

use crate::cli::PER_SANDBOX_LIMIT;

const HOST: &str = "soak.test";
const VALUE: &str = "sk-soak-0123456789abcdef";
/// The secret's name (mount it as `("KEY", SECRET)`).
pub(crate) const SECRET: &str = "soak-key";
const MAX_BODY: usize = 64 * 1024;

/// The echo upstream: TLS (h1), answers every request with its body when `x-api-key` carries
/// the value, 403 otherwise; counts what it served.
pub(crate) struct Echo {
    pub(crate) addr: SocketAddr,
    pub(crate) served: Arc<AtomicU64>,
    pub(crate) wrong_key: Arc<AtomicU64>,
    _rt: tokio::runtime::Runtime,
}

pub(crate) fn start_echo(ns: &NetNs, ip: IpAddr, ca: &TestCa) -> Result<Echo> {
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

/// What one soak measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct SoakResult {
    /// Concurrent connections asked for, and the sandboxes they were spread over.
    pub(crate) connections: u64,
    pub(crate) sandboxes: u64,
    /// Seconds of traffic asked for, and taken (with the ramp-down).
    pub(crate) seconds: u64,
    /// Each connection's longest think time between requests, ms.
    pub(crate) think_ms: u64,
    pub(crate) took: f64,
    /// requests, bytes up, bytes down, corrupted bytes, failed connections.
    pub(crate) totals: [u64; 5],
    /// Requests the upstream served with the value, and without it.
    pub(crate) served: u64,
    pub(crate) wrong_key: u64,
    /// The agent's RSS (KiB) before, at the peak and after; fds before and at the peak.
    pub(crate) rss_kib: [u64; 3],
    pub(crate) fds_before: usize,
    pub(crate) fds_peak: usize,
    /// The agent's fds once the idle upstream connections were swept, and how long that took
    /// (`None`: not waited for).
    pub(crate) fds_after: Option<(usize, u64)>,
    /// eBPF map entries (name, before, after).
    pub(crate) maps: Vec<(String, usize, usize)>,
    /// What did not hold (empty: the soak passed).
    pub(crate) problems: Vec<&'static str>,
}

impl SoakResult {
    /// Bytes that came back different from what was sent (or missing, or extra).
    pub(crate) fn corrupted(&self) -> u64 {
        self.totals[3]
    }

    /// Connections that failed.
    pub(crate) fn failed(&self) -> u64 {
        self.totals[4]
    }

    /// The agent's RSS growth per connection at the peak, KiB.
    pub(crate) fn kib_per_conn(&self) -> f64 {
        self.rss_kib[1].saturating_sub(self.rss_kib[0]) as f64 / self.connections as f64
    }
}

/// Runs the soak and prints its report; fails when a check did not hold.
pub fn run(connections: u64, sandboxes: u64, seconds: u64, think_ms: u64) -> Result<()> {
    let r = measure(
        connections,
        sandboxes,
        seconds,
        think_ms,
        Some(Duration::from_secs(120)),
    )?;
    print_report(&r);
    if !r.problems.is_empty() {
        bail!("soak failed: {}", r.problems.join("; "));
    }
    println!("  OK: no corruption, no loss, no fd or map-entry leak");
    Ok(())
}

fn print_report(r: &SoakResult) {
    let SoakResult {
        connections,
        sandboxes,
        seconds,
        took,
        totals,
        ..
    } = r;
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
        "  corrupted bytes {}, failed connections {}, upstream saw {} with the value and {} without",
        totals[3], totals[4], r.served, r.wrong_key
    );
    println!(
        "  agent RSS: {} MiB before, {} MiB peak, {} MiB after; {:.1} KiB per connection at the peak",
        r.rss_kib[0] >> 10,
        r.rss_kib[1] >> 10,
        r.rss_kib[2] >> 10,
        r.kib_per_conn()
    );
    match r.fds_after {
        Some((after, settle)) => println!(
            "  agent fds: {} before, {} peak, {after} after ({settle} s after the clients closed; idle upstream connections are pooled for up to 60 s)",
            r.fds_before, r.fds_peak
        ),
        None => println!("  agent fds: {} before, {} peak", r.fds_before, r.fds_peak),
    }
    for (name, before, after) in &r.maps {
        println!("  map {name}: {before} entries before, {after} after");
    }
}

/// Runs the soak: `connections` over `sandboxes` for `seconds`. With `settle`, waits up to
/// that long for the agent's fds to come back and checks fds and map entries for leaks;
/// without, only traffic is checked. Returns what it measured; `problems` lists the checks
/// that did not hold.
pub(crate) fn measure(
    connections: u64,
    sandboxes: u64,
    seconds: u64,
    think_ms: u64,
    settle: Option<Duration>,
) -> Result<SoakResult> {
    veil_tests::require_root();
    // The clients inherit the raised limit too (each also raises its own).
    crate::host::raise_nofile();
    if sandboxes == 0 || connections < sandboxes {
        bail!("need at least one connection per sandbox");
    }
    if connections.div_ceil(sandboxes) > PER_SANDBOX_LIMIT {
        bail!(
            "{connections} connections over {sandboxes} sandboxes is more than the agent's {PER_SANDBOX_LIMIT} per sandbox: use at least {} sandboxes",
            connections.div_ceil(PER_SANDBOX_LIMIT)
        );
    }
    let me = std::env::current_exe().context("own path")?;
    let world = World::new();
    let ip: IpAddr = world.upstream_v4().into();
    let ca = TestCa::new("veil soak CA");
    let echo = start_echo(world.netns(), ip, &ca)?;
    let (veil, placeholder) = start_veil(&ca)?;
    eprintln!("soak: setting up {sandboxes} sandboxes");
    let mut boxes = Vec::new();
    for i in 0..sandboxes {
        let ns = NetNs::new(&format!("soak{i}"));
        let link = world.link_sandbox(&ns);
        let sb = Sandbox::new(&format!("soak{i}"), Some(&ns));
        veil.register_with(&sb.agent_entry(&format!("soak{i}")), &[("KEY", SECRET)]);
        boxes.push((ns, link, sb));
    }
    let agent = veil.pid();
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = crate::peers::rss_kib(agent);
    let fds_before = crate::peers::fd_count(agent);
    let maps_before = map_entries(&veil);

    // The remainder goes to the first sandboxes, so exactly `connections` are opened.
    let (per, extra) = (connections / sandboxes, connections % sandboxes);
    let started = Instant::now();
    let mut children = Vec::new();
    for (i, (_, _, sb)) in boxes.iter().enumerate() {
        let count = per + u64::from((i as u64) < extra);
        let mut cmd = sb.command(&me);
        cmd.args(["client-soak", &echo.addr.to_string()])
            .args([
                "--count",
                &count.to_string(),
                "--seconds",
                &seconds.to_string(),
            ])
            .args(["--header", &format!("x-api-key: {placeholder}")])
            .arg("--seed")
            .arg(i.to_string())
            .arg("--think-ms")
            .arg(think_ms.to_string())
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
    let mut totals = [0u64; 5]; // requests, bytes up, bytes down, corrupted bytes, failed conns
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
    let served = echo.served.load(Ordering::Relaxed);
    let wrong_key = echo.wrong_key.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    if totals[3] > 0 || totals[4] > 0 || wrong_key > 0 {
        problems.push("corrupted, failed or unsubstituted requests");
    }
    if served != totals[0] {
        problems.push("the upstream's count differs from the clients'");
    }
    let mut fds_after = None;
    if let Some(settle) = settle {
        // The agent keeps idle upstream connections pooled for 30 s (swept every 30 s): wait
        // for them to go before calling anything a leak.
        let closed = Instant::now();
        while crate::peers::fd_count(agent) > fds_before + 8 && closed.elapsed() < settle {
            std::thread::sleep(Duration::from_secs(1));
        }
        let after = crate::peers::fd_count(agent);
        fds_after = Some((after, closed.elapsed().as_secs()));
        if after > fds_before + 8 {
            problems.push("agent fds did not come back");
        }
    }
    let maps: Vec<_> = maps_before
        .into_iter()
        .zip(map_entries(&veil))
        .map(|((name, before), (_, after))| (name, before, after))
        .collect();
    if settle.is_some() && maps.iter().any(|(_, b, a)| a > b) {
        problems.push("eBPF map entries did not come back");
    }
    Ok(SoakResult {
        connections,
        sandboxes,
        seconds,
        think_ms,
        took,
        totals,
        served,
        wrong_key,
        rss_kib: [rss_before, rss_peak, crate::peers::rss_kib(agent)],
        fds_before,
        fds_peak,
        fds_after,
        maps,
        problems,
    })
}

/// Control + agent trusting `ca` upstream, with the soak secret (allowed for [`HOST`]);
/// returns the placeholder.
pub(crate) fn start_veil(ca: &TestCa) -> Result<(Veil, String)> {
    let veil = Veil::start_with(
        AgentOptions {
            args: vec!["--upstream-ca".into(), ca.pem_path().into()],
            ..AgentOptions::default()
        },
        &[],
    );
    let placeholder = veil
        .block_on(veil.api().client(veil.key()).create_secret(&CreateSecret {
            name: SECRET.into(),
            value: SecretValue::new(VALUE),
            hosts: Some(vec![HOST.into()]),
            ..CreateSecret::default()
        }))
        .context("creating the soak secret")?
        .placeholder;
    Ok((veil, placeholder))
}

/// One client connection's loop; returns (requests, up, down, corrupted bytes).
async fn soak_conn(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    header: Arc<String>,
    deadline: Instant,
    seed: u64,
    think_ms: u64,
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
    // Each connection starts at a random point of its think time: were every first request
    // sent right after the handshakes, all would be in flight at once, and so would as many
    // upstream connections (the agent holds one per request in flight).
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..=think_ms))).await;
    // At least one request per connection, then until the deadline.
    loop {
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
            // Every differing byte, plus what is missing or extra; at least 1.
            let differing = got.iter().zip(&body[..len]).filter(|(a, b)| a != b).count();
            n[3] += (differing + got.len().abs_diff(len)).max(1) as u64;
        }
        if Instant::now() >= deadline {
            break;
        }
        // Some think time, so the connections are concurrent rather than all saturating.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..=think_ms))).await;
    }
    Ok(n)
}

/// The `client-soak` subcommand: `count` connections for `seconds`; prints a JSON summary.
pub fn client(
    addr: SocketAddr,
    count: u64,
    seconds: u64,
    header: &str,
    seed: u64,
    think_ms: u64,
) -> Result<()> {
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
                think_ms,
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
