//! Host allowlist patterns and validated server names: parsing, normalisation and matching.
//!
//! Shared by veil-control (validating a secret's `hosts`) and veil-agent (matching SNIs and Host
//! headers), so both sides agree on what a pattern means.
//! A pattern is an exact hostname (`api.example.com`) or a leading wildcard (`*.example.com`,
//! which allows the base domain and every subdomain). Patterns are stored lower-case, without a
//! trailing dot, with internationalised labels as punycode.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use idna::AsciiDenyList;

/// Longest hostname in presentation form (RFC 1035, without the trailing dot).
const MAX_HOST_LEN: usize = 253;
/// Longest label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// A validated, normalised host allowlist entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Exactly this host.
    Exact(String),
    /// `*.base`: the base domain itself and any subdomain of it.
    Wildcard(String),
}

/// Why a host pattern was rejected; the message names the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostPatternError {
    /// The entry is empty.
    #[error("host is empty")]
    Empty,
    /// The entry contains whitespace or a control character.
    #[error("host contains whitespace or control characters")]
    Whitespace,
    /// The entry carries a URL scheme.
    #[error("host must not contain a scheme (like https://)")]
    Scheme,
    /// The entry carries a port.
    #[error("host must not contain a port")]
    Port,
    /// The entry carries a path.
    #[error("host must not contain a path")]
    Path,
    /// The entry carries a query or fragment.
    #[error("host must not contain a query or fragment")]
    Query,
    /// The entry carries user information.
    #[error("host must not contain user information (@)")]
    UserInfo,
    /// A bare `*` would allow every host; omit `hosts` for that.
    #[error("a bare `*` is not allowed; omit hosts (or send []) to leave a secret unrestricted")]
    BareWildcard,
    /// `*` anywhere but as a leading `*.` label.
    #[error("a wildcard is only allowed as a leading `*.` label")]
    MisplacedWildcard,
    /// A wildcard over a single label (like `*.com`).
    #[error("a wildcard must cover a domain of at least two labels")]
    WildcardTooBroad,
    /// An empty label (`a..b`, leading dot, two trailing dots).
    #[error("host has an empty label")]
    EmptyLabel,
    /// An IP literal: a TLS SNI is never an IP address.
    #[error("host must be a name, not an IP address")]
    IpLiteral,
    /// A label or the whole name is too long.
    #[error("host is too long (labels ≤ 63, name ≤ 253 characters)")]
    TooLong,
    /// A character not allowed in a hostname, or an invalid internationalised name.
    #[error("host contains characters not allowed in a hostname")]
    InvalidCharacter,
    /// A label starting or ending with a hyphen.
    #[error("a host label must not start or end with a hyphen")]
    Hyphen,
}

impl HostPattern {
    /// Parses and normalises one allowlist entry.
    pub fn parse(input: &str) -> Result<Self, HostPatternError> {
        if input.is_empty() {
            return Err(HostPatternError::Empty);
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(HostPatternError::Whitespace);
        }
        if input.contains("://") {
            return Err(HostPatternError::Scheme);
        }
        if input.contains('/') || input.contains('\\') {
            return Err(HostPatternError::Path);
        }
        if input.contains('?') || input.contains('#') {
            return Err(HostPatternError::Query);
        }
        if input.contains('@') {
            return Err(HostPatternError::UserInfo);
        }
        if input.starts_with('[') || input.parse::<Ipv6Addr>().is_ok() {
            return Err(HostPatternError::IpLiteral);
        }
        if input.contains(':') {
            return Err(HostPatternError::Port);
        }
        if input == "*" || input == "*." {
            return Err(HostPatternError::BareWildcard);
        }
        match input.strip_prefix("*.") {
            Some(base) => {
                if base.contains('*') {
                    return Err(HostPatternError::MisplacedWildcard);
                }
                let base = normalize_name(base)?;
                if !base.contains('.') {
                    return Err(HostPatternError::WildcardTooBroad);
                }
                Ok(Self::Wildcard(base))
            }
            None => {
                if input.contains('*') {
                    return Err(HostPatternError::MisplacedWildcard);
                }
                Ok(Self::Exact(normalize_name(input)?))
            }
        }
    }

    /// Whether `host` (an SNI or Host header, any case, optional trailing dot) is allowed.
    pub fn matches(&self, host: &str) -> bool {
        match ServerName::parse(host) {
            Ok(name) => self.matches_name(&name),
            Err(_) => false,
        }
    }

    /// Whether the validated `name` is allowed; no allocation (the hot path).
    pub fn matches_name(&self, name: &ServerName) -> bool {
        let host = name.as_str();
        match self {
            Self::Exact(exact) => host == exact,
            Self::Wildcard(base) => {
                host == base
                    || (host.len() > base.len() + 1
                        && host.ends_with(base.as_str())
                        && host.as_bytes()[host.len() - base.len() - 1] == b'.')
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(base) => write!(f, "*.{base}"),
        }
    }
}

/// A validated, normalised server name (an SNI or the host of a Host header): lower-case, no
/// trailing dot, punycode, never an IP literal nor a wildcard.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(String);

impl ServerName {
    /// Validates and normalises a host as seen on the wire (any case, optional trailing dot,
    /// unicode or punycode).
    pub fn parse(host: &str) -> Result<Self, HostPatternError> {
        if host.is_empty() {
            return Err(HostPatternError::Empty);
        }
        if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(HostPatternError::Whitespace);
        }
        if host.starts_with('[') || host.parse::<Ipv6Addr>().is_ok() {
            return Err(HostPatternError::IpLiteral);
        }
        if host.contains(['/', '\\']) {
            return Err(HostPatternError::Path);
        }
        if host.contains(['?', '#']) {
            return Err(HostPatternError::Query);
        }
        if host.contains('@') {
            return Err(HostPatternError::UserInfo);
        }
        if host.contains(':') {
            return Err(HostPatternError::Port);
        }
        if host.contains('*') {
            return Err(HostPatternError::MisplacedWildcard);
        }
        // Already-normal names (the usual SNI) skip IDNA processing.
        if is_normal_ascii(host) {
            return check_name(host).map(|()| Self(host.to_owned()));
        }
        normalize_name(host).map(Self)
    }

    /// Parses an SNI as sent in a ClientHello (RFC 6066: bytes, expected ASCII).
    pub fn from_sni_bytes(sni: &[u8]) -> Result<Self, HostPatternError> {
        let s = std::str::from_utf8(sni).map_err(|_| HostPatternError::InvalidCharacter)?;
        Self::parse(s)
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a Host header or `:authority` value names this server on a connection to
    /// `port`: after removing a `:port` equal to `port` and one trailing dot, it must equal the
    /// name up to ASCII case — nothing else. Userinfo, another port, IDNA look-alikes
    /// (full-width letters) and any non-ASCII byte do not match: a front end may route such a
    /// Host differently from the SNI the value was allowed for. Allocation-free.
    pub fn matches_authority(&self, authority: &[u8], port: u16) -> bool {
        let host = match authority.iter().rposition(|&b| b == b':') {
            None => authority,
            Some(i) if is_port(&authority[i + 1..], port) => &authority[..i],
            Some(_) => return false,
        };
        let host = host.strip_suffix(b".").unwrap_or(host);
        host.eq_ignore_ascii_case(self.0.as_bytes())
    }
}

/// Whether `digits` is `port` in canonical decimal (no sign, no leading zero).
fn is_port(digits: &[u8], port: u16) -> bool {
    let canonical = digits.first().is_some_and(|&d| d != b'0') || digits == b"0";
    canonical
        && digits.len() <= 5
        && digits.iter().all(u8::is_ascii_digit)
        && digits
            .iter()
            .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
            == u32::from(port)
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ServerName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Normalises a host as seen on the wire (SNI, Host) for matching; `None` if it is not a valid
/// hostname (IP literals included).
pub fn normalize_host(host: &str) -> Option<String> {
    ServerName::parse(host).ok().map(|n| n.0)
}

/// Whether any of `patterns` allows `host`; an empty list allows every host (unrestricted).
pub fn allowed(patterns: &[HostPattern], host: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(host))
}

/// Whether `name` is already in normal form as far as case, trailing dot and IDNA go (plain
/// lower-case LDH labels without punycode, which IDNA would validate).
fn is_normal_ascii(name: &str) -> bool {
    !name.ends_with('.')
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
        && !name.starts_with("xn--")
        && !name.contains(".xn--")
}

fn normalize_name(name: &str) -> Result<String, HostPatternError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(HostPatternError::EmptyLabel);
    }
    let ascii = idna::domain_to_ascii_cow(name.as_bytes(), AsciiDenyList::URL)
        .map_err(|_| HostPatternError::InvalidCharacter)?
        .into_owned();
    check_name(&ascii)?;
    Ok(ascii)
}

/// Length, label and character rules for an ASCII name in normal form.
fn check_name(ascii: &str) -> Result<(), HostPatternError> {
    if ascii.is_empty() {
        return Err(HostPatternError::Empty);
    }
    if ascii.len() > MAX_HOST_LEN {
        return Err(HostPatternError::TooLong);
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(HostPatternError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(HostPatternError::TooLong);
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(HostPatternError::InvalidCharacter);
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostPatternError::Hyphen);
        }
    }
    if looks_like_ipv4(ascii) {
        return Err(HostPatternError::IpLiteral);
    }
    Ok(())
}

/// The WHATWG URL parser reads a name whose last label is numeric as an IPv4 address
/// (`10.1`, `0x7f.1`, `2130706433`); such names are never valid SNIs, so they are rejected too.
fn looks_like_ipv4(name: &str) -> bool {
    if name.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit());
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    numeric || hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(s: &str) -> String {
        HostPattern::parse(s).map(|p| p.to_string()).unwrap()
    }

    fn err(s: &str) -> HostPatternError {
        HostPattern::parse(s).unwrap_err()
    }

    #[test]
    fn normalises() {
        assert_eq!(ok("api.example.com"), "api.example.com");
        assert_eq!(ok("API.Example.COM"), "api.example.com");
        assert_eq!(ok("api.example.com."), "api.example.com");
        assert_eq!(ok("*.Example.com."), "*.example.com");
        assert_eq!(ok("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(ok("*.bücher.example"), "*.xn--bcher-kva.example");
        assert_eq!(ok("localhost"), "localhost");
        assert_eq!(ok("_acme.example.com"), "_acme.example.com");
    }

    #[test]
    fn rejects_with_named_reasons() {
        assert_eq!(err(""), HostPatternError::Empty);
        assert_eq!(err(" api.example.com"), HostPatternError::Whitespace);
        assert_eq!(err("api.example.com\n"), HostPatternError::Whitespace);
        assert_eq!(err("api .example.com"), HostPatternError::Whitespace);
        assert_eq!(err("https://api.example.com"), HostPatternError::Scheme);
        assert_eq!(err("api.example.com:443"), HostPatternError::Port);
        assert_eq!(err("api.example.com/v1"), HostPatternError::Path);
        assert_eq!(err("api.example.com?x=1"), HostPatternError::Query);
        assert_eq!(err("user@api.example.com"), HostPatternError::UserInfo);
        assert_eq!(err("*"), HostPatternError::BareWildcard);
        assert_eq!(err("*."), HostPatternError::BareWildcard);
        assert_eq!(err("api.*.com"), HostPatternError::MisplacedWildcard);
        assert_eq!(err("*api.example.com"), HostPatternError::MisplacedWildcard);
        assert_eq!(err("*.*.example.com"), HostPatternError::MisplacedWildcard);
        assert_eq!(err("*.com"), HostPatternError::WildcardTooBroad);
        assert_eq!(err("a..example.com"), HostPatternError::EmptyLabel);
        assert_eq!(err(".example.com"), HostPatternError::EmptyLabel);
        assert_eq!(err("example.com.."), HostPatternError::EmptyLabel);
        assert_eq!(err("."), HostPatternError::EmptyLabel);
        assert_eq!(err("127.0.0.1"), HostPatternError::IpLiteral);
        assert_eq!(err("10.1"), HostPatternError::IpLiteral);
        assert_eq!(err("0x7f.1"), HostPatternError::IpLiteral);
        assert_eq!(err("2130706433"), HostPatternError::IpLiteral);
        assert_eq!(err("::1"), HostPatternError::IpLiteral);
        assert_eq!(err("[::1]"), HostPatternError::IpLiteral);
        assert_eq!(err("-api.example.com"), HostPatternError::Hyphen);
        assert_eq!(err("api$.example.com"), HostPatternError::InvalidCharacter);
        assert_eq!(err(&"a".repeat(64)), HostPatternError::TooLong);
        assert_eq!(
            err(&vec!["abcdefghi"; 30].join(".")),
            HostPatternError::TooLong
        );
    }

    #[test]
    fn matching() {
        let exact = HostPattern::parse("api.example.com").unwrap();
        assert!(exact.matches("api.example.com"));
        assert!(exact.matches("API.example.com."));
        assert!(!exact.matches("x.api.example.com"));
        assert!(!exact.matches("example.com"));
        let wild = HostPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("example.com"));
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.EXAMPLE.com"));
        assert!(!wild.matches("badexample.com"));
        assert!(!wild.matches("example.com.evil.net"));
        assert!(!wild.matches("127.0.0.1"));
        let idn = HostPattern::parse("bücher.example").unwrap();
        assert!(idn.matches("xn--bcher-kva.example"));
        assert!(idn.matches("BÜCHER.example"));
        assert!(allowed(&[], "anything.example"));
        assert!(!allowed(&[exact], "other.example"));
    }

    #[test]
    fn server_names() {
        let n = ServerName::parse("API.Example.com.").unwrap();
        assert_eq!(n.as_str(), "api.example.com");
        assert_eq!(
            ServerName::parse("bücher.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
        assert_eq!(ServerName::from_sni_bytes(b"api.example.com").unwrap(), n);
        assert_eq!(
            ServerName::parse("127.0.0.1"),
            Err(HostPatternError::IpLiteral)
        );
        assert_eq!(ServerName::parse("::1"), Err(HostPatternError::IpLiteral));
        assert_eq!(ServerName::parse("[::1]"), Err(HostPatternError::IpLiteral));
        assert_eq!(
            ServerName::parse("*.example.com"),
            Err(HostPatternError::MisplacedWildcard)
        );
        assert_eq!(
            ServerName::parse("a.example.com:443"),
            Err(HostPatternError::Port)
        );
        assert_eq!(ServerName::parse(""), Err(HostPatternError::Empty));
        assert_eq!(ServerName::parse("a..b"), Err(HostPatternError::EmptyLabel));
        assert_eq!(ServerName::parse("a b"), Err(HostPatternError::Whitespace));
        assert_eq!(
            ServerName::parse("xn--zz.example"),
            Err(HostPatternError::InvalidCharacter)
        );
        assert!(ServerName::from_sni_bytes(b"\xff\xfe.example").is_err());
        assert!(ServerName::from_sni_bytes(b"a\0b.example").is_err());
    }

    #[test]
    fn unicode_sni_matches_punycode_pattern() {
        let p = HostPattern::parse("*.xn--bcher-kva.example").unwrap();
        let n = ServerName::parse("API.BÜCHER.example.").unwrap();
        assert!(p.matches_name(&n));
        let exact = HostPattern::parse("bücher.example").unwrap();
        assert!(exact.matches_name(&ServerName::parse("xn--bcher-kva.example").unwrap()));
    }

    #[test]
    fn authority_matching() {
        let n = ServerName::parse("api.example.com").unwrap();
        for ok in [
            &b"api.example.com"[..],
            b"API.Example.COM",
            b"api.example.com.",
            b"api.example.com:8443",
            b"Api.Example.Com.:8443",
        ] {
            assert!(
                n.matches_authority(ok, 8443),
                "{}",
                String::from_utf8_lossy(ok)
            );
        }
        for bad in [
            &b"api.example.com:"[..],
            b"api.example.com:abc",
            b"api.example.com:1:2",
            b"api.example.com:8443:8443",
            b"api.example.co",
            b"x.api.example.com",
            b"[::1]:8443",
            b"",
            b".",
            b"api.example.com..",
            b"api.example.com..:8443",
            b"api.example.com:123456",
            // Another port than the connection's, or the same one spelled otherwise.
            b"api.example.com:443",
            b"api.example.com:08443",
            b"api.example.com:+8443",
            b"api.example.com: 8443",
            // Userinfo, whitespace, a path.
            b"user@api.example.com",
            b"user:pw@api.example.com:8443",
            b" api.example.com",
            b"api.example.com ",
            b"api.example.com/",
            b"api.example.com\0",
        ] {
            assert!(
                !n.matches_authority(bad, 8443),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // IDNA would map these to the SNI; a front end may not: never equal.
        for look_alike in [
            "\u{ff41}\u{ff50}\u{ff49}.example.com",
            "\u{ff41}\u{ff50}\u{ff49}.example.com:8443",
            "api\u{3002}example.com",
            "api.example.com\u{3002}",
            "API.EXAMPLE.CO\u{24c2}",
            "api.exampl\u{e9}.com",
        ] {
            assert!(
                !n.matches_authority(look_alike.as_bytes(), 8443),
                "{look_alike}"
            );
        }
        assert!(n.matches_authority(b"api.example.com:443", 443));
        assert!(n.matches_authority(b"api.example.com", 443));
        assert!(!n.matches_authority(b"api.example.com:8443", 443));
        // An internationalised SNI: the Host must carry the same A-label.
        let idn = ServerName::parse("b\u{fc}cher.example").unwrap();
        assert!(idn.matches_authority(b"XN--BCHER-KVA.example:443", 443));
        assert!(!idn.matches_authority("B\u{dc}CHER.example".as_bytes(), 443));
        assert!(!idn.matches_authority("b\u{fc}cher.example".as_bytes(), 443));
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9]{0,10}"
    }

    fn hostname() -> impl Strategy<Value = String> {
        prop::collection::vec(label(), 2..5).prop_map(|l| l.join("."))
    }

    proptest! {
        #[test]
        fn normalised_form_is_a_fixed_point(s in "\\PC{0,40}") {
            if let Ok(p) = HostPattern::parse(&s) {
                let again = HostPattern::parse(&p.to_string()).unwrap();
                prop_assert_eq!(again, p);
            }
        }

        #[test]
        fn whitespace_anywhere_is_rejected(host in hostname(), pos in 0usize..40, ws in "[ \t\r\n]") {
            let mut s = host.clone();
            let at = pos.min(s.len());
            s.insert_str(at, &ws);
            prop_assert!(HostPattern::parse(&s).is_err());
        }

        #[test]
        fn case_insensitive(host in hostname()) {
            let p = HostPattern::parse(&host.to_uppercase()).unwrap();
            prop_assert!(p.matches(&host));
            let dotted = format!("{}.", host.to_uppercase());
            prop_assert!(p.matches(&dotted));
        }

        #[test]
        fn wildcard_covers_subdomains_only(base in hostname(), sub in label(), other in hostname()) {
            let p = HostPattern::parse(&format!("*.{base}")).unwrap();
            prop_assert!(p.matches(&base));
            let subdomain = format!("{sub}.{base}");
            prop_assert!(p.matches(&subdomain));
            let glued = format!("{sub}{base}");
            prop_assert!(!p.matches(&glued));
            if other != base && !other.ends_with(&format!(".{base}")) {
                prop_assert!(!p.matches(&other));
            }
        }

        #[test]
        fn ports_schemes_paths_rejected(host in hostname(), port in 1u16..) {
            let with_port = format!("{host}:{port}");
            let with_scheme = format!("https://{host}");
            let with_path = format!("{host}/x");
            prop_assert_eq!(HostPattern::parse(&with_port), Err(HostPatternError::Port));
            prop_assert_eq!(HostPattern::parse(&with_scheme), Err(HostPatternError::Scheme));
            prop_assert_eq!(HostPattern::parse(&with_path), Err(HostPatternError::Path));
        }

        #[test]
        fn server_name_agrees_with_pattern(host in hostname(), upper: bool, dot: bool) {
            let mut wire = if upper { host.to_uppercase() } else { host.clone() };
            if dot { wire.push('.'); }
            let n = ServerName::parse(&wire).unwrap();
            prop_assert_eq!(n.as_str(), host.as_str());
            prop_assert!(HostPattern::parse(&host).unwrap().matches_name(&n));
            prop_assert!(n.matches_authority(wire.as_bytes(), 443));
            let with_port = format!("{wire}:8443");
            prop_assert!(n.matches_authority(with_port.as_bytes(), 8443));
            prop_assert!(!n.matches_authority(with_port.as_bytes(), 443));
        }

        #[test]
        fn server_name_never_panics(s in "\\PC{0,60}", b in prop::collection::vec(any::<u8>(), 0..60)) {
            if let Ok(n) = ServerName::parse(&s) {
                prop_assert_eq!(ServerName::parse(n.as_str()).unwrap(), n.clone());
                prop_assert!(n.matches_authority(n.as_str().as_bytes(), 443));
            }
            let _ = ServerName::from_sni_bytes(&b);
            let n = ServerName::parse("api.example.com").unwrap();
            let _ = n.matches_authority(&b, 443);
        }

        /// Exactly four spellings name the server, up to ASCII case: `sni`, `sni.`, `sni:port`
        /// and `sni.:port`; any byte string that matches is one of them.
        #[test]
        fn only_the_sni_matches(
            host in hostname(),
            port in 1u16..,
            noise in prop::collection::vec(any::<u8>(), 0..4),
            at in 0usize..40,
            flips in prop::collection::vec(any::<bool>(), 40),
            form in 0usize..4,
        ) {
            let n = ServerName::parse(&host).unwrap();
            let forms = [
                host.clone(),
                format!("{host}."),
                format!("{host}:{port}"),
                format!("{host}.:{port}"),
            ];
            let cased: String = forms[form]
                .chars()
                .zip(flips.iter().cycle())
                .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
                .collect();
            prop_assert!(n.matches_authority(cased.as_bytes(), port));
            let mut mangled = cased.into_bytes();
            let at = at.min(mangled.len());
            mangled.splice(at..at, noise.iter().copied());
            if n.matches_authority(&mangled, port) {
                let lower = mangled.to_ascii_lowercase();
                prop_assert!(forms.iter().any(|f| f.as_bytes() == lower.as_slice()));
            }
        }

        #[test]
        fn fast_path_agrees_with_idna(s in "[a-z0-9_.-]{1,30}") {
            prop_assert_eq!(ServerName::parse(&s).ok().map(|n| n.0), normalize_name(&s).ok());
        }

        #[test]
        fn ip_literals_rejected(a: u8, b: u8, c: u8, d: u8) {
            let v4 = format!("{a}.{b}.{c}.{d}");
            prop_assert_eq!(HostPattern::parse(&v4), Err(HostPatternError::IpLiteral));
            prop_assert!(normalize_host(&v4).is_none());
        }
    }
}
