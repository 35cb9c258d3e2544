//! The encoded forms of a value that [`super::ScrubPatterns`] looks for, each with what replaces
//! it. Every function here is pure and returns candidates; duplicates and forms equal to the
//! literal are left to the caller.

use std::fmt::Write as _;

use base64::Engine;
use zeroize::Zeroizing;

/// One encoded form of a value and the same encoding of the placeholder.
pub(super) type Form = (Zeroizing<Vec<u8>>, Vec<u8>);

/// How `\u` escapes are spelled in a JSON profile.
#[derive(Clone, Copy)]
enum Html {
    /// `<>&` and U+2028/9 written as they are (serde_json, JSON.stringify).
    None,
    /// Only U+2028 and U+2029 escaped (Go with `SetEscapeHTML(false)`).
    LineSeparators,
    /// Go's and Rails' default: `<>&` and U+2028/9 as `\u` escapes.
    Go,
    /// Gson's default: Go's set plus `=` and `'`.
    Gson,
}

/// JSON string escapings that serializers produce: `\"` and `\\` always, control characters as
/// `\n \r \t \b \f` or `\u00XX`; `/` as is or `\/` (PHP); non-ASCII as is or `\uXXXX` (Python,
/// PHP); the HTML-safe sets of Go/Rails (`\u003c \u003e \u0026 \u2028 \u2029`) and Gson (also
/// `\u003d \u0027`); hex digits in either case.
pub(super) fn json(value: &str) -> Vec<Zeroizing<Vec<u8>>> {
    let mut forms = Vec::new();
    for slash in [false, true] {
        for ascii in [false, true] {
            for html in [Html::None, Html::LineSeparators, Html::Go, Html::Gson] {
                for upper in [false, true] {
                    forms.push(json_one(value, slash, ascii, html, upper));
                }
            }
        }
    }
    forms
}

fn json_one(value: &str, slash: bool, ascii: bool, html: Html, upper: bool) -> Zeroizing<Vec<u8>> {
    // Room for the longest escaping (12 bytes per 4-byte character): no reallocation leaves a
    // copy behind.
    let mut out = Zeroizing::new(String::with_capacity(value.len() * 6 + 8));
    let unicode = |out: &mut String, c: char| {
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            // Writing into a String cannot fail.
            let _ = if upper {
                write!(out, "\\u{unit:04X}")
            } else {
                write!(out, "\\u{unit:04x}")
            };
        }
    };
    for c in value.chars() {
        let html_escaped = match html {
            Html::None => false,
            Html::LineSeparators => matches!(c, '\u{2028}' | '\u{2029}'),
            Html::Go => matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}'),
            Html::Gson => matches!(c, '<' | '>' | '&' | '=' | '\'' | '\u{2028}' | '\u{2029}'),
        };
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' if slash => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 || html_escaped || (ascii && !c.is_ascii()) => {
                unicode(&mut out, c);
            }
            c => out.push(c),
        }
    }
    Zeroizing::new(std::mem::take(&mut *out).into_bytes())
}

/// How one HTML escaper writes the characters it escapes.
struct HtmlProfile {
    /// `"` (None = left as is).
    quot: Option<&'static str>,
    /// `'`.
    apos: Option<&'static str>,
    /// Further characters written as decimal references (`&#43;`).
    decimal: &'static [u8],
}

/// Escapers as libraries ship them: Python `html.escape` and Django; Go `html.EscapeString`,
/// Jinja2/MarkupSafe; Go `html/template` (text and unquoted attributes); PHP
/// `htmlspecialchars`; Ruby `CGI.escapeHTML`, ERB, lodash, escape-html; Java `escapeHtml4`;
/// `&`, `<`, `>` only.
const HTML_PROFILES: [HtmlProfile; 8] = [
    HtmlProfile {
        quot: Some("&quot;"),
        apos: Some("&#x27;"),
        decimal: b"",
    },
    HtmlProfile {
        quot: Some("&#34;"),
        apos: Some("&#39;"),
        decimal: b"",
    },
    HtmlProfile {
        quot: Some("&#34;"),
        apos: Some("&#39;"),
        decimal: b"+",
    },
    HtmlProfile {
        quot: Some("&#34;"),
        apos: Some("&#39;"),
        decimal: b"+=`\t\n\x0b\x0c\r ",
    },
    HtmlProfile {
        quot: Some("&quot;"),
        apos: Some("&#039;"),
        decimal: b"",
    },
    HtmlProfile {
        quot: Some("&quot;"),
        apos: Some("&#39;"),
        decimal: b"",
    },
    HtmlProfile {
        quot: Some("&quot;"),
        apos: None,
        decimal: b"",
    },
    HtmlProfile {
        quot: None,
        apos: None,
        decimal: b"",
    },
];

/// HTML character references: the named/decimal escapers of [`HTML_PROFILES`]; every character
/// but ASCII letters and digits as a numeric reference (decimal, hex in either case; OWASP
/// ESAPI's `&#x2b;` with `&amp; &lt; &gt; &quot;` named); and every character numeric.
pub(super) fn html(value: &str) -> Vec<Zeroizing<Vec<u8>>> {
    let mut forms = Vec::new();
    for p in &HTML_PROFILES {
        let mut out = Zeroizing::new(String::with_capacity(value.len() * 6));
        for c in value.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' if p.quot.is_some() => out.push_str(p.quot.unwrap_or_default()),
                '\'' if p.apos.is_some() => out.push_str(p.apos.unwrap_or_default()),
                c if c.is_ascii() && p.decimal.contains(&(c as u8)) => {
                    let _ = write!(out, "&#{};", u32::from(c));
                }
                c => out.push(c),
            }
        }
        forms.push(Zeroizing::new(std::mem::take(&mut *out).into_bytes()));
    }
    for all in [false, true] {
        for style in [
            Numeric::Decimal,
            Numeric::HexLower,
            Numeric::HexUpper,
            Numeric::Esapi,
        ] {
            if all && matches!(style, Numeric::Esapi) {
                continue;
            }
            let mut out = Zeroizing::new(String::with_capacity(value.len() * 10));
            for c in value.chars() {
                if !all && c.is_ascii_alphanumeric() {
                    out.push(c);
                    continue;
                }
                let n = u32::from(c);
                let _ = match style {
                    Numeric::Decimal => write!(out, "&#{n};"),
                    Numeric::HexLower => write!(out, "&#x{n:x};"),
                    Numeric::HexUpper => write!(out, "&#x{n:X};"),
                    Numeric::Esapi => match c {
                        '&' => write!(out, "&amp;"),
                        '<' => write!(out, "&lt;"),
                        '>' => write!(out, "&gt;"),
                        '"' => write!(out, "&quot;"),
                        ',' | '.' | '-' | '_' | ' ' => write!(out, "{c}"),
                        _ => write!(out, "&#x{n:x};"),
                    },
                };
            }
            forms.push(Zeroizing::new(std::mem::take(&mut *out).into_bytes()));
        }
    }
    forms
}

#[derive(Clone, Copy)]
enum Numeric {
    Decimal,
    HexLower,
    HexUpper,
    Esapi,
}

/// Characters each percent-encoder leaves as they are, besides ASCII letters and digits:
/// RFC 3986 unreserved (also Go `QueryEscape`, Python `quote_plus`), JavaScript
/// `encodeURIComponent`, Python `quote` (keeps `/`), Go `PathEscape`, JavaScript `encodeURI`.
const PERCENT_KEEP: [&[u8]; 5] = [
    b"-._~",
    b"-._~!*'()",
    b"-._~/",
    b"-._~$&+=:@",
    b"-._~!*'();,/?:@&=+$#",
];

/// Percent-encodings of `bytes` by the encoders of [`PERCENT_KEEP`], hex in either case, space
/// as `%20` or `+` (forms).
pub(super) fn percent(bytes: &[u8], placeholder: &[u8]) -> Vec<Form> {
    let encode = |bytes: &[u8], keep: &[u8], upper: bool, plus: bool| {
        let hex: &[u8; 16] = if upper {
            b"0123456789ABCDEF"
        } else {
            b"0123456789abcdef"
        };
        let mut out = Zeroizing::new(Vec::with_capacity(bytes.len() * 3));
        for &b in bytes {
            if b.is_ascii_alphanumeric() || keep.contains(&b) {
                out.push(b);
            } else if plus && b == b' ' {
                out.push(b'+');
            } else {
                out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
            }
        }
        out
    };
    let mut forms = Vec::new();
    for keep in PERCENT_KEEP {
        for upper in [true, false] {
            for plus in [false, true] {
                forms.push((
                    encode(bytes, keep, upper, plus),
                    encode(placeholder, keep, upper, plus).to_vec(),
                ));
            }
        }
    }
    forms
}

/// Hex of `bytes` and of the placeholder, lower- then upper-case.
pub(super) fn hex(bytes: &[u8], placeholder: &[u8]) -> [Form; 2] {
    let encode = |bytes: &[u8], upper: bool| {
        let digits: &[u8; 16] = if upper {
            b"0123456789ABCDEF"
        } else {
            b"0123456789abcdef"
        };
        let mut out = Zeroizing::new(Vec::with_capacity(bytes.len() * 2));
        for &b in bytes {
            out.extend_from_slice(&[digits[usize::from(b >> 4)], digits[usize::from(b & 15)]]);
        }
        out
    };
    [
        (encode(bytes, false), encode(placeholder, false).to_vec()),
        (encode(bytes, true), encode(placeholder, true).to_vec()),
    ]
}

/// The characters of base64(`align` arbitrary bytes ++ `bytes` ++ anything) that depend on
/// `bytes` alone.
pub(super) fn base64_core(
    engine: &base64::engine::GeneralPurpose,
    bytes: &[u8],
    align: usize,
) -> Zeroizing<Vec<u8>> {
    let mut padded = Zeroizing::new(vec![0u8; align]);
    padded.extend_from_slice(bytes);
    let mut encoded = Zeroizing::new(Vec::with_capacity(padded.len().div_ceil(3) * 4));
    // Sized to the exact output: the engine never grows it.
    encoded.resize(padded.len().div_ceil(3) * 4, 0);
    let n = engine
        .encode_slice(padded.as_slice(), encoded.as_mut_slice())
        .unwrap_or(0);
    let start = (align * 8).div_ceil(6);
    let end = ((align + bytes.len()) * 8 / 6).min(n);
    Zeroizing::new(encoded.get(start..end).unwrap_or_default().to_vec())
}

/// Line lengths of wrapped base64: PEM (RFC 7468) and MIME (RFC 2045).
const WRAP_COLUMNS: [usize; 2] = [64, 76];

/// A base64 core (`value`, from [`base64_core`] at `align`) as it appears in text wrapped at
/// [`WRAP_COLUMNS`] with `\n` or `\r\n`, for every position of the first line break inside it;
/// the placeholder's core gets breaks at the same offsets (those within its length).
pub(super) fn wrapped_base64(value: &[u8], placeholder: &[u8], align: usize) -> Vec<Form> {
    // The core starts this many characters into a 4-character group; lines hold whole groups,
    // so a break can only fall where the text position is a multiple of 4.
    let lead = (align * 8).div_ceil(6);
    let mut forms = Vec::new();
    for columns in WRAP_COLUMNS {
        for eol in [&b"\n"[..], b"\r\n"] {
            let mut first = (4 - lead % 4) % 4;
            if first == 0 {
                first = 4;
            }
            while first < value.len() && first <= columns {
                let breaks: Vec<usize> = (0..)
                    .map(|i| first + i * columns)
                    .take_while(|&b| b < value.len())
                    .collect();
                let insert = |core: &[u8]| {
                    let mut out =
                        Zeroizing::new(Vec::with_capacity(core.len() + breaks.len() * eol.len()));
                    let mut from = 0;
                    for &b in breaks.iter().filter(|&&b| b < core.len()) {
                        out.extend_from_slice(&core[from..b]);
                        out.extend_from_slice(eol);
                        from = b;
                    }
                    out.extend_from_slice(&core[from..]);
                    out
                };
                forms.push((insert(value), insert(placeholder).to_vec()));
                first += 4;
            }
        }
    }
    forms
}

/// Where in a value its 12-byte windows are looked for: the parts that are secret. A JWT's
/// header and payload are base64url JSON that anyone holding a token reads and that every token
/// of its issuer shares (`eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9`); only its signature (for JWE,
/// everything after the header) is secret. PEM armor lines (`-----BEGIN …-----`) are public.
pub(super) fn secret_ranges(value: &[u8]) -> Vec<std::ops::Range<usize>> {
    let b64url = |s: &[u8]| {
        !s.is_empty()
            && s.iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    };
    let segments: Vec<&[u8]> = value.split(|&b| b == b'.').collect();
    if value.starts_with(b"eyJ")
        && matches!(segments.len(), 3 | 5)
        && segments.iter().all(|s| b64url(s))
    {
        let public = if segments.len() == 3 { 2 } else { 1 };
        let start: usize = segments[..public].iter().map(|s| s.len() + 1).sum();
        return std::iter::once(start..value.len()).collect();
    }
    if value.windows(10).any(|w| w == b"-----BEGIN") {
        let mut ranges = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        for line in value.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b"-----") {
                if pos > start {
                    ranges.push(start..pos);
                }
                start = pos + line.len();
            }
            pos += line.len();
        }
        if value.len() > start {
            ranges.push(start..value.len());
        }
        return ranges;
    }
    std::iter::once(0..value.len()).collect()
}
