//! `veil-bench`: benchmarks run by `cargo xtask bench` (root; real namespaces and agent).
//!
//! `veil-bench passthrough` measures bulk throughput and new connections per second from a
//! sandbox to an upstream, direct (same netns, outside the cgroup) and through veil-agent
//! (inside the cgroup), interleaved, and prints medians and ratios; the sandbox has egress
//! "sandbox" unless `VEIL_BENCH_EGRESS=host`. `veil-bench suite` compares
//! veil with direct, nginx and mitmproxy and writes docs/benchmarks.md (see suite.rs);
//! `veil-bench soak` is the load and leak soak; `sandboxes` registers many sandboxes on one host
//! (registration latency, memory per sandbox, traffic through some); `registration`, `restart`, `mitm`, `rotation`,
//! `transfers` and `containers` measure one thing each. The `client-*` subcommands are the client side, re-executed inside
//! the sandbox. `veil-bench help SUBCOMMAND` lists a subcommand's options and defaults.
//!
//! The command line is parsed (cli.rs) before anything is set up: `--help`, `--version` and a
//! bad argument create nothing. Exit status: 0 the benchmark ran and its checks held; 1 it
//! failed (one line on stderr); 2 bad command line, nothing run; 101 a fixture could not be
//! set up (the panic says which).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser};
use veil_tests::{AgentSandbox, NetNs, Sandbox, TcpHello, Veil, World};

use crate::cli::{Cli, Cmd, SuiteArgs};
use crate::host::{busy_percent, cpu_steal_percent, cpu_times, process_cpu_seconds};
use crate::quantile::percentile;
use crate::sink::{run_client, start_sink};

mod cli;
mod containers;
mod fleet;
mod host;
mod idle;
mod load;
mod mitm;
mod peers;
mod probe;
mod quantile;
mod rotation;
mod scale;
mod sink;
mod soak;
mod store;
mod suite;
mod transfers;

fn main() -> ExitCode {
    // Exits 0 for --help/--version and 2 for a bad command line, before anything runs.
    let cli = Cli::parse();
    if let Err(msg) = cli::check(&cli.cmd) {
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit();
    }
    // Agents run at their production log level (info), as nginx runs with its access log off.
    veil_tests::agent::set_agent_log("info");
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veil-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Suite(SuiteArgs {
            seconds,
            runs,
            out,
            png,
            mitmdump,
            nginx_keepalive,
            nginx_workers,
            bytes,
            only,
            soak_connections,
            soak_sandboxes,
            soak_seconds,
            soak_think_ms,
            sandboxes,
            sandbox_traffic,
        }) => suite::run(&suite::Options {
            seconds,
            runs,
            out,
            png,
            mitmdump,
            nginx_keepalive,
            nginx_workers,
            bulk_bytes: bytes,
            only,
            soak_connections,
            soak_sandboxes,
            soak_seconds,
            soak_think_ms,
            sandboxes,
            sandbox_traffic,
        }),
        Cmd::Soak {
            connections,
            sandboxes,
            seconds,
            think_ms,
        } => soak::run(connections, sandboxes, seconds, think_ms),
        Cmd::ClientIdle {
            addr,
            count,
            header,
        } => idle::client(addr, count, &header),
        Cmd::ClientSoak {
            addr,
            count,
            seconds,
            header,
            seed,
            think_ms,
        } => soak::client(addr, count, seconds, &header, seed, think_ms),
        Cmd::Passthrough {
            bytes,
            seconds,
            runs,
        } => passthrough(bytes, seconds, runs),
        Cmd::Registration { count } => registration(count),
        Cmd::Sandboxes { count, traffic } => scale::run(count, traffic),
        Cmd::Restart { count } => restart(count),
        Cmd::Rotation { count } => rotation::run(count),
        Cmd::Store { count } => store::run(count),
        Cmd::Containers { count } => containers::run(count),
        Cmd::Fleet {
            agents,
            hosts,
            rotations,
        } => fleet::run(agents, hosts, rotations),
        Cmd::Transfers { bytes } => transfers::run(bytes),
        Cmd::Mitm { seconds, runs } => mitm::run(seconds, runs),
        Cmd::ClientBulk { addr, bytes } => client_bulk(addr, bytes),
        Cmd::ClientConnrate {
            addr,
            seconds,
            concurrency,
            request,
        } => client_connrate(addr, seconds, concurrency, request),
    }
}

/// Writes `bytes` to a sink and reports seconds until the sink confirmed receipt.
fn client_bulk(addr: SocketAddr, bytes: u64) -> Result<()> {
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    let secs = start.elapsed().as_secs_f64();
    if u64::from_be_bytes(count) != bytes {
        bail!(
            "sink counted {} of {bytes} bytes",
            u64::from_be_bytes(count)
        );
    }
    println!("{secs}");
    Ok(())
}

/// Opens connections as fast as `concurrency` threads can for `seconds`; each reads the
/// server's greeting (with `request`: the answer to an HTTP/1.1 request it sends first) to
/// EOF, then closes. The server closes first, so TIME_WAIT lands on the upstream's side and
/// neither the client's nor the agent's ephemeral ports run out.
fn client_connrate(addr: SocketAddr, seconds: u64, concurrency: u64, request: bool) -> Result<()> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (done, failed) = (done.clone(), failed.clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let ok = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect(addr)?;
                        if request {
                            s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
                        }
                        let mut greeting = Vec::new();
                        s.read_to_end(&mut greeting)?;
                        if greeting.is_empty() {
                            return Err(std::io::Error::other("no greeting"));
                        }
                        Ok(())
                    })();
                    let c = if ok.is_ok() { &done } else { &failed };
                    c.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let rate = done.load(Ordering::Relaxed) as f64 / seconds as f64;
    println!("{rate} {}", failed.load(Ordering::Relaxed));
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn passthrough(bytes: u64, seconds: u64, runs: u64) -> Result<()> {
    veil_tests::require_root();
    let me = std::env::current_exe().context("own path")?;
    let world = World::new();
    let ns = NetNs::new("bench");
    let _link = world.link_sandbox(&ns);
    let sb = Sandbox::new("bench", Some(&ns));
    let (sink, stop_sink) = start_sink(world.netns(), world.upstream_v4().into());
    let hello = TcpHello::start(world.netns(), world.upstream_v4().into(), "bench");
    // VEIL_BENCH_EGRESS=host: the agent connects from the host netns; by default (egress
    // "sandbox") it opens each upstream socket inside the sandbox's netns.
    let mut spec = sb.agent_entry("bench");
    if let Ok(mode) = std::env::var("VEIL_BENCH_EGRESS") {
        spec = spec.with_egress(&mode);
    }
    eprintln!("egress: {}", spec.egress());
    let veil = Veil::start(&[spec]);

    let mut results: [[Vec<f64>; 2]; 2] = Default::default(); // [direct, veil][bulk, conns]
    let mut steal = Vec::new();
    // Where the time goes on the veil row: the agent's CPU per GiB, and how busy the box was.
    let mut agent_cpu_per_gib = Vec::new();
    let mut busy = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for (row, via_agent) in [(0usize, false), (1, true)] {
            let cmd = |args: &[String]| {
                let mut c = if via_agent {
                    sb.command(&me)
                } else {
                    sb.outside_command(&me)
                };
                c.args(args);
                c
            };
            let before = cpu_times();
            let agent_before = process_cpu_seconds(veil.pid());
            let secs: f64 = run_client(cmd(&[
                "client-bulk".into(),
                sink.to_string(),
                "--bytes".into(),
                bytes.to_string(),
            ]))?
            .parse()?;
            let gbps = bytes as f64 * 8.0 / secs / 1e9;
            busy[row].push(busy_percent(&before, &cpu_times()));
            if via_agent {
                let used = process_cpu_seconds(veil.pid()) - agent_before;
                agent_cpu_per_gib.push(used / (bytes as f64 / (1u64 << 30) as f64));
            }
            let rate_out = run_client(cmd(&[
                "client-connrate".into(),
                hello.addr().to_string(),
                "--seconds".into(),
                seconds.to_string(),
            ]))?;
            let rate: f64 = rate_out
                .split_whitespace()
                .next()
                .context("connrate output")?
                .parse()?;
            steal.push(cpu_steal_percent(&before, &cpu_times()));
            let name = if via_agent { "veil  " } else { "direct" };
            eprintln!("run {run} {name}: bulk {gbps:.2} Gbit/s, {rate:.0} conns/s");
            results[row][0].push(gbps);
            results[row][1].push(rate);
        }
    }
    stop_sink.store(true, Ordering::Relaxed);
    let [direct, veil] = results.map(|r| r.map(median));
    println!(
        "\npassthrough, median of {runs} interleaved runs ({} MiB per bulk run, {seconds} s per connection run)",
        bytes >> 20
    );
    println!("| path   | bulk Gbit/s | new conns/s |");
    println!("|--------|-------------|-------------|");
    println!("| direct | {:11.2} | {:11.0} |", direct[0], direct[1]);
    println!("| veil   | {:11.2} | {:11.0} |", veil[0], veil[1]);
    println!(
        "| ratio  | {:10.2}x | {:10.2}x |",
        veil[0] / direct[0],
        veil[1] / direct[1]
    );
    println!(
        "max CPU steal during a run: {:.1} %",
        steal.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "profile of the bulk runs: machine busy {:.0} % direct, {:.0} % veil (2 cores = 100 %); veil-agent CPU {:.2} s per GiB",
        median(busy[0].clone()),
        median(busy[1].clone()),
        median(agent_cpu_per_gib)
    );
    Ok(())
}

fn sandbox_spec(id: &str, sb: &Sandbox) -> AgentSandbox {
    AgentSandbox {
        id: id.to_owned(),
        cgroup: sb.cgroup().path().to_owned(),
        netns: sb.netns_path().map(ToOwned::to_owned),
        egress: None,
    }
}

/// PUT /api/sandbox/{id} → answer (the PUT answers once the redirect is live), over `count`
/// registrations of fresh sandboxes (cgroup + netns); each is verified live, then removed.
fn registration(count: u64) -> Result<()> {
    veil_tests::require_root();
    let world = World::new();
    let hello = TcpHello::start(world.netns(), world.upstream_v4().into(), "U");
    let veil = Veil::start(&[]);
    let mut took = Vec::new();
    for i in 0..count {
        let ns = NetNs::new(&format!("reg{i}"));
        let sb = Sandbox::new(&format!("reg{i}"), Some(&ns));
        let spec = sandbox_spec(&format!("reg{i}"), &sb);
        let started = Instant::now();
        veil.register(&spec);
        took.push(started.elapsed());
        if !probe::through_agent(&sb, hello.addr(), world.host_v4().into()) {
            bail!("registration {i}: the first connection after PUT was not redirected");
        }
        veil.unregister(&spec.id);
    }
    took.sort();
    println!(
        "registration latency (PUT -> answered, redirect live) over {count}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.99).as_secs_f64() * 1e3,
        took[took.len() - 1].as_secs_f64() * 1e3
    );
    Ok(())
}

/// SIGKILL of the agent → restarted → first connection through it again, `count` times.
fn restart(count: u64) -> Result<()> {
    veil_tests::require_root();
    let world = World::new();
    let hello = TcpHello::start(world.netns(), world.upstream_v4().into(), "U");
    let ns = NetNs::new("restart");
    let sb = Sandbox::new("restart", Some(&ns));
    let veil = Veil::start(&[sandbox_spec("restart", &sb)]);
    let mut took = Vec::new();
    for i in 0..count {
        veil.agent().kill();
        let started = Instant::now();
        veil.agent().respawn();
        let deadline = started + Duration::from_secs(10);
        while !probe::through_agent(&sb, hello.addr(), world.host_v4().into()) {
            if Instant::now() > deadline {
                bail!("restart {i}: sandbox not served 10 s after the agent restarted");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "agent restart recovery (spawn -> sandbox served through the agent) over {count}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.99).as_secs_f64() * 1e3,
        took[took.len() - 1].as_secs_f64() * 1e3
    );
    Ok(())
}
