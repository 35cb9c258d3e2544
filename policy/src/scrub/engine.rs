//! One automaton of scrubbing patterns and its streaming step: leftmost-longest matches are
//! replaced; a match of a 12-byte window of a value is extended over every following byte that
//! continues the value, so a truncated echo goes as one replacement.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, Anchored, Input, MatchKind, StartKind};
use zeroize::Zeroizing;

/// Bytes of a value in a truncation window.
pub const WINDOW: usize = 12;

/// What a pattern's match becomes.
pub(super) enum Action {
    /// This replacement.
    Replace(Vec<u8>),
    /// The value `value`'s window at `offset`: extended while the text continues the value,
    /// then replaced by the value's placeholder.
    Window { value: usize, offset: usize },
}

/// A pattern under construction.
pub(super) struct Pattern {
    pub bytes: Zeroizing<Vec<u8>>,
    pub secret: usize,
    pub action: Action,
}

/// A scrubbed value, for window extension.
pub(super) struct Value {
    pub bytes: Zeroizing<Vec<u8>>,
    pub placeholder: Vec<u8>,
}

/// The automaton and what each pattern means.
pub(super) struct Engine {
    ac: AhoCorasick,
    /// Where a match may start, when every pattern has at least [`Starts::LEN`] bytes.
    starts: Option<Starts>,
    /// Per pattern id: (secret index, action).
    actions: Vec<(usize, Action)>,
    /// The patterns, sorted (pattern id order): whether a text's tail may still grow into one.
    sorted: Vec<Zeroizing<Vec<u8>>>,
    values: Vec<Value>,
    max_len: usize,
    preserves_length: bool,
}

impl Engine {
    /// Builds the engine; the first of identical patterns wins. `None` when there is no
    /// pattern, or the automaton cannot be built (size limits).
    pub fn new(mut patterns: Vec<Pattern>, values: Vec<Value>) -> Option<Engine> {
        // Stable: among identical patterns the first added stays first, and is kept.
        patterns.sort_by(|a, b| a.bytes.as_slice().cmp(b.bytes.as_slice()));
        patterns.dedup_by(|b, a| a.bytes == b.bytes);
        patterns.retain(|p| !p.bytes.is_empty());
        if patterns.is_empty() {
            return None;
        }
        let max_len = patterns.iter().map(|p| p.bytes.len()).max().unwrap_or(0);
        let preserves_length = patterns.iter().all(|p| match &p.action {
            Action::Replace(r) => r.len() == p.bytes.len(),
            Action::Window { .. } => false,
        });
        let starts = Starts::new(patterns.iter().map(|p| p.bytes.as_slice()));
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .start_kind(StartKind::Both)
            .build(patterns.iter().map(|p| p.bytes.as_slice()))
            .ok()?;
        let mut sorted = Vec::with_capacity(patterns.len());
        let mut actions = Vec::with_capacity(patterns.len());
        for p in patterns {
            sorted.push(p.bytes);
            actions.push((p.secret, p.action));
        }
        Some(Engine {
            ac,
            starts,
            actions,
            sorted,
            values,
            max_len,
            preserves_length,
        })
    }

    /// Longest pattern, in bytes (a window's extension never goes past its value's length, which
    /// is a pattern too).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Number of patterns.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// Whether every replacement is as long as what it replaces.
    pub fn preserves_length(&self) -> bool {
        self.preserves_length
    }

    /// Heap bytes of the automaton.
    pub fn memory_usage(&self) -> usize {
        self.ac.memory_usage() + self.starts.as_ref().map_or(0, |_| Starts::BYTES)
    }

    /// The first position at or after `from` where a match may begin that `buf` does not hold
    /// whole: `buf[p..]` is a proper prefix of a pattern, or continues a value (a window's
    /// extension) without reaching its end. `buf.len()` if there is none.
    fn first_live(&self, buf: &[u8], from: usize) -> usize {
        (from..buf.len())
            .find(|&p| {
                let tail = &buf[p..];
                if tail.len() >= Starts::LEN
                    && self.starts.as_ref().is_some_and(|s| !s.may_start(buf, p))
                {
                    return false;
                }
                self.grows_into_pattern(tail) || self.continues_a_value(tail)
            })
            .unwrap_or(buf.len())
    }

    fn grows_into_pattern(&self, tail: &[u8]) -> bool {
        let at = self.sorted.partition_point(|p| p.as_slice() < tail);
        self.sorted[at..]
            .iter()
            .take_while(|p| p.starts_with(tail))
            .any(|p| p.len() > tail.len())
    }

    fn continues_a_value(&self, tail: &[u8]) -> bool {
        tail.len() >= WINDOW
            && self.values.iter().any(|v| {
                v.bytes.len() > tail.len()
                    && memchr::memmem::find(&v.bytes[..v.bytes.len() - 1], tail).is_some()
            })
    }

    /// Whether any pattern occurs in `buf` (a whole text).
    pub fn has_match(&self, buf: &[u8]) -> bool {
        !buf.is_empty() && self.find(buf, 0, buf.len()).is_some()
    }

    /// The leftmost-longest match starting in `from..until`.
    fn find(&self, buf: &[u8], from: usize, until: usize) -> Option<aho_corasick::Match> {
        let Some(starts) = &self.starts else {
            return self
                .ac
                .find(Input::new(buf).range(from..))
                .filter(|m| m.start() < until);
        };
        // The first position where a pattern matches, in order, is the leftmost match; every
        // such position is covered by a hit.
        let mut at = from;
        while let Some(q) = starts.next(buf, at, until) {
            for p in (q + 1).saturating_sub(starts.stride).max(from)..=q.min(until - 1) {
                if !starts.may_start(buf, p) {
                    continue;
                }
                let m = self
                    .ac
                    .find(Input::new(buf).range(p..).anchored(Anchored::Yes));
                if m.is_some() {
                    return m;
                }
            }
            at = q + starts.stride;
        }
        None
    }

    /// Replaces the matches in `buf` that start before `until`, appending `buf` up to the end of
    /// the last of them (or `until`, if further) to `out`; calls `bump` with the secret of each.
    /// Returns how much of `buf` went out. A match starting before `until` lies wholly inside
    /// `buf` when `until` is at most `buf.len() - (max_len - 1)` or `buf` is the whole text.
    pub fn scrub(
        &self,
        buf: &[u8],
        until: usize,
        out: &mut Vec<u8>,
        mut bump: impl FnMut(usize),
    ) -> usize {
        let mut pos = 0;
        while pos < until {
            let Some(m) = self.find(buf, pos, until) else {
                break;
            };
            let (secret, action) = &self.actions[m.pattern().as_usize()];
            out.extend_from_slice(&buf[pos..m.start()]);
            let end = match action {
                Action::Replace(replacement) => {
                    out.extend_from_slice(replacement);
                    m.end()
                }
                Action::Window { value, offset } => {
                    let value = &self.values[*value];
                    let rest = value.bytes.get(offset + WINDOW..).unwrap_or_default();
                    let more = rest
                        .iter()
                        .zip(&buf[m.end()..])
                        .take_while(|(a, b)| a == b)
                        .count();
                    out.extend_from_slice(&value.placeholder);
                    m.end() + more
                }
            };
            bump(*secret);
            pos = end;
        }
        let done = pos.max(until);
        out.extend_from_slice(&buf[pos..done]);
        done
    }

    /// The secrets whose patterns occur in `input`.
    pub fn secrets_in<'a>(&'a self, input: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
        self.ac
            .find_iter(input)
            .map(|m| self.actions[m.pattern().as_usize()].0)
    }
}

/// A stream's bytes held back by one engine: they may still begin a match.
#[derive(Default)]
pub(super) struct Held {
    pub bytes: Zeroizing<Vec<u8>>,
}

impl Held {
    /// Scrubs `chunk` after the held bytes; what may still begin a match is held.
    pub fn push(
        &mut self,
        engine: &Engine,
        chunk: &[u8],
        out: &mut Vec<u8>,
        bump: impl FnMut(usize),
    ) {
        // Without held-back bytes the chunk is scanned in place, without a copy.
        let joined: Zeroizing<Vec<u8>>;
        let buf: &[u8] = if self.bytes.is_empty() {
            chunk
        } else {
            let mut j = Zeroizing::new(Vec::with_capacity(self.bytes.len() + chunk.len()));
            j.extend_from_slice(&self.bytes);
            j.extend_from_slice(chunk);
            joined = j;
            &joined
        };
        // A match starting before `horizon` lies wholly inside `buf`, and so does one starting
        // before the first position whose tail may still grow into a match: both are final.
        // Only what may still begin a match is held, so a stream (server-sent events) is not
        // delayed by a fixed tail.
        let horizon = buf.len().saturating_sub(engine.max_len() - 1);
        let live = engine.first_live(buf, horizon);
        let done = engine.scrub(buf, live, out, bump);
        // Exactly what is held: a buffer sized for the longest pattern would be allocated and
        // zeroized (all of its capacity) on every chunk.
        self.bytes = Zeroizing::new(buf[done..].to_vec());
    }

    /// Ends the stream: scrubs and appends what is held.
    pub fn finish(&mut self, engine: &Engine, out: &mut Vec<u8>, bump: impl FnMut(usize)) {
        let held = std::mem::take(&mut self.bytes);
        engine.scrub(&held, held.len(), out, bump);
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// A filter of where a match may start: a bit per hash of the [`Starts::LEN`]-byte grams at
/// the first `stride` offsets of every pattern. A text is checked only every `stride`
/// positions — a pattern starting at `p` shows one of those grams at the next checked position
/// — for a load, a multiply and a bit test each, far less than walking the automaton, which
/// runs (anchored, at the `stride` positions a hit covers) only where a bit is set.
struct Starts {
    /// Grams at the first `stride` offsets of the patterns.
    bits: Box<[u64; Starts::WORDS]>,
    /// Grams at offset 0: a position whose gram is not here starts no pattern.
    first: Box<[u64; Starts::WORDS]>,
    stride: usize,
}

impl Starts {
    const LEN: usize = 4;
    const MAX_STRIDE: usize = 4;
    const HASH_BITS: u32 = 18;
    const WORDS: usize = (1 << Self::HASH_BITS) / 64;
    const BYTES: usize = Self::WORDS * 8 * 2;

    /// `None` when a pattern is shorter than [`Starts::LEN`] (values of 1 to 3 bytes).
    fn new<'a>(patterns: impl Iterator<Item = &'a [u8]> + Clone) -> Option<Starts> {
        let min = patterns.clone().map(<[u8]>::len).min()?;
        if min < Self::LEN {
            return None;
        }
        let stride = (min - (Self::LEN - 1)).min(Self::MAX_STRIDE);
        let mut bits = Box::new([0u64; Self::WORDS]);
        let mut first = Box::new([0u64; Self::WORDS]);
        for p in patterns {
            for (i, gram) in p.windows(Self::LEN).take(stride).enumerate() {
                let h = Self::hash(gram);
                bits[h / 64] |= 1 << (h % 64);
                if i == 0 {
                    first[h / 64] |= 1 << (h % 64);
                }
            }
        }
        Some(Starts {
            bits,
            first,
            stride,
        })
    }

    /// Whether a pattern may start at `p` (its first gram is one of a pattern's).
    fn may_start(&self, buf: &[u8], p: usize) -> bool {
        buf.get(p..p + Self::LEN).is_some_and(|gram| {
            let h = Self::hash(gram);
            self.first[h / 64] & (1 << (h % 64)) != 0
        })
    }

    #[inline(always)]
    fn hash(w: &[u8]) -> usize {
        let x = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        (x.wrapping_mul(0x9E37_79B1) >> (32 - Self::HASH_BITS)) as usize
    }

    /// The first checked position `q` at or after `from` (and before `until + stride - 1`)
    /// whose gram may belong to a pattern starting in `q + 1 - stride ..= q`.
    fn next(&self, buf: &[u8], from: usize, until: usize) -> Option<usize> {
        let last = (until + self.stride - 1).min(buf.len().saturating_sub(Self::LEN - 1));
        (from..last).step_by(self.stride).find(|&q| {
            let h = Self::hash(&buf[q..q + Self::LEN]);
            self.bits[h / 64] & (1 << (h % 64)) != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A pattern, and for a window its (value, offset).
    type Plain = (Vec<u8>, Option<(usize, usize)>);

    /// Leftmost-longest by brute force, windows extended: what `Engine::scrub` must equal.
    fn naive(patterns: &[Plain], values: &[Vec<u8>], text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let best = patterns
                .iter()
                .enumerate()
                .filter(|(_, (p, _))| text[pos..].starts_with(p))
                .max_by_key(|(i, (p, _))| (p.len(), std::cmp::Reverse(*i)));
            match best {
                None => {
                    out.push(text[pos]);
                    pos += 1;
                }
                Some((i, (p, window))) => {
                    let mut end = pos + p.len();
                    if let Some((v, offset)) = window {
                        let rest = &values[*v][offset + WINDOW..];
                        end += rest
                            .iter()
                            .zip(&text[end..])
                            .take_while(|(a, b)| a == b)
                            .count();
                    }
                    out.extend_from_slice(format!("<{i}>").as_bytes());
                    pos = end;
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// The start filter never hides a match: the engine equals brute force.
        #[test]
        fn engine_equals_brute_force(
            values in prop::collection::vec("[ab]{4,16}", 1..3),
            extra in prop::collection::vec("[abc]{1,8}", 0..4),
            text in "[abc]{0,80}",
        ) {
            let values: Vec<Vec<u8>> = values.into_iter().map(String::into_bytes).collect();
            let mut list: Vec<Plain> = Vec::new();
            for (i, v) in values.iter().enumerate() {
                list.push((v.clone(), None));
                for offset in 0..(v.len() + 1).saturating_sub(WINDOW) {
                    list.push((v[offset..offset + WINDOW].to_vec(), Some((i, offset))));
                }
            }
            list.extend(extra.into_iter().map(|e| (e.into_bytes(), None)));
            // First of identical patterns wins, as in `Engine::new`.
            let mut dedup: Vec<Plain> = Vec::new();
            for p in list {
                if !dedup.iter().any(|d| d.0 == p.0) {
                    dedup.push(p);
                }
            }
            let mut sorted = dedup.clone();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let label = |bytes: &[u8]| {
                let i = sorted.iter().position(|s| s.0 == bytes).unwrap_or(0);
                format!("<{i}>").into_bytes()
            };
            let patterns = dedup
                .iter()
                .map(|(p, w)| Pattern {
                    bytes: Zeroizing::new(p.clone()),
                    secret: 0,
                    action: match w {
                        Some((value, offset)) => Action::Window { value: *value, offset: *offset },
                        None => Action::Replace(label(p)),
                    },
                })
                .collect();
            let vals = values
                .iter()
                .map(|v| Value { bytes: Zeroizing::new(v.clone()), placeholder: label(v) })
                .collect();
            let engine = Engine::new(patterns, vals).unwrap();
            let mut out = Vec::new();
            engine.scrub(text.as_bytes(), text.len(), &mut out, |_| {});
            // The reference labels by position in `sorted`; windows by their value's label.
            let reference = naive(&sorted, &values, text.as_bytes());
            let reference = {
                let mut r = String::from_utf8(reference).unwrap();
                for (i, (_, w)) in sorted.iter().enumerate() {
                    if let Some((v, _)) = w {
                        let l = String::from_utf8(label(&values[*v])).unwrap();
                        r = r.replace(&format!("<{i}>"), &l);
                    }
                }
                r.into_bytes()
            };
            prop_assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&reference));
        }
    }
}
