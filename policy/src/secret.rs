//! The secrets mounted in a sandbox, as the policy needs them, and redaction of derived bytes.

use std::fmt;

use veil_link::proto::{SecretState, SecretValue, WrongHost};
use zeroize::Zeroizing;

use crate::host::{HostPattern, HostPatternError};

/// One secret mounted in a sandbox: what to look for, what to put, and where it may go.
#[derive(Clone, Debug)]
pub struct MountedSecret {
    /// Secret id (for reports).
    pub id: String,
    /// Secret name (for messages; never the value).
    pub name: String,
    /// The placeholder the sandbox holds.
    pub placeholder: String,
    /// Allowed host patterns; empty = unrestricted.
    pub hosts: Vec<HostPattern>,
    /// The plaintext.
    pub value: SecretValue,
    /// Whether placeholders in request bodies are replaced too.
    pub body_substitution: bool,
    /// What happens to the placeholder in a request to a host the secret does not allow.
    pub wrong_host: WrongHost,
    /// Rotated-out values still inside control's grace period: scrubbed, never substituted.
    pub previous: Vec<SecretValue>,
    /// Deleted: `value` is its last value, scrubbed only; the placeholder is not honoured.
    pub retired: bool,
}

/// Why a sandbox's secrets cannot form a policy; names secrets, never values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A host pattern of a secret is invalid.
    #[error("secret {name} ({id}): host {host:?}: {source}")]
    Host {
        /// Secret id.
        id: String,
        /// Secret name.
        name: String,
        /// The offending pattern.
        host: String,
        /// What is wrong with it.
        source: HostPatternError,
    },
    /// A placeholder is empty or contains characters that are not URL-safe.
    #[error("secret {name} ({id}): placeholder must be non-empty and URL-safe ([A-Za-z0-9._~-])")]
    Placeholder {
        /// Secret id.
        id: String,
        /// Secret name.
        name: String,
    },
    /// The value is empty (it could not be scrubbed).
    #[error("secret {name} ({id}): value is empty")]
    EmptyValue {
        /// Secret id.
        id: String,
        /// Secret name.
        name: String,
    },
    /// A sandbox mounts a secret that was not provided.
    #[error("sandbox {sandbox}: mounted secret {id} is unknown")]
    MissingSecret {
        /// Sandbox id.
        sandbox: String,
        /// Secret id.
        id: String,
    },
    /// A sandbox mounts a secret of another organization.
    #[error("sandbox {sandbox}: secret {name} ({id}) belongs to another organization")]
    OrgMismatch {
        /// Sandbox id.
        sandbox: String,
        /// Secret id.
        id: String,
        /// Secret name.
        name: String,
    },
    /// Two mounted secrets share a placeholder, or one placeholder contains another.
    #[error("secrets {first} and {second}: placeholders overlap (one contains the other)")]
    PlaceholderOverlap {
        /// Name of one secret.
        first: String,
        /// Name of the other.
        second: String,
    },
}

impl MountedSecret {
    /// Builds the policy's view of a secret received from control, validating its hosts.
    pub fn from_state(state: &SecretState) -> Result<Self, PolicyError> {
        let hosts = state
            .hosts
            .iter()
            .map(|h| {
                HostPattern::parse(h).map_err(|source| PolicyError::Host {
                    id: state.id.to_string(),
                    name: state.name.clone(),
                    host: h.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            id: state.id.to_string(),
            name: state.name.clone(),
            placeholder: state.placeholder.clone(),
            hosts,
            value: state.value.clone(),
            body_substitution: state.body_substitution,
            wrong_host: state.wrong_host,
            previous: state.previous.clone(),
            retired: state.retired,
        })
    }

    /// Every value responses are scrubbed of: the current one, then the rotated-out ones.
    pub fn scrubbed_values(&self) -> impl Iterator<Item = &SecretValue> {
        std::iter::once(&self.value).chain(&self.previous)
    }

    /// Whether this secret may be sent to any host.
    pub fn unrestricted(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Whether placeholders in request bodies are replaced: the secret's own field, or the
    /// agent's config turning it on for every secret.
    pub fn body_substitution_with(&self, overrides: ModeOverrides) -> bool {
        self.body_substitution || overrides.body_substitution
    }

    /// What happens to this placeholder sent to a host the secret does not allow: `Block` when
    /// the secret or the agent's config says so.
    pub fn wrong_host_with(&self, overrides: ModeOverrides) -> WrongHost {
        if self.wrong_host == WrongHost::Block || overrides.wrong_host == WrongHost::Block {
            WrongHost::Block
        } else {
            WrongHost::Forward
        }
    }
}

/// Agent-wide settings that turn a request mode on for every secret (the agent's config). They
/// only ever make a secret stricter or its substitution wider; a secret's own field still
/// applies when the override is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModeOverrides {
    /// Body substitution for every secret.
    pub body_substitution: bool,
    /// `Block` = every secret blocks hosts it does not allow.
    pub wrong_host: WrongHost,
}

/// Whether a placeholder can appear literally in a URL (RFC 3986 unreserved characters).
pub(crate) fn placeholder_is_url_safe(p: &str) -> bool {
    !p.is_empty()
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Bytes that may contain a secret value: zeroized on drop, redacted in Debug.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Redacted(Zeroizing<Vec<u8>>);

impl Redacted {
    /// Wraps bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes, for writing onto the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Redacted {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redacted({} bytes)", self.0.len())
    }
}

/// A string that may contain a secret value: zeroized on drop, redacted in Debug.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedactedString(Zeroizing<String>);

impl RedactedString {
    /// Wraps a string.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The string, for writing onto the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedactedString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedactedString({} bytes)", self.0.len())
    }
}

/// Builders shared by this crate's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A mounted secret with id `id`, name `NAME_<id>`, placeholder `ph_<id>_placeholder`.
    pub(crate) fn secret(id: &str, value: &str, hosts: &[&str]) -> MountedSecret {
        MountedSecret {
            previous: Vec::new(),
            retired: false,
            id: id.to_owned(),
            name: format!("NAME_{id}"),
            placeholder: format!("ph_{id}_placeholder"),
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            value: SecretValue::new(value.to_owned()),
            body_substitution: false,
            wrong_host: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_state_validates_hosts_and_never_prints_values() {
        let mut state = SecretState {
            previous: Vec::new(),
            retired: false,
            id: "id1".parse().unwrap(),
            org: "o".parse().unwrap(),
            name: "OPENAI".into(),
            placeholder: "veil_ph_1".into(),
            hosts: vec!["*.Example.com".into(), "api.other.test".into()],
            value: SecretValue::new("sk-live-TOPSECRET".into()),
            revision: 1.into(),
            body_substitution: false,
            wrong_host: Default::default(),
        };
        let s = MountedSecret::from_state(&state).unwrap();
        assert_eq!(s.hosts[0].to_string(), "*.example.com");
        assert!(!s.unrestricted());
        assert!(!format!("{s:?}").contains("TOPSECRET"));
        state.hosts.push("https://x.test".into());
        let e = MountedSecret::from_state(&state).unwrap_err();
        assert!(matches!(e, PolicyError::Host { ref host, .. } if host == "https://x.test"));
        assert!(!format!("{e} {e:?}").contains("TOPSECRET"));
        let r = Redacted::new(b"TOPSECRET".to_vec());
        let rs = RedactedString::new("TOPSECRET".into());
        assert!(!format!("{r:?} {rs:?}").contains("TOPSECRET"));
        assert_eq!(r.as_bytes(), b"TOPSECRET");
    }

    #[test]
    fn effective_modes_are_the_secret_field_or_the_override() {
        use crate::secret::testing::secret;
        let mut s = secret("a", "v", &[]);
        let off = ModeOverrides::default();
        let on = ModeOverrides {
            body_substitution: true,
            wrong_host: WrongHost::Block,
        };
        for (field_body, field_block, o, body, block) in [
            (false, false, off, false, false),
            (true, false, off, true, false),
            (false, true, off, false, true),
            (false, false, on, true, true),
            (true, true, on, true, true),
        ] {
            s.body_substitution = field_body;
            s.wrong_host = if field_block {
                WrongHost::Block
            } else {
                WrongHost::Forward
            };
            assert_eq!(s.body_substitution_with(o), body);
            assert_eq!(s.wrong_host_with(o) == WrongHost::Block, block);
        }
    }

    #[test]
    fn url_safe_placeholders() {
        assert!(placeholder_is_url_safe("veil_0123abcdef-._~"));
        for bad in ["", "a b", "a/b", "a%20", "a?b", "ä", "a+b", "a=b"] {
            assert!(!placeholder_is_url_safe(bad), "{bad}");
        }
    }
}
