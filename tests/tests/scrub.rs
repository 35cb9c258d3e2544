//! Response scrubbing end to end (issue 6): an upstream that echoes the value it received — in a
//! header, the reason phrase, the body (literal, JSON, base64, URL-safe base64, percent-encoded),
//! compressed (gzip, deflate, br), streamed with the value cut across chunks, or in a trailer —
//! reaches real clients in the sandbox only as the placeholder (or its same encoding).
//!
//! Every assertion also checks that the upstream did get the value, so a test cannot pass by
//! substitution failing. Nothing here prints a value or an encoding of it: outputs are redacted
//! before they reach a message, and comparisons report booleans.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use veil_tests::agent::AgentOptions;
use veil_tests::clients::{node, python_clients};
use veil_tests::control::random_token;
use veil_tests::https::{REFLECT_HEADER, percent_encode};
use veil_tests::{
    AgentSandbox, HttpsUpstream, NetNs, Sandbox, TestCa, UpstreamReply, Veil, World, output_within,
    require_root,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const HOST: &str = "api.echo.test";

/// A reflecting TLS upstream for [`HOST`], veil, a secret allowed for it, and a sandbox (own
/// netns) with the secret mounted as `MY_KEY`.
struct Setup {
    _world: World,
    _ca: TestCa,
    up: HttpsUpstream,
    _veil: Veil,
    value: String,
    placeholder: String,
    bundle: PathBuf,
    _bundle_dir: tempfile::TempDir,
    sandbox: Sandbox,
    _ns: NetNs,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        Setup::with_scrubbing(tag, true)
    }

    /// As [`Setup::new`]; `scrub = false` turns scrubbing off (`scrub_responses`).
    fn with_scrubbing(tag: &str, scrub: bool) -> Setup {
        require_root();
        let world = World::new();
        let ca = TestCa::new("scrub test CA");
        let ip: IpAddr = world.upstream_v4().into();
        let up = HttpsUpstream::start_with(
            world.netns(),
            ip,
            Some((&ca, &[HOST])),
            UpstreamReply::Reflect,
        );
        let veil = Veil::start_with(
            AgentOptions {
                args: vec!["--upstream-ca".into(), ca.pem_path().into()],
                extra_config: if scrub {
                    String::new()
                } else {
                    "scrub_responses = false\n".to_owned()
                },
                ..AgentOptions::default()
            },
            &[],
        );
        // `/` and `+` make the percent-encoded and JSON (`\/`) forms differ from the literal.
        let value = format!("sk-test/{}+{}", random_token(20), random_token(20));
        let created = veil.block_on(veil.api().post(
            "/secret",
            veil.key(),
            json!({"name": "echo-key", "value": value, "hosts": [HOST]}),
        ));
        assert_eq!(created.0, 201, "create secret: status {}", created.0);
        let placeholder = created.1["placeholder"]
            .as_str()
            .expect("placeholder")
            .to_owned();
        let ns = NetNs::new(tag);
        let sandbox = Sandbox::new(tag, Some(&ns)).with_hosts(&[(HOST, ip)]);
        let spec = AgentSandbox {
            id: tag.to_owned(),
            cgroup: sandbox.cgroup().path().to_owned(),
            netns: Some(ns.path().to_owned()),
            egress: None,
        };
        let answer = veil.register_with(&spec, &[("MY_KEY", "echo-key")]);
        assert_eq!(
            answer["env"]["MY_KEY"].as_str(),
            Some(placeholder.as_str()),
            "PUT answer env"
        );
        let bundle_dir = tempfile::tempdir().expect("tempdir");
        let bundle = bundle_dir.path().join("bundle.pem");
        let test_ca = std::fs::read_to_string(ca.pem_path()).expect("test CA");
        std::fs::write(&bundle, format!("{}\n{test_ca}", ca_pem(&answer))).expect("bundle");
        Setup {
            _world: world,
            _ca: ca,
            up,
            _veil: veil,
            value,
            placeholder,
            bundle,
            _bundle_dir: bundle_dir,
            sandbox,
            _ns: ns,
        }
    }

    fn url(&self, form: &str) -> String {
        format!("https://{HOST}:{}/reflect/{form}", self.up.addr().port())
    }

    /// Runs `program args` in the sandbox with the placeholder and CA trust in its env; returns
    /// success and stdout + stderr as (lossy) text.
    fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let mut cmd = self.sandbox.command(program);
        cmd.args(args)
            .env("MY_KEY", &self.placeholder)
            .env("SSL_CERT_FILE", &self.bundle)
            .env("REQUESTS_CA_BUNDLE", &self.bundle)
            .env("CURL_CA_BUNDLE", &self.bundle)
            .env("NODE_EXTRA_CA_CERTS", &self.bundle);
        let out = output_within(&mut cmd, TIMEOUT);
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Whether the last request reached the upstream carrying the value to reflect.
    fn upstream_got_the_value(&self) -> bool {
        self.up
            .seen()
            .last()
            .and_then(|r| r.header(REFLECT_HEADER).map(|v| v == self.value))
            == Some(true)
    }

    /// The value in every form the scrubber must remove, by name.
    fn forbidden(&self) -> Vec<(&'static str, String)> {
        let v = self.value.as_bytes();
        let mut forms = vec![
            ("literal", self.value.clone()),
            ("percent", percent_encode(v)),
            ("percent-lower", percent_lower(v)),
            ("json-slash", self.value.replace('/', "\\/")),
        ];
        for align in 0..3 {
            forms.push(("base64", base64_core(&STANDARD_NO_PAD, v, align)));
            forms.push(("base64url", base64_core(&URL_SAFE_NO_PAD, v, align)));
        }
        forms
    }

    /// Names of the forbidden forms present in `text`.
    fn leaks(&self, text: &str) -> Vec<&'static str> {
        self.forbidden()
            .into_iter()
            .filter(|(_, f)| text.contains(f.as_str()))
            .map(|(name, _)| name)
            .collect()
    }

    /// `text` with every forbidden form replaced by its name, safe to print.
    fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (name, form) in self.forbidden() {
            text = text.replace(&form, &format!("<LEAK:{name}>"));
        }
        text
    }

    /// The placeholder as the upstream's `form` shows it once scrubbed.
    fn expected(&self, form: &str) -> String {
        let ph = self.placeholder.as_bytes();
        match form {
            "header" => format!("x-echo: {}", self.placeholder),
            // `token=` is 6 bytes: the value starts on a base64 group boundary.
            "base64" => base64_core(&STANDARD_NO_PAD, ph, 0),
            "base64url" => base64_core(&URL_SAFE_NO_PAD, ph, 0),
            "percent" => format!("q={}", self.placeholder),
            "trailer" | "trailer-h1" => format!("x-echo-trailer: {}", self.placeholder),
            "zstd" => "zstd".to_owned(),
            "reason" => " 200".to_owned(),
            _ => self.placeholder.clone(),
        }
    }

    /// Asserts one client run: it worked, the upstream got the value, the output shows the
    /// placeholder form `expect` and none of the value's forms.
    fn assert_scrubbed(&self, what: &str, ok: bool, out: &str, expect: &str) {
        let lower = out.to_ascii_lowercase();
        let shown = out.contains(expect) || lower.contains(&expect.to_ascii_lowercase());
        let leaks = self.leaks(out);
        let got = self.upstream_got_the_value();
        assert!(
            ok && shown && leaks.is_empty() && got,
            "{what}: client ok {ok}, placeholder shown {shown}, leaked forms {leaks:?}, \
             upstream got the value {got}; output:\n{}",
            self.redact(out)
        );
    }
}

fn ca_pem(answer: &Value) -> String {
    ["caCertificate", "caCert"]
        .iter()
        .find_map(|k| answer[*k].as_str())
        .expect("PUT answer carries a CA certificate")
        .to_owned()
}

/// The base64 characters of `align` bytes ++ `bytes` ++ anything that depend on `bytes` only.
fn base64_core(engine: &base64::engine::GeneralPurpose, bytes: &[u8], align: usize) -> String {
    let mut padded = vec![0u8; align];
    padded.extend_from_slice(bytes);
    let encoded = engine.encode(&padded);
    let start = (align * 8).div_ceil(6);
    let end = ((align + bytes.len()) * 8 / 6).min(encoded.len());
    encoded[start..end].to_owned()
}

fn percent_lower(v: &[u8]) -> String {
    let upper = percent_encode(v);
    // Only the hex digits after `%` change case.
    let mut out = String::new();
    let mut hex = 0;
    for c in upper.chars() {
        if c == '%' {
            hex = 2;
            out.push(c);
        } else if hex > 0 {
            hex -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// curl over h1 and h2, every form the upstream reflects in; headers dumped with the body.
#[test]
fn curl_sees_only_placeholders_in_every_form() {
    let s = Setup::new("scrub-curl");
    let header = format!("{REFLECT_HEADER}: {}", s.placeholder);
    for flag in ["--http1.1", "--http2"] {
        for form in [
            "header",
            "reason",
            "body",
            "json",
            "base64",
            "base64url",
            "percent",
            "gzip",
            "deflate",
            "br",
            "chunked",
            "trailer",
            "zstd",
        ] {
            let (ok, out) = s.run(
                "curl",
                &[
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
                    &s.url(form),
                ],
            );
            let what = format!("curl {flag} {form}");
            // h1 trailers reach a client only when declared in a `Trailer` header, which veil
            // does not forward: over h1 the trailer is dropped, and only the body shows.
            let expect = if form == "trailer" && flag == "--http1.1" {
                "trailer follows".to_owned()
            } else {
                s.expected(form)
            };
            s.assert_scrubbed(&what, ok, &out, &expect);
            let lower = out.to_ascii_lowercase();
            match form {
                "gzip" | "deflate" | "br" => assert!(
                    !lower.contains("content-encoding"),
                    "{what}: the body was not forwarded as identity"
                ),
                "zstd" => assert!(
                    lower.contains(" 502") && lower.contains("withheld"),
                    "{what}: an undecodable coding was not withheld:\n{}",
                    s.redact(&out)
                ),
                _ => {}
            }
        }
    }
}

/// curl asking for compression: veil offers upstream only what it decodes, and curl decodes
/// nothing (veil forwards identity).
#[test]
fn accept_encoding_is_restricted_and_compressed_echoes_are_scrubbed() {
    let s = Setup::new("scrub-ae");
    let header = format!("{REFLECT_HEADER}: {}", s.placeholder);
    for form in ["gzip", "br", "deflate", "chunked"] {
        let (ok, out) = s.run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "20",
                "-D",
                "-",
                "-H",
                &header,
                "-H",
                "Accept-Encoding: zstd, br;q=0.9, gzip;q=0.8, *;q=0.1",
                "--compressed",
                &s.url(form),
            ],
        );
        s.assert_scrubbed(
            &format!("curl --compressed {form}"),
            ok,
            &out,
            &s.placeholder,
        );
        let seen = s.up.seen();
        let offered = seen
            .last()
            .and_then(|r| r.header("accept-encoding"))
            .unwrap_or_default()
            .to_owned();
        assert!(
            !offered.contains("zstd") && !offered.contains('*') && offered.contains("gzip"),
            "accept-encoding sent upstream: {offered:?}"
        );
    }
}

/// Node's fetch (which asks for gzip, deflate and br and decodes them) and its http2 client
/// (which exposes trailers); Python requests.
#[test]
fn node_and_python_clients_see_only_placeholders() {
    let s = Setup::new("scrub-node");
    let node = node();
    let node = node.to_str().expect("path");
    let fetch = "const k=process.env.MY_KEY;\
                 fetch(process.argv[1],{headers:{'x-reflect':k}})\
                 .then(async r=>{console.log(r.status);for(const [n,v] of r.headers)console.log(n+': '+v);\
                 console.log(await r.text())})\
                 .catch(e=>{console.error(String(e));process.exit(2)})";
    for form in [
        "header", "json", "gzip", "br", "deflate", "chunked", "base64",
    ] {
        let (ok, out) = s.run(node, &["-e", fetch, &s.url(form)]);
        s.assert_scrubbed(&format!("node fetch {form}"), ok, &out, &s.expected(form));
    }

    let h2 = "const http2=require('http2');const u=new URL(process.argv[1]);\
              const c=http2.connect(u.origin);c.on('error',e=>{console.error(String(e));process.exit(2)});\
              const r=c.request({':path':u.pathname,'x-reflect':process.env.MY_KEY});\
              r.setEncoding('utf8');let body='';r.on('data',d=>body+=d);\
              r.on('trailers',t=>{for(const n in t)console.log(n+': '+t[n])});\
              r.on('end',()=>{console.log(body);c.close()});r.end()";
    let (ok, out) = s.run(node, &["-e", h2, &s.url("trailer")]);
    s.assert_scrubbed("node http2 trailer", ok, &out, &s.expected("trailer"));

    let python = python_clients();
    let python = python.to_str().expect("path");
    let requests = "import os,sys,requests\n\
                    r=requests.get(sys.argv[1],headers={'x-reflect':os.environ['MY_KEY']},timeout=20)\n\
                    print(r.status_code, dict(r.headers))\n\
                    print(r.text)";
    for form in ["gzip", "deflate", "percent", "json"] {
        let (ok, out) = s.run(python, &["-c", requests, &s.url(form)]);
        s.assert_scrubbed(
            &format!("python requests {form}"),
            ok,
            &out,
            &s.expected(form),
        );
    }
}

/// The checks above can fail: with scrubbing switched off (a benchmark-only setting), the same
/// echoes show the value to the sandbox in each form the checks look for.
#[test]
fn without_scrubbing_the_checks_see_the_leak() {
    let s = Setup::with_scrubbing("scrub-off", false);
    let header = format!("{REFLECT_HEADER}: {}", s.placeholder);
    for (form, leak) in [
        ("body", "literal"),
        ("base64", "base64"),
        ("base64url", "base64url"),
        ("percent", "percent"),
        ("header", "literal"),
    ] {
        let (ok, out) = s.run(
            "curl",
            &[
                "-sS",
                "--max-time",
                "20",
                "-D",
                "-",
                "-H",
                &header,
                &s.url(form),
            ],
        );
        let leaks = s.leaks(&out);
        assert!(
            ok && leaks.contains(&leak) && s.upstream_got_the_value(),
            "scrubbing off, {form}: client ok {ok}, leaked forms {leaks:?}"
        );
    }
}
