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
mod tests;
