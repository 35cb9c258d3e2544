//! Pure validation of names and paths accepted by the API; messages name the problem and
//! never quote a value.

pub use veil_api::names::{MAX_NAME_LEN, env_name, secret_name};

/// Largest secret value in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Most host patterns per secret.
pub const MAX_HOSTS: usize = 100;

/// Why a field of a request is refused (each a 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// An empty secret value.
    #[error("value must not be empty")]
    EmptyValue,
    /// A secret value over [`MAX_VALUE_LEN`].
    #[error("value must be at most {MAX_VALUE_LEN} bytes")]
    ValueTooLong,
    /// A description over [`MAX_DESCRIPTION_LEN`].
    #[error("description must be at most {MAX_DESCRIPTION_LEN} characters")]
    DescriptionTooLong,
    /// An empty cgroup path.
    #[error("cgroup must not be empty")]
    EmptyCgroup,
    /// A cgroup path with empty, `.`, `..` or control-character components.
    #[error(
        "cgroup {0:?} must be a path relative to the cgroup2 root without empty, `.` or `..` components"
    )]
    CgroupPath(String),
    /// A cgroup outside every configured parent.
    #[error("cgroup {path:?} is not under a configured sandbox parent ({parents})")]
    CgroupParent {
        /// The cgroup as given.
        path: String,
        /// The configured parents, comma-separated.
        parents: String,
    },
    /// A netns path of neither accepted form.
    #[error("netns {0:?} must be /run/netns/<name> or /proc/<pid>/ns/net")]
    Netns(String),
    /// An unknown egress mode.
    #[error(
        "egress {0:?} must be \"sandbox\" (connections leave from the sandbox's own netns) or \"host\" (from the host, through the agent's egress rules)"
    )]
    Egress(String),
}

/// A secret value: non-empty, at most 64 KiB. The error never quotes the value.
pub fn secret_value(value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid::EmptyValue);
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(Invalid::ValueTooLong);
    }
    Ok(())
}

/// A description: at most 1024 characters.
pub fn description(text: &str) -> Result<(), Invalid> {
    if text.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(Invalid::DescriptionTooLong);
    }
    Ok(())
}

/// Normalises a cgroup v2 path (relative to the cgroup2 root; a leading `/` as in
/// `/proc/PID/cgroup` is accepted) and checks it lies strictly under one of `parents`; returns
/// it relative, without a leading `/`, so it can be joined onto the cgroup2 mount.
pub fn cgroup(path: &str, parents: &[String]) -> Result<String, Invalid> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    if trimmed.is_empty() {
        return Err(Invalid::EmptyCgroup);
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    if parts.iter().any(|p| {
        p.is_empty()
            || *p == "."
            || *p == ".."
            || p.bytes().any(|b| b.is_ascii_control() || b == b' ')
    }) {
        return Err(Invalid::CgroupPath(path.to_owned()));
    }
    let under = parents.iter().any(|parent| {
        let parent: Vec<&str> = parent.trim_matches('/').split('/').collect();
        parts.len() > parent.len() && parts[..parent.len()] == parent[..]
    });
    if !under {
        return Err(Invalid::CgroupParent {
            path: path.to_owned(),
            parents: parents.join(", "),
        });
    }
    Ok(parts.join("/"))
}

/// A network namespace path: `/run/netns/<name>` or `/proc/<pid>/ns/net`.
pub fn netns(path: &str) -> Result<(), Invalid> {
    let bad = || Invalid::Netns(path.to_owned());
    if let Some(name) = path.strip_prefix("/run/netns/") {
        let ok = !name.is_empty()
            && name != "."
            && name != ".."
            && name.len() <= 255
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        return if ok { Ok(()) } else { Err(bad()) };
    }
    if let Some(pid) = path
        .strip_prefix("/proc/")
        .and_then(|r| r.strip_suffix("/ns/net"))
    {
        let ok = !pid.is_empty()
            && pid.len() <= 10
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !pid.starts_with('0');
        return if ok { Ok(()) } else { Err(bad()) };
    }
    Err(bad())
}

/// A sandbox's `egress`: `"sandbox"` (its upstream connections leave from its own netns) or
/// `"host"` (from the host, through the agent's egress rules).
pub fn egress(text: &str) -> Result<veil_link::Egress, Invalid> {
    match text {
        "sandbox" => Ok(veil_link::Egress::Sandbox),
        "host" => Ok(veil_link::Egress::Host),
        other => Err(Invalid::Egress(other.to_owned())),
    }
}

/// The API spelling of an egress mode.
pub fn egress_name(egress: veil_link::Egress) -> &'static str {
    match egress {
        veil_link::Egress::Sandbox => "sandbox",
        veil_link::Egress::Host => "host",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "_", "A_b-9", "anthropic-prod", &"a".repeat(255)] {
            secret_name(ok).unwrap();
        }
        for bad in ["", "9a", "-a", "a b", "a.b", "ä", &"a".repeat(256)] {
            assert!(secret_name(bad).is_err(), "{bad}");
        }
        env_name("MY_KEY").unwrap();
        assert!(env_name("MY-KEY").is_err());
        assert!(env_name("1X").is_err());
    }

    #[test]
    fn egress_modes() {
        for e in [veil_link::Egress::Sandbox, veil_link::Egress::Host] {
            assert_eq!(egress(egress_name(e)), Ok(e));
        }
        for bad in ["", "Host", "none", "sandbox "] {
            let e = egress(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn values() {
        secret_value("x").unwrap();
        assert!(secret_value("").is_err());
        secret_value(&"x".repeat(MAX_VALUE_LEN)).unwrap();
        let err = secret_value(&"s3cr3t".repeat(20_000))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("s3cr3t"));
    }

    #[test]
    fn cgroups() {
        let parents = vec!["veil.slice".to_owned(), "system.slice".to_owned()];
        assert_eq!(
            cgroup("veil.slice/sb1", &parents).unwrap(),
            "veil.slice/sb1"
        );
        assert_eq!(
            cgroup("/system.slice/docker-1.scope", &parents).unwrap(),
            "system.slice/docker-1.scope"
        );
        assert!(cgroup("/veil.slice", &parents).is_err());
        assert!(cgroup("/veil.slice/../x", &parents).is_err());
        assert!(cgroup("/veil.slicex/a", &parents).is_err());
        assert!(cgroup("/user.slice/a", &parents).is_err());
        assert!(cgroup("veil.slice//a", &parents).is_err());
        assert!(cgroup("", &parents).is_err());
    }

    #[test]
    fn netns_paths() {
        netns("/run/netns/sb1").unwrap();
        netns("/proc/1234/ns/net").unwrap();
        for bad in [
            "/run/netns/",
            "/run/netns/../x",
            "/run/netns/a/b",
            "/proc/self/ns/net",
            "/proc/0/ns/net",
            "/tmp/x",
            "/proc/12/ns/mnt",
        ] {
            assert!(netns(bad).is_err(), "{bad}");
        }
    }
}
