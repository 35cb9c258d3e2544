use super::*;
use proptest::prelude::*;

/// Real ClientHellos captured on this machine by `testdata/capture.py`.
const CAPTURES: &[(&str, &[u8])] = &[
    (
        "curl_http1.1",
        include_bytes!("../../testdata/curl_http1.1.bin"),
    ),
    (
        "curl_http2",
        include_bytes!("../../testdata/curl_http2.bin"),
    ),
    (
        "openssl_alpn",
        include_bytes!("../../testdata/openssl_alpn.bin"),
    ),
    (
        "openssl_nosni",
        include_bytes!("../../testdata/openssl_nosni.bin"),
    ),
    (
        "openssl_tls12",
        include_bytes!("../../testdata/openssl_tls12.bin"),
    ),
    (
        "openssl_unicode_sni",
        include_bytes!("../../testdata/openssl_unicode_sni.bin"),
    ),
    (
        "python_ssl",
        include_bytes!("../../testdata/python_ssl.bin"),
    ),
    ("node_tls", include_bytes!("../../testdata/node_tls.bin")),
];

fn capture(name: &str) -> &'static [u8] {
    CAPTURES.iter().find(|(n, _)| *n == name).unwrap().1
}

fn info(bytes: &[u8]) -> ClientHelloInfo {
    match parse_client_hello(bytes) {
        Peek::Tls(i) => i,
        other => panic!("expected a hello, got {other:?}"),
    }
}

fn alpn(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|p| p.as_bytes().to_vec()).collect()
}

#[test]
fn captured_hellos_parse() {
    let allowed = Some(ServerName::parse("api.allowed.test").unwrap());
    let c = info(capture("curl_http1.1"));
    assert_eq!(c.sni, allowed);
    assert_eq!(c.alpn, alpn(&["http/1.1"]));
    assert!(c.offers_tls13());
    let c = info(capture("curl_http2"));
    assert_eq!(c.sni, allowed);
    assert_eq!(c.alpn, alpn(&["h2", "http/1.1"]));
    let c = info(capture("openssl_alpn"));
    assert_eq!(c.sni, allowed);
    assert_eq!(c.alpn, alpn(&["h2", "http/1.1"]));
    let c = info(capture("openssl_nosni"));
    assert_eq!(c.sni, None);
    assert!(!c.sni_invalid);
    assert!(!c.alpn_present);
    assert!(c.alpn.is_empty());
    let c = info(capture("openssl_tls12"));
    assert_eq!(c.sni, allowed);
    assert!(!c.offers_tls13());
    assert!(c.supported_versions.is_empty());
    assert_eq!(c.legacy_version, 0x0303);
    assert!(!c.alpn_present);
    let c = info(capture("openssl_unicode_sni"));
    assert_eq!(
        c.sni,
        Some(ServerName::parse("bücher.allowed.test").unwrap())
    );
    let c = info(capture("python_ssl"));
    assert_eq!(c.sni, allowed);
    assert_eq!(c.alpn, alpn(&["h2", "http/1.1"]));
    let c = info(capture("node_tls"));
    assert_eq!(c.sni, allowed);
    assert_eq!(c.alpn, alpn(&["h2", "http/1.1"]));
    for (name, bytes) in CAPTURES {
        let c = info(bytes);
        assert_eq!(c.stream_len, bytes.len(), "{name}");
    }
}

#[test]
fn every_strict_prefix_needs_more() {
    for (name, bytes) in CAPTURES {
        for n in 0..bytes.len() {
            assert_eq!(
                parse_client_hello(&bytes[..n]),
                Peek::NeedMore,
                "{name} prefix {n}"
            );
        }
        // Bytes after the hello (a client sends none before the server answers, but a
        // peek may see them) do not change the answer.
        let mut more = bytes.to_vec();
        more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
        assert_eq!(
            parse_client_hello(&more),
            parse_client_hello(bytes),
            "{name}"
        );
    }
}

/// Re-frames a single-record hello into records of at most `size` handshake bytes.
fn fragment(hello: &[u8], size: usize) -> Vec<u8> {
    let record_len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
    let body = &hello[5..5 + record_len];
    let mut out = Vec::new();
    for chunk in body.chunks(size) {
        out.extend_from_slice(&hello[..3]);
        out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn hello_split_across_records() {
    for (name, bytes) in CAPTURES {
        let whole = info(bytes);
        for size in [1, 2, 3, 4, 5, 7, 64, 100, 511] {
            let split = fragment(bytes, size);
            let mut expected = whole.clone();
            expected.stream_len = split.len();
            assert_eq!(info(&split), expected, "{name} in records of {size}");
            for n in 0..split.len() {
                assert_eq!(
                    parse_client_hello(&split[..n]),
                    Peek::NeedMore,
                    "{name} {size} {n}"
                );
            }
        }
    }
}

/// A minimal hello with the given extensions (type, data).
fn hello_with(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    if !exts.is_empty() {
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend_from_slice(&t.to_be_bytes());
            e.extend_from_slice(&u16::try_from(d.len()).unwrap().to_be_bytes());
            e.extend_from_slice(d);
        }
        body.extend_from_slice(&u16::try_from(e.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&e);
    }
    wrap(&body)
}

fn wrap(body: &[u8]) -> Vec<u8> {
    let mut hs = vec![1];
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    hs.extend_from_slice(body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn sni_ext(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for (t, n) in names {
        list.push(*t);
        list.extend_from_slice(&u16::try_from(n.len()).unwrap().to_be_bytes());
        list.extend_from_slice(n);
    }
    let mut d = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(&list);
    (EXT_SERVER_NAME, d)
}

fn alpn_ext(protos: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for p in protos {
        list.push(u8::try_from(p.len()).unwrap());
        list.extend_from_slice(p);
    }
    let mut d = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(&list);
    (EXT_ALPN, d)
}

#[test]
fn synthetic_hellos() {
    let c = info(&hello_with(&[]));
    assert_eq!((c.sni, c.alpn_present), (None, false));
    let c = info(&hello_with(&[
        sni_ext(&[(0, b"API.Allowed.Test.")]),
        alpn_ext(&[b"spdy/3", b"h2"]),
    ]));
    assert_eq!(c.sni.as_ref().unwrap().as_str(), "api.allowed.test");
    assert_eq!(c.alpn, alpn(&["spdy/3", "h2"]));
    assert!(c.offers_alpn(b"h2"));
    // An IP literal is not a server name.
    let c = info(&hello_with(&[sni_ext(&[(0, b"127.0.0.1")])]));
    assert_eq!((c.sni, c.sni_invalid), (None, true));
    let c = info(&hello_with(&[sni_ext(&[(0, b"a\0b.test")])]));
    assert_eq!((c.sni, c.sni_invalid), (None, true));
    // An empty server_name extension carries no name.
    let c = info(&hello_with(&[(EXT_SERVER_NAME, vec![])]));
    assert_eq!((c.sni, c.sni_invalid), (None, false));
    // Unknown extensions are skipped.
    let c = info(&hello_with(&[
        (0xfafa, vec![1, 2, 3]),
        sni_ext(&[(0, b"x.test")]),
    ]));
    assert_eq!(c.sni.as_ref().unwrap().as_str(), "x.test");
}

#[test]
fn ambiguous_or_malformed_hellos_are_not_tls() {
    let malformed = Peek::NotTls(NotTlsReason::Malformed);
    let two_sni = hello_with(&[sni_ext(&[(0, b"a.test")]), sni_ext(&[(0, b"b.test")])]);
    assert_eq!(parse_client_hello(&two_sni), malformed);
    let two_names = hello_with(&[sni_ext(&[(0, b"a.test"), (0, b"b.test")])]);
    assert_eq!(parse_client_hello(&two_names), malformed);
    let two_alpn = hello_with(&[alpn_ext(&[b"h2"]), alpn_ext(&[b"http/1.1"])]);
    assert_eq!(parse_client_hello(&two_alpn), malformed);
    let empty_proto = hello_with(&[alpn_ext(&[b"h2", b""])]);
    assert_eq!(parse_client_hello(&empty_proto), malformed);
    let empty_alpn = hello_with(&[(EXT_ALPN, vec![0, 0])]);
    assert_eq!(parse_client_hello(&empty_alpn), malformed);
    // Truncated extension block inside a complete record.
    let mut short = hello_with(&[sni_ext(&[(0, b"a.test")])]);
    short.truncate(short.len() - 2);
    let body = short[9..].to_vec();
    assert_eq!(parse_client_hello(&wrap(&body)), malformed);
    // Trailing garbage after the extensions.
    let mut body = hello_with(&[sni_ext(&[(0, b"a.test")])])[9..].to_vec();
    body.push(0);
    assert_eq!(parse_client_hello(&wrap(&body)), malformed);
    // Zero-length record.
    assert_eq!(parse_client_hello(&[0x16, 3, 1, 0, 0]), malformed);
    // Another record type between hello fragments.
    let mut split = fragment(capture("curl_http2"), 100);
    split.splice(105..105, [0x17, 3, 3, 0, 1, 0]);
    assert_eq!(parse_client_hello(&split), malformed);
}

#[test]
fn real_plain_http_is_not_tls_from_its_first_byte() {
    let http = include_bytes!("../../testdata/curl_plain_http.bin");
    for n in 1..=http.len() {
        assert_eq!(
            parse_client_hello(&http[..n]),
            Peek::NotTls(NotTlsReason::NotHandshake)
        );
    }
}

#[test]
fn not_tls_is_recognised_early() {
    assert_eq!(parse_client_hello(b""), Peek::NeedMore);
    assert_eq!(
        parse_client_hello(b"G"),
        Peek::NotTls(NotTlsReason::NotHandshake)
    );
    assert_eq!(
        parse_client_hello(b"GET / HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n"),
        Peek::NotTls(NotTlsReason::NotHandshake)
    );
    assert_eq!(
        parse_client_hello(b"SSH-2.0-OpenSSH_9.2\r\n"),
        Peek::NotTls(NotTlsReason::NotHandshake)
    );
    // SSLv2-compatible hello.
    assert_eq!(
        parse_client_hello(&[0x80, 0x2e, 0x01, 0x03, 0x01]),
        Peek::NotTls(NotTlsReason::NotHandshake)
    );
    assert_eq!(
        parse_client_hello(&[0x16, 2]),
        Peek::NotTls(NotTlsReason::BadRecordVersion)
    );
    assert_eq!(
        parse_client_hello(&[0x16, 3, 9]),
        Peek::NotTls(NotTlsReason::BadRecordVersion)
    );
    assert_eq!(
        parse_client_hello(&[0x16, 3, 1, 0, 4, 2]),
        Peek::NotTls(NotTlsReason::NotClientHello)
    );
    assert_eq!(
        parse_client_hello(&[0x16, 3, 1, 0x40, 1]),
        Peek::NotTls(NotTlsReason::Malformed)
    );
}

#[test]
fn size_is_bounded() {
    let too_large = Peek::NotTls(NotTlsReason::TooLarge);
    // A handshake header announcing more than MAX_HELLO_LEN is refused at once.
    let len = u32::try_from(MAX_HELLO_LEN + 1).unwrap().to_be_bytes();
    assert_eq!(
        parse_client_hello(&[0x16, 3, 1, 0x40, 0, 1, len[1], len[2], len[3]]),
        too_large
    );
    // A large but legal hello (padding extension) spanning two records parses.
    let big = hello_with(&[(21, vec![0; 15_000]), sni_ext(&[(0, b"a.test")])]);
    let two_records = fragment(&big, 1 << 14);
    assert_eq!(info(&two_records).sni.unwrap().as_str(), "a.test");
    // The same hello in tiny records would need more than MAX_PEEK_LEN stream bytes.
    let tiny = fragment(&big, 8);
    assert!(tiny.len() > MAX_PEEK_LEN);
    assert_eq!(parse_client_hello(&tiny), too_large);
    // ... and the decision comes without ever needing more than MAX_PEEK_LEN bytes.
    let first_decision = (0..=tiny.len())
        .find(|&n| parse_client_hello(&tiny[..n]) != Peek::NeedMore)
        .unwrap();
    assert!(first_decision <= MAX_PEEK_LEN, "{first_decision}");
}

fn mutated_capture() -> impl Strategy<Value = Vec<u8>> {
    (
        0..CAPTURES.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    )
        .prop_map(|(i, muts)| {
            let mut b = CAPTURES[i].1.to_vec();
            for (at, byte) in muts {
                let at = at.index(b.len());
                b[at] = byte;
            }
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_client_hello(&bytes);
    }

    #[test]
    fn random_handshake_records_never_panic(body in prop::collection::vec(any::<u8>(), 0..600), minor in 0u8..5) {
        let mut rec = vec![0x16, 3, minor];
        rec.extend_from_slice(&u16::try_from(body.len() + 4).unwrap().to_be_bytes());
        rec.push(1);
        rec.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        rec.extend_from_slice(&body);
        for n in [rec.len() / 2, rec.len()] {
            let _ = parse_client_hello(&rec[..n]);
        }
    }

    #[test]
    fn mutated_hellos_never_panic_and_prefixes_are_consistent(b in mutated_capture()) {
        let full = parse_client_hello(&b);
        // Once a prefix decides, every longer prefix decides the same way.
        let mut decided: Option<Peek> = None;
        for n in (0..=b.len()).step_by(7).chain([b.len()]) {
            let p = parse_client_hello(&b[..n]);
            if let Some(d) = &decided {
                prop_assert_eq!(&p, d);
            } else if p != Peek::NeedMore {
                decided = Some(p);
            }
        }
        if let Some(d) = decided {
            prop_assert_eq!(d, full);
        }
    }

    #[test]
    fn byte_by_byte_equals_whole(i in 0..CAPTURES.len(), size in 1usize..600) {
        let bytes = CAPTURES[i].1;
        let split = fragment(bytes, size);
        let mut expected = info(bytes);
        expected.stream_len = split.len();
        prop_assert_eq!(parse_client_hello(&split), Peek::Tls(expected));
    }
}
