//! veil-agent: attaches veil's eBPF programs to sandbox cgroups and forwards their connections.
//!
//! Exit codes: 0 clean stop, 1 runtime failure, 2 bad arguments or configuration,
//! 3 the host cannot run veil (no cgroup v2, eBPF load or attach refused, not root).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::{Args as ClapArgs, Parser, Subcommand};
use proxy_agent::bpf::{self, Bpf};
use proxy_agent::config::{self, Config};
use proxy_agent::dialer::EgressGuard;
use proxy_agent::identity;
use proxy_agent::link::{Endpoint, Identity, LinkClient, Sessions};
use proxy_agent::local;
use proxy_agent::local_channel::{self, FromLocal};
use proxy_agent::metrics;
use proxy_agent::netns_pin::NetnsPins;
use proxy_agent::pins::PinLayout;
use proxy_agent::proxy::Proxy;
use proxy_agent::sandbox::Registry;
use proxy_agent::secrets::SecretStore;
use proxy_agent::state::SandboxFile;
use proxy_agent::stats::Stats;
use proxy_agent::tls::ca::InterceptionCa;
use proxy_agent::tls::leaf::LeafCache;
use proxy_agent::tls::server::TlsContext;
use proxy_agent::tls::upstream;
use proxy_agent::{guard, guard_parents, rlimit};
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};
use veil_sys::LogFormat;

/// What the exit status means; shown under every `--help`.
const EXIT_STATUS: &str = "\
Exit status:
  0  clean stop (SIGTERM), or the subcommand did what it was asked
  1  runtime failure: the agent could not keep running
  2  bad arguments or configuration (also: teardown while an agent holds the state dir)
  3  the host cannot run veil: no cgroup v2, eBPF load or attach refused, not root";

/// Redirects every outbound TCP connection of the sandboxes veil-control registers into veil.
///
/// Without a subcommand it runs the agent: it re-adopts the sandboxes it served before (their
/// eBPF links stay pinned in bpffs across restarts), then follows veil-control.
#[derive(Debug, Parser)]
#[command(
    name = "veil-agent",
    version,
    propagate_version = true,
    about,
    after_help = EXIT_STATUS
)]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// Options shared by the daemon and its subcommands.
#[derive(Debug, ClapArgs)]
struct Common {
    /// TOML config file (default /etc/veil/agent.toml when it exists; every key has a default).
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// veil-control's local socket for agents (default /run/veil/control-agent.sock).
    #[arg(long, value_name = "PATH", global = true)]
    control_socket: Option<PathBuf>,
    /// State directory: agent id, interception CA, sandbox set (default /var/lib/veil/agent).
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// bpffs directory for pinned maps and links (default /sys/fs/bpf/veil).
    #[arg(long, value_name = "DIR", global = true)]
    pin_dir: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for upstream TLS; repeatable.
    #[arg(long = "upstream-ca", value_name = "PEM")]
    upstream_ca: Vec<PathBuf>,
    /// Log format on stderr: `human` (text) or `json` (one object per line, for log shippers).
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Detaches sandboxes for good: removes their pinned links, map entries and records. Run it
    /// with the agent stopped (it refuses while an agent holds the state dir).
    #[command(after_help = EXIT_STATUS)]
    Teardown {
        /// The sandbox to detach.
        #[arg(
            long,
            value_name = "ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        sandbox: Option<String>,
        /// Every sandbox, and the pinned maps and pin dir too.
        #[arg(long)]
        all: bool,
    },
}

/// Why the agent stopped, mapped to its exit code.
#[derive(Debug)]
enum Fatal {
    Runtime(anyhow::Error),
    Config(anyhow::Error),
    Host(anyhow::Error),
}

impl Fatal {
    fn code(&self) -> u8 {
        match self {
            Fatal::Runtime(_) => 1,
            Fatal::Config(_) => 2,
            Fatal::Host(_) => 3,
        }
    }

    fn error(&self) -> &anyhow::Error {
        match self {
            Fatal::Runtime(e) | Fatal::Config(e) | Fatal::Host(e) => e,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Also installs the `log` → tracing bridge that carries aya-log's kernel records; it must be
    // in place before the programs load.
    veil_sys::logging::init("info", args.common.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    let result = match &args.command {
        Some(Cmd::Teardown { sandbox, all }) => teardown(&args.common, sandbox.as_deref(), *all),
        None => runtime.block_on(run(&args.common)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            error!("{:#}", fatal.error());
            eprintln!("veil-agent: {:#}", fatal.error());
            ExitCode::from(fatal.code())
        }
    }
}

fn load_config(args: &Common, cgroup2: &Path) -> Result<Config, Fatal> {
    let path = match &args.config {
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(config::DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    };
    let mut config = match &path {
        Some(p) => Config::load(p, cgroup2).map_err(|e| Fatal::Config(e.into()))?,
        None => Config::default(),
    };
    if let Some(dir) = &args.state_dir {
        config.agent.state_dir = dir.clone();
    }
    if let Some(sock) = &args.control_socket {
        config.agent.control_socket = sock.clone();
    }
    if let Some(dir) = &args.pin_dir {
        config.agent.bpf_pin_dir = dir.clone();
    }
    config
        .agent
        .upstream_ca
        .extend(args.upstream_ca.iter().cloned());
    // A flag may have set the socket beside the file's control_urls.
    config
        .agent
        .check_control()
        .map_err(|e| Fatal::Config(e.into()))?;
    if !config.agent.bpf_pin_dir.is_absolute() || !config.agent.state_dir.is_absolute() {
        return Err(Fatal::Config(anyhow!(
            "--pin-dir and --state-dir must be absolute paths"
        )));
    }
    Ok(config)
}

/// Where the link reaches control: the fleet's replicas when `control_urls` is set (its TLS
/// files read now: a bad one is a config error), else the local socket.
fn control_endpoint(settings: &config::AgentSettings) -> anyhow::Result<Endpoint> {
    if settings.control_urls.is_empty() {
        return Ok(Endpoint::Local(settings.control_socket.clone()));
    }
    let tls = proxy_agent::link::endpoint::client_config(
        &settings.control_cert,
        &settings.control_key,
        &settings.control_ca,
    )?;
    Ok(Endpoint::Fleet {
        urls: settings.control_urls.clone(),
        tls: std::sync::Arc::new(tls),
    })
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

async fn run(args: &Common) -> Result<(), Fatal> {
    // Two sockets per intercepted connection: the default soft limit would cap the host at a
    // few hundred. Not fatal: the agent still works, up to the lower limit.
    match rlimit::raise_nofile() {
        Ok(r) => info!(
            before = r.before,
            now = r.now,
            "open-file limit raised to the hard limit"
        ),
        Err(e) => warn!(error = %e, "cannot raise the open-file limit; keeping the current one"),
    }
    let cgroup2 = veil_sys::cgroup2_mount().map_err(|e| Fatal::Host(e.into()))?;
    let config = load_config(args, &cgroup2)?;
    let settings = &config.agent;
    if let Some(addr) = settings.metrics_listen {
        metrics::check_listen(addr).map_err(|e| Fatal::Config(e.into()))?;
    }
    // Its TLS files are config: a bad one is refused before anything touches the host.
    let endpoint = control_endpoint(settings).map_err(Fatal::Config)?;
    create_state_dir(&settings.state_dir).map_err(Fatal::Host)?;
    let _lock = lock_state_dir(&settings.state_dir)?;
    let agent_id = identity::load_or_create(&settings.state_dir)
        .context("agent identity")
        .map_err(Fatal::Host)?;
    let ca = InterceptionCa::load_or_create(&settings.state_dir, agent_id.as_str())
        .context("interception CA")
        .map_err(Fatal::Host)?;
    let pins = PinLayout::new(&settings.bpf_pin_dir);
    pins.prepare()
        .context("preparing the bpffs pin dir")
        .map_err(Fatal::Host)?;

    let mut bpf = Bpf::load(&pins)
        .context("cannot load veil's eBPF programs (root with CAP_BPF and CAP_NET_ADMIN needed)")
        .map_err(Fatal::Host)?;
    let guarded = guard_parents::apply(&mut bpf, &cgroup2, &settings.guard_cgroups)
        .context("guarding the runtime parents of agent.guard_cgroups")
        .map_err(Fatal::Host)?;
    if !guarded.is_empty() {
        info!(parents = ?guarded, "unbound containers under these cgroups cannot connect");
    }
    let stats = Arc::new(Stats::default());
    let egress = settings
        .egress_rules()
        .map_err(|e| Fatal::Config(e.into()))?;
    let egress = Arc::new(EgressGuard::new(egress, stats.clone()));
    let upstream =
        upstream::client_configs(Some(&settings.system_roots), &settings.upstream_ca, egress)
            .context("upstream TLS trust")
            .map_err(Fatal::Config)?;
    let ca = Arc::new(ca);
    let leaves = Arc::new(LeafCache::new(ca.clone(), settings.leaf_cache_size));
    let tls = TlsContext::new(leaves, upstream)
        .context("interception TLS configuration")
        .map_err(Fatal::Host)?;
    let secrets = SecretStore::with_overrides(settings.mode_overrides());
    let proxy = Arc::new(Proxy {
        orig: Arc::new(bpf.orig_dst()),
        stats,
        tracker: TaskTracker::new(),
        connect_timeout: settings.connect_timeout(),
        peek_timeout: settings.peek_timeout(),
        scrub_responses: settings.scrub_responses,
        secrets: secrets.clone(),
        tls: Arc::new(tls),
        limits: settings.request_limits(),
    });
    let metrics = match settings.metrics_listen {
        Some(addr) => metrics::serve(
            addr,
            metrics::Sources {
                stats: proxy.stats.clone(),
                secrets: secrets.clone(),
                pins: pins.clone(),
            },
        )
        .await
        .map_err(|e| Fatal::Config(e.into()))?,
        None => None,
    };
    // The agent's own listener is veil's too: no sandbox may reach it (or stand in for it).
    let own: Vec<std::net::SocketAddr> = match &metrics {
        Some((_, local)) => vec![*local],
        None => settings.metrics_listen.into_iter().collect(),
    };
    let guard = guard::spawn(&pins, own)
        .context("guarding veil's own listeners")
        .map_err(Fatal::Host)?;
    let mut registry = Registry::open(
        bpf,
        proxy.clone(),
        settings.listen_backlog,
        SandboxFile::new(&settings.state_dir),
    )
    .context("reading the sandbox set")
    .map_err(Fatal::Host)?;
    let adoption = std::time::Instant::now();
    for e in registry.adopt() {
        error!("adopting: {e}");
    }
    info!(
        agent_id = %agent_id,
        sandboxes = registry.len(),
        kept_closed = registry.known() - registry.len(),
        adoption_ms = adoption.elapsed().as_millis() as u64,
        "veil-agent ready"
    );
    // Handlers before READY=1: a SIGTERM sent as soon as the service manager sees it ready
    // must drain and exit cleanly, not kill the process by default disposition.
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Fatal::Runtime(e.into()))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Fatal::Runtime(e.into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Fatal::Runtime(e.into()))?;
    notify(&[NotifyState::Ready]);

    // The local binding socket: host-side tools bind declared sandboxes through it.
    let (from_local, local_task, pins) = match start_local(settings, &cgroup2, ca.cert_pem()) {
        Some((from, task, pins)) => (Some(from), Some(task), Some(pins)),
        None => (None, None, None),
    };
    let mut sessions = Sessions {
        local: from_local,
        bound: Default::default(),
    };
    let link = LinkClient {
        endpoint,
        backoff: settings.reconnect(),
        identity: Identity {
            agent_id,
            ca_pem: ca.cert_pem().to_owned(),
        },
        cgroup2,
        stats: proxy.stats.clone(),
        guard: Some(guard),
        pins,
    };
    {
        let linked = link.run(&mut registry, &secrets, &mut sessions);
        tokio::pin!(linked);
        loop {
            tokio::select! {
                () = &mut linked => {}
                // Sandboxes come from control only; nothing in the file can change at runtime.
                _ = hup.recv() => info!("SIGHUP ignored: sandboxes come from veil-control"),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
    }

    if let Some(task) = local_task {
        // No tool reaches a stopped agent; the netns pins stay (the bindings outlive a restart).
        task.abort();
        let _ = std::fs::remove_file(&settings.local_socket);
    }
    notify(&[NotifyState::Stopping]);
    info!("stopping: no new connections; draining open ones; pinned redirects stay");
    registry.stop_accepting();
    proxy.tracker.close();
    if tokio::time::timeout(settings.drain_timeout(), proxy.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = proxy.tracker.len(),
            "drain timeout passed; cutting open connections"
        );
    }
    if let Ok(s) = registry.bpf().stats() {
        info!(kernel = ?s, "eBPF counters");
    }
    info!(stats = %proxy.stats.summary(), "veil-agent stopped");
    Ok(())
}

/// Opens the local binding socket unless `local_socket` is empty; a socket that cannot be
/// opened leaves binding unavailable (logged), never the agent down: the sandboxes it
/// enforces do not depend on it.
fn start_local(
    settings: &config::AgentSettings,
    cgroup2: &Path,
    ca_pem: &str,
) -> Option<(FromLocal, tokio::task::JoinHandle<()>, NetnsPins)> {
    let path = &settings.local_socket;
    if path.as_os_str().is_empty() {
        info!("local binding socket disabled (local_socket = \"\")");
        return None;
    }
    let listener = match local::bind(path) {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "local binding socket unavailable: sandboxes cannot be bound on this host");
            return None;
        }
    };
    let dir = path.parent().unwrap_or(Path::new("/")).join("netns");
    let pins = NetnsPins::new(dir);
    let (to, from) = local_channel::channel();
    let server = local::LocalServer {
        cgroup2: cgroup2.to_owned(),
        pins: pins.clone(),
        control: to,
        ca_pem: ca_pem.to_owned(),
    };
    info!(socket = %path.display(), "local binding socket listening");
    Some((from, tokio::spawn(server.serve(listener)), pins))
}

/// `veil-agent teardown`: removes pins, links and map entries without loading any program.
fn teardown(args: &Common, sandbox: Option<&str>, all: bool) -> Result<(), Fatal> {
    let cgroup2 = veil_sys::cgroup2_mount().map_err(|e| Fatal::Host(e.into()))?;
    let config = load_config(args, &cgroup2)?;
    let settings = &config.agent;
    create_state_dir(&settings.state_dir).map_err(Fatal::Host)?;
    let _lock = lock_state_dir(&settings.state_dir)?;
    let pins = PinLayout::new(&settings.bpf_pin_dir);
    let file = SandboxFile::new(&settings.state_dir);
    let mut records = file
        .load()
        .context("reading the sandbox set")
        .map_err(Fatal::Host)?;
    let host = |e: bpf::BpfError| Fatal::Host(anyhow::Error::new(e));
    let unreserve = |r: &proxy_agent::state::SandboxRecord| {
        // Best effort: a netns that is gone took its reservations along.
        let _ = proxy_agent::reserved::update(r.netns.as_deref(), &[], &[r.port_v4, r.port_v6]);
    };
    // The netns pins of bound sandboxes (beside the local socket) go with them.
    let netns_pins = (!settings.local_socket.as_os_str().is_empty()).then(|| {
        let dir = settings.local_socket.parent().unwrap_or(Path::new("/"));
        NetnsPins::new(dir.join("netns"))
    });
    if all {
        if let Some(netns) = &netns_pins {
            netns.keep_only(&Default::default());
        }
        let mut ids = pins.pinned_cgroups().unwrap_or_default();
        ids.extend(records.values().map(|r| r.cgroup_id));
        records.values().for_each(unreserve);
        for id in ids {
            bpf::unpin_sandbox(&pins, id).map_err(host)?;
        }
        bpf::remove_pinned_targets(&pins, None).map_err(host)?;
        guard_parents::remove_all(&pins).map_err(host)?;
        records.clear();
        file.store(&records)
            .context("saving the sandbox set")
            .map_err(Fatal::Host)?;
        remove_pin_dir(&pins)
            .context("removing the pin dir")
            .map_err(Fatal::Host)?;
        println!("detached every sandbox; removed {}", pins.root().display());
        return Ok(());
    }
    let Some(id) = sandbox else {
        return Err(Fatal::Config(anyhow!(
            "teardown needs --sandbox ID or --all"
        )));
    };
    let Some(record) = records.remove(id) else {
        return Err(Fatal::Config(anyhow!(
            "no sandbox {id} in {}",
            settings.state_dir.display()
        )));
    };
    bpf::unpin_sandbox(&pins, record.cgroup_id).map_err(host)?;
    bpf::remove_pinned_targets(&pins, Some(&[record.cgroup_id])).map_err(host)?;
    unreserve(&record);
    if let Some(netns) = &netns_pins {
        netns.release_sandbox(id, None);
    }
    file.store(&records)
        .context("saving the sandbox set")
        .map_err(Fatal::Host)?;
    println!("detached sandbox {id}");
    Ok(())
}

/// Removes the pinned maps and the (then empty) directories of the layout.
fn remove_pin_dir(pins: &PinLayout) -> std::io::Result<()> {
    let ignore_missing = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    if let Ok(entries) = std::fs::read_dir(pins.maps_dir()) {
        for entry in entries.flatten() {
            ignore_missing(std::fs::remove_file(entry.path()))?;
        }
    }
    ignore_missing(std::fs::remove_dir(pins.maps_dir()))?;
    ignore_missing(std::fs::remove_dir(pins.sandboxes_dir()))?;
    ignore_missing(std::fs::remove_dir(pins.root()))
}

/// One agent (or teardown) per state dir: an exclusive lock held for the process's life.
fn lock_state_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Fatal> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
        .map_err(Fatal::Host)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        Fatal::Config(anyhow!(
            "another veil-agent uses the state dir {} ({e}); stop it first",
            dir.display()
        ))
    })
}

fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))?;
    // It holds the CA key: tighten a directory someone created more open.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict state dir {}", dir.display()))
}
