//! gRPC response bodies on an intercepted connection (issue 20), free of I/O.
//!
//! A gRPC body is a sequence of length-prefixed messages (1 byte compressed flag, 4 bytes
//! big-endian length, payload). Scrubbing it as a byte stream would replace a value with a
//! placeholder of another length inside a message whose prefix still gives the old length:
//! the client would mis-frame every following message. So each message is reassembled whole
//! ([`Deframer`], bounded by a maximum size), scrubbed, and sent on with its new length
//! ([`scrub_message`]). A compressed message (flag 1) cannot be scrubbed without inflating it:
//! the agent asks for identity (`grpc-accept-encoding`) and ends a stream that carries one
//! anyway with an error status — never passes it on.

use zeroize::Zeroizing;

use crate::scrub::ScrubPatterns;

/// Largest message veil reassembles: gRPC's default maximum receive size.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// `grpc-status` veil ends a stream with when a message cannot be scrubbed (INTERNAL).
pub const STATUS_INTERNAL: &str = "13";
/// `grpc-status` veil ends a stream with when a message is over [`MAX_MESSAGE`]
/// (RESOURCE_EXHAUSTED).
pub const STATUS_RESOURCE_EXHAUSTED: &str = "8";

/// Length of a message's prefix.
const PREFIX: usize = 5;

/// Whether a `Content-Type` is gRPC's (`application/grpc`, `application/grpc+proto`, …), whose
/// body is length-prefixed messages; gRPC-Web (`application/grpc-web…`) is not.
pub fn is_grpc(content_type: &[u8]) -> bool {
    let Some(rest) = content_type
        .get(..16)
        .filter(|p| p.eq_ignore_ascii_case(b"application/grpc"))
        .map(|_| &content_type[16..])
    else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+' | b';' | b' '))
}

/// Why a gRPC body cannot be scrubbed (names no value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrpcError {
    /// A message with the compressed flag set.
    #[error("veil: a compressed gRPC message (veil asked for identity and cannot scrub it)")]
    Compressed,
    /// A message over the maximum size.
    #[error("veil: a gRPC message over {MAX_MESSAGE} bytes")]
    TooLarge,
    /// The body ended inside a message.
    #[error("veil: the upstream body ended inside a gRPC message")]
    Truncated,
}

impl GrpcError {
    /// The `grpc-status` a stream ending with this error gets.
    pub fn status(&self) -> &'static str {
        match self {
            Self::TooLarge => STATUS_RESOURCE_EXHAUSTED,
            Self::Compressed | Self::Truncated => STATUS_INTERNAL,
        }
    }
}

/// Reassembles messages from body chunks cut anywhere; holds at most one partial message.
#[derive(Default)]
pub struct Deframer {
    /// The partial message (prefix included); zeroized, it may hold a value.
    buf: Zeroizing<Vec<u8>>,
    max: Option<usize>,
}

impl std::fmt::Debug for Deframer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deframer")
            .field("held", &self.buf.len())
            .finish()
    }
}

impl Deframer {
    /// A deframer refusing messages over `max` bytes (default [`MAX_MESSAGE`]).
    pub fn with_max(max: usize) -> Self {
        Self {
            buf: Zeroizing::default(),
            max: Some(max),
        }
    }

    /// Takes the next chunk; returns the payloads of the messages it completed, in order.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<Zeroizing<Vec<u8>>>, GrpcError> {
        let max = self.max.unwrap_or(MAX_MESSAGE);
        let mut out = Vec::new();
        while !data.is_empty() {
            if self.buf.len() < PREFIX {
                let take = (PREFIX - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < PREFIX {
                    break;
                }
                if self.buf[0] & 1 != 0 {
                    return Err(GrpcError::Compressed);
                }
                if self.len() > max {
                    return Err(GrpcError::TooLarge);
                }
            }
            let missing = PREFIX + self.len() - self.buf.len();
            let take = missing.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if take == missing {
                out.push(Zeroizing::new(self.buf[PREFIX..].to_vec()));
                self.buf.clear();
            }
        }
        Ok(out)
    }

    /// Checks the body ended between messages.
    pub fn finish(&self) -> Result<(), GrpcError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(GrpcError::Truncated)
        }
    }

    /// The payload length of the held message (its prefix must be complete).
    fn len(&self) -> usize {
        let n = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

/// Scrubs one message's payload and frames it (uncompressed) with its new length; returns
/// the framed message and the occurrences replaced.
pub fn scrub_message(patterns: &ScrubPatterns, payload: &[u8]) -> (Vec<u8>, u64) {
    let (scrubbed, replaced) = match patterns.scrub_counted(payload) {
        Some((new, n)) => (Some(Zeroizing::new(new)), n),
        None => (None, 0),
    };
    let body = scrubbed.as_deref().map_or(payload, Vec::as_slice);
    (frame(body), replaced)
}

/// A message: flag 0 (uncompressed), big-endian length, payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(PREFIX + payload.len());
    out.push(0);
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SandboxPolicy;
    use crate::host::HostPattern;
    use crate::secret::MountedSecret;
    use proptest::prelude::*;
    use veil_link::SecretValue;

    const VALUE: &str = "sk-grpc-value-0123456789";
    const PH: &str = "veil_ph_0123456789abcdef0123456789abcdef";

    fn policy() -> SandboxPolicy {
        SandboxPolicy::new(vec![MountedSecret {
            previous: Vec::new(),
            retired: false,
            id: "sec_1".into(),
            name: "KEY".into(),
            placeholder: PH.into(),
            hosts: vec![HostPattern::parse("api.test").unwrap()],
            value: SecretValue::new(VALUE.into()),
            body_substitution: false,
            wrong_host: Default::default(),
        }])
        .unwrap()
    }

    fn deframe_all(chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, GrpcError> {
        let mut d = Deframer::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(d.push(c)?.into_iter().map(|m| m.to_vec()));
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn content_types() {
        assert!(is_grpc(b"application/grpc"));
        assert!(is_grpc(b"application/grpc+proto"));
        assert!(is_grpc(b"Application/GRPC; charset=x"));
        assert!(!is_grpc(b"application/grpc-web"));
        assert!(!is_grpc(b"application/grpc-web+proto"));
        assert!(!is_grpc(b"application/json"));
        assert!(!is_grpc(b"application/grp"));
    }

    #[test]
    fn a_scrubbed_message_gets_its_new_length() {
        let p = policy();
        let payload = format!("{{\"key\": \"{VALUE}\"}}");
        let (framed, n) = scrub_message(p.scrub_patterns(), payload.as_bytes());
        assert_eq!(n, 1);
        let expected = format!("{{\"key\": \"{PH}\"}}");
        assert_eq!(framed, frame(expected.as_bytes()));
        assert_eq!(
            deframe_all(&[&framed]).unwrap(),
            vec![expected.into_bytes()]
        );
    }

    #[test]
    fn compressed_oversized_and_truncated_messages_are_refused() {
        let mut m = frame(b"abc");
        m[0] = 1;
        assert_eq!(deframe_all(&[&m]), Err(GrpcError::Compressed));
        let mut d = Deframer::with_max(2);
        assert_eq!(d.push(&frame(b"abc")), Err(GrpcError::TooLarge));
        let m = frame(b"abc");
        assert_eq!(deframe_all(&[&m[..6]]), Err(GrpcError::Truncated));
        assert_eq!(deframe_all(&[&m[..3]]), Err(GrpcError::Truncated));
        assert_eq!(deframe_all(&[&frame(b"")]).unwrap(), vec![Vec::<u8>::new()]);
        for e in [
            GrpcError::Compressed,
            GrpcError::TooLarge,
            GrpcError::Truncated,
        ] {
            assert!(e.to_string().starts_with("veil:"));
        }
    }

    proptest! {
        /// Messages come out whole and in order however the body is cut into chunks, and once
        /// scrubbed none carries the value, each framed with its own length.
        #[test]
        fn any_chunking_yields_the_messages_scrubbed(
            msgs in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..40), any::<bool>()), 0..6),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let payloads: Vec<Vec<u8>> = msgs
                .iter()
                .map(|(bytes, leak)| {
                    let mut b = bytes.clone();
                    if *leak {
                        let at = b.len() / 2;
                        b.splice(at..at, VALUE.bytes());
                    }
                    b
                })
                .collect();
            let body: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain(std::iter::once(body.len())) {
                chunks.push(&body[at..c]);
                at = c;
            }
            let got = deframe_all(&chunks).unwrap();
            prop_assert_eq!(&got, &payloads);
            let p = policy();
            let mut scrubbed = Vec::new();
            for m in &got {
                scrubbed.extend(scrub_message(p.scrub_patterns(), m).0);
            }
            let again = deframe_all(&[&scrubbed]).unwrap();
            prop_assert_eq!(again.len(), payloads.len());
            for m in again {
                prop_assert!(!m.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()));
            }
        }
    }
}
