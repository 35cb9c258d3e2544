//! Prometheus metrics: request counts and latencies by route and status, plus gauges of what the
//! store holds, served as text on a separate loopback listener (`metrics_listen`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use veil_sys::prometheus::escape_label as escape;

/// Upper bounds (seconds) of the request latency histogram buckets.
const BUCKETS: [f64; 10] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// One route's latency histogram.
#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Request metrics, updated by the HTTP middleware.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// (method, route template, status) → count.
    requests: BTreeMap<(String, String, u16), u64>,
    /// route template → latency histogram.
    latency: BTreeMap<String, Histogram>,
}

/// Point-in-time values read from the store and the agent link at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Secrets across all organizations.
    pub secrets: u64,
    /// Registered sandboxes.
    pub sandboxes: u64,
    /// Whether at least one agent is linked.
    pub agent_connected: bool,
}

impl Metrics {
    /// Counts one request; `route` is the matched route template (never a raw path, whose ids
    /// would explode the label set).
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *inner
            .requests
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        let h = inner.latency.entry(route.to_owned()).or_default();
        let secs = elapsed.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(h.counts.iter_mut()) {
            if secs <= *bound {
                *count += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, gauges: Gauges) -> String {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        out.push_str(
            "# HELP veil_control_http_requests_total REST requests by route and status.\n",
        );
        out.push_str("# TYPE veil_control_http_requests_total counter\n");
        for ((method, route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "veil_control_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP veil_control_http_request_duration_seconds REST request latency.\n");
        out.push_str("# TYPE veil_control_http_request_duration_seconds histogram\n");
        for (route, h) in &inner.latency {
            let route = escape(route);
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "veil_control_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "veil_control_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}\n\
                 veil_control_http_request_duration_seconds_sum{{route=\"{route}\"}} {}\n\
                 veil_control_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut out,
            "veil_control_secrets",
            "Secrets stored, all organizations.",
            gauges.secrets,
        );
        gauge(
            &mut out,
            "veil_control_sandboxes",
            "Registered sandboxes.",
            gauges.sandboxes,
        );
        gauge(
            &mut out,
            "veil_control_agent_connected",
            "1 when a veil-agent is linked.",
            u64::from(gauges.agent_connected),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.observe(
            "GET",
            "/api/secret/{secretId}",
            200,
            Duration::from_millis(3),
        );
        m.observe(
            "GET",
            "/api/secret/{secretId}",
            200,
            Duration::from_millis(30),
        );
        m.observe("POST", "/api/secret", 409, Duration::from_micros(100));
        let text = m.render(Gauges {
            secrets: 5,
            sandboxes: 2,
            agent_connected: true,
        });
        assert!(text.contains(
            "veil_control_http_requests_total{method=\"GET\",route=\"/api/secret/{secretId}\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "veil_control_http_request_duration_seconds_bucket{route=\"/api/secret/{secretId}\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "veil_control_http_request_duration_seconds_bucket{route=\"/api/secret/{secretId}\",le=\"0.05\"} 2"
        ));
        assert!(
            text.contains(
                "veil_control_http_request_duration_seconds_count{route=\"/api/secret\"} 1"
            )
        );
        assert!(text.contains("veil_control_secrets 5\n"));
        assert!(text.contains("veil_control_agent_connected 1\n"));
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}
