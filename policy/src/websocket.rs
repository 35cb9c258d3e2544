//! WebSocket messages on an intercepted connection (issue 20): what veil does to each payload,
//! free of I/O.
//!
//! The agent's relay reassembles each message (fragments included, within its size limits)
//! before it gets here, so a value split across fragments is one text to these functions; a
//! value split across two messages is caught by the scrubber's truncated-echo window (any 12
//! bytes of it), like a value split across two responses.
//! - server → client: data payloads are scrubbed with every form [`crate::scrub`] covers; a text
//!   message stays valid UTF-8 (a replacement that would cut a character leaves U+FFFD
//!   instead); a close reason is scrubbed and cut to what a close frame holds, at a character
//!   boundary; a ping or pong payload is scrubbed and cut to 125 bytes.
//! - client → server: placeholders are substituted only where request bodies get it (a
//!   secret's `bodySubstitution`, or the agent-wide `body_substitution`), as a JSON body when a
//!   text message looks like JSON, as text otherwise ([`message_kind`]).

use crate::BodyKind;
use crate::scrub::ScrubPatterns;

/// Close code veil sends when a message could not be scrubbed or substituted (policy violation).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code veil sends when a frame or message is over its limits (message too big).
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code veil sends when a peer broke the protocol.
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Close code veil sends when the connection was idle too long (going away).
pub const CLOSE_IDLE: u16 = 1001;
/// Largest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Largest close reason: a close payload is the 2-byte code and the reason.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// A scrubbed payload and how many occurrences were replaced.
#[derive(Debug, PartialEq, Eq)]
pub struct Scrubbed<T> {
    /// The payload to send on.
    pub payload: T,
    /// Occurrences replaced.
    pub replaced: u64,
}

/// Scrubs a binary message's payload.
pub fn scrub_binary(patterns: &ScrubPatterns, payload: &[u8]) -> Scrubbed<Vec<u8>> {
    match patterns.scrub_counted(payload) {
        Some((payload, replaced)) => Scrubbed { payload, replaced },
        None => Scrubbed {
            payload: payload.to_vec(),
            replaced: 0,
        },
    }
}

/// Scrubs a text message's payload; the result is valid UTF-8.
pub fn scrub_text(patterns: &ScrubPatterns, payload: &str) -> Scrubbed<String> {
    match patterns.scrub_counted(payload.as_bytes()) {
        Some((bytes, replaced)) => Scrubbed {
            payload: into_text(bytes),
            replaced,
        },
        None => Scrubbed {
            payload: payload.to_owned(),
            replaced: 0,
        },
    }
}

/// Scrubs a ping or pong payload, cut to [`MAX_CONTROL_PAYLOAD`] bytes (a placeholder may be
/// longer than the value it replaced).
pub fn scrub_control(patterns: &ScrubPatterns, payload: &[u8]) -> Scrubbed<Vec<u8>> {
    let mut out = scrub_binary(patterns, payload);
    out.payload.truncate(MAX_CONTROL_PAYLOAD);
    out
}

/// Scrubs a close reason, cut to [`MAX_CLOSE_REASON`] bytes at a character boundary.
pub fn scrub_close_reason(patterns: &ScrubPatterns, reason: &str) -> Scrubbed<String> {
    let mut out = scrub_text(patterns, reason);
    out.payload = truncate_text(out.payload, MAX_CLOSE_REASON);
    out
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn truncate_text(mut text: String, max: usize) -> String {
    if text.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
    }
    text
}

/// How a client message is substituted: a text message whose first non-blank character opens a
/// JSON object or array as JSON (a value lands escaped inside its string), anything else as text.
pub fn message_kind(text: bool, payload: &[u8]) -> BodyKind {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if text && matches!(first, Some(b'{' | b'[')) {
        BodyKind::Json
    } else {
        BodyKind::Text
    }
}

/// Bytes that were UTF-8 before scrubbing, as text: a window replacement that began or ended
/// inside a character leaves a broken sequence, shown as U+FFFD (never the bytes it held).
fn into_text(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

#[cfg(test)]
mod tests;
