//! Request substitution: never panics, and a value only ever appears where the policy allows it,
//! whole.
//!
//! Values are `§<i>§…§`: the byte 0xA7 occurs in no input (it is removed, and so is every
//! `%A7` escape of the target), so any value found in the output, raw or decoded, was put there
//! by substitution. Properties, for every header (Basic credentials decoded) and the target
//! (raw, path segments percent-decoded, query fields form-decoded):
//! - a value appears only if its secret allows the SNI, every authority named the SNI on the
//!   connection's port, and the report counts a substitution for it;
//! - in the decoded target every `§<i>§` starts the whole value: never split, partly decoded or
//!   transformed, whatever the bytes around its placeholder;
//! - with a host mismatch nothing changes;
//! - no placeholder of a secret that allows the SNI is left when the authority matched.
#![no_main]

use arbitrary::Arbitrary;
use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use libfuzzer_sys::fuzz_target;
use veil_link::proto::SecretValue;
use veil_policy::{HostPattern, MountedSecret, RequestView, SandboxPolicy, ServerName};

const NAMES: [&str; 5] = [
    "api.a.test",
    "x.api.a.test",
    "b.test",
    "c.b.test",
    "other.test",
];
const PATTERNS: [&str; 5] = ["api.a.test", "*.a.test", "b.test", "*.b.test", "other.test"];

#[derive(Debug, Arbitrary)]
struct Secret {
    /// Bit i: the secret allows `PATTERNS[i]`; 0 = unrestricted.
    hosts: u8,
    /// ASCII tail of the value (control characters make it unsafe for headers).
    tail: String,
}

#[derive(Debug, Arbitrary)]
struct Input {
    secrets: Vec<Secret>,
    sni: u8,
    /// The connection's port: 443 when even, 8443 when odd.
    port: bool,
    target: String,
    authority: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// (secret, where) placeholders planted into the request.
    plant: Vec<(u8, u8, u8)>,
}

const BASIC: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn placeholder(i: usize) -> String {
    format!("veil_ph{i}_0123456789abcdef")
}

fn value(i: usize, tail: &str) -> String {
    format!("§{i}§{tail}§")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len().max(1))
        .filter(|w| *w == needle)
        .count()
}

/// `%A7` (either case) becomes `%B7`: then no decoding of the input alone yields a `§`.
fn without_a7_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if after.len() >= 2 && after.as_bytes()[..2].eq_ignore_ascii_case(b"a7") {
            out.push_str("%B7");
            rest = &after[2..];
        } else {
            out.push('%');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The target as an application decodes it: path segments percent-decoded, query keys and
/// values form-decoded (as bytes: a split UTF-8 sequence must stay visible).
fn decode_target(target: &str) -> Vec<Vec<u8>> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut out: Vec<Vec<u8>> = path
        .split('/')
        .map(|s| percent_encoding::percent_decode_str(s).collect())
        .collect();
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        for part in [k, v] {
            let spaced = part.replace('+', " ");
            out.push(percent_encoding::percent_decode_str(&spaced).collect());
        }
    }
    out
}

fuzz_target!(|input: Input| {
    let secrets: Vec<MountedSecret> = input
        .secrets
        .iter()
        .take(4)
        .enumerate()
        .map(|(i, s)| MountedSecret {
            id: format!("s{i}"),
            name: format!("S{i}"),
            placeholder: placeholder(i),
            hosts: PATTERNS
                .iter()
                .enumerate()
                .filter(|(b, _)| s.hosts & (1 << b) != 0)
                .filter_map(|(_, p)| HostPattern::parse(p).ok())
                .collect(),
            // Without `§` no value contains another; without `_` none contains a placeholder.
            value: SecretValue::new(value(i, &s.tail.replace(['§', '_'], ""))),
            body_substitution: false,
            wrong_host: Default::default(),
            previous: Vec::new(),
            retired: false,
        })
        .collect();
    let Ok(policy) = SandboxPolicy::new(secrets) else {
        return;
    };
    let Ok(sni) = ServerName::parse(NAMES[usize::from(input.sni) % NAMES.len()]) else {
        return;
    };

    let clean = |b: &[u8]| -> Vec<u8> { b.iter().copied().filter(|&b| b != 0xa7).collect() };
    let port = if input.port { 8443 } else { 443 };
    let mut target = without_a7_escapes(&input.target.replace('§', ""));
    let authority = input.authority.as_deref().map(clean);
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = input
        .headers
        .iter()
        .take(8)
        .map(|(n, v)| (clean(n), clean(v)))
        .collect();
    let n = policy.secrets().len().max(1);
    for (s, place, pos) in input.plant.iter().take(8) {
        let ph = placeholder(usize::from(*s) % n);
        match usize::from(*place) % (headers.len() + 2) {
            0 => {
                let at = usize::from(*pos) % (target.len() + 1);
                if target.is_char_boundary(at) {
                    target.insert_str(at, &ph);
                }
            }
            1 => headers.push((
                b"authorization".to_vec(),
                format!("Basic {}", STANDARD.encode(format!("user:{ph}"))).into_bytes(),
            )),
            h => {
                let v = &mut headers[h - 2].1;
                let at = usize::from(*pos) % (v.len() + 1);
                v.splice(at..at, ph.bytes());
            }
        }
    }
    let header_refs: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect();
    let view = RequestView {
        target: &target,
        authority: authority.as_deref(),
        headers: &header_refs,
    };
    let Ok(sub) = policy.substitute(&sni, port, &view) else {
        return;
    };
    if sub.host_mismatch {
        assert!(!sub.changed(), "a request with a host mismatch was changed");
    }

    // The request as it would be forwarded: every text a value could land in.
    let out_target = sub
        .target
        .as_ref()
        .map_or(target.clone(), |t| t.as_str().to_owned());
    let decoded = decode_target(&out_target);
    for piece in &decoded {
        for i in 0..policy.secrets().len() {
            let marker = format!("§{i}§");
            let value = policy.secrets()[i].value.expose().as_bytes();
            assert_eq!(
                count(piece, marker.as_bytes()),
                count(piece, value),
                "secret {i}: a decoded target field holds part of its value"
            );
        }
    }
    let mut texts: Vec<Vec<u8>> = vec![out_target.into_bytes()];
    texts.extend(decoded);
    for (i, (name, v)) in headers.iter().enumerate() {
        let out = sub
            .headers
            .iter()
            .find(|(h, _)| *h == i)
            .map_or(v.clone(), |(_, r)| r.as_bytes().to_vec());
        if name.eq_ignore_ascii_case(b"authorization") {
            if let Some(token) = out.strip_prefix(b"Basic ".as_slice())
                && let Ok(decoded) = BASIC.decode(token.trim_ascii())
            {
                texts.push(decoded);
            }
        }
        texts.push(out);
    }

    for (i, s) in policy.secrets().iter().enumerate() {
        let allowed = policy.secret_allows(i, &sni) && !sub.host_mismatch;
        let substituted = sub
            .hits
            .iter()
            .find(|h| h.secret == i)
            .map_or(0, |h| h.substituted);
        let leaked = texts
            .iter()
            .any(|t| contains(t, s.value.expose().as_bytes()));
        if leaked {
            assert!(allowed, "secret {i} sent to {sni}, which it does not allow");
            assert!(
                substituted > 0,
                "secret {i} in the output without a reported hit"
            );
        }
        if !allowed {
            assert_eq!(
                substituted, 0,
                "secret {i} counted as substituted for {sni}"
            );
        }
        if allowed {
            assert!(
                !texts.iter().any(|t| contains(t, s.placeholder.as_bytes())),
                "placeholder of secret {i} left in a request to {sni} it allows"
            );
        }
    }
});
