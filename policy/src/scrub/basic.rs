//! `Basic` credentials: the text after `basic` (any case) and 1 to 4 blanks is a base64 token;
//! it is decoded as it streams and the decoded bytes are scrubbed (values and their windows).
//! A token in which nothing was found goes out exactly as it came; once something is found, the
//! rest of the token is re-encoded (standard alphabet, padded) from the scrubbed bytes. This
//! finds values of any length, also the short ones whose base64 is too short to be matched
//! anywhere else (`user:pin`).
//!
//! Streaming: a possible `basic` + blanks at the end of a chunk is held (at most 9 bytes); inside
//! a token, the characters of the decoded bytes the inner scrubber holds (and of an incomplete
//! 4-character group) are held. [`hold_bound`] is the most this stage holds.

use zeroize::Zeroizing;

use super::engine::{Engine, Held};

const SCHEME: &[u8] = b"basic";
/// Blanks allowed between the scheme and the token.
const MAX_BLANKS: usize = 4;

/// The most bytes this stage holds back with an inner engine of `max_len`.
/// Scrubs the `Basic` tokens of a whole text with `engine`; `None` (nothing allocated) when
/// the text holds no `basic` trigger.
pub(super) fn scrub_whole(
    engine: &Engine,
    input: &[u8],
    bump: &mut dyn FnMut(usize),
) -> Option<Zeroizing<Vec<u8>>> {
    let mut state = BasicState::default();
    if state.passes(input) {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(input.len() + 8));
    state.push(engine, input, &mut out, bump);
    state.finish(engine, &mut out, bump);
    Some(out)
}

pub(super) fn hold_bound(max_len: usize) -> usize {
    // Trigger: "basic" + blanks. Token: characters of the groups the inner engine and the
    // encoder hold (max_len - 1 + 2 bytes), the incomplete group, the padding, and the bytes.
    let held_bytes = max_len - 1 + 2;
    let group_chars = held_bytes.div_ceil(3) * 4;
    (SCHEME.len() + MAX_BLANKS).max(group_chars + 3 + 2 + held_bytes)
}

/// The state of this stage on one stream.
#[derive(Default)]
pub(super) struct BasicState {
    /// Bytes that may begin a trigger.
    held: Zeroizing<Vec<u8>>,
    token: Option<Box<Token>>,
}

#[derive(Default)]
struct Token {
    /// Original characters of the complete groups not yet emitted (while not rewriting).
    chars: Zeroizing<Vec<u8>>,
    /// Characters of the incomplete group.
    group: Zeroizing<Vec<u8>>,
    /// `=` seen (the token ends with its group).
    pad: usize,
    /// The decoded bytes' scrubber.
    inner: Held,
    /// Scrubbed decoded bytes not yet emitted as characters: fewer than 3 while not
    /// rewriting (whole groups go out as their original characters), the encoder's carry after.
    bytes: Zeroizing<Vec<u8>>,
    /// Something was replaced: the rest of the token is re-encoded.
    rewriting: bool,
    /// Replacements made in this token.
    replaced: u64,
    /// Base64 characters of the token so far (without padding).
    chars_seen: usize,
}

impl BasicState {
    /// Bytes held back.
    pub fn len(&self) -> usize {
        self.held.len()
            + self.token.as_ref().map_or(0, |t| {
                t.chars.len() + t.group.len() + t.pad + t.bytes.len() + t.inner.len()
            })
    }

    /// Whether `input` passes this stage unchanged and at once (no token, nothing held, no
    /// trigger in it): then the caller uses it as it is.
    pub fn passes(&self, input: &[u8]) -> bool {
        self.held.is_empty() && self.token.is_none() && matches!(find_trigger(input), Trigger::None)
    }

    /// Passes `input` on to `out`, with the tokens it finds scrubbed by `engine`.
    pub fn push(
        &mut self,
        engine: &Engine,
        input: &[u8],
        out: &mut Vec<u8>,
        bump: &mut dyn FnMut(usize),
    ) {
        let joined: Zeroizing<Vec<u8>>;
        let buf: &[u8] = if self.held.is_empty() {
            input
        } else {
            let mut j = Zeroizing::new(Vec::with_capacity(self.held.len() + input.len()));
            j.extend_from_slice(&self.held);
            j.extend_from_slice(input);
            self.held.clear();
            joined = j;
            &joined
        };
        let mut i = 0;
        while i < buf.len() {
            if let Some(token) = &mut self.token {
                let (used, ended) = token.feed(engine, &buf[i..], out, bump);
                i += used;
                if ended {
                    token.end(engine, out, bump);
                    self.token = None;
                }
                continue;
            }
            match find_trigger(&buf[i..]) {
                Trigger::At(token_start) => {
                    out.extend_from_slice(&buf[i..i + token_start]);
                    i += token_start;
                    self.token = Some(Box::default());
                }
                Trigger::Maybe(from) => {
                    out.extend_from_slice(&buf[i..i + from]);
                    self.held.extend_from_slice(&buf[i + from..]);
                    return;
                }
                Trigger::None => {
                    out.extend_from_slice(&buf[i..]);
                    return;
                }
            }
        }
    }

    /// Ends the stream.
    pub fn finish(&mut self, engine: &Engine, out: &mut Vec<u8>, bump: &mut dyn FnMut(usize)) {
        if let Some(mut token) = self.token.take() {
            token.end(engine, out, bump);
        }
        out.extend_from_slice(&std::mem::take(&mut self.held));
    }
}

enum Trigger {
    /// A token starts here.
    At(usize),
    /// A trigger may start here; more input decides.
    Maybe(usize),
    None,
}

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

/// The first `basic` + 1..=4 blanks + a base64 character in `s`.
fn find_trigger(s: &[u8]) -> Trigger {
    let mut from = 0;
    while let Some(at) = find_scheme(&s[from..]).map(|p| p + from) {
        let after = &s[at + SCHEME.len()..];
        let blanks = after
            .iter()
            .take(MAX_BLANKS + 1)
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        match after.get(blanks) {
            None if blanks <= MAX_BLANKS => return Trigger::Maybe(at),
            Some(&b) if (1..=MAX_BLANKS).contains(&blanks) && is_b64(b) => {
                return Trigger::At(at + SCHEME.len() + blanks);
            }
            _ => from = at + 1,
        }
    }
    // A proper prefix of the scheme at the very end.
    for k in (1..SCHEME.len()).rev() {
        if s.len() >= k && s[s.len() - k..].eq_ignore_ascii_case(&SCHEME[..k]) {
            return Trigger::Maybe(s.len() - k);
        }
    }
    Trigger::None
}

/// Where `basic` (any case) first occurs wholly in `s`.
fn find_scheme(s: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = memchr::memchr2(b'b', b'B', &s[from..]) {
        let at = from + p;
        if s.len() - at < SCHEME.len() {
            return None;
        }
        if s[at..at + SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn sextet(c: u8) -> u8 {
    match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    }
}

/// Decodes 2 to 4 base64 characters into 1 to 3 bytes.
fn decode_group(chars: &[u8], out: &mut Vec<u8>) {
    let mut n: u32 = 0;
    for (i, &c) in chars.iter().enumerate() {
        n |= u32::from(sextet(c)) << (18 - 6 * i);
    }
    let bytes = n.to_be_bytes();
    out.extend_from_slice(&bytes[1..chars.len()]);
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes whole triples of `bytes` (all of them, padded, when `last`); returns how many bytes
/// were used.
fn encode(bytes: &[u8], last: bool, pad: bool, out: &mut Vec<u8>) -> usize {
    let mut used = 0;
    for triple in bytes.chunks(3) {
        if triple.len() < 3 && !last {
            break;
        }
        let mut n: u32 = 0;
        for (i, &b) in triple.iter().enumerate() {
            n |= u32::from(b) << (16 - 8 * i);
        }
        for i in 0..4 {
            if i <= triple.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
            } else if pad {
                out.push(b'=');
            }
        }
        used += triple.len();
    }
    used
}

impl Token {
    /// Consumes the token's characters at the start of `s`; returns how many, and whether the
    /// token ended (at `s[used]`, which is not part of it).
    fn feed(
        &mut self,
        engine: &Engine,
        s: &[u8],
        out: &mut Vec<u8>,
        bump: &mut dyn FnMut(usize),
    ) -> (usize, bool) {
        let mut decoded = Zeroizing::new(Vec::with_capacity(s.len() / 4 * 3 + 3));
        let mut used = 0;
        let mut ended = false;
        for &c in s {
            if c == b'=' {
                // Padding follows 2 or 3 characters of a group and completes it.
                if self.group.len() >= 2 && self.group.len() + self.pad < 4 {
                    self.pad += 1;
                    used += 1;
                    if self.group.len() + self.pad == 4 {
                        ended = true;
                        break;
                    }
                    continue;
                }
                ended = true;
                break;
            }
            if self.pad > 0 || !is_b64(c) {
                ended = true;
                break;
            }
            used += 1;
            self.chars_seen += 1;
            self.group.push(c);
            if self.group.len() == 4 {
                decode_group(&self.group, &mut decoded);
                if !self.rewriting {
                    self.chars.extend_from_slice(&self.group);
                }
                self.group.clear();
            }
        }
        if !decoded.is_empty() {
            self.scrubbed(engine, &decoded, false, out, bump);
        }
        (used, ended)
    }

    /// Runs decoded bytes through the inner scrubber and emits what is final.
    fn scrubbed(
        &mut self,
        engine: &Engine,
        decoded: &[u8],
        last: bool,
        out: &mut Vec<u8>,
        bump: &mut dyn FnMut(usize),
    ) {
        let mut replaced = 0;
        let mut count = |s| {
            replaced += 1;
            bump(s);
        };
        if last {
            self.inner
                .push(engine, decoded, &mut self.bytes, &mut count);
            self.inner.finish(engine, &mut self.bytes, &mut count);
        } else {
            self.inner
                .push(engine, decoded, &mut self.bytes, &mut count);
        }
        self.replaced += replaced;
        if !self.rewriting && self.replaced > 0 {
            // The held characters stand for bytes that now go out re-encoded.
            self.rewriting = true;
            self.chars.clear();
        }
        if self.rewriting {
            // Padded like the original (canonical when it had whole groups), so equal-length
            // replacements keep the token's length.
            let pad = self.pad > 0 || (self.group.is_empty() && self.chars_seen.is_multiple_of(4));
            let used = encode(&self.bytes, last, pad, out);
            self.bytes.drain(..used);
        } else {
            // Whole groups of unchanged bytes go out as their original characters.
            let groups = if last {
                self.chars.len() / 4
            } else {
                self.bytes.len() / 3
            };
            let n = (groups * 4).min(self.chars.len());
            out.extend_from_slice(&self.chars[..n]);
            self.chars.drain(..n);
            let b = (groups * 3).min(self.bytes.len());
            self.bytes.drain(..b);
        }
    }

    /// The token ended: decodes the incomplete group and flushes.
    fn end(&mut self, engine: &Engine, out: &mut Vec<u8>, bump: &mut dyn FnMut(usize)) {
        let mut decoded = Zeroizing::new(Vec::with_capacity(3));
        if self.group.len() >= 2 {
            decode_group(&self.group, &mut decoded);
        }
        self.scrubbed(engine, &decoded, true, out, bump);
        if !self.rewriting {
            out.extend_from_slice(&self.chars);
            out.extend_from_slice(&self.group);
            out.extend(std::iter::repeat_n(b'=', self.pad));
        }
        self.chars.clear();
        self.group.clear();
        self.bytes.clear();
        self.pad = 0;
    }
}
