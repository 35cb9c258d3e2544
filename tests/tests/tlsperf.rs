//! TLS session resumption stays inside one sandbox (issue 19): veil resumes TLS sessions on
//! both sides of an intercepted connection to save handshakes, but a session one sandbox got
//! never shortens a handshake of another sandbox — towards upstreams (the agent's client
//! session cache is per sandbox and server name) nor towards sandbox clients (the tickets the
//! agent issues resume only in the sandbox they were issued in).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use rustls::HandshakeKind;
use serde_json::json;
use tokio_util::sync::DropGuard;
use veil_tests::https::{serve_tcp, tls_acceptor};
use veil_tests::intercept_world::{InterceptWorld, Upstream, run_text};
use veil_tests::{NetNs, TestCa};

const HOST: &str = "api.resume.test";

/// An HTTPS upstream (http/1.1 only) that records how each TLS handshake went and closes every
/// connection after one response, so each request needs a new upstream connection.
struct ResumeUpstream {
    addr: std::net::SocketAddr,
    kinds: Arc<Mutex<Vec<HandshakeKind>>>,
    _stop: DropGuard,
}

impl Upstream for ResumeUpstream {
    fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl ResumeUpstream {
    fn start(ns: &NetNs, ip: IpAddr, ca: &TestCa, names: &[&str]) -> ResumeUpstream {
        let acceptor = tls_acceptor(ca, names, &[b"http/1.1"]);
        let kinds: Arc<Mutex<Vec<HandshakeKind>>> = Arc::default();
        let seen = kinds.clone();
        let (addr, stop) = serve_tcp(ns, ip, "resumption upstream", move |tcp| {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Some(kind) = tls.get_ref().1.handshake_kind() {
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(kind);
                }
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(&b"ok\n"[..])))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            }
        });
        ResumeUpstream {
            addr,
            kinds,
            _stop: stop,
        }
    }

    fn kinds(&self) -> Vec<HandshakeKind> {
        self.kinds.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn world() -> (InterceptWorld<ResumeUpstream>, usize, usize) {
    let mut w =
        InterceptWorld::builder("tlsperf test CA", &[HOST]).start_with(ResumeUpstream::start);
    w.secret("resume-key", &[HOST], json!({}));
    let a = w.add_sandbox("resa", &[("MY_KEY", "resume-key")]);
    let b = w.add_sandbox("resb", &[("MY_KEY", "resume-key")]);
    (w, a, b)
}

/// One HTTP/1.1 request from sandbox `i` through veil; panics unless it is answered `ok`.
fn get(w: &InterceptWorld<ResumeUpstream>, i: usize) {
    let url = w.url(HOST, "/");
    let (ok, text) = w.curl(i, &["--http1.1", &url], &[]);
    assert!(
        ok && text.trim() == "ok",
        "request from sandbox {i}: {text}"
    );
}

#[test]
fn upstream_sessions_resume_only_within_their_sandbox() {
    let (w, a, b) = world();
    get(&w, a);
    get(&w, a);
    assert_eq!(
        w.up.kinds(),
        [HandshakeKind::Full, HandshakeKind::Resumed],
        "sandbox A's second upstream connection resumes A's session"
    );
    get(&w, b);
    assert_eq!(
        w.up.kinds().get(2),
        Some(&HandshakeKind::Full),
        "sandbox B's first upstream handshake must be a full one, whatever A did: {:?}",
        w.up.kinds()
    );
    get(&w, b);
    assert_eq!(
        w.up.kinds().get(3),
        Some(&HandshakeKind::Resumed),
        "B resumes its own"
    );
}

/// Runs `openssl s_client` in sandbox `i` for one request; `sess_in` resumes the session in
/// that file, `sess_out` saves the one it gets. Returns whether the handshake was a
/// resumption (`Reused`) or not (`New`), from s_client's own report.
fn s_client(
    w: &InterceptWorld<ResumeUpstream>,
    i: usize,
    sess_in: Option<&std::path::Path>,
    sess_out: &std::path::Path,
) -> bool {
    let up = w.up.addr();
    let script = format!(
        "printf 'GET / HTTP/1.1\\r\\nHost: {HOST}\\r\\nConnection: close\\r\\n\\r\\n' | \
         openssl s_client -connect {up} -servername {HOST} -CAfile \"$SSL_CERT_FILE\" \
         -verify_return_error -ign_eof -sess_out {} {}",
        sess_out.display(),
        sess_in.map_or(String::new(), |p| format!("-sess_in {}", p.display())),
    );
    let mut cmd = w.command(i, "sh");
    cmd.args(["-c", &script]);
    let (ok, text) = run_text(&mut cmd);
    assert!(
        ok && text.lines().any(|l| l == "ok"),
        "s_client in sandbox {i}: {text}"
    );
    let new = text.lines().any(|l| l.starts_with("New, TLSv1.3"));
    let reused = text.lines().any(|l| l.starts_with("Reused, TLSv1.3"));
    assert!(new != reused, "s_client said neither or both: {text}");
    reused
}

#[test]
fn client_tickets_resume_only_in_their_sandbox() {
    let (w, a, b) = world();
    let dir = w.scratch();
    let first = dir.join("a1.sess");
    assert!(
        !s_client(&w, a, None, &first),
        "the first handshake is a full one"
    );
    let again = dir.join("a2.sess");
    assert!(
        s_client(&w, a, Some(&first), &again),
        "a ticket resumes in the sandbox that got it"
    );
    let other = dir.join("b.sess");
    assert!(
        !s_client(&w, b, Some(&again), &other),
        "a ticket sandbox A's client got must not resume a session in sandbox B"
    );
}
