//! The agent link server: a root-only Unix socket where veil-agents connect, say Hello, receive
//! a snapshot and then every change, and acknowledge each message.
//!
//! One writer per agent keeps its messages in order. Messages are built under one lock from the
//! store's current state (see [`super::plan`]), so every agent sees changes in commit order.
//! `notify` waits until every connected agent acknowledged its messages, or the timeout.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use serde_json::json;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use veil_link::{
    AgentId, AgentMsg, BlockedReport, ControlMsg, IdError, PROTOCOL_VERSION, Revision, SandboxId,
    SecretId, SecretState, UsageReport, read_frame, write_frame,
};

use super::plan::{Change, Held, RegistryView, Step, apply_to_held, plan};
use super::state::{unseal_for_agent, unseal_retired_for_agent};
use super::{AgentEvent, AgentLink, AgentLinkError, LinkFuture, Propagation, SecretAck};
use crate::crypto::Keyring;
use crate::store::{AuditRecord, SecretRecord, Store, UsageCounts, UsageDelta};
use crate::timefmt::now_ms;

/// File in the data dir keeping the last CA certificate an agent reported.
pub const CA_FILE: &str = "agent-ca.pem";
/// Largest accepted CA PEM.
const MAX_CA_PEM: usize = 64 * 1024;
/// Usage batches waiting for the store; beyond this a batch is dropped (and logged) rather than
/// slowing the link, whose acknowledgements rotations wait for.
const USAGE_QUEUE: usize = 256;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A filesystem or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Another process listens on the socket.
    #[error("{0} is in use: is another veil-control running?")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
}

/// A connected agent, as control remembers it.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    /// The agent's stable id.
    pub agent_id: AgentId,
    /// PID of the agent process (from the socket's peer credentials).
    pub pid: Option<i32>,
    /// Connection time, ms since the epoch.
    pub connected_since: i64,
}

/// One message's acknowledgement to await: connection, seq, the agent's errors.
type Wait = (u64, u64, oneshot::Receiver<Vec<String>>);

/// An acknowledgement being waited for.
#[derive(Debug)]
struct Pending {
    /// Resolved with the agent's errors (empty = applied); `None` when nobody waits (snapshots).
    done: Option<oneshot::Sender<Vec<String>>>,
    /// The secret a PutSecret carried: forgotten on failure so it is sent again next time.
    secret: Option<SecretId>,
    /// What the acknowledgement says about the agent's secrets.
    holds: Holds,
}

/// The secret revisions a message's acknowledgement confirms: control derives them from the
/// sequence number it sent rather than trusting a list from the agent.
#[derive(Debug)]
enum Holds {
    /// Nothing about secrets.
    Unchanged,
    /// The agent now holds exactly these (id, revision): a snapshot replaces everything.
    Exactly(Vec<(SecretId, Revision)>),
    /// The agent holds this revision of this secret (only when applied without errors).
    Put(SecretId, Revision),
    /// The agent dropped this secret.
    Dropped(SecretId),
}

/// An acknowledged revision and when it arrived (ms since the epoch).
type Acked = (Revision, i64);

#[derive(Debug)]
struct Agent {
    info: AgentInfo,
    tx: mpsc::UnboundedSender<ControlMsg>,
    held: Held,
    pending: HashMap<u64, Pending>,
}

#[derive(Debug, Default)]
struct LinkState {
    agents: BTreeMap<u64, Agent>,
    next_seq: u64,
    next_conn: u64,
    ca_pem: Option<String>,
    /// secret id → agent id → last acknowledged revision. In memory: kept across an agent's
    /// disconnection (it keeps enforcing what it had), rebuilt from snapshots after a restart.
    acks: HashMap<SecretId, BTreeMap<AgentId, Acked>>,
}

/// Agent reports on their way to the store.
#[derive(Debug)]
struct UsageJob {
    agent_id: AgentId,
    kind: ReportKind,
    deltas: Vec<UsageDelta>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReportKind {
    /// Aggregated counts: one `secret.used` audit entry per (secret, sandbox, host) and report.
    Usage,
    /// One `secret.blocked` audit entry per refused request.
    Blocked,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    keyring: Arc<RwLock<Keyring>>,
    timeout: Duration,
    /// veil's own listeners, sent in every snapshot for the agents to refuse.
    guarded: Vec<SocketAddr>,
    ca_file: PathBuf,
    state: Mutex<LinkState>,
    /// Woken whenever acknowledgements or connections change (for [`AgentLink::wait_acked`]).
    acked: Notify,
    usage: mpsc::Sender<UsageJob>,
}

/// The agent link over a Unix socket.
#[derive(Clone, Debug)]
pub struct AgentServer {
    inner: Arc<Inner>,
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ServerError + use<> {
    let path = path.to_owned();
    move |source| ServerError::Io { what, path, source }
}

/// Prepares `path` for binding: creates a missing parent (0700), removes a stale socket,
/// refuses a live one or a non-socket.
fn prepare_path(path: &Path) -> Result<(), ServerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err("creating", parent))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err("removing stale socket", path))
        }
        Ok(_) => Err(ServerError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

/// Whether a peer may speak for an agent: root, or the user control runs as.
pub fn trusted_peer(peer_uid: u32, own_euid: u32) -> bool {
    peer_uid == 0 || peer_uid == own_euid
}

/// Checks a Hello's fields (its agent id was checked as it was read); the message names the
/// problem (never echoing the PEM).
pub fn check_hello(protocol: u32, ca_pem: &str) -> Result<(), String> {
    if protocol != PROTOCOL_VERSION {
        return Err(format!(
            "protocol {protocol} is not supported (control speaks {PROTOCOL_VERSION})"
        ));
    }
    if ca_pem.len() > MAX_CA_PEM || !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("ca_pem must be a PEM certificate".into());
    }
    Ok(())
}

/// "5 s", "1.5 s", "300 ms".
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Writes the CA file atomically (public data: mode 0644).
fn save_ca(path: &Path, pem: &str) -> io::Result<()> {
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, pem)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

impl AgentServer {
    /// Binds `socket` (mode 0600) and starts accepting agents; `data_dir` keeps the last CA.
    pub fn bind(
        socket: &Path,
        data_dir: &Path,
        timeout: Duration,
        store: Arc<dyn Store>,
        keyring: Arc<RwLock<Keyring>>,
        guarded: Vec<SocketAddr>,
    ) -> Result<(AgentServer, JoinHandle<()>), ServerError> {
        prepare_path(socket)?;
        let listener = UnixListener::bind(socket).map_err(io_err("binding", socket))?;
        // Peer credentials are checked too; the mode keeps other users from even connecting.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod", socket))?;
        let ca_file = data_dir.join(CA_FILE);
        let ca_pem = std::fs::read_to_string(&ca_file).ok();
        let (usage, usage_rx) = mpsc::channel(USAGE_QUEUE);
        tokio::spawn(write_usage(store.clone(), usage_rx));
        let server = AgentServer {
            inner: Arc::new(Inner {
                store,
                keyring,
                timeout,
                guarded,
                ca_file,
                state: Mutex::new(LinkState {
                    ca_pem,
                    next_seq: 1,
                    ..LinkState::default()
                }),
                acked: Notify::new(),
                usage,
            }),
        };
        let accept = server.clone();
        let task = tokio::spawn(async move { accept.accept_loop(listener).await });
        tracing::info!(socket = %socket.display(), "agent link listening");
        Ok((server, task))
    }

    /// The agents connected now.
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.lock()
            .agents
            .values()
            .map(|a| a.info.clone())
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // Every critical section leaves the state consistent before anything can panic.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn accept_loop(self, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let server = self.clone();
                    tokio::spawn(async move { server.serve_agent(stream).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an agent connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve_agent(self, stream: UnixStream) {
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "agent connection without peer credentials");
                return;
            }
        };
        if !trusted_peer(cred.uid(), nix::unistd::geteuid().as_raw()) {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "refused agent connection: only root or control's own user may connect"
            );
            return;
        }
        let (mut reader, mut writer) = stream.into_split();
        let hello = tokio::time::timeout(
            self.inner.timeout.max(Duration::from_secs(1)),
            read_frame::<AgentMsg, _>(&mut reader),
        )
        .await;
        let (agent_id, ca_pem) = match hello {
            Ok(Ok(Some(AgentMsg::Hello {
                protocol,
                agent_id,
                ca_pem,
            }))) => match check_hello(protocol, &ca_pem) {
                Ok(()) => (agent_id, ca_pem),
                Err(problem) => {
                    tracing::warn!(pid = cred.pid(), %problem, "refused agent Hello");
                    return;
                }
            },
            Ok(Ok(Some(_))) => {
                tracing::warn!(pid = cred.pid(), "agent spoke before Hello; closing");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(pid = cred.pid(), error = %e, "reading agent Hello");
                return;
            }
            Err(_) => {
                tracing::warn!(pid = cred.pid(), "no Hello from agent in time; closing");
                return;
            }
        };
        let info = AgentInfo {
            agent_id,
            pid: cred.pid(),
            connected_since: now_ms(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<ControlMsg>();
        let conn = match self.admit(info.clone(), ca_pem, tx) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(agent_id = %info.agent_id, error = %e, "cannot build the agent snapshot");
                return;
            }
        };
        let write = async {
            while let Some(msg) = rx.recv().await {
                if let Err(e) = write_frame(&mut writer, &msg).await {
                    tracing::warn!(agent_id = %info.agent_id, error = %e, "writing to agent");
                    break;
                }
            }
        };
        let read = async {
            loop {
                match read_frame::<AgentMsg, _>(&mut reader).await {
                    Ok(Some(AgentMsg::Applied { seq, errors })) => self.applied(conn, seq, errors),
                    Ok(Some(AgentMsg::Usage { at_ms, reports })) => self.report(
                        &info.agent_id,
                        ReportKind::Usage,
                        usage_deltas(at_ms, reports),
                    ),
                    Ok(Some(AgentMsg::Blocked { events })) => {
                        self.report(&info.agent_id, ReportKind::Blocked, blocked_deltas(events))
                    }
                    Ok(Some(AgentMsg::Hello { .. })) => {
                        tracing::warn!(agent_id = %info.agent_id, "second Hello; closing");
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(agent_id = %info.agent_id, error = %e, "reading from agent");
                        break;
                    }
                }
            }
        };
        tokio::select! {
            () = write => {}
            () = read => {}
        }
        // Dropping the entry fails its pending acknowledgements (the waiters see a disconnect).
        self.lock().agents.remove(&conn);
        self.inner.acked.notify_waiters();
        tracing::info!(agent_id = %info.agent_id, "agent disconnected");
    }

    /// Registers a Hello'd agent and queues its snapshot, atomically with respect to changes.
    fn admit(
        &self,
        info: AgentInfo,
        ca_pem: String,
        tx: mpsc::UnboundedSender<ControlMsg>,
    ) -> Result<u64, AgentLinkError> {
        let mut st = self.lock();
        let view = RegistryView::load(self.inner.store.as_ref())
            .map_err(|e| AgentLinkError::Internal(e.to_string()))?;
        let mut secrets = Vec::with_capacity(view.mounted.len() + view.retired.len());
        {
            let ring = self.ring()?;
            for s in view.mounted.values() {
                secrets.push(unseal_for_agent(&ring, s)?);
            }
            for t in view.retired.values() {
                secrets.push(unseal_retired_for_agent(&ring, t)?);
            }
        }
        let sandboxes = view
            .sandboxes
            .values()
            .map(|sb| view.sandbox_state(sb).map_err(stored_id))
            .collect::<Result<Vec<_>, _>>()?;
        let held = view
            .held()
            .into_iter()
            .map(|(id, stamp)| Ok((SecretId::parse(id)?, Revision(stamp.revision))))
            .collect::<Result<Vec<_>, IdError>>()
            .map_err(stored_id)?;
        let seq = st.next_seq;
        st.next_seq += 1;
        let conn = st.next_conn;
        st.next_conn += 1;
        let (n_sandboxes, n_secrets) = (sandboxes.len(), secrets.len());
        // A closed receiver is impossible here: the writer has not started yet.
        let _ = tx.send(ControlMsg::Snapshot {
            guarded: self.inner.guarded.clone(),
            seq,
            sandboxes,
            secrets,
        });
        let mut pending = HashMap::new();
        pending.insert(
            seq,
            Pending {
                done: None,
                secret: None,
                holds: Holds::Exactly(held),
            },
        );
        if st.ca_pem.as_deref() != Some(ca_pem.as_str()) {
            if let Err(e) = save_ca(&self.inner.ca_file, &ca_pem) {
                tracing::warn!(error = %e, file = %self.inner.ca_file.display(), "saving the agent CA");
            }
            st.ca_pem = Some(ca_pem);
        }
        tracing::info!(
            agent_id = %info.agent_id,
            pid = info.pid,
            seq,
            sandboxes = n_sandboxes,
            secrets = n_secrets,
            "agent connected; snapshot queued"
        );
        st.agents.insert(
            conn,
            Agent {
                info,
                tx,
                held: view.held(),
                pending,
            },
        );
        Ok(conn)
    }

    fn ring(&self) -> Result<std::sync::RwLockReadGuard<'_, Keyring>, AgentLinkError> {
        self.inner
            .keyring
            .read()
            .map_err(|_| AgentLinkError::Internal("keyring poisoned".into()))
    }

    /// Handles an acknowledgement.
    fn applied(&self, conn: u64, seq: u64, errors: Vec<String>) {
        let mut st = self.lock();
        let Some(agent) = st.agents.get_mut(&conn) else {
            return;
        };
        let Some(pending) = agent.pending.remove(&seq) else {
            tracing::debug!(agent_id = %agent.info.agent_id, seq, "late or unknown acknowledgement");
            return;
        };
        if !errors.is_empty() {
            tracing::warn!(agent_id = %agent.info.agent_id, seq, errors = ?errors, "agent could not apply a change");
            if let Some(id) = &pending.secret {
                agent.held.remove(id.as_str());
            }
        } else {
            tracing::debug!(agent_id = %agent.info.agent_id, seq, "applied");
        }
        let agent_id = agent.info.agent_id.clone();
        record_holds(
            &mut st.acks,
            &agent_id,
            pending.holds,
            errors.is_empty(),
            now_ms(),
        );
        drop(st);
        if let Some(done) = pending.done {
            let _ = done.send(errors);
        }
        self.inner.acked.notify_waiters();
    }

    /// Queues an agent's usage or blocked report for the store; never waits (the link's
    /// acknowledgements must not queue behind a disk flush).
    fn report(&self, agent_id: &AgentId, kind: ReportKind, deltas: Vec<UsageDelta>) {
        if deltas.is_empty() {
            return;
        }
        let n = deltas.len();
        let job = UsageJob {
            agent_id: agent_id.clone(),
            kind,
            deltas,
        };
        if self.inner.usage.try_send(job).is_err() {
            tracing::warn!(%agent_id, entries = n, ?kind, "usage report dropped: the store is behind");
        }
    }

    /// Queues the messages for `change` to every agent; returns what to wait for.
    fn dispatch(&self, change: Change<'_>) -> Result<Vec<Wait>, AgentLinkError> {
        let mut st = self.lock();
        if st.agents.is_empty() {
            return Err(AgentLinkError::NotConnected);
        }
        let view = RegistryView::load(self.inner.store.as_ref())
            .map_err(|e| AgentLinkError::Internal(e.to_string()))?;
        let ring = self.ring()?;
        let mut built: HashMap<String, SecretState> = HashMap::new();
        let mut waits = Vec::new();
        let LinkState {
            agents, next_seq, ..
        } = &mut *st;
        for (conn, agent) in agents.iter_mut() {
            for step in plan(&view, change, &agent.held) {
                let seq = *next_seq;
                *next_seq += 1;
                let (msg, secret, holds) = match &step {
                    Step::PutSecret(id) => {
                        let state = match built.get(id) {
                            Some(s) => s.clone(),
                            None => {
                                let s = match (view.mounted.get(id), view.retired.get(id)) {
                                    (Some(rec), _) => unseal_for_agent(&ring, rec)?,
                                    (None, Some(t)) => unseal_retired_for_agent(&ring, t)?,
                                    (None, None) => {
                                        return Err(AgentLinkError::Internal(format!(
                                            "secret {id} vanished"
                                        )));
                                    }
                                };
                                built.insert(id.clone(), s.clone());
                                s
                            }
                        };
                        let holds = Holds::Put(state.id.clone(), state.revision);
                        let secret = Some(state.id.clone());
                        (ControlMsg::PutSecret { seq, secret: state }, secret, holds)
                    }
                    Step::PutSandbox(id) => {
                        let sb = view.sandboxes.get(id).ok_or_else(|| {
                            AgentLinkError::Internal(format!("sandbox {id} vanished"))
                        })?;
                        (
                            ControlMsg::PutSandbox {
                                seq,
                                sandbox: view.sandbox_state(sb).map_err(stored_id)?,
                            },
                            None,
                            Holds::Unchanged,
                        )
                    }
                    Step::DeleteSandbox(id) => (
                        ControlMsg::DeleteSandbox {
                            seq,
                            id: SandboxId::parse(id.as_str()).map_err(stored_id)?,
                        },
                        None,
                        Holds::Unchanged,
                    ),
                    Step::DeleteSecret(id) => {
                        let id = SecretId::parse(id.as_str()).map_err(stored_id)?;
                        (
                            ControlMsg::DeleteSecret {
                                seq,
                                id: id.clone(),
                            },
                            None,
                            Holds::Dropped(id),
                        )
                    }
                };
                apply_to_held(&mut agent.held, &view, &step);
                let (done, rx) = oneshot::channel();
                agent.pending.insert(
                    seq,
                    Pending {
                        done: Some(done),
                        secret,
                        holds,
                    },
                );
                // A closed channel means the agent is going away; its entry is removed then,
                // which fails this wait as a disconnect.
                let _ = agent.tx.send(msg);
                waits.push((*conn, seq, rx));
            }
        }
        Ok(waits)
    }

    async fn deliver(&self, change: Change<'_>) -> Result<(), AgentLinkError> {
        let waits = self.dispatch(change)?;
        if waits.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.inner.timeout;
        let (mut acked, mut gone, mut late) = (0usize, 0usize, Vec::new());
        let mut errors = Vec::new();
        for (conn, seq, rx) in waits {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(e)) if e.is_empty() => acked += 1,
                Ok(Ok(e)) => errors.extend(e),
                Ok(Err(_)) => gone += 1,
                Err(_) => late.push((conn, seq)),
            }
        }
        if !late.is_empty() {
            let mut st = self.lock();
            for (conn, seq) in &late {
                if let Some(agent) = st.agents.get_mut(conn) {
                    agent.pending.remove(seq);
                }
            }
        }
        if !errors.is_empty() {
            return Err(AgentLinkError::Rejected(errors));
        }
        if !late.is_empty() {
            return Err(AgentLinkError::NoAck(format!(
                "no veil-agent acknowledged within {}",
                human(self.inner.timeout)
            )));
        }
        if acked == 0 && gone > 0 {
            return Err(AgentLinkError::NoAck(
                "the veil-agent disconnected before acknowledging".into(),
            ));
        }
        Ok(())
    }
}

/// A stored id that is not a valid link id: control validated it when it stored it, so this
/// is a corrupt record, reported like one.
fn stored_id(e: IdError) -> AgentLinkError {
    AgentLinkError::Internal(format!("stored record: {e}"))
}

/// Updates what control knows an agent holds, once it acknowledged a message.
fn record_holds(
    acks: &mut HashMap<SecretId, BTreeMap<AgentId, Acked>>,
    agent_id: &AgentId,
    holds: Holds,
    applied: bool,
    now: i64,
) {
    match holds {
        Holds::Unchanged => {}
        // A snapshot replaces the agent's secrets even when some sandbox failed.
        Holds::Exactly(list) => {
            for per_agent in acks.values_mut() {
                per_agent.remove(agent_id);
            }
            for (id, revision) in list {
                acks.entry(id)
                    .or_default()
                    .insert(agent_id.clone(), (revision, now));
            }
        }
        Holds::Put(id, revision) if applied => {
            acks.entry(id)
                .or_default()
                .insert(agent_id.clone(), (revision, now));
        }
        Holds::Put(..) => {}
        Holds::Dropped(id) => {
            if let Some(per_agent) = acks.get_mut(&id) {
                per_agent.remove(agent_id);
            }
        }
    }
    acks.retain(|_, per_agent| !per_agent.is_empty());
}

fn usage_deltas(at_ms: i64, reports: Vec<UsageReport>) -> Vec<UsageDelta> {
    reports
        .into_iter()
        .map(|r| UsageDelta {
            secret_id: r.secret_id.into(),
            sandbox: r.sandbox.into(),
            host: r.host,
            counts: UsageCounts {
                substituted: r.substituted,
                wrong_host: r.wrong_host,
                host_mismatch: r.host_mismatch,
                blocked: r.blocked,
            },
            at: at_ms,
        })
        .filter(|d| !d.counts.is_zero())
        .collect()
}

/// Blocked events count nothing (the usage report carries the counts): they only audit.
fn blocked_deltas(events: Vec<BlockedReport>) -> Vec<UsageDelta> {
    events
        .into_iter()
        .map(|e| UsageDelta {
            secret_id: e.secret_id.into(),
            sandbox: e.sandbox.into(),
            host: e.host,
            counts: UsageCounts::default(),
            at: e.at_ms,
        })
        .collect()
}

/// The audit entry for one reported delta (no value, ever: only ids, host and counts).
fn report_audit(
    agent_id: &AgentId,
    kind: ReportKind,
    secret: &SecretRecord,
    d: &UsageDelta,
) -> AuditRecord {
    let (action, changes) = match kind {
        ReportKind::Usage => (
            "secret.used",
            json!({
                "sandboxId": d.sandbox,
                "host": d.host,
                "substituted": d.counts.substituted,
                "wrongHost": d.counts.wrong_host,
                "hostMismatch": d.counts.host_mismatch,
                "blocked": d.counts.blocked,
            }),
        ),
        ReportKind::Blocked => (
            "secret.blocked",
            json!({"sandboxId": d.sandbox, "host": d.host}),
        ),
    };
    AuditRecord {
        seq: 0,
        time: d.at,
        actor: format!("veil-agent:{agent_id}"),
        org: secret.org.clone(),
        action: action.to_owned(),
        target_type: "secret".into(),
        target_id: secret.id.clone(),
        target_name: Some(secret.name.clone()),
        changes,
    }
}

/// Writes agents' reports to the store, one batch at a time, in arrival order.
async fn write_usage(store: Arc<dyn Store>, mut rx: mpsc::Receiver<UsageJob>) {
    while let Some(job) = rx.recv().await {
        let store = store.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.record_usage(&job.deltas, &mut |secret, d| {
                Some(report_audit(&job.agent_id, job.kind, secret, d))
            })
        })
        .await;
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "recording agent usage"),
            Err(e) => tracing::warn!(error = %e, "recording agent usage"),
        }
    }
}

impl AgentLink for AgentServer {
    fn notify(&self, event: AgentEvent) -> LinkFuture<'_> {
        Box::pin(async move {
            match &event {
                AgentEvent::SandboxUpserted(sb) => self.deliver(Change::Sandbox(&sb.id)).await,
                AgentEvent::SandboxRemoved { id } => self.deliver(Change::Sandbox(id)).await,
                AgentEvent::SecretChanged { id } => self.deliver(Change::Secret(id)).await,
            }
        })
    }

    fn connected(&self) -> bool {
        !self.lock().agents.is_empty()
    }

    fn ca_certificate(&self) -> Option<String> {
        self.lock().ca_pem.clone()
    }

    fn propagation(&self, id: &str) -> Propagation {
        let st = self.lock();
        let mut agents: BTreeMap<AgentId, SecretAck> = BTreeMap::new();
        if let Some(per_agent) = st.acks.get(id) {
            for (agent_id, (revision, at)) in per_agent {
                agents.insert(
                    agent_id.clone(),
                    SecretAck {
                        agent_id: agent_id.clone(),
                        connected: false,
                        revision: Some(*revision),
                        at: Some(*at),
                    },
                );
            }
        }
        for agent in st.agents.values() {
            let agent_id = &agent.info.agent_id;
            if let Some(a) = agents.get_mut(agent_id) {
                a.connected = true;
            } else if agent.held.contains_key(id) {
                agents.insert(
                    agent_id.clone(),
                    SecretAck {
                        agent_id: agent_id.clone(),
                        connected: true,
                        revision: None,
                        at: None,
                    },
                );
            }
        }
        Propagation {
            agents: agents.into_values().collect(),
        }
    }

    fn wait_acked(&self, id: &str, revision: u64, timeout: Duration) -> LinkFuture<'_> {
        let id = id.to_owned();
        let revision = Revision(revision);
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                // Registered before the check, so an acknowledgement in between is not missed.
                let notified = self.inner.acked.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let propagation = self.propagation(&id);
                let pending = propagation.pending(revision);
                if pending.is_empty() {
                    return Ok(());
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(AgentLinkError::NoAck(format!(
                        "not acknowledged within {} by veil-agent(s) {}",
                        human(timeout),
                        pending
                            .iter()
                            .map(|a| a.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_and_hellos() {
        assert!(trusted_peer(0, 0));
        assert!(trusted_peer(1000, 1000));
        assert!(!trusted_peer(65534, 0));
        let pem = "-----BEGIN CERTIFICATE-----\nMII=\n-----END CERTIFICATE-----\n";
        check_hello(PROTOCOL_VERSION, pem).unwrap();
        assert!(check_hello(PROTOCOL_VERSION + 1, pem).is_err());
        assert!(check_hello(PROTOCOL_VERSION, "not a pem").is_err());
        // The agent id is checked as the Hello is read: a malformed one is no Hello at all.
        for bad in ["", "a b", "agent-1"] {
            let hello = serde_json::json!({"type": "hello", "protocol": PROTOCOL_VERSION,
                                           "agent_id": bad, "ca_pem": pem});
            assert!(
                serde_json::from_value::<AgentMsg>(hello).is_err(),
                "{bad:?}"
            );
        }
    }

    /// An agent id made of one repeated hex digit.
    fn agent(digit: char) -> AgentId {
        AgentId::parse(digit.to_string().repeat(32)).unwrap()
    }

    fn secret(id: &str) -> SecretId {
        SecretId::parse(id).unwrap()
    }

    #[test]
    fn acknowledgements_track_what_each_agent_holds() {
        let (a, b) = (agent('a'), agent('b'));
        let at = |acks: &HashMap<SecretId, BTreeMap<AgentId, Acked>>, s: &str, who: &AgentId| {
            acks[s][who]
        };
        let mut acks = HashMap::new();
        let snap = Holds::Exactly(vec![
            (secret("s1"), Revision(3)),
            (secret("s2"), Revision(1)),
        ]);
        record_holds(&mut acks, &a, snap, false, 10);
        record_holds(
            &mut acks,
            &b,
            Holds::Put(secret("s1"), Revision(3)),
            true,
            11,
        );
        assert_eq!(
            at(&acks, "s1", &a),
            (Revision(3), 10),
            "a snapshot counts even with sandbox errors"
        );
        // A failed put acknowledges nothing; a successful one moves the revision.
        record_holds(
            &mut acks,
            &a,
            Holds::Put(secret("s1"), Revision(4)),
            false,
            12,
        );
        assert_eq!(at(&acks, "s1", &a), (Revision(3), 10));
        record_holds(
            &mut acks,
            &a,
            Holds::Put(secret("s1"), Revision(4)),
            true,
            13,
        );
        assert_eq!(at(&acks, "s1", &a), (Revision(4), 13));
        record_holds(&mut acks, &a, Holds::Dropped(secret("s2")), true, 14);
        assert!(!acks.contains_key("s2"));
        // A new snapshot replaces: what it does not list, the agent no longer holds.
        record_holds(&mut acks, &a, Holds::Exactly(vec![]), true, 15);
        assert!(!acks["s1"].contains_key(&a));
        assert_eq!(at(&acks, "s1", &b), (Revision(3), 11));
        record_holds(&mut acks, &a, Holds::Unchanged, true, 16);
        assert_eq!(acks.len(), 1);
    }

    #[test]
    fn pending_agents_are_those_behind() {
        let ack = |id: char, revision: Option<u64>| SecretAck {
            agent_id: agent(id),
            connected: true,
            revision: revision.map(Revision),
            at: None,
        };
        let p = Propagation {
            agents: vec![ack('a', Some(4)), ack('b', Some(5)), ack('c', None)],
        };
        assert_eq!(p.pending(5), vec![&agent('a'), &agent('c')]);
        assert_eq!(p.pending(4), vec![&agent('c')]);
        assert!(Propagation::default().pending(9).is_empty());
    }

    #[test]
    fn reports_become_deltas_without_empty_ones() {
        let r = |substituted| UsageReport {
            substituted,
            ..UsageReport::new("sb".parse().unwrap(), secret("s"), "h".into())
        };
        let d = usage_deltas(7, vec![r(0), r(2)]);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].counts.substituted, d[0].at), (2, 7));
        let b = blocked_deltas(vec![BlockedReport {
            sandbox: "sb".parse().unwrap(),
            secret_id: secret("s"),
            host: "h".into(),
            at_ms: 9,
        }]);
        assert!(b[0].counts.is_zero());
        assert_eq!(b[0].at, 9);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(5000)), "5 s");
        assert_eq!(human(Duration::from_millis(1500)), "1.5 s");
        assert_eq!(human(Duration::from_millis(300)), "300 ms");
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("agent.sock");
        prepare_path(&path).unwrap();
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(prepare_path(&path), Err(ServerError::InUse(_))));
        drop(live);
        prepare_path(&path).unwrap();
        assert!(!path.exists(), "stale socket removed");
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            prepare_path(&path),
            Err(ServerError::NotASocket(_))
        ));
    }
}
