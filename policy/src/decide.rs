//! The intercept decision: for a sandbox and a ClientHello, intercept or pass through.
//!
//! A [`SandboxPolicy`] is built once from the secrets mounted in one sandbox (whenever they
//! change) and consulted per connection; [`SandboxPolicy::decide`] does not allocate.
//!
//! Rules, in order:
//! 1. no secret mounted → passthrough;
//! 2. no valid SNI → passthrough (nothing can be proven about the peer);
//! 3. an ALPN list that offers neither `h2` nor `http/1.1` → passthrough (veil only speaks HTTP;
//!    this also covers host-restricted secrets, whose hosts may serve other protocols);
//! 4. a host-restricted secret allows the SNI → intercept (with or without ALPN);
//! 5. an unrestricted secret is mounted, or a secret that blocks hosts it does not allow
//!    ([`WrongHost::Block`], by its own field or the agent's [`ModeOverrides`]), and the client
//!    offers `h2` or `http/1.1` by ALPN → intercept; without ALPN → passthrough (unknown protocol
//!    to an arbitrary host). A placeholder sent to a wrong host can only be seen, and blocked, on
//!    a connection veil terminates;
//! 6. otherwise → passthrough.
//!
//! Per request, [`SandboxPolicy::blocked_by`] says whether a request must be answered 403
//! instead of being forwarded: a placeholder of a blocking secret went to a host it does not
//! allow.

use veil_link::proto::{SandboxState, SecretState};

use crate::client_hello::ClientHelloInfo;
use crate::host::{HostPattern, ServerName};
use crate::scrub::ScrubPatterns;
use crate::secret::{ModeOverrides, MountedSecret, PolicyError, placeholder_is_url_safe};
use crate::substitute::{SecretHit, Substituter};
use veil_link::proto::WrongHost;

const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Everything the agent decides for one sandbox, precomputed from its mounted secrets.
#[derive(Debug)]
pub struct SandboxPolicy {
    /// Live secrets: their placeholders are substituted.
    secrets: Vec<MountedSecret>,
    /// Retired (deleted) secrets inside their grace period: scrubbed and intercepted for, never
    /// substituted.
    retired: Vec<MountedSecret>,
    /// Union of all secrets' patterns, deduplicated.
    patterns: Vec<HostPattern>,
    any_unrestricted: bool,
    /// Some secret's own field says [`WrongHost::Block`].
    any_block: bool,
    pub(crate) substituter: Substituter,
    scrub: ScrubPatterns,
}

/// The decision for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Terminate TLS and run the request through substitution.
    Intercept(Intercept),
    /// Splice the bytes through untouched.
    Passthrough(PassthroughReason),
}

/// Details of an intercept decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intercept {
    /// The client offers h2.
    pub offers_h2: bool,
    /// The client offers http/1.1 (or offers no ALPN at all, which means HTTP/1.1).
    pub offers_http1: bool,
    /// A host-restricted secret allows the SNI (otherwise only unrestricted secrets apply).
    pub host_match: bool,
}

/// Why a connection is passed through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassthroughReason {
    /// No secret is mounted in the sandbox.
    NoSecrets,
    /// The ClientHello carries no (valid) SNI.
    NoSni,
    /// The client offers ALPN protocols, none of them HTTP.
    AlpnNotHttp,
    /// Only unrestricted secrets apply, and the client offers no ALPN.
    NoAlpn,
    /// No mounted secret allows the SNI.
    HostNotAllowed,
}

impl SandboxPolicy {
    /// Builds the policy from the secrets mounted in a sandbox (each once; duplicates by id
    /// are merged).
    pub fn new(secrets: Vec<MountedSecret>) -> Result<Self, PolicyError> {
        Self::with_scrub_only(secrets, Vec::new())
    }

    /// [`Self::new`] plus retired secrets the sandbox never mounted (its organization's deleted
    /// secrets in their grace period): their values are scrubbed on the connections veil
    /// intercepts anyway, but their hosts never widen what is intercepted — a sandbox that
    /// never held their placeholder must not start seeing veil's CA because of them.
    pub fn with_scrub_only(
        secrets: Vec<MountedSecret>,
        scrub_only: Vec<MountedSecret>,
    ) -> Result<Self, PolicyError> {
        let deciding: Vec<String> = secrets.iter().map(|s| s.id.clone()).collect();
        let mut unique: Vec<MountedSecret> = Vec::with_capacity(secrets.len() + scrub_only.len());
        let scrub_only = scrub_only.into_iter().map(|mut s| {
            s.retired = true;
            s
        });
        for mut s in secrets.into_iter().chain(scrub_only) {
            if unique.iter().any(|u| u.id == s.id) {
                continue;
            }
            // An empty previous value has nothing to scrub.
            s.previous.retain(|v| !v.expose().is_empty());
            if !placeholder_is_url_safe(&s.placeholder) {
                return Err(PolicyError::Placeholder {
                    id: s.id,
                    name: s.name,
                });
            }
            if s.value.expose().is_empty() {
                return Err(PolicyError::EmptyValue {
                    id: s.id,
                    name: s.name,
                });
            }
            if let Some(other) = unique.iter().find(|u| {
                u.placeholder.contains(s.placeholder.as_str())
                    || s.placeholder.contains(u.placeholder.as_str())
            }) {
                return Err(PolicyError::PlaceholderOverlap {
                    first: other.name.clone(),
                    second: s.name,
                });
            }
            unique.push(s);
        }
        let decides = |s: &&MountedSecret| deciding.contains(&s.id);
        let mut patterns: Vec<HostPattern> = Vec::new();
        for p in unique.iter().filter(decides).flat_map(|s| s.hosts.iter()) {
            if !patterns.contains(p) {
                patterns.push(p.clone());
            }
        }
        let any_unrestricted = unique
            .iter()
            .filter(decides)
            .any(MountedSecret::unrestricted);
        let any_block = unique
            .iter()
            .any(|s| !s.retired && s.wrong_host == WrongHost::Block);
        // Scrub indexes follow this order: live secrets first, then retired ones.
        let (live, retired): (Vec<_>, Vec<_>) = unique.into_iter().partition(|s| !s.retired);
        let substituter = Substituter::new(&live);
        let scrub = ScrubPatterns::new(&[live.as_slice(), retired.as_slice()].concat());
        Ok(Self {
            secrets: live,
            retired,
            patterns,
            any_unrestricted,
            any_block,
            substituter,
            scrub,
        })
    }

    /// Builds the policy of `sandbox` from the secrets control sent (those it mounts are used;
    /// each must exist and belong to the sandbox's organization).
    pub fn for_sandbox(
        sandbox: &SandboxState,
        secrets: &[SecretState],
    ) -> Result<Self, PolicyError> {
        let mut mounted = Vec::with_capacity(sandbox.mounts.len());
        for id in sandbox.mounts.values() {
            let state =
                secrets
                    .iter()
                    .find(|s| s.id == *id)
                    .ok_or_else(|| PolicyError::MissingSecret {
                        sandbox: sandbox.id.to_string(),
                        id: id.to_string(),
                    })?;
            if state.org != sandbox.org {
                return Err(PolicyError::OrgMismatch {
                    sandbox: sandbox.id.to_string(),
                    id: state.id.to_string(),
                    name: state.name.clone(),
                });
            }
            mounted.push(MountedSecret::from_state(state)?);
        }
        Self::new(mounted)
    }

    /// The live mounted secrets, indexed as in reports ([`crate::substitute::SecretHit::secret`]).
    pub fn secrets(&self) -> &[MountedSecret] {
        &self.secrets
    }

    /// Retired secrets still scrubbed (after [`Self::secrets`] in scrub indexes).
    pub fn retired(&self) -> &[MountedSecret] {
        &self.retired
    }

    /// Whether responses must be scrubbed: some live or retired value is known.
    pub fn scrubs(&self) -> bool {
        !self.secrets.is_empty() || !self.retired.is_empty()
    }

    /// The response-scrubbing patterns of this sandbox.
    pub fn scrub_patterns(&self) -> &ScrubPatterns {
        &self.scrub
    }

    /// Whether the secret at `index` may be sent to `sni`.
    pub fn secret_allows(&self, index: usize, sni: &ServerName) -> bool {
        self.secrets
            .get(index)
            .is_some_and(|s| s.unrestricted() || s.hosts.iter().any(|p| p.matches_name(sni)))
    }

    /// Decides from a parsed ClientHello.
    pub fn decide_hello(&self, hello: &ClientHelloInfo) -> Decision {
        self.decide_hello_with(hello, ModeOverrides::default())
    }

    /// Decides from a parsed ClientHello, with the agent's mode overrides.
    pub fn decide_hello_with(&self, hello: &ClientHelloInfo, overrides: ModeOverrides) -> Decision {
        let alpn = hello.alpn_present.then_some(hello.alpn.as_slice());
        self.decide_with(hello.sni.as_ref(), alpn, overrides)
    }

    /// Decides for an SNI and an offered ALPN list (`None` = no ALPN extension).
    pub fn decide(&self, sni: Option<&ServerName>, alpn: Option<&[Vec<u8>]>) -> Decision {
        self.decide_with(sni, alpn, ModeOverrides::default())
    }

    /// Whether some mounted secret blocks hosts it does not allow.
    pub fn blocks_wrong_hosts(&self, overrides: ModeOverrides) -> bool {
        !self.secrets.is_empty() && (self.any_block || overrides.wrong_host == WrongHost::Block)
    }

    /// The secret a request must be refused for: the first of `hits` whose placeholder went to
    /// a host it does not allow while its effective mode is [`WrongHost::Block`].
    pub fn blocked_by(
        &self,
        hits: &[SecretHit],
        overrides: ModeOverrides,
    ) -> Option<&MountedSecret> {
        hits.iter()
            .filter(|h| h.wrong_host > 0)
            .filter_map(|h| self.secrets.get(h.secret))
            .find(|s| s.wrong_host_with(overrides) == WrongHost::Block)
    }

    /// [`Self::decide`] with the agent's mode overrides.
    pub fn decide_with(
        &self,
        sni: Option<&ServerName>,
        alpn: Option<&[Vec<u8>]>,
        overrides: ModeOverrides,
    ) -> Decision {
        if !self.scrubs()
            || (self.patterns.is_empty()
                && !self.any_unrestricted
                && !self.blocks_wrong_hosts(overrides))
        {
            return Decision::Passthrough(PassthroughReason::NoSecrets);
        }
        let Some(sni) = sni else {
            return Decision::Passthrough(PassthroughReason::NoSni);
        };
        let (offers_h2, offers_http1) = match alpn {
            None => (false, true),
            Some(list) => (
                list.iter().any(|p| p == ALPN_H2),
                list.iter().any(|p| p == ALPN_HTTP11),
            ),
        };
        if alpn.is_some() && !offers_h2 && !offers_http1 {
            return Decision::Passthrough(PassthroughReason::AlpnNotHttp);
        }
        if self.patterns.iter().any(|p| p.matches_name(sni)) {
            return Decision::Intercept(Intercept {
                offers_h2,
                offers_http1,
                host_match: true,
            });
        }
        if self.any_unrestricted || self.blocks_wrong_hosts(overrides) {
            if alpn.is_none() {
                return Decision::Passthrough(PassthroughReason::NoAlpn);
            }
            return Decision::Intercept(Intercept {
                offers_h2,
                offers_http1,
                host_match: false,
            });
        }
        Decision::Passthrough(PassthroughReason::HostNotAllowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_hello::{Peek, parse_client_hello};
    use crate::secret::testing::secret;
    use proptest::prelude::*;

    fn name(s: &str) -> ServerName {
        ServerName::parse(s).unwrap()
    }

    fn alpn(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    fn intercept(h2: bool, http1: bool, host_match: bool) -> Decision {
        Decision::Intercept(Intercept {
            offers_h2: h2,
            offers_http1: http1,
            host_match,
        })
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
        let p = SandboxPolicy::with_scrub_only(
            vec![secret("e", "live-value-3333333333", &["api.allowed.test"])],
            vec![other],
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
            p.decide(Some(&elsewhere), Some(&alpn(&["http/1.1"]))),
            Decision::Passthrough(HostNotAllowed),
            "an unrestricted secret never mounted here widened interception"
        );
        let mut only = secret("f", "deleted-value-222222", &[]);
        only.retired = true;
        let p = SandboxPolicy::with_scrub_only(vec![], vec![only]).unwrap();
        assert_eq!(
            p.decide(Some(&elsewhere), Some(&alpn(&["http/1.1"]))),
            Decision::Passthrough(NoSecrets)
        );
        // A sandbox holding only a retired secret it mounted is still intercepted for its
        // hosts (the value is scrubbed).
        let mut only = secret("c", "deleted-value-555555", &["api.allowed.test"]);
        only.retired = true;
        let p = SandboxPolicy::new(vec![only]).unwrap();
        assert!(p.secrets().is_empty() && p.scrubs());
        assert!(matches!(
            p.decide(Some(&sni), Some(&alpn(&["http/1.1"]))),
            Decision::Intercept(_)
        ));
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
            p.decide(Some(&name("a.test")), Some(&both)),
            Decision::Passthrough(NoSecrets)
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
            p.decide(Some(&name("api.allowed.test")), Some(&both)),
            intercept(true, true, true)
        );
        assert_eq!(
            p.decide(Some(&name("allowed.test")), Some(&h1)),
            intercept(false, true, true)
        );
        assert_eq!(
            p.decide(Some(&name("API.OTHER.test.")), Some(&h1)),
            intercept(false, true, true)
        );
        // No ALPN to an allowed host: HTTP/1.1 is assumed.
        assert_eq!(
            p.decide(Some(&name("api.allowed.test")), None),
            intercept(false, true, true)
        );
        assert_eq!(
            p.decide(Some(&name("api.allowed.test")), Some(&odd)),
            Decision::Passthrough(AlpnNotHttp)
        );
        assert_eq!(
            p.decide(Some(&name("x.other.test")), Some(&both)),
            Decision::Passthrough(HostNotAllowed)
        );
        assert_eq!(
            p.decide(Some(&name("allowed.test.evil")), Some(&both)),
            Decision::Passthrough(HostNotAllowed)
        );
        assert_eq!(p.decide(None, Some(&both)), Decision::Passthrough(NoSni));
    }

    #[test]
    fn unrestricted_secret_needs_http_alpn() {
        let p = SandboxPolicy::new(vec![secret("u", "v", &[])]).unwrap();
        let n = name("anything.test");
        assert_eq!(
            p.decide(Some(&n), Some(&alpn(&["h2"]))),
            intercept(true, false, false)
        );
        assert_eq!(
            p.decide(Some(&n), Some(&alpn(&["http/1.1"]))),
            intercept(false, true, false)
        );
        assert_eq!(p.decide(Some(&n), None), Decision::Passthrough(NoAlpn));
        assert_eq!(
            p.decide(Some(&n), Some(&alpn(&["h3", "spdy/3"]))),
            Decision::Passthrough(AlpnNotHttp)
        );
        assert_eq!(
            p.decide(None, Some(&alpn(&["h2"]))),
            Decision::Passthrough(NoSni)
        );
        // With a restricted secret beside it, its hosts intercept without ALPN.
        let p =
            SandboxPolicy::new(vec![secret("u", "v", &[]), secret("r", "w", &["r.test"])]).unwrap();
        assert_eq!(
            p.decide(Some(&name("r.test")), None),
            intercept(false, true, true)
        );
        assert_eq!(p.decide(Some(&n), None), Decision::Passthrough(NoAlpn));
        assert_eq!(
            p.decide(Some(&n), Some(&alpn(&["h2"]))),
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
            p.decide(Some(&other), Some(&h2)),
            intercept(true, false, false)
        );
        assert_eq!(p.decide(Some(&other), None), Decision::Passthrough(NoAlpn));
        assert_eq!(
            p.decide(Some(&other), Some(&alpn(&["imap"]))),
            Decision::Passthrough(AlpnNotHttp)
        );
        // Forward mode everywhere: hosts nobody allows pass through, unless the config blocks.
        let f = SandboxPolicy::new(vec![secret("f", "w", &["f.test"])]).unwrap();
        assert_eq!(
            f.decide(Some(&other), Some(&h2)),
            Decision::Passthrough(HostNotAllowed)
        );
        let block_all = ModeOverrides {
            wrong_host: WrongHost::Block,
            ..ModeOverrides::default()
        };
        assert_eq!(
            f.decide_with(Some(&other), Some(&h2), block_all),
            intercept(true, false, false)
        );
        assert!(
            !SandboxPolicy::new(vec![])
                .unwrap()
                .blocks_wrong_hosts(block_all)
        );

        let hit = |secret, wrong_host, substituted| SecretHit {
            secret,
            substituted,
            wrong_host,
            host_mismatch: 0,
        };
        let off = ModeOverrides::default();
        assert!(p.blocked_by(&[], off).is_none());
        assert!(p.blocked_by(&[hit(0, 2, 0)], off).is_none());
        assert!(p.blocked_by(&[hit(1, 0, 3)], off).is_none());
        assert_eq!(
            p.blocked_by(&[hit(0, 1, 0), hit(1, 1, 0)], off).unwrap().id,
            "b"
        );
        assert_eq!(p.blocked_by(&[hit(0, 1, 0)], block_all).unwrap().id, "f");
        assert!(p.blocked_by(&[hit(7, 1, 0)], block_all).is_none());
    }

    #[test]
    fn decides_on_real_hellos() {
        let p = SandboxPolicy::new(vec![secret("a", "v", &["*.allowed.test"])]).unwrap();
        let u = SandboxPolicy::new(vec![secret("u", "v", &[])]).unwrap();
        let cases: &[(&[u8], Decision, Decision)] = &[
            (
                include_bytes!("../testdata/curl_http2.bin"),
                intercept(true, true, true),
                intercept(true, true, false),
            ),
            (
                include_bytes!("../testdata/curl_http1.1.bin"),
                intercept(false, true, true),
                intercept(false, true, false),
            ),
            (
                include_bytes!("../testdata/openssl_tls12.bin"),
                intercept(false, true, true),
                Decision::Passthrough(NoAlpn),
            ),
            (
                include_bytes!("../testdata/openssl_nosni.bin"),
                Decision::Passthrough(NoSni),
                Decision::Passthrough(NoSni),
            ),
            (
                include_bytes!("../testdata/openssl_unicode_sni.bin"),
                intercept(false, true, true),
                Decision::Passthrough(NoAlpn),
            ),
        ];
        for (bytes, restricted, unrestricted) in cases {
            let Peek::Tls(hello) = parse_client_hello(bytes) else {
                panic!("not a hello")
            };
            assert_eq!(p.decide_hello(&hello), *restricted);
            assert_eq!(u.decide_hello(&hello), *unrestricted);
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
        let p =
            SandboxPolicy::new(vec![secret("a", "v", &["a.test"]), secret("u", "w", &[])]).unwrap();
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
        let p = SandboxPolicy::for_sandbox(&sb, &secrets).unwrap();
        assert_eq!(p.secrets().len(), 1);
        // "b" is unrestricted but not mounted here: other hosts stay untouched.
        let h2 = alpn(&["h2"]);
        assert_eq!(
            p.decide(Some(&name("b.test")), Some(&h2)),
            Decision::Passthrough(HostNotAllowed)
        );
        sb.mounts.insert("C".into(), "c".parse().unwrap());
        assert!(matches!(
            SandboxPolicy::for_sandbox(&sb, &secrets),
            Err(PolicyError::OrgMismatch { .. })
        ));
        sb.mounts.insert("C".into(), "zz".parse().unwrap());
        assert!(matches!(
            SandboxPolicy::for_sandbox(&sb, &secrets),
            Err(PolicyError::MissingSecret { .. })
        ));
        sb.mounts.clear();
        let p = SandboxPolicy::for_sandbox(&sb, &secrets).unwrap();
        assert_eq!(
            p.decide(Some(&name("a.test")), Some(&h2)),
            Decision::Passthrough(NoSecrets)
        );
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
            let p = SandboxPolicy::new(mounted.clone()).unwrap();
            let sni = sni.map(|s| name(&s));
            let alpn = protos.map(|l| alpn(&l));
            let overrides = ModeOverrides {
                wrong_host: if block_all { WrongHost::Block } else { WrongHost::Forward },
                ..ModeOverrides::default()
            };
            let d = p.decide_with(sni.as_ref(), alpn.as_deref(), overrides);
            let http = alpn.as_ref().is_none_or(|l| l.iter().any(|x| x == b"h2" || x == b"http/1.1"));
            let expect_intercept = match &sni {
                None => false,
                Some(n) => http && mounted.iter().any(|s| {
                    let blocks = s.wrong_host_with(overrides) == WrongHost::Block;
                    ((s.unrestricted() || blocks) && alpn.is_some())
                        || s.hosts.iter().any(|h| h.matches_name(n))
                }),
            };
            prop_assert_eq!(matches!(d, Decision::Intercept(_)), expect_intercept, "{:?}", d);
        }
    }
}
