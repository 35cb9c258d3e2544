//! Response scrubbing (issues 6 and 13): every scrubbed value goes back to its placeholder,
//! streaming.
//!
//! [`ScrubPatterns`] is built once per sandbox from its mounted secrets (current values,
//! rotated-out values in their grace period, and retired secrets' last values); a [`Scrubber`]
//! per response stream (body, or a sequence of WebSocket payloads) holds at most
//! [`ScrubPatterns::max_len`]` - 1` pending bytes, so memory is bounded and a value split across
//! chunks is still found. The output equals [`ScrubPatterns::scrub_all`] on the concatenated
//! stream, whatever the chunking.
//!
//! Forms replaced, for each value (leftmost-longest, in one pass; "any length" = every value):
//! - the literal value (any length) → the placeholder;
//! - JSON string escapes (any length): `\"`, `\\`, control characters, `\/` (PHP), non-ASCII as
//!   `\uXXXX` (Python, PHP), Go's and Rails' HTML-safe `\u003c \u003e \u0026 \u2028 \u2029`,
//!   Gson's (also `\u003d \u0027`), hex digits in either case → the placeholder;
//! - HTML character references (any length), as Python `html.escape`, Go `html.EscapeString`
//!   and `html/template` (`&#43;` for `+`), PHP `htmlspecialchars` (`&#039;`), Ruby/lodash
//!   (`&#39;`), Java `escapeHtml4` write them; every non-alphanumeric character as `&#NN;`,
//!   `&#xhh;` or `&#xHH;` (and OWASP ESAPI's mix); every character numeric → the placeholder;
//! - percent-encoding (the encoded form at least [`MIN_ENCODED_LEN`] characters and different
//!   from the literal) by RFC 3986, `encodeURIComponent`, `encodeURI`, Python `quote`, Go
//!   `PathEscape`, hex in either case, space as `%20` or `+` → the placeholder;
//! - hex (lower and upper case; at least [`MIN_ENCODED_LEN`] characters, so values of 4 bytes or
//!   more) → the placeholder's hex;
//! - base64, standard and URL-safe, at each of the 3 alignments a value can have inside a longer
//!   encoded text, at least [`MIN_ENCODED_LEN`] characters (values of 7 bytes or more at every
//!   alignment, 6 at one) → the placeholder's base64 at the same alignment. Only the characters
//!   made purely of the value's bits are matched; the one boundary character at each end
//!   carries at most 4 bits of the value's first or last byte;
//! - line-wrapped base64 (standard alphabet, 64 and 76 columns, `\n` or `\r\n`, the break at
//!   any place in the value) with the same minimum → the placeholder's base64, the breaks at
//!   the same offsets;
//! - `Basic` credentials (`basic` in any case, 1–4 blanks, a standard base64 token): decoded,
//!   the values in them (any length) and their windows replaced, re-encoded (see [`basic`]);
//! - a truncated echo: any 12 ([`WINDOW`]) consecutive bytes of a value, extended over every
//!   following byte that continues the value → the placeholder; not inside a JWT's header and
//!   payload (public, shared by every token of an issuer) nor PEM armor lines.
//!
//! Beside the scrubbing itself, [`coding`] decides what HTTP needs for it, without I/O.
//!
//! Not covered: compressed payloads a body carries as data (archives, git packs; a body that
//! still starts with a gzip/zlib/zstd magic after its `Content-Encoding` was decoded is
//! withheld by the agent), a value cut into pieces shorter than 12 bytes across responses or
//! across encodings, and other transformations (reversal, case changes, encryption).

mod basic;
pub mod coding;
mod engine;
mod forms;
mod patterns;
mod stream;

pub use coding::{
    ContentCoding, Sniff, UnsupportedCoding, accept_encoding, sniff, transfer_coding_ok,
};
pub use engine::WINDOW;
pub use patterns::{MIN_ENCODED_LEN, ScrubPatterns};
pub use stream::{ScrubState, Scrubber};

#[cfg(test)]
mod coverage;
#[cfg(test)]
mod tests;
