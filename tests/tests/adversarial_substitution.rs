//! Adversarial substitution (issue 13, items 3 and 6), run as a hostile workload would run it:
//! curl inside a sandbox holding placeholders, choosing the bytes around them and the Host it
//! sends, against an allowed upstream that decodes what it gets (path segments, query, form and
//! JSON bodies) and echoes what it decoded.
//!
//! Each case asserts both ends: the upstream decoded exactly the value (never split, partly
//! decoded or transformed) or got nothing, and the sandbox got back only the placeholder. The
//! values mix the characters decoders treat specially (`+ / = % & < > : @ ? # ;`, space,
//! non-ASCII) with two random tokens; a leak is any 8 consecutive characters of a token in the
//! sandbox's output. Nothing here prints a value: outputs are redacted before any message.

use std::time::Duration;

use serde_json::json;
use veil_tests::control::random_token;
use veil_tests::decoding::{Decoded, DecodingUpstream};
use veil_tests::intercept_world::{self, InterceptWorld};
use veil_tests::output_within;

const TIMEOUT: Duration = Duration::from_secs(60);
const ALLOWED: &str = "api.allowed.test";

/// A secret as created through the API, mounted as `env`; `tokens` are the random parts of
/// its value.
struct Secret {
    created: intercept_world::Secret,
    env: &'static str,
    tokens: [String; 2],
}

impl std::ops::Deref for Secret {
    type Target = intercept_world::Secret;

    fn deref(&self) -> &Self::Target {
        &self.created
    }
}

/// What the sandbox got from one curl run.
struct Answer {
    status: u16,
    /// stdout + stderr, lossy.
    text: String,
}

/// A world with the decoding upstream for [`ALLOWED`], veil (metrics on), the secrets, and one
/// sandbox (own netns) with all of them mounted.
struct Setup {
    w: InterceptWorld<DecodingUpstream>,
    secrets: Vec<Secret>,
}

impl Setup {
    /// `values`: (env name, value with `{t1}` and `{t2}` where the random tokens go).
    fn new(tag: &str, values: &[(&'static str, &str)]) -> Setup {
        let mut w = InterceptWorld::builder("adversarial substitution test CA", &[ALLOWED])
            .metrics()
            .start_with(DecodingUpstream::start);
        let mut secrets = Vec::new();
        for (env, template) in values {
            let tokens = [random_token(16), random_token(16)];
            let value = template
                .replace("{t1}", &tokens[0])
                .replace("{t2}", &tokens[1]);
            let name = format!("adv-{}", env.to_ascii_lowercase().replace('_', "-"));
            let created =
                w.secret_valued(&name, value, &[ALLOWED], json!({"bodySubstitution": true}));
            secrets.push(Secret {
                created,
                env,
                tokens,
            });
        }
        let mounts: Vec<(&str, &str)> = secrets.iter().map(|s| (s.env, s.name.as_str())).collect();
        let sb = w.add_sandbox(tag, &mounts);
        for s in &secrets {
            assert_eq!(
                w.answer(sb)["env"][s.env].as_str(),
                Some(s.placeholder.as_str()),
                "PUT answer env"
            );
        }
        Setup { w, secrets }
    }

    fn secret(&self, env: &str) -> &Secret {
        self.secrets
            .iter()
            .find(|s| s.env == env)
            .unwrap_or_else(|| panic!("no secret for {env}"))
    }

    fn url(&self, target: &str) -> String {
        self.w.url(ALLOWED, target)
    }

    /// Runs curl in the sandbox (placeholders in its env, as the workload has them).
    fn curl(&self, args: &[&str]) -> Answer {
        let mut cmd = self.w.sandboxes[0].command("curl");
        cmd.args([
            "-sS",
            "--globoff",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .env("CURL_CA_BUNDLE", &self.w.bundle);
        for s in &self.secrets {
            cmd.env(s.env, &s.placeholder);
        }
        let out = output_within(&mut cmd, TIMEOUT);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = stdout
            .rsplit('\n')
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0);
        Answer {
            status,
            text: format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
        }
    }

    /// GET `target` (placeholders written as `{ENV}`).
    fn get(&self, target: &str, extra: &[&str]) -> (Answer, Option<Decoded>) {
        let mut args: Vec<String> = extra.iter().map(|a| self.fill(a)).collect();
        args.push(self.url(&self.fill(target)));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.exchange(&args)
    }

    /// POST `body` (placeholders written as `{ENV}`) with `content_type` to `target`.
    fn post(&self, target: &str, content_type: &str, body: &str) -> (Answer, Option<Decoded>) {
        let url = self.url(target);
        let ct = format!("content-type: {content_type}");
        let body = self.fill(body);
        self.exchange(&["-H", &ct, "--data-binary", &body, &url])
    }

    /// Runs curl; the request the upstream received for it, if any.
    fn exchange(&self, args: &[&str]) -> (Answer, Option<Decoded>) {
        let before = self.w.up.seen().len();
        let answer = self.curl(args);
        let seen = self.w.up.seen();
        assert!(seen.len() <= before + 1, "one request per run");
        (answer, seen.get(before).cloned())
    }

    fn fill(&self, template: &str) -> String {
        let mut out = template.to_owned();
        for s in &self.secrets {
            out = out.replace(&format!("{{{}}}", s.env), &s.placeholder);
        }
        out
    }

    /// Names of the secrets a piece of which (8 characters of a token) is in `text`.
    fn leaks(&self, text: &str) -> Vec<&str> {
        self.secrets
            .iter()
            .filter(|s| {
                s.tokens.iter().any(|t| {
                    t.as_bytes()
                        .windows(8)
                        .any(|w| text.contains(std::str::from_utf8(w).unwrap_or("\0")))
                })
            })
            .map(|s| s.name.as_str())
            .collect()
    }

    /// `text` with every value and token replaced, safe to print.
    fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for s in &self.secrets {
            text = text.replace(&s.value, &format!("<VALUE:{}>", s.env));
            for (i, t) in s.tokens.iter().enumerate() {
                text = text.replace(t.as_str(), &format!("<T{}:{}>", i + 1, s.env));
            }
        }
        text
    }

    /// A placeholder outcome counter of secret `env` on the agent's metrics endpoint.
    fn placeholders(&self, env: &str, outcome: &str) -> f64 {
        let text = self.w.metrics_text();
        let metric = format!(
            "veil_agent_secret_placeholders_total{{secret=\"{}\",outcome=\"{outcome}\"}} ",
            self.secret(env).id
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&metric))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Checks an exchange the upstream must have decoded into `expect` (the value of `env`
    /// where `{VALUE}` stands), with only the placeholder coming back; the failure, redacted.
    fn whole(
        &self,
        what: &str,
        env: &str,
        expect: &str,
        got: &(Answer, Option<Decoded>),
    ) -> Option<String> {
        let s = self.secret(env);
        let expect = expect.replace("{VALUE}", &s.value);
        let (answer, seen) = got;
        let decoded_exactly = seen
            .as_ref()
            .is_some_and(|d| d.fields.iter().any(|f| f == expect.as_bytes()));
        let fields: Vec<String> = seen
            .iter()
            .flat_map(|d| d.fields.iter())
            .map(|f| self.redact(&String::from_utf8_lossy(f)))
            .collect();
        let placeholder_back = answer.text.contains(&s.placeholder);
        let leaks = self.leaks(&answer.text);
        (answer.status != 200 || !decoded_exactly || !placeholder_back || !leaks.is_empty()).then(
            || {
                format!(
                    "{what}: status {}, upstream decoded exactly {}: {decoded_exactly}, \
                     placeholder came back: {placeholder_back}, leaked: {leaks:?}\n  upstream \
                     decoded fields: {fields:?}\n  sandbox got: {:?}",
                    answer.status,
                    self.redact(&expect),
                    self.redact(&answer.text)
                )
            },
        )
    }

    /// Checks an exchange veil must have refused with a 400 naming secret `env`, with nothing
    /// sent upstream; the failure, redacted.
    fn refused(&self, what: &str, env: &str, got: &(Answer, Option<Decoded>)) -> Option<String> {
        let s = self.secret(env);
        let (answer, seen) = got;
        let named = answer
            .text
            .contains(&format!("secret {} ({})", s.name, s.id));
        let leaks = self.leaks(&answer.text);
        let fields: Vec<String> = seen
            .iter()
            .flat_map(|d| d.fields.iter())
            .map(|f| self.redact(&String::from_utf8_lossy(f)))
            .collect();
        (answer.status != 400 || !named || seen.is_some() || !leaks.is_empty()).then(|| {
            format!(
                "{what}: status {} (want 400), names the secret: {named}, reached the upstream: \
                 {}, leaked: {leaks:?}\n  upstream decoded fields: {fields:?}\n  sandbox got: \
                 {:?}",
                answer.status,
                seen.is_some(),
                self.redact(&answer.text)
            )
        })
    }
}

/// Fails with every collected failure (each already redacted).
fn assert_none(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Starts with hex digits that are also JSON escape letters (`\b`, `\f`), holds a `+`; only
/// characters veil before the fix wrote raw into a request target.
const PLUS: &str = "bf3a{t1}+{t2}";
/// `/` and sub-delimiters, still valid raw in a target: written raw, the path splits.
const SLASHY: &str = "bf3a{t1}/{t2}+=&;:@";
/// Every character a URL or form decoder treats specially.
const SPECIAL: &str = "bf3a{t1}+/=%41&<>:@?#;{t2}";
/// Space, non-ASCII and a literal `+`.
const WIDE: &str = "bf {t1} é/ü+{t2}";

/// The query: a value with `+` (a space once decoded, if written raw) or any other special
/// character arrives as exactly one query value, and comes back as the placeholder.
#[test]
fn query_values_arrive_whole() {
    let s = Setup::new(
        "adv-query",
        &[("PLUS", PLUS), ("SPECIAL", SPECIAL), ("WIDE", WIDE)],
    );
    let mut failures = Vec::new();
    for flag in ["--http1.1", "--http2"] {
        for env in ["PLUS", "SPECIAL", "WIDE"] {
            let mut check = |what: &str, target: &str, expect: &str| {
                let got = s.get(&target.replace("ENV", env), &[flag]);
                failures.extend(s.whole(&format!("{flag} {env} {what}"), env, expect, &got));
            };
            check("query value", "/q?a=1&k={ENV}&z=2", "{VALUE}");
            // A complete escape before the placeholder is the sandbox's own byte.
            check("after %25", "/q?k=%25{ENV}x", "%{VALUE}x");
            check("query key", "/q?{ENV}=1", "{VALUE}");
            check("inside a value", "/q?k=pre{ENV}post", "pre{VALUE}post");
        }
    }
    assert_none(&failures);
}

/// The path: a value with `/`, `?`, `#`, `%` arrives as one segment, decoded exactly; tokens
/// with `:` (Telegram's `/bot<id>:<secret>/`) go out raw, as the API expects them.
#[test]
fn path_values_arrive_whole_and_colons_stay_raw() {
    let s = Setup::new(
        "adv-path",
        &[
            ("SLASHY", SLASHY),
            ("SPECIAL", SPECIAL),
            ("WIDE", WIDE),
            ("TG", "123456:AA{t1}-{t2}_x"),
        ],
    );
    let mut failures = Vec::new();
    for flag in ["--http1.1", "--http2"] {
        for env in ["SLASHY", "SPECIAL", "WIDE"] {
            let got = s.get(&format!("/p/{{{env}}}/end"), &[flag]);
            failures.extend(s.whole(&format!("{flag} {env} segment"), env, "{VALUE}", &got));
            let got = s.get(&format!("/p/x{{{env}}}y/end"), &[flag]);
            failures.extend(s.whole(
                &format!("{flag} {env} in a segment"),
                env,
                "x{VALUE}y",
                &got,
            ));
        }
        let got = s.get("/bot{TG}/getMe", &[flag]);
        failures.extend(s.whole(&format!("{flag} telegram"), "TG", "bot{VALUE}", &got));
        let tg = s.secret("TG");
        let raw = got
            .1
            .as_ref()
            .is_some_and(|d| d.target == format!("/bot{}/getMe", tg.value));
        if !raw {
            failures.push(format!("{flag}: the telegram token did not go out raw"));
        }
    }
    assert_none(&failures);
}

/// Form and JSON bodies: the value arrives as exactly one field, in every string context.
#[test]
fn body_values_arrive_whole() {
    let s = Setup::new(
        "adv-body",
        &[("PLUS", PLUS), ("SPECIAL", SPECIAL), ("WIDE", WIDE)],
    );
    const FORM: &str = "application/x-www-form-urlencoded";
    let mut failures = Vec::new();
    for env in ["PLUS", "SPECIAL", "WIDE"] {
        let got = s.post("/form", FORM, &format!("a=1&k={{{env}}}&z=2"));
        failures.extend(s.whole(&format!("form {env}"), env, "{VALUE}", &got));
        let got = s.post("/form", FORM, &format!("a=%25{{{env}}}"));
        failures.extend(s.whole(&format!("form after %25 {env}"), env, "%{VALUE}", &got));
        let json = format!(
            r#"{{"k":"{{{env}}}","{{{env}}}":1,"l":["x\\{{{env}}}\n"],"u":"\u0041{{{env}}}"}}"#
        );
        let got = s.post("/json", "application/json", &json);
        failures.extend(s.whole(&format!("json value {env}"), env, "{VALUE}", &got));
        failures.extend(s.whole(&format!("json after \\\\ {env}"), env, "x\\{VALUE}\n", &got));
        failures.extend(s.whole(&format!("json after \\u0041 {env}"), env, "A{VALUE}", &got));
    }
    assert_none(&failures);
}

/// A placeholder right after `%` or an incomplete escape (target, form body), or after a lone
/// `\` or an incomplete `\u` escape (JSON body), or outside a JSON string, is refused with a
/// 400 naming the secret: otherwise the upstream decodes the value's first characters together
/// with the sandbox's bytes and echoes the rest of the value in a form no scrubber knows.
#[test]
fn a_placeholder_after_an_incomplete_escape_is_refused() {
    let s = Setup::new("adv-escape", &[("PLUS", PLUS)]);
    let mut failures = Vec::new();
    for flag in ["--http1.1", "--http2"] {
        for target in [
            "/q?k=%{PLUS}",
            "/q?k=%4{PLUS}",
            "/q?k=%%{PLUS}",
            "/p/%{PLUS}",
            "/p/x%b{PLUS}",
        ] {
            let got = s.get(target, &[flag]);
            failures.extend(s.refused(&format!("{flag} {target}"), "PLUS", &got));
        }
    }
    for body in ["k=%{PLUS}", "k=%4{PLUS}", "a=1&k=x%{PLUS}"] {
        let got = s.post("/form", "application/x-www-form-urlencoded", body);
        failures.extend(s.refused(&format!("form {body}"), "PLUS", &got));
    }
    for body in [
        r#"{"k":"\u00{PLUS}"}"#,
        r#"{"k":"\u0{PLUS}"}"#,
        r#"{"k":"\u{PLUS}"}"#,
        r#"{"k":"\{PLUS}"}"#,
        r#"{"k":"\\\{PLUS}"}"#,
        r#"{"k":{PLUS}}"#,
        r#"["a",{PLUS}]"#,
    ] {
        let got = s.post("/json", "application/json", body);
        failures.extend(s.refused(&format!("json {body}"), "PLUS", &got));
    }
    assert_none(&failures);
}

/// Host / `:authority` must equal the SNI: a `:port` other than the connection's, IDNA
/// look-alikes (full-width letters), userinfo or a second trailing dot get nothing substituted
/// (counted as host_mismatch); upper case and one trailing dot are the same name.
#[test]
fn host_must_equal_the_sni() {
    let s = Setup::new("adv-host", &[("KEY", "sk-{t1}-{t2}")]);
    let port = s.w.up.addr().port();
    let key = s.secret("KEY");
    let bad = [
        "ａｐｉ.allowed.test".to_owned(),
        format!("ａｐｉ.allowed.test:{port}"),
        format!("api.allowed.test:{}", if port == 1 { 2 } else { port - 1 }),
        "api.allowed.test:443".to_owned(),
        format!("api.allowed.test:0{port}"),
        format!("api.allowed.test..:{port}"),
        format!("user@api.allowed.test:{port}"),
        format!("api.allowed.test.:{port}:{port}"),
    ];
    let good = [
        format!("API.ALLOWED.TEST:{port}"),
        format!("api.allowed.test.:{port}"),
        "api.allowed.test".to_owned(),
    ];
    let mut failures = Vec::new();
    for flag in ["--http1.1", "--http2"] {
        for host in &bad {
            let before = s.placeholders("KEY", "host_mismatch");
            let h = format!("Host: {host}");
            let got = s.get("/h?k={KEY}", &[flag, "-H", &h, "-H", "x-key: Bearer {KEY}"]);
            let sent = got.1.as_ref().is_some_and(|d| {
                d.carries(key.value.as_bytes())
                    || key.tokens.iter().any(|t| d.carries(t.as_bytes()))
            });
            if sent {
                failures.push(format!("{flag} Host {host:?}: the value was sent upstream"));
            } else if got.1.is_some() {
                let after = s.placeholders("KEY", "host_mismatch");
                if after < before + 2.0 {
                    failures.push(format!(
                        "{flag} Host {host:?}: host_mismatch counted {before} -> {after}"
                    ));
                }
            }
        }
        for host in &good {
            let h = format!("Host: {host}");
            let got = s.get("/h?k={KEY}", &[flag, "-H", &h]);
            failures.extend(s.whole(&format!("{flag} Host {host:?}"), "KEY", "{VALUE}", &got));
        }
    }
    assert_none(&failures);
}
