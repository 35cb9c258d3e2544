//! Response scrubbing (issue 6): every mounted value goes back to its placeholder, streaming.
//!
//! [`ScrubPatterns`] is built once per sandbox from its mounted secrets; a [`Scrubber`] per
//! response stream (body, or a sequence of WebSocket payloads) holds at most
//! [`ScrubPatterns::max_len`]` - 1` pending bytes, so memory is bounded and a value split across
//! chunks is still found. The output equals [`ScrubPatterns::scrub_all`] on the concatenated
//! stream, whatever the chunking.
//!
//! Forms replaced, for each value (all leftmost-longest, in one pass):
//! - the literal value → the placeholder;
//! - percent-encoded (upper- and lower-case hex, and form encoding with `+` for space), when it
//!   differs from the literal → the placeholder;
//! - base64, standard and URL-safe, at each of the 3 alignments a value can have inside a longer
//!   encoded text → the placeholder's base64 at the same alignment. Only the characters made
//!   purely of the value's bits are matched; the one boundary character at each end carries at
//!   most 4 bits of the value's first or last byte and is left as it is, so decoding the scrubbed
//!   text gives the placeholder with at most a garbled byte at each end (the rest of the text
//!   stays aligned only when the lengths are equal modulo 3). Encoded forms shorter than
//!   [`MIN_ENCODED_LEN`] characters are not matched, as they would hit unrelated text;
//! - JSON string escapings (`\"`, `\\`, `\/`, control characters, and non-ASCII as `\uXXXX`
//!   in either hex case), when they differ from the literal → the placeholder.
//!
//! Beside the scrubbing itself, this module decides what HTTP needs for it, without I/O: which
//! `Content-Encoding` a body has and whether it can be decoded ([`ScrubPatterns::content_coding`]),
//! and the `Accept-Encoding` to send upstream so it can ([`accept_encoding`]).
//!
//! Not covered here: compressed bodies (the caller decompresses), line-wrapped base64, and any
//! other transformation an upstream may apply (hex, reversal, case changes, a value cut in
//! pieces across responses).

use std::fmt;
use std::fmt::Write as _;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use zeroize::Zeroizing;

use crate::secret::MountedSecret;

/// Shortest encoded (base64 or percent) form that is matched.
pub const MIN_ENCODED_LEN: usize = 8;

/// The per-sandbox automaton over values and their encodings.
pub struct ScrubPatterns {
    ac: Option<AhoCorasick>,
    /// Per pattern: (secret index, replacement).
    replacements: Vec<(usize, Vec<u8>)>,
    max_len: usize,
    /// Every replacement is as long as what it replaces.
    preserves_length: bool,
}

impl fmt::Debug for ScrubPatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrubPatterns")
            .field("patterns", &self.replacements.len())
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl ScrubPatterns {
    /// Builds the patterns for the secrets mounted in a sandbox.
    pub fn new(secrets: &[MountedSecret]) -> Self {
        let mut patterns: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let mut replacements: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, s, secret_value) in secrets
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.scrubbed_values().map(move |v| (i, s, v)))
        {
            let value = secret_value.expose().as_bytes();
            let placeholder = s.placeholder.as_bytes();
            if value.is_empty() {
                continue;
            }
            let mut add = |pattern: Zeroizing<Vec<u8>>, replacement: Vec<u8>| {
                if !patterns.contains(&pattern) {
                    patterns.push(pattern);
                    replacements.push((i, replacement));
                }
            };
            add(Zeroizing::new(value.to_vec()), placeholder.to_vec());
            for form in json_forms(secret_value.expose()) {
                if form.as_slice() != value {
                    add(form, placeholder.to_vec());
                }
            }
            for form in percent_forms(value) {
                if form.len() >= MIN_ENCODED_LEN && form.as_slice() != value {
                    add(form, placeholder.to_vec());
                }
            }
            for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
                for align in 0..3 {
                    let core = base64_core(engine, value, align);
                    if core.len() >= MIN_ENCODED_LEN {
                        let replacement = base64_core(engine, placeholder, align).to_vec();
                        add(core, replacement);
                    }
                }
            }
        }
        let max_len = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        let preserves_length = patterns
            .iter()
            .zip(&replacements)
            .all(|(p, (_, r))| p.len() == r.len());
        let ac = if patterns.is_empty() {
            None
        } else {
            // Building only fails past automaton size limits far above a sandbox's secrets;
            // then nothing can be scrubbed, and `is_active` tells the caller to refuse traffic.
            AhoCorasickBuilder::new()
                .match_kind(MatchKind::LeftmostLongest)
                .build(patterns.iter().map(|p| p.as_slice()))
                .ok()
        };
        Self {
            ac,
            replacements,
            max_len,
            preserves_length,
        }
    }

    /// Whether there is anything to scrub (false for a sandbox without secrets, or if the
    /// automaton could not be built: a caller that has secrets must then not forward responses).
    pub fn is_active(&self) -> bool {
        self.ac.is_some()
    }

    /// Longest pattern, in bytes.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Whether scrubbing keeps a text's length (every replacement as long as what it replaces),
    /// so a response may keep its `Content-Length`.
    pub fn preserves_length(&self) -> bool {
        self.preserves_length
    }

    /// Scrubs a whole buffer (a header value, a small body); `None` if nothing matched.
    pub fn scrub_all(&self, input: &[u8]) -> Option<Vec<u8>> {
        self.scrub_counted(input).map(|(out, _)| out)
    }

    /// Scrubs a whole buffer and says how many occurrences it replaced; `None` if none.
    pub fn scrub_counted(&self, input: &[u8]) -> Option<(Vec<u8>, u64)> {
        let ac = self.ac.as_ref()?;
        let mut out: Option<(Vec<u8>, u64)> = None;
        let mut copied = 0;
        for m in ac.find_iter(input) {
            let (buf, n) = out.get_or_insert_with(|| (Vec::with_capacity(input.len()), 0));
            buf.extend_from_slice(&input[copied..m.start()]);
            buf.extend_from_slice(&self.replacements[m.pattern().as_usize()].1);
            *n += 1;
            copied = m.end();
        }
        out.map(|(mut buf, n)| {
            buf.extend_from_slice(&input[copied..]);
            (buf, n)
        })
    }

    /// The content coding of a response whose `Content-Encoding` header values are `values`,
    /// as far as scrubbing is concerned; see [`ContentCoding`].
    pub fn content_coding<'a>(
        &self,
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<ContentCoding, UnsupportedCoding> {
        let mut codings: Vec<String> = Vec::new();
        for value in values {
            for coding in value.split(|&b| b == b',') {
                let coding = String::from_utf8_lossy(coding.trim_ascii()).to_ascii_lowercase();
                if !coding.is_empty() && coding != "identity" {
                    codings.push(coding);
                }
            }
        }
        match codings.as_slice() {
            [] => Ok(ContentCoding::Identity),
            [one] => match one.as_str() {
                "gzip" | "x-gzip" => Ok(ContentCoding::Gzip),
                "deflate" => Ok(ContentCoding::Deflate),
                "br" => Ok(ContentCoding::Brotli),
                _ => Err(self.unsupported(&codings)),
            },
            _ => Err(self.unsupported(&codings)),
        }
    }

    /// The error naming `codings`. An upstream chooses that text, and one that echoes a value
    /// there must not get it (or a case-folded copy) repeated to the sandbox: only registered
    /// coding names are repeated.
    fn unsupported(&self, codings: &[String]) -> UnsupportedCoding {
        let named: Vec<&str> = codings
            .iter()
            .map(|c| {
                REGISTERED_CODINGS
                    .iter()
                    .find(|r| **r == c.as_str())
                    .copied()
                    .unwrap_or("(unknown)")
            })
            .collect();
        UnsupportedCoding(named.join(", "))
    }

    /// Indices of the secrets whose value (in any form) occurs in `input`.
    pub fn secrets_in(&self, input: &[u8]) -> Vec<usize> {
        let mut found = Vec::new();
        if let Some(ac) = &self.ac {
            for m in ac.find_iter(input) {
                let i = self.replacements[m.pattern().as_usize()].0;
                if !found.contains(&i) {
                    found.push(i);
                }
            }
        }
        found
    }
}

/// Scrubs one stream; see the module docs.
pub struct Scrubber<'p> {
    patterns: &'p ScrubPatterns,
    state: ScrubState,
}

impl fmt::Debug for Scrubber<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.state.fmt(f)
    }
}

impl<'p> Scrubber<'p> {
    /// A scrubber for one stream.
    pub fn new(patterns: &'p ScrubPatterns) -> Self {
        Self {
            patterns,
            state: ScrubState::default(),
        }
    }

    /// Bytes held back, waiting for the next chunk.
    pub fn pending_len(&self) -> usize {
        self.state.pending_len()
    }

    /// Replacements made so far: (secret index, count).
    pub fn counts(&self) -> &[(usize, u64)] {
        self.state.counts()
    }

    /// Scrubs the next chunk, appending what is final to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        self.state.push(self.patterns, chunk, out);
    }

    /// Ends the stream, appending the scrubbed remainder to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.state.finish(self.patterns, out);
    }
}

/// The state of one scrubbed stream without a borrow of its patterns, for owners that keep the
/// patterns behind a shared pointer (a response body holding its sandbox's policy). Every call
/// must pass the same patterns; [`Scrubber`] is the borrowing form.
#[derive(Default)]
pub struct ScrubState {
    /// Bytes that may still be the start of a value.
    pending: Zeroizing<Vec<u8>>,
    /// Replacements made so far, per secret index.
    counts: Vec<(usize, u64)>,
    /// Sum of `counts`.
    total: u64,
}

impl fmt::Debug for ScrubState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("pending_len", &self.pending.len())
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl ScrubState {
    /// Bytes held back, waiting for the next chunk.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Replacements made so far: (secret index, count).
    pub fn counts(&self) -> &[(usize, u64)] {
        &self.counts
    }

    /// Replacements made so far, all secrets together.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Scrubs the next chunk with `patterns`, appending what is final to `out`.
    pub fn push(&mut self, patterns: &ScrubPatterns, chunk: &[u8], out: &mut Vec<u8>) {
        let Some(ac) = &patterns.ac else {
            out.extend_from_slice(chunk);
            return;
        };
        // Without held-back bytes the chunk is scanned in place, without a copy.
        let joined: Zeroizing<Vec<u8>>;
        let buf: &[u8] = if self.pending.is_empty() {
            chunk
        } else {
            let mut j = Zeroizing::new(Vec::with_capacity(self.pending.len() + chunk.len()));
            j.extend_from_slice(&self.pending);
            j.extend_from_slice(chunk);
            joined = j;
            &joined
        };
        // A match starting before `horizon` lies wholly inside `buf`, so it is final.
        let horizon = buf.len().saturating_sub(patterns.max_len - 1);
        let mut pos = 0;
        for m in ac.find_iter(buf) {
            if m.start() >= horizon {
                break;
            }
            let (secret, replacement) = &patterns.replacements[m.pattern().as_usize()];
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(replacement);
            self.bump(*secret);
            pos = m.end();
        }
        let keep_from = pos.max(horizon);
        out.extend_from_slice(&buf[pos..keep_from]);
        let rest = Zeroizing::new(buf[keep_from..].to_vec());
        self.pending = rest;
    }

    /// Ends the stream, appending the remainder scrubbed with `patterns` to `out`.
    pub fn finish(&mut self, patterns: &ScrubPatterns, out: &mut Vec<u8>) {
        let pending = std::mem::take(&mut *self.pending);
        let pending = Zeroizing::new(pending);
        if let Some(ac) = &patterns.ac {
            let mut pos = 0;
            for m in ac.find_iter(pending.as_slice()) {
                let (secret, replacement) = &patterns.replacements[m.pattern().as_usize()];
                out.extend_from_slice(&pending[pos..m.start()]);
                out.extend_from_slice(replacement);
                self.bump(*secret);
                pos = m.end();
            }
            out.extend_from_slice(&pending[pos..]);
        } else {
            out.extend_from_slice(&pending);
        }
    }

    fn bump(&mut self, secret: usize) {
        self.total += 1;
        bump(&mut self.counts, secret);
    }
}

/// How a response body is encoded, among the codings veil can decode to scrub it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCoding {
    /// No coding (or only `identity`).
    Identity,
    /// `gzip` (or `x-gzip`), possibly several members.
    Gzip,
    /// `deflate`: the zlib format (RFC 9110 §8.4.1.2).
    Deflate,
    /// `br`: Brotli.
    Brotli,
}

/// A content coding (or a stack of codings) veil cannot decode, so cannot scrub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("content-encoding {0} cannot be scrubbed")]
pub struct UnsupportedCoding(pub String);

/// The IANA HTTP Content Coding Registry (and `x-` aliases): names an error may repeat.
const REGISTERED_CODINGS: [&str; 13] = [
    "aes128gcm",
    "br",
    "compress",
    "dcb",
    "dcz",
    "deflate",
    "exi",
    "gzip",
    "identity",
    "pack200-gzip",
    "x-compress",
    "x-gzip",
    "zstd",
];

/// Codings that [`ScrubPatterns::content_coding`] accepts, besides `identity`.
const DECODABLE: [&str; 4] = ["gzip", "x-gzip", "deflate", "br"];

/// The `Accept-Encoding` to send upstream for a client's `offers` (its header values), so the
/// response comes in a coding veil can decode: the client's entries for decodable codings and
/// `identity`, in its order and with its weights; `*` and other codings are dropped; `identity`
/// when nothing is left (an absent header would allow any coding).
pub fn accept_encoding<'a>(offers: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut kept: Vec<String> = Vec::new();
    for value in offers {
        for entry in value.split(|&b| b == b',') {
            let Ok(entry) = std::str::from_utf8(entry.trim_ascii()) else {
                continue;
            };
            let coding = entry.split(';').next().unwrap_or_default().trim();
            if coding.eq_ignore_ascii_case("identity")
                || DECODABLE.iter().any(|d| coding.eq_ignore_ascii_case(d))
            {
                kept.push(entry.to_owned());
            }
        }
    }
    if kept.is_empty() {
        "identity".to_owned()
    } else {
        kept.join(", ")
    }
}

fn bump(counts: &mut Vec<(usize, u64)>, secret: usize) {
    match counts.iter_mut().find(|(s, _)| *s == secret) {
        Some((_, n)) => *n += 1,
        None => counts.push((secret, 1)),
    }
}

/// The characters of base64(`align` arbitrary bytes ++ `bytes` ++ anything) that depend on
/// `bytes` alone.
fn base64_core(
    engine: &base64::engine::GeneralPurpose,
    bytes: &[u8],
    align: usize,
) -> Zeroizing<Vec<u8>> {
    let mut padded = Zeroizing::new(vec![0u8; align]);
    padded.extend_from_slice(bytes);
    let encoded = Zeroizing::new(engine.encode(padded.as_slice()).into_bytes());
    let start = (align * 8).div_ceil(6);
    let end = ((align + bytes.len()) * 8 / 6).min(encoded.len());
    Zeroizing::new(encoded.get(start..end).unwrap_or_default().to_vec())
}

/// JSON string escapings of `value` that serializers produce: minimal (`\"`, `\\`, control
/// characters), with `\/` for `/` (PHP's default), and with non-ASCII as `\uXXXX` (Python's
/// default), in lower- and upper-case hex; duplicates are left to the caller.
fn json_forms(value: &str) -> Vec<Zeroizing<Vec<u8>>> {
    let mut forms = Vec::new();
    for slash in [false, true] {
        for ascii in [None, Some(false), Some(true)] {
            // Room for the longest escaping (6 bytes per byte): no reallocation leaves a copy.
            let mut out = Zeroizing::new(String::with_capacity(value.len() * 6));
            for c in value.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '/' if slash => out.push_str("\\/"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if u32::from(c) < 0x20 || (ascii.is_some() && !c.is_ascii()) => {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            // Writing into a String cannot fail.
                            let _ = if ascii == Some(true) {
                                write!(out, "\\u{unit:04X}")
                            } else {
                                write!(out, "\\u{unit:04x}")
                            };
                        }
                    }
                    c => out.push(c),
                }
            }
            forms.push(Zeroizing::new(std::mem::take(&mut *out).into_bytes()));
        }
    }
    forms
}

/// Percent-encodings of `bytes`: upper-case hex, lower-case hex, form (`+` for space).
fn percent_forms(bytes: &[u8]) -> [Zeroizing<Vec<u8>>; 3] {
    const UPPER: &[u8; 16] = b"0123456789ABCDEF";
    const LOWER: &[u8; 16] = b"0123456789abcdef";
    let encode = |hex: &[u8; 16], plus: bool| {
        let mut out = Zeroizing::new(Vec::with_capacity(bytes.len() * 3));
        for &b in bytes {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b);
            } else if plus && b == b' ' {
                out.push(b'+');
            } else {
                out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
            }
        }
        out
    };
    [
        encode(UPPER, false),
        encode(LOWER, false),
        encode(UPPER, true),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::testing::secret;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
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
                        &base64_core(engine_no_pad(engine), VALUE.as_bytes(), prefix_len % 3)
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

    fn engine_no_pad(
        e: &base64::engine::GeneralPurpose,
    ) -> &'static base64::engine::GeneralPurpose {
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
        let same = ScrubPatterns::new(&[secret("s", "0123456789abcdef", &[])]);
        // ph_s_placeholder is 16 bytes, like the value; its encodings too.
        assert!(same.preserves_length());
    }

    #[test]
    fn content_codings() {
        let p = patterns();
        let cc = |v: &[&str]| p.content_coding(v.iter().map(|s| s.as_bytes()));
        assert_eq!(cc(&[]), Ok(ContentCoding::Identity));
        assert_eq!(cc(&["identity"]), Ok(ContentCoding::Identity));
        assert_eq!(cc(&[" GZip "]), Ok(ContentCoding::Gzip));
        assert_eq!(cc(&["x-gzip"]), Ok(ContentCoding::Gzip));
        assert_eq!(cc(&["identity, deflate"]), Ok(ContentCoding::Deflate));
        assert_eq!(cc(&["br"]), Ok(ContentCoding::Brotli));
        assert_eq!(cc(&["zstd"]), Err(UnsupportedCoding("zstd".into())));
        assert_eq!(
            cc(&["gzip", "br"]),
            Err(UnsupportedCoding("gzip, br".into()))
        );
        assert_eq!(
            cc(&["compress, gzip"]),
            Err(UnsupportedCoding("compress, gzip".into()))
        );
        // An upstream naming the value as its coding does not get it repeated.
        let err = cc(&["tok_BBBBBBBBBBBB"]).unwrap_err();
        assert_eq!(err.0, "(unknown)");
        let err = cc(&[VALUE, "zstd"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "content-encoding (unknown), zstd cannot be scrubbed"
        );
    }

    #[test]
    fn accept_encoding_keeps_only_decodable() {
        let ae = |v: &[&str]| accept_encoding(v.iter().map(|s| s.as_bytes()));
        assert_eq!(ae(&[]), "identity");
        assert_eq!(ae(&["zstd"]), "identity");
        assert_eq!(ae(&["*"]), "identity");
        assert_eq!(ae(&["gzip, deflate, br, zstd"]), "gzip, deflate, br");
        assert_eq!(
            ae(&["zstd;q=1.0, BR;q=0.9", "gzip;q=0.5,*;q=0.1, identity;q=0"]),
            "BR;q=0.9, gzip;q=0.5, identity;q=0"
        );
        assert_eq!(ae(&["compress, x-gzip"]), "x-gzip");
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
                _ => (percent_forms(&doc)[0].to_vec(), value.clone().into_bytes()),
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
    /// `cargo test -p veil-policy --release -- --ignored --nocapture perf`.
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
        for (label, body) in [("JSON text", &json), ("base64 of random bytes", &b64)] {
            let iters = 2_000u32;
            let mut out = Vec::with_capacity(body.len() + 1024);
            let start = Instant::now();
            for _ in 0..iters {
                out.clear();
                let mut s = Scrubber::new(&p);
                for c in body.chunks(16 * 1024) {
                    s.push(black_box(c), &mut out);
                }
                s.finish(&mut out);
                black_box(&out);
            }
            let secs = start.elapsed().as_secs_f64();
            let mib = f64::from(iters) * body.len() as f64 / (1024.0 * 1024.0);
            println!(
                "scrub 64 KiB {label} in 16 KiB chunks, 8 secrets ({} patterns): {:.0} MiB/s",
                p.replacements.len(),
                mib / secs
            );
        }
    }
}
