//! Prometheus text exposition of the agent's counters on a loopback listener
//! (`agent.metrics_listen`): connections by decision, requests, substitutions by secret and
//! outcome, scrubs, blocks, errors, latency histograms, a few gauges, and the eBPF programs'
//! counters (`veil_agent_kernel_events_total{event=…}`, read from the pinned stats map).
//!
//! Every counter of [`Stats::counters`] is rendered, whatever it is called, so a counter added
//! there shows up here without a change. The page carries counts only, never a value or a
//! placeholder; secret ids (opaque, bounded by the number of secrets) are the only labels that
//! come from control.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use veil_sys::prometheus::escape_label as escape;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use proxy_common::{STAT_COUNT, STAT_NAMES};

use crate::pins::PinLayout;
use crate::secrets::SecretStore;
use crate::stats::{BUCKETS, Histogram, Stats};

/// Prefix of every metric name.
const PREFIX: &str = "veil_agent_";
/// Counters named `passthrough_<reason>` become one family labelled by reason.
const PASSTHROUGH: &str = "passthrough_";
/// Content type of the Prometheus text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the metrics endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The configured address is not a loopback address.
    #[error(
        "agent.metrics_listen {0} is not a loopback address: the metrics endpoint has no \
         authentication, so it listens on 127.0.0.1 or ::1 only"
    )]
    NotLoopback(SocketAddr),
}

/// Values read at scrape time from outside [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Sandboxes whose redirect is attached (pinned in bpffs).
    pub sandboxes: u64,
    /// Secrets held in memory.
    pub secrets: u64,
    /// The eBPF programs' counters (indexed like `proxy_common::STAT_NAMES`), when readable.
    pub kernel: Option<[u64; STAT_COUNT as usize]>,
}

/// Where the endpoint reads its numbers.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The data path's counters.
    pub stats: Arc<Stats>,
    /// The secrets control sent.
    pub secrets: SecretStore,
    /// The pin layout, whose sandbox directories are the attached sandboxes.
    pub pins: PinLayout,
}

impl Sources {
    fn gauges(&self) -> Gauges {
        Gauges {
            sandboxes: self.pins.pinned_cgroups().map_or(0, |ids| ids.len() as u64),
            secrets: self.secrets.len() as u64,
            kernel: crate::bpf::pinned_stats(&self.pins),
        }
    }
}

/// Refuses a non-loopback address (the endpoint has no authentication).
pub fn check_listen(addr: SocketAddr) -> Result<(), MetricsError> {
    if addr.ip().to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(MetricsError::NotLoopback(addr))
    }
}

/// Binds `addr` and serves `GET /metrics` until the runtime stops; returns the task and the
/// bound address. A bind failure (the port is taken) is logged, not fatal: metrics must not
/// keep sandboxes from being served.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
) -> Result<Option<(tokio::task::JoinHandle<()>, SocketAddr)>, MetricsError> {
    check_listen(addr)?;
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(listen = %addr, error = %e, "metrics endpoint off: cannot bind");
            return Ok(None);
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    info!(listen = %local, "metrics endpoint ready");
    let sources = Arc::new(sources);
    Ok(Some((tokio::spawn(accept_loop(listener, sources)), local)))
}

async fn accept_loop(listener: TcpListener, sources: Arc<Sources>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(answer(&req, &sources)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "metrics connection");
            }
        });
    }
}

fn answer(req: &Request<Incoming>, sources: &Sources) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(CONTENT_TYPE),
        );
        resp
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            reply(StatusCode::OK, render(&sources.stats, sources.gauges()))
        }
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET /metrics\n".to_owned(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "see /metrics\n".to_owned()),
    }
}

/// The Prometheus text exposition of `stats` and `gauges`.
pub fn render(stats: &Stats, gauges: Gauges) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let _ = writeln!(
        out,
        "# HELP {PREFIX}build_info veil-agent's version.\n# TYPE {PREFIX}build_info gauge\n\
         {PREFIX}build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );

    let counters = stats.counters();
    let (passthrough, others): (Vec<_>, Vec<_>) = counters
        .iter()
        .partition(|(name, _, _)| name.starts_with(PASSTHROUGH));
    if !passthrough.is_empty() {
        let family = format!("{PREFIX}passthrough_total");
        let _ = writeln!(
            out,
            "# HELP {family} Connections passed through untouched, by reason.\n\
             # TYPE {family} counter"
        );
        for (name, _, value) in &passthrough {
            let reason = &name[PASSTHROUGH.len()..];
            let _ = writeln!(out, "{family}{{reason=\"{}\"}} {value}", escape(reason));
        }
    }
    for (name, help, value) in &others {
        let family = counter_name(name);
        let _ = writeln!(
            out,
            "# HELP {family} {}\n# TYPE {family} counter\n{family} {value}",
            help_text(help)
        );
    }

    gauge(
        &mut out,
        "active_connections",
        "Sandbox connections open right now.",
        stats.active.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "sandboxes",
        "Sandboxes whose redirect is attached (pinned in bpffs).",
        gauges.sandboxes,
    );
    gauge(
        &mut out,
        "secrets",
        "Secrets held in memory.",
        gauges.secrets,
    );
    if let Some(kernel) = gauges.kernel {
        let family = format!("{PREFIX}kernel_events_total");
        let _ = writeln!(
            out,
            "# HELP {family} Events counted by veil's eBPF programs, by event.\n\
             # TYPE {family} counter"
        );
        for (name, value) in STAT_NAMES.iter().zip(kernel) {
            let _ = writeln!(out, "{family}{{event=\"{name}\"}} {value}");
        }
    }

    histogram(
        &mut out,
        "request_seconds",
        "Intercepted requests: arrival to upstream response head.",
        &stats.request_seconds,
    );
    histogram(
        &mut out,
        "client_handshake_seconds",
        "TLS handshakes of sandbox clients with veil.",
        &stats.client_handshake_seconds,
    );

    let mut hits: Vec<_> = stats
        .secret_hits
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(id, usage)| (id.clone(), *usage))
        .collect();
    hits.sort_by(|a, b| a.0.cmp(&b.0));
    let family = format!("{PREFIX}secret_placeholders_total");
    let _ = writeln!(
        out,
        "# HELP {family} Placeholders seen in intercepted requests, by secret id and outcome.\n\
         # TYPE {family} counter"
    );
    for (id, usage) in &hits {
        let id = escape(id);
        for (outcome, n) in [
            ("substituted", usage.substituted),
            ("wrong_host", usage.wrong_host),
            ("host_mismatch", usage.host_mismatch),
            ("blocked", usage.blocked),
        ] {
            let _ = writeln!(out, "{family}{{secret=\"{id}\",outcome=\"{outcome}\"}} {n}");
        }
    }
    out
}

/// `veil_agent_<name>_total` (without doubling a `_total` the name already has).
fn counter_name(name: &str) -> String {
    let name = name.strip_suffix("_total").unwrap_or(name);
    format!("{PREFIX}{name}_total")
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {PREFIX}{name} {help}\n# TYPE {PREFIX}{name} gauge\n{PREFIX}{name} {value}"
    );
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let (cumulative, count, sum) = h.snapshot();
    let family = format!("{PREFIX}{name}");
    let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} histogram");
    for (bound, n) in BUCKETS.iter().zip(cumulative) {
        let _ = writeln!(out, "{family}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "{family}_bucket{{le=\"+Inf\"}} {count}\n{family}_sum {sum}\n{family}_count {count}"
    );
}

/// HELP text escaping: backslash and newline.
fn help_text(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every sample line of `text` as (name with labels, value).
    fn samples(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect()
    }

    fn value(text: &str, key: &str) -> Option<f64> {
        samples(text)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    #[test]
    fn renders_every_counter_once_with_help_and_type() {
        let stats = Stats::default();
        Stats::inc(&stats.requests);
        Stats::inc(&stats.requests);
        Stats::inc(&stats.passthrough_not_tls);
        let text = render(&stats, Gauges::default());
        assert_eq!(value(&text, "veil_agent_requests_total"), Some(2.0));
        assert_eq!(
            value(&text, "veil_agent_passthrough_total{reason=\"not_tls\"}"),
            Some(1.0)
        );
        for (name, _, _) in stats.counters() {
            let key = match name.strip_prefix(PASSTHROUGH) {
                Some(reason) => format!("veil_agent_passthrough_total{{reason=\"{reason}\"}}"),
                None => counter_name(name),
            };
            let n = samples(&text).iter().filter(|(k, _)| *k == key).count();
            assert_eq!(n, 1, "{key} appears {n} times in\n{text}");
        }
        // Each family is declared exactly once, and every sample belongs to a declared family.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let mut unique = declared.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), declared.len(), "a family is declared twice");
        for (key, _) in samples(&text) {
            let base = key.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| base.strip_suffix(s).filter(|f| declared.contains(f)))
                .unwrap_or(base);
            assert!(declared.contains(&family), "{key} has no # TYPE");
            assert!(key.starts_with(PREFIX), "{key}");
        }
    }

    #[test]
    fn counters_end_in_total_and_gauges_do_not() {
        let text = render(&Stats::default(), Gauges::default());
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = line.split_once(' ').unwrap();
            assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
        }
        assert_eq!(counter_name("x_total"), "veil_agent_x_total");
    }

    #[test]
    fn histograms_are_cumulative_with_count_and_sum() {
        let stats = Stats::default();
        stats.request_seconds.observe(Duration::from_micros(300));
        stats.request_seconds.observe(Duration::from_millis(20));
        stats.request_seconds.observe(Duration::from_secs(60));
        let text = render(&stats, Gauges::default());
        let b = |le: &str| {
            value(
                &text,
                &format!("veil_agent_request_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(b("0.0005"), Some(1.0));
        assert_eq!(b("0.01"), Some(1.0));
        assert_eq!(b("0.025"), Some(2.0));
        assert_eq!(b("10"), Some(2.0));
        assert_eq!(b("+Inf"), Some(3.0));
        assert_eq!(value(&text, "veil_agent_request_seconds_count"), Some(3.0));
        let sum = value(&text, "veil_agent_request_seconds_sum").unwrap();
        assert!((sum - 60.0203).abs() < 1e-6, "{sum}");
        assert_eq!(
            value(&text, "veil_agent_client_handshake_seconds_count"),
            Some(0.0)
        );
    }

    #[test]
    fn gauges_and_per_secret_outcomes() {
        let stats = Stats::default();
        stats.record_blocked("sb1", "evil.example", "sec-\"1");
        let text = render(
            &stats,
            Gauges {
                sandboxes: 3,
                secrets: 7,
                kernel: Some([0, 0, 0, 0, 0, 4, 0, 9]),
            },
        );
        assert_eq!(
            value(
                &text,
                "veil_agent_kernel_events_total{event=\"guarded_refused\"}"
            ),
            Some(4.0)
        );
        assert_eq!(
            value(
                &text,
                "veil_agent_kernel_events_total{event=\"redirected\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&text, "veil_agent_kernel_events_total{event=\"direct\"}"),
            Some(9.0)
        );
        assert_eq!(value(&text, "veil_agent_sandboxes"), Some(3.0));
        assert_eq!(value(&text, "veil_agent_secrets"), Some(7.0));
        assert_eq!(value(&text, "veil_agent_active_connections"), Some(0.0));
        assert_eq!(value(&text, "veil_agent_blocked_total"), Some(1.0));
        assert_eq!(
            value(
                &text,
                "veil_agent_secret_placeholders_total{secret=\"sec-\\\"1\",outcome=\"blocked\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "veil_agent_secret_placeholders_total{secret=\"sec-\\\"1\",outcome=\"substituted\"}"
            ),
            Some(0.0)
        );
        assert!(!text.contains("evil.example"), "hosts are not labels");
        assert!(!text.contains("sb1"), "sandboxes are not labels");
    }

    #[test]
    fn only_loopback_addresses_are_accepted() {
        for ok in [
            "127.0.0.1:9465",
            "127.0.0.2:1",
            "[::1]:9465",
            "[::ffff:127.0.0.1]:9",
        ] {
            assert!(check_listen(ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "0.0.0.0:9465",
            "198.18.0.1:9465",
            "[::]:9465",
            "[fd76:6569:6c::1]:1",
        ] {
            let err = check_listen(bad.parse().unwrap()).unwrap_err();
            assert!(err.to_string().contains("loopback"), "{err}");
        }
    }
}
