//! WebSocket through interception (issue 20): real clients in a sandbox — Python `websockets`
//! and Node `ws` — against a real `wss` upstream that authenticates with the substituted
//! `Authorization` and answers with the value in every encoding the scrubber covers, whole and
//! split across fragments, in a close reason too. The sandbox never receives the value; the
//! upstream got it from the upgrade request. Client messages get substitution only for a secret
//! with `bodySubstitution`.

use serde_json::json;
use veil_tests::adversary::encodings;
use veil_tests::control::random_token;
use veil_tests::intercept_world::InterceptWorld;
use veil_tests::ws_clients::{WsClient, WsRun, run_client};
use veil_tests::ws_upstream::WsUpstream;

const ALLOWED: &str = "api.allowed.test";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn world(value: &str) -> InterceptWorld<WsUpstream> {
    let value = value.to_owned();
    InterceptWorld::builder("websocket test CA", &[ALLOWED])
        .metrics()
        .start_with(move |ns, ip, ca, names| WsUpstream::start(ns, ip, ca, names, value))
}

fn url(w: &InterceptWorld<WsUpstream>) -> String {
    format!("wss://{ALLOWED}:{}/ws", w.up.addr().port())
}

/// The value reached neither the payloads nor the close reason, in any encoding.
fn assert_scrubbed(run: &WsRun, value: &str, who: &str) {
    let all = run.all_bytes();
    assert!(
        !contains(&all, value.as_bytes()),
        "{who}: the value reached the sandbox: {run:?}"
    );
    for (name, enc) in encodings(value.as_bytes()) {
        assert!(
            !contains(&all, &enc),
            "{who}: the value reached the sandbox as {name}: {run:?}"
        );
    }
}

#[test]
fn python_and_node_clients_get_the_value_upstream_and_never_back() {
    let value = format!("sk-test-{}", random_token(40));
    let mut w = world(&value);
    let key = w.secret_valued("ws-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("ws-clients", &[("K", "ws-key")]);
    let forms = encodings(value.as_bytes()).len();
    for client in [WsClient::Python, WsClient::Node] {
        let before = w.up.seen();
        let run = run_client(
            &w,
            sb,
            client,
            &url(&w),
            &key.placeholder,
            &["leak", "hello", "close"],
            &[&value],
        );
        assert_eq!(run.error, None, "{client:?}: {run:?}");
        assert_scrubbed(&run, &value, &format!("{client:?}"));
        let texts = run.texts();
        assert!(texts.iter().any(|t| t == "done"), "{client:?}: {run:?}");
        // Every encoded echo arrived (scrubbed to the placeholder, or to its encoding for
        // hex and base64), then the raw value, two fragmented messages, `done` and `hello`.
        assert_eq!(run.messages.len(), forms + 5, "{client:?}: {run:?}");
        let placeholders = run
            .messages
            .iter()
            .filter(|m| contains(&m.1, key.placeholder.as_bytes()))
            .count();
        assert!(
            placeholders > forms / 2,
            "{client:?}: {placeholders} of {forms} forms: {run:?}"
        );
        // The value split across three fragments of a text and of a binary message.
        assert!(
            texts.contains(&format!("frag:{}", key.placeholder)),
            "{client:?}: {run:?}"
        );
        assert!(
            run.messages
                .iter()
                .filter(|m| !m.0 && m.1 == key.placeholder.as_bytes())
                .count()
                >= 2,
            "{client:?}: the binary messages (whole and fragmented) are not the placeholder: {run:?}"
        );
        assert!(texts.contains(&"hello".to_owned()), "{client:?}: {run:?}");
        let (code, reason) = run.close.clone().expect("the close frame");
        assert_eq!(code, 1000, "{client:?}");
        assert_eq!(
            reason,
            format!("bye {}", key.placeholder).into_bytes(),
            "{client:?}"
        );
        let after = w.up.seen();
        assert_eq!(
            after.authorized,
            before.authorized + 1,
            "{client:?}: {after:?}"
        );
        assert_eq!(after.upgrades, before.upgrades + 1, "{client:?}: {after:?}");
        // Both clients offer permessage-deflate; veil removed the offer.
        assert_eq!(after.offered_extensions, 0, "{client:?}: {after:?}");
    }
    assert!(w.counter("websocket_relayed") >= 2.0);
    assert!(w.counter("scrubbed") >= 2.0 * forms as f64);
}

/// The h2 WebSocket echo world: the upstream speaks h2 and enables extended CONNECT when
/// `extended_connect`.
fn h2_world(value: &str, extended_connect: bool) -> InterceptWorld<WsUpstream> {
    let value = value.to_owned();
    InterceptWorld::builder("websocket h2 test CA", &[ALLOWED])
        .metrics()
        .start_with(move |ns, ip, ca, names| {
            WsUpstream::start_h2(ns, ip, ca, names, value, extended_connect)
        })
}

/// `leak`, `hello`, `close` arrived scrubbed: every form, the fragmented messages, the close
/// reason as the placeholder.
fn assert_leak_hello_close(run: &WsRun, value: &str, placeholder: &str, who: &str) {
    let forms = encodings(value.as_bytes()).len();
    assert_eq!(run.error, None, "{who}: {run:?}");
    assert_scrubbed(run, value, who);
    let texts = run.texts();
    assert_eq!(run.messages.len(), forms + 5, "{who}: {run:?}");
    assert!(
        texts.contains(&format!("frag:{placeholder}")),
        "{who}: {run:?}"
    );
    assert!(
        run.messages
            .iter()
            .filter(|m| !m.0 && m.1 == placeholder.as_bytes())
            .count()
            >= 2,
        "{who}: the binary messages are not the placeholder: {run:?}"
    );
    assert!(texts.contains(&"hello".to_owned()), "{who}: {run:?}");
    let (code, reason) = run.close.clone().expect("the close frame");
    assert_eq!(code, 1000, "{who}");
    assert_eq!(reason, format!("bye {placeholder}").into_bytes(), "{who}");
}

#[test]
fn an_h2_client_opens_the_websocket_by_extended_connect_and_never_gets_the_value() {
    let value = format!("sk-test-{}", random_token(40));
    let mut w = h2_world(&value, true);
    let key = w.secret_valued("ws-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("ws-h2", &[("K", "ws-key")]);
    let run = run_client(
        &w,
        sb,
        WsClient::RustH2,
        &url(&w),
        &key.placeholder,
        &["leak", "hello", "close"],
        &[&value],
    );
    assert_eq!(run.fallback, None, "{run:?}");
    assert_leak_hello_close(&run, &value, &key.placeholder, "h2");
    let seen = w.up.seen();
    // Over h2 on both sides, authorized by the substituted value, extension offer removed.
    assert_eq!((seen.h2, seen.authorized), (1, 1), "{seen:?}");
    assert_eq!(seen.offered_extensions, 0, "{seen:?}");
    assert!(w.counter("websocket_relayed") >= 1.0);
}

#[test]
fn an_upstream_without_extended_connect_makes_the_h2_client_fall_back_to_http1() {
    let value = format!("sk-test-{}", random_token(40));
    let mut w = h2_world(&value, false);
    let key = w.secret_valued("ws-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("ws-h2-fallback", &[("K", "ws-key")]);
    let run = run_client(
        &w,
        sb,
        WsClient::RustH2,
        &url(&w),
        &key.placeholder,
        &["leak", "hello", "close"],
        &[&value],
    );
    // veil advertised extended CONNECT, the upstream reset the stream; the client's stream was
    // reset with HTTP_1_1_REQUIRED and it opened the WebSocket again over HTTP/1.1.
    assert_eq!(
        run.fallback.as_deref(),
        Some("HTTP_1_1_REQUIRED"),
        "{run:?}"
    );
    assert_leak_hello_close(&run, &value, &key.placeholder, "h2 → h1 fallback");
    let seen = w.up.seen();
    assert_eq!((seen.h2, seen.authorized), (0, 1), "{seen:?}");
    assert!(w.counter("upgrade_refused") >= 1.0);
}

#[test]
fn client_messages_are_substituted_only_with_body_substitution() {
    let value = format!("sk-test-{}", random_token(40));
    let mut w = world(&value);
    // Same value, two secrets: only the second substitutes bodies (and so messages).
    let plain = w.secret_valued("ws-plain", value.clone(), &[ALLOWED], json!({}));
    let body = w.secret_valued(
        "ws-body",
        value.clone(),
        &[ALLOWED],
        json!({"bodySubstitution": true}),
    );
    let sb = w.add_sandbox("ws-subst", &[("K", "ws-plain"), ("B", "ws-body")]);
    let without = format!("{{\"key\": \"{}\"}}", plain.placeholder);
    let with = format!("{{\"key\": \"{}\"}}", body.placeholder);
    let run = run_client(
        &w,
        sb,
        WsClient::Python,
        &url(&w),
        &plain.placeholder,
        &[&without, &with],
        &[&value],
    );
    assert_eq!(run.error, None, "{run:?}");
    assert_scrubbed(&run, &value, "python");
    let seen = w.up.seen();
    assert!(
        seen.messages.iter().any(|m| m == without.as_bytes()),
        "the placeholder of a secret without bodySubstitution must reach the upstream unchanged: {seen:?}"
    );
    let substituted = format!("{{\"key\": \"{value}\"}}");
    assert!(
        seen.messages.iter().any(|m| m == substituted.as_bytes()),
        "a bodySubstitution secret's placeholder must reach the upstream as its value: {seen:?}"
    );
    // The upstream echoes the value back: the sandbox gets a placeholder of that value.
    let texts = run.texts();
    assert_eq!(texts.len(), 2, "{run:?}");
    assert!(
        texts
            .iter()
            .all(|t| t.contains(&plain.placeholder) || t.contains(&body.placeholder)),
        "{run:?}"
    );
}

#[test]
fn an_idle_websocket_is_closed_with_1001() {
    let value = format!("sk-test-{}", random_token(40));
    let v = value.clone();
    let mut w = InterceptWorld::builder("websocket idle CA", &[ALLOWED])
        .metrics()
        .config("websocket_idle_timeout_ms = 500\n")
        .start_with(move |ns, ip, ca, names| WsUpstream::start(ns, ip, ca, names, v));
    let key = w.secret_valued("ws-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("ws-idle", &[("K", "ws-key")]);
    let run = run_client(
        &w,
        sb,
        WsClient::Python,
        &url(&w),
        &key.placeholder,
        &["hello", "wait"],
        &[&value],
    );
    assert_eq!(run.error, None, "{run:?}");
    assert_eq!(run.texts(), ["hello"], "{run:?}");
    let (code, reason) = run.close.clone().expect("close frame");
    assert_eq!(code, 1001, "{run:?}");
    assert_eq!(reason, b"veil: idle timeout", "{run:?}");
    assert!(w.counter("websocket_closed") >= 1.0);
}

/// Round trips of 100-byte text messages, p50/p99 and messages/s; run by hand with
/// `cargo test -p veil-tests --test websocket -- --ignored --nocapture ws_round_trips`
/// (`VEIL_BIN_DIR=target/release` to measure the release agent and control).
const ROUND_TRIPS: &str = r#"
import os, ssl, sys, time
from websockets.sync.client import connect
url, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context()
lat = []
with connect(url, server_hostname=host, ssl=ctx, compression=None,
             additional_headers={"Authorization": "Bearer " + os.environ["K"]}) as ws:
    msg = "x" * 100
    for _ in range(100):
        ws.send(msg); ws.recv()
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter(); ws.send(msg); ws.recv(); lat.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    burst = time.perf_counter()
    for _ in range(n):
        ws.send(msg)
    for _ in range(n):
        ws.recv()
    burst = time.perf_counter() - burst
lat.sort()
print("round trips/s %.0f p50 %.3f ms p99 %.3f ms; pipelined echoes/s %.0f" % (
    n / total, lat[n // 2] * 1e3, lat[n * 99 // 100] * 1e3, n / burst))
"#;

#[test]
#[ignore = "measurement, run by hand"]
fn ws_round_trips_through_veil_vs_direct() {
    use veil_tests::intercept_world::run_text;
    let value = format!("sk-test-{}", random_token(40));
    let mut w = world(&value);
    let key = w.secret_valued("ws-key", value.clone(), &[ALLOWED], json!({}));
    let sb = w.add_sandbox("ws-bench", &[("K", "ws-key")]);
    let python = veil_tests::clients::python_clients();
    let n = "3000";
    let port = w.up.addr().port();
    let mut veil = w.command(sb, python.to_str().expect("path"));
    veil.args(["-c", ROUND_TRIPS, &url(&w), ALLOWED, n])
        .env("K", &key.placeholder);
    let (ok, out) = run_text(&mut veil);
    assert!(ok, "{}", out.replace(&value, "<VALUE!>"));
    println!("through veil (scrubbed): {}", out.trim());
    let direct_url = format!("wss://{}:{port}/ws", w.world.upstream_v4());
    let mut direct = w.world.netns().command(python.to_str().expect("path"));
    direct
        .args(["-c", ROUND_TRIPS, &direct_url, ALLOWED, n])
        .env("K", &value)
        .env("SSL_CERT_FILE", &w.bundle);
    let (ok, out) = run_text(&mut direct);
    assert!(ok, "{}", out.replace(&value, "<VALUE!>"));
    println!("direct (world netns): {}", out.trim());
}
