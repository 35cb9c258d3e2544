//! Unit and property tests of message scrubbing: every encoding the body scrubber covers, values
//! split across fragments (reassembled by the relay), the bounds of control frames.

use super::*;
use crate::secret::testing::secret;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use proptest::prelude::*;

const VALUE: &str = "sk-live/Zq+9 x?y=1&z-0123";
const PLACEHOLDER: &str = "ph_a_placeholder";

fn patterns() -> ScrubPatterns {
    ScrubPatterns::new(&[secret("a", VALUE, &[])])
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The value in each encoded form the scrubber covers, as a server would echo it.
fn encodings(value: &str) -> Vec<String> {
    let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    let percent: String = value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let html: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_string()
            } else {
                format!("&#{};", c as u32)
            }
        })
        .collect();
    vec![
        value.to_owned(),
        serde_json::to_string(value)
            .unwrap_or_default()
            .replace('/', "\\/"),
        hex.clone(),
        hex.to_uppercase(),
        percent,
        html,
        STANDARD.encode(value),
        URL_SAFE.encode(value),
        format!("Basic {}", STANDARD.encode(format!("user:{value}"))),
    ]
}

#[test]
fn every_encoding_in_text_and_binary_is_scrubbed() {
    let p = patterns();
    for (i, form) in encodings(VALUE).iter().enumerate() {
        let msg = format!("{{\"echo\": \"{form}\", \"n\": {i}}}");
        let text = scrub_text(&p, &msg);
        assert!(text.replaced >= 1, "form {i} not found");
        assert!(!text.payload.contains(form.as_str()), "form {i} survived");
        let bin = scrub_binary(&p, msg.as_bytes());
        assert_eq!(bin.payload, text.payload.as_bytes(), "form {i}");
        assert!(!contains(&bin.payload, VALUE.as_bytes()));
    }
    let plain = scrub_text(&p, &format!("key={VALUE}"));
    assert_eq!(plain.payload, format!("key={PLACEHOLDER}"));
    assert_eq!(plain.replaced, 1);
}

#[test]
fn nothing_to_scrub_passes_unchanged() {
    let p = patterns();
    let text = scrub_text(&p, "héllo wörld");
    assert_eq!(text.payload, "héllo wörld");
    assert_eq!(text.replaced, 0);
    assert_eq!(scrub_binary(&p, &[0, 159, 255]).payload, [0, 159, 255]);
}

#[test]
fn a_value_split_across_fragments_is_scrubbed_once_reassembled() {
    let p = patterns();
    let msg = format!("start {VALUE} end");
    for cut in 0..msg.len() {
        let (a, b) = msg.as_bytes().split_at(cut);
        let whole = [a, b].concat();
        let out = scrub_binary(&p, &whole);
        assert!(!contains(&out.payload, VALUE.as_bytes()), "cut at {cut}");
    }
}

#[test]
fn a_truncated_echo_in_another_message_is_scrubbed() {
    let p = patterns();
    // The second half of the value alone (over 12 bytes): the window catches it.
    let tail = &VALUE[VALUE.len() - 14..];
    let out = scrub_text(&p, &format!("rest: {tail}"));
    assert!(!out.payload.contains(tail), "{}", out.replaced);
}

#[test]
fn close_reasons_and_control_payloads_fit_their_frames() {
    let secrets = [secret("a", "short-value-123", &[])];
    let p = ScrubPatterns::new(&secrets);
    let reason = "x".repeat(100) + "short-value-123";
    let out = scrub_close_reason(&p, &reason);
    assert!(out.payload.len() <= MAX_CLOSE_REASON);
    assert!(!out.payload.contains("short-value-123"));
    assert_eq!(out.replaced, 1);
    let ping = scrub_control(&p, reason.as_bytes());
    assert!(ping.payload.len() <= MAX_CONTROL_PAYLOAD);
    assert!(!contains(&ping.payload, b"short-value-123"));
    // Cut at a character boundary.
    let multi = truncate_text("é".repeat(100), MAX_CLOSE_REASON);
    assert_eq!(multi.len(), 122);
}

#[test]
fn message_kinds() {
    assert_eq!(message_kind(true, b" \n{\"a\": 1}"), BodyKind::Json);
    assert_eq!(message_kind(true, b"[1]"), BodyKind::Json);
    assert_eq!(message_kind(true, b"hello {"), BodyKind::Text);
    assert_eq!(message_kind(false, b"{\"a\": 1}"), BodyKind::Text);
    assert_eq!(message_kind(true, b""), BodyKind::Text);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// A value in any covered encoding, anywhere in a message of any fragmentation, never
    /// survives; a text message stays text.
    #[test]
    fn values_never_survive_in_messages(
        value in "[!-~]{12,32}",
        before in "[ -~é€😀]{0,40}",
        after in "[ -~é€😀]{0,40}",
        form in 0usize..9,
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let p = ScrubPatterns::new(&[secret("v", &value, &[])]);
        let encoded = encodings(&value)[form].clone();
        let msg = format!("{before}{encoded}{after}");
        // The relay reassembles fragments: any cut gives the same message.
        let mut fragments: Vec<&[u8]> = Vec::new();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (msg.len() + 1)).collect();
        cuts.sort_unstable();
        let mut at = 0;
        for c in cuts {
            fragments.push(&msg.as_bytes()[at..c]);
            at = c;
        }
        fragments.push(&msg.as_bytes()[at..]);
        let whole = fragments.concat();
        let text = std::str::from_utf8(&whole).unwrap_or(&msg);
        let out = scrub_text(&p, text);
        prop_assert!(!out.payload.contains(&value));
        prop_assert!(!out.payload.contains(encoded.as_str()) || encoded.contains("ph_v_placeholder"));
        let bin = scrub_binary(&p, &whole);
        prop_assert!(!contains(&bin.payload, value.as_bytes()));
    }

    /// Close reasons and control payloads never carry the value and always fit their frame.
    #[test]
    fn control_frames_are_bounded_and_scrubbed(
        value in "[!-~]{12,32}",
        noise in "[ -~é]{0,130}",
        at in any::<usize>(),
    ) {
        let p = ScrubPatterns::new(&[secret("v", &value, &[])]);
        let mut reason = noise.clone();
        let mut at = at % (reason.len() + 1);
        while !reason.is_char_boundary(at) {
            at -= 1;
        }
        reason.insert_str(at, &value);
        let close = scrub_close_reason(&p, &reason);
        prop_assert!(close.payload.len() <= MAX_CLOSE_REASON);
        prop_assert!(!close.payload.contains(&value));
        let ping = scrub_control(&p, reason.as_bytes());
        prop_assert!(ping.payload.len() <= MAX_CONTROL_PAYLOAD);
        prop_assert!(!contains(&ping.payload, value.as_bytes()));
    }
}
