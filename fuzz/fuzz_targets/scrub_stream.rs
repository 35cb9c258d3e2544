//! Response scrubbing: for any chunking, the streamed output equals `scrub_all` of the whole
//! input (or the input itself when nothing matched), the scrubber never holds back more than
//! `max_len - 1` bytes, and a planted value (literal, base64, hex, percent, HTML numeric, in a
//! `Basic` credential, or a 12-byte piece of it) never survives.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use veil_link::proto::SecretValue;
use veil_policy::{MountedSecret, ScrubPatterns, Scrubber};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Up to four values (empty ones are skipped by the patterns, as in production).
    values: Vec<String>,
    /// The response body.
    body: Vec<u8>,
    /// Chunk lengths, cycled; 0 pushes an empty chunk, then one byte.
    chunks: Vec<u8>,
    /// Whether the body embeds each value (literally, percent- or base64-encoded) so that
    /// matches are common rather than accidental.
    plant: Vec<(u8, u16)>,
}

fuzz_target!(|input: Input| {
    let secrets: Vec<MountedSecret> = input
        .values
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, v)| MountedSecret {
            id: format!("s{i}"),
            name: format!("S{i}"),
            placeholder: format!("veil_ph_{i}_0123456789"),
            hosts: Vec::new(),
            value: SecretValue::new(v.clone()),
            body_substitution: false,
            wrong_host: Default::default(),
            previous: Vec::new(),
            retired: false,
        })
        .collect();
    let patterns = ScrubPatterns::new(&secrets);

    let mut body = input.body.clone();
    let mut planted: Vec<usize> = Vec::new();
    for (which, at) in input.plant.iter().take(8) {
        let Some(s) = secrets.get(usize::from(*which) % secrets.len().max(1)) else {
            break;
        };
        let v = s.value.expose().as_bytes();
        let std = &base64::engine::general_purpose::STANDARD;
        let form: Vec<u8> = match which / 32 {
            0 => v.to_vec(),
            1 => base64::Engine::encode(std, v).into_bytes(),
            2 => base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE, v).into_bytes(),
            3 => v
                .iter()
                .flat_map(|b| format!("%{b:02X}").into_bytes())
                .collect(),
            4 => v.iter().flat_map(|b| format!("{b:02x}").into_bytes()).collect(),
            5 => s
                .value
                .expose()
                .chars()
                .flat_map(|c| format!("&#{};", c as u32).into_bytes())
                .collect(),
            6 => format!(
                "Basic {}",
                base64::Engine::encode(std, [b"u:".as_slice(), v].concat())
            )
            .into_bytes(),
            _ => v[..v.len().min(20)].to_vec(),
        };
        if which / 32 == 0 || which / 32 >= 7 {
            planted.push(usize::from(*which) % secrets.len().max(1));
        }
        let at = usize::from(*at) % (body.len() + 1);
        body.splice(at..at, form);
    }

    let expected = patterns.scrub_all(&body).unwrap_or_else(|| body.clone());
    let mut scrubber = Scrubber::new(&patterns);
    let mut out = Vec::new();
    let mut rest = body.as_slice();
    let mut sizes = input.chunks.iter().cycle();
    while !rest.is_empty() {
        let n = if input.chunks.is_empty() {
            rest.len()
        } else {
            let n = usize::from(*sizes.next().unwrap_or(&1));
            if n == 0 {
                // An empty chunk must change nothing; then move on by one byte.
                scrubber.push(&[], &mut out);
            }
            n.clamp(1, rest.len())
        };
        let (chunk, tail) = rest.split_at(n);
        scrubber.push(chunk, &mut out);
        assert!(
            scrubber.pending_len() <= patterns.max_len().saturating_sub(1),
            "held back {} bytes, max_len {}",
            scrubber.pending_len(),
            patterns.max_len()
        );
        rest = tail;
    }
    scrubber.finish(&mut out);
    assert_eq!(scrubber.pending_len(), 0);
    assert!(out == expected, "streamed output differs from scrub_all");
    // A planted literal (or a piece of 12 bytes or more) leaves no 12-byte window of its value
    // behind (values whose windows are exempt — JWTs, PEM — or that share 12 bytes with a
    // placeholder are not checked).
    for i in planted {
        let v = secrets[i].value.expose().as_bytes();
        let exempt = v.starts_with(b"eyJ")
            || v.windows(5).any(|w| w == b"-----")
            || secrets
                .iter()
                .any(|s| v.windows(12).any(|w| s.placeholder.as_bytes().windows(12).any(|p| p == w)));
        if v.len() >= 12 && !exempt {
            assert!(
                !out.windows(12).any(|w| v.windows(12).any(|x| x == w)),
                "a planted value survived"
            );
        }
    }
});
