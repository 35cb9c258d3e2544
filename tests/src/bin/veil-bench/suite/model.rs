//! What the suite measures: its options, rows and loads, the samples kept per row, and the
//! fixed ports and sizes the run and the report share.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::load::{self, Load};

/// The bench secret's value (a dummy).
pub(crate) const VALUE: &str = "sk-bench-0123456789abcdef";
/// nginx's listener in the world netns.
pub(crate) const NGINX_PORT: u16 = 9443;
/// mitmproxy's listener in the world netns.
pub(crate) const MITM_PORT: u16 = 9444;
/// Steal above this share of CPU time makes a measurement be repeated.
pub(crate) const MAX_STEAL: f64 = 5.0;
/// Idle connections held open for the memory row.
pub(crate) const IDLE_CONNS: u64 = 1000;

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
    /// When not empty: only these loads on the direct, veil and nginx rows, no report.
    pub only: Vec<Load>,
    /// Soak: concurrent intercepted connections, sandboxes they are spread over, seconds.
    pub soak_connections: u64,
    /// Soak: sandboxes.
    pub soak_sandboxes: u64,
    /// Soak: seconds of traffic.
    pub soak_seconds: u64,
    /// Soak: longest think time between a connection's requests, ms.
    pub soak_think_ms: u64,
    /// Sandboxes registered on one host.
    pub sandboxes: u64,
    /// Of those, sandboxes picked at random that send intercepted requests.
    pub sandbox_traffic: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Row {
    Direct,
    Veil,
    VeilNoScrub,
    Nginx,
    Mitm,
}

pub(crate) const ROWS: [Row; 5] = [
    Row::Direct,
    Row::Veil,
    Row::VeilNoScrub,
    Row::Nginx,
    Row::Mitm,
];
pub(crate) const LOADS: [Load; 5] = [Load::H1, Load::H1Big, Load::H2, Load::H2Big, Load::NewConn];

impl Row {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Row::Direct => "direct",
            Row::Veil => "veil",
            Row::VeilNoScrub => "veil, scrubbing off",
            Row::Nginx => "nginx",
            Row::Mitm => "mitmproxy",
        }
    }

    pub(crate) fn runs(self, load: Load) -> bool {
        self != Row::VeilNoScrub || load.big()
    }
}

/// One measurement with its context.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) r: load::Result1,
    /// Proxy CPU seconds per 1,000 requests (process tree).
    pub(crate) cpu_per_1k: f64,
}

/// Everything measured for one row.
#[derive(Debug, Default)]
pub(crate) struct RowData {
    pub(crate) loads: Vec<(Load, Vec<Sample>)>,
    pub(crate) wrk: Vec<f64>,
    pub(crate) idle_kib_per_conn: Vec<f64>,
}

impl RowData {
    pub(crate) fn median(&self, load: Load, f: impl Fn(&Sample) -> f64) -> Option<f64> {
        self.loads
            .iter()
            .find(|(l, v)| *l == load && !v.is_empty())
            .map(|(_, v)| med(v.iter().map(f).collect()))
    }
}

/// RSS per idle connection: the largest of the runs. The first run is the cold one; later
/// runs reuse memory the allocator kept from the first, so their growth understates the cost.
pub(crate) fn idle_kib(r: &RowData) -> f64 {
    r.idle_kib_per_conn.iter().copied().fold(f64::NAN, f64::max)
}

pub(crate) fn med(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` until CPU steal during it stays at most [`MAX_STEAL`] (3 attempts); returns the
/// result and the steal of the kept attempt.
pub(crate) fn low_steal<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Result<(T, f64)> {
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
