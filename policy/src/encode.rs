//! How a value is written where its placeholder was, so that the upstream's decoder of that
//! component gives back exactly the value — never split, partly decoded or transformed — and
//! where the sandbox's surrounding bytes would make that impossible.
//!
//! - request path: every byte outside RFC 3986 `pchar` is percent-encoded, `%` included;
//!   `:` `@` and the sub-delimiters stay raw (tokens like `/bot123456:ABC-DEF/` keep their form);
//! - query and `application/x-www-form-urlencoded` bodies: every byte outside `unreserved` is
//!   percent-encoded, so neither `+` (a space to a form decoder) nor `& = ; #` survive raw;
//! - JSON strings: escaped per RFC 8259 (`"`, `\` and control characters);
//! - headers and `text/*` bodies: raw (nothing decodes them).
//!
//! An encoded value always ends on a whole character of its component, so only the bytes
//! *before* a placeholder can join the value: a `%` or `%X` (an escape the value's first
//! characters would complete), or in a JSON string an unescaped `\` or an incomplete `\u`
//! escape. [`open_percent_escape`] and [`JsonContext`] find those; the caller refuses them.

/// How a value is written into the place of its placeholder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// As it is (headers, text bodies, inside a base64 encoding).
    Raw,
    /// Percent-encoded outside `pchar`, and `%` itself.
    Path,
    /// Percent-encoded outside `unreserved` (queries and form bodies).
    Query,
    /// The content of a JSON string.
    JsonString,
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// RFC 3986 `unreserved`.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` without `pct-encoded` (a value's `%` is data, so it is encoded).
fn pchar(b: u8) -> bool {
    unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
        )
}

/// How a byte is written in a JSON string: `None` raw, or its escape.
fn json_escape(b: u8) -> Option<&'static [u8]> {
    match b {
        b'"' => Some(b"\\\""),
        b'\\' => Some(b"\\\\"),
        b'\n' => Some(b"\\n"),
        b'\r' => Some(b"\\r"),
        b'\t' => Some(b"\\t"),
        0x08 => Some(b"\\b"),
        0x0c => Some(b"\\f"),
        // Other control characters: `\u00XX`, written by the caller.
        0..0x20 => Some(b""),
        _ => None,
    }
}

impl Encoding {
    /// Whether `b` is written as it is.
    fn keeps(self, b: u8) -> bool {
        match self {
            Self::Raw => true,
            Self::Path => pchar(b),
            Self::Query => unreserved(b),
            Self::JsonString => json_escape(b).is_none(),
        }
    }

    /// The length of `value` once encoded (to size a buffer once: a reallocation would leave a
    /// copy of a value behind in freed memory).
    pub(crate) fn len(self, value: &[u8]) -> usize {
        value
            .iter()
            .map(|&b| match self {
                _ if self.keeps(b) => 1,
                Self::JsonString => match json_escape(b) {
                    Some(e) if !e.is_empty() => e.len(),
                    _ => 6,
                },
                _ => 3,
            })
            .sum()
    }

    /// Appends `value`, encoded, to `out`.
    pub(crate) fn write(self, value: &[u8], out: &mut Vec<u8>) {
        for &b in value {
            if self.keeps(b) {
                out.push(b);
                continue;
            }
            match self {
                Self::JsonString => match json_escape(b) {
                    Some(e) if !e.is_empty() => out.extend_from_slice(e),
                    _ => out.extend_from_slice(&[
                        b'\\',
                        b'u',
                        b'0',
                        b'0',
                        HEX[usize::from(b >> 4)],
                        HEX[usize::from(b & 0xf)],
                    ]),
                },
                _ => out.extend_from_slice(&[
                    b'%',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]),
            }
        }
    }
}

/// Whether `before` ends inside a percent escape (`%` or `%X`), which the first characters of
/// whatever follows would complete.
pub(crate) fn open_percent_escape(before: &[u8]) -> bool {
    match before {
        [.., b'%'] => true,
        [.., b'%', h] => h.is_ascii_hexdigit(),
        _ => false,
    }
}

/// Where a position in a JSON text is, as far as writing a value there goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JsonSpot {
    /// Inside a string, between whole characters: the escaped value fits.
    InString,
    /// Inside a string, right after an unescaped `\` or inside a `\u` escape: the value's
    /// first characters would complete the escape.
    OpenEscape,
    /// Outside every string: the value would become a number, a literal, or a syntax error.
    OutsideString,
}

/// The JSON string state at increasing positions of one JSON text (a lexer that only knows
/// strings, which is all a value's placement depends on).
#[derive(Debug, Default)]
pub(crate) struct JsonContext {
    pos: usize,
    state: JsonState,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum JsonState {
    #[default]
    Outside,
    InString,
    /// After an unescaped `\`.
    Escape,
    /// After `\u` and this many hex digits (0 to 3).
    Unicode(u8),
}

impl JsonContext {
    /// The spot at `at` in `text` (positions must not decrease from call to call).
    pub(crate) fn spot(&mut self, text: &[u8], at: usize) -> JsonSpot {
        let end = at.min(text.len());
        for &b in text.get(self.pos..end).unwrap_or_default() {
            self.state = match (self.state, b) {
                (JsonState::Outside, b'"') => JsonState::InString,
                (JsonState::Outside, _) => JsonState::Outside,
                (JsonState::InString, b'"') => JsonState::Outside,
                (JsonState::InString, b'\\') => JsonState::Escape,
                (JsonState::InString, _) => JsonState::InString,
                (JsonState::Escape, b'u') => JsonState::Unicode(0),
                (JsonState::Unicode(n), h) if n < 3 && h.is_ascii_hexdigit() => {
                    JsonState::Unicode(n + 1)
                }
                // A complete escape, or an invalid one (the text is no JSON then, and a
                // parser rejects it whatever follows).
                (JsonState::Escape | JsonState::Unicode(_), _) => JsonState::InString,
            };
        }
        self.pos = self.pos.max(end);
        match self.state {
            JsonState::Outside => JsonSpot::OutsideString,
            JsonState::InString => JsonSpot::InString,
            JsonState::Escape | JsonState::Unicode(_) => JsonSpot::OpenEscape,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(e: Encoding, v: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(e.len(v));
        e.write(v, &mut out);
        assert_eq!(out.len(), e.len(v));
        out
    }

    #[test]
    fn components() {
        let v = "a+b/c?d#e%f&g=h;i:j@k l\u{e9}\"\\<>\n\x01~".as_bytes();
        assert_eq!(encode(Encoding::Raw, v), v);
        assert_eq!(
            encode(Encoding::Path, v),
            b"a+b%2Fc%3Fd%23e%25f&g=h;i:j@k%20l%C3%A9%22%5C%3C%3E%0A%01~"
        );
        assert_eq!(
            encode(Encoding::Query, v),
            b"a%2Bb%2Fc%3Fd%23e%25f%26g%3Dh%3Bi%3Aj%40k%20l%C3%A9%22%5C%3C%3E%0A%01~"
        );
        assert_eq!(
            encode(Encoding::JsonString, v),
            "a+b/c?d#e%f&g=h;i:j@k l\u{e9}\\\"\\\\<>\\n\\u0001~".as_bytes()
        );
        assert_eq!(encode(Encoding::Path, b"123456:ABC-DEF"), b"123456:ABC-DEF");
        assert_eq!(
            encode(Encoding::JsonString, b"\x08\x0c\t\r\x1f\x7f"),
            b"\\b\\f\\t\\r\\u001F\x7f"
        );
    }

    #[test]
    fn open_escapes() {
        for open in [&b"%"[..], b"a%", b"%%", b"%4", b"x%f", b"%A"] {
            assert!(open_percent_escape(open), "{open:?}");
        }
        for closed in [&b""[..], b"a", b"%41", b"%g", b"%%41", b"4", b"%4g"] {
            assert!(!open_percent_escape(closed), "{closed:?}");
        }
    }

    #[test]
    fn json_spots() {
        let spot = |text: &str| JsonContext::default().spot(text.as_bytes(), text.len());
        use JsonSpot::*;
        for (text, want) in [
            ("", OutsideString),
            (r#"{"k":"#, OutsideString),
            (r#"{"k":""#, InString),
            (r#"{""#, InString),
            (r#"{"k":"a\\"#, InString),
            (r#"{"k":"a\""#, InString),
            (r#"{"k":"a\"#, OpenEscape),
            (r#"{"k":"a\\\"#, OpenEscape),
            (r#"{"k":"\u"#, OpenEscape),
            (r#"{"k":"\u0"#, OpenEscape),
            (r#"{"k":"\u00"#, OpenEscape),
            (r#"{"k":"\u004"#, OpenEscape),
            (r#"{"k":"\u0041"#, InString),
            (r#"{"k":"x","#, OutsideString),
            (r#"["a","#, OutsideString),
            (r#"{"k":"\n"#, InString),
        ] {
            assert_eq!(spot(text), want, "{text}");
        }
        // Positions only move forward; the state carries over.
        let text = br#"{"a":"x","b":"y"}"#;
        let mut c = JsonContext::default();
        assert_eq!(c.spot(text, 6), InString);
        assert_eq!(c.spot(text, 9), OutsideString);
        assert_eq!(c.spot(text, 14), InString);
        assert_eq!(c.spot(text, 100), OutsideString);
    }

    fn any_value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[+/=%&<>:@?# ]{1,4}",
            "[a-zA-Z0-9+/=%&<>:@?#;\\\\\" \\n\\x01]{1,24}",
            "\\PC{1,12}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A decoder of each component gives back exactly the value.
        #[test]
        fn decoders_recover_the_value(value in any_value()) {
            let v = value.as_bytes();
            let path = encode(Encoding::Path, v);
            prop_assert!(!path.contains(&b'/') && !path.contains(&b'?') && !path.contains(&b'#'));
            let decoded: Vec<u8> = percent_encoding::percent_decode(&path).collect();
            prop_assert_eq!(&decoded, v);
            let query = encode(Encoding::Query, v);
            let pairs: Vec<(String, String)> = form_urlencoded::parse(&[b"k=", &query[..]].concat())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            prop_assert_eq!(pairs, vec![("k".to_owned(), value.clone())]);
            let json = [b"\"", &encode(Encoding::JsonString, v)[..], b"\""].concat();
            let parsed: String = serde_json::from_slice(&json).unwrap();
            prop_assert_eq!(parsed, value);
        }

        /// Encoded values never end inside an escape.
        #[test]
        fn encoded_values_end_closed(value in any_value()) {
            for e in [Encoding::Path, Encoding::Query] {
                prop_assert!(!open_percent_escape(&encode(e, value.as_bytes())));
            }
            let json = [b"\"", &encode(Encoding::JsonString, value.as_bytes())[..]].concat();
            prop_assert_eq!(JsonContext::default().spot(&json, json.len()), JsonSpot::InString);
        }
    }
}
