//! Daemon configuration: a TOML file where every key has a default that works on one host.
//!
//! ```toml
//! listen = "127.0.0.1:3900"
//! data_dir = "/var/lib/veil/control"
//! agent_socket = "/run/veil/control-agent.sock"
//! placeholder_prefix = "veil_secret_"
//! metrics_listen = "127.0.0.1:9464"
//! rotated_value_grace = "24h"
//! [sandbox]
//! cgroup_parents = ["veil.slice", "system.slice", "docker", "libpod_parent"]
//! check_paths = true
//! [agent]
//! required = true
//! timeout_ms = 5000
//! [run]
//! uid_range = [200000, 265535]
//! ```
//!
//! - `agent_socket`: the Unix socket veil-agents connect to (created 0600; a missing parent is
//!   created 0700). `serve --agent-socket` overrides it.
//! - `sandbox.check_paths`: before a sandbox is stored, its cgroup directory must exist under the
//!   cgroup2 mount and its netns file must be a network namespace. Turn off only where control
//!   does not see the sandboxes' host (API-only tests).
//! - `agent.required`: a sandbox PUT/DELETE succeeds only once a veil-agent acknowledged it; with
//!   no agent connected the PUT is a 503 that changes nothing. Production keeps the default
//!   (true); API-only tests turn it off.
//! - `agent.timeout_ms`: how long a REST call waits for the agents' acknowledgements.
//! - `run.uid_range`: the uids `veil-control run` gives its sandboxes, one each (first and last,
//!   inclusive). Read by `veil-control run --config` (default /etc/veil/control.toml); the
//!   daemon ignores it. Keep it clear of the host's users and of ranges other tools map.
//! - `rotated_value_grace`: how long a rotated-out value (at most the last
//!   [`veil_link::MAX_PREVIOUS_VALUES`]), and a deleted secret's last values, are still scrubbed
//!   from responses: a whole number with a unit `s`, `m`, `h` or `d` (`"90s"`, `"24h"`), at
//!   most 365 days; `"0"` turns it off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod fleet;
mod store;
pub use fleet::FleetConfig;
pub use store::{Backend, SYSTEM_CA_FILE, StoreConfig, StoreConfigError};

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parsing config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// The `[store]` table is not usable.
    #[error(transparent)]
    Store(#[from] StoreConfigError),
}

/// The whole daemon configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// REST listen address (loopback by default).
    pub listen: SocketAddr,
    /// Where the sled store, key files and admin socket live.
    pub data_dir: PathBuf,
    /// The local socket the agent(s) connect to.
    pub agent_socket: PathBuf,
    /// Prefix of generated placeholders.
    pub placeholder_prefix: String,
    /// Loopback address of the Prometheus `/metrics` endpoint; `""` turns it off.
    pub metrics_listen: String,
    /// How long rotated-out and deleted values are still scrubbed (default 24 h; 0 = off).
    pub rotated_value_grace: Grace,
    /// Sandbox registration rules.
    pub sandbox: SandboxConfig,
    /// Agent link behaviour.
    pub agent: AgentConfig,
    /// `veil-control run` settings.
    pub run: RunConfig,
    /// Where control's state lives (sled by default; PostgreSQL for replicas).
    pub store: StoreConfig,
    /// Agents of other hosts over mutual TLS (fleet mode; PostgreSQL only).
    pub fleet: FleetConfig,
    /// The file this configuration was read from (named in errors).
    #[serde(skip)]
    pub(crate) source: Option<PathBuf>,
}

/// Sandbox registration rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// cgroup v2 paths (relative to the cgroup2 root) under which sandboxes may be registered.
    pub cgroup_parents: Vec<String>,
    /// Whether the cgroup directory and netns file must exist on this host (default true).
    pub check_paths: bool,
}

/// Agent link behaviour.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// When true (default), sandbox changes fail unless a connected agent acknowledged them.
    pub required: bool,
    /// How long to wait for acknowledgements, in milliseconds (default 5000).
    pub timeout_ms: u64,
}

/// `veil-control run` settings (the daemon ignores them).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// First and last uid (inclusive) that `run` sandboxes get, one each.
    pub uid_range: [u32; 2],
}

/// Default `run.uid_range`.
pub const DEFAULT_RUN_UIDS: [u32; 2] = [200_000, 265_535];

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            uid_range: DEFAULT_RUN_UIDS,
        }
    }
}

impl RunConfig {
    /// The range as `run` uses it (valid once [`Config::validate`] passed).
    pub fn uid_range(&self) -> crate::run::uids::UidRange {
        crate::run::uids::UidRange {
            first: self.uid_range[0],
            last: self.uid_range[1],
        }
    }
}

/// A grace period as written in the config: `"0"`, or a whole number with a unit `s`, `m`,
/// `h` or `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Grace(pub Duration);

/// Default grace of rotated-out values.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted grace.
pub const MAX_GRACE: Duration = Duration::from_secs(365 * 24 * 3600);

impl Default for Grace {
    fn default() -> Self {
        Self(DEFAULT_GRACE)
    }
}

impl TryFrom<String> for Grace {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        parse_grace(&text).map(Grace).ok_or_else(|| {
            format!(
                "rotated_value_grace {text:?} is not a duration like \"24h\", \"30m\", \"90s\" \
                 or \"0\" (off), at most 365d"
            )
        })
    }
}

/// Parses `"0"` or `<digits><s|m|h|d>`; `None` when malformed or above [`MAX_GRACE`].
pub fn parse_grace(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let unit = match text.chars().last()? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    let digits = &text[..text.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = digits.parse::<u64>().ok()?.checked_mul(unit)?;
    let d = Duration::from_secs(secs);
    (d <= MAX_GRACE).then_some(d)
}

/// Default acknowledgement timeout.
pub const DEFAULT_AGENT_TIMEOUT_MS: u64 = 5000;

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            required: true,
            timeout_ms: DEFAULT_AGENT_TIMEOUT_MS,
        }
    }
}

/// Default address of the metrics endpoint (the agent's is the next port).
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";

/// Default REST port.
pub const DEFAULT_PORT: u16 = 3900;

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            data_dir: PathBuf::from("/var/lib/veil/control"),
            agent_socket: PathBuf::from("/run/veil/control-agent.sock"),
            placeholder_prefix: "veil_secret_".to_owned(),
            metrics_listen: DEFAULT_METRICS.to_owned(),
            rotated_value_grace: Grace::default(),
            sandbox: SandboxConfig::default(),
            agent: AgentConfig::default(),
            run: RunConfig::default(),
            store: StoreConfig::default(),
            fleet: FleetConfig::default(),
            source: None,
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            cgroup_parents: ["veil.slice", "system.slice", "docker", "libpod_parent"]
                .map(str::to_owned)
                .to_vec(),
            check_paths: true,
        }
    }
}

impl Config {
    /// Reads `path` if given, else the defaults; then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            None => Self::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source,
                })?
            }
        };
        config.source = path.map(Path::to_owned);
        config.validate()?;
        Ok(config)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.placeholder_prefix;
        if p.is_empty()
            || p.len() > 32
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::Invalid(
                "placeholder_prefix must be 1-32 characters of [A-Za-z0-9_-]".into(),
            ));
        }
        if !(1..=600_000).contains(&self.agent.timeout_ms) {
            return Err(ConfigError::Invalid(
                "agent.timeout_ms must be between 1 and 600000".into(),
            ));
        }
        if self.agent_socket.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "agent_socket must not be empty".into(),
            ));
        }
        if !self.metrics_listen.is_empty() && self.metrics_listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "metrics_listen {:?} is not an address:port (\"\" turns metrics off)",
                self.metrics_listen
            )));
        }
        let [first, last] = self.run.uid_range;
        // 0 is root; u32::MAX is (uid_t)-1, "no change" to setuid(2).
        if first == 0 || first > last || last == u32::MAX {
            return Err(ConfigError::Invalid(format!(
                "run.uid_range [{first}, {last}] must be [first, last] with 1 <= first <= last < {}",
                u32::MAX
            )));
        }
        self.store.validate(self.source.as_deref())?;
        self.fleet.validate().map_err(ConfigError::Invalid)?;
        // The fleet CA and the hosts live in the shared database, which every replica reads.
        if self.fleet.listen().is_some() && self.store.backend != Backend::Postgres {
            return Err(ConfigError::Invalid(
                "fleet.agent_listen needs [store] backend = \"postgres\" (the fleet CA and \
                 the enrolled hosts live in the shared database)"
                    .into(),
            ));
        }
        for parent in &self.sandbox.cgroup_parents {
            let trimmed = parent.trim_matches('/');
            if trimmed.is_empty()
                || trimmed
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..")
            {
                return Err(ConfigError::Invalid(format!(
                    "sandbox.cgroup_parents entry {parent:?} is not a relative cgroup path"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.listen.port(), DEFAULT_PORT);
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.placeholder_prefix, "veil_secret_");
        assert!(
            c.agent.required,
            "production must not register unenforced sandboxes"
        );
        assert_eq!(c.agent.timeout_ms, DEFAULT_AGENT_TIMEOUT_MS);
        assert!(c.sandbox.check_paths);
        assert_eq!(c.rotated_value_grace.0, DEFAULT_GRACE);
        c.validate().unwrap();
    }

    #[test]
    fn grace_parses_units_and_names_the_key_when_bad() {
        let grace = |t: &str| toml::from_str::<Config>(&format!("rotated_value_grace = {t}"));
        for (text, secs) in [
            ("\"0\"", 0),
            ("\"90s\"", 90),
            ("\"30m\"", 1800),
            ("\"24h\"", 86_400),
            ("\" 2d \"", 172_800),
            ("\"365d\"", 365 * 86_400),
        ] {
            let c = grace(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.rotated_value_grace.0, Duration::from_secs(secs), "{text}");
        }
        for bad in [
            "\"\"",
            "\"24\"",
            "\"h\"",
            "\"-1h\"",
            "\"1.5h\"",
            "\"1h30m\"",
            "\"366d\"",
            "\"99999999999999999999d\"",
            "\"0s0\"",
            "86400",
            "true",
        ] {
            let e = grace(bad).expect_err(bad).to_string();
            assert!(e.contains("rotated_value_grace"), "{bad}: {e}");
        }
    }

    #[test]
    fn partial_file_and_validation() {
        let c: Config =
            toml::from_str("placeholder_prefix = \"x_\"\n[sandbox]\ncgroup_parents = [\"a/b\"]\n")
                .unwrap();
        assert_eq!(c.placeholder_prefix, "x_");
        assert_eq!(c.sandbox.cgroup_parents, vec!["a/b"]);
        c.validate().unwrap();
        let bad: Config = toml::from_str("placeholder_prefix = \"a b\"").unwrap();
        assert!(bad.validate().is_err());
        let bad: Config = toml::from_str("[sandbox]\ncgroup_parents = [\"../x\"]").unwrap();
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<Config>("nope = 1").is_err());
        let c: Config = toml::from_str("[agent]\nrequired = false\ntimeout_ms = 250\n").unwrap();
        assert!(!c.agent.required);
        assert_eq!(c.agent.timeout_ms, 250);
        let bad: Config = toml::from_str("[agent]\ntimeout_ms = 0").unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn fleet_needs_postgres() {
        let c: Config = toml::from_str("[fleet]\nagent_listen = \"127.0.0.1:3901\"\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("fleet.agent_listen") && e.contains("postgres"),
            "{e}"
        );
        let c: Config = toml::from_str("[fleet]\nserver_names = [\"a b\"]\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("server_names")
        );
    }

    #[test]
    fn run_uid_range() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.run.uid_range, DEFAULT_RUN_UIDS);
        let c: Config = toml::from_str("[run]\nuid_range = [300000, 300009]\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.run.uid_range().first, 300_000);
        assert_eq!(c.run.uid_range().last, 300_009);
        for bad in ["[0, 10]", "[10, 9]", "[1, 4294967295]"] {
            let c: Config = toml::from_str(&format!("[run]\nuid_range = {bad}\n")).unwrap();
            assert!(c.validate().is_err(), "{bad} accepted");
        }
        assert!(toml::from_str::<Config>("[run]\nuid_range = [1]\n").is_err());
    }
}
