//! Whether a sandbox's connects may skip the redirect (`SANDBOX_DIRECT` in its map entry).
//!
//! veil only changes a connection when a secret applies to its sandbox; without one, an
//! `egress: "sandbox"` connection would be passed through from the sandbox's own netns, which
//! is what the kernel does anyway, so the eBPF programs let it go where it was dialled. An
//! `egress: "host"` sandbox has no way out but veil and is always redirected. The agent clears
//! the flag before it acknowledges the change that gives a sandbox its first secret, so a
//! connection opened after control answers that change is redirected.

use proxy_common::{SANDBOX_DIRECT, SandboxTarget};
use veil_link::Egress;

/// Whether connects may go direct: no secret applies to the sandbox (`secrets_apply`: a mount,
/// or a policy such as a retired secret still scrubbed) and its egress is its own netns.
pub fn direct_allowed(secrets_apply: bool, egress: Egress) -> bool {
    !secrets_apply && egress == Egress::Sandbox
}

/// The map entry for listener ports `ports` (v4, v6) and the decision `direct`.
pub fn target(ports: (u16, u16), direct: bool) -> SandboxTarget {
    SandboxTarget {
        port_v4: ports.0,
        port_v6: ports.1,
        flags: if direct { SANDBOX_DIRECT } else { 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_secretless_sandbox_with_its_own_egress_goes_direct() {
        assert!(direct_allowed(false, Egress::Sandbox));
        assert!(!direct_allowed(true, Egress::Sandbox));
        assert!(
            !direct_allowed(false, Egress::Host),
            "veil is a host sandbox's only way out"
        );
        assert!(!direct_allowed(true, Egress::Host));
    }

    #[test]
    fn the_entry_carries_the_flag_and_zero_means_redirect() {
        assert!(target((1, 2), true).direct());
        let redirect = target((1, 2), false);
        assert!(!redirect.direct());
        assert_eq!(
            (redirect.port_v4, redirect.port_v6, redirect.flags),
            (1, 2, 0)
        );
        // What an older agent wrote (padding zero) keeps meaning redirect.
        let old = SandboxTarget {
            port_v4: 1,
            port_v6: 2,
            flags: 0,
        };
        assert!(!old.direct());
    }
}
