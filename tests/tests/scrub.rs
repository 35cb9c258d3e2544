//! Response scrubbing end to end (issue 6): an upstream that echoes the value it received — in a
//! header, the reason phrase, the body (literal, JSON, base64, URL-safe base64, percent-encoded),
//! compressed (gzip, deflate, br), streamed with the value cut across chunks, or in a trailer —
//! reaches real clients in the sandbox only as the placeholder (or its same encoding).
//!
//! Every assertion also checks that the upstream did get the value, so a test cannot pass by
//! substitution failing. Nothing here prints a value or an encoding of it: outputs are redacted
//! before they reach a message, and comparisons report booleans.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use serde_json::json;
use veil_tests::clients::{node, python_clients};
use veil_tests::control::random_token;
use veil_tests::https::{REFLECT_HEADER, percent_encode};
use veil_tests::intercept_world::{InterceptWorld, Secret, run_text};
use veil_tests::{HttpsUpstream, UpstreamReply};

const HOST: &str = "api.echo.test";

/// A reflecting TLS upstream for [`HOST`], veil, a secret allowed for it, and a sandbox (own
/// netns) with the secret mounted as `MY_KEY`.
struct Setup {
    w: InterceptWorld,
    key: Secret,
}

impl Setup {
    fn new(tag: &str) -> Setup {
        Setup::with_scrubbing(tag, true)
    }

    /// As [`Setup::new`]; `scrub = false` turns scrubbing off (`scrub_responses`).
    fn with_scrubbing(tag: &str, scrub: bool) -> Setup {
        let mut w = InterceptWorld::builder("scrub test CA", &[HOST])
            .config(if scrub {
                ""
            } else {
                "scrub_responses = false\n"
            })
            .start_with(|ns, ip, ca, names| {
                HttpsUpstream::start_with(ns, ip, Some((ca, names)), UpstreamReply::Reflect)
            });
        // `/` and `+` make the percent-encoded and JSON (`\/`) forms differ from the literal.
        let value = format!("sk-test/{}+{}", random_token(20), random_token(20));
        let key = w.secret_valued("echo-key", value, &[HOST], json!({}));
        let sb = w.add_sandbox(tag, &[("MY_KEY", "echo-key")]);
        assert_eq!(
            w.answer(sb)["env"]["MY_KEY"].as_str(),
            Some(key.placeholder.as_str()),
            "PUT answer env"
        );
        Setup { w, key }
    }

    fn url(&self, form: &str) -> String {
        self.w.url(HOST, &format!("/reflect/{form}"))
    }

    /// Runs `program args` in the sandbox with the placeholder and CA trust in its env; returns
    /// success and stdout + stderr as (lossy) text.
    fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let mut cmd = self.w.command(0, program);
        cmd.args(args).env("MY_KEY", &self.key.placeholder);
        run_text(&mut cmd)
    }

    /// Whether the last request reached the upstream carrying the value to reflect.
    fn upstream_got_the_value(&self) -> bool {
        self.w
            .up
            .seen()
            .last()
            .and_then(|r| r.header(REFLECT_HEADER).map(|v| v == self.key.value))
            == Some(true)
    }

    /// The value in every form the scrubber must remove, by name.
    fn forbidden(&self) -> Vec<(&'static str, String)> {
        let v = self.key.value.as_bytes();
        let mut forms = vec![
            ("literal", self.key.value.clone()),
            ("percent", percent_encode(v)),
            ("percent-lower", percent_lower(v)),
            ("json-slash", self.key.value.replace('/', "\\/")),
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
        let ph = self.key.placeholder.as_bytes();
        match form {
            "header" => format!("x-echo: {}", self.key.placeholder),
            // `token=` is 6 bytes: the value starts on a base64 group boundary.
            "base64" => base64_core(&STANDARD_NO_PAD, ph, 0),
            "base64url" => base64_core(&URL_SAFE_NO_PAD, ph, 0),
            "percent" => format!("q={}", self.key.placeholder),
            "trailer" | "trailer-h1" => format!("x-echo-trailer: {}", self.key.placeholder),
            "zstd" => "zstd".to_owned(),
            "reason" => " 200".to_owned(),
            _ => self.key.placeholder.clone(),
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
    let header = format!("{REFLECT_HEADER}: {}", s.key.placeholder);
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
            // h1 trailers reach a client that sent `TE: trailers` (issue 20): veil forwards the
            // `Trailer` header that declares them.
            let expect = s.expected(form);
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
    let header = format!("{REFLECT_HEADER}: {}", s.key.placeholder);
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
            &s.key.placeholder,
        );
        let seen = s.w.up.seen();
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
    let header = format!("{REFLECT_HEADER}: {}", s.key.placeholder);
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
