//! `veil-bench suite`: veil measured against the field, written to docs/benchmarks.md (+ PNG).
//!
//! Same client, same upstream, same request, back to back. Rows:
//! - **direct**: client → upstream, no proxy (the limit);
//! - **veil**: the client in a sandbox's cgroup; the agent intercepts and substitutes the
//!   `x-api-key` placeholder (response scrubbing on, the default);
//! - **veil, scrubbing off**: a second agent with `scrub_responses = false`, another sandbox
//!   (only the 64 KiB loads, where scrubbing costs);
//! - **nginx**: Debian nginx terminating TLS, `proxy_set_header x-api-key`, verified TLS to the
//!   upstream with a keep-alive pool;
//! - **mitmproxy**: `mitmdump --mode reverse:…` with an addon making the same replacement.
//!
//! Every proxy runs in the world netns; the clients run in the sandbox's netns (outside its
//! cgroup except on the veil rows). Loads: h2load `-t1 -c16` keep-alive HTTP/1.1 and h2 (`-m10`)
//! with a small and a 64 KiB body, new TLS connections (`Connection: close`), wrk `-t1 -c16` as
//! the h1 cross-check; the proxy's CPU seconds per 1,000 requests; its RSS growth per idle TLS
//! connection (1,000 held open). Passthrough (suite/passthrough.rs): bulk throughput and new
//! TCP connections/s, direct vs veil vs a secretless sandbox. After the runs, once
//! (suite/scale.rs): the soak at 10,000 concurrent intercepted connections and 1,000
//! sandboxes on one host.
//!
//! The VM is shared: each measurement records CPU steal from /proc/stat and is repeated (up to
//! twice) when steal exceeded 5 %; rows are interleaved inside every run; medians of `runs`.

use std::io::{BufRead, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use veil_client::veil_api::{CreateSecret, SecretValue};
use veil_tests::agent::AgentOptions;
use veil_tests::{HttpHello, NetNs, Sandbox, TestCa, Veil, World};

use crate::load::{self, Load};
use crate::peers::{self, HOST};

mod fmt;
mod model;
mod passthrough;
mod report;
mod scale;

pub use model::Options;
use model::{
    IDLE_CONNS, LOADS, MITM_PORT, NGINX_PORT, ROWS, Row, RowData, Sample, VALUE, low_steal,
};
use report::Report;

/// What a row's client runs through, and whose CPU and memory are the proxy's.
struct Target<'a> {
    row: Row,
    sandbox: &'a Sandbox,
    inside: bool,
    base: String,
    header: String,
    /// The proxy's PID (tree); for direct, the upstream's.
    pid: u32,
    /// Where the idle client connects.
    addr: SocketAddr,
}

impl Target<'_> {
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        if self.inside {
            self.sandbox.command(program)
        } else {
            self.sandbox.outside_command(program)
        }
    }
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Starts control + agent (scrubbing on or off) with the bench secret; returns the placeholder.
fn start_veil(ca: &TestCa, scrub: bool) -> Result<(Veil, String)> {
    let veil = Veil::start_with(
        AgentOptions {
            args: vec!["--upstream-ca".into(), ca.pem_path().into()],
            extra_config: if scrub {
                String::new()
            } else {
                "scrub_responses = false".into()
            },
            ..AgentOptions::default()
        },
        &[],
    );
    let placeholder = veil
        .block_on(veil.api().client(veil.key()).create_secret(&CreateSecret {
            name: "bench-key".into(),
            value: SecretValue::new(VALUE),
            hosts: Some(vec![HOST.into()]),
            ..CreateSecret::default()
        }))
        .context("creating the bench secret")?
        .placeholder;
    Ok((veil, placeholder))
}

/// Runs the suite and writes the report.
pub fn run(opts: &Options) -> Result<()> {
    veil_tests::require_root();
    crate::host::raise_nofile();
    let started_at = Instant::now();
    let me = std::env::current_exe().context("own path")?;
    let world = World::new();
    let ip: IpAddr = world.upstream_v4().into();
    let ca = TestCa::new("veil bench CA");
    let upstream = peers::upstream(world.netns(), ip, &ca)?;

    let (veil, placeholder) = start_veil(&ca, true)?;
    let (veil_off, placeholder_off) = start_veil(&ca, false)?;
    let ns = NetNs::new("suite");
    let _link = world.link_sandbox(&ns);
    let sb = Sandbox::new("suite", Some(&ns)).with_hosts(&[(HOST, ip)]);
    veil.register_with(&sb.agent_entry("suite"), &[("KEY", "bench-key")]);
    let ns_off = NetNs::new("suiteoff");
    let _link_off = world.link_sandbox(&ns_off);
    let sb_off = Sandbox::new("suiteoff", Some(&ns_off)).with_hosts(&[(HOST, ip)]);
    veil_off.register_with(&sb_off.agent_entry("suiteoff"), &[("KEY", "bench-key")]);
    // The secretless sandbox: registered with the scrubbing veil, no secret mounted.
    let ns_free = NetNs::new("suitefree");
    let _link_free = world.link_sandbox(&ns_free);
    let sb_free = Sandbox::new("suitefree", Some(&ns_free));
    veil.register(
        &sb_free
            .agent_entry("suitefree")
            .with_egress(veil_tests::egress::SANDBOX),
    );

    let (nginx, mitm) = start_compared_proxies(&world, ip, &ca, opts, &placeholder)?;
    let targets = targets(
        ip,
        (&sb, &placeholder),
        (&sb_off, &placeholder_off),
        RowPids {
            upstream: upstream.pid(),
            veil: veil.pid(),
            veil_off: veil_off.pid(),
            nginx: nginx.pid(),
            // Not started when `--only` leaves its row out.
            mitm: mitm.as_ref().map_or(0, peers::Server::pid),
        },
    );
    warm_up(&targets, opts)?;

    let (sink, stop_sink) = crate::sink::start_sink(world.netns(), ip);
    let hello = HttpHello::start(world.netns(), ip, "bench");
    let pass_targets = passthrough::PassTargets {
        sandbox: &sb,
        secretless: &sb_free,
        sink,
        hello: hello.addr(),
    };
    let mut tally = Tally {
        data: ROWS.iter().map(|_| RowData::default()).collect(),
        pass: passthrough::PassData::default(),
        loads_avg: Vec::new(),
        steals: Vec::new(),
    };
    if !opts.only.is_empty() {
        for run in 0..opts.runs {
            eprintln!("run {run} (load average {:.2})", loadavg());
            measure_requests(opts, &targets, &mut tally)?;
        }
        stop_sink.store(true, std::sync::atomic::Ordering::Relaxed);
        return Ok(());
    }
    for run in 0..opts.runs {
        let la = loadavg();
        tally.loads_avg.push(la);
        eprintln!("run {run} (load average {la:.2})");
        measure_requests(opts, &targets, &mut tally)?;
        cross_check_with_wrk(opts, &targets, &mut tally);
        let steals = passthrough::measure(opts, &me, &pass_targets, &mut tally.pass)?;
        tally.steals.extend(steals);
        measure_idle_memory(&me, &targets, &mut tally);
    }
    stop_sink.store(true, std::sync::atomic::Ordering::Relaxed);
    // Once, after the runs: each starts its own world, control and agent.
    let scale = scale::measure(opts);

    write_report(opts, &tally, &scale, started_at.elapsed())
}

/// nginx and mitmproxy (unless `--only` leaves its row out) in the world netns, each making the
/// same substitution as veil.
fn start_compared_proxies(
    world: &World,
    ip: IpAddr,
    ca: &TestCa,
    opts: &Options,
    placeholder: &str,
) -> Result<(peers::Server, Option<peers::Server>)> {
    let nginx = peers::nginx_proxy(
        world.netns(),
        ip,
        NGINX_PORT,
        ca,
        VALUE,
        opts.nginx_keepalive,
        opts.nginx_workers,
    )?;
    if !opts.only.is_empty() {
        return Ok((nginx, None));
    }
    let mitm = peers::mitmproxy(
        world.netns(),
        &opts.mitmdump,
        ip,
        MITM_PORT,
        ca,
        placeholder,
        VALUE,
    )?;
    Ok((nginx, Some(mitm)))
}

/// The process (tree) whose CPU and memory each row charges.
struct RowPids {
    upstream: u32,
    veil: u32,
    veil_off: u32,
    nginx: u32,
    mitm: u32,
}

/// One target per row, in [`ROWS`] order: `on` is the sandbox of the scrubbing veil with its
/// placeholder, `off` that of the veil with scrubbing off.
fn targets<'a>(
    ip: IpAddr,
    on: (&'a Sandbox, &str),
    off: (&'a Sandbox, &str),
    pids: RowPids,
) -> [Target<'a>; 5] {
    let (sb, placeholder) = on;
    let (sb_off, placeholder_off) = off;
    let header = format!("x-api-key: {placeholder}");
    let upstream_base = format!("https://{HOST}:{}", peers::UPSTREAM_PORT);
    let upstream_addr = SocketAddr::from((ip, peers::UPSTREAM_PORT));
    [
        Target {
            row: Row::Direct,
            sandbox: sb,
            inside: false,
            base: upstream_base.clone(),
            header: format!("x-api-key: {VALUE}"),
            pid: pids.upstream,
            addr: upstream_addr,
        },
        Target {
            row: Row::Veil,
            sandbox: sb,
            inside: true,
            base: upstream_base.clone(),
            header: header.clone(),
            pid: pids.veil,
            addr: upstream_addr,
        },
        Target {
            row: Row::VeilNoScrub,
            sandbox: sb_off,
            inside: true,
            base: upstream_base.clone(),
            header: format!("x-api-key: {placeholder_off}"),
            pid: pids.veil_off,
            addr: upstream_addr,
        },
        Target {
            row: Row::Nginx,
            sandbox: sb,
            inside: false,
            base: format!("https://{HOST}:{NGINX_PORT}"),
            header: header.clone(),
            pid: pids.nginx,
            addr: (ip, NGINX_PORT).into(),
        },
        Target {
            row: Row::Mitm,
            sandbox: sb,
            inside: false,
            base: format!("https://{HOST}:{MITM_PORT}"),
            header: header.clone(),
            pid: pids.mitm,
            addr: (ip, MITM_PORT).into(),
        },
    ]
}

/// A short warm-up per target: leaf certificates, upstream pools, Python imports.
fn warm_up(targets: &[Target<'_>], opts: &Options) -> Result<()> {
    for t in targets.iter().filter(|t| measured(t.row, opts)) {
        let mut cmd = t.command("h2load");
        load::h2load(&mut cmd, Load::H1, 1, 0, &t.base, &t.header)
            .with_context(|| format!("warm-up of {}", t.row.name()))?;
    }
    Ok(())
}

/// Whether `row` is measured: every row, or with `--only` the direct, veil and nginx rows.
fn measured(row: Row, opts: &Options) -> bool {
    opts.only.is_empty() || matches!(row, Row::Direct | Row::Veil | Row::Nginx)
}

/// What the runs measured so far: per row (in [`ROWS`] order), and the machine's load.
struct Tally {
    data: Vec<RowData>,
    pass: passthrough::PassData,
    loads_avg: Vec<f64>,
    steals: Vec<f64>,
}

/// h2load per load and row: requests per second, latency, and the proxy's CPU seconds per
/// 1,000 requests.
fn measure_requests(opts: &Options, targets: &[Target<'_>], tally: &mut Tally) -> Result<()> {
    for load in LOADS {
        if !opts.only.is_empty() && !opts.only.contains(&load) {
            continue;
        }
        for (i, t) in targets.iter().enumerate() {
            if !t.row.runs(load) || !measured(t.row, opts) {
                continue;
            }
            let new_conns = if t.row == Row::Mitm { 600 } else { 3000 };
            let what = format!("{} {}", t.row.name(), load.name());
            let (s, steal) = low_steal(&what, || {
                let cpu_before = peers::tree_cpu_seconds(t.pid);
                let mut cmd = t.command("h2load");
                let r = load::h2load(&mut cmd, load, opts.seconds, new_conns, &t.base, &t.header)
                    .with_context(|| what.clone())?;
                let used = peers::tree_cpu_seconds(t.pid) - cpu_before;
                Ok(Sample {
                    r,
                    cpu_per_1k: used / (r.requests / 1000.0),
                })
            })?;
            tally.steals.push(steal);
            eprintln!(
                "  {what}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {:.4} CPU-s/1k, steal {steal:.1} %",
                s.r.rps, s.r.p50_ms, s.r.p99_ms, s.cpu_per_1k
            );
            let slot = &mut tally.data[i];
            match slot.loads.iter_mut().find(|(l, _)| *l == load) {
                Some((_, v)) => v.push(s),
                None => slot.loads.push((load, vec![s])),
            }
        }
    }
    Ok(())
}

/// wrk's requests per second, the cross-check of the h1 keep-alive figure (a failure is
/// reported and skipped).
fn cross_check_with_wrk(opts: &Options, targets: &[Target<'_>], tally: &mut Tally) {
    for (i, t) in targets.iter().enumerate() {
        if t.row == Row::VeilNoScrub {
            continue;
        }
        let what = format!("{} wrk", t.row.name());
        match low_steal(&what, || {
            load::wrk(&mut t.command("wrk"), opts.seconds, &t.base, &t.header)
        }) {
            Ok((rps, steal)) => {
                eprintln!("  {what}: {rps:.0} req/s, steal {steal:.1} %");
                tally.steals.push(steal);
                tally.data[i].wrk.push(rps);
            }
            Err(e) => eprintln!("  {what}: {e:#}"),
        }
    }
}

/// The proxy's memory per idle TLS connection (a failure is reported and skipped).
fn measure_idle_memory(me: &Path, targets: &[Target<'_>], tally: &mut Tally) {
    for (i, t) in targets.iter().enumerate() {
        if t.row == Row::VeilNoScrub {
            continue;
        }
        match idle_rss(me, t) {
            Ok(kib) => {
                eprintln!("  {} idle: {kib:.1} KiB per connection", t.row.name());
                tally.data[i].idle_kib_per_conn.push(kib);
            }
            Err(e) => eprintln!("  {} idle: {e:#}", t.row.name()),
        }
    }
}

/// Writes the Markdown (and the PNG, if it can be drawn) and prints the Markdown.
fn write_report(opts: &Options, tally: &Tally, scale: &scale::Scale, took: Duration) -> Result<()> {
    let report = Report {
        opts,
        data: &tally.data,
        pass: &tally.pass,
        scale,
        loadavg: &tally.loads_avg,
        steals: &tally.steals,
        took,
    };
    let md = report.markdown();
    if let Some(dir) = opts.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.out, &md).with_context(|| format!("write {}", opts.out.display()))?;
    match report.plot(&opts.png) {
        Ok(()) => eprintln!("wrote {}", opts.png.display()),
        Err(e) => eprintln!("no plot: {e:#}"),
    }
    println!("{md}");
    eprintln!("wrote {}", opts.out.display());
    Ok(())
}

/// RSS growth of the target's process tree per idle connection, in KiB.
fn idle_rss(me: &Path, t: &Target<'_>) -> Result<f64> {
    let before = peers::tree_rss_kib(t.pid);
    let mut cmd = t.command(me);
    cmd.args(["client-idle", &t.addr.to_string(), "--count"])
        .arg(IDLE_CONNS.to_string())
        .args(["--header", &t.header])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("start client-idle")?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("client stdout")?;
    BufReader::new(stdout).read_line(&mut line)?;
    let result = if line.trim() == format!("ready {IDLE_CONNS}") {
        // Let lazily freed buffers settle.
        std::thread::sleep(Duration::from_millis(500));
        let after = peers::tree_rss_kib(t.pid);
        Ok((after as f64 - before as f64) / IDLE_CONNS as f64)
    } else {
        Err(anyhow::anyhow!("idle client did not get ready: {line:?}"))
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"done\n");
    }
    let _ = child.wait();
    // Give the proxy time to close them before the next measurement.
    std::thread::sleep(Duration::from_secs(1));
    result
}
