//! Unit and property tests of the scrubber as a whole; the coverage list is in `coverage`.

use super::forms;
use super::*;
use crate::secret::testing::secret;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use proptest::prelude::*;

const VALUE: &str = "sk-live/Zq+9 x?y=1&z";

fn patterns() -> ScrubPatterns {
    ScrubPatterns::new(&[
        secret("a", VALUE, &[]),
        secret("b", "tok_BBBBBBBBBBBB", &["x.test"]),
    ])
}

fn stream(p: &ScrubPatterns, chunks: &[&[u8]]) -> Vec<u8> {
    let mut s = Scrubber::new(p);
    let mut out = Vec::new();
    for c in chunks {
        s.push(c, &mut out);
        assert!(s.pending_len() <= p.max_len().saturating_sub(1));
    }
    s.finish(&mut out);
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn literal_and_percent_forms() {
    let p = patterns();
    let body = format!(
        "echo: {VALUE} | {} | {} | {} | tok_BBBBBBBBBBBB.",
        "sk-live%2FZq%2B9%20x%3Fy%3D1%26z",
        "sk-live%2fZq%2b9%20x%3fy%3d1%26z",
        "sk-live%2FZq%2B9+x%3Fy%3D1%26z"
    );
    let out = String::from_utf8(p.scrub_all(body.as_bytes()).unwrap()).unwrap();
    assert_eq!(
        out,
        "echo: ph_a_placeholder | ph_a_placeholder | ph_a_placeholder | ph_a_placeholder | ph_b_placeholder."
    );
    assert_eq!(p.secrets_in(body.as_bytes()), vec![0, 1]);
    assert!(p.scrub_all(b"nothing here").is_none());
}

#[test]
fn base64_every_alignment_both_alphabets() {
    let p = patterns();
    for engine in [&STANDARD, &URL_SAFE] {
        for prefix_len in 0..6 {
            for suffix_len in 0..4 {
                let mut doc = vec![b'p'; prefix_len];
                doc.extend_from_slice(VALUE.as_bytes());
                doc.extend(std::iter::repeat_n(b's', suffix_len));
                let encoded = engine.encode(&doc);
                let out = p.scrub_all(encoded.as_bytes()).expect("value found");
                let decoded = engine.decode(&out).unwrap_or_default();
                // No 3-byte window of the value's inner part survives in the decoded text.
                let inner = &VALUE.as_bytes()[1..VALUE.len() - 1];
                for w in inner.windows(3) {
                    assert!(!contains(&decoded, w), "{prefix_len}/{suffix_len}");
                }
                assert!(!contains(
                    &out,
                    &forms::base64_core(engine_no_pad(engine), VALUE.as_bytes(), prefix_len % 3)
                ));
                // Placeholder and value lengths are equal modulo 3: the placeholder decodes
                // cleanly between the boundary bytes.
                if "ph_a_placeholder".len() % 3 == VALUE.len() % 3 {
                    assert!(
                        contains(&decoded, b"h_a_placeholde"),
                        "{prefix_len}/{suffix_len}"
                    );
                }
            }
        }
    }
}

fn engine_no_pad(e: &base64::engine::GeneralPurpose) -> &'static base64::engine::GeneralPurpose {
    if std::ptr::eq(e, &STANDARD) {
        &STANDARD_NO_PAD
    } else {
        &URL_SAFE_NO_PAD
    }
}

#[test]
fn value_split_across_chunks() {
    let p = patterns();
    let body = format!("<html>{VALUE}</html>{VALUE}");
    let b = body.as_bytes();
    let want = p.scrub_all(b).unwrap();
    for cut in 0..b.len() {
        assert_eq!(stream(&p, &[&b[..cut], &b[cut..]]), want, "cut {cut}");
    }
    let single: Vec<&[u8]> = b.chunks(1).collect();
    assert_eq!(stream(&p, &single), want);
    let mut s = Scrubber::new(&p);
    let mut out = Vec::new();
    for c in &single {
        s.push(c, &mut out);
    }
    s.finish(&mut out);
    assert_eq!(s.counts(), &[(0, 2)]);
}

#[test]
fn no_secrets_passes_through() {
    let p = ScrubPatterns::new(&[]);
    assert!(!p.is_active());
    assert_eq!(stream(&p, &[b"abc", b"def"]), b"abcdef");
    assert!(p.scrub_all(b"abc").is_none());
}

#[test]
fn debug_never_shows_values() {
    let p = patterns();
    let mut s = Scrubber::new(&p);
    let mut out = Vec::new();
    s.push(&VALUE.as_bytes()[..5], &mut out);
    let dbg = format!("{p:?} {s:?}");
    assert!(!dbg.contains("sk-li") && !dbg.contains("tok_"), "{dbg}");
}

#[test]
fn json_escapes() {
    let value = "k/\"q\\é\u{1}";
    let p = ScrubPatterns::new(&[secret("j", value, &[])]);
    for form in [
        "k/\\\"q\\\\é\\u0001",
        "k\\/\\\"q\\\\é\\u0001",
        "k/\\\"q\\\\\\u00e9\\u0001",
        "k\\/\\\"q\\\\\\u00E9\\u0001",
    ] {
        let doc = format!("{{\"echo\":\"{form}\"}}");
        let out = p.scrub_all(doc.as_bytes()).expect("escaped value found");
        assert_eq!(out, b"{\"echo\":\"ph_j_placeholder\"}");
    }
    // What serde_json writes is one of them.
    let json = serde_like(value);
    assert!(p.scrub_all(json.as_bytes()).is_some());
}

/// serde_json's escaping, spelled out (no serde dependency here).
fn serde_like(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[test]
fn scrub_counted_and_length() {
    let p = patterns();
    let body = format!("{VALUE}-{VALUE}-tok_BBBBBBBBBBBB");
    let (out, n) = p.scrub_counted(body.as_bytes()).unwrap();
    assert_eq!(n, 3);
    assert!(!contains(&out, VALUE.as_bytes()));
    assert!(!p.preserves_length());
    // Numeric HTML references and windows are replaced by the whole placeholder: lengths change.
    let same = ScrubPatterns::new(&[secret("s", "0123456789abcdef", &[])]);
    assert!(!same.preserves_length());
}

/// Splits `data` at the given cut points.
fn chunks(data: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
    cuts.iter_mut().for_each(|c| *c %= data.len() + 1);
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts {
        out.push(&data[prev..c]);
        prev = c;
    }
    out.push(&data[prev..]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Streaming with any chunking equals the whole-buffer scrub.
    #[test]
    fn streaming_equals_whole_buffer(
        values in prop::collection::vec("[a-c]{1,6}", 1..4),
        parts in prop::collection::vec(prop_oneof!["[a-d]{0,5}", "[a-c]{1,6}"], 0..12),
        cuts in prop::collection::vec(any::<usize>(), 0..10),
    ) {
        let secrets: Vec<_> = values.iter().enumerate().map(|(i, v)| secret(&i.to_string(), v, &[])).collect();
        let p = ScrubPatterns::new(&secrets);
        let data = parts.concat().into_bytes();
        let want = p.scrub_all(&data).unwrap_or_else(|| data.clone());
        prop_assert_eq!(stream(&p, &chunks(&data, cuts)), want);
    }

    /// Embedded values, in every form, never survive scrubbing, whatever the chunking.
    #[test]
    fn embedded_values_never_survive(
        value in "[!-~]{12,24}",
        noise in prop::collection::vec("[ -~]{0,20}", 1..5),
        form in 0usize..4,
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let p = ScrubPatterns::new(&[secret("v", &value, &[])]);
        let mut doc = noise.join(&value).into_bytes();
        if noise.len() == 1 {
            doc.extend_from_slice(value.as_bytes());
        }
        let (wire, needle): (Vec<u8>, Vec<u8>) = match form {
            0 => (doc.clone(), value.clone().into_bytes()),
            1 => (STANDARD.encode(&doc).into_bytes(), value.clone().into_bytes()),
            2 => (URL_SAFE.encode(&doc).into_bytes(), value.clone().into_bytes()),
            _ => (forms::percent(&doc, b"")[0].0.to_vec(), value.clone().into_bytes()),
        };
        let out = stream(&p, &chunks(&wire, cuts));
        let decoded = match form {
            1 => STANDARD.decode(&out).unwrap_or_else(|_| out.clone()),
            2 => URL_SAFE.decode(&out).unwrap_or_else(|_| out.clone()),
            _ => out.clone(),
        };
        prop_assert!(!contains(&out, &needle));
        // Base64 boundaries may keep a byte at each end, never the inner value.
        let inner = &needle[1..needle.len() - 1];
        prop_assert!(!contains(&decoded, inner));
    }
}

/// Scrubbing throughput; run with
/// `cargo test -p veil-policy --release --lib -- --ignored --nocapture perf_scrub`.
#[test]
#[ignore = "timing, run by hand in release mode"]
fn perf_scrub() {
    use std::hint::black_box;
    use std::time::Instant;
    let secrets: Vec<_> = (0..8)
        .map(|i| {
            secret(
                &format!("s{i}"),
                &format!("sk-{i}-0123456789abcdef0123456789abcdef"),
                &[],
            )
        })
        .collect();
    let p = ScrubPatterns::new(&secrets);
    let json: Vec<u8> = (0..64 * 1024)
        .map(|i| b"{\"id\": 12345, \"text\": \"lorem ipsum\"}\n"[i % 36])
        .collect();
    // Pseudo-random base64 text: every byte is a candidate start for some pattern.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..48 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let b64 = STANDARD.encode(&random).into_bytes();
    // Secrets as API keys look: 40 random base62 characters after a prefix.
    let tokens: Vec<_> = (0..8)
        .map(|i| {
            let token: String = (0..40)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                            [(x % 62) as usize],
                    )
                })
                .collect();
            secret(&format!("s{i}"), &format!("sk-{token}"), &[])
        })
        .collect();
    let built = Instant::now();
    let random_tokens = ScrubPatterns::new(&tokens);
    println!(
        "build patterns for 8 random-token secrets: {:.1} ms",
        built.elapsed().as_secs_f64() * 1000.0
    );
    for (label, p, body) in [
        ("JSON text", &p, &json),
        ("base64 of random bytes", &p, &b64),
        ("JSON text, random-token secrets", &random_tokens, &json),
        (
            "base64 of random bytes, random-token secrets",
            &random_tokens,
            &b64,
        ),
    ] {
        let iters = 2_000u32;
        let mut out = Vec::with_capacity(body.len() + 1024);
        let start = Instant::now();
        for _ in 0..iters {
            out.clear();
            let mut s = Scrubber::new(p);
            for c in body.chunks(16 * 1024) {
                s.push(black_box(c), &mut out);
            }
            s.finish(&mut out);
            black_box(&out);
        }
        let secs = start.elapsed().as_secs_f64();
        let mib = f64::from(iters) * body.len() as f64 / (1024.0 * 1024.0);
        println!(
            "scrub 64 KiB {label} in 16 KiB chunks, 8 secrets ({} patterns, {} KiB): {:.0} MiB/s",
            p.pattern_count(),
            p.memory_usage() / 1024,
            mib / secs
        );
    }
}

/// Scrubs `doc` whole and in every two-chunk split; all must agree.
fn scrub_everyway(p: &ScrubPatterns, doc: &[u8]) -> Vec<u8> {
    let whole = p.scrub_all(doc).unwrap_or_else(|| doc.to_vec());
    for cut in 0..=doc.len() {
        assert!(
            stream(p, &[&doc[..cut], &doc[cut..]]) == whole,
            "cut {cut}: streaming differs"
        );
    }
    whole
}

#[test]
fn short_values_inside_basic_credentials() {
    // Characters outside the base64 alphabet, so the literal value never occurs in a token.
    for value in ["#", "p!n1", "s3(r)t", "ab#de!"] {
        let p = ScrubPatterns::new(&[secret("b", value, &[])]);
        for user in [
            "",
            "u",
            "us",
            "user",
            "a-much-longer-user-name-to-move-the-alignment",
        ] {
            let token = STANDARD.encode(format!("{user}:{value}"));
            for doc in [
                format!("Authorization: Basic {token}\r\n"),
                format!("{{\"Authorization\":\"basic  {token}\",\"x\":1}}"),
                format!("BASIC\t{token}"),
            ] {
                let out = scrub_everyway(&p, doc.as_bytes());
                let text = String::from_utf8(out).unwrap();
                let token_out = text
                    .split(['\t', ' '])
                    .rfind(|s| !s.is_empty())
                    .unwrap_or_default()
                    .trim_end_matches(['\r', '\n', '"', ',', '}', '1', ':', 'x']);
                let decoded = STANDARD
                    .decode(token_out.trim_end_matches('"'))
                    .unwrap_or_default();
                assert!(!contains(&decoded, value.as_bytes()), "{user}");
                let want = STANDARD.encode(format!("{user}:ph_b_placeholder"));
                assert!(text.contains(&want), "{user}: token not rewritten");
            }
        }
    }
}

#[test]
fn basic_tokens_without_values_are_untouched() {
    let p = ScrubPatterns::new(&[secret("b", "pin1", &[])]);
    for doc in [
        "WWW-Authenticate: Basic realm=\"x\"",
        "Basic dXNlcjpvdGhlcg==",
        "Basic dXNlcjpvdGhlcg",
        "basic !!",
        "basic",
        "a basic idea, basically",
        "Basic dXNlcjpvdGhlcg=x=",
        "Basic =abc",
    ] {
        assert_eq!(scrub_everyway(&p, doc.as_bytes()), doc.as_bytes(), "{doc}");
    }
    // Unpadded in, unpadded out.
    let token = STANDARD_NO_PAD.encode("u:pin1");
    let out = scrub_everyway(&p, format!("Basic {token}").as_bytes());
    assert_eq!(
        out,
        format!("Basic {}", STANDARD_NO_PAD.encode("u:ph_b_placeholder")).as_bytes()
    );
}

#[test]
fn truncated_echoes_are_replaced_from_the_first_window_on() {
    let value = "sk-live-0123456789abcdefghijklmnopqrstuv";
    let p = ScrubPatterns::new(&[secret("t", value, &[])]);
    for (start, end) in [
        (0, 12),
        (0, 20),
        (5, 30),
        (20, value.len()),
        (3, value.len() - 1),
    ] {
        let doc = format!("invalid key {}... try again", &value[start..end]);
        let out = String::from_utf8(scrub_everyway(&p, doc.as_bytes())).unwrap();
        assert_eq!(
            out, "invalid key ph_t_placeholder... try again",
            "{start}..{end}"
        );
    }
    // 11 bytes are not a window.
    let doc = format!("shown: {}", &value[..11]);
    assert_eq!(scrub_everyway(&p, doc.as_bytes()), doc.as_bytes());
}

#[test]
fn jwt_header_and_payload_and_pem_armor_are_not_windows() {
    let header = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
    let payload = "eyJzdWIiOiIxMjM0NTY3ODkwIiwicm9sZSI6InNlcnZpY2Vfcm9sZSJ9";
    let sig = "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
    let jwt = format!("{header}.{payload}.{sig}");
    let p = ScrubPatterns::new(&[secret("j", &jwt, &[])]);
    // Another token of the same issuer passes untouched.
    let other = format!("{header}.{payload}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_eq!(scrub_everyway(&p, other.as_bytes()), other.as_bytes());
    // The signature, even cut, does not.
    let cut = format!("sig={}", &sig[3..20]);
    assert_eq!(scrub_everyway(&p, cut.as_bytes()), b"sig=ph_j_placeholder");
    assert!(p.scrub_all(jwt.as_bytes()).is_some());

    let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n";
    let p = ScrubPatterns::new(&[secret("k", pem, &[])]);
    let armor = "-----BEGIN PRIVATE KEY-----\nsomething else\n-----END PRIVATE KEY-----";
    assert_eq!(scrub_everyway(&p, armor.as_bytes()), armor.as_bytes());
    let body = "BADANBgkqhkiG9w0BAQEFAASC";
    assert!(p.scrub_all(body.as_bytes()).is_some());
}

#[test]
fn union_scrubs_the_values_of_both_policies() {
    use crate::sandbox::SandboxPolicy;
    let p1 = SandboxPolicy::new(vec![secret("a", "first-value-0123456789", &[])]).unwrap();
    let mut rotated = secret("a", "second-value-987654321", &[]);
    rotated.previous = Vec::new();
    let p2 = SandboxPolicy::new(vec![rotated, secret("c", "mounted-later-abcdefgh", &[])]).unwrap();
    let u = p1.scrub_union(&p2);
    for v in [
        "first-value-0123456789",
        "second-value-987654321",
        "mounted-later-abcdefgh",
    ] {
        assert!(u.scrub_all(v.as_bytes()).is_some(), "{v}");
    }
    assert!(
        p1.scrub_patterns()
            .scrub_all(b"second-value-987654321")
            .is_none()
    );
    // A stream switched to the union goes on with what it held back (raw input, rescanned).
    let mut s = ScrubState::default();
    let mut out = Vec::new();
    s.push(p1.scrub_patterns(), b"echo: first-value-01", &mut out);
    assert!(s.pending_len() > 0);
    s.push(&u, b"23456789 and second-value-987654321 end", &mut out);
    s.finish(&u, &mut out);
    assert_eq!(out, b"echo: ph_a_placeholder and ph_a_placeholder end");
}

#[test]
fn hex_html_go_json_and_wrapped_base64() {
    let value = "s3cr3t+/=<&>\"'-value";
    let p = ScrubPatterns::new(&[secret("h", value, &[])]);
    let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    let go = value
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('"', "\\\"");
    let html = value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&#34;")
        .replace('\'', "&#39;")
        .replace('+', "&#43;");
    for doc in [hex.clone(), hex.to_uppercase(), go, html] {
        let out = scrub_everyway(&p, doc.as_bytes());
        assert!(!contains(&out, doc.as_bytes()), "{doc}");
    }
    for prefix in 0..70 {
        let text = STANDARD.encode([vec![b'p'; prefix], value.as_bytes().to_vec()].concat());
        for (columns, eol) in [(76, "\r\n"), (64, "\n")] {
            let wrapped: Vec<String> = text
                .as_bytes()
                .chunks(columns)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            let wrapped = wrapped.join(eol);
            let out = p.scrub_all(wrapped.as_bytes()).expect("found");
            let flat: Vec<u8> = out
                .iter()
                .copied()
                .filter(|c| !b"\r\n".contains(c))
                .collect();
            let core = forms::base64_core(&STANDARD_NO_PAD, value.as_bytes(), prefix % 3);
            assert!(!contains(&flat, &core), "{prefix}");
        }
    }
}

#[test]
fn only_what_may_begin_a_match_is_held_back() {
    let p = ScrubPatterns::new(&[secret("s", "sk-live-0123456789abcdefghij", &[])]);
    let mut s = Scrubber::new(&p);
    let mut out = Vec::new();
    // A server-sent event goes out whole: nothing in it may begin a value.
    s.push(b"data: {\"delta\": \"hello\"}\n\n", &mut out);
    assert_eq!(s.pending_len(), 0);
    assert_eq!(out, b"data: {\"delta\": \"hello\"}\n\n");
    // The start of a value is held until it is decided.
    s.push(b"data: sk-live-01", &mut out);
    assert_eq!(s.pending_len(), "sk-live-01".len());
    s.push(b"23456789abcdefghij\n\n", &mut out);
    s.finish(&mut out);
    assert!(out.ends_with(b"data: ph_s_placeholder\n\n"));
}
