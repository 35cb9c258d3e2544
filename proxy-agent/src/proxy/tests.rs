//! The connection path driven in-process: accept → identify → peek → decide →
//! intercept | passthrough → forward → scrub, with the kernel's records in memory and every
//! upstream on loopback behind the sandbox's connector (see [`world`]). No root, no eBPF.
//!
//! Assertions never print a value: they compare and say what went wrong.
#![allow(clippy::unwrap_used, reason = "tests may unwrap")]

mod world;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use world::{
    ALLOWED, CGROUP, OTHER, OTHER_CGROUP, PLACEHOLDER, TestCa, VALUE, World, echo_upstream, get,
    https_upstream,
};

/// Original destinations the sandbox dials: documentation addresses, never connected to (the
/// connector routes them to loopback servers).
fn dst(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], 443))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn a_host_no_secret_allows_passes_through_untouched() {
    let w = World::new(true, 64).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    // The upstream's own certificate, trusted by the client directly: the handshake only
    // completes when veil forwarded the hello and every record unchanged.
    w.route(
        dst(1),
        https_upstream(&w.upstream_ca, OTHER, seen.clone()).await,
    );
    let (tcp, _) = w.dial(dst(1), CGROUP).await;
    let tls = World::tls(tcp, w.upstream_ca.root(), OTHER, &[b"http/1.1"])
        .await
        .unwrap();
    let (status, body) = get(tls, false, OTHER, &bearer(PLACEHOLDER)).await;
    assert_eq!(status, 200);
    assert!(
        body == format!("you sent {}", bearer(PLACEHOLDER)),
        "the response changed on its way"
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() == 1 && seen[0].key == bearer(PLACEHOLDER),
        "the upstream of a host no secret allows got something else than the placeholder"
    );
    assert_eq!(
        w.proxy.stats.passthrough_not_allowed.load(Ordering::SeqCst),
        1
    );
    assert_eq!(w.proxy.stats.intercepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn bytes_that_are_not_tls_pass_through_unchanged_both_ways() {
    let w = World::new(true, 64).await;
    w.route(dst(2), echo_upstream().await);
    let (tcp, _) = w.dial(dst(2), CGROUP).await;
    let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut wr) = tcp.into_split();
    let expected = sent.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert!(got == expected, "the echoed bytes differ");
    w.until("the passthrough to end", |s| {
        s.completed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(w.proxy.stats.passthrough_not_tls.load(Ordering::SeqCst), 1);
    assert_eq!(
        w.proxy.stats.bytes_up.load(Ordering::SeqCst),
        expected.len() as u64
    );
}

/// An allowed SNI is intercepted: the upstream gets the value, the sandbox gets the response
/// with the value scrubbed back to the placeholder — in both protocols.
async fn intercepts_and_substitutes(h2: bool) {
    let w = World::new(true, 64).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    w.route(
        dst(3),
        https_upstream(&w.upstream_ca, ALLOWED, seen.clone()).await,
    );
    let (tcp, _) = w.dial(dst(3), CGROUP).await;
    let alpn: &[&[u8]] = if h2 {
        &[b"h2", b"http/1.1"]
    } else {
        &[b"http/1.1"]
    };
    // The sandbox trusts veil's CA: the leaf for the SNI is veil's.
    let tls = World::tls(tcp, w.veil_ca.root(), ALLOWED, alpn)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol() == Some(b"h2"), h2);
    let (status, body) = get(tls, h2, ALLOWED, &bearer(PLACEHOLDER)).await;
    assert_eq!(status, 200);
    assert!(
        body == format!("you sent {}", bearer(PLACEHOLDER)),
        "the value the upstream echoed was not scrubbed back to the placeholder"
    );
    assert!(!body.contains(VALUE), "the value reached the sandbox");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].key == bearer(VALUE),
        "the upstream did not get the value in place of the placeholder"
    );
    assert_eq!(seen[0].h2, h2, "the upstream spoke another protocol");
    assert_eq!(w.proxy.stats.intercepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_allowed_sni_is_intercepted_substituted_and_scrubbed_h1() {
    intercepts_and_substitutes(false).await;
}

#[tokio::test]
async fn an_allowed_sni_is_intercepted_substituted_and_scrubbed_h2() {
    intercepts_and_substitutes(true).await;
}

#[tokio::test]
async fn a_host_header_other_than_the_sni_gets_nothing_substituted() {
    let w = World::new(true, 64).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    w.route(
        dst(4),
        https_upstream(&w.upstream_ca, ALLOWED, seen.clone()).await,
    );
    let (tcp, _) = w.dial(dst(4), CGROUP).await;
    let tls = World::tls(tcp, w.veil_ca.root(), ALLOWED, &[b"http/1.1"])
        .await
        .unwrap();
    let (status, _) = get(tls, false, OTHER, &bearer(PLACEHOLDER)).await;
    assert_eq!(status, 200);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].key == bearer(PLACEHOLDER),
        "a request whose Host is not the SNI had its placeholder replaced"
    );
}

#[tokio::test]
async fn a_record_naming_another_sandbox_is_refused() {
    let w = World::new(true, 64).await;
    w.route(dst(5), echo_upstream().await);
    let (mut tcp, conn) = w.dial(dst(5), OTHER_CGROUP).await;
    let _ = tcp.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    // Closed without a byte: EOF, or a reset if our write arrived after the close.
    let n = tcp.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "a connection recorded for another sandbox was served");
    w.until("origin_mismatch", |s| {
        s.origin_mismatch.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(w.connector.dials(), 0, "an upstream connection was opened");
    assert!(!w.recorded(&conn), "the record outlived its connection");
}

#[tokio::test]
async fn the_connection_over_the_limit_is_closed_and_consumes_its_record() {
    // No secret: connections are spliced at once and hold their permit while open.
    let w = World::new(false, 1).await;
    w.route(dst(6), echo_upstream().await);
    let (mut first, _) = w.dial(dst(6), CGROUP).await;
    first.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    let (mut second, conn) = w.dial(dst(6), CGROUP).await;
    let n = second.read(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0, "the connection over the limit was served");
    w.until("limit_refused", |s| {
        s.limit_refused.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        !w.recorded(&conn),
        "the record of the connection closed over the limit is still there"
    );
    assert_eq!(w.records.len(), 0);
    // The first connection is still served.
    first.write_all(b"pong").await.unwrap();
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

/// An upstream whose certificate veil does not trust: the sandbox's handshake with veil
/// completes and its request is answered 502 by veil; nothing reaches the upstream.
async fn unverified_upstream_is_answered_502(h2: bool) {
    let w = World::new(true, 64).await;
    let untrusted = TestCa::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    w.route(
        dst(7),
        https_upstream(&untrusted, ALLOWED, seen.clone()).await,
    );
    let (tcp, _) = w.dial(dst(7), CGROUP).await;
    let alpn: &[&[u8]] = if h2 {
        &[b"h2", b"http/1.1"]
    } else {
        &[b"http/1.1"]
    };
    let tls = World::tls(tcp, w.veil_ca.root(), ALLOWED, alpn)
        .await
        .unwrap();
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let (status, body) = get(tls, h2, ALLOWED, &bearer(PLACEHOLDER)).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains(ALLOWED), "{body}");
    assert!(body.contains("verification"), "{body}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "a request reached an upstream that failed verification"
    );
    assert!(w.proxy.stats.upstream_verify_failed.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn an_upstream_failing_verification_is_answered_502_h1() {
    unverified_upstream_is_answered_502(false).await;
}

#[tokio::test]
async fn an_upstream_failing_verification_is_answered_502_h2() {
    unverified_upstream_is_answered_502(true).await;
}
