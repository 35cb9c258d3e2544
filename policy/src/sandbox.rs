//! One sandbox's policy: everything the agent decides for it, precomputed from its mounted
//! secrets and the agent-wide [`ModeOverrides`].
//!
//! A [`SandboxPolicy`] is built once per sandbox (whenever its mounts or secrets change), with
//! the overrides fixed at construction, and consulted per connection ([`SandboxPolicy::decide`],
//! see [`crate::decide`]), per request ([`SandboxPolicy::begin_request`], see
//! [`crate::substitute`] and [`crate::body`]) and per response ([`SandboxPolicy::scrub_patterns`],
//! see [`crate::scrub`]).
//!
//! Per request, [`SandboxPolicy::blocked_by`] says whether a request must be answered 403
//! instead of being forwarded: a placeholder of a blocking secret went to a host it does not
//! allow.

use veil_link::proto::{SandboxState, SecretState, WrongHost};

use crate::body::{BodyKind, BodySubstitution};
use crate::client_hello::ClientHelloInfo;
use crate::decide::{Decision, Interception};
use crate::host::{HostPattern, ServerName};
use crate::scrub::ScrubPatterns;
use crate::secret::{ModeOverrides, MountedSecret, PolicyError, placeholder_is_url_safe};
use crate::substitute::{
    RequestSubstitution, RequestView, SecretHit, SubstituteError, Substituter, Substitution,
};

/// Everything the agent decides for one sandbox, precomputed from its mounted secrets.
#[derive(Debug)]
pub struct SandboxPolicy {
    /// Live secrets (their placeholders are substituted) and the agent's modes.
    substituter: Substituter,
    /// Retired (deleted) secrets inside their grace period: scrubbed and intercepted for, never
    /// substituted.
    retired: Vec<MountedSecret>,
    interception: Interception,
    scrub: ScrubPatterns,
}

impl SandboxPolicy {
    /// Builds the policy from the secrets mounted in a sandbox (each once; duplicates by id
    /// are merged), without agent-wide modes.
    pub fn new(secrets: Vec<MountedSecret>) -> Result<Self, PolicyError> {
        Self::build(secrets, Vec::new(), ModeOverrides::default())
    }

    /// [`Self::new`] plus retired secrets the sandbox never mounted (its organization's deleted
    /// secrets in their grace period), under the agent's `overrides`. The retired secrets'
    /// values are scrubbed on the connections veil intercepts anyway, but their hosts never
    /// widen what is intercepted — a sandbox that never held their placeholder must not start
    /// seeing veil's CA because of them.
    pub fn build(
        secrets: Vec<MountedSecret>,
        scrub_only: Vec<MountedSecret>,
        overrides: ModeOverrides,
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
        // Scrub indexes follow this order: live secrets first, then retired ones.
        let (live, retired): (Vec<_>, Vec<_>) = unique.into_iter().partition(|s| !s.retired);
        let blocks = blocks_wrong_hosts(&live, overrides);
        let scrub = ScrubPatterns::new(&[live.as_slice(), retired.as_slice()].concat());
        let scrubs = !live.is_empty() || !retired.is_empty();
        let interception = Interception {
            active: scrubs && (!patterns.is_empty() || any_unrestricted || blocks),
            patterns,
            any_host: any_unrestricted || blocks,
        };
        Ok(Self {
            substituter: Substituter::new(live, overrides),
            retired,
            interception,
            scrub,
        })
    }

    /// Builds the policy of `sandbox` from the secrets control sent (those it mounts are used;
    /// each must exist and belong to the sandbox's organization).
    pub fn for_sandbox(
        sandbox: &SandboxState,
        secrets: &[SecretState],
        overrides: ModeOverrides,
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
        Self::build(mounted, Vec::new(), overrides)
    }

    /// The live mounted secrets, indexed as in reports ([`SecretHit::secret`]).
    pub fn secrets(&self) -> &[MountedSecret] {
        self.substituter.secrets()
    }

    /// Retired secrets still scrubbed (after [`Self::secrets`] in scrub indexes).
    pub fn retired(&self) -> &[MountedSecret] {
        &self.retired
    }

    /// The agent-wide modes this policy was built with.
    pub fn overrides(&self) -> ModeOverrides {
        self.substituter.overrides()
    }

    /// Whether responses must be scrubbed: some live or retired value is known.
    pub fn scrubs(&self) -> bool {
        !self.secrets().is_empty() || !self.retired.is_empty()
    }

    /// The response-scrubbing patterns of this sandbox.
    pub fn scrub_patterns(&self) -> &ScrubPatterns {
        &self.scrub
    }

    /// The patterns of a response that started under this policy and goes on under `now`:
    /// every value either scrubs. A stream switched to them keeps its held-back bytes, which
    /// are rescanned (they are raw input).
    pub fn scrub_union(&self, now: &SandboxPolicy) -> ScrubPatterns {
        let secrets: Vec<MountedSecret> = [self, now]
            .iter()
            .flat_map(|p| p.secrets().iter().chain(p.retired()))
            .cloned()
            .collect();
        ScrubPatterns::new(&secrets)
    }

    /// Whether the secret at `index` may be sent to `sni`.
    pub fn secret_allows(&self, index: usize, sni: &ServerName) -> bool {
        self.substituter.allows(index, sni)
    }

    /// Intercept or pass through the connection that sent `hello`; an intercept decision
    /// carries the hello's server name.
    pub fn decide(&self, hello: ClientHelloInfo) -> Decision {
        self.interception.decide(hello)
    }

    /// Whether some mounted secret blocks hosts it does not allow.
    pub fn blocks_wrong_hosts(&self) -> bool {
        blocks_wrong_hosts(self.secrets(), self.overrides())
    }

    /// The secret a request must be refused for: the first of `hits` whose placeholder went to
    /// a host it does not allow while its effective mode is [`WrongHost::Block`].
    pub fn blocked_by(&self, hits: &[SecretHit]) -> Option<&MountedSecret> {
        let overrides = self.overrides();
        hits.iter()
            .filter(|h| h.wrong_host > 0)
            .filter_map(|h| self.secrets().get(h.secret))
            .find(|s| s.wrong_host_with(overrides) == WrongHost::Block)
    }

    /// Starts substitution for a request on a connection intercepted for `sni` whose original
    /// destination port is `port`. `authorities` are the request's `:authority` and every Host
    /// header; all must name the SNI (see [`ServerName::matches_authority`]), and a request
    /// with none gets nothing substituted.
    pub fn begin_request<'p, 'a, I>(
        &'p self,
        sni: &'p ServerName,
        port: u16,
        authorities: I,
    ) -> RequestSubstitution<'p>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        self.substituter.begin_request(sni, port, authorities)
    }

    /// Substitutes placeholders in a whole request view, on a connection intercepted for `sni`
    /// to port `port`.
    pub fn substitute(
        &self,
        sni: &ServerName,
        port: u16,
        req: &RequestView<'_>,
    ) -> Result<Substitution, SubstituteError> {
        self.substituter.substitute(sni, port, req)
    }

    /// Whether a request body to `sni` is worth reading (see [`crate::body`]).
    pub fn body_scan_needed(&self, sni: &ServerName) -> bool {
        self.substituter.body_scan_needed(sni)
    }

    /// Substitutes placeholders in a whole request body of `kind` sent to `sni`; `host_ok` is
    /// whether the request's authorities name the SNI (see [`Self::begin_request`]).
    pub fn substitute_body(
        &self,
        sni: &ServerName,
        host_ok: bool,
        kind: BodyKind,
        body: &[u8],
    ) -> Result<BodySubstitution, SubstituteError> {
        self.substituter.substitute_body(sni, host_ok, kind, body)
    }
}

/// Whether some of the live `secrets` blocks hosts it does not allow.
fn blocks_wrong_hosts(secrets: &[MountedSecret], overrides: ModeOverrides) -> bool {
    secrets
        .iter()
        .any(|s| s.wrong_host_with(overrides) == WrongHost::Block)
}

#[cfg(test)]
mod tests;
