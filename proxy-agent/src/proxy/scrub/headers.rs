//! Scrubbing response (and trailer) headers: names and values, in place.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use veil_policy::ScrubPatterns;

/// Scrubs every header's name and value in place; drops a header that scrubbing makes invalid.
/// Returns the number of occurrences replaced.
pub fn scrub_headers(patterns: &ScrubPatterns, headers: &mut HeaderMap) -> u64 {
    let dirty = headers.iter().any(|(n, v)| {
        patterns.scrub_counted(n.as_str().as_bytes()).is_some()
            || patterns.scrub_counted(v.as_bytes()).is_some()
    });
    if !dirty {
        return 0;
    }
    let mut replaced = 0;
    let mut out = HeaderMap::with_capacity(headers.len());
    let mut name: Option<HeaderName> = None;
    for (n, value) in std::mem::take(headers) {
        if let Some(n) = n {
            name = match patterns.scrub_counted(n.as_str().as_bytes()) {
                None => Some(n),
                Some((new, count)) => {
                    replaced += count;
                    HeaderName::from_bytes(&new).ok()
                }
            };
        }
        let Some(name) = &name else { continue };
        let value = match patterns.scrub_counted(value.as_bytes()) {
            None => Some(value),
            Some((new, count)) => {
                replaced += count;
                HeaderValue::from_bytes(&new).ok()
            }
        };
        if let Some(value) = value {
            out.append(name.clone(), value);
        }
    }
    *headers = out;
    replaced
}
