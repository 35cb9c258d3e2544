//! Host allowlist patterns: parsing, normalisation and matching.
//!
//! Pure and free of control's types so that the agent can reuse the same matching for SNIs.
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
        let Some(host) = normalize_host(host) else {
            return false;
        };
        match self {
            Self::Exact(name) => host == *name,
            Self::Wildcard(base) => {
                host == *base
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

/// Normalises a host as seen on the wire (SNI, Host) for matching; `None` if it is not a valid
/// hostname (IP literals included).
pub fn normalize_host(host: &str) -> Option<String> {
    if host.is_empty() || host.contains(['/', ':', '@', '?', '#', '*', '[']) {
        return None;
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    normalize_name(host).ok()
}

/// Whether any of `patterns` allows `host`; an empty list allows every host (unrestricted).
pub fn allowed(patterns: &[HostPattern], host: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(host))
}

fn normalize_name(name: &str) -> Result<String, HostPatternError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(HostPatternError::EmptyLabel);
    }
    let ascii = idna::domain_to_ascii_cow(name.as_bytes(), AsciiDenyList::URL)
        .map_err(|_| HostPatternError::InvalidCharacter)?
        .into_owned();
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
    if looks_like_ipv4(&ascii) {
        return Err(HostPatternError::IpLiteral);
    }
    Ok(ascii)
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
        fn ip_literals_rejected(a: u8, b: u8, c: u8, d: u8) {
            let v4 = format!("{a}.{b}.{c}.{d}");
            prop_assert_eq!(HostPattern::parse(&v4), Err(HostPatternError::IpLiteral));
            prop_assert!(normalize_host(&v4).is_none());
        }
    }
}
