//! Write-only strings: a secret's value in a request, an API key in its creation answer.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// A secret value (or a new API key): wiped from memory when dropped, never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The value, for sealing or sending.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
}

impl From<Zeroizing<String>> for SecretValue {
    fn from(value: Zeroizing<String>) -> Self {
        Self(value)
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue(*** {} bytes)", self.0.len())
    }
}

impl utoipa::PartialSchema for SecretValue {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .write_only(Some(true))
            .into()
    }
}

impl utoipa::ToSchema for SecretValue {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let v = SecretValue::new("sk-live-abcdef");
        assert!(!format!("{v:?}").contains("abcdef"));
        assert_eq!(
            serde_json::to_string(&v).ok().as_deref(),
            Some("\"sk-live-abcdef\"")
        );
    }
}
