//! One automaton of scrubbing patterns and its streaming step: leftmost-longest matches are
//! replaced; a match of a 12-byte window of a value is extended over every following byte that
//! continues the value, so a truncated echo goes as one replacement.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, Input, MatchKind};
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
    /// Per pattern id: (secret index, action).
    actions: Vec<(usize, Action)>,
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
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns.iter().map(|p| p.bytes.as_slice()))
            .ok()?;
        let actions = patterns.into_iter().map(|p| (p.secret, p.action)).collect();
        Some(Engine {
            ac,
            actions,
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
        self.ac.memory_usage()
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
            let Some(m) = self.ac.find(Input::new(buf).range(pos..)) else {
                break;
            };
            if m.start() >= until {
                break;
            }
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
        // A match starting before `horizon` lies wholly inside `buf`, so it is final.
        let horizon = buf.len().saturating_sub(engine.max_len() - 1);
        let done = engine.scrub(buf, horizon, out, bump);
        let mut rest = Zeroizing::new(Vec::with_capacity(engine.max_len()));
        rest.extend_from_slice(&buf[done..]);
        self.bytes = rest;
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
