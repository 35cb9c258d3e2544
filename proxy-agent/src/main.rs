//! veil-agent: attaches veil's eBPF programs to sandbox cgroups and forwards their connections.
//!
//! Exit codes: 0 clean stop, 1 runtime failure, 2 bad arguments or configuration,
//! 3 the host cannot run veil (no cgroup v2, eBPF load or attach refused, not root).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::Parser;
use proxy_agent::bpf::Bpf;
use proxy_agent::config::{self, Config};
use proxy_agent::proxy::Proxy;
use proxy_agent::sandbox::Registry;
use proxy_agent::stats::Stats;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// Redirects every outbound TCP connection of registered sandboxes into veil.
#[derive(Debug, Parser)]
#[command(name = "veil-agent", version, about)]
struct Args {
    /// TOML config file (default /etc/veil/agent.toml when it exists; every key has a default).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// veil-control's local socket for agents.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// State directory (CA key and certificate).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for upstream TLS; repeatable.
    #[arg(long = "upstream-ca", value_name = "PEM")]
    upstream_ca: Vec<PathBuf>,
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
    init_tracing();
    let args = Args::parse();
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
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(fatal) => {
            error!("{:#}", fatal.error());
            eprintln!("veil-agent: {:#}", fatal.error());
            ExitCode::from(fatal.code())
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Also installs the `log` → tracing bridge that carries aya-log's kernel records;
        // it must be in place before the programs load.
        .init();
}

fn load_config(args: &Args, cgroup2: &Path) -> Result<Config, Fatal> {
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
    config
        .agent
        .upstream_ca
        .extend(args.upstream_ca.iter().cloned());
    Ok(config)
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

async fn run(args: Args) -> Result<(), Fatal> {
    let cgroup2 = config::cgroup2_mount().map_err(|e| Fatal::Host(e.into()))?;
    let config = load_config(&args, &cgroup2)?;
    create_state_dir(&config.agent.state_dir).map_err(Fatal::Host)?;

    let bpf = Bpf::load()
        .context("cannot load veil's eBPF programs (root with CAP_BPF and CAP_NET_ADMIN needed)")
        .map_err(Fatal::Host)?;
    let proxy = Arc::new(Proxy {
        orig: bpf.orig_dst(),
        stats: Stats::default(),
        tracker: TaskTracker::new(),
        connect_timeout: config.agent.connect_timeout(),
    });
    let mut registry = Registry::new(bpf, proxy.clone(), config.agent.listen_backlog);
    let errors = registry.reconcile(&config.sandboxes);
    if !errors.is_empty() {
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(Fatal::Config(anyhow!(all.join("; "))));
    }
    let mut config = config;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| Fatal::Runtime(e.into()))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Fatal::Runtime(e.into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Fatal::Runtime(e.into()))?;
    info!(sandboxes = registry.len(), "veil-agent ready");
    notify(&[NotifyState::Ready]);

    loop {
        tokio::select! {
            _ = hup.recv() => {
                notify(&[NotifyState::Reloading]);
                match load_config(&args, &cgroup2) {
                    Ok(new) => {
                        let errors = registry.reconcile(&new.sandboxes);
                        for e in &errors {
                            error!("reload: {e}");
                        }
                        info!(sandboxes = registry.len(), failed = errors.len(), "config reloaded");
                        config = new;
                    }
                    Err(e) => error!("reload refused, keeping the running config: {:#}", e.error()),
                }
                notify(&[NotifyState::Ready]);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    notify(&[NotifyState::Stopping]);
    info!("stopping: no new connections; draining open ones");
    registry.stop_accepting();
    proxy.tracker.close();
    let drain = config.agent.drain_timeout();
    if tokio::time::timeout(drain, proxy.tracker.wait())
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

fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))
}
