//! The agent's configuration: a TOML file, every key defaulted, flags override it.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use veil_link::proto::WrongHost;
use veil_policy::ModeOverrides;

use crate::egress::{self, EgressRules};

/// The Debian/Ubuntu system bundle of trusted roots (the default of `system_roots`).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

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
    /// The local binding socket where host-side tools (the OCI hook) bind declared sandboxes
    /// (created 0600 in a 0700 directory; peers must be root or the agent's user); empty
    /// disables it. Network namespaces of bound sandboxes are pinned in `netns/` beside it.
    pub local_socket: PathBuf,
    /// Fleet mode: the replicas' `host:port` (mutual TLS), tried in order; excludes a
    /// non-default `control_socket`.
    pub control_urls: Vec<String>,
    /// This host's certificate (PEM, from `veil-control fleet enroll`), for `control_urls`;
    /// empty = none.
    pub control_cert: PathBuf,
    /// This host's private key (PEM), for `control_urls`; empty = none.
    pub control_key: PathBuf,
    /// The fleet CA (PEM): replicas must present a certificate it issued for the URL's name;
    /// empty = none.
    pub control_ca: PathBuf,
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
    /// Replace placeholders in request bodies (JSON, form, text) for every secret; when false
    /// (the default) only secrets created with `bodySubstitution: true` get it.
    pub body_substitution: bool,
    /// What a placeholder sent to a host its secret does not allow does, for every secret:
    /// `"forward"` (the default, Daytona's behaviour: sent on unchanged) or `"block"` (the
    /// request is answered 403 naming the secret and control records an audit event). A secret
    /// created with `wrongHost: "block"` blocks whatever this says.
    pub wrong_host: WrongHost,
    /// Largest request body read for substitution, in bytes; a larger one is forwarded unchanged
    /// (counted as `body_too_large`), so placeholders beyond it are neither replaced nor blocked.
    pub body_substitution_max_bytes: usize,
    /// Largest request head a sandbox may send on an intercepted connection, in bytes (HTTP/1.1
    /// read buffer, h2 header list); at least 8192. Larger heads are refused (431 / stream error).
    pub max_header_bytes: usize,
    /// How long a sandbox's client has to complete its TLS handshake with veil.
    pub handshake_timeout_ms: u64,
    /// An intercepted connection with no request waiting for its response and no bytes moving
    /// for this long is closed (HTTP/1.1 keep-alive included).
    pub idle_timeout_ms: u64,
    /// Connections one sandbox may have open through veil at once (intercepted or passed
    /// through); more are closed at once and counted as `limit_refused`. Per sandbox, so one
    /// sandbox's flood does not starve the others.
    pub max_connections_per_sandbox: usize,
    /// Concurrent h2 streams per intercepted connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams_per_connection: u32,
    /// Largest WebSocket frame payload, in bytes, either way on an intercepted connection; a
    /// larger one closes the WebSocket (1009) on both sides.
    pub websocket_max_frame_bytes: usize,
    /// Largest WebSocket message (its fragments together), in bytes: veil holds a whole
    /// message to scrub or substitute it. A larger one closes the WebSocket (1009).
    pub websocket_max_message_bytes: usize,
    /// A relayed WebSocket with no frame either way (pings included) for this long is closed
    /// (1001) on both sides.
    pub websocket_idle_timeout_ms: u64,
    /// Ranges (CIDR or single addresses) `egress: "host"` sandboxes may not reach, in addition
    /// to the built-in list ([`crate::egress::BUILTIN_DENY`]) and the host's own addresses.
    pub egress_deny: Vec<String>,
    /// Ranges `egress: "host"` sandboxes may reach although a deny rule (built-in, host
    /// address or `egress_deny`) covers them: allow wins.
    pub egress_allow: Vec<String>,
    /// Container runtime parent cgroups (relative to the cgroup2 mount, e.g. `"docker"`)
    /// whose containers may open TCP connections only once veil binds them; refused: the
    /// root, the host's slices and any parent of the agent's own cgroup.
    pub guard_cgroups: Vec<PathBuf>,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
            connect_timeout_ms: 10_000,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            listen_backlog: 4096,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            local_socket: PathBuf::from(veil_link::local::DEFAULT_LOCAL_SOCKET),
            control_urls: Vec::new(),
            control_cert: PathBuf::new(),
            control_key: PathBuf::new(),
            control_ca: PathBuf::new(),
            upstream_ca: Vec::new(),
            bpf_pin_dir: PathBuf::from(DEFAULT_BPF_PIN_DIR),
            reconnect_min_ms: 25,
            reconnect_max_ms: 1_000,
            peek_timeout_ms: 5_000,
            leaf_cache_size: crate::tls::leaf::DEFAULT_LEAF_CACHE,
            system_roots: PathBuf::from(SYSTEM_ROOTS),
            scrub_responses: true,
            metrics_listen: None,
            body_substitution: false,
            wrong_host: WrongHost::Forward,
            body_substitution_max_bytes: 1024 * 1024,
            max_header_bytes: 64 * 1024,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_connections_per_sandbox: 1024,
            max_streams_per_connection: 100,
            websocket_max_frame_bytes: 16 * 1024 * 1024,
            websocket_max_message_bytes: 16 * 1024 * 1024,
            websocket_idle_timeout_ms: 300_000,
            egress_deny: Vec::new(),
            egress_allow: Vec::new(),
            guard_cgroups: Vec::new(),
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

    /// The per-secret modes this config turns on for every secret.
    pub fn mode_overrides(&self) -> ModeOverrides {
        ModeOverrides {
            body_substitution: self.body_substitution,
            wrong_host: self.wrong_host,
        }
    }

    /// What the data path needs of these settings, beside timeouts it already had.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            overrides: self.mode_overrides(),
            body_max_bytes: self.body_substitution_max_bytes,
            max_header_bytes: self.max_header_bytes,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections_per_sandbox: self.max_connections_per_sandbox,
            max_streams_per_connection: self.max_streams_per_connection,
            websocket: WebSocketLimits {
                max_frame_bytes: self.websocket_max_frame_bytes,
                max_message_bytes: self.websocket_max_message_bytes,
                idle_timeout: Duration::from_millis(self.websocket_idle_timeout_ms),
            },
        }
    }

    /// The egress rules of `egress: "host"` sandboxes; an entry that is not a network is an
    /// error naming its key and text.
    pub fn egress_rules(&self) -> Result<EgressRules, ConfigError> {
        let parse = |key: &str, list: &[String]| {
            list.iter()
                .map(|text| {
                    egress::parse_net(text)
                        .map_err(|e| ConfigError::Invalid(format!("agent.{key}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(EgressRules::new(
            parse("egress_deny", &self.egress_deny)?,
            parse("egress_allow", &self.egress_allow)?,
        ))
    }

    /// Checks the choice of control transport: the local socket, or `control_urls` with its
    /// certificate, key and CA (never both).
    pub fn check_control(&self) -> Result<(), ConfigError> {
        if self.control_urls.is_empty() {
            if [&self.control_cert, &self.control_key, &self.control_ca]
                .iter()
                .any(|p| !p.as_os_str().is_empty())
            {
                return Err(ConfigError::Invalid(
                    "agent.control_cert, control_key and control_ca are for agent.control_urls, \
                     which is not set"
                        .into(),
                ));
            }
            return Ok(());
        }
        if self.control_socket != Path::new(DEFAULT_CONTROL_SOCKET) {
            return Err(ConfigError::Invalid(
                "agent.control_socket and agent.control_urls are both set: an agent reaches \
                 control either on this host's socket or over the fleet's mutual TLS"
                    .into(),
            ));
        }
        let missing: Vec<&str> = [
            ("control_cert", self.control_cert.as_os_str().is_empty()),
            ("control_key", self.control_key.as_os_str().is_empty()),
            ("control_ca", self.control_ca.as_os_str().is_empty()),
        ]
        .into_iter()
        .filter_map(|(k, missing)| missing.then_some(k))
        .collect();
        if !missing.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "agent.control_urls needs agent.{}",
                missing.join(", agent.")
            )));
        }
        for url in &self.control_urls {
            crate::link::endpoint::split_url(url)
                .map_err(|e| ConfigError::Invalid(format!("agent.{e}")))?;
        }
        Ok(())
    }

    /// The reconnection backoff bounds.
    pub fn reconnect(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.reconnect_min_ms),
            Duration::from_millis(self.reconnect_max_ms),
        )
    }
}

/// Request policy and limits of the data path (see the [`AgentSettings`] keys of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Modes turned on for every secret.
    pub overrides: ModeOverrides,
    /// Largest request body read for substitution.
    pub body_max_bytes: usize,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Client TLS handshake timeout.
    pub handshake_timeout: Duration,
    /// Idle timeout of intercepted connections.
    pub idle_timeout: Duration,
    /// Open connections per sandbox.
    pub max_connections_per_sandbox: usize,
    /// Concurrent h2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Relayed WebSockets.
    pub websocket: WebSocketLimits,
}

/// Limits of a WebSocket relayed on an intercepted connection (the `websocket_*` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebSocketLimits {
    /// Largest frame payload.
    pub max_frame_bytes: usize,
    /// Largest message.
    pub max_message_bytes: usize,
    /// Closed after this long without a frame.
    pub idle_timeout: Duration,
}

impl Default for RequestLimits {
    fn default() -> Self {
        AgentSettings::default().request_limits()
    }
}

/// Smallest `max_header_bytes`: hyper's HTTP/1.1 read buffer cannot be smaller.
pub const MIN_HEADER_BYTES: usize = 8192;

/// A sandbox's identifier: veil-link's one definition (and one rule), re-exported for the
/// modules that name it from here.
pub use veil_link::SandboxId;

/// One sandbox as the agent enforces it: its cgroup and, unless it shares the agent's, its
/// network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// Unique id.
    pub id: SandboxId,
    /// Organization the sandbox belongs to.
    pub org: veil_link::OrgId,
    /// cgroup v2 directory, absolute (below the cgroup2 mount).
    pub cgroup: PathBuf,
    /// Network namespace file (`/run/netns/NAME` or `/proc/PID/ns/net`); absent = the agent's.
    pub netns: Option<PathBuf>,
    /// Where its upstream connections leave from.
    pub egress: veil_link::Egress,
}

impl SandboxSpec {
    /// Validates a sandbox as control sent it; `cgroup` is resolved against `cgroup2_mount`.
    pub fn from_state(
        state: &veil_link::SandboxState,
        cgroup2_mount: &Path,
    ) -> Result<Self, String> {
        let id = state.id.clone();
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
        // A binding names the cgroup by id too: a path reused by a new cgroup (a restarted
        // container) is not the bound sandbox and must be bound again, never enforced as it.
        if let Some(bound) = state.cgroup_id {
            match crate::bpf::cgroup_id(&cgroup) {
                Ok(now) if now == bound => {}
                Ok(now) => {
                    return Err(format!(
                        "sandbox {id}: cgroup {} was replaced (id {now}, bound to {bound}); bind it again",
                        state.cgroup.display()
                    ));
                }
                Err(e) => return Err(format!("sandbox {id}: {e}")),
            }
        }
        Ok(Self {
            id,
            org: state.org.clone(),
            cgroup,
            netns: state.netns.clone(),
            egress: state.egress,
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
        for (key, value) in [
            (
                "body_substitution_max_bytes",
                a.body_substitution_max_bytes as u64,
            ),
            ("handshake_timeout_ms", a.handshake_timeout_ms),
            ("idle_timeout_ms", a.idle_timeout_ms),
            (
                "max_connections_per_sandbox",
                a.max_connections_per_sandbox as u64,
            ),
            (
                "max_streams_per_connection",
                u64::from(a.max_streams_per_connection),
            ),
            (
                "websocket_max_frame_bytes",
                a.websocket_max_frame_bytes as u64,
            ),
            (
                "websocket_max_message_bytes",
                a.websocket_max_message_bytes as u64,
            ),
            ("websocket_idle_timeout_ms", a.websocket_idle_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("agent.{key} must be > 0")));
            }
        }
        if a.max_header_bytes < MIN_HEADER_BYTES || a.max_header_bytes > u32::MAX as usize {
            return Err(ConfigError::Invalid(format!(
                "agent.max_header_bytes must be between {MIN_HEADER_BYTES} and {}",
                u32::MAX
            )));
        }
        if a.max_connections_per_sandbox > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ConfigError::Invalid(
                "agent.max_connections_per_sandbox is too large".into(),
            ));
        }
        if !a.bpf_pin_dir.is_absolute() || !a.state_dir.is_absolute() {
            return Err(ConfigError::Invalid(
                "agent.bpf_pin_dir and agent.state_dir must be absolute paths".into(),
            ));
        }
        a.egress_rules()?;
        crate::guard_parents::check_entries(&a.guard_cgroups).map_err(ConfigError::Invalid)?;
        a.check_control()?;
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

#[cfg(test)]
mod tests;
