//! Scrubbing one stream: `Basic` tokens first (decoded and rewritten where they carry a value),
//! then every other form in one automaton pass. Each stage holds back only what may still
//! begin a match, so the output equals the whole-buffer scrub whatever the chunking.

use std::fmt;

use zeroize::Zeroizing;

use super::basic::BasicState;
use super::engine::Held;
use super::patterns::ScrubPatterns;

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
/// passes the same patterns, or patterns that scrub more
/// ([`crate::SandboxPolicy::scrub_union`], after a policy change): what is held back is raw
/// input, scanned again with the patterns of the call that releases it.
#[derive(Default)]
pub struct ScrubState {
    basic: BasicState,
    main: Held,
    /// Replacements made so far, per secret index.
    counts: Vec<(usize, u64)>,
    /// Sum of `counts`.
    total: u64,
}

impl fmt::Debug for ScrubState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrubber")
            .field("pending_len", &self.pending_len())
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl ScrubState {
    /// Bytes held back, waiting for the next chunk.
    pub fn pending_len(&self) -> usize {
        self.basic.len() + self.main.len()
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
        let Some((main, basic)) = patterns.engines() else {
            out.extend_from_slice(chunk);
            return;
        };
        let (counts, total) = (&mut self.counts, &mut self.total);
        let mut bump = |secret: usize| bump(counts, total, secret);
        if self.basic.passes(chunk) {
            self.main.push(main, chunk, out, &mut bump);
            return;
        }
        let mut stage = Zeroizing::new(Vec::with_capacity(chunk.len() + 64));
        self.basic.push(basic, chunk, &mut stage, &mut bump);
        self.main.push(main, &stage, out, &mut bump);
    }

    /// Ends the stream, appending the remainder scrubbed with `patterns` to `out`.
    pub fn finish(&mut self, patterns: &ScrubPatterns, out: &mut Vec<u8>) {
        let Some((main, basic)) = patterns.engines() else {
            out.extend_from_slice(&std::mem::take(&mut self.main.bytes));
            return;
        };
        let (counts, total) = (&mut self.counts, &mut self.total);
        let mut bump = |secret: usize| bump(counts, total, secret);
        let mut stage = Zeroizing::new(Vec::new());
        self.basic.finish(basic, &mut stage, &mut bump);
        self.main.push(main, &stage, out, &mut bump);
        self.main.finish(main, out, &mut bump);
    }
}

fn bump(counts: &mut Vec<(usize, u64)>, total: &mut u64, secret: usize) {
    *total += 1;
    match counts.iter_mut().find(|(s, _)| *s == secret) {
        Some((_, n)) => *n += 1,
        None => counts.push((secret, 1)),
    }
}
