//! The agent's open-file limit: each intercepted connection holds two sockets (and a spliced
//! one a pipe too), so the default soft limit of 1,024 would cap a host at a few hundred
//! connections. The agent raises its soft limit to the hard limit at start; the service
//! unit sets the hard limit (`LimitNOFILE`).

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The open-file limits before and after [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileRaised {
    /// Soft limit found at start.
    pub before: u64,
    /// Soft limit now (the hard limit).
    pub now: u64,
}

/// The soft limit to ask for: the hard limit (never lower than the current soft limit).
pub fn target_soft(soft: u64, hard: u64) -> u64 {
    soft.max(hard)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_nofile() -> nix::Result<NofileRaised> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = target_soft(soft, hard);
    if want != soft {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    }
    Ok(NofileRaised {
        before: soft,
        now: want,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_to_the_hard_limit_never_down() {
        assert_eq!(target_soft(1024, 524_288), 524_288);
        assert_eq!(target_soft(4096, 4096), 4096);
        // An already higher soft limit (impossible for the kernel, but cheap) is kept.
        assert_eq!(target_soft(8192, 4096), 8192);
    }

    #[test]
    fn raising_ends_at_the_hard_limit() {
        let raised = raise_nofile().expect("raising RLIMIT_NOFILE");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!((raised.now, soft), (hard, hard));
        assert!(raised.before <= raised.now);
    }
}
