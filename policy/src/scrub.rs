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
//!   [`MIN_ENCODED_LEN`] characters are not matched, as they would hit unrelated text.
//!
//! Not covered here: compressed bodies (the caller decompresses), line-wrapped base64, JSON
//! escapes (`\/`, `\uXXXX`).

use std::fmt;

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
        for (i, s) in secrets.iter().enumerate() {
            let value = s.value.expose().as_bytes();
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

    /// Scrubs a whole buffer (a header value, a small body); `None` if nothing matched.
    pub fn scrub_all(&self, input: &[u8]) -> Option<Vec<u8>> {
        let ac = self.ac.as_ref()?;
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        for m in ac.find_iter(input) {
            let buf = out.get_or_insert_with(|| Vec::with_capacity(input.len()));
            buf.extend_from_slice(&input[copied..m.start()]);
            buf.extend_from_slice(&self.replacements[m.pattern().as_usize()].1);
            copied = m.end();
        }
        out.map(|mut buf| {
            buf.extend_from_slice(&input[copied..]);
            buf
        })
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
    /// Bytes that may still be the start of a value.
    pending: Zeroizing<Vec<u8>>,
    /// Replacements made so far, per secret index.
    counts: Vec<(usize, u64)>,
}

impl fmt::Debug for Scrubber<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("pending_len", &self.pending.len())
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl<'p> Scrubber<'p> {
    /// A scrubber for one stream.
    pub fn new(patterns: &'p ScrubPatterns) -> Self {
        Self {
            patterns,
            pending: Zeroizing::new(Vec::new()),
            counts: Vec::new(),
        }
    }

    /// Bytes held back, waiting for the next chunk.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Replacements made so far: (secret index, count).
    pub fn counts(&self) -> &[(usize, u64)] {
        &self.counts
    }

    /// Scrubs the next chunk, appending what is final to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let Some(ac) = &self.patterns.ac else {
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
        let horizon = buf.len().saturating_sub(self.patterns.max_len - 1);
        let mut pos = 0;
        for m in ac.find_iter(buf) {
            if m.start() >= horizon {
                break;
            }
            let (secret, replacement) = &self.patterns.replacements[m.pattern().as_usize()];
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(replacement);
            bump(&mut self.counts, *secret);
            pos = m.end();
        }
        let keep_from = pos.max(horizon);
        out.extend_from_slice(&buf[pos..keep_from]);
        let rest = Zeroizing::new(buf[keep_from..].to_vec());
        self.pending = rest;
    }

    /// Ends the stream, appending the scrubbed remainder to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let pending = std::mem::take(&mut *self.pending);
        let pending = Zeroizing::new(pending);
        if let Some(ac) = &self.patterns.ac {
            let mut pos = 0;
            for m in ac.find_iter(pending.as_slice()) {
                let (secret, replacement) = &self.patterns.replacements[m.pattern().as_usize()];
                out.extend_from_slice(&pending[pos..m.start()]);
                out.extend_from_slice(replacement);
                bump(&mut self.counts, *secret);
                pos = m.end();
            }
            out.extend_from_slice(&pending[pos..]);
        } else {
            out.extend_from_slice(&pending);
        }
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
