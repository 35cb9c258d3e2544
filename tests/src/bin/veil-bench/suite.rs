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
//! the h1 cross-check; passthrough bulk throughput (direct vs veil); the proxy's CPU seconds
//! per 1,000 requests; its RSS growth per idle TLS connection (1,000 held open).
//!
//! The VM is shared: each measurement records CPU steal from /proc/stat and is repeated (up to
//! twice) when steal exceeded 5 %; rows are interleaved inside every run; medians of `runs`.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use veil_client::veil_api::{CreateSecret, SecretValue};
use veil_tests::agent::AgentOptions;
use veil_tests::{NetNs, Sandbox, TestCa, Veil, World};

use crate::load::{self, Load};
use crate::peers::{self, HOST};

const VALUE: &str = "sk-bench-0123456789abcdef";
const NGINX_PORT: u16 = 9443;
const MITM_PORT: u16 = 9444;
/// Steal above this share of CPU time makes a measurement be repeated.
const MAX_STEAL: f64 = 5.0;
/// Idle connections held open for the memory row.
const IDLE_CONNS: u64 = 1000;

/// Options of the suite.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds per keep-alive measurement.
    pub seconds: u64,
    /// Interleaved runs (medians are reported).
    pub runs: u64,
    /// Where the Markdown goes.
    pub out: PathBuf,
    /// Where the PNG goes.
    pub png: PathBuf,
    /// mitmproxy's mitmdump.
    pub mitmdump: PathBuf,
    /// nginx proxy: upstream keep-alive pool size.
    pub nginx_keepalive: u32,
    /// nginx proxy: worker processes.
    pub nginx_workers: u32,
    /// Bytes per passthrough bulk run.
    pub bulk_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Direct,
    Veil,
    VeilNoScrub,
    Nginx,
    Mitm,
}

const ROWS: [Row; 5] = [
    Row::Direct,
    Row::Veil,
    Row::VeilNoScrub,
    Row::Nginx,
    Row::Mitm,
];
const LOADS: [Load; 5] = [Load::H1, Load::H1Big, Load::H2, Load::H2Big, Load::NewConn];

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::Veil => "veil",
            Row::VeilNoScrub => "veil, scrubbing off",
            Row::Nginx => "nginx",
            Row::Mitm => "mitmproxy",
        }
    }

    fn runs(self, load: Load) -> bool {
        self != Row::VeilNoScrub || load.big()
    }
}

/// One measurement with its context.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    r: load::Result1,
    /// Proxy CPU seconds per 1,000 requests (process tree).
    cpu_per_1k: f64,
}

/// Everything measured for one row.
#[derive(Debug, Default)]
struct RowData {
    loads: Vec<(Load, Vec<Sample>)>,
    wrk: Vec<f64>,
    bulk_gbps: Vec<f64>,
    idle_kib_per_conn: Vec<f64>,
}

impl RowData {
    fn median(&self, load: Load, f: impl Fn(&Sample) -> f64) -> Option<f64> {
        self.loads
            .iter()
            .find(|(l, v)| *l == load && !v.is_empty())
            .map(|(_, v)| med(v.iter().map(f).collect()))
    }
}

/// RSS per idle connection: the largest of the runs. The first run is the cold one; later
/// runs reuse memory the allocator kept from the first, so their growth understates the cost.
fn idle_kib(r: &RowData) -> f64 {
    r.idle_kib_per_conn.iter().copied().fold(f64::NAN, f64::max)
}

fn med(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

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

/// Runs `f` until CPU steal during it stays at most [`MAX_STEAL`] (3 attempts); returns the
/// result and the steal of the kept attempt.
fn low_steal<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<(T, f64)> {
    let mut last = None;
    for attempt in 0..3 {
        let before = crate::host::cpu_times();
        let v = f()?;
        let steal = crate::host::cpu_steal_percent(&before, &crate::host::cpu_times());
        if steal <= MAX_STEAL {
            return Ok((v, steal));
        }
        eprintln!("  {what}: steal {steal:.1} % on attempt {attempt}, repeating");
        last = Some((v, steal));
    }
    last.context("no attempt")
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
            mitm: mitm.pid(),
        },
    );
    warm_up(&targets)?;

    let (sink, stop_sink) = crate::sink::start_sink(world.netns(), ip);
    let mut tally = Tally {
        data: ROWS.iter().map(|_| RowData::default()).collect(),
        loads_avg: Vec::new(),
        steals: Vec::new(),
    };
    for run in 0..opts.runs {
        let la = loadavg();
        tally.loads_avg.push(la);
        eprintln!("run {run} (load average {la:.2})");
        measure_requests(opts, &targets, &mut tally)?;
        cross_check_with_wrk(opts, &targets, &mut tally);
        measure_passthrough_bulk(opts, &me, sink, &targets, &mut tally)?;
        measure_idle_memory(&me, &targets, &mut tally);
    }
    stop_sink.store(true, std::sync::atomic::Ordering::Relaxed);

    write_report(opts, &tally, started_at.elapsed())
}

/// nginx and mitmproxy in the world netns, each making the same substitution as veil.
fn start_compared_proxies(
    world: &World,
    ip: IpAddr,
    ca: &TestCa,
    opts: &Options,
    placeholder: &str,
) -> Result<(peers::Server, peers::Server)> {
    let nginx = peers::nginx_proxy(
        world.netns(),
        ip,
        NGINX_PORT,
        ca,
        VALUE,
        opts.nginx_keepalive,
        opts.nginx_workers,
    )?;
    let mitm = peers::mitmproxy(
        world.netns(),
        &opts.mitmdump,
        ip,
        MITM_PORT,
        ca,
        placeholder,
        VALUE,
    )?;
    Ok((nginx, mitm))
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
fn warm_up(targets: &[Target<'_>]) -> Result<()> {
    for t in targets {
        let mut cmd = t.command("h2load");
        load::h2load(&mut cmd, Load::H1, 1, 0, &t.base, &t.header)
            .with_context(|| format!("warm-up of {}", t.row.name()))?;
    }
    Ok(())
}

/// What the runs measured so far: per row (in [`ROWS`] order), and the machine's load.
struct Tally {
    data: Vec<RowData>,
    loads_avg: Vec<f64>,
    steals: Vec<f64>,
}

/// h2load per load and row: requests per second, latency, and the proxy's CPU seconds per
/// 1,000 requests.
fn measure_requests(opts: &Options, targets: &[Target<'_>], tally: &mut Tally) -> Result<()> {
    for load in LOADS {
        for (i, t) in targets.iter().enumerate() {
            if !t.row.runs(load) {
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

/// Passthrough bulk throughput (direct and veil): plain TCP to the sink; the agent splices it.
fn measure_passthrough_bulk(
    opts: &Options,
    me: &Path,
    sink: SocketAddr,
    targets: &[Target<'_>],
    tally: &mut Tally,
) -> Result<()> {
    for (i, t) in targets.iter().enumerate() {
        if !matches!(t.row, Row::Direct | Row::Veil) {
            continue;
        }
        let what = format!("{} bulk", t.row.name());
        let (gbps, steal) = low_steal(&what, || {
            let mut cmd = t.command(me);
            cmd.args(["client-bulk", &sink.to_string(), "--bytes"])
                .arg(opts.bulk_bytes.to_string());
            let secs: f64 = crate::sink::run_client(cmd)?.parse()?;
            Ok(opts.bulk_bytes as f64 * 8.0 / secs / 1e9)
        })?;
        tally.steals.push(steal);
        eprintln!("  {what}: {gbps:.2} Gbit/s, steal {steal:.1} %");
        tally.data[i].bulk_gbps.push(gbps);
    }
    Ok(())
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
fn write_report(opts: &Options, tally: &Tally, took: Duration) -> Result<()> {
    let report = Report {
        opts,
        data: &tally.data,
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

struct Report<'a> {
    opts: &'a Options,
    data: &'a [RowData],
    loadavg: &'a [f64],
    steals: &'a [f64],
    took: Duration,
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.trim().replace('\n', " ")
        })
        .unwrap_or_default()
}

fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        "—".into()
    } else if x >= 100.0 {
        let s = format!("{x:.0}");
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn with_ratio(x: Option<f64>, direct: Option<f64>) -> String {
    match (x, direct) {
        (Some(x), Some(d)) if x.is_finite() && d.is_finite() && d > 0.0 => {
            format!("{} ({:.2}×)", fmt_num(x), x / d)
        }
        (Some(x), _) => fmt_num(x),
        (None, _) => "—".into(),
    }
}

impl Report<'_> {
    fn row(&self, r: Row) -> &RowData {
        &self.data[ROWS.iter().position(|x| *x == r).unwrap_or(0)]
    }

    fn markdown(&self) -> String {
        let o = self.opts;
        let mut md = String::new();
        let direct = self.row(Row::Direct);
        let _ = writeln!(
            md,
            "# veil measured against the field\n\n\
             Produced by `cargo xtask bench` (= `veil-bench suite`), {}. Medians of {} interleaved runs; \
             each measurement repeated (up to twice) when CPU steal during it exceeded {MAX_STEAL} %. \
             Ratios are against **direct** (client → upstream, no proxy).\n",
            sh("date -u '+%Y-%m-%d %H:%M UTC'"),
            o.runs
        );
        let _ = writeln!(md, "## Requests\n");
        let _ = writeln!(
            md,
            "| row | h1 req/s | h1 p50 / p99 ms | h1 64 KiB req/s | h2 req/s | h2 p50 / p99 ms | h2 64 KiB req/s | new TLS conns/s | wrk h1 req/s |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        for r in ROWS {
            let d = self.row(r);
            let rps = |l: Load| with_ratio(d.median(l, |s| s.r.rps), direct.median(l, |s| s.r.rps));
            let lat = |l: Load| match (d.median(l, |s| s.r.p50_ms), d.median(l, |s| s.r.p99_ms)) {
                (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
                _ => "—".into(),
            };
            let wrk = if d.wrk.is_empty() {
                "—".into()
            } else {
                with_ratio(Some(med(d.wrk.clone())), Some(med(direct.wrk.clone())))
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name(),
                rps(Load::H1),
                lat(Load::H1),
                rps(Load::H1Big),
                rps(Load::H2),
                lat(Load::H2),
                rps(Load::H2Big),
                rps(Load::NewConn),
                wrk
            );
        }
        let _ = writeln!(md, "\n## Cost\n");
        let _ = writeln!(
            md,
            "| row | CPU-s per 1,000 h1 req | per 1,000 h2 req | per 1,000 h1 64 KiB req | per 1,000 new conns | RSS per idle TLS connection, KiB | passthrough bulk Gbit/s |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for r in ROWS {
            let d = self.row(r);
            let cpu = |l: Load| {
                d.median(l, |s| s.cpu_per_1k)
                    .map_or("—".into(), |c| format!("{c:.4}"))
            };
            let rss = if d.idle_kib_per_conn.is_empty() {
                "—".into()
            } else {
                format!("{:.1}", idle_kib(d))
            };
            let bulk = if d.bulk_gbps.is_empty() {
                "n/a".into()
            } else {
                with_ratio(
                    Some(med(d.bulk_gbps.clone())),
                    Some(med(direct.bulk_gbps.clone())),
                )
            };
            let name = if r == Row::Direct {
                "direct (the upstream nginx itself)"
            } else {
                r.name()
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {rss} | {bulk} |",
                cpu(Load::H1),
                cpu(Load::H2),
                cpu(Load::H1Big),
                cpu(Load::NewConn)
            );
        }
        md.push_str(&self.goals());
        md.push_str(&self.reference());
        let _ = writeln!(md, "\n![requests per second](benchmarks.png)\n");
        let _ = writeln!(md, "## How it was measured\n");
        let _ = writeln!(
            md,
            "- Machine: {} ({} CPUs, {}), kernel {}; {}; {}; {}; mitmproxy {}; {}.\n\
             - Load average at the start of each run: {}; CPU steal per measurement: median {:.1} %, max {:.1} %.\n\
             - Whole suite: {:.0} s.",
            sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
            sh("nproc"),
            sh("awk '/MemTotal/ {printf \"%.0f GiB RAM\", $2/1048576}' /proc/meminfo"),
            sh("uname -r"),
            sh("nginx -v"),
            sh("h2load --version | head -1"),
            sh("wrk -v | head -1"),
            sh(&format!("{} --version | head -1", o.mitmdump.display())),
            sh("rustc --version"),
            self.loadavg
                .iter()
                .map(|l| format!("{l:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            med(self.steals.to_vec()),
            self.steals.iter().copied().fold(0.0, f64::max),
            self.took.as_secs_f64()
        );
        let _ = writeln!(
            md,
            "- Command: `cargo xtask bench` (root), which installs the Debian packages (nginx, nghttp2-client, wrk, gnuplot-nox) and \
             mitmproxy 11.0.2 into `target/mitmproxy-venv` (pip), builds in release and runs \
             `target/release/veil-bench suite --seconds {s} --runs {} --nginx-keepalive {ka} --nginx-workers {w} --bytes {}`.\n\
             - Topology: a sandbox netns linked to an upstream netns (198.18.0.0/15); the upstream is Debian nginx (1 worker) answering `ok\\n` \
             on `/` and 64 KiB on `/64k`, over TLS 1.3 with h1 and h2. The client always runs in the sandbox's netns: outside its cgroup \
             for direct, nginx and mitmproxy (which listen in the upstream's netns, on ports {NGINX_PORT} and {MITM_PORT}), inside it for \
             veil (the eBPF redirect takes the connection to veil-agent, which intercepts because the secret allows `{HOST}`).\n\
             - Every request carries `x-api-key: <placeholder>` (direct: the value itself); veil, nginx (`proxy_set_header`) and the \
             mitmproxy addon put the value there.\n\
             - Keep-alive: `h2load -t1 -c16 --h1 -D {s}` and `h2load -t1 -c16 -m10 -D {s}` (h2); new connections: `h2load -t1 -c16 --h1 -n 3000 \
             -H 'Connection: close'` (600 for mitmproxy); cross-check `wrk -t1 -c16 -d{s}s`. Latency percentiles from h2load's per-request log.\n\
             - nginx proxy: `worker_processes {w}`, `listen … ssl http2`, `proxy_pass https://up` with `keepalive {ka}`, \
             `proxy_http_version 1.1`, `proxy_ssl_verify on`, `proxy_ssl_session_reuse on`, `proxy_set_header x-api-key …`.\n\
             - mitmproxy: `mitmdump --mode reverse:https://<upstream>:8443 -s addon.py --set ssl_verify_upstream_trusted_ca=…`; \
             the addon replaces the placeholder in `x-api-key`.\n\
             - CPU: user+system time of the proxy's process tree (veil-agent; nginx master and workers; mitmdump; for direct the \
             upstream nginx) over a measurement, divided by the requests served. RSS: growth of that tree's VmRSS with {IDLE_CONNS} \
             TLS connections held open (each answered one request first), divided by {IDLE_CONNS}; the largest of the runs (the \
             first, cold one: later runs reuse memory the allocator kept, so their growth understates the cost).\n\
             - Passthrough bulk: {} MiB over plain TCP to a sink in the upstream netns; veil splices it (no secret allows it).",
            o.runs,
            o.bulk_bytes,
            o.bulk_bytes >> 20,
            s = o.seconds,
            ka = o.nginx_keepalive,
            w = o.nginx_workers,
        );
        md
    }

    fn goals(&self) -> String {
        let v = self.row(Row::Veil);
        let d = self.row(Row::Direct);
        let n = self.row(Row::Nginx);
        let rps = |r: &RowData, l: Load| r.median(l, |s| s.r.rps).unwrap_or(f64::NAN);
        let cpu = |r: &RowData, l: Load| r.median(l, |s| s.cpu_per_1k).unwrap_or(f64::NAN);
        let mark = |ok: bool| if ok { "met" } else { "**not met**" };
        let mut g = String::from("\n## Goals (issue 9)\n\n| goal | measured | |\n|---|---|---|\n");
        let mut line = |goal: &str, measured: String, ok: bool| {
            let _ = writeln!(g, "| {goal} | {measured} | {} |", mark(ok));
        };
        for (l, name) in [(Load::H1, "h1"), (Load::H2, "h2")] {
            line(
                &format!("veil ≥ nginx, keep-alive {name} req/s"),
                format!("{:.2}× nginx", rps(v, l) / rps(n, l)),
                rps(v, l) >= rps(n, l),
            );
        }
        line(
            "≥ 0.6× direct, h1 keep-alive",
            format!("{:.2}×", rps(v, Load::H1) / rps(d, Load::H1)),
            rps(v, Load::H1) >= 0.6 * rps(d, Load::H1),
        );
        line(
            "≥ 0.4× direct, h2",
            format!("{:.2}×", rps(v, Load::H2) / rps(d, Load::H2)),
            rps(v, Load::H2) >= 0.4 * rps(d, Load::H2),
        );
        line(
            "≥ 0.75× direct, new connections",
            format!("{:.2}×", rps(v, Load::NewConn) / rps(d, Load::NewConn)),
            rps(v, Load::NewConn) >= 0.75 * rps(d, Load::NewConn),
        );
        line(
            "CPU per request ≤ nginx (h1)",
            format!(
                "{:.4} vs {:.4} CPU-s/1k",
                cpu(v, Load::H1),
                cpu(n, Load::H1)
            ),
            cpu(v, Load::H1) <= cpu(n, Load::H1),
        );
        let bulk = med(v.bulk_gbps.clone()) / med(d.bulk_gbps.clone());
        line(
            "passthrough ≥ 0.9× direct",
            format!("{bulk:.2}×"),
            bulk >= 0.9,
        );
        let rss = idle_kib(v);
        line(
            "≤ 32 KiB RSS per idle intercepted connection",
            format!("{rss:.1} KiB"),
            rss <= 32.0,
        );
        g
    }

    fn reference(&self) -> String {
        let n = self.row(Row::Nginx);
        let m = self.row(Row::Mitm);
        let d = self.row(Row::Direct);
        let rps = |r: &RowData, l: Load| fmt_num(r.median(l, |s| s.r.rps).unwrap_or(f64::NAN));
        let cpu = |r: &RowData| {
            r.median(Load::H1, |s| s.cpu_per_1k)
                .map_or("—".into(), |c| format!("{c:.3}"))
        };
        // The reference gives kB; ours are KiB.
        let rss = |r: &RowData| fmt_num(idle_kib(r) * 1.024);
        let mut s = String::from(
            "\n## Against the reference figures of issue 9 (same machine kind, medians)\n\n\
             | figure | reference | this run |\n|---|---|---|\n",
        );
        let rows = [
            ("h1 keep-alive direct, req/s", "107.7k", rps(d, Load::H1)),
            ("h1 keep-alive nginx, req/s", "55.5k", rps(n, Load::H1)),
            ("h1 keep-alive mitmproxy, req/s", "709", rps(m, Load::H1)),
            ("h2 direct, req/s", "186.5k", rps(d, Load::H2)),
            (
                "h2 nginx, req/s",
                "37.0k (61k with keepalive 256)",
                rps(n, Load::H2),
            ),
            ("h2 mitmproxy, req/s", "688", rps(m, Load::H2)),
            ("new TLS conns/s direct", "3.8k", rps(d, Load::NewConn)),
            ("new TLS conns/s nginx", "2.7k", rps(n, Load::NewConn)),
            ("new TLS conns/s mitmproxy", "200", rps(m, Load::NewConn)),
            ("proxy CPU-s per 1k h1 req, nginx", "0.017", cpu(n)),
            ("proxy CPU-s per 1k h1 req, mitmproxy", "1.41", cpu(m)),
            ("RSS per idle connection nginx, kB", "17", rss(n)),
            ("RSS per idle connection mitmproxy, kB", "131", rss(m)),
        ];
        for (a, b, c) in rows {
            let _ = writeln!(s, "| {a} | {b} | {c} |");
        }
        s
    }

    /// Grouped bars of req/s per load (log scale), drawn by gnuplot.
    fn plot(&self, png: &Path) -> Result<()> {
        let dir = tempfile::tempdir()?;
        let dat = dir.path().join("bench.dat");
        let mut text = String::from("load");
        for r in ROWS {
            let _ = write!(text, "\t\"{}\"", r.name());
        }
        text.push('\n');
        for l in LOADS {
            let _ = write!(text, "\"{}\"", l.name());
            for r in ROWS {
                let v = self.row(r).median(l, |s| s.r.rps).unwrap_or(f64::NAN);
                if v.is_finite() {
                    let _ = write!(text, "\t{v:.1}");
                } else {
                    text.push_str("\t-");
                }
            }
            text.push('\n');
        }
        std::fs::write(&dat, text)?;
        let script = format!(
            "set terminal pngcairo size 1100,600 font 'sans,10'\n\
             set output '{png}'\n\
             set title 'veil vs direct, nginx and mitmproxy: requests/s (log scale; median of {runs} runs)'\n\
             set datafile missing '-'\n\
             set style data histogram\nset style histogram cluster gap 1\n\
             set style fill solid 0.85 border -1\nset boxwidth 0.9\n\
             set logscale y\nset yrange [100:*]\nset grid ytics\n\
             set key top right\nset ylabel 'requests/s (new conns: connections/s)'\n\
             plot for [i=2:{last}] '{dat}' using i:xtic(1) title columnheader(i)\n",
            png = png.display(),
            runs = self.opts.runs,
            last = ROWS.len() + 1,
            dat = dat.display()
        );
        let script_path = dir.path().join("bench.gp");
        std::fs::write(&script_path, script)?;
        let out = Command::new("gnuplot")
            .arg(&script_path)
            .output()
            .context("run gnuplot (apt-get install gnuplot-nox)")?;
        if !out.status.success() {
            bail!("gnuplot failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}
