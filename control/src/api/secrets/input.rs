//! What a secret request carries beyond its body's types: the `?wait=` duration, the hosts
//! list's normal form, and the ids and placeholders control makes.

use std::time::Duration;

use rand::RngCore;
use veil_policy::HostPattern;

use crate::api::error::ApiError;
use crate::validate;

/// Longest `?wait=` a PATCH accepts.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// `?wait=` of a PATCH: `500ms`, `5s` or plain seconds, 1 ms to [`MAX_WAIT`].
pub fn parse_wait(wait: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = wait.map(str::trim).filter(|w| !w.is_empty()) else {
        return Ok(None);
    };
    let invalid = || {
        bad(format!(
            "wait must be a duration like 500ms or 5s (at most {} s)",
            MAX_WAIT.as_secs()
        ))
    };
    let (number, unit_ms) = if let Some(n) = raw.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = raw.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (raw, 1000.0)
    };
    let n: f64 = number.trim().parse().map_err(|_| invalid())?;
    let ms = n * unit_ms;
    if !ms.is_finite() || ms < 1.0 || ms > MAX_WAIT.as_millis() as f64 {
        return Err(invalid());
    }
    Ok(Some(Duration::from_millis(ms as u64)))
}

/// A random UUID v4 string.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

pub(super) fn new_placeholder(prefix: &str) -> String {
    // 192 random bits, hex: safe in URLs, headers and shells.
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

/// Validates and normalises a hosts list (deduplicated, order kept).
pub fn parse_hosts(hosts: Vec<String>) -> Result<Vec<String>, ApiError> {
    if hosts.len() > validate::MAX_HOSTS {
        return Err(ApiError::BadRequest(format!(
            "hosts may list at most {} entries",
            validate::MAX_HOSTS
        )));
    }
    let mut out: Vec<String> = Vec::with_capacity(hosts.len());
    for (i, host) in hosts.iter().enumerate() {
        let pattern = HostPattern::parse(host)
            .map_err(|e| ApiError::BadRequest(format!("hosts[{i}] {host:?}: {e}")))?
            .to_string();
        if !out.contains(&pattern) {
            out.push(pattern);
        }
    }
    Ok(out)
}

pub(super) fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

pub(super) fn parse_description(d: Option<String>) -> Result<Option<String>, ApiError> {
    match d {
        Some(d) => {
            validate::description(&d)?;
            Ok(Some(d))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(v: &str) -> Result<Option<Duration>, ApiError> {
        parse_wait(Some(v))
    }

    #[test]
    fn wait_parses_durations_within_bounds() {
        assert_eq!(wait("").unwrap(), None);
        assert_eq!(parse_wait(None).unwrap(), None);
        assert_eq!(wait("500ms").unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(wait("5s").unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(wait("2").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(wait("1.5s").unwrap(), Some(Duration::from_millis(1500)));
        for bad in ["0", "0ms", "61s", "-1", "abc", "5m", "NaN", "inf"] {
            assert!(wait(bad).is_err(), "{bad}");
        }
    }
}
