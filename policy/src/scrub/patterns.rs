//! The per-sandbox automata over values and their encodings ([`ScrubPatterns`]); what each
//! form replaces is in the parent module's docs.

use std::fmt;

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use zeroize::Zeroizing;

use super::coding::{self, ContentCoding, UnsupportedCoding};
use super::engine::{Action, Engine, Pattern, Value, WINDOW};
use super::{basic, forms};
use crate::secret::MountedSecret;

/// Shortest encoded (base64, percent or hex) form that is matched.
pub const MIN_ENCODED_LEN: usize = 8;

/// The per-sandbox automata over values and their encodings.
pub struct ScrubPatterns {
    /// Values and their encodings, in the text.
    main: Option<Engine>,
    /// Values and their windows, inside decoded `Basic` credentials.
    basic: Option<Engine>,
    /// One more than the most bytes a stream holds back.
    max_len: usize,
}

impl fmt::Debug for ScrubPatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrubPatterns")
            .field("patterns", &self.pattern_count())
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl ScrubPatterns {
    /// Builds the patterns for the secrets mounted in a sandbox; secret indexes in counts follow
    /// `secrets`.
    pub fn new(secrets: &[MountedSecret]) -> Self {
        let mut main: Vec<Pattern> = Vec::new();
        let mut inner: Vec<Pattern> = Vec::new();
        let mut values: Vec<Value> = Vec::new();
        for (i, s) in secrets.iter().enumerate() {
            for v in s.scrubbed_values() {
                add_value(
                    i,
                    v.expose(),
                    s.placeholder.as_bytes(),
                    &mut main,
                    &mut inner,
                    &mut values,
                );
            }
        }
        let inner_values = values
            .iter()
            .map(|v| Value {
                bytes: v.bytes.clone(),
                placeholder: v.placeholder.clone(),
            })
            .collect();
        let main = Engine::new(main, values);
        let basic = Engine::new(inner, inner_values);
        let max_len = match (&main, &basic) {
            (Some(m), Some(b)) => m.max_len() + basic::hold_bound(b.max_len()),
            _ => 0,
        };
        // Building only fails past automaton size limits far above a sandbox's secrets; then
        // nothing can be scrubbed, and `is_active` tells the caller to refuse traffic.
        let (main, basic) = match (main, basic) {
            (Some(m), Some(b)) => (Some(m), Some(b)),
            _ => (None, None),
        };
        Self {
            main,
            basic,
            max_len,
        }
    }

    /// Whether there is anything to scrub (false for a sandbox without secrets, or if the
    /// automaton could not be built: a caller that has secrets must then not forward responses).
    pub fn is_active(&self) -> bool {
        self.main.is_some()
    }

    /// One more than the most bytes a stream holds back: the longest pattern, plus what a
    /// `Basic` token being decoded may hold.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Number of patterns (both automata).
    pub fn pattern_count(&self) -> usize {
        self.main.as_ref().map_or(0, Engine::len) + self.basic.as_ref().map_or(0, Engine::len)
    }

    /// Heap bytes of the automata.
    pub fn memory_usage(&self) -> usize {
        self.main.as_ref().map_or(0, Engine::memory_usage)
            + self.basic.as_ref().map_or(0, Engine::memory_usage)
    }

    /// Whether scrubbing keeps a text's length (every replacement as long as what it replaces),
    /// so a response may keep its `Content-Length`. Never with windows or `Basic` tokens.
    pub fn preserves_length(&self) -> bool {
        self.main.as_ref().is_some_and(Engine::preserves_length)
            && self.basic.as_ref().is_some_and(Engine::preserves_length)
    }

    /// Scrubs a whole buffer (a header value, a small body); `None` if nothing matched.
    pub fn scrub_all(&self, input: &[u8]) -> Option<Vec<u8>> {
        self.scrub_counted(input).map(|(out, _)| out)
    }

    /// Scrubs a whole buffer and says how many occurrences it replaced; `None` if none.
    pub fn scrub_counted(&self, input: &[u8]) -> Option<(Vec<u8>, u64)> {
        let (main, basic) = self.engines()?;
        // A whole buffer needs none of the stream's holding back: headers are scrubbed one by
        // one on every response, so the common case (nothing found) allocates nothing.
        let mut total = 0u64;
        let mut bump = |_: usize| total += 1;
        let staged = basic::scrub_whole(basic, input, &mut bump);
        let text: &[u8] = staged.as_deref().map_or(input, Vec::as_slice);
        if staged.is_none() && !main.has_match(text) {
            return None;
        }
        let mut out = Vec::with_capacity(text.len());
        main.scrub(text, text.len(), &mut out, &mut bump);
        (total > 0).then_some((out, total))
    }

    /// The content coding of a response whose `Content-Encoding` header values are `values`;
    /// see [`coding::content_coding`].
    pub fn content_coding<'a>(
        &self,
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<ContentCoding, UnsupportedCoding> {
        coding::content_coding(values)
    }

    /// Indices of the secrets whose value (in any form) occurs in `input`.
    pub fn secrets_in(&self, input: &[u8]) -> Vec<usize> {
        let mut found = Vec::new();
        if let Some(main) = &self.main {
            for i in main.secrets_in(input) {
                if !found.contains(&i) {
                    found.push(i);
                }
            }
        }
        found
    }

    pub(super) fn engines(&self) -> Option<(&Engine, &Engine)> {
        Some((self.main.as_ref()?, self.basic.as_ref()?))
    }
}

/// Adds the patterns of one value of secret `secret`.
fn add_value(
    secret: usize,
    text: &str,
    placeholder: &[u8],
    main: &mut Vec<Pattern>,
    inner: &mut Vec<Pattern>,
    values: &mut Vec<Value>,
) {
    let value = text.as_bytes();
    if value.is_empty() {
        return;
    }
    let replace = |bytes: Zeroizing<Vec<u8>>, replacement: Vec<u8>| Pattern {
        bytes,
        secret,
        action: Action::Replace(replacement),
    };
    let literal = || Zeroizing::new(value.to_vec());
    main.push(replace(literal(), placeholder.to_vec()));
    inner.push(replace(literal(), placeholder.to_vec()));
    for form in forms::json(text).into_iter().chain(forms::html(text)) {
        if form.as_slice() != value {
            main.push(replace(form, placeholder.to_vec()));
        }
    }
    let long_enough = |f: &[u8]| f.len() >= MIN_ENCODED_LEN && f != value;
    for (form, replacement) in forms::percent(value, placeholder)
        .into_iter()
        .chain(forms::hex(value, placeholder))
    {
        if long_enough(&form) {
            main.push(replace(form, replacement));
        }
    }
    for align in 0..3 {
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let core = forms::base64_core(engine, value, align);
            if core.len() >= MIN_ENCODED_LEN {
                let replacement = forms::base64_core(engine, placeholder, align).to_vec();
                if std::ptr::eq(engine, &STANDARD_NO_PAD) {
                    for (form, r) in forms::wrapped_base64(&core, &replacement, align) {
                        main.push(replace(form, r));
                    }
                }
                main.push(replace(core, replacement));
            }
        }
    }
    let index = values.len();
    values.push(Value {
        bytes: literal(),
        placeholder: placeholder.to_vec(),
    });
    for range in forms::secret_ranges(value) {
        for offset in range.start..(range.end + 1).saturating_sub(WINDOW) {
            let window = Zeroizing::new(value[offset..offset + WINDOW].to_vec());
            for list in [&mut *main, &mut *inner] {
                list.push(Pattern {
                    bytes: window.clone(),
                    secret,
                    action: Action::Window {
                        value: index,
                        offset,
                    },
                });
            }
        }
    }
}
