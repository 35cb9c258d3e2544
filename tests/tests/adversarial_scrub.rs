//! Adversarial scrubbing (issue 13, item 4), written as the attacker runs it: code in a sandbox
//! holding a placeholder, talking to an allowed upstream it controls, which echoes the value it
//! receives in every encoding the scrubber covers — in response headers, a chunked h1 / h2 DATA
//! body cut inside each encoding, and trailers — over h1 and h2, with curl, Node and Python. No
//! encoded form of the value, and no 12 consecutive bytes of it, may reach the sandbox. Also: a
//! short value (5 bytes) echoed inside `Authorization: Basic`, a `Transfer-Encoding: gzip,
//! chunked` response (502), and a body gzipped twice under one `Content-Encoding` (withheld).
//!
//! Every check also asserts that the upstream did receive the value, so nothing passes by
//! substitution failing. Outputs are redacted before they reach a message.

use std::io::Read as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use serde_json::json;
use veil_tests::adversary::{Adversary, REFLECT, basic_token, encodings};
use veil_tests::clients::{node, python_clients};
use veil_tests::control::random_token;
use veil_tests::intercept_world::{InterceptWorld, Secret};
use veil_tests::output_within;

const TIMEOUT: Duration = Duration::from_secs(60);
const HOST: &str = "api.adversary.test";
const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

struct Setup {
    w: InterceptWorld<Adversary>,
    key: Secret,
}

impl Setup {
    /// The adversary for [`HOST`] (offering `alpn`), veil, a secret with `value` allowed for
    /// it, and a sandbox (own netns) with the secret mounted as `MY_KEY`.
    fn new(tag: &str, value: String, alpn: &[&[u8]]) -> Setup {
        let mut w = InterceptWorld::builder("adversary CA", &[HOST])
            .start_with(|ns, ip, ca, names| Adversary::start(ns, ip, ca, names, alpn));
        let key = w.secret_valued("adv-key", value, &[HOST], json!({}));
        let sb = w.add_sandbox(tag, &[("MY_KEY", "adv-key")]);
        assert_eq!(
            w.answer(sb)["env"]["MY_KEY"].as_str(),
            Some(key.placeholder.as_str())
        );
        Setup { w, key }
    }

    fn url(&self, route: &str) -> String {
        self.w.url(HOST, route)
    }

    /// Runs `program args` in the sandbox with the placeholder and CA trust in its env; returns
    /// success and stdout + stderr.
    fn run(&self, program: &str, args: &[&str]) -> (bool, Vec<u8>) {
        let mut cmd = self.w.command(0, program);
        cmd.args(args).env("MY_KEY", &self.key.placeholder);
        let out = output_within(&mut cmd, TIMEOUT);
        (
            out.status.success(),
            [out.stdout.as_slice(), b"\n", out.stderr.as_slice()].concat(),
        )
    }

    /// Names of the value's forms found in `out` (see the module docs).
    fn leaks(&self, out: &[u8]) -> Vec<String> {
        let v = self.key.value.as_bytes();
        let mut found = Vec::new();
        for (name, form) in encodings(v) {
            let skip = name.starts_with("base64") || name == "basic" || name == "truncated";
            if !skip && contains(out, &form) {
                found.push(name);
            }
        }
        let flat: Vec<u8> = out
            .iter()
            .copied()
            .filter(|c| *c != b'\r' && *c != b'\n')
            .collect();
        for align in 0..3 {
            for (name, engine) in [
                ("base64", &STANDARD_NO_PAD),
                ("base64url", &URL_SAFE_NO_PAD),
            ] {
                let core = base64_core(engine, v, align);
                if core.len() >= 8 && contains(out, &core) {
                    found.push(format!("{name}-{align}"));
                } else if core.len() >= 8 && contains(&flat, &core) {
                    found.push(format!("wrapped-{name}-{align}"));
                }
            }
        }
        let text = String::from_utf8_lossy(out);
        for token in text.split("asic ").skip(1) {
            let token: String = token
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "+/=".contains(*c))
                .collect();
            if contains(
                &STANDARD
                    .decode(token.trim_end_matches('='))
                    .unwrap_or_default(),
                v,
            ) || contains(
                &STANDARD_NO_PAD
                    .decode(token.trim_end_matches('='))
                    .unwrap_or_default(),
                v,
            ) {
                found.push("basic".into());
            }
        }
        if v.len() > 12 && v.windows(12).any(|w| contains(out, w)) {
            found.push("12-byte window".into());
        }
        found.sort();
        found.dedup();
        found
    }

    /// `out` with the value's forms replaced by their names, safe to print.
    fn redact(&self, out: &[u8]) -> String {
        let mut text = String::from_utf8_lossy(out).into_owned();
        for (name, form) in encodings(self.key.value.as_bytes()) {
            let form = String::from_utf8_lossy(&form).into_owned();
            if !form.is_empty() {
                text = text.replace(&form, &format!("<LEAK:{name}>"));
            }
        }
        for w in self.key.value.as_bytes().windows(12) {
            text = text.replace(&*String::from_utf8_lossy(w), "<LEAK:window>");
        }
        text
    }

    /// Rotates the secret to `value` (control answers once the agent acknowledged).
    fn rotate(&mut self, value: String) {
        let (status, answer) = self.w.veil.block_on(self.w.veil.api().patch(
            &format!("/secret/{}?wait=5s", self.key.id),
            self.w.veil.key(),
            json!({ "value": value }),
        ));
        assert_eq!(status, 200, "rotation: status {status}");
        drop(answer);
        self.key.value = value;
    }

    fn upstream_got(&self, what: impl Fn(&[u8]) -> bool) -> bool {
        let r = self.w.up.received();
        r.reflected.iter().chain(&r.authorization).any(|v| what(v))
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn base64_core(engine: &base64::engine::GeneralPurpose, bytes: &[u8], align: usize) -> Vec<u8> {
    let mut padded = vec![0u8; align];
    padded.extend_from_slice(bytes);
    let encoded = engine.encode(&padded);
    let start = (align * 8).div_ceil(6);
    let end = ((align + bytes.len()) * 8 / 6).min(encoded.len());
    encoded.as_bytes()[start..end].to_vec()
}

/// A value with the characters encoders treat specially.
fn nasty_value() -> String {
    format!("sk-{}+/=%&<>'\"{}", random_token(16), random_token(12))
}

/// Every listed encoding, echoed in headers, a body cut inside each encoding (h1 chunked, h2
/// DATA) and trailers, to curl over h1 and h2, Node's fetch (h1) and its http2 client (which
/// shows trailers), and Python requests.
#[test]
fn every_encoding_through_headers_body_and_trailers() {
    let s = Setup::new("adv-all", nasty_value(), BOTH);
    let header = format!("{REFLECT}: {}", s.key.placeholder);
    let url = s.url("/all");
    let mut runs: Vec<(String, bool, Vec<u8>)> = Vec::new();
    for flag in ["--http1.1", "--http2"] {
        let args = [
            "-sS",
            "--max-time",
            "20",
            flag,
            "-D",
            "-",
            "-H",
            &header,
            "-H",
            "TE: trailers",
            &url,
        ];
        let (ok, out) = s.run("curl", &args);
        runs.push((format!("curl {flag}"), ok, out));
    }
    let node = node();
    let node = node.to_str().expect("path");
    let fetch = "fetch(process.argv[1],{headers:{'x-reflect':process.env.MY_KEY}})\
                 .then(async r=>{console.log(r.status);for(const [n,v] of r.headers)console.log(n+': '+v);\
                 process.stdout.write(Buffer.from(await r.arrayBuffer()))})\
                 .catch(e=>{console.error(String(e));process.exit(2)})";
    let (ok, out) = s.run(node, &["-e", fetch, &url]);
    runs.push(("node fetch".into(), ok, out));
    let h2 = "const http2=require('http2');const u=new URL(process.argv[1]);\
              const c=http2.connect(u.origin);c.on('error',e=>{console.error(String(e));process.exit(2)});\
              const r=c.request({':path':u.pathname,'x-reflect':process.env.MY_KEY});\
              const chunks=[];r.on('response',h=>{for(const n in h)console.log(n+': '+h[n])});\
              r.on('data',d=>chunks.push(d));\
              r.on('trailers',t=>{for(const n in t)console.log(n+': '+t[n])});\
              r.on('end',()=>{process.stdout.write(Buffer.concat(chunks));c.close()});r.end()";
    let (ok, out) = s.run(node, &["-e", h2, &url]);
    runs.push(("node http2".into(), ok, out));
    let python = python_clients();
    let python = python.to_str().expect("path");
    let requests = "import os,sys,requests\n\
                    r=requests.get(sys.argv[1],headers={'x-reflect':os.environ['MY_KEY']},timeout=20)\n\
                    print(r.status_code, dict(r.headers))\n\
                    sys.stdout.flush(); sys.stdout.buffer.write(r.content)";
    let (ok, out) = s.run(python, &["-c", requests, &url]);
    runs.push(("python requests".into(), ok, out));
    let got = s.upstream_got(|v| v == s.key.value.as_bytes());
    for (what, ok, out) in runs {
        let leaks = s.leaks(&out);
        let shown = contains(&out, s.key.placeholder.as_bytes());
        assert!(
            ok && got && shown && leaks.is_empty(),
            "{what}: client ok {ok}, upstream got the value {got}, placeholder shown {shown}, \
             leaked forms {leaks:?}; output:\n{}",
            s.redact(&out)
        );
    }
}

/// A 5-byte value inside `Authorization: Basic`, echoed by the upstream in a header and in a
/// JSON body of the request headers, over h1 and h2 (curl) and by Python requests' own
/// `auth=`: its base64 is too short to be matched as such, so the credential is decoded.
#[test]
fn a_short_value_in_an_echoed_basic_credential() {
    let s = Setup::new("adv-basic", "p!n#7".to_owned(), BOTH);
    let sent = basic_token(s.key.placeholder.as_bytes());
    let header = format!("Authorization: {sent}");
    let url = s.url("/headers");
    let mut runs: Vec<(String, bool, Vec<u8>)> = Vec::new();
    for flag in ["--http1.1", "--http2"] {
        let args = [
            "-sS",
            "--max-time",
            "20",
            flag,
            "-D",
            "-",
            "-H",
            &header,
            &url,
        ];
        let (ok, out) = s.run("curl", &args);
        runs.push((format!("curl {flag}"), ok, out));
    }
    let python = python_clients();
    let python = python.to_str().expect("path");
    let requests = "import os,sys,requests\n\
                    r=requests.get(sys.argv[1],auth=('user',os.environ['MY_KEY']),timeout=20)\n\
                    print(r.status_code, dict(r.headers))\n\
                    print(r.text)";
    let (ok, out) = s.run(python, &["-c", requests, &url]);
    runs.push(("python requests auth=".into(), ok, out));
    let want = basic_token(s.key.value.as_bytes());
    let got = s.upstream_got(|a| a == want.as_bytes());
    for (what, ok, out) in runs {
        let leaks = s.leaks(&out);
        let shown = contains(&out, sent.as_bytes());
        assert!(
            ok && got && shown && leaks.is_empty(),
            "{what}: client ok {ok}, upstream got the credential {got}, placeholder's credential \
             shown {shown}, leaked forms {leaks:?}; output:\n{}",
            s.redact(&out)
        );
    }
}

/// Gunzips `data` as many times as it decodes (for the checks below).
fn gunzip_all(mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..3 {
        let mut out = Vec::new();
        if flate2::read::MultiGzDecoder::new(data.as_slice())
            .read_to_end(&mut out)
            .is_err()
            || out.is_empty()
        {
            break;
        }
        data = out;
    }
    data
}

/// `Transfer-Encoding: gzip, chunked` from the upstream: the HTTP client removes the chunked
/// framing and would hand the gzip-coded bytes on; veil answers 502.
#[test]
fn a_transfer_coding_other_than_chunked_is_answered_502() {
    let s = Setup::new("adv-te", nasty_value(), &[b"http/1.1"]);
    assert_answered_502(&s, "/te-gzip", &[]);
}

/// A body gzipped twice under one `Content-Encoding: gzip`: veil decodes once and finds a gzip
/// stream; the response is withheld (502) instead of passing compressed values.
#[test]
fn a_body_compressed_twice_is_withheld() {
    let s = Setup::new("adv-gzip2", nasty_value(), BOTH);
    assert_answered_502(&s, "/gzip2", &["-H", "Accept-Encoding: gzip"]);
}

/// Asks `path` to reflect the placeholder with curl over h1 and h2 (plus `extra` arguments):
/// the answer must be a 502 carrying no form of the value, even gunzipped, while the upstream
/// did get the value.
fn assert_answered_502(s: &Setup, path: &str, extra: &[&str]) {
    let header = format!("{REFLECT}: {}", s.key.placeholder);
    let url = s.url(path);
    for flag in ["--http1.1", "--http2"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = dir.path().join("body");
        let body_s = body.to_str().expect("path");
        let mut args = vec![
            "-sS",
            "--max-time",
            "20",
            flag,
            "-o",
            body_s,
            "-w",
            "%{http_code}",
            "-H",
            &header,
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        let (_, out) = s.run("curl", &args);
        let data = std::fs::read(&body).unwrap_or_default();
        let decoded = gunzip_all(data);
        let status = String::from_utf8_lossy(&out).trim().to_owned();
        let leaked = contains(&decoded, s.key.value.as_bytes()) || !s.leaks(&decoded).is_empty();
        let got = s.upstream_got(|v| v == s.key.value.as_bytes());
        assert!(
            status.starts_with("502") && !leaked && got,
            "curl {flag}: status {status}, the value (gunzipped) reached the client {leaked}, \
             upstream got the value {got}"
        );
    }
}

/// Waits (polling) up to 20 s for `cond`; fails naming `what` otherwise.
fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    assert!(
        veil_tests::cmd::wait_until(Duration::from_secs(20), cond),
        "{what} never happened"
    );
}

/// A long response (server-sent events) that started before a rotation carries the new value
/// after it — the upstream learnt it from a later request — and the sandbox sees only the
/// placeholder: the stream's scrubber takes up the new policy's values while it streams.
#[test]
fn a_stream_started_before_a_rotation_scrubs_the_new_value() {
    let mut s = Setup::new("adv-sse", nasty_value(), BOTH);
    let header = format!("{REFLECT}: {}", s.key.placeholder);
    for (n, flag) in ["--http1.1", "--http2"].into_iter().enumerate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("events");
        let file_s = file.to_str().expect("path");
        let mut cmd = s.w.sandboxes[0].command("curl");
        cmd.args([
            "-sS",
            "-N",
            "--max-time",
            "40",
            flag,
            "-o",
            file_s,
            "-H",
            &header,
        ])
        .arg(s.url("/stream"))
        .env("CURL_CA_BUNDLE", &s.w.bundle)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("curl");
        let streams = n as u64 + 1;
        wait_until("the stream's start", || {
            s.w.up.received().streams >= streams
        });
        s.rotate(nasty_value());
        let (ok, _) = s.run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "20",
                flag,
                "-H",
                &header,
                &s.url("/remember"),
            ],
        );
        assert!(ok, "{flag}: /remember failed");
        let base = s.w.up.received().streamed_remembered;
        wait_until("events with the new value", || {
            s.w.up.received().streamed_remembered >= base + 25
        });
        s.w.up.stop_streams();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait curl") {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{flag}: curl never ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = std::fs::read(&file).unwrap_or_default();
        let leaks = s.leaks(&out);
        let got = s.w.up.received().remembered == s.key.value.as_bytes();
        let shown = contains(&out, s.key.placeholder.as_bytes());
        assert!(
            status.success() && got && shown && leaks.is_empty(),
            "{flag}: curl ok {}, upstream got the new value {got}, placeholder shown {shown}, \
             leaked forms of the new value {leaks:?}; output:\n{}",
            status.success(),
            s.redact(&out)
        );
    }
}
