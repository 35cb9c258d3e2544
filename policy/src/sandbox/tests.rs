use super::*;
use crate::client_hello::{Peek, parse_client_hello};
use crate::decide::{Intercept, PassthroughReason};
use crate::secret::testing::secret;
use proptest::prelude::*;

fn name(s: &str) -> ServerName {
    ServerName::parse(s).unwrap()
}

fn alpn(list: &[&str]) -> Vec<Vec<u8>> {
    list.iter().map(|p| p.as_bytes().to_vec()).collect()
}

/// A decision without the server name (checked to be the hello's): `Ok` = intercept.
type Got = Result<(bool, bool, bool), PassthroughReason>;

fn intercept(h2: bool, http1: bool, host_match: bool) -> Got {
    Ok((h2, http1, host_match))
}

fn got(d: Decision, sni: Option<&ServerName>) -> Got {
    match d {
        Decision::Intercept(Intercept {
            server_name,
            offers_h2,
            offers_http1,
            host_match,
        }) => {
            assert_eq!(Some(&server_name), sni, "intercepted under another name");
            Ok((offers_h2, offers_http1, host_match))
        }
        Decision::Passthrough(reason) => Err(reason),
    }
}

/// Decides for a hello with `sni` and an ALPN list (`None` = no ALPN extension).
fn decide(p: &SandboxPolicy, sni: Option<&ServerName>, alpn: Option<&[Vec<u8>]>) -> Got {
    let hello = ClientHelloInfo {
        sni: sni.cloned(),
        sni_invalid: false,
        alpn: alpn.map(<[_]>::to_vec).unwrap_or_default(),
        alpn_present: alpn.is_some(),
        legacy_version: 0x0303,
        supported_versions: Vec::new(),
        stream_len: 0,
    };
    got(p.decide(hello), sni)
}

use PassthroughReason::*;

#[test]
fn rotated_out_and_retired_values_are_scrubbed_never_substituted() {
    use crate::substitute::RequestView;
    use veil_link::proto::SecretValue;
    let mut live = secret("a", "value-now-0123456789", &["api.allowed.test"]);
    live.previous = vec![
        SecretValue::new("value-before-0123456".into()),
        SecretValue::new(String::new()),
    ];
    let mut gone = secret("b", "deleted-value-987654", &["api.allowed.test"]);
    gone.retired = true;
    let p = SandboxPolicy::new(vec![gone, live]).unwrap();
    assert_eq!(p.secrets().len(), 1);
    assert_eq!(p.retired().len(), 1);
    let body = b"value-now-0123456789 value-before-0123456 deleted-value-987654";
    let out = p.scrub_patterns().scrub_all(body).unwrap();
    assert_eq!(
        out,
        b"ph_a_placeholder ph_a_placeholder ph_b_placeholder".to_vec()
    );
    // The retired placeholder goes out as it is.
    let sni = name("api.allowed.test");
    let headers: [(&[u8], &[u8]); 2] = [
        (b"host", b"api.allowed.test"),
        (b"x-k", b"ph_a_placeholder ph_b_placeholder"),
    ];
    let view = RequestView {
        target: "/",
        authority: None,
        headers: &headers,
    };
    let change = p.substitute(&sni, 443, &view).unwrap();
    assert_eq!(
        change.headers[0].1.as_bytes(),
        b"value-now-0123456789 ph_b_placeholder"
    );
    // Retired secrets the sandbox never mounted are scrubbed but decide nothing.
    let mut other = secret("d", "deleted-value-444444", &[]);
    other.retired = true;
    let p = SandboxPolicy::build(
        vec![secret("e", "live-value-3333333333", &["api.allowed.test"])],
        vec![other],
        ModeOverrides::default(),
    )
    .unwrap();
    assert_eq!(p.retired().len(), 1);
    assert!(
        p.scrub_patterns()
            .scrub_all(b"deleted-value-444444")
            .is_some()
    );
    let elsewhere = name("elsewhere.test");
    assert_eq!(
        decide(&p, Some(&elsewhere), Some(&alpn(&["http/1.1"]))),
        Err(HostNotAllowed),
        "an unrestricted secret never mounted here widened interception"
    );
    let mut only = secret("f", "deleted-value-222222", &[]);
    only.retired = true;
    let p = SandboxPolicy::build(vec![], vec![only], ModeOverrides::default()).unwrap();
    assert_eq!(
        decide(&p, Some(&elsewhere), Some(&alpn(&["http/1.1"]))),
        Err(NoSecrets)
    );
    // A sandbox holding only a retired secret it mounted is still intercepted for its
    // hosts (the value is scrubbed).
    let mut only = secret("c", "deleted-value-555555", &["api.allowed.test"]);
    only.retired = true;
    let p = SandboxPolicy::new(vec![only]).unwrap();
    assert!(p.secrets().is_empty() && p.scrubs());
    assert!(decide(&p, Some(&sni), Some(&alpn(&["http/1.1"]))).is_ok());
}

#[test]
fn policy_is_shareable_across_tasks() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SandboxPolicy>();
    send_sync::<crate::scrub::ScrubPatterns>();
}

#[test]
fn no_secrets_no_interception() {
    let p = SandboxPolicy::new(vec![]).unwrap();
    let both = alpn(&["h2", "http/1.1"]);
    assert_eq!(
        decide(&p, Some(&name("a.test")), Some(&both)),
        Err(NoSecrets)
    );
}

#[test]
fn restricted_secret() {
    let p = SandboxPolicy::new(vec![secret(
        "a",
        "v",
        &["*.allowed.test", "api.other.test"],
    )])
    .unwrap();
    let both = alpn(&["h2", "http/1.1"]);
    let h1 = alpn(&["http/1.1"]);
    let odd = alpn(&["imap", "acme-tls/1"]);
    assert_eq!(
        decide(&p, Some(&name("api.allowed.test")), Some(&both)),
        intercept(true, true, true)
    );
    assert_eq!(
        decide(&p, Some(&name("allowed.test")), Some(&h1)),
        intercept(false, true, true)
    );
    assert_eq!(
        decide(&p, Some(&name("API.OTHER.test.")), Some(&h1)),
        intercept(false, true, true)
    );
    // No ALPN to an allowed host: HTTP/1.1 is assumed.
    assert_eq!(
        decide(&p, Some(&name("api.allowed.test")), None),
        intercept(false, true, true)
    );
    assert_eq!(
        decide(&p, Some(&name("api.allowed.test")), Some(&odd)),
        Err(AlpnNotHttp)
    );
    assert_eq!(
        decide(&p, Some(&name("x.other.test")), Some(&both)),
        Err(HostNotAllowed)
    );
    assert_eq!(
        decide(&p, Some(&name("allowed.test.evil")), Some(&both)),
        Err(HostNotAllowed)
    );
    assert_eq!(decide(&p, None, Some(&both)), Err(NoSni));
}

#[test]
fn unrestricted_secret_needs_http_alpn() {
    let p = SandboxPolicy::new(vec![secret("u", "v", &[])]).unwrap();
    let n = name("anything.test");
    assert_eq!(
        decide(&p, Some(&n), Some(&alpn(&["h2"]))),
        intercept(true, false, false)
    );
    assert_eq!(
        decide(&p, Some(&n), Some(&alpn(&["http/1.1"]))),
        intercept(false, true, false)
    );
    assert_eq!(decide(&p, Some(&n), None), Err(NoAlpn));
    assert_eq!(
        decide(&p, Some(&n), Some(&alpn(&["h3", "spdy/3"]))),
        Err(AlpnNotHttp)
    );
    assert_eq!(decide(&p, None, Some(&alpn(&["h2"]))), Err(NoSni));
    // With a restricted secret beside it, its hosts intercept without ALPN.
    let p = SandboxPolicy::new(vec![secret("u", "v", &[]), secret("r", "w", &["r.test"])]).unwrap();
    assert_eq!(
        decide(&p, Some(&name("r.test")), None),
        intercept(false, true, true)
    );
    assert_eq!(decide(&p, Some(&n), None), Err(NoAlpn));
    assert_eq!(
        decide(&p, Some(&n), Some(&alpn(&["h2"]))),
        intercept(true, false, false)
    );
}

#[test]
fn block_mode_intercepts_http_to_any_host_and_blocks_by_hits() {
    let mut blocking = secret("b", "v", &["b.test"]);
    blocking.wrong_host = WrongHost::Block;
    let p = SandboxPolicy::new(vec![secret("f", "w", &["f.test"]), blocking]).unwrap();
    let other = name("elsewhere.test");
    let h2 = alpn(&["h2"]);
    assert_eq!(
        decide(&p, Some(&other), Some(&h2)),
        intercept(true, false, false)
    );
    assert_eq!(decide(&p, Some(&other), None), Err(NoAlpn));
    assert_eq!(
        decide(&p, Some(&other), Some(&alpn(&["imap"]))),
        Err(AlpnNotHttp)
    );
    // Forward mode everywhere: hosts nobody allows pass through, unless the config blocks.
    let f = SandboxPolicy::new(vec![secret("f", "w", &["f.test"])]).unwrap();
    assert_eq!(decide(&f, Some(&other), Some(&h2)), Err(HostNotAllowed));
    let block_all = ModeOverrides {
        wrong_host: WrongHost::Block,
        ..ModeOverrides::default()
    };
    let f_all =
        SandboxPolicy::build(vec![secret("f", "w", &["f.test"])], vec![], block_all).unwrap();
    assert_eq!(
        decide(&f_all, Some(&other), Some(&h2)),
        intercept(true, false, false)
    );
    assert!(
        !SandboxPolicy::build(vec![], vec![], block_all)
            .unwrap()
            .blocks_wrong_hosts()
    );

    let hit = |secret, wrong_host, substituted| SecretHit {
        secret,
        substituted,
        wrong_host,
        host_mismatch: 0,
    };
    assert!(p.blocked_by(&[]).is_none());
    assert!(p.blocked_by(&[hit(0, 2, 0)]).is_none());
    assert!(p.blocked_by(&[hit(1, 0, 3)]).is_none());
    assert_eq!(p.blocked_by(&[hit(0, 1, 0), hit(1, 1, 0)]).unwrap().id, "b");
    let mut blocking = secret("b", "v", &["b.test"]);
    blocking.wrong_host = WrongHost::Block;
    let p_all = SandboxPolicy::build(
        vec![secret("f", "w", &["f.test"]), blocking],
        vec![],
        block_all,
    )
    .unwrap();
    assert_eq!(p_all.blocked_by(&[hit(0, 1, 0)]).unwrap().id, "f");
    assert!(p_all.blocked_by(&[hit(7, 1, 0)]).is_none());
}

#[test]
fn decides_on_real_hellos() {
    let p = SandboxPolicy::new(vec![secret("a", "v", &["*.allowed.test"])]).unwrap();
    let u = SandboxPolicy::new(vec![secret("u", "v", &[])]).unwrap();
    let cases: &[(&[u8], Got, Got)] = &[
        (
            include_bytes!("../../testdata/curl_http2.bin"),
            intercept(true, true, true),
            intercept(true, true, false),
        ),
        (
            include_bytes!("../../testdata/curl_http1.1.bin"),
            intercept(false, true, true),
            intercept(false, true, false),
        ),
        (
            include_bytes!("../../testdata/openssl_tls12.bin"),
            intercept(false, true, true),
            Err(NoAlpn),
        ),
        (
            include_bytes!("../../testdata/openssl_nosni.bin"),
            Err(NoSni),
            Err(NoSni),
        ),
        (
            include_bytes!("../../testdata/openssl_unicode_sni.bin"),
            intercept(false, true, true),
            Err(NoAlpn),
        ),
    ];
    for (bytes, restricted, unrestricted) in cases {
        let Peek::Tls(hello) = parse_client_hello(bytes) else {
            panic!("not a hello")
        };
        let sni = hello.sni.clone();
        assert_eq!(got(p.decide(hello.clone()), sni.as_ref()), *restricted);
        assert_eq!(got(u.decide(hello), sni.as_ref()), *unrestricted);
    }
}

#[test]
fn construction_rules() {
    let dup = SandboxPolicy::new(vec![secret("a", "v", &[]), secret("a", "v", &[])]).unwrap();
    assert_eq!(dup.secrets().len(), 1);
    let mut bad = secret("b", "v", &[]);
    bad.placeholder = "has space".into();
    assert!(matches!(
        SandboxPolicy::new(vec![bad]),
        Err(PolicyError::Placeholder { .. })
    ));
    let empty = secret("e", "", &[]);
    assert!(matches!(
        SandboxPolicy::new(vec![empty]),
        Err(PolicyError::EmptyValue { .. })
    ));
    let a = secret("a", "v", &[]);
    let mut b = secret("b", "w", &[]);
    b.placeholder = format!("{}x", a.placeholder);
    assert!(matches!(
        SandboxPolicy::new(vec![a, b]),
        Err(PolicyError::PlaceholderOverlap { .. })
    ));
    let p = SandboxPolicy::new(vec![secret("a", "v", &["a.test"]), secret("u", "w", &[])]).unwrap();
    assert!(p.secret_allows(0, &name("a.test")));
    assert!(!p.secret_allows(0, &name("b.test")));
    assert!(p.secret_allows(1, &name("b.test")));
    assert!(!p.secret_allows(2, &name("b.test")));
}

#[test]
fn for_sandbox_uses_its_mounts_only() {
    use veil_link::proto::SecretValue;
    let state = |id: &str, org: &str, hosts: &[&str]| SecretState {
        previous: Vec::new(),
        retired: false,
        id: id.parse().unwrap(),
        org: org.parse().unwrap(),
        name: format!("N{id}"),
        placeholder: format!("ph_{id}"),
        hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        value: SecretValue::new(format!("value-{id}")),
        revision: 1.into(),
        body_substitution: false,
        wrong_host: Default::default(),
    };
    let secrets = vec![
        state("a", "o1", &["a.test"]),
        state("b", "o1", &[]),
        state("c", "o2", &[]),
    ];
    let mut sb = SandboxState {
        egress: Default::default(),
        cgroup_id: None,
        id: "sb1".parse().unwrap(),
        org: "o1".parse().unwrap(),
        cgroup: "x".into(),
        netns: None,
        mounts: [
            ("A_KEY".to_owned(), "a".parse().unwrap()),
            ("A_AGAIN".to_owned(), "a".parse().unwrap()),
        ]
        .into(),
    };
    let p = SandboxPolicy::for_sandbox(&sb, &secrets, ModeOverrides::default()).unwrap();
    assert_eq!(p.secrets().len(), 1);
    // "b" is unrestricted but not mounted here: other hosts stay untouched.
    let h2 = alpn(&["h2"]);
    assert_eq!(
        decide(&p, Some(&name("b.test")), Some(&h2)),
        Err(HostNotAllowed)
    );
    sb.mounts.insert("C".into(), "c".parse().unwrap());
    assert!(matches!(
        SandboxPolicy::for_sandbox(&sb, &secrets, ModeOverrides::default()),
        Err(PolicyError::OrgMismatch { .. })
    ));
    sb.mounts.insert("C".into(), "zz".parse().unwrap());
    assert!(matches!(
        SandboxPolicy::for_sandbox(&sb, &secrets, ModeOverrides::default()),
        Err(PolicyError::MissingSecret { .. })
    ));
    sb.mounts.clear();
    let p = SandboxPolicy::for_sandbox(&sb, &secrets, ModeOverrides::default()).unwrap();
    assert_eq!(decide(&p, Some(&name("a.test")), Some(&h2)), Err(NoSecrets));
}

fn host() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-c]{1,2}", 1..4).prop_map(|l| format!("{}.test", l.join(".")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// The decision equals the rule written naively over the secrets.
    #[test]
    fn matches_naive_rule(
        secrets in prop::collection::vec((prop::collection::vec((any::<bool>(), host()), 0..3), any::<bool>()), 0..4),
        sni in prop::option::of(host()),
        protos in prop::option::of(prop::collection::vec(prop::sample::select(vec!["h2", "http/1.1", "h3", "x"]), 0..3)),
        block_all in any::<bool>(),
    ) {
        let mounted: Vec<_> = secrets.iter().enumerate().map(|(i, (hosts, block))| {
            let pats: Vec<String> = hosts.iter().map(|(w, h)| if *w { format!("*.{h}") } else { h.clone() }).collect();
            let pats: Vec<&str> = pats.iter().map(String::as_str).collect();
            let mut s = secret(&i.to_string(), "v", &pats);
            if *block {
                s.wrong_host = WrongHost::Block;
            }
            s
        }).collect();
        let sni = sni.map(|s| name(&s));
        let alpn = protos.map(|l| alpn(&l));
        let overrides = ModeOverrides {
            wrong_host: if block_all { WrongHost::Block } else { WrongHost::Forward },
            ..ModeOverrides::default()
        };
        let p = SandboxPolicy::build(mounted.clone(), vec![], overrides).unwrap();
        let d = decide(&p, sni.as_ref(), alpn.as_deref());
        let http = alpn.as_ref().is_none_or(|l| l.iter().any(|x| x == b"h2" || x == b"http/1.1"));
        let expect_intercept = match &sni {
            None => false,
            Some(n) => http && mounted.iter().any(|s| {
                let blocks = s.wrong_host_with(overrides) == WrongHost::Block;
                ((s.unrestricted() || blocks) && alpn.is_some())
                    || s.hosts.iter().any(|h| h.matches_name(n))
            }),
        };
        prop_assert_eq!(d.is_ok(), expect_intercept, "{:?}", d);
    }
}
