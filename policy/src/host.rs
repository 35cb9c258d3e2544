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
mod tests;
