//! The load generators: h2load (one thread, 16 connections) and wrk as its cross-check, run
//! through a prepared `Command` (inside or outside a sandbox's cgroup), with their output
//! parsed into req/s and latency percentiles.

use std::io::BufRead;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// What one load run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// HTTP/1.1 keep-alive, small body.
    H1,
    /// HTTP/1.1 keep-alive, 64 KiB body.
    H1Big,
    /// h2, 10 streams per connection, small body.
    H2,
    /// h2, 10 streams per connection, 64 KiB body.
    H2Big,
    /// A new TLS connection per request (HTTP/1.1, `Connection: close`).
    NewConn,
}

impl Load {
    /// Short name for logs and the plot.
    pub fn name(self) -> &'static str {
        match self {
            Load::H1 => "h1",
            Load::H1Big => "h1 64K",
            Load::H2 => "h2",
            Load::H2Big => "h2 64K",
            Load::NewConn => "new conns",
        }
    }

    /// Whether the response body is the 64 KiB one.
    pub fn big(self) -> bool {
        matches!(self, Load::H1Big | Load::H2Big)
    }
}

/// One h2load result.
#[derive(Clone, Copy, Debug, Default)]
pub struct Result1 {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Requests completed.
    pub requests: f64,
}

/// Runs h2load with `load` against `base` (`https://host:port`) for `seconds`
/// (`new_conns` requests for [`Load::NewConn`]).
pub fn h2load(
    cmd: &mut Command,
    load: Load,
    seconds: u64,
    new_conns: u64,
    base: &str,
    header: &str,
) -> Result<Result1> {
    let log = tempfile::NamedTempFile::new()?;
    cmd.args(["-t1", "-c16", "-H", header]);
    let secs = seconds.to_string();
    let n = new_conns.to_string();
    match load {
        Load::H1 | Load::H1Big => cmd.args(["--h1", "-D", &secs]),
        Load::H2 | Load::H2Big => cmd.args(["-m10", "-D", &secs]),
        // h2load's -D loops with Connection: close (nghttp2 1.52): count requests instead.
        Load::NewConn => cmd.args(["--h1", "-n", &n, "-H", "Connection: close"]),
    };
    let path = if load.big() {
        crate::peers::BIG_PATH
    } else {
        "/"
    };
    cmd.arg("--log-file")
        .arg(log.path())
        .arg(format!("{base}{path}"));
    let out = cmd
        .output()
        .context("run h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (secs_taken, rps) = text
        .lines()
        .find_map(|l| {
            let l = l.strip_prefix("finished in ")?;
            let mut parts = l.split(", ");
            let took = parse_duration_s(parts.next()?)?;
            let rps = parts.next()?.strip_suffix(" req/s")?.parse::<f64>().ok()?;
            Some((took, rps))
        })
        .with_context(|| format!("h2load output without req/s: {text}"))?;
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix("requests: ")?;
            rest.split(", ")
                .find_map(|f| f.strip_suffix(name)?.trim().parse::<u64>().ok())
        })
    };
    let failed = field(" failed").unwrap_or(0);
    let errored = field(" errored").unwrap_or(0);
    let succeeded = field(" succeeded").unwrap_or(0);
    if failed > 0 || errored > 0 || succeeded == 0 {
        bail!(
            "h2load {load:?} on {base}: {failed} failed, {errored} errored, {succeeded} succeeded: {text}"
        );
    }
    let mut lat = latencies_ms(log.path())?;
    lat.sort_by(f64::total_cmp);
    let pick = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Result1 {
        rps,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        requests: rps * secs_taken,
    })
}

/// `12.3s`, `450.1ms`, `12us` → seconds.
fn parse_duration_s(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(v) = s.strip_suffix("ms") {
        return v.parse::<f64>().ok().map(|v| v / 1e3);
    }
    if let Some(v) = s.strip_suffix("us") {
        return v.parse::<f64>().ok().map(|v| v / 1e6);
    }
    s.strip_suffix('s')?.parse().ok()
}

/// Per-request latencies (third tab-separated column, microseconds) of an h2load log file.
pub fn latencies_ms(path: &Path) -> Result<Vec<f64>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    Ok(file
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .collect())
}

/// wrk, one thread and 16 keep-alive connections, on `base`/ for `seconds`: req/s.
pub fn wrk(cmd: &mut Command, seconds: u64, base: &str, header: &str) -> Result<f64> {
    cmd.args(["-t1", "-c16", "-d"])
        .arg(format!("{seconds}s"))
        .args(["-H", header])
        .arg(format!("{base}/"));
    let out = cmd.output().context("run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk on {base} saw errors: {text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:")?.trim().parse::<f64>().ok())
        .with_context(|| format!("wrk output without Requests/sec: {text}"))
}
