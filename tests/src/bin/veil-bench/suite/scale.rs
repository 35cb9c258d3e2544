//! The suite's scale rows, measured once per suite after the interleaved runs: the soak at
//! many concurrent intercepted connections (`veil-bench soak`, shorter, no leak wait), and many
//! sandboxes on one host (`veil-bench sandboxes`). Each starts its own world, control and
//! agent; a failure is reported in the table rather than losing the run's other figures.

use std::fmt::Write as _;

use super::fmt::fmt_count;
use super::model::Options;
use crate::scale::ScaleResult;
use crate::soak::SoakResult;

/// What the scale rows measured (`Err`: why the measurement could not finish).
#[derive(Debug)]
pub(crate) struct Scale {
    pub(crate) soak: Result<SoakResult, String>,
    pub(crate) sandboxes: Result<ScaleResult, String>,
}

/// Runs both.
pub(crate) fn measure(opts: &Options) -> Scale {
    eprintln!(
        "soak: {} connections over {} sandboxes for {} s",
        opts.soak_connections, opts.soak_sandboxes, opts.soak_seconds
    );
    let soak = contained(|| {
        crate::soak::measure(
            opts.soak_connections,
            opts.soak_sandboxes,
            opts.soak_seconds,
            opts.soak_think_ms,
            None,
        )
    });
    match &soak {
        Ok(r) => eprintln!(
            "  soak: {} requests, {} corrupted bytes, {} failed connections, {:.1} KiB per connection",
            r.totals[0],
            r.corrupted(),
            r.failed(),
            r.kib_per_conn()
        ),
        Err(e) => eprintln!("  soak: {e}"),
    }
    eprintln!("sandboxes: {}", opts.sandboxes);
    let sandboxes = contained(|| crate::scale::measure(opts.sandboxes, opts.sandbox_traffic));
    match &sandboxes {
        Ok(r) => eprintln!(
            "  sandboxes: registration p50 {:.1} ms p99 {:.1} ms, {} traffic failures",
            r.register_ms[0], r.register_ms[1], r.failures
        ),
        Err(e) => eprintln!("  sandboxes: {e}"),
    }
    Scale { soak, sandboxes }
}

/// Runs `f`, turning its error or a fixture's panic (the fixtures clean up as they unwind)
/// into the line the report shows, so the suite's other figures are still written.
fn contained<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| format!("{e:#}")),
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .map_or_else(|| "panicked".to_owned(), |m| format!("panicked: {m}"))),
    }
}

/// Whether the soak held: ran, 0 corrupted bytes, nothing failed or unsubstituted.
pub(crate) fn soak_ok(s: &Scale, opts: &Options) -> bool {
    s.soak.as_ref().is_ok_and(|r| {
        r.problems.is_empty() && r.corrupted() == 0 && r.connections >= opts.soak_connections
    })
}

/// The report's scale section.
pub(crate) fn markdown(s: &Scale) -> String {
    let mut md = String::from("\n## Scale (one measurement each)\n\n");
    match &s.soak {
        Ok(r) => {
            let _ = writeln!(
                md,
                "**Soak:** {} concurrent intercepted keep-alive connections over {} sandboxes for {} s \
                 ({:.0} s with ramp-down; 0–{} ms think time): {} requests ({:.0}/s), {} MiB up and {} MiB down echoed; \
                 **{} corrupted bytes**, {} failed connections, {} requests seen upstream without the value{}. \
                 Agent RSS {} MiB before, {} MiB at the peak: **{:.1} KiB per connection**; fds {} before, {} at the peak.\n",
                fmt_count(r.connections),
                r.sandboxes,
                r.seconds,
                r.took,
                fmt_count(r.think_ms),
                fmt_count(r.totals[0]),
                r.totals[0] as f64 / r.took,
                r.totals[1] >> 20,
                r.totals[2] >> 20,
                r.corrupted(),
                r.failed(),
                r.wrong_key,
                if r.problems.is_empty() {
                    String::new()
                } else {
                    format!(" — failed: {}", r.problems.join("; "))
                },
                r.rss_kib[0] >> 10,
                r.rss_kib[1] >> 10,
                r.kib_per_conn(),
                r.fds_before,
                r.fds_peak,
            );
        }
        Err(e) => {
            let _ = writeln!(md, "**Soak:** did not finish: {e}\n");
        }
    }
    match &s.sandboxes {
        Ok(r) => {
            let _ = writeln!(
                md,
                "| {} sandboxes on one host | |\n|---|---|\n\
                 | registration (PUT → answered, redirect live) p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
                 | not live after the PUT answered | {} |\n\
                 | agent memory per sandbox | {:.1} KiB RSS, {:.2} fds |\n\
                 | control memory per sandbox | {:.1} KiB RSS, {:.2} fds |\n\
                 | traffic through {} sandboxes picked at random | {} intercepted requests, **{} failures** |\n\
                 | removal (DELETE → answered) p50 / p99 | {:.1} / {:.1} ms |\n\
                 | agent fds before the first PUT / after the last DELETE | {} / {} |\n\
                 | whole measurement | {:.0} s |",
                fmt_count(r.count),
                r.register_ms[0],
                r.register_ms[1],
                r.register_ms[2],
                r.not_live,
                r.per_sandbox[0],
                r.per_sandbox[2],
                r.per_sandbox[1],
                r.per_sandbox[3],
                r.traffic_sandboxes,
                fmt_count(r.requests),
                r.failures,
                r.remove_ms[0],
                r.remove_ms[1],
                r.agent_fds[0],
                r.agent_fds[1],
                r.took,
            );
        }
        Err(e) => {
            let _ = writeln!(md, "**Sandboxes:** did not finish: {e}");
        }
    }
    md
}
