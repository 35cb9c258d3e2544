//! `veil-bench mitm`: TLS interception with header substitution vs a direct connection.
//!
//! Same client (h2load, one thread, 16 connections), same upstream (Debian nginx answering a
//! fixed body over TLS, h1 and h2), same request (`x-api-key: <placeholder>`), back to back and
//! interleaved: *direct* runs h2load in the sandbox's netns outside its cgroup, so it reaches
//! nginx over the sandbox's own link; *veil* runs it inside the cgroup, so every connection is
//! intercepted and the placeholder substituted. Rows: keep-alive req/s with p50/p99 latency for
//! HTTP/1.1 and h2 (10 streams per connection), and new TLS connections/s (one request each).

use std::io::BufRead;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use veil_client::veil_api::{CreateSecret, SecretValue};
use veil_tests::agent::AgentOptions;
use veil_tests::{NetNs, Sandbox, TestCa, Veil, World};

const HOST: &str = "bench.test";
const PORT: u16 = 8443;

/// nginx in the world netns, stopped (by PID) on drop.
struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa) -> Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let (cert, key) = ca.issue_pem(&[HOST]);
        std::fs::write(dir.path().join("cert.pem"), cert)?;
        std::fs::write(dir.path().join("key.pem"), key)?;
        let d = dir.path().display();
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 10000000;\n\
               server {{\n    listen {ip}:{PORT} ssl http2;\n\
                 ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n\
                 location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args(["nginx", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start nginx (apt-get install nginx)")?;
        let up = veil_tests::cmd::wait_until(Duration::from_secs(10), || {
            ns.tcp_listeners().iter().any(|a| a.port() == PORT)
        });
        if !up {
            bail!("nginx did not start listening on {ip}:{PORT}");
        }
        Ok(Nginx { child, _dir: dir })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // nsenter execs nginx, so this is the master's PID; SIGTERM stops its workers too.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) of our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

/// One h2load measurement, with where the CPU went during it.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// veil-agent CPU seconds per 1,000 requests (0 on the direct row).
    agent_cpu_per_1k: f64,
    /// Share of the machine's 2 cores that was busy.
    busy: f64,
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    H1,
    H2,
    NewConn,
}

fn h2load(cmd: &mut Command, mode: Mode, seconds: u64, url: &str, header: &str) -> Result<Sample> {
    let log = tempfile::NamedTempFile::new()?;
    cmd.args(["-t1", "-c16", "-H", header]);
    match mode {
        Mode::H1 => cmd.args(["--h1", "-D", &seconds.to_string()]),
        Mode::H2 => cmd.args(["-m10", "-D", &seconds.to_string()]),
        // h2load's -D loops with Connection: close (nghttp2 1.52): count requests instead.
        Mode::NewConn => cmd.args(["--h1", "-n", "3000", "-H", "Connection: close"]),
    };
    cmd.arg("--log-file").arg(log.path()).arg(url);
    let out = cmd
        .output()
        .context("run h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| {
            let l = l.strip_prefix("finished in ")?;
            l.split(", ")
                .nth(1)?
                .strip_suffix(" req/s")?
                .parse::<f64>()
                .ok()
        })
        .with_context(|| format!("h2load output without req/s: {text}"))?;
    let failed = text
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("requests: ")?;
            rest.split(", ")
                .find_map(|f| f.strip_suffix(" failed")?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    if failed > 0 {
        bail!("h2load {mode:?}: {failed} requests failed: {text}");
    }
    let mut lat = latencies_ms(log.path())?;
    lat.sort_by(f64::total_cmp);
    let pick = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Sample {
        rps,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        ..Sample::default()
    })
}

/// Per-request latencies (third tab-separated column, microseconds) of an h2load log file.
fn latencies_ms(path: &Path) -> Result<Vec<f64>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    Ok(file
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect())
}

fn median(v: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    let mut x: Vec<f64> = v.iter().map(f).collect();
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

/// Runs the comparison and prints a Markdown table.
pub fn run(seconds: u64, runs: u64) -> Result<()> {
    veil_tests::require_root();
    let world = World::new();
    let ip: IpAddr = world.upstream_v4().into();
    let ca = TestCa::new("veil bench CA");
    let _nginx = Nginx::start(world.netns(), ip, &ca)?;
    let veil = Veil::start_with(
        AgentOptions {
            args: vec!["--upstream-ca".into(), ca.pem_path().into()],
            ..AgentOptions::default()
        },
        &[],
    );
    let placeholder = veil
        .block_on(veil.api().client(veil.key()).create_secret(&CreateSecret {
            name: "bench-key".into(),
            value: SecretValue::new("sk-bench-0123456789abcdef"),
            hosts: Some(vec![HOST.into()]),
            ..CreateSecret::default()
        }))
        .context("creating the bench secret")?
        .placeholder;
    let ns = NetNs::new("mitm");
    let _link = world.link_sandbox(&ns);
    let sb = Sandbox::new("mitm", Some(&ns)).with_hosts(&[(HOST, ip)]);
    veil.register_with(&sb.agent_entry("mitm"), &[("KEY", "bench-key")]);

    let url = format!("https://{HOST}:{PORT}/");
    let header = format!("x-api-key: {placeholder}");
    let modes = [Mode::H1, Mode::H2, Mode::NewConn];
    let mut results: [[Vec<Sample>; 3]; 2] = Default::default();
    for run in 0..runs {
        for (row, via_agent) in [(0usize, false), (1, true)] {
            for (m, mode) in modes.iter().enumerate() {
                let mut cmd = if via_agent {
                    sb.command("h2load")
                } else {
                    sb.outside_command("h2load")
                };
                let (cpu_before, agent_before) = (
                    crate::host::cpu_times(),
                    crate::host::process_cpu_seconds(veil.pid()),
                );
                let started = std::time::Instant::now();
                let mut s = h2load(&mut cmd, *mode, seconds, &url, &header)?;
                s.busy = crate::host::busy_percent(&cpu_before, &crate::host::cpu_times());
                if via_agent {
                    let requests = s.rps * started.elapsed().as_secs_f64();
                    let used = crate::host::process_cpu_seconds(veil.pid()) - agent_before;
                    s.agent_cpu_per_1k = used / (requests / 1000.0);
                }
                let name = if via_agent { "veil  " } else { "direct" };
                eprintln!(
                    "run {run} {name} {mode:?}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
                    s.rps, s.p50_ms, s.p99_ms
                );
                results[row][m].push(s);
            }
        }
    }
    let cell = |row: usize, m: usize| {
        let v = &results[row][m];
        (
            median(v, |s| s.rps),
            median(v, |s| s.p50_ms),
            median(v, |s| s.p99_ms),
        )
    };
    println!(
        "\nTLS interception + header substitution, medians of {runs} interleaved runs (h2load -t1 -c16, {seconds} s; h2: -m10)"
    );
    println!(
        "| row | h1 keep-alive req/s | h1 p50 / p99 ms | h2 req/s | h2 p50 / p99 ms | new TLS conns/s |"
    );
    println!("|---|---|---|---|---|---|");
    for (row, name) in [(0, "direct"), (1, "veil")] {
        let (h1, h1p50, h1p99) = cell(row, 0);
        let (h2, h2p50, h2p99) = cell(row, 1);
        let (nc, _, _) = cell(row, 2);
        println!(
            "| {name} | {h1:.0} | {h1p50:.3} / {h1p99:.3} | {h2:.0} | {h2p50:.3} / {h2p99:.3} | {nc:.0} |"
        );
    }
    println!(
        "| veil / direct | {:.2}x | | {:.2}x | | {:.2}x |",
        cell(1, 0).0 / cell(0, 0).0,
        cell(1, 1).0 / cell(0, 1).0,
        cell(1, 2).0 / cell(0, 2).0
    );
    let profile = |m: usize| {
        (
            median(&results[0][m], |s| s.busy),
            median(&results[1][m], |s| s.busy),
            median(&results[1][m], |s| s.agent_cpu_per_1k),
        )
    };
    for (m, name) in [(0, "h1"), (1, "h2"), (2, "new conns")] {
        let (busy_direct, busy_veil, cpu) = profile(m);
        println!(
            "profile {name}: machine busy {busy_direct:.0} % direct, {busy_veil:.0} % veil; veil-agent {cpu:.4} CPU-s per 1k requests"
        );
    }
    Ok(())
}
