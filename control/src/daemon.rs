//! `veil-control serve`: open the data dir, finish any interrupted rekey, serve REST, the admin
//! socket and the agent link, and sweep values past `rotated_value_grace`, until SIGTERM/SIGINT.

use std::os::unix::fs::DirBuilderExt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;

use crate::admin::{self, Admin};
use crate::agent_link::server::AgentServer;
use crate::api::{self, AppState};
use crate::config::{Backend, Config};
use crate::crypto::Keyring;
use crate::fanout;
use crate::grace;
use crate::metrics::{Gauges, Metrics};
use crate::rekey;
use crate::store::Store;
use crate::store::postgres::{Connection, PgStore};
use crate::store::sled::SledStore;

/// The opened data dir: the store, the keys, and (PostgreSQL) how to follow other replicas.
type Opened = (Arc<dyn Store>, Arc<RwLock<Keyring>>, Option<Shared>);

/// A store shared with other replicas: the connection to follow their changes on, and this
/// replica's id in the notifications.
#[derive(Debug)]
pub struct Shared {
    /// Connection settings.
    pub connection: Connection,
    /// This replica's id.
    pub replica: String,
}

/// Opens the configured store: the data dir's sled store, or the PostgreSQL database (schema
/// migrated; `keyring`, when given, checked against the other replicas' keys). Blocks.
pub fn open_store(
    config: &Config,
    keyring: Option<&Keyring>,
) -> anyhow::Result<(Arc<dyn Store>, Option<Shared>)> {
    match config.store.backend {
        Backend::Sled => {
            let dir = &config.data_dir;
            let store = SledStore::open(&dir.join("db")).with_context(|| {
                format!(
                    "opening store in {} (is another veil-control running?)",
                    dir.display()
                )
            })?;
            Ok((Arc::new(store), None))
        }
        Backend::Postgres => {
            let connection = Connection::new(config.store.connection()?, &config.store.ca_file)?;
            let store = PgStore::connect(&connection).context("opening the PostgreSQL store")?;
            if let Some(keyring) = keyring {
                store
                    .check_keys(&keyring.fingerprints(), keyring.active_id())
                    .context("checking this replica's master keys")?;
            }
            let replica = store.replica().to_owned();
            Ok((
                Arc::new(store),
                Some(Shared {
                    connection,
                    replica,
                }),
            ))
        }
    }
}

/// Opens the data dir: creates it (0700) if new, loads or creates the master key, opens the store.
pub fn open_data_dir(config: &Config) -> anyhow::Result<Opened> {
    let dir = &config.data_dir;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
    }
    let keyring = Keyring::open_or_create(dir).context("opening master keys")?;
    let (store, shared) = open_store(config, Some(&keyring))?;
    Ok((store, Arc::new(RwLock::new(keyring)), shared))
}

/// The TCP addresses of the database's hosts (names resolved now; Unix sockets have none).
fn database_addrs(config: &tokio_postgres::Config) -> Vec<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let ports = config.get_ports();
    let mut addrs = Vec::new();
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        if let tokio_postgres::config::Host::Tcp(name) = host {
            match (name.as_str(), port).to_socket_addrs() {
                Ok(found) => addrs.extend(found),
                Err(e) => {
                    tracing::warn!(host = %name, error = %e, "cannot resolve the database host to guard it")
                }
            }
        }
    }
    for (i, ip) in config.get_hostaddrs().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        addrs.push(std::net::SocketAddr::new(*ip, port));
    }
    addrs
}

/// On a shared store: finishes a rekey left unfinished, then keeps this replica's keyring in
/// step with the other replicas' (see [`crate::rekey`]).
async fn follow_shared_keyring(store: Arc<dyn Store>, keyring: Arc<RwLock<Keyring>>) {
    let (s, k) = (store.clone(), keyring.clone());
    tokio::spawn(async move {
        let resumed = tokio::task::spawn_blocking(move || {
            let keys = s.shared_keys()?;
            Some(rekey::resume_interrupted(
                s.as_ref(),
                keys,
                &k,
                Duration::from_secs(60),
            ))
        })
        .await;
        match resumed {
            Ok(Some(Ok(Some(report)))) => {
                tracing::info!(active = %report.active_key, resealed = report.resealed, "finished an interrupted rekey");
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "an interrupted rekey is not finished yet");
            }
            _ => {}
        }
    });
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let (s, k) = (store.clone(), keyring.clone());
        let followed = tokio::task::spawn_blocking(move || {
            s.shared_keys()
                .map(|keys| rekey::follow_shared_keyring(keys, &k))
        })
        .await;
        if let Ok(Some(Err(e))) = followed {
            tracing::warn!(error = %e, "following the replicas' shared keyring");
        }
    }
}

/// Runs the daemon until a termination signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let opening = config.clone();
    let (store, keyring, shared) =
        tokio::task::spawn_blocking(move || open_data_dir(&opening)).await??;
    let admin = Admin {
        store: store.clone(),
        keyring: Some(keyring.clone()),
    };
    let pending = keyring
        .read()
        .map_err(|_| anyhow::anyhow!("keyring poisoned"))?
        .key_ids()
        .len();
    if pending > 1 && store.shared_keys().is_none() {
        tracing::warn!("found several master keys: completing an interrupted rekey");
        let a = admin.clone();
        let report = tokio::task::spawn_blocking(move || a.finish_rekey()).await??;
        tracing::info!(resealed = report.resealed, retired = ?report.retired, "rekey completed");
    }
    let admin_task = admin::serve(admin, &config.data_dir).context("binding admin socket")?;
    let keyring_task = store
        .shared_keys()
        .is_some()
        .then(|| tokio::spawn(follow_shared_keyring(store.clone(), keyring.clone())));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let local = listener.local_addr()?;
    // Sandboxes must never reach control's own listeners (security invariant 5): the agents
    // refuse connections to them.
    let mut guarded = vec![local];
    guarded.extend(config.metrics_listen.parse::<std::net::SocketAddr>().ok());
    // The fleet listener too: mutual TLS would refuse a sandbox, but none may even connect.
    guarded.extend(config.fleet.listen());
    // The database holds every sealed value and the audit: no sandbox may connect to it either.
    if let Some(shared) = &shared {
        guarded.extend(database_addrs(&shared.connection.config));
    }
    let (agent, agent_task) = AgentServer::bind(
        &config.agent_socket,
        &config.data_dir,
        Duration::from_millis(config.agent.timeout_ms),
        store.clone(),
        keyring.clone(),
        guarded,
    )
    .context("starting the agent link")?;
    let fleet_task = match (config.fleet.listen(), &shared) {
        (Some(addr), Some(shared)) => {
            Some(start_fleet(&config, addr, &store, &keyring, &agent, &shared.replica).await?)
        }
        _ => None,
    };
    let follower =
        shared.map(|s| tokio::spawn(fanout::follow(s.connection, s.replica, agent.clone())));
    let server = agent.clone();
    let agent: Arc<dyn crate::agent_link::AgentLink> = Arc::new(agent);
    // At start too: values that passed their grace while the daemon was down go at once.
    let sweeper = tokio::spawn(grace::sweeper(
        store.clone(),
        agent.clone(),
        config.rotated_value_grace.0,
    ));
    let state = AppState {
        store,
        keyring,
        config: Arc::new(config.clone()),
        agent,
        metrics: Arc::new(Metrics::default()),
    };
    // Agents' bind requests are decided with the API's state (its store, config and link).
    server.set_binder(api::binding::Bindings::new(state.clone()));
    let metrics_task = serve_metrics(&config, state.clone()).await;
    tracing::info!(
        listen = %local,
        data_dir = %config.data_dir.display(),
        agent_socket = %config.agent_socket.display(),
        agent_required = config.agent.required,
        rotated_value_grace_s = config.rotated_value_grace.0.as_secs(),
        "veil-control ready"
    );
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")?;
    admin_task.abort();
    agent_task.abort();
    sweeper.abort();
    if let Some(task) = keyring_task {
        task.abort();
    }
    if let Some(task) = follower {
        task.abort();
    }
    if let Some(task) = fleet_task {
        task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = std::fs::remove_file(admin::socket_path(&config.data_dir));
    let _ = std::fs::remove_file(&config.agent_socket);
    tracing::info!("veil-control stopped");
    Ok(())
}

/// Opens (or creates) the fleet CA, issues this replica's server certificate and starts the
/// mutual-TLS listener for the agents of enrolled hosts.
async fn start_fleet(
    config: &Config,
    addr: std::net::SocketAddr,
    store: &Arc<dyn Store>,
    keyring: &Arc<RwLock<Keyring>>,
    agent: &AgentServer,
    replica: &str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (s, k, names) = (store.clone(), keyring.clone(), config.fleet.names());
    let tls = tokio::task::spawn_blocking(move || {
        let fleet = s
            .fleet()
            .context("fleet.agent_listen needs the PostgreSQL store")?;
        let ring = k.read().map_err(|_| anyhow::anyhow!("keyring poisoned"))?;
        let ca = crate::fleet::ca::FleetCa::open_or_create(fleet, &ring)?;
        anyhow::Ok(crate::fleet::listener::server_config(&ca, &names)?)
    })
    .await??;
    let (local, task) =
        crate::fleet::listener::serve(addr, tls, agent.clone(), store.clone(), replica.to_owned())
            .await?;
    tracing::info!(fleet_listen = %local, "fleet ready");
    Ok(task)
}

/// Serves `GET /metrics` on `metrics_listen` (loopback, no auth: counts only, never a value).
/// A port already in use is logged, not fatal: metrics must not keep the API down.
async fn serve_metrics(config: &Config, state: AppState) -> Option<tokio::task::JoinHandle<()>> {
    if config.metrics_listen.is_empty() {
        return None;
    }
    let listener = match tokio::net::TcpListener::bind(config.metrics_listen.as_str()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(listen = %config.metrics_listen, error = %e, "metrics endpoint off");
            return None;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "metrics endpoint ready");
    }
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(render_metrics))
        .with_state(state);
    Some(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}

async fn render_metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let st = state.clone();
    let gauges = tokio::task::spawn_blocking(move || {
        let secrets = st
            .store
            .list_orgs()
            .map(|orgs| {
                orgs.iter()
                    .map(|o| st.store.list_secrets(&o.name).map_or(0, |s| s.len() as u64))
                    .sum()
            })
            .unwrap_or(0);
        let sandboxes = st.store.list_sandboxes().map_or(0, |s| s.len() as u64);
        Gauges {
            secrets,
            sandboxes,
            agent_connected: st.agent.connected(),
        }
    })
    .await
    .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(gauges),
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
