//! Server-sent events through interception (issue 20): the upstream sends event i+1 only after
//! the client acknowledged event i (a request of its own, through veil too), so an event veil
//! held back would stall the stream. Python httpx and curl (`-N`) in a sandbox, over HTTP/1.1
//! and h2; every event carries the value (literal and base64), which the sandbox never sees.

use serde_json::json;
use veil_tests::clients::python_clients;
use veil_tests::control::random_token;
use veil_tests::intercept_world::{InterceptWorld, run_text};
use veil_tests::sse_upstream::SseUpstream;

const ALLOWED: &str = "api.allowed.test";
const EVENTS: usize = 20;

const CLIENT: &str = r#"
import json, os, sys, httpx
base, count, h2 = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "h2"
got, version = [], None
with httpx.Client(http2=h2, timeout=60) as c:
    with c.stream("GET", base + "/events?n=%d" % count,
                  headers={"authorization": "Bearer " + os.environ["K"]}) as r:
        version = r.http_version
        buf = b""
        for chunk in r.iter_raw():
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                got.append(ev.decode())
                c.get(base + "/ack?n=%d" % (len(got) - 1))
print(json.dumps({"version": version, "events": got}))
"#;

#[test]
fn each_event_reaches_the_client_before_the_upstream_sends_the_next_over_h1_and_h2() {
    let value = format!("sk-test-{}", random_token(40));
    let v = value.clone();
    let mut w = InterceptWorld::builder("sse test CA", &[ALLOWED])
        .start_with(move |ns, ip, ca, names| SseUpstream::start(ns, ip, ca, names, v));
    let key = w.secret_valued("sse-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("sse", &[("K", "sse-key")]);
    let python = python_clients();
    let base = w.url(ALLOWED, "");
    for (proto, want) in [("h1", "HTTP/1.1"), ("h2", "HTTP/2")] {
        let mut cmd = w.command(sb, python.to_str().expect("path"));
        cmd.args(["-c", CLIENT, &base, &EVENTS.to_string(), proto])
            .env("K", &key.placeholder);
        let (ok, out) = run_text(&mut cmd);
        let out = out.replace(&value, "<VALUE!>");
        assert!(ok, "{proto}: {out}");
        assert!(
            !out.contains("<VALUE!>"),
            "{proto}: the value reached the sandbox: {out}"
        );
        let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_default();
        let res: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        assert_eq!(res["version"], want, "{proto}: {out}");
        let events: Vec<&str> = res["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str())
            .collect();
        assert!(
            !events.iter().any(|e| e.contains("stalled")),
            "{proto}: an event was held back: {out}"
        );
        assert_eq!(events.len(), EVENTS, "{proto}: {out}");
        for (i, e) in events.iter().enumerate() {
            assert!(e.starts_with(&format!("id: {i}\n")), "{proto}: {out}");
            assert!(
                e.contains(&key.placeholder),
                "{proto}: event {i} not scrubbed: {out}"
            );
        }
    }
}

/// curl `-N` consumes the stream; the shell reading its output acks each event (with curl too)
/// and prints it followed by `<END>`; curl's `%{http_version}` comes last.
const CURL_CLIENT: &str = r#"
base=$1; n=$2; proto=$3
curl -sSN "$proto" --max-time 60 -H "authorization: Bearer $K" \
    -w '\nversion=%{http_version}\n' "$base/events?n=$n" | {
  i=0; ev=""
  while IFS= read -r line; do
    if [ -z "$line" ]; then
      [ -z "$ev" ] && continue
      printf '%s<END>\n' "$ev"; ev=""
      curl -sS "$proto" --max-time 20 -o /dev/null "$base/ack?n=$i" || echo "ack $i failed"
      i=$((i+1))
    else
      ev="$ev$line
"
    fi
  done
  printf '%s' "$ev"
}
"#;

#[test]
fn curl_gets_each_event_before_the_upstream_sends_the_next_over_h1_and_h2() {
    let value = format!("sk-test-{}", random_token(40));
    let v = value.clone();
    let mut w = InterceptWorld::builder("sse curl test CA", &[ALLOWED])
        .start_with(move |ns, ip, ca, names| SseUpstream::start(ns, ip, ca, names, v));
    let key = w.secret_valued("sse-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("sse-curl", &[("K", "sse-key")]);
    let base = w.url(ALLOWED, "");
    for (proto, want) in [("--http1.1", "version=1.1"), ("--http2", "version=2")] {
        let mut cmd = w.command(sb, "bash");
        cmd.args(["-c", CURL_CLIENT, "sse", &base, &EVENTS.to_string(), proto])
            .env("K", &key.placeholder);
        let (ok, out) = run_text(&mut cmd);
        let out = out.replace(&value, "<VALUE!>");
        assert!(ok, "{proto}: {out}");
        assert!(
            !out.contains("<VALUE!>"),
            "{proto}: the value reached the sandbox: {out}"
        );
        assert!(out.contains(want), "{proto}: {out}");
        assert!(!out.contains("failed"), "{proto}: {out}");
        let events: Vec<&str> = out
            .split("<END>\n")
            .filter(|e| e.contains("id: "))
            .collect();
        assert!(
            !events.iter().any(|e| e.contains("stalled")),
            "{proto}: an event was held back: {out}"
        );
        assert_eq!(events.len(), EVENTS, "{proto}: {out}");
        for (i, e) in events.iter().enumerate() {
            assert!(e.starts_with(&format!("id: {i}\n")), "{proto}: {out}");
            assert!(
                e.contains(&key.placeholder),
                "{proto}: event {i} not scrubbed: {out}"
            );
        }
    }
}
