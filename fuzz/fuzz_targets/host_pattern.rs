//! Host patterns and server names: parsing normalises idempotently, and matching agrees with
//! its definition (exact name, or the wildcard's base and its subdomains).
//!
//! Input: `pattern \n host \n authority`, split on the first two newlines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_policy::{HostPattern, ServerName};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\n');
    let pattern = parts.next().unwrap_or("");
    let host = parts.next().unwrap_or("");
    let authority = parts.next().unwrap_or("");

    let name = ServerName::parse(host);
    if let Ok(n) = &name {
        // Normal form is a fixed point, and a name is its own exact pattern.
        assert_eq!(ServerName::parse(n.as_str()).as_ref(), Ok(n));
        let exact = HostPattern::parse(n.as_str());
        assert_eq!(exact, Ok(HostPattern::Exact(n.as_str().to_owned())));
        // A name names itself as an authority, with a port, in upper case, with a trailing dot.
        assert!(n.matches_authority(n.as_str().as_bytes(), 443));
        assert!(n.matches_authority(format!("{n}:443").as_bytes(), 443));
        // Another port than the connection's is another server.
        assert!(!n.matches_authority(format!("{n}:8443").as_bytes(), 443));
        assert!(n.matches_authority(n.as_str().to_ascii_uppercase().as_bytes(), 443));
        assert!(n.matches_authority(format!("{n}.").as_bytes(), 443));
        // An authority that matches normalises to the same name.
        if n.matches_authority(authority.as_bytes(), 443) {
            let host_part = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            if let Ok(m) = ServerName::parse(host_part) {
                assert_eq!(&m, n, "authority {authority:?} matched {n} but names {m}");
            }
        }
    }

    let Ok(p) = HostPattern::parse(pattern) else {
        return;
    };
    let shown = p.to_string();
    assert_eq!(
        HostPattern::parse(&shown).as_ref(),
        Ok(&p),
        "normal form not a fixed point"
    );
    // `matches` on a raw host is `matches_name` on its normal form; invalid hosts never match.
    assert_eq!(
        p.matches(host),
        name.as_ref().is_ok_and(|n| p.matches_name(n))
    );
    if let Ok(n) = &name {
        let expected = match &p {
            HostPattern::Exact(e) => n.as_str() == e,
            HostPattern::Wildcard(base) => {
                n.as_str() == base
                    || n.as_str()
                        .strip_suffix(base.as_str())
                        .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
            }
        };
        assert_eq!(p.matches_name(n), expected, "{p} vs {n}");
    }
});
