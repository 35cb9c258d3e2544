//! Identities shared by control, the agents and their messages, each with its one validation
//! rule: a value of these types has been checked, so code that holds one never checks again.
//!
//! Text ids are ASCII (they end up in logs, paths, map keys and metrics labels); they
//! deserialize through the same check, so a malformed id on the wire or on disk is an error,
//! never a value of the type.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a text is not a valid id; names the kind and the rule, and repeats the text only when it
/// is short and printable (ids are never secret, but they may come from anyone).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {shown}must be {rule}")]
pub struct IdError {
    kind: &'static str,
    rule: &'static str,
    shown: String,
}

impl IdError {
    fn new(kind: &'static str, rule: &'static str, text: &str) -> Self {
        let printable = text.len() <= 160 && text.bytes().all(|b| b.is_ascii_graphic());
        let shown = if printable {
            format!("{text:?} ")
        } else {
            String::new()
        };
        Self { kind, rule, shown }
    }
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]*$` of at most `max` bytes.
fn is_name(s: &str, max: usize) -> bool {
    let mut bytes = s.bytes();
    s.len() <= max
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $rule:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// What the text must look like, for messages.
            pub const RULE: &'static str = $rule;

            /// Checks `text` against the rule.
            pub fn parse(text: impl Into<String>) -> Result<Self, IdError> {
                let text = text.into();
                let check: fn(&str) -> bool = $check;
                if check(&text) {
                    Ok(Self(text))
                } else {
                    Err(IdError::new($kind, $rule, &text))
                }
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(text: String) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(text: &str) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

text_id!(
    /// A sandbox, unique across organizations (chosen by the runner that registers it).
    SandboxId,
    "sandbox id",
    "1-128 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit",
    |s| is_name(s, 128)
);

text_id!(
    /// An organization (its name).
    OrgId,
    "organization",
    "1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit",
    |s| is_name(s, 64)
);

text_id!(
    /// A secret, unique across organizations (control makes them: UUIDs).
    SecretId,
    "secret id",
    "1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit",
    |s| is_name(s, 64)
);

text_id!(
    /// An agent's stable identity (kept in its state directory).
    AgentId,
    "agent id",
    "32 lowercase hexadecimal digits",
    |s| s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
);

/// A secret's revision: bumped on every change of the secret; what agents acknowledge.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl Revision {
    /// The revision after this one.
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq<u64> for Revision {
    fn eq(&self, other: &u64) -> bool {
        self.0 == *other
    }
}

impl From<u64> for Revision {
    fn from(n: u64) -> Self {
        Self(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sandbox_ids_follow_one_rule() {
        let (longest, too_long) = ("x".repeat(128), "x".repeat(129));
        for ok in ["a", "A9", "run-123-ab_c.d", &longest] {
            assert!(SandboxId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "_a", "a/b", "a b", "é", &too_long] {
            let e = SandboxId::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("sandbox id"), "{e}");
        }
        assert!(AgentId::parse("0123456789abcdef0123456789abcdef").is_ok());
        assert!(AgentId::parse("0123456789ABCDEF0123456789abcdef").is_err());
        assert!(OrgId::parse("x".repeat(65)).is_err());
    }

    #[test]
    fn malformed_ids_do_not_deserialize() {
        let id: SandboxId = serde_json::from_str("\"sb-1\"").unwrap();
        assert_eq!(id, "sb-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"sb-1\"");
        let err = serde_json::from_str::<SandboxId>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("sandbox id"), "{err}");
        let r: Revision = serde_json::from_str("7").unwrap();
        assert_eq!(r.next(), Revision(8));
    }

    #[test]
    fn errors_do_not_repeat_unprintable_or_long_text() {
        let e = SandboxId::parse("a\nb").unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        let e = SandboxId::parse("y".repeat(500)).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
    }

    proptest! {
        #[test]
        fn parse_round_trips_through_display(s in "[A-Za-z0-9][A-Za-z0-9_.-]{0,60}") {
            let id = SandboxId::parse(s.clone()).unwrap();
            prop_assert_eq!(id.to_string(), s.clone());
            let secret: SecretId = s.parse().unwrap();
            prop_assert_eq!(secret.as_str(), s.as_str());
        }
    }
}
