//! The list of encodings the scrubber covers (SECURITY.md's list, one entry per line of
//! [`LIST`]), each checked over random values — with `+ / = % & < > " '`, spaces, non-ASCII and
//! short ones — embedded in random text and streamed in random chunks: the encoded value never
//! survives. The encoders here are written apart from the scrubber's own (`forms`), after the
//! libraries named, so a mistake in one is not copied into the other.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use proptest::prelude::*;
use veil_link::proto::SecretValue;

use super::{MIN_ENCODED_LEN, ScrubPatterns, Scrubber, WINDOW};
use crate::secret::MountedSecret;

/// Every covered encoding, as SECURITY.md lists it, with its minimum.
const LIST: &[&str] = &[
    "literal (any length)",
    "json: serde_json / JSON.stringify (any length)",
    "json: PHP json_encode, \\/ and \\uxxxx (any length)",
    "json: Python json.dumps, \\uxxxx (any length)",
    "json: Go encoding/json, \\u003c \\u003e \\u0026 \\u2028 \\u2029 (any length)",
    "json: Go SetEscapeHTML(false), \\u2028 \\u2029 (any length)",
    "json: Gson, also \\u003d \\u0027 (any length)",
    "json: Jackson ESCAPE_NON_ASCII, \\uXXXX (any length)",
    "html: Python html.escape / Django (any length)",
    "html: Go html.EscapeString / MarkupSafe (any length)",
    "html: Go html/template, &#43; (any length)",
    "html: Go html/template unquoted attribute (any length)",
    "html: PHP htmlspecialchars, &#039; (any length)",
    "html: Ruby CGI.escapeHTML / ERB / lodash / escape-html (any length)",
    "html: Java escapeHtml4 (any length)",
    "html: & < > only (any length)",
    "html: non-alphanumerics as &#NN; (any length)",
    "html: non-alphanumerics as &#xhh; (any length)",
    "html: non-alphanumerics as &#xHH; (any length)",
    "html: OWASP ESAPI encodeForHTML (any length)",
    "html: every character as &#NN; (any length)",
    "html: every character as &#xhh; (any length)",
    "html: every character as &#xHH; (any length)",
    "percent: RFC 3986, upper-case hex (>= 8 chars)",
    "percent: RFC 3986, lower-case hex (>= 8 chars)",
    "percent: form encoding, + for space (>= 8 chars)",
    "percent: encodeURIComponent (>= 8 chars)",
    "percent: encodeURI (>= 8 chars)",
    "percent: Python quote (>= 8 chars)",
    "percent: Go url.PathEscape (>= 8 chars)",
    "hex: lower case (>= 8 chars: values of 4 bytes or more)",
    "hex: upper case (>= 8 chars)",
    "base64: standard, any alignment (>= 8 chars)",
    "base64: URL-safe, any alignment (>= 8 chars)",
    "base64: MIME, 76 columns, \\r\\n (>= 8 chars)",
    "base64: MIME, 76 columns, \\n, Python base64.encodebytes (>= 8 chars)",
    "base64: PEM, 64 columns, \\n (>= 8 chars)",
    "base64: PEM, 64 columns, \\r\\n (>= 8 chars)",
    "basic: Authorization: Basic base64(user:value) (any length)",
    "truncated: any 12 consecutive bytes of a value (values of 13 bytes or more)",
];

const PLACEHOLDER: &str = "~~~~~~~~~~~~~~~~~~";

fn json(v: &str, slash: bool, non_ascii: Option<bool>, also: &[char]) -> String {
    let mut out = String::new();
    for c in v.chars() {
        let u = |out: &mut String, c: char, upper: bool| {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&if upper {
                    format!("\\u{unit:04X}")
                } else {
                    format!("\\u{unit:04x}")
                });
            }
        };
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '/' if slash => out.push_str("\\/"),
            c if (c as u32) < 0x20 => u(&mut out, c, non_ascii == Some(true)),
            c if also.contains(&c) => u(&mut out, c, false),
            c if !c.is_ascii() && non_ascii.is_some() => {
                u(&mut out, c, non_ascii == Some(true));
            }
            c => out.push(c),
        }
    }
    out
}

/// An HTML escaper: `table` maps characters to references; others stay.
fn html(v: &str, table: &[(char, &str)]) -> String {
    v.chars()
        .map(|c| {
            table
                .iter()
                .find(|(k, _)| *k == c)
                .map_or_else(|| c.to_string(), |(_, r)| (*r).to_owned())
        })
        .collect()
}

fn numeric(v: &str, all: bool, style: u8) -> String {
    v.chars()
        .map(|c| {
            if !all && c.is_ascii_alphanumeric() {
                return c.to_string();
            }
            let n = c as u32;
            match style {
                0 => format!("&#{n};"),
                1 => format!("&#x{n:x};"),
                _ => format!("&#x{n:X};"),
            }
        })
        .collect()
}

fn esapi(v: &str) -> String {
    v.chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() || ",.-_ ".contains(c) => c.to_string(),
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            c => format!("&#x{:x};", c as u32),
        })
        .collect()
}

fn percent(v: &[u8], safe: &str, lower: bool, plus: bool) -> String {
    v.iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || safe.as_bytes().contains(&b) {
                char::from(b).to_string()
            } else if plus && b == b' ' {
                "+".into()
            } else if lower {
                format!("%{b:02x}")
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Base64 of `prefix ++ v ++ suffix` (padded), and the characters in it made of `v`'s bits only.
fn base64_in(engine: &base64::engine::GeneralPurpose, prefix: &[u8], v: &[u8]) -> (String, String) {
    let doc = [prefix, v, b"!tail"].concat();
    let text = engine.encode(&doc);
    let start = (prefix.len() * 8).div_ceil(6);
    let end = (prefix.len() + v.len()) * 8 / 6;
    let core = text[start..end].to_owned();
    (text, core)
}

fn wrap(text: &str, columns: usize, eol: &str) -> String {
    text.as_bytes()
        .chunks(columns)
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect::<Vec<_>>()
        .join(eol)
}

/// What the check looks for in the output.
enum Needle {
    /// This text must not occur.
    Text(String),
    /// This base64 core must not occur once line breaks are removed.
    Unwrapped(String),
    /// The token after `Basic ` must not decode to text containing the value.
    BasicToken,
    /// No window of the value.
    Windows,
    /// Below the form's minimum: nothing is claimed.
    Skip,
}

/// The value in entry `form` of [`LIST`] inside a document; what must not come out.
fn encode(form: usize, v: &str, noise: &[u8], cut: (usize, usize)) -> (Vec<u8>, Needle) {
    let b = v.as_bytes();
    let text = |s: String| {
        let needle = Needle::Text(s.clone());
        (s.into_bytes(), needle)
    };
    let min = |s: String| {
        if s.len() >= MIN_ENCODED_LEN && s.as_bytes() != b {
            text(s)
        } else {
            (s.into_bytes(), Needle::Skip)
        }
    };
    let go_attr: &[(char, &str)] = &[
        ('"', "&#34;"),
        ('&', "&amp;"),
        ('\'', "&#39;"),
        ('+', "&#43;"),
        ('<', "&lt;"),
        ('=', "&#61;"),
        ('>', "&gt;"),
        ('`', "&#96;"),
        (' ', "&#32;"),
        ('\t', "&#9;"),
        ('\n', "&#10;"),
    ];
    let core_min = |core: &str| core.len() >= MIN_ENCODED_LEN;
    match form {
        0 => text(v.to_owned()),
        1 => {
            let s = serde_json::to_string(v).unwrap_or_default();
            text(s[1..s.len() - 1].to_owned())
        }
        2 => text(json(v, true, Some(false), &[])),
        3 => text(json(v, false, Some(false), &[])),
        4 => text(json(
            v,
            false,
            None,
            &['<', '>', '&', '\u{2028}', '\u{2029}'],
        )),
        5 => text(json(v, false, None, &['\u{2028}', '\u{2029}'])),
        6 => text(json(
            v,
            false,
            None,
            &['<', '>', '&', '=', '\'', '\u{2028}', '\u{2029}'],
        )),
        7 => text(json(v, false, Some(true), &[])),
        8 => text(html(
            v,
            &[
                ('&', "&amp;"),
                ('<', "&lt;"),
                ('>', "&gt;"),
                ('"', "&quot;"),
                ('\'', "&#x27;"),
            ],
        )),
        9 => text(html(
            v,
            &[
                ('&', "&amp;"),
                ('\'', "&#39;"),
                ('<', "&lt;"),
                ('>', "&gt;"),
                ('"', "&#34;"),
            ],
        )),
        10 => text(html(
            v,
            &[
                ('"', "&#34;"),
                ('&', "&amp;"),
                ('\'', "&#39;"),
                ('+', "&#43;"),
                ('<', "&lt;"),
                ('>', "&gt;"),
            ],
        )),
        11 => text(html(v, go_attr)),
        12 => text(html(
            v,
            &[
                ('&', "&amp;"),
                ('"', "&quot;"),
                ('\'', "&#039;"),
                ('<', "&lt;"),
                ('>', "&gt;"),
            ],
        )),
        13 => text(html(
            v,
            &[
                ('\'', "&#39;"),
                ('&', "&amp;"),
                ('"', "&quot;"),
                ('<', "&lt;"),
                ('>', "&gt;"),
            ],
        )),
        14 => text(html(
            v,
            &[
                ('"', "&quot;"),
                ('&', "&amp;"),
                ('<', "&lt;"),
                ('>', "&gt;"),
            ],
        )),
        15 => text(html(v, &[('&', "&amp;"), ('<', "&lt;"), ('>', "&gt;")])),
        16 => text(numeric(v, false, 0)),
        17 => text(numeric(v, false, 1)),
        18 => text(numeric(v, false, 2)),
        19 => text(esapi(v)),
        20 => text(numeric(v, true, 0)),
        21 => text(numeric(v, true, 1)),
        22 => text(numeric(v, true, 2)),
        23 => min(percent(b, "-._~", false, false)),
        24 => min(percent(b, "-._~", true, false)),
        25 => min(percent(b, "-._~", false, true)),
        26 => min(percent(b, "-_.!~*'()", false, false)),
        27 => min(percent(b, "-_.!~*'();,/?:@&=+$#", false, false)),
        28 => min(percent(b, "-_.~/", false, false)),
        29 => min(percent(b, "-_.~$&+=:@", false, false)),
        30 => min(b.iter().map(|x| format!("{x:02x}")).collect()),
        31 => min(b.iter().map(|x| format!("{x:02X}")).collect()),
        32 | 33 => {
            let engine = if form == 32 { &STANDARD } else { &URL_SAFE };
            let (text, core) = base64_in(engine, &noise[..cut.0 % 6], b);
            let needle = if core_min(&core) {
                Needle::Text(core)
            } else {
                Needle::Skip
            };
            (text.into_bytes(), needle)
        }
        34..=37 => {
            let (columns, eol) = match form {
                34 => (76, "\r\n"),
                35 => (76, "\n"),
                36 => (64, "\n"),
                _ => (64, "\r\n"),
            };
            let (text, core) = base64_in(&STANDARD, &noise[..cut.0 % noise.len().max(1)], b);
            let needle = if core_min(&core) {
                Needle::Unwrapped(core)
            } else {
                Needle::Skip
            };
            (wrap(&text, columns, eol).into_bytes(), needle)
        }
        38 => {
            let user: String = noise
                .iter()
                .take(cut.0 % 70)
                .map(|&x| char::from(b'a' + x % 26))
                .collect();
            let token = STANDARD.encode([user.as_bytes(), b":", b].concat());
            (
                format!("{{\"authorization\": \"Basic {token}\"}}").into_bytes(),
                Needle::BasicToken,
            )
        }
        _ => {
            if b.len() <= WINDOW {
                return (b.to_vec(), Needle::Skip);
            }
            let len = WINDOW + cut.1 % (b.len() - WINDOW);
            let start = cut.0 % (b.len() - len + 1);
            (b[start..start + len].to_vec(), Needle::Windows)
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether `out` still shows the value as `needle` says.
fn leaks(out: &[u8], needle: &Needle, v: &[u8]) -> bool {
    match needle {
        Needle::Text(t) => contains(out, t.as_bytes()),
        Needle::Unwrapped(core) => {
            let flat: Vec<u8> = out
                .iter()
                .copied()
                .filter(|c| *c != b'\n' && *c != b'\r')
                .collect();
            contains(&flat, core.as_bytes())
        }
        Needle::BasicToken => {
            let text = String::from_utf8_lossy(out);
            let token = text
                .split("Basic ")
                .nth(1)
                .unwrap_or_default()
                .split('"')
                .next()
                .unwrap_or_default();
            let decoded = STANDARD.decode(token).unwrap_or_default();
            contains(&decoded, v) || contains(out, v)
        }
        Needle::Windows => v.windows(WINDOW).any(|w| contains(out, w)),
        Needle::Skip => false,
    }
}

fn value() -> impl Strategy<Value = String> {
    let unit = prop_oneof![
        4 => "[a-zA-Z0-9]",
        2 => prop::sample::select(vec![
            "+", "/", "=", "%", "&", "<", ">", "\"", "'", " ", "-", ".", ":", "\\", "`", "!",
        ])
        .prop_map(str::to_owned),
        1 => prop::sample::select(vec!["é", "€", "😀", "\u{2028}", "ü"]).prop_map(str::to_owned),
    ];
    prop::collection::vec(unit, 1..40).prop_map(|v| v.concat())
}

fn stream(p: &ScrubPatterns, data: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut s = Scrubber::new(p);
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        s.push(&data[prev..c], &mut out);
        assert!(s.pending_len() < p.max_len());
        prev = c;
    }
    s.finish(&mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every entry of the list, for one random value each case.
    #[test]
    fn every_listed_encoding_is_scrubbed(
        v in value(),
        noise in prop::collection::vec(any::<u8>(), 100),
        before in "[ -~]{0,12}",
        after in "[ -~]{0,12}",
        cut in (any::<usize>(), any::<usize>()),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let secret = MountedSecret {
            id: "v".into(),
            name: "V".into(),
            placeholder: PLACEHOLDER.into(),
            hosts: Vec::new(),
            value: SecretValue::new(v.clone()),
            body_substitution: false,
            wrong_host: Default::default(),
            previous: Vec::new(),
            retired: false,
        };
        let p = ScrubPatterns::new(&[secret]);
        for (form, name) in LIST.iter().enumerate() {
            let (encoded, needle) = encode(form, &v, &noise, cut);
            let doc = [before.as_bytes(), &encoded, after.as_bytes()].concat();
            let out = stream(&p, &doc, &cuts);
            let whole = p.scrub_all(&doc).unwrap_or_else(|| doc.clone());
            prop_assert!(out == whole, "{}: streaming differs from the whole-buffer scrub", name);
            prop_assert!(!leaks(&out, &needle, v.as_bytes()), "{} survived", name);
        }
    }
}

#[test]
fn list_has_one_encoder_per_entry() {
    // `encode`'s last arm is the last entry; every index before it has its own arm.
    assert_eq!(LIST.len(), 40);
    assert!(LIST[LIST.len() - 1].starts_with("truncated"));
}
