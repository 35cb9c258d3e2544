//! What HTTP framing and codings mean for scrubbing, without I/O: which `Content-Encoding` a body
//! has and whether veil can decode it, the `Accept-Encoding` to send upstream so that it can, the
//! only `Transfer-Encoding` a response may have, and whether a decoded body is still compressed.

/// The content coding of a response whose `Content-Encoding` header values are `values`, as far
/// as scrubbing is concerned; see [`ContentCoding`].
pub fn content_coding<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<ContentCoding, UnsupportedCoding> {
    let mut codings: Vec<String> = Vec::new();
    for value in values {
        for coding in value.split(|&b| b == b',') {
            let coding = String::from_utf8_lossy(coding.trim_ascii()).to_ascii_lowercase();
            if !coding.is_empty() && coding != "identity" {
                codings.push(coding);
            }
        }
    }
    match codings.as_slice() {
        [] => Ok(ContentCoding::Identity),
        [one] => match one.as_str() {
            "gzip" | "x-gzip" => Ok(ContentCoding::Gzip),
            "deflate" => Ok(ContentCoding::Deflate),
            "br" => Ok(ContentCoding::Brotli),
            _ => Err(unsupported(&codings)),
        },
        _ => Err(unsupported(&codings)),
    }
}

/// The error naming `codings`. An upstream chooses that text, and one that echoes a value there
/// must not get it (or a case-folded copy) repeated to the sandbox: only registered coding names
/// are repeated.
fn unsupported(codings: &[String]) -> UnsupportedCoding {
    let named: Vec<&str> = codings
        .iter()
        .map(|c| {
            REGISTERED_CODINGS
                .iter()
                .find(|r| **r == c.as_str())
                .copied()
                .unwrap_or("(unknown)")
        })
        .collect();
    UnsupportedCoding(named.join(", "))
}

/// Whether a response's `Transfer-Encoding` header values (`values`) are absent or exactly
/// `chunked`: any other transfer coding (`gzip, chunked`) would reach the sandbox still coded,
/// past the scrubber, because the HTTP client removes only the chunked framing.
pub fn transfer_coding_ok<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let codings: Vec<&[u8]> = values
        .into_iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    matches!(codings.as_slice(), [] | [b"chunked"])
        || matches!(codings.as_slice(), [one] if one.eq_ignore_ascii_case(b"chunked"))
}

/// What the first bytes of a decoded body say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// Starts with the magic of this compression format: the body is still compressed.
    Compressed(&'static str),
    /// Not compressed (as far as the magic numbers go).
    Plain,
    /// These bytes begin a magic: more are needed to decide.
    NeedMore,
}

/// Magic numbers of compressed streams a decoded body must not start with: gzip, zlib (the
/// four header bytes of the standard compression levels) and zstd.
const MAGICS: [(&[u8], &str); 6] = [
    (&[0x1f, 0x8b], "gzip"),
    (&[0x78, 0x01], "zlib"),
    (&[0x78, 0x5e], "zlib"),
    (&[0x78, 0x9c], "zlib"),
    (&[0x78, 0xda], "zlib"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
];

/// Most bytes [`sniff`] needs.
pub const SNIFF_LEN: usize = 4;

/// Whether a decoded body starting with `prefix` is still compressed; `ended`: the body has
/// no more bytes. A body compressed twice under one `Content-Encoding` decodes to a compressed
/// stream, which would carry values past the scrubber.
pub fn sniff(prefix: &[u8], ended: bool) -> Sniff {
    let mut need_more = false;
    for (magic, name) in MAGICS {
        if prefix.starts_with(magic) {
            return Sniff::Compressed(name);
        }
        if !ended && magic.starts_with(prefix) {
            need_more = true;
        }
    }
    if need_more {
        Sniff::NeedMore
    } else {
        Sniff::Plain
    }
}

/// How a response body is encoded, among the codings veil can decode to scrub it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCoding {
    /// No coding (or only `identity`).
    Identity,
    /// `gzip` (or `x-gzip`), possibly several members.
    Gzip,
    /// `deflate`: the zlib format (RFC 9110 §8.4.1.2).
    Deflate,
    /// `br`: Brotli.
    Brotli,
}

/// A content coding (or a stack of codings) veil cannot decode, so cannot scrub.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("content-encoding {0} cannot be scrubbed")]
pub struct UnsupportedCoding(pub String);

/// The IANA HTTP Content Coding Registry (and `x-` aliases): names an error may repeat.
const REGISTERED_CODINGS: [&str; 13] = [
    "aes128gcm",
    "br",
    "compress",
    "dcb",
    "dcz",
    "deflate",
    "exi",
    "gzip",
    "identity",
    "pack200-gzip",
    "x-compress",
    "x-gzip",
    "zstd",
];

/// Codings that [`content_coding`] accepts, besides `identity`.
const DECODABLE: [&str; 4] = ["gzip", "x-gzip", "deflate", "br"];

/// The `Accept-Encoding` to send upstream for a client's `offers` (its header values), so the
/// response comes in a coding veil can decode: the client's entries for decodable codings and
/// `identity`, in its order and with its weights; `*` and other codings are dropped; `identity`
/// when nothing is left (an absent header would allow any coding).
pub fn accept_encoding<'a>(offers: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut kept: Vec<String> = Vec::new();
    for value in offers {
        for entry in value.split(|&b| b == b',') {
            let Ok(entry) = std::str::from_utf8(entry.trim_ascii()) else {
                continue;
            };
            let coding = entry.split(';').next().unwrap_or_default().trim();
            if coding.eq_ignore_ascii_case("identity")
                || DECODABLE.iter().any(|d| coding.eq_ignore_ascii_case(d))
            {
                kept.push(entry.to_owned());
            }
        }
    }
    if kept.is_empty() {
        "identity".to_owned()
    } else {
        kept.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_codings() {
        let cc = |v: &[&str]| content_coding(v.iter().map(|s| s.as_bytes()));
        assert_eq!(cc(&[]), Ok(ContentCoding::Identity));
        assert_eq!(cc(&["identity"]), Ok(ContentCoding::Identity));
        assert_eq!(cc(&[" GZip "]), Ok(ContentCoding::Gzip));
        assert_eq!(cc(&["x-gzip"]), Ok(ContentCoding::Gzip));
        assert_eq!(cc(&["identity, deflate"]), Ok(ContentCoding::Deflate));
        assert_eq!(cc(&["br"]), Ok(ContentCoding::Brotli));
        assert_eq!(cc(&["zstd"]), Err(UnsupportedCoding("zstd".into())));
        assert_eq!(
            cc(&["gzip", "br"]),
            Err(UnsupportedCoding("gzip, br".into()))
        );
        assert_eq!(
            cc(&["compress, gzip"]),
            Err(UnsupportedCoding("compress, gzip".into()))
        );
        // An upstream naming the value as its coding does not get it repeated.
        let err = cc(&["tok_BBBBBBBBBBBB"]).unwrap_err();
        assert_eq!(err.0, "(unknown)");
        let err = cc(&["sk-live/Zq+9 x?y=1&z", "zstd"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "content-encoding (unknown), zstd cannot be scrubbed"
        );
    }
    #[test]
    fn accept_encoding_keeps_only_decodable() {
        let ae = |v: &[&str]| accept_encoding(v.iter().map(|s| s.as_bytes()));
        assert_eq!(ae(&[]), "identity");
        assert_eq!(ae(&["zstd"]), "identity");
        assert_eq!(ae(&["*"]), "identity");
        assert_eq!(ae(&["gzip, deflate, br, zstd"]), "gzip, deflate, br");
        assert_eq!(
            ae(&["zstd;q=1.0, BR;q=0.9", "gzip;q=0.5,*;q=0.1, identity;q=0"]),
            "BR;q=0.9, gzip;q=0.5, identity;q=0"
        );
        assert_eq!(ae(&["compress, x-gzip"]), "x-gzip");
    }

    #[test]
    fn only_chunked_transfer_coding() {
        let ok = |v: &[&str]| transfer_coding_ok(v.iter().map(|s| s.as_bytes()));
        assert!(ok(&[]));
        assert!(ok(&["chunked"]));
        assert!(ok(&[" Chunked "]));
        assert!(!ok(&["gzip, chunked"]));
        assert!(!ok(&["gzip", "chunked"]));
        assert!(!ok(&["chunked, chunked"]));
        assert!(!ok(&["gzip"]));
        assert!(!ok(&["identity"]));
    }

    #[test]
    fn sniffs_compressed_magics() {
        assert_eq!(sniff(&[0x1f, 0x8b, 8, 0], false), Sniff::Compressed("gzip"));
        assert_eq!(sniff(&[0x78, 0x9c], true), Sniff::Compressed("zlib"));
        assert_eq!(
            sniff(&[0x28, 0xb5, 0x2f, 0xfd], false),
            Sniff::Compressed("zstd")
        );
        assert_eq!(sniff(&[0x1f], false), Sniff::NeedMore);
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f], false), Sniff::NeedMore);
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f], true), Sniff::Plain);
        assert_eq!(sniff(b"", false), Sniff::NeedMore);
        assert_eq!(sniff(b"", true), Sniff::Plain);
        assert_eq!(sniff(b"{\"a\"", false), Sniff::Plain);
        assert_eq!(sniff(b"x=1", false), Sniff::Plain);
    }
}
