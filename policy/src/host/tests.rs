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
