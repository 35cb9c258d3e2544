//! Adversarial WebSocket cases (issue 20), as an attacker in the sandbox (or a hostile server)
//! would run them, with real clients (Python `websockets`, Node `ws`) against a real `wss`
//! upstream: a compressed frame although nothing was negotiated, a 101 negotiating
//! permessage-deflate anyway, an oversized frame, a value split across fragments and in a close
//! reason, and a placeholder in client frames of a secret without body substitution. The
//! scrubbing and compressed-frame cases run over h2 extended CONNECT too (`veil-ws-h2`).

use serde_json::json;
use veil_tests::adversary::encodings;
use veil_tests::control::random_token;
use veil_tests::intercept_world::{InterceptWorld, Secret};
use veil_tests::ws_clients::{WsClient, WsRun, run_client};
use veil_tests::ws_upstream::{NEGOTIATE_DEFLATE, WsUpstream};

const ALLOWED: &str = "api.allowed.test";
/// The frame and message limits the world configures.
const LIMIT: usize = 64 * 1024;

struct Setup {
    w: InterceptWorld<WsUpstream>,
    key: Secret,
    sb: usize,
}

fn setup(name: &str) -> Setup {
    setup_with(name, false)
}

/// With `h2`, the upstream speaks h2 with extended CONNECT (and h1 still).
fn setup_with(name: &str, h2: bool) -> Setup {
    let value = format!("sk-test-{}", random_token(40));
    let v = value.clone();
    let mut w = InterceptWorld::builder("adversarial websocket CA", &[ALLOWED])
        .metrics()
        .config(&format!(
            "websocket_max_frame_bytes = {LIMIT}\nwebsocket_max_message_bytes = {LIMIT}\n"
        ))
        .start_with(move |ns, ip, ca, names| match h2 {
            true => WsUpstream::start_h2(ns, ip, ca, names, v, true),
            false => WsUpstream::start(ns, ip, ca, names, v),
        });
    let key = w.secret_valued("ws-key", value, &[ALLOWED], json!({}));
    let sb = w.add_sandbox(name, &[("K", "ws-key")]);
    Setup { w, key, sb }
}

impl Setup {
    fn run(&self, client: WsClient, path: &str, cmds: &[&str]) -> WsRun {
        let url = format!("wss://{ALLOWED}:{}{path}", self.w.up.addr().port());
        let run = run_client(
            &self.w,
            self.sb,
            client,
            &url,
            &self.key.placeholder,
            cmds,
            &[&self.key.value],
        );
        let all = run.all_bytes();
        assert!(
            !contains(&all, self.key.value.as_bytes()),
            "{client:?}: the value reached the sandbox: {run:?}"
        );
        for (form, enc) in encodings(self.key.value.as_bytes()) {
            assert!(
                !contains(&all, &enc),
                "{client:?}: the value reached the sandbox as {form}: {run:?}"
            );
        }
        run
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_veil_close(run: &WsRun, code: u16, who: &str) {
    let (got, reason) = run
        .close
        .clone()
        .unwrap_or_else(|| panic!("{who}: no close frame: {run:?}"));
    let reason = String::from_utf8_lossy(&reason).into_owned();
    assert_eq!(got, code, "{who}: {reason} {run:?}");
    assert!(
        reason.starts_with("veil:"),
        "{who}: close reason {reason:?}"
    );
}

#[test]
fn a_compressed_frame_nobody_negotiated_closes_with_1008_and_never_reaches_the_sandbox() {
    let s = setup("ws-adv-rsv1");
    for client in [WsClient::Python, WsClient::Node] {
        let run = s.run(client, "/ws", &["compressed"]);
        assert_veil_close(&run, 1008, &format!("{client:?}"));
        assert!(run.messages.is_empty(), "{client:?}: {run:?}");
    }
    assert!(s.w.counter("websocket_closed") >= 2.0);
}

#[test]
fn a_101_negotiating_permessage_deflate_is_answered_502() {
    let s = setup("ws-adv-ext");
    let run = s.run(WsClient::Python, NEGOTIATE_DEFLATE, &["leak"]);
    assert_eq!(run.error.as_deref(), Some("status 502"), "{run:?}");
    assert!(run.messages.is_empty(), "{run:?}");
}

#[test]
fn an_oversized_frame_closes_with_1009() {
    let s = setup("ws-adv-big");
    let big = format!("big:{}", 4 * LIMIT);
    let run = s.run(WsClient::Python, "/ws", &[&big]);
    assert_veil_close(&run, 1009, "python");
    assert!(run.messages.is_empty(), "{run:?}");
    // Under the limit passes.
    let small = format!("big:{}", LIMIT / 2);
    let run = s.run(WsClient::Python, "/ws", &[&small]);
    assert_eq!(run.messages.len(), 2, "{run:?}");
    assert_eq!(run.messages[0].1.len(), LIMIT / 2);
}

#[test]
fn a_value_split_across_fragments_or_in_a_close_reason_is_scrubbed() {
    let s = setup("ws-adv-frag");
    let ph = s.key.placeholder.as_bytes();
    for client in [WsClient::Python, WsClient::Node] {
        let run = s.run(client, "/ws", &["leak", "close"]);
        assert!(
            run.messages
                .iter()
                .any(|m| m.0 && m.1 == [b"frag:".as_slice(), ph].concat()),
            "{client:?}: the fragmented text is not `frag:` + the placeholder: {run:?}"
        );
        assert!(
            run.messages.iter().filter(|m| !m.0 && m.1 == ph).count() >= 2,
            "{client:?}: the fragmented binary message is not the placeholder: {run:?}"
        );
        let (code, reason) = run.close.clone().expect("close frame");
        assert_eq!(code, 1000);
        assert_eq!(reason, [b"bye ".as_slice(), ph].concat(), "{client:?}");
    }
}

#[test]
fn a_placeholder_in_client_frames_without_body_substitution_reaches_the_upstream_unchanged() {
    let s = setup("ws-adv-nosub");
    let msg = format!(
        "{{\"key\": \"{}\", \"again\": \"{}\"}}",
        s.key.placeholder, s.key.placeholder
    );
    for client in [WsClient::Python, WsClient::Node] {
        let run = s.run(client, "/ws", &[&msg, &s.key.placeholder]);
        assert_eq!(run.error, None, "{client:?}: {run:?}");
        let seen = s.w.up.seen();
        assert!(
            !seen
                .messages
                .iter()
                .any(|m| contains(m, s.key.value.as_bytes())),
            "{client:?}: a placeholder in a client frame was substituted without bodySubstitution: {seen:?}"
        );
        assert!(
            seen.messages.iter().any(|m| m == msg.as_bytes()),
            "{seen:?}"
        );
        assert!(
            seen.messages
                .iter()
                .any(|m| m == s.key.placeholder.as_bytes()),
            "{seen:?}"
        );
    }
}

#[test]
fn over_h2_every_encoding_and_a_value_split_across_fragments_or_in_a_close_reason_is_scrubbed() {
    let s = setup_with("ws-adv-h2-frag", true);
    let ph = s.key.placeholder.as_bytes();
    let run = s.run(WsClient::RustH2, "/ws", &["leak", "close"]);
    assert_eq!(
        (run.error.as_deref(), run.fallback.as_deref()),
        (None, None),
        "{run:?}"
    );
    assert!(
        run.messages
            .iter()
            .any(|m| m.0 && m.1 == [b"frag:".as_slice(), ph].concat()),
        "h2: the fragmented text is not `frag:` + the placeholder: {run:?}"
    );
    assert!(
        run.messages.iter().filter(|m| !m.0 && m.1 == ph).count() >= 2,
        "h2: the fragmented binary message is not the placeholder: {run:?}"
    );
    let (code, reason) = run.close.clone().expect("close frame");
    assert_eq!(code, 1000);
    assert_eq!(reason, [b"bye ".as_slice(), ph].concat());
    assert_eq!(s.w.up.seen().h2, 1, "{:?}", s.w.up.seen());
}

#[test]
fn over_h2_a_compressed_frame_closes_with_1008_and_never_reaches_the_sandbox() {
    let s = setup_with("ws-adv-h2-rsv1", true);
    let run = s.run(WsClient::RustH2, "/ws", &["compressed"]);
    assert_veil_close(&run, 1008, "h2");
    assert!(run.messages.is_empty(), "h2: {run:?}");
    assert_eq!(s.w.up.seen().h2, 1, "{:?}", s.w.up.seen());
    assert!(s.w.counter("websocket_closed") >= 1.0);
}
