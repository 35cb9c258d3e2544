//! The suite's report: docs/benchmarks.md and its PNG.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::fmt::{fmt_count, fmt_num};
use super::model::{
    IDLE_CONNS, LOADS, MAX_STEAL, MITM_PORT, NGINX_PORT, Options, ROWS, Row, RowData, idle_kib, med,
};
use super::passthrough::{PassData, Path3};
use super::scale::{Scale, soak_ok};
use crate::load::Load;
use crate::peers::HOST;

/// The run's figures, rendered as Markdown and a PNG.
pub(crate) struct Report<'a> {
    pub(crate) opts: &'a Options,
    pub(crate) data: &'a [RowData],
    pub(crate) pass: &'a PassData,
    pub(crate) scale: &'a Scale,
    pub(crate) loadavg: &'a [f64],
    pub(crate) steals: &'a [f64],
    pub(crate) took: Duration,
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

    pub(crate) fn markdown(&self) -> String {
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
            "| row | CPU-s per 1,000 h1 req | per 1,000 h2 req | per 1,000 h1 64 KiB req | per 1,000 new conns | RSS per idle TLS connection, KiB |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
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
            let name = if r == Row::Direct {
                "direct (the upstream nginx itself)"
            } else {
                r.name()
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {rss} |",
                cpu(Load::H1),
                cpu(Load::H2),
                cpu(Load::H1Big),
                cpu(Load::NewConn)
            );
        }
        md.push_str(&self.latency());
        md.push_str(&super::passthrough::markdown(self.pass));
        md.push_str(&super::scale::markdown(self.scale));
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
             `target/release/veil-bench suite --seconds {s} --runs {} --nginx-keepalive {ka} --nginx-workers {w} --bytes {} \
             --soak-connections {sc} --soak-sandboxes {ss} --soak-seconds {st} --soak-think-ms {tk} --sandboxes {nb} --sandbox-traffic {nt}`.\n\
             - Topology: a sandbox netns linked to an upstream netns (198.18.0.0/15); the upstream is Debian nginx (1 worker) answering `ok\\n` \
             on `/` and 64 KiB on `/64k`, over TLS 1.3 with h1 and h2. The client always runs in the sandbox's netns: outside its cgroup \
             for direct, nginx and mitmproxy (which listen in the upstream's netns, on ports {NGINX_PORT} and {MITM_PORT}), inside it for \
             veil (the eBPF redirect takes the connection to veil-agent, which intercepts because the secret allows `{HOST}`).\n\
             - Every request carries `x-api-key: <placeholder>` (direct: the value itself); veil, nginx (`proxy_set_header`) and the \
             mitmproxy addon put the value there.\n\
             - Keep-alive: `h2load -t1 -c16 --h1 -D {s}` and `h2load -t1 -c16 -m10 -D {s}` (h2); new connections: `h2load -t1 -c16 --h1 -n 3000 \
             -H 'Connection: close'` (600 for mitmproxy); cross-check `wrk -t1 -c16 -d{s}s`. Latency percentiles from h2load's per-request log.\n\
             - nginx proxy: `worker_processes {w}`, `listen … ssl http2`, `ssl_protocols TLSv1.2 TLSv1.3` (Debian's nginx 1.22 \
             offers TLS 1.2 only by default: clients would resume without a key exchange, which veil's TLS 1.3 never does), \
             `proxy_pass https://up` with `keepalive {ka}`, `proxy_http_version 1.1`, `proxy_ssl_verify on`, `proxy_ssl_session_reuse on`, `proxy_set_header x-api-key …`.\n\
             - veil-agent runs at its default log level (`RUST_LOG=info`: no line per connection), as nginx runs with `access_log off`.\n\
             - mitmproxy: `mitmdump --mode reverse:https://<upstream>:8443 -s addon.py --set ssl_verify_upstream_trusted_ca=…`; \
             the addon replaces the placeholder in `x-api-key`.\n\
             - CPU: user+system time of the proxy's process tree (veil-agent; nginx master and workers; mitmdump; for direct the \
             upstream nginx) over a measurement, divided by the requests served. RSS: growth of that tree's VmRSS with {IDLE_CONNS} \
             TLS connections held open (each answered one request first), divided by {IDLE_CONNS}; the largest of the runs (the \
             first, cold one: later runs reuse memory the allocator kept, so their growth understates the cost).\n\
             - Passthrough, interleaved in every run: bulk is {} MiB over plain TCP to a sink in the upstream netns (`veil-bench client-bulk`); \
             new connections are `veil-bench client-connrate --request` (8 threads for {s} s, each connecting, sending a plain \
             HTTP/1.1 request and reading the answer to EOF; the server closes first). Paths: direct (outside the cgroup), veil (inside the cgroup of the sandbox with the \
             secret: plain TCP is not intercepted, the agent splices it), and the secretless sandbox (a second sandbox with its own \
             netns and veth, no secret mounted, `egress: \"sandbox\"`, registered with the same agent).\n\
             - Soak (once, after the runs; `veil-bench soak` without the leak wait): {sc} concurrent TLS keep-alive connections through \
             the agent, spread over {ss} sandboxes (one client process each, at most 1,024 per sandbox: the agent's per-sandbox limit), \
             for {st} s; each request a random 0–64 KiB body the upstream echoes, then a random 0–{tk} ms think time (the point is {sc} \
             connections open and in use at once, not saturating 2 shared cores); every echoed byte is \
             compared (corrupted bytes: differing, missing or extra), the upstream checks the substituted value on every request. \
             RSS per connection: the agent's peak VmRSS during the soak minus before, divided by the connections.\n\
             - Sandboxes (once; `veil-bench sandboxes --count {nb} --traffic {nt}`): {nb} sandboxes, each a cgroup and its own netns \
             without a route out (registered `egress: \"host\"`) with the secret mounted, registered one after another; registration \
             is `PUT /api/sandbox/{{id}}` until it answers (it answers once the redirect is live), each then checked with a TCP \
             connection that must arrive through the agent. Memory per sandbox: VmRSS and open fds of the agent and of control after \
             all registrations minus before, divided by {nb}. Traffic: one `client-soak` connection for 1 s in each of {nt} sandboxes \
             picked at random (echoed bodies compared, upstream checks the value); then every sandbox is removed (`DELETE`).",
            o.runs,
            o.bulk_bytes,
            o.bulk_bytes >> 20,
            s = o.seconds,
            ka = o.nginx_keepalive,
            w = o.nginx_workers,
            sc = o.soak_connections,
            ss = o.soak_sandboxes,
            st = o.soak_seconds,
            tk = o.soak_think_ms,
            nb = o.sandboxes,
            nt = o.sandbox_traffic,
        );
        md
    }

    /// p99 latency of every row on every load (the goal: veil's no worse than nginx's).
    fn latency(&self) -> String {
        let mut md = String::from("\n## Latency p99, ms (h2load's per-request log)\n\n| row |");
        for l in LOADS {
            let _ = write!(md, " {} |", l.name());
        }
        md.push_str("\n|---|");
        md.push_str(&"---|".repeat(LOADS.len()));
        md.push('\n');
        for r in ROWS {
            let d = self.row(r);
            let _ = write!(md, "| {} |", r.name());
            for l in LOADS {
                let _ = write!(
                    md,
                    " {} |",
                    d.median(l, |s| s.r.p99_ms)
                        .map_or("—".into(), |p| format!("{p:.2}"))
                );
            }
            md.push('\n');
        }
        md
    }

    /// The goals of issue 19, each measured in this run: met or **not met**.
    fn goals(&self) -> String {
        let v = self.row(Row::Veil);
        let d = self.row(Row::Direct);
        let n = self.row(Row::Nginx);
        let o = self.opts;
        let rps = |r: &RowData, l: Load| r.median(l, |s| s.r.rps).unwrap_or(f64::NAN);
        let cpu = |r: &RowData, l: Load| r.median(l, |s| s.cpu_per_1k).unwrap_or(f64::NAN);
        let p99 = |r: &RowData, l: Load| r.median(l, |s| s.r.p99_ms).unwrap_or(f64::NAN);
        let mark = |ok: bool| if ok { "met" } else { "**not met**" };
        let mut g = String::from("\n## Goals (issue 19)\n\n| goal | measured | |\n|---|---|---|\n");
        let mut line = |goal: &str, measured: String, ok: bool| {
            let _ = writeln!(g, "| {goal} | {measured} | {} |", mark(ok));
        };
        line(
            "new intercepted TLS connections/s ≥ nginx",
            format!(
                "{} vs {} ({:.2}×)",
                fmt_num(rps(v, Load::NewConn)),
                fmt_num(rps(n, Load::NewConn)),
                rps(v, Load::NewConn) / rps(n, Load::NewConn)
            ),
            rps(v, Load::NewConn) >= rps(n, Load::NewConn),
        );
        line(
            "CPU per 1,000 new connections ≤ nginx",
            format!(
                "{:.4} vs {:.4} CPU-s ({:.2}×)",
                cpu(v, Load::NewConn),
                cpu(n, Load::NewConn),
                cpu(v, Load::NewConn) / cpu(n, Load::NewConn)
            ),
            cpu(v, Load::NewConn) <= cpu(n, Load::NewConn),
        );
        for (l, name) in [(Load::H1, "h1"), (Load::H2, "h2")] {
            line(
                &format!("CPU per 1,000 {name} requests ≤ 0.9× nginx"),
                format!(
                    "{:.4} vs {:.4} CPU-s ({:.2}×)",
                    cpu(v, l),
                    cpu(n, l),
                    cpu(v, l) / cpu(n, l)
                ),
                cpu(v, l) <= 0.9 * cpu(n, l),
            );
        }
        line(
            "h2 req/s ≥ nginx",
            format!(
                "{} vs {} ({:.2}×)",
                fmt_num(rps(v, Load::H2)),
                fmt_num(rps(n, Load::H2)),
                rps(v, Load::H2) / rps(n, Load::H2)
            ),
            rps(v, Load::H2) >= rps(n, Load::H2),
        );
        for (l, name, goal) in [(Load::H1, "h1 keep-alive", 0.55), (Load::H2, "h2", 0.45)] {
            line(
                &format!("{name} ≥ {goal}× direct"),
                format!("{:.2}×", rps(v, l) / rps(d, l)),
                rps(v, l) >= goal * rps(d, l),
            );
        }
        for l in LOADS {
            line(
                &format!("p99 ≤ nginx's, {}", l.name()),
                format!("{:.2} vs {:.2} ms", p99(v, l), p99(n, l)),
                p99(v, l) <= p99(n, l),
            );
        }
        let p = self.pass;
        let (bulk, conns) = p.ratios(Path3::Veil);
        line(
            "passthrough bulk ≥ 0.9× direct",
            format!("{bulk:.2}×"),
            bulk >= 0.9,
        );
        line(
            "new passthrough connections ≥ 0.8× direct",
            format!("{conns:.2}×"),
            conns >= 0.8,
        );
        let (bulk, conns) = p.ratios(Path3::Secretless);
        line(
            "secretless sandbox ≥ 0.97× direct, bulk",
            format!("{bulk:.2}×"),
            bulk >= 0.97,
        );
        line(
            "secretless sandbox ≥ 0.97× direct, new connections",
            format!("{conns:.2}×"),
            conns >= 0.97,
        );
        match &self.scale.soak {
            Ok(r) => line(
                &format!(
                    "{} concurrent intercepted connections, 0 corrupted bytes",
                    fmt_count(o.soak_connections)
                ),
                format!(
                    "{} over {} sandboxes: {} corrupted bytes, {} failed; {:.1} KiB agent RSS per connection",
                    fmt_count(r.connections),
                    r.sandboxes,
                    r.corrupted(),
                    r.failed(),
                    r.kib_per_conn()
                ),
                soak_ok(self.scale, o),
            ),
            Err(e) => line(
                &format!(
                    "{} concurrent intercepted connections, 0 corrupted bytes",
                    fmt_count(o.soak_connections)
                ),
                format!("did not finish: {}", e.replace('|', "/")),
                false,
            ),
        }
        let goal = format!(
            "{} sandboxes: registration p50/p99, memory per sandbox, traffic through {} at random",
            fmt_count(o.sandboxes),
            o.sandbox_traffic
        );
        match &self.scale.sandboxes {
            Ok(r) => line(
                &goal,
                format!(
                    "p50 {:.1} / p99 {:.1} ms; {:.1} KiB agent + {:.1} KiB control per sandbox; {} requests, {} failures",
                    r.register_ms[0],
                    r.register_ms[1],
                    r.per_sandbox[0],
                    r.per_sandbox[1],
                    r.requests,
                    r.failures
                ),
                r.ok(),
            ),
            Err(e) => line(
                &goal,
                format!("did not finish: {}", e.replace('|', "/")),
                false,
            ),
        }
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
    pub(crate) fn plot(&self, png: &Path) -> Result<()> {
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
