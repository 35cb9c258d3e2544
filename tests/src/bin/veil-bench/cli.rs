//! The command line of `veil-bench`: every subcommand and its options, parsed by clap before
//! anything runs, so `--help`, `--version` and a bad argument never set up a namespace, a cgroup
//! or an agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// What the exit status means; shown under every `--help`.
pub const EXIT_STATUS: &str = "\
Exit status:
  0    the benchmark ran and every check it makes held (results on stdout)
  1    the benchmark failed: a check did not hold or a step could not run (one line on stderr)
  2    bad command line (unknown subcommand or option, bad value); nothing was run
  101  a fixture could not be set up (not root, a binary missing); the panic message says which";

/// Benchmarks run by `cargo xtask bench` (as root: real namespaces, cgroups and agent).
#[derive(Debug, Parser)]
#[command(
    name = "veil-bench",
    version,
    propagate_version = true,
    after_help = EXIT_STATUS,
    // The suite's defaults may be given again by the caller (`cargo xtask bench` passes
    // --out/--png/--mitmdump, extra arguments after it): the last one wins.
    args_override_self = true
)]
pub struct Cli {
    /// The benchmark (or client side) to run.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// A count, duration or size: at least 1 (a median or rate of nothing is no measurement).
fn positive(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A positive number that fits a `u32` (nginx settings).
fn positive_u32(s: &str) -> Result<u32, String> {
    u32::try_from(positive(s)?).map_err(|e| e.to_string())
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// veil against direct, nginx and mitmproxy; writes a Markdown report and a PNG.
    #[command(after_help = EXIT_STATUS)]
    Suite(SuiteArgs),
    /// Load and leak soak: many intercepted keep-alive connections over many sandboxes.
    #[command(after_help = EXIT_STATUS)]
    Soak {
        /// Concurrent connections in all (at least one per sandbox).
        #[arg(long, default_value_t = 10_000, value_parser = positive)]
        connections: u64,
        /// Sandboxes, one client process each.
        #[arg(long, default_value_t = 100, value_parser = positive)]
        sandboxes: u64,
        /// Seconds the connections stay busy.
        #[arg(long, default_value_t = 300, value_parser = positive)]
        seconds: u64,
        /// Longest think time between a connection's requests, ms (each a random 0..=N).
        #[arg(long, default_value_t = 200)]
        think_ms: u64,
    },
    /// Bulk throughput and new connections/s, direct vs through veil-agent (not intercepted).
    #[command(after_help = EXIT_STATUS)]
    Passthrough {
        /// Bytes per bulk run.
        #[arg(long, default_value_t = 2 << 30, value_parser = positive)]
        bytes: u64,
        /// Seconds per connection-rate run.
        #[arg(long, default_value_t = 5, value_parser = positive)]
        seconds: u64,
        /// Interleaved runs (medians are reported).
        #[arg(long, default_value_t = 3, value_parser = positive)]
        runs: u64,
    },
    /// Latency of PUT /api/sandbox/{id} until the redirect is live, over fresh sandboxes.
    #[command(after_help = EXIT_STATUS)]
    Registration {
        /// Sandboxes registered (and removed) one after the other.
        #[arg(long, default_value_t = 100, value_parser = positive)]
        count: u64,
    },
    /// Many sandboxes on one host: registration p50/p99 (PUT until the redirect is live),
    /// memory and fds per sandbox (agent and control), traffic through a random few, removal.
    #[command(after_help = EXIT_STATUS)]
    Sandboxes {
        /// Sandboxes registered (each a cgroup and its own netns), all at once.
        #[arg(long, default_value_t = 1000, value_parser = positive)]
        count: u64,
        /// Sandboxes picked at random that each send intercepted requests (at most --count).
        #[arg(long, default_value_t = 100, value_parser = positive)]
        traffic: u64,
    },
    /// Time from an agent restart (after SIGKILL) to a sandbox served through it again.
    #[command(after_help = EXIT_STATUS)]
    Restart {
        /// Kill and restart cycles.
        #[arg(long, default_value_t = 20, value_parser = positive)]
        count: u64,
    },
    /// The store backends side by side: creates/s, paginated reads/s, rotation → every
    /// agent acknowledged (sled vs PostgreSQL with two replicas).
    #[command(after_help = EXIT_STATUS)]
    Store {
        /// Secrets created per backend.
        #[arg(long, default_value_t = 2000, value_parser = positive)]
        count: u64,
    },
    /// Container start overhead: `true` in a container with the veil runtime and a declared
    /// sandbox vs the plain runtime, for Docker, Podman and runc (p50/p99), and where the hook's
    /// time goes.
    #[command(after_help = EXIT_STATUS)]
    Containers {
        /// Starts per runtime and mode.
        #[arg(long, default_value_t = 50, value_parser = positive)]
        count: u64,
    },
    /// The fleet link: 2 replicas, simulated agents over mutual TLS on enrolled hosts;
    /// rotation → every agent acknowledged (p50/p99), RSS and fds per agent, failover after
    /// kill -9 of a replica.
    #[command(after_help = EXIT_STATUS)]
    Fleet {
        /// Simulated agents (link-level clients, no eBPF).
        #[arg(long, default_value_t = 1000, value_parser = positive)]
        agents: u64,
        /// Enrolled hosts the agents are spread over (one sandbox each).
        #[arg(long, default_value_t = 10, value_parser = positive)]
        hosts: u64,
        /// Rotations measured.
        #[arg(long, default_value_t = 50, value_parser = positive)]
        rotations: u64,
    },
    /// TLS interception with header substitution vs a direct connection (h2load).
    #[command(after_help = EXIT_STATUS)]
    Mitm {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10, value_parser = positive)]
        seconds: u64,
        /// Interleaved runs (medians are reported).
        #[arg(long, default_value_t = 3, value_parser = positive)]
        runs: u64,
    },
    /// Large transfers through interception: N bytes down and N bytes up over HTTP/1.1 and h2
    /// (curl in a sandbox, SHA-256 at both ends): throughput and the agent's peak RSS (VmHWM).
    #[command(after_help = EXIT_STATUS)]
    Transfers {
        /// Bytes per transfer (default 1 GiB).
        #[arg(long, default_value_t = 1 << 30, value_parser = positive)]
        bytes: u64,
    },
    /// Time from a secret's PATCH answer to the upstream seeing the new value, under traffic
    /// (VEIL_BENCH_ROTATION_CLIENT=fresh: a new connection per request).
    #[command(after_help = EXIT_STATUS)]
    Rotation {
        /// Rotations.
        #[arg(long, default_value_t = 100, value_parser = positive)]
        count: u64,
    },
    /// Internal: client side of `passthrough`, run inside the sandbox; prints seconds taken.
    #[command(after_help = EXIT_STATUS)]
    ClientBulk {
        /// The byte-counting sink.
        addr: SocketAddr,
        /// Bytes to send.
        #[arg(long, default_value_t = 1 << 30, value_parser = positive)]
        bytes: u64,
    },
    /// Internal: client side of `passthrough`; prints connections/s and failures.
    #[command(after_help = EXIT_STATUS)]
    ClientConnrate {
        /// The greeting server.
        addr: SocketAddr,
        /// Seconds to open connections for.
        #[arg(long, default_value_t = 5, value_parser = positive)]
        seconds: u64,
        /// Threads opening connections.
        #[arg(long, default_value_t = 8, value_parser = positive)]
        concurrency: u64,
        /// Speak first: send an HTTP/1.1 request and read the answer to EOF (a client-first
        /// protocol, like HTTP or TLS) instead of reading the server's greeting.
        #[arg(long)]
        request: bool,
    },
    /// Internal: client side of the suite's memory row; holds TLS connections open until
    /// stdin closes.
    #[command(after_help = EXIT_STATUS)]
    ClientIdle {
        /// The proxy (or upstream) to connect to.
        addr: SocketAddr,
        /// Connections to hold open.
        #[arg(long, default_value_t = 1000, value_parser = positive)]
        count: u64,
        /// Header sent with each request (`name: value`).
        #[arg(long, default_value = "x-bench: 1")]
        header: String,
    },
    /// Internal: client side of `soak`; prints a JSON summary.
    #[command(after_help = EXIT_STATUS)]
    ClientSoak {
        /// The echoing upstream, through veil.
        addr: SocketAddr,
        /// Connections.
        #[arg(long, default_value_t = 100, value_parser = positive)]
        count: u64,
        /// Seconds of traffic.
        #[arg(long, default_value_t = 60, value_parser = positive)]
        seconds: u64,
        /// Header sent with each request (`name: value`).
        #[arg(long, default_value = "x-bench: 1")]
        header: String,
        /// Seed of the request bodies (distinct per client process).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Longest think time between a connection's requests, ms (each a random 0..=N).
        #[arg(long, default_value_t = 200)]
        think_ms: u64,
    },
}

/// Options of `suite`.
#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// Seconds per keep-alive measurement.
    #[arg(long, default_value_t = 5, value_parser = positive)]
    pub seconds: u64,
    /// Interleaved runs (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = positive)]
    pub runs: u64,
    /// Where the Markdown report goes.
    #[arg(long, value_name = "MD", default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// Where the PNG chart goes.
    #[arg(long, value_name = "PNG", default_value = "docs/benchmarks.png")]
    pub png: PathBuf,
    /// mitmproxy's mitmdump (`cargo xtask bench` installs one into target/mitmproxy-venv).
    #[arg(long, value_name = "PATH", default_value_os_t = crate::peers::default_mitmdump())]
    pub mitmdump: PathBuf,
    /// nginx proxy: upstream keep-alive pool size.
    #[arg(long, default_value_t = 256, value_parser = positive_u32)]
    pub nginx_keepalive: u32,
    /// nginx proxy: worker processes.
    #[arg(long, default_value_t = 2, value_parser = positive_u32)]
    pub nginx_workers: u32,
    /// Bytes per passthrough bulk run.
    #[arg(long, default_value_t = 512 << 20, value_parser = positive)]
    pub bytes: u64,
    /// Measure only these h2load loads (h1, h1-64k, h2, h2-64k, new-conns) on the direct, veil
    /// and nginx rows, print them and write no report (for profiling one lever at a time).
    #[arg(long, value_name = "LOAD", value_parser = load_name)]
    pub only: Vec<crate::load::Load>,
    /// Soak: concurrent intercepted connections (at most 1,024 per sandbox).
    #[arg(long, default_value_t = 10_000, value_parser = positive)]
    pub soak_connections: u64,
    /// Soak: sandboxes the connections are spread over.
    #[arg(long, default_value_t = 10, value_parser = positive)]
    pub soak_sandboxes: u64,
    /// Soak: seconds of traffic.
    #[arg(long, default_value_t = 30, value_parser = positive)]
    pub soak_seconds: u64,
    /// Soak: longest think time between a connection's requests, ms.
    #[arg(long, default_value_t = 10_000)]
    pub soak_think_ms: u64,
    /// Sandboxes registered on one host (as `veil-bench sandboxes --count`).
    #[arg(long, default_value_t = 1000, value_parser = positive)]
    pub sandboxes: u64,
    /// Of those, sandboxes picked at random that send intercepted requests.
    #[arg(long, default_value_t = 100, value_parser = positive)]
    pub sandbox_traffic: u64,
}

/// A load of the suite by its command-line name.
fn load_name(s: &str) -> Result<crate::load::Load, String> {
    use crate::load::Load;
    Ok(match s {
        "h1" => Load::H1,
        "h1-64k" => Load::H1Big,
        "h2" => Load::H2,
        "h2-64k" => Load::H2Big,
        "new-conns" => Load::NewConn,
        _ => return Err("one of h1, h1-64k, h2, h2-64k, new-conns".into()),
    })
}

/// The agent's default `max_connections_per_sandbox`: a soak spreads its connections so that
/// no sandbox needs more.
pub const PER_SANDBOX_LIMIT: u64 = 1024;

/// Checks what one option cannot check alone (clap has parsed each); the message names the
/// options. Called before anything runs, so a bad combination exits 2 like a bad option.
pub fn check(cmd: &Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Soak {
            connections,
            sandboxes,
            ..
        } => check_soak(*connections, *sandboxes, "--connections", "--sandboxes"),
        Cmd::Suite(a) => {
            check_soak(
                a.soak_connections,
                a.soak_sandboxes,
                "--soak-connections",
                "--soak-sandboxes",
            )?;
            check_traffic(
                a.sandbox_traffic,
                a.sandboxes,
                "--sandbox-traffic",
                "--sandboxes",
            )
        }
        Cmd::Sandboxes { count, traffic } => {
            check_traffic(*traffic, *count, "--traffic", "--count")
        }
        _ => Ok(()),
    }
}

fn check_soak(connections: u64, sandboxes: u64, conns: &str, boxes: &str) -> Result<(), String> {
    if connections < sandboxes {
        return Err(format!(
            "{conns} {connections} is less than {boxes} {sandboxes}: each sandbox needs a connection"
        ));
    }
    if connections.div_ceil(sandboxes) > PER_SANDBOX_LIMIT {
        return Err(format!(
            "{conns} {connections} over {boxes} {sandboxes} is more than the agent's {PER_SANDBOX_LIMIT} connections per sandbox: use {boxes} {} or more",
            connections.div_ceil(PER_SANDBOX_LIMIT)
        ));
    }
    Ok(())
}

fn check_traffic(traffic: u64, count: u64, t: &str, c: &str) -> Result<(), String> {
    if traffic > count {
        return Err(format!("{t} {traffic} is more than {c} {count}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_what_cargo_xtask_bench_passes() {
        // xtask/src/bench.rs: `suite --mitmdump M --out O --png P`, then the caller's extra
        // arguments, which win.
        let cli = Cli::try_parse_from([
            "veil-bench",
            "suite",
            "--mitmdump",
            "m",
            "--out",
            "o",
            "--png",
            "p",
            "--runs",
            "1",
            "--out",
            "mine.md",
        ])
        .unwrap();
        let Cmd::Suite(a) = cli.cmd else {
            panic!("not the suite: {:?}", cli.cmd)
        };
        assert_eq!(
            (a.out, a.png, a.mitmdump, a.runs, a.seconds),
            ("mine.md".into(), "p".into(), "m".into(), 1, 5)
        );
        // The benchmarks `cargo xtask bench --help` names, passed as the subcommand.
        for which in [
            "passthrough",
            "registration",
            "sandboxes",
            "restart",
            "mitm",
            "rotation",
            "soak",
        ] {
            let cli = Cli::try_parse_from(["veil-bench", which]).unwrap();
            assert_eq!(check(&cli.cmd), Ok(()), "{which}'s defaults");
        }
    }

    fn checked(args: &[&str]) -> Result<(), String> {
        check(&Cli::try_parse_from(args).unwrap().cmd)
    }

    #[test]
    fn combinations_the_agent_would_refuse_are_bad_command_lines() {
        // 10,000 over 9 sandboxes is 1,112 in some: more than the agent's per-sandbox limit.
        let e = checked(&[
            "veil-bench",
            "soak",
            "--connections",
            "10000",
            "--sandboxes",
            "9",
        ])
        .unwrap_err();
        assert!(e.contains("--sandboxes 10 or more"), "{e}");
        checked(&[
            "veil-bench",
            "soak",
            "--connections",
            "10000",
            "--sandboxes",
            "10",
        ])
        .unwrap();
        let e = checked(&[
            "veil-bench",
            "soak",
            "--connections",
            "5",
            "--sandboxes",
            "6",
        ])
        .unwrap_err();
        assert!(
            e.contains("--connections 5 is less than --sandboxes 6"),
            "{e}"
        );
        let e = checked(&["veil-bench", "suite", "--soak-sandboxes", "5"]).unwrap_err();
        assert!(e.contains("--soak-connections 10000"), "{e}");
        let e = checked(&["veil-bench", "sandboxes", "--count", "20"]).unwrap_err();
        assert_eq!(e, "--traffic 100 is more than --count 20");
        checked(&["veil-bench", "sandboxes", "--count", "20", "--traffic", "5"]).unwrap();
        let e = checked(&["veil-bench", "suite", "--sandboxes", "20"]).unwrap_err();
        assert_eq!(e, "--sandbox-traffic 100 is more than --sandboxes 20");
    }
}
