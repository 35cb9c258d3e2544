//! Peek a TLS ClientHello from the first bytes of a stream, without consuming them.
//!
//! [`parse_client_hello`] takes whatever prefix of the stream has arrived so far and answers
//! [`Peek::NeedMore`] until it can decide. It reassembles a hello split across several TLS
//! records and works byte by byte. It is bounded: a handshake message longer than
//! [`MAX_HELLO_LEN`], or a hello whose records need more than [`MAX_PEEK_LEN`] stream bytes
//! (pathological fragmentation), is [`NotTlsReason::TooLarge`], so the caller never buffers more
//! than [`MAX_PEEK_LEN`] bytes. Anything that is not a well-formed TLS ClientHello (including
//! SSLv2-compatible hellos and malformed or ambiguous ones, like two SNI extensions) is
//! [`Peek::NotTls`]: the caller passes the raw bytes through untouched.

use crate::host::ServerName;

/// Largest ClientHello handshake message accepted (body, without its 4-byte header). Real
/// hellos are 200–2,000 bytes; post-quantum key shares push them past 1,500.
pub const MAX_HELLO_LEN: usize = 16 * 1024;
/// Most stream bytes the peek may need before deciding (record headers included).
pub const MAX_PEEK_LEN: usize = 20 * 1024;
/// Largest TLS plaintext record (RFC 8446 §5.1).
const MAX_RECORD_LEN: usize = 1 << 14;

const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const SNI_HOST_NAME: u8 = 0;

/// What the stream prefix tells so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peek {
    /// Not enough bytes to decide; read more (the caller bounds the wait).
    NeedMore,
    /// Not a TLS ClientHello we understand: pass the bytes through untouched.
    NotTls(NotTlsReason),
    /// A complete, well-formed ClientHello.
    Tls(ClientHelloInfo),
}

/// Why a prefix is not treated as a TLS ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotTlsReason {
    /// The first record is not a TLS handshake record (plain HTTP, SSH, SSLv2 hello, ...).
    NotHandshake,
    /// A record header carries a version other than 3.x.
    BadRecordVersion,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// Over [`MAX_HELLO_LEN`] or [`MAX_PEEK_LEN`].
    TooLarge,
    /// Inconsistent lengths, empty records, duplicate extensions and the like.
    Malformed,
}

/// What the agent needs from a ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The server name, if the hello carries a valid host_name.
    pub sni: Option<ServerName>,
    /// The hello carries a server_name that is not a valid hostname (IP literal, bad bytes);
    /// `sni` is then `None`.
    pub sni_invalid: bool,
    /// ALPN protocols in offered order; empty when the extension is absent.
    pub alpn: Vec<Vec<u8>>,
    /// Whether the ALPN extension was present.
    pub alpn_present: bool,
    /// `legacy_version` of the hello (0x0303 for TLS 1.2 and 1.3).
    pub legacy_version: u16,
    /// Versions from the supported_versions extension (TLS 1.3 clients), in offered order.
    pub supported_versions: Vec<u16>,
    /// Stream bytes up to the end of the record holding the hello's last byte.
    pub stream_len: usize,
}

impl ClientHelloInfo {
    /// Whether the client offers TLS 1.3.
    pub fn offers_tls13(&self) -> bool {
        self.supported_versions.contains(&0x0304)
    }

    /// Whether the client offers `proto` via ALPN.
    pub fn offers_alpn(&self, proto: &[u8]) -> bool {
        self.alpn.iter().any(|p| p == proto)
    }
}

/// Inspects the stream prefix `prefix` (everything received so far, from the first byte).
pub fn parse_client_hello(prefix: &[u8]) -> Peek {
    match reassemble(prefix) {
        Err(step) => step,
        Ok((hello, stream_len)) => match parse_hello_body(&hello) {
            Some(mut info) => {
                info.stream_len = stream_len;
                Peek::Tls(info)
            }
            None => Peek::NotTls(NotTlsReason::Malformed),
        },
    }
}

/// Gathers the ClientHello body from consecutive handshake records; `Err` carries the answer
/// when the hello is not complete or not acceptable.
fn reassemble(prefix: &[u8]) -> Result<(Vec<u8>, usize), Peek> {
    // Handshake bytes gathered so far; the hello is small, so one copy is cheap.
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        if pos >= MAX_PEEK_LEN {
            return Err(Peek::NotTls(NotTlsReason::TooLarge));
        }
        let rest = &prefix[pos..];
        // Decide on every byte we have, so plain text is recognised from its first byte.
        if let Some(&content_type) = rest.first()
            && content_type != CONTENT_HANDSHAKE
        {
            return Err(Peek::NotTls(if pos == 0 {
                NotTlsReason::NotHandshake
            } else {
                NotTlsReason::Malformed
            }));
        }
        if let Some(&major) = rest.get(1)
            && major != 3
        {
            return Err(Peek::NotTls(NotTlsReason::BadRecordVersion));
        }
        if let Some(&minor) = rest.get(2)
            && minor > 4
        {
            return Err(Peek::NotTls(NotTlsReason::BadRecordVersion));
        }
        let (Some(&hi), Some(&lo)) = (rest.get(3), rest.get(4)) else {
            return Err(Peek::NeedMore);
        };
        let record_len = usize::from(u16::from_be_bytes([hi, lo]));
        if record_len == 0 {
            return Err(Peek::NotTls(NotTlsReason::Malformed));
        }
        if record_len > MAX_RECORD_LEN {
            return Err(Peek::NotTls(NotTlsReason::Malformed));
        }
        let fragment = &rest[5..rest.len().min(5 + record_len)];
        let before = handshake.len();
        handshake.extend_from_slice(fragment);
        if let Some(answer) = check_handshake_header(&handshake) {
            return Err(answer);
        }
        let record_complete = fragment.len() == record_len;
        if handshake.len() >= 4 {
            let body_len = hello_len(&handshake);
            let total = 4 + body_len;
            if handshake.len() >= total {
                // The hello ends in this record; anything after it in the record belongs to
                // later handshake messages, which a client never sends before the server speaks.
                if handshake.len() > total {
                    return Err(Peek::NotTls(NotTlsReason::Malformed));
                }
                // The record must be complete too, or it could still carry more bytes.
                if !record_complete {
                    return Err(Peek::NeedMore);
                }
                let stream_len = pos + 5 + record_len;
                if stream_len > MAX_PEEK_LEN {
                    return Err(Peek::NotTls(NotTlsReason::TooLarge));
                }
                handshake.drain(..4);
                return Ok((handshake, stream_len));
            }
            // The hello needs more bytes than the records may still bring within the bound.
            let needed_stream = pos + 5 + (total - before);
            if needed_stream > MAX_PEEK_LEN {
                return Err(Peek::NotTls(NotTlsReason::TooLarge));
            }
        }
        if !record_complete {
            return Err(Peek::NeedMore);
        }
        pos += 5 + record_len;
    }
}

/// Checks the 4-byte handshake header as far as it has arrived.
fn check_handshake_header(handshake: &[u8]) -> Option<Peek> {
    if let Some(&msg_type) = handshake.first()
        && msg_type != HANDSHAKE_CLIENT_HELLO
    {
        return Some(Peek::NotTls(NotTlsReason::NotClientHello));
    }
    if handshake.len() >= 4 && hello_len(handshake) > MAX_HELLO_LEN {
        return Some(Peek::NotTls(NotTlsReason::TooLarge));
    }
    None
}

fn hello_len(handshake: &[u8]) -> usize {
    usize::from(handshake[1]) << 16 | usize::from(handshake[2]) << 8 | usize::from(handshake[3])
}

/// A bounds-checked reader over a byte slice; every read returns `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(usize::from(n)).map(Reader)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses a ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2); `None` if malformed.
fn parse_hello_body(body: &[u8]) -> Option<ClientHelloInfo> {
    let mut r = Reader(body);
    let legacy_version = r.u16()?;
    if legacy_version >> 8 != 3 {
        return None;
    }
    r.take(32)?; // random
    let session_id = r.vec8()?;
    if session_id.len() > 32 {
        return None;
    }
    let suites = r.vec16()?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return None;
    }
    let compression = r.vec8()?;
    if compression.is_empty() {
        return None;
    }
    let mut info = ClientHelloInfo {
        sni: None,
        sni_invalid: false,
        alpn: Vec::new(),
        alpn_present: false,
        legacy_version,
        supported_versions: Vec::new(),
        stream_len: 0,
    };
    // A hello without extensions is legal (old TLS 1.0 clients): no SNI, no ALPN.
    if r.is_empty() {
        return Some(info);
    }
    let mut exts = r.vec16()?;
    if !r.is_empty() {
        return None;
    }
    let mut seen_sni = false;
    let mut seen_versions = false;
    while !exts.is_empty() {
        let ext_type = exts.u16()?;
        let mut data = exts.vec16()?;
        match ext_type {
            EXT_SERVER_NAME => {
                // Two server_name extensions would let us and the upstream read different names.
                if seen_sni {
                    return None;
                }
                seen_sni = true;
                parse_sni(&mut data, &mut info)?;
            }
            EXT_ALPN => {
                if info.alpn_present {
                    return None;
                }
                info.alpn_present = true;
                let mut list = data.vec16()?;
                if !data.is_empty() || list.is_empty() {
                    return None;
                }
                while !list.is_empty() {
                    let proto = list.vec8()?;
                    if proto.is_empty() {
                        return None;
                    }
                    info.alpn.push(proto.to_vec());
                }
            }
            EXT_SUPPORTED_VERSIONS => {
                if seen_versions {
                    return None;
                }
                seen_versions = true;
                let list = data.vec8()?;
                if !data.is_empty() || list.is_empty() || list.len() % 2 != 0 {
                    return None;
                }
                info.supported_versions = list
                    .chunks_exact(2)
                    .map(|v| u16::from_be_bytes([v[0], v[1]]))
                    .collect();
            }
            _ => {}
        }
    }
    Some(info)
}

/// Parses the server_name extension (RFC 6066 §3): at most one host_name.
fn parse_sni(data: &mut Reader<'_>, info: &mut ClientHelloInfo) -> Option<()> {
    // An empty extension is what a server sends back; from a client it carries no name.
    if data.is_empty() {
        return Some(());
    }
    let mut list = data.vec16()?;
    if !data.is_empty() || list.is_empty() {
        return None;
    }
    let mut seen_host_name = false;
    while !list.is_empty() {
        let name_type = list.u8()?;
        let name = list.vec16()?;
        if name_type != SNI_HOST_NAME {
            continue;
        }
        if seen_host_name {
            return None;
        }
        seen_host_name = true;
        match ServerName::from_sni_bytes(name.0) {
            Ok(n) => info.sni = Some(n),
            Err(_) => info.sni_invalid = true,
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Real ClientHellos captured on this machine by `testdata/capture.py`.
    const CAPTURES: &[(&str, &[u8])] = &[
        (
            "curl_http1.1",
            include_bytes!("../testdata/curl_http1.1.bin"),
        ),
        ("curl_http2", include_bytes!("../testdata/curl_http2.bin")),
        (
            "openssl_alpn",
            include_bytes!("../testdata/openssl_alpn.bin"),
        ),
        (
            "openssl_nosni",
            include_bytes!("../testdata/openssl_nosni.bin"),
        ),
        (
            "openssl_tls12",
            include_bytes!("../testdata/openssl_tls12.bin"),
        ),
        (
            "openssl_unicode_sni",
            include_bytes!("../testdata/openssl_unicode_sni.bin"),
        ),
        ("python_ssl", include_bytes!("../testdata/python_ssl.bin")),
        ("node_tls", include_bytes!("../testdata/node_tls.bin")),
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
        let http = include_bytes!("../testdata/curl_plain_http.bin");
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
}
