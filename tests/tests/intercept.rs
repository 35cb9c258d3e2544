//! Interception and substitution end to end: real clients in a sandbox hold only a placeholder;
//! the upstream (a TLS server in another namespace) receives the real value only inside TLS to a
//! host the secret allows. Assertions never print a value: they compare and report booleans.

use std::net::IpAddr;

use serde_json::json;
use veil_tests::clients::{node, python_clients};
use veil_tests::intercept_world::{InterceptWorld, Secret, run_text};
use veil_tests::{HttpsUpstream, Seen, TcpEcho};

const ALLOWED: &str = "api.allowed.test";
const OTHER: &str = "other.test";
const WRONG_CERT: &str = "badcert.test";

/// One world: a TLS upstream valid for `api.allowed.test` and `other.test`, one whose
/// certificate is for another name, a plain HTTP upstream, veil, a secret allowed for
/// `api.allowed.test`, and a sandbox with it mounted as `MY_KEY`.
struct Setup {
    w: InterceptWorld,
    badcert: HttpsUpstream,
    plain: HttpsUpstream,
    key: Secret,
}

impl Setup {
    fn new() -> Setup {
        let w = InterceptWorld::builder("intercept test CA", &[ALLOWED, OTHER])
            .resolve(&[WRONG_CERT])
            .start();
        let ip: IpAddr = w.world.upstream_v4().into();
        let badcert = HttpsUpstream::start(w.world.netns(), ip, &w.ca, &["somewhere-else.test"]);
        let plain = HttpsUpstream::start_plain(w.world.netns(), ip);
        let key = w.secret("upstream-key", &[ALLOWED], json!({}));
        let mut s = Setup {
            w,
            badcert,
            plain,
            key,
        };
        s.add_sandbox("with", true);
        s
    }

    /// A sandbox (own netns, test names resolving to the world) registered with or without
    /// the secret mounted as `MY_KEY`; writes the client CA bundle from the PUT answer.
    fn add_sandbox(&mut self, id: &str, mounted: bool) -> usize {
        let mounts: &[(&str, &str)] = if mounted {
            &[("MY_KEY", "upstream-key")]
        } else {
            &[]
        };
        let i = self.w.add_sandbox(id, mounts);
        if mounted {
            assert_eq!(
                self.w.answer(i)["env"]["MY_KEY"].as_str(),
                Some(self.key.placeholder.as_str()),
                "PUT answer env"
            );
        }
        i
    }

    fn url(&self, host: &str, path: &str) -> String {
        let port = if host == WRONG_CERT {
            self.badcert.addr().port()
        } else {
            self.w.up.addr().port()
        };
        format!("https://{host}:{port}{path}")
    }

    /// Runs `program args` in sandbox `i` with the placeholder and CA trust in its env.
    fn run(&self, i: usize, program: &str, args: &[&str]) -> (bool, String) {
        let mut cmd = self.w.command(i, program);
        cmd.args(args).env("MY_KEY", &self.key.placeholder);
        let (ok, text) = run_text(&mut cmd);
        // Redact before anything reaches a message: the sandbox must not have seen the value,
        // and a test must not print it either.
        (ok, text.replace(&self.key.value, "<VALUE!>"))
    }

    fn last_seen(&self, up: &HttpsUpstream) -> Seen {
        up.seen().pop().expect("the upstream received no request")
    }

    fn curl(&self, i: usize, flag: &str, extra: &[&str], url: &str) -> (bool, String) {
        let mut args = vec!["-sS", "--max-time", "20", flag];
        args.extend_from_slice(extra);
        args.push(url);
        self.run(i, "curl", &args)
    }
}

fn basic(user: &str, secret: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
    )
}

#[test]
fn curl_over_h1_and_h2_sends_the_value_in_header_query_and_basic_auth() {
    let s = Setup::new();
    for flag in ["--http1.1", "--http2"] {
        let ph = s.key.placeholder.clone();
        let url = s.url(ALLOWED, &format!("/v1/items?key={ph}&x=1"));
        let header = format!("x-api-key: {ph}");
        let (ok, out) = s.curl(0, flag, &["-H", &header], &url);
        assert!(ok, "curl {flag} failed: {out}");
        let seen = s.last_seen(&s.w.up);
        assert_eq!(
            seen.version,
            if flag == "--http2" {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            }
        );
        assert!(
            seen.header("x-api-key") == Some(s.key.value.as_str()),
            "{flag}: header not substituted"
        );
        assert!(
            seen.target == format!("/v1/items?key={}&x=1", s.key.value),
            "{flag}: query not substituted"
        );
        assert!(
            !out.contains("<VALUE!>"),
            "{flag}: the sandbox saw the value"
        );

        let user = format!("alice:{ph}");
        let (ok, out) = s.curl(0, flag, &["-u", &user], &s.url(ALLOWED, "/basic"));
        assert!(ok, "curl {flag} -u failed: {out}");
        let seen = s.last_seen(&s.w.up);
        assert!(
            seen.header("authorization") == Some(basic("alice", &s.key.value).as_str()),
            "{flag}: Basic credentials not substituted"
        );
    }
}

/// Asserts the last request carried the value in `x-api-key`, in the query and in Basic auth.
fn assert_substituted_everywhere(s: &Setup, client: &str, version: &str) {
    let seen = s.last_seen(&s.w.up);
    assert_eq!(seen.version, version, "{client}: protocol");
    assert!(
        seen.header("x-api-key") == Some(s.key.value.as_str()),
        "{client}: header not substituted"
    );
    assert!(
        seen.target == format!("/clients?key={}", s.key.value),
        "{client}: query not substituted"
    );
    assert!(
        seen.header("authorization") == Some(basic("alice", &s.key.value).as_str()),
        "{client}: Basic credentials not substituted"
    );
}

#[test]
fn python_requests_httpx_h2_and_node_fetch_send_the_value_in_header_query_and_basic_auth() {
    let s = Setup::new();
    let python = python_clients();
    let python = python.to_str().expect("path");
    let base = s.url(ALLOWED, "/clients");
    let requests = "import os,sys,requests\n\
                    k=os.environ['MY_KEY']\n\
                    r=requests.get(sys.argv[1],params={'key':k},auth=('alice',k),headers={'x-api-key':k},timeout=20)\n\
                    print(r.status_code)";
    let (ok, out) = s.run(0, python, &["-c", requests, &base]);
    assert!(ok && out.trim_start().starts_with("200"), "requests: {out}");
    assert_substituted_everywhere(&s, "requests", "HTTP/1.1");

    let httpx = "import os,sys,httpx\n\
                 k=os.environ['MY_KEY']\n\
                 c=httpx.Client(http2=True,timeout=20)\n\
                 r=c.get(sys.argv[1],params={'key':k},auth=('alice',k),headers={'x-api-key':k})\n\
                 print(r.status_code, r.http_version)";
    let (ok, out) = s.run(0, python, &["-c", httpx, &base]);
    assert!(ok && out.contains("200 HTTP/2"), "httpx h2: {out}");
    assert_substituted_everywhere(&s, "httpx", "HTTP/2.0");

    let fetch = "const k=process.env.MY_KEY;\
                 fetch(process.argv[1]+'?key='+k,{headers:{'x-api-key':k,\
                 'authorization':'Basic '+Buffer.from('alice:'+k).toString('base64')}})\
                 .then(r=>{console.log(r.status);process.exit(r.status===200?0:1)})\
                 .catch(e=>{console.error(String(e));process.exit(2)})";
    let node = node();
    let (ok, out) = s.run(0, node.to_str().expect("path"), &["-e", fetch, &base]);
    assert!(ok, "node fetch: {out}");
    assert_substituted_everywhere(&s, "node fetch", "HTTP/1.1");
}

#[test]
fn a_sandbox_without_the_mount_sends_the_placeholder_unchanged() {
    let mut s = Setup::new();
    let other = s.add_sandbox("without", false);
    let header = format!("x-api-key: {}", s.key.placeholder);
    let (ok, out) = s.curl(
        other,
        "--http1.1",
        &["-H", &header],
        &s.url(ALLOWED, "/no-mount"),
    );
    assert!(ok, "{out}");
    let seen = s.last_seen(&s.w.up);
    assert!(
        seen.header("x-api-key") == Some(s.key.placeholder.as_str()),
        "another sandbox's placeholder must arrive unchanged"
    );
}

#[test]
fn host_differing_from_sni_and_hosts_not_allowed_get_the_placeholder() {
    let s = Setup::new();
    let header = format!("x-api-key: {}", s.key.placeholder);
    // SNI api.allowed.test, Host other.test: nothing substituted.
    for flag in ["--http1.1", "--http2"] {
        let (ok, out) = s.curl(
            0,
            flag,
            &["-H", &header, "-H", "Host: other.test"],
            &s.url(ALLOWED, "/host-mismatch"),
        );
        assert!(ok, "{flag}: {out}");
        let seen = s.last_seen(&s.w.up);
        assert!(
            seen.header("x-api-key") == Some(s.key.placeholder.as_str()),
            "{flag}: Host ≠ SNI must not be substituted"
        );
    }
    // SNI other.test is not allowed: passthrough, so the client sees the upstream's own
    // certificate (trusting only the test CA works) and the placeholder arrives.
    let (ok, out) = s.curl(
        0,
        "--http1.1",
        &[
            "-H",
            &header,
            "--cacert",
            s.w.ca.pem_path().to_str().expect("path"),
        ],
        &s.url(OTHER, "/not-allowed"),
    );
    assert!(ok, "passthrough to a host not allowed: {out}");
    let seen = s.last_seen(&s.w.up);
    assert_eq!(seen.sni.as_deref(), Some(OTHER));
    assert!(seen.header("x-api-key") == Some(s.key.placeholder.as_str()));
}

#[test]
fn plain_http_to_an_allowed_host_is_never_substituted() {
    let s = Setup::new();
    let url = format!("http://{ALLOWED}:{}/plain", s.plain.addr().port());
    let header = format!("x-api-key: {}", s.key.placeholder);
    let (ok, out) = s.curl(0, "--http1.1", &["-H", &header], &url);
    assert!(ok, "{out}");
    let seen = s.last_seen(&s.plain);
    assert!(seen.header("x-api-key") == Some(s.key.placeholder.as_str()));
}

#[test]
fn an_upstream_certificate_not_valid_for_the_sni_never_gets_the_value() {
    let s = Setup::new();
    // badcert.test resolves to an upstream whose certificate names another host; the secret
    // does not allow badcert.test either — so use an allowed name on the bad server's port.
    let url = format!("https://{ALLOWED}:{}/bad", s.badcert.addr().port());
    let header = format!("x-api-key: {}", s.key.placeholder);
    let (ok, out) = s.curl(0, "--http1.1", &["-H", &header, "-i"], &url);
    assert!(
        s.badcert.seen().is_empty(),
        "the upstream must receive nothing"
    );
    assert!(!out.contains("<VALUE!>"));
    assert!(
        !ok || out.contains("502"),
        "the client must get a clear error (502 or a TLS failure): {out}"
    );
}

#[test]
fn a_client_hello_split_across_segments_is_still_intercepted() {
    let s = Setup::new();
    let python = python_clients();
    let script = r#"
import os, socket, ssl, sys, time
host, port, bundle = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=bundle)
ctx.set_alpn_protocols(['http/1.1'])
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname=host)
sock = socket.create_connection((host, port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def flush(split=False):
    data = out.read()
    step = 7 if split else len(data) or 1
    for i in range(0, len(data), step):
        sock.sendall(data[i:i + step])
        if split:
            time.sleep(0.005)
first = True
while True:
    try:
        tls.do_handshake(); flush(); break
    except ssl.SSLWantReadError:
        flush(split=first); first = False
        d = sock.recv(65536)
        if not d: sys.exit('eof during handshake')
        inc.write(d)
req = 'GET /split HTTP/1.1\r\nHost: %s\r\nx-api-key: %s\r\nConnection: close\r\n\r\n' % (host, os.environ['MY_KEY'])
tls.write(req.encode()); flush()
resp = b''
while True:
    try:
        chunk = tls.read(65536)
        if not chunk: break
        resp += chunk
    except ssl.SSLWantReadError:
        d = sock.recv(65536)
        if not d: break
        inc.write(d)
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
        break
print(resp.split(b'\r\n', 1)[0].decode())
"#;
    let port = s.w.up.addr().port().to_string();
    let bundle = s.w.bundle.to_str().expect("path").to_owned();
    let (ok, out) = s.run(
        0,
        python.to_str().expect("path"),
        &["-c", script, ALLOWED, &port, &bundle],
    );
    assert!(ok && out.contains("200"), "split hello client: {out}");
    let seen = s.last_seen(&s.w.up);
    assert_eq!(seen.target, "/split");
    assert!(
        seen.header("x-api-key") == Some(s.key.value.as_str()),
        "not substituted"
    );
}

#[test]
fn non_tls_bytes_are_passed_through_untouched() {
    let s = Setup::new();
    // Port 443, where TLS is expected: the peek sees no ClientHello and passes bytes through.
    let echo = TcpEcho::start_on(
        s.w.world.netns(),
        std::net::SocketAddr::new(s.w.world.upstream_v4().into(), 443),
    );
    let probe = env!("CARGO_BIN_EXE_veil-probe");
    let text = format!("GET / HTTP/1.0 {}", s.key.placeholder);
    let (ok, out) = s.run(
        0,
        probe,
        &[
            "tcp",
            "--addr",
            &echo.addr().to_string(),
            "--send",
            &text,
            "--half-close",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&text),
        "the echo must come back byte for byte: {out}"
    );
}
