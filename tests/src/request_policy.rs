//! The request-policy world (issue 6): an [`InterceptWorld`] whose upstream answers for two
//! names, with a body-substitution bound, a metrics endpoint and agent config of the test's
//! choosing. Shared by the request_* scenario files (body substitution, wrong host, limits,
//! upgrades); their output is redacted, so no value is ever printed.

use crate::Seen;
pub use crate::intercept_world::{InterceptWorld as Setup, Secret, TIMEOUT};

/// The host the tests' secrets allow.
pub const ALLOWED: &str = "api.allowed.test";
/// Another host the upstream answers for, which the secrets do not allow.
pub const OTHER: &str = "other.test";
/// The body bound the tests configure.
pub const BODY_MAX: usize = 4096;

/// A TLS upstream for [`ALLOWED`] and [`OTHER`] and veil with metrics, the body bound and
/// `extra` appended to the agent's config.
pub fn setup(extra: &str) -> Setup {
    Setup::builder("request policy test CA", &[ALLOWED, OTHER])
        .metrics()
        .config(&format!(
            "body_substitution_max_bytes = {BODY_MAX}\n{extra}"
        ))
        .start()
}

/// The last request the upstream saw for `target`.
pub fn last_for(seen: &[Seen], target: &str) -> Seen {
    seen.iter()
        .rev()
        .find(|s| s.target == target)
        .cloned()
        .unwrap_or_else(|| panic!("the upstream saw no request for {target}"))
}
