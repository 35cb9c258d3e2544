//! The suite's passthrough rows: bytes veil never looks at, direct vs through the agent.
//!
//! Three paths, interleaved inside every run: **direct** (the client in the sandbox's netns,
//! outside its cgroup), **veil** (inside the cgroup of the sandbox with the bench secret
//! mounted; plain TCP to the upstream is not intercepted, the agent splices it), and the
//! **secretless sandbox** (a second sandbox with no secret mounted and `egress: "sandbox"`:
//! whatever the code does with such a sandbox's connections is what it costs). Each measures
//! bulk throughput to a byte-counting sink and new connections per second, each a plain
//! HTTP/1.1 request answered and closed by the server (`client-bulk`, `client-connrate
//! --request`, the client side of `veil-bench passthrough`). The client speaks first, as HTTP
//! and TLS clients do: for a sandbox with secrets the agent decides on the client's first bytes.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use veil_tests::Sandbox;

use super::fmt::fmt_num;
use super::model::{Options, low_steal, med};

/// The paths compared, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path3 {
    Direct,
    Veil,
    Secretless,
}

pub(crate) const PATHS: [Path3; 3] = [Path3::Direct, Path3::Veil, Path3::Secretless];

impl Path3 {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Veil => "veil (sandbox with a secret)",
            Path3::Secretless => "secretless sandbox (no secret, egress \"sandbox\")",
        }
    }
}

/// Where each path's client runs, and the servers it reaches.
pub(crate) struct PassTargets<'a> {
    /// The bench sandbox: direct runs outside its cgroup, veil inside.
    pub(crate) sandbox: &'a Sandbox,
    /// The secretless sandbox (its client runs inside its cgroup).
    pub(crate) secretless: &'a Sandbox,
    /// The byte-counting sink.
    pub(crate) sink: SocketAddr,
    /// The HTTP server answering one request per connection, then closing.
    pub(crate) hello: SocketAddr,
}

impl PassTargets<'_> {
    fn command(&self, path: Path3, program: &Path) -> Command {
        match path {
            Path3::Direct => self.sandbox.outside_command(program),
            Path3::Veil => self.sandbox.command(program),
            Path3::Secretless => self.secretless.command(program),
        }
    }
}

/// Samples per path, in [`PATHS`] order.
#[derive(Debug, Default)]
pub(crate) struct PassData {
    pub(crate) bulk_gbps: [Vec<f64>; 3],
    pub(crate) conns: [Vec<f64>; 3],
}

impl PassData {
    /// Median bulk Gbit/s of `path`.
    pub(crate) fn bulk(&self, path: Path3) -> f64 {
        med(self.bulk_gbps[idx(path)].clone())
    }

    /// Median new connections/s of `path`.
    pub(crate) fn conns(&self, path: Path3) -> f64 {
        med(self.conns[idx(path)].clone())
    }

    /// Bulk and new connections of `path` against direct.
    pub(crate) fn ratios(&self, path: Path3) -> (f64, f64) {
        (
            self.bulk(path) / self.bulk(Path3::Direct),
            self.conns(path) / self.conns(Path3::Direct),
        )
    }
}

fn idx(path: Path3) -> usize {
    PATHS.iter().position(|p| *p == path).unwrap_or(0)
}

/// One run: bulk then new connections on each path; returns the CPU steal of each kept
/// measurement.
pub(crate) fn measure(
    opts: &Options,
    me: &Path,
    t: &PassTargets<'_>,
    data: &mut PassData,
) -> Result<Vec<f64>> {
    let mut steals = Vec::new();
    for path in PATHS {
        let what = format!("passthrough {} bulk", path.name());
        let (gbps, steal) = low_steal(&what, || {
            let mut cmd = t.command(path, me);
            cmd.args(["client-bulk", &t.sink.to_string(), "--bytes"])
                .arg(opts.bulk_bytes.to_string());
            let secs: f64 = crate::sink::run_client(cmd)?.parse()?;
            Ok(opts.bulk_bytes as f64 * 8.0 / secs / 1e9)
        })?;
        steals.push(steal);
        eprintln!("  {what}: {gbps:.2} Gbit/s, steal {steal:.1} %");
        data.bulk_gbps[idx(path)].push(gbps);

        let what = format!("passthrough {} new conns", path.name());
        let (rate, steal) = low_steal(&what, || {
            let mut cmd = t.command(path, me);
            cmd.args([
                "client-connrate",
                &t.hello.to_string(),
                "--request",
                "--seconds",
            ])
            .arg(opts.seconds.to_string());
            let out = crate::sink::run_client(cmd)?;
            let mut f = out.split_whitespace();
            let rate: f64 = f.next().context("connrate output")?.parse()?;
            let failed: u64 = f.next().context("connrate output")?.parse()?;
            if failed > 0 {
                anyhow::bail!("{failed} connections failed");
            }
            Ok(rate)
        })?;
        steals.push(steal);
        eprintln!("  {what}: {rate:.0} conns/s, steal {steal:.1} %");
        data.conns[idx(path)].push(rate);
    }
    Ok(steals)
}

/// The report's passthrough table.
pub(crate) fn markdown(data: &PassData) -> String {
    let mut md = String::from(
        "\n## Passthrough (bytes veil does not intercept)\n\n\
         | path | bulk Gbit/s | new TCP conns/s |\n|---|---|---|\n",
    );
    for path in PATHS {
        let (b, c) = data.ratios(path);
        let _ = writeln!(
            md,
            "| {} | {:.2} ({b:.2}×) | {} ({c:.2}×) |",
            path.name(),
            data.bulk(path),
            fmt_num(data.conns(path))
        );
    }
    md
}
