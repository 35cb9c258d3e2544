//! The agent's configuration: a TOML file, every key defaulted, flags override it.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the agent looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/veil/agent.toml";
/// Default state directory (the interception CA lives here once interception exists).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/veil/agent";
/// Default path of veil-control's local socket for agents.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/veil/control-agent.sock";
/// Default bpffs directory of the pinned maps and links (bpffs is mounted at /sys/fs/bpf when
/// it is not).
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/veil";

/// A configuration that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// What is wrong, from the TOML parser.
        message: String,
    },
    /// A value is out of its allowed range or shape.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole agent configuration. Sandboxes are not configured here: they come from
/// veil-control over the control socket only.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings.
    #[serde(default)]
    pub agent: AgentSettings,
}

/// Process-wide settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// How long SIGTERM waits for open connections before cutting them.
    pub drain_timeout_ms: u64,
    /// Timeout for connecting to a sandbox connection's original destination.
    pub connect_timeout_ms: u64,
    /// State directory (0700): agent id, interception CA, the non-secret sandbox set.
    pub state_dir: PathBuf,
    /// Listen backlog of each sandbox listener.
    pub listen_backlog: u32,
    /// veil-control's local socket for agents.
    pub control_socket: PathBuf,
    /// Extra CA certificates (PEM files) trusted for upstream TLS, beside the system roots.
    pub upstream_ca: Vec<PathBuf>,
    /// bpffs directory for the pinned maps and links; one per agent (tests use one each).
    pub bpf_pin_dir: PathBuf,
    /// First delay before reconnecting to control; doubled per failure up to the maximum.
    pub reconnect_min_ms: u64,
    /// Longest delay between reconnection attempts.
    pub reconnect_max_ms: u64,
    /// How long the agent waits for a complete TLS ClientHello before passing the connection
    /// through untouched (server-speaks-first protocols wait this long once).
    pub peek_timeout_ms: u64,
    /// Number of server names whose leaf certificates are kept (shared by every sandbox).
    pub leaf_cache_size: usize,
    /// System CA bundle trusted for upstream TLS (beside `upstream_ca`); a missing file means
    /// only `upstream_ca` is trusted.
    pub system_roots: PathBuf,
    /// Replace mounted values in intercepted responses by their placeholders. Turn off only
    /// to measure what scrubbing costs: without it an upstream that echoes a value leaks it.
    pub scrub_responses: bool,
    /// Loopback address of the Prometheus `/metrics` endpoint; absent = no endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
            connect_timeout_ms: 10_000,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            listen_backlog: 4096,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            upstream_ca: Vec::new(),
            bpf_pin_dir: PathBuf::from(DEFAULT_BPF_PIN_DIR),
            reconnect_min_ms: 25,
            reconnect_max_ms: 1_000,
            peek_timeout_ms: 5_000,
            leaf_cache_size: crate::tls::leaf::DEFAULT_LEAF_CACHE,
            system_roots: PathBuf::from(crate::tls::upstream::SYSTEM_ROOTS),
            scrub_responses: true,
            metrics_listen: None,
        }
    }
}

impl AgentSettings {
    /// [`Self::drain_timeout_ms`] as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// [`Self::connect_timeout_ms`] as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// [`Self::peek_timeout_ms`] as a duration.
    pub fn peek_timeout(&self) -> Duration {
        Duration::from_millis(self.peek_timeout_ms)
    }

    /// The reconnection backoff bounds.
    pub fn reconnect(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.reconnect_min_ms),
            Duration::from_millis(self.reconnect_max_ms),
        )
    }
}

/// A sandbox's identifier: 1–128 of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct SandboxId(String);

impl SandboxId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SandboxId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s))
        } else {
            Err(format!(
                "sandbox id {s:?} must be 1-128 characters of A-Z a-z 0-9 _ . -"
            ))
        }
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One sandbox as the agent enforces it: its cgroup and, unless it shares the agent's, its
/// network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Unique id.
    pub id: SandboxId,
    /// Organization the sandbox belongs to.
    pub org: String,
    /// cgroup v2 directory, absolute (below the cgroup2 mount).
    pub cgroup: PathBuf,
    /// Network namespace file (`/run/netns/NAME` or `/proc/PID/ns/net`); absent = the agent's.
    pub netns: Option<PathBuf>,
}

impl SandboxSpec {
    /// Validates a sandbox as control sent it; `cgroup` is resolved against `cgroup2_mount`.
    pub fn from_state(
        state: &veil_link::SandboxState,
        cgroup2_mount: &Path,
    ) -> Result<Self, String> {
        let id = SandboxId::try_from(state.id.clone())?;
        let cgroup = resolve_cgroup(&state.cgroup, cgroup2_mount)
            .map_err(|why| format!("sandbox {id}: {why}"))?;
        if let Some(netns) = &state.netns
            && !netns.is_absolute()
        {
            return Err(format!(
                "sandbox {id}: netns {} must be an absolute path",
                netns.display()
            ));
        }
        Ok(Self {
            id,
            org: state.org.clone(),
            cgroup,
            netns: state.netns.clone(),
        })
    }

    /// Whether `other` needs the sandbox re-attached (another cgroup or netns).
    pub fn same_placement(&self, other: &SandboxSpec) -> bool {
        self.cgroup == other.cgroup && self.netns == other.netns
    }
}

impl Config {
    /// Reads and validates `path`; cgroup paths are resolved against `cgroup2_mount`.
    pub fn load(path: &Path, cgroup2_mount: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, cgroup2_mount).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text; cgroup paths are resolved against `cgroup2_mount`.
    pub fn parse(text: &str, cgroup2_mount: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.message().to_owned(),
        })?;
        config.validate(cgroup2_mount)?;
        Ok(config)
    }

    fn validate(&mut self, _cgroup2_mount: &Path) -> Result<(), ConfigError> {
        let a = &self.agent;
        if a.listen_backlog == 0 {
            return Err(ConfigError::Invalid(
                "agent.listen_backlog must be > 0".into(),
            ));
        }
        if a.reconnect_min_ms == 0 || a.reconnect_min_ms > a.reconnect_max_ms {
            return Err(ConfigError::Invalid(
                "agent.reconnect_min_ms must be > 0 and <= agent.reconnect_max_ms".into(),
            ));
        }
        if a.peek_timeout_ms == 0 || a.leaf_cache_size == 0 {
            return Err(ConfigError::Invalid(
                "agent.peek_timeout_ms and agent.leaf_cache_size must be > 0".into(),
            ));
        }
        if !a.bpf_pin_dir.is_absolute() || !a.state_dir.is_absolute() {
            return Err(ConfigError::Invalid(
                "agent.bpf_pin_dir and agent.state_dir must be absolute paths".into(),
            ));
        }
        Ok(())
    }
}

/// Resolves a configured cgroup path to an absolute directory strictly below the cgroup2 mount.
pub fn resolve_cgroup(cgroup: &Path, mount: &Path) -> Result<PathBuf, String> {
    let rel = if cgroup.is_absolute() {
        cgroup.strip_prefix(mount).map_err(|_| {
            format!(
                "cgroup {} is not under the cgroup2 mount {}",
                cgroup.display(),
                mount.display()
            )
        })?
    } else {
        cgroup
    };
    if rel.as_os_str().is_empty() {
        return Err("cgroup must not be the cgroup2 root".into());
    }
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!(
            "cgroup {} must not contain '.', '..' or a root",
            cgroup.display()
        ));
    }
    Ok(mount.join(rel))
}

/// Finds the cgroup v2 mount point in a `/proc/self/mounts`-format text.
pub fn cgroup2_mount_from(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount(dir)))
    })
}

/// Finds the cgroup v2 mount point of this process.
pub fn cgroup2_mount() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    cgroup2_mount_from(&mounts).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no cgroup2 file system is mounted (veil needs cgroup v2)",
        )
    })
}

/// Undoes the octal escapes (`\040` for a space) of /proc/self/mounts.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MNT: &str = "/sys/fs/cgroup/unified";

    #[test]
    fn empty_config_is_valid_with_defaults() {
        let c = Config::parse("", Path::new(MNT)).unwrap();
        assert_eq!(c.agent, AgentSettings::default());
        assert_eq!(c.agent.bpf_pin_dir, Path::new(DEFAULT_BPF_PIN_DIR));
    }

    fn state(id: &str, cgroup: &str, netns: Option<&str>) -> veil_link::SandboxState {
        veil_link::SandboxState {
            id: id.into(),
            org: "o".into(),
            cgroup: cgroup.into(),
            netns: netns.map(PathBuf::from),
            mounts: Default::default(),
        }
    }

    #[test]
    fn sandbox_cgroups_resolve_under_the_mount() {
        let s = SandboxSpec::from_state(
            &state("a", "system.slice/docker-1.scope", None),
            Path::new(MNT),
        )
        .unwrap();
        assert_eq!(
            s.cgroup,
            Path::new("/sys/fs/cgroup/unified/system.slice/docker-1.scope")
        );
        let s = SandboxSpec::from_state(
            &state("b", "/sys/fs/cgroup/unified/x/y", Some("/run/netns/b")),
            Path::new(MNT),
        )
        .unwrap();
        assert_eq!(s.cgroup, Path::new("/sys/fs/cgroup/unified/x/y"));
        assert_eq!(s.netns.as_deref(), Some(Path::new("/run/netns/b")));
    }

    #[test]
    fn rejects_bad_sandboxes() {
        for (id, cgroup, netns) in [
            ("a", "../etc", None),
            ("a", "/sys/fs/cgroup/other", None),
            ("a", "/sys/fs/cgroup/unified", None),
            ("a b", "x", None),
            ("a", "x", Some("run/netns/a")),
        ] {
            assert!(
                SandboxSpec::from_state(&state(id, cgroup, netns), Path::new(MNT)).is_err(),
                "accepted {id} {cgroup} {netns:?}"
            );
        }
    }

    #[test]
    fn rejects_static_sandboxes_unknown_keys_and_bad_values() {
        let bad = [
            "[[sandbox]]\nid = \"a\"\ncgroup = \"x\"",
            "[agent]\nbogus = 1",
            "[agent]\nlisten_backlog = 0",
            "[agent]\nreconnect_min_ms = 0",
            "[agent]\nreconnect_min_ms = 2000\nreconnect_max_ms = 1000",
            "[agent]\nbpf_pin_dir = \"rel/dir\"",
            "[agent]\npeek_timeout_ms = 0",
            "[agent]\nleaf_cache_size = 0",
        ];
        for text in bad {
            assert!(
                Config::parse(text, Path::new(MNT)).is_err(),
                "accepted: {text}"
            );
        }
        let c = Config::parse(
            "[agent]\nbpf_pin_dir = \"/sys/fs/bpf/t1\"\nreconnect_max_ms = 500",
            Path::new(MNT),
        )
        .unwrap();
        assert_eq!(c.agent.bpf_pin_dir, Path::new("/sys/fs/bpf/t1"));
        assert_eq!(c.agent.reconnect().1, Duration::from_millis(500));
    }

    #[test]
    fn finds_cgroup2_mount_and_unescapes_it() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/my\\040dir cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_from(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/my dir"))
        );
        assert_eq!(cgroup2_mount_from("sysfs /sys sysfs rw 0 0\n"), None);
    }
}
