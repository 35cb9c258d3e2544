//! The agent's end of the control channel (`veil-link`): connect, say Hello, apply what control
//! sends, acknowledge each message once it is live.
//!
//! An [`AgentMsg::Applied`] is sent only after the change took effect: for a sandbox, its
//! listeners are listening, every program is linked and its direct flag follows its secrets
//! ([`Registry::sync_direct`]), so a connection started after the acknowledgement is
//! redirected when a secret applies to it. While control is down the agent keeps enforcing what it has
//! and reconnects with exponential backoff; a reconnection's snapshot is reconciled against the
//! running set, so nothing is attached twice.
//!
//! The acknowledgement of a message is also the acknowledgement of the secret revisions it
//! carried (control knows which). Usage goes the other way, unprompted: every
//! [`USAGE_INTERVAL`] the counts gathered by [`Stats`] are sent aggregated per (sandbox,
//! secret, host), and blocked requests as soon as one is recorded. Reports that could not be
//! written are kept (bounded) and sent on the next session; a report written just as the link
//! breaks may be lost — usage is statistics, and the blocked request was already refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use veil_link::{
    AgentId, AgentMsg, BlockedReport, ControlMsg, FrameError, LocalResponse, PROTOCOL_VERSION,
    SandboxId, SecretId, UsageReport, read_frame, write_frame,
};

use crate::config::SandboxSpec;
use crate::guard::GuardHandle;
use crate::local_channel::{Ask, FromLocal};
use crate::netns_pin::NetnsPins;
use crate::reap::BoundCgroups;
use crate::sandbox::Registry;
use crate::secrets::SecretStore;
use crate::stats::{BlockedEvent, SecretUsage, UsageKey};

pub mod endpoint;
mod error;

pub use endpoint::{Endpoint, trusted_peer};
pub use error::LinkError;

/// How often aggregated usage is reported (when there is any).
pub const USAGE_INTERVAL: Duration = Duration::from_secs(1);
/// Most blocked events kept while control is unreachable; older ones are dropped (counted).
const MAX_UNSENT_BLOCKS: usize = 10_000;

/// What the agent tells control about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Stable agent id.
    pub agent_id: AgentId,
    /// PEM of the interception CA certificate.
    pub ca_pem: String,
}

/// Connects to control and keeps the registry and secrets in line with it.
#[derive(Debug)]
pub struct LinkClient {
    /// Where control is (its local socket or the fleet's replicas).
    pub endpoint: Endpoint,
    /// First and longest reconnection delay.
    pub backoff: (Duration, Duration),
    /// Sent in Hello.
    pub identity: Identity,
    /// cgroup2 mount, against which sandbox cgroups are resolved.
    pub cgroup2: PathBuf,
    /// The data path's counters, whose usage and blocked requests are reported to control.
    pub stats: std::sync::Arc<crate::stats::Stats>,
    /// Where control's own listen addresses go (guarded against sandboxes).
    pub guard: Option<GuardHandle>,
    /// The netns pins of bound sandboxes (released when control detaches them).
    pub pins: Option<NetnsPins>,
}

/// What lives across sessions beside the registry: the local socket's requests, and the
/// bound sandboxes' cgroups being watched.
#[derive(Debug)]
pub struct Sessions {
    /// Requests from the local socket; `None` when it is disabled.
    pub local: Option<FromLocal>,
    /// The cgroups to reap.
    pub bound: BoundCgroups,
}

/// Clears the local socket's "in sync" flag when a session ends, however it ends.
struct Unsynced(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

impl Drop for Unsynced {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The link message for a local request numbered `req`.
fn ask_msg(req: u64, ask: Ask) -> AgentMsg {
    match ask {
        Ask::Describe { sandbox } => AgentMsg::Describe { req, sandbox },
        Ask::Unbind { sandbox } => AgentMsg::Unbind { req, sandbox },
        Ask::Bind {
            sandbox,
            cgroup,
            cgroup_id,
            netns,
        } => AgentMsg::Bind {
            req,
            sandbox,
            cgroup,
            cgroup_id,
            netns,
        },
    }
}

/// The typed ids of a data-path counter key. The data path counts under the ids of the sandbox
/// and secret it served, both checked when control's message was read, so a key that does not
/// parse cannot occur; it would be left out of the report, never sent malformed.
fn report_ids(key: &UsageKey) -> Option<(SandboxId, SecretId)> {
    match (
        SandboxId::parse(key.sandbox.as_str()),
        SecretId::parse(key.secret_id.as_str()),
    ) {
        (Ok(sandbox), Ok(secret)) => Some((sandbox, secret)),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "usage left out of the report");
            None
        }
    }
}

/// Reports taken from [`Stats`] and not yet written to control.
#[derive(Debug, Default)]
pub struct Unsent {
    usage: BTreeMap<UsageKey, SecretUsage>,
    blocks: Vec<BlockedEvent>,
    /// Blocked events dropped because too many waited.
    dropped_blocks: u64,
}

impl Unsent {
    /// Adds newly taken reports, summing usage per key.
    pub fn merge(&mut self, usage: Vec<(UsageKey, SecretUsage)>, blocks: Vec<BlockedEvent>) {
        for (key, u) in usage {
            let e = self.usage.entry(key).or_default();
            e.substituted = e.substituted.saturating_add(u.substituted);
            e.wrong_host = e.wrong_host.saturating_add(u.wrong_host);
            e.host_mismatch = e.host_mismatch.saturating_add(u.host_mismatch);
            e.blocked = e.blocked.saturating_add(u.blocked);
        }
        self.blocks.extend(blocks);
        if self.blocks.len() > MAX_UNSENT_BLOCKS {
            let extra = self.blocks.len() - MAX_UNSENT_BLOCKS;
            self.blocks.drain(..extra);
            self.dropped_blocks += extra as u64;
        }
    }

    /// The usage message for what is pending, if any.
    pub fn usage_msg(&self, at: SystemTime) -> Option<AgentMsg> {
        if self.usage.is_empty() {
            return None;
        }
        let reports = self
            .usage
            .iter()
            .filter_map(|(k, u)| {
                let (sandbox, secret_id) = report_ids(k)?;
                Some(UsageReport {
                    substituted: u.substituted,
                    wrong_host: u.wrong_host,
                    host_mismatch: u.host_mismatch,
                    blocked: u.blocked,
                    ..UsageReport::new(sandbox, secret_id, k.host.clone())
                })
            })
            .collect();
        Some(AgentMsg::Usage {
            at_ms: epoch_ms(at),
            reports,
        })
    }

    /// The blocked message for what is pending, if any.
    pub fn blocked_msg(&self) -> Option<AgentMsg> {
        if self.blocks.is_empty() {
            return None;
        }
        let events = self
            .blocks
            .iter()
            .filter_map(|b| {
                let (sandbox, secret_id) = report_ids(&b.key)?;
                Some(BlockedReport {
                    sandbox,
                    secret_id,
                    host: b.key.host.clone(),
                    at_ms: epoch_ms(b.at),
                })
            })
            .collect();
        Some(AgentMsg::Blocked { events })
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.usage.is_empty() && self.blocks.is_empty()
    }
}

/// Milliseconds since the epoch (0 for times before it).
fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Aborts the frame reader when a session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the frame reader hands the session: a message, the end of the stream, or an error.
type Incoming = Result<Option<ControlMsg>, FrameError>;

impl LinkClient {
    /// Runs sessions forever, reconnecting after each one ends. Cancel by dropping the future
    /// (it never leaves a message half-applied: applying is synchronous).
    pub async fn run(&self, registry: &mut Registry, secrets: &SecretStore, extra: &mut Sessions) {
        let (min, max) = self.backoff;
        let mut delay = min;
        let mut last_error = String::new();
        let mut unsent = Unsent::default();
        // Which replica to try next: after a failure or a disconnect, the next one in order.
        let mut place = 0usize;
        loop {
            let mut synced = false;
            let outcome = self
                .session(place, registry, secrets, &mut synced, &mut unsent, extra)
                .await;
            place = place.wrapping_add(1);
            match outcome {
                Ok(()) => info!("control closed the link; reconnecting"),
                Err(e) => {
                    // Logged once per distinct failure: a control that is down for long must
                    // not flood the log at the retry rate.
                    let text = e.to_string();
                    if text != last_error {
                        warn!(error = %text, "control link down; keeping the last state");
                        last_error = text;
                    }
                }
            }
            if synced {
                delay = min;
                last_error.clear();
                // A lost replica: the next one at once (its agents must move within 2 s).
                if self.endpoint.len() > 1 {
                    continue;
                }
            }
            // A full round of replicas failed before the delay grows.
            if place.is_multiple_of(self.endpoint.len()) {
                tokio::time::sleep(delay).await;
                delay = next_delay(delay, max);
            } else {
                tokio::time::sleep(min).await;
            }
        }
    }

    async fn session(
        &self,
        place: usize,
        registry: &mut Registry,
        secrets: &SecretStore,
        synced: &mut bool,
        unsent: &mut Unsent,
        extra: &mut Sessions,
    ) -> Result<(), LinkError> {
        let (mut stream, peer) = self.endpoint.connect(place).await?;
        write_frame(
            &mut stream,
            &AgentMsg::Hello {
                protocol: PROTOCOL_VERSION,
                agent_id: self.identity.agent_id.clone(),
                ca_pem: self.identity.ca_pem.clone(),
            },
        )
        .await?;
        info!(control = %peer, "connected to control");
        let (mut reader, mut writer) = tokio::io::split(stream);
        // Frames are read by their own task: a read cut short by select! would lose bytes.
        let (tx, mut rx) = mpsc::channel::<Incoming>(64);
        let _reader = AbortOnDrop(tokio::spawn(async move {
            loop {
                let frame = read_frame::<ControlMsg, _>(&mut reader).await;
                let last = !matches!(frame, Ok(Some(_)));
                if tx.send(frame).await.is_err() || last {
                    break;
                }
            }
        }));
        let mut tick = tokio::time::interval(USAGE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Sessions { local, bound } = extra;
        // Requests queued while the link was down were answered `unavailable` by their
        // timeout or are stale: none is sent on a new session.
        if let Some(local) = local.as_mut() {
            while local.rx.try_recv().is_ok() {}
        }
        let flag = Unsynced(local.as_ref().map(|l| l.synced.clone()));
        let mut waiting: HashMap<u64, oneshot::Sender<LocalResponse>> = HashMap::new();
        let mut next_req = 1u64;
        loop {
            tokio::select! {
                // Control's changes first: a rotation waits for their acknowledgement.
                biased;
                incoming = rx.recv() => {
                    let msg = match incoming {
                        Some(Ok(Some(msg))) => msg,
                        Some(Ok(None)) | None => return Ok(()),
                        Some(Err(e)) => return Err(e.into()),
                    };
                    let Some(seq) = msg.seq() else {
                        if let ControlMsg::Reply { req, outcome } = msg
                            && let Some(answer) = waiting.remove(&req)
                        {
                            let _ = answer.send(outcome);
                        }
                        continue;
                    };
                    let is_snapshot = matches!(msg, ControlMsg::Snapshot { .. });
                    let errors = self.apply_tracked(msg, registry, secrets, bound);
                    for e in &errors {
                        warn!(seq, "applying control's change: {e}");
                    }
                    write_frame(&mut writer, &AgentMsg::Applied { seq, errors }).await?;
                    if is_snapshot {
                        *synced = true;
                        if let Some(f) = &flag.0 {
                            f.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        info!(
                            sandboxes = registry.len(),
                            secrets = secrets.len(),
                            "in sync with control"
                        );
                        // What waited while control was away goes at once.
                        self.report(&mut writer, unsent).await?;
                    }
                }
                Some(pending) = async { local.as_mut()?.rx.recv().await }, if *synced => {
                    let req = next_req;
                    next_req += 1;
                    write_frame(&mut writer, &ask_msg(req, pending.ask)).await?;
                    waiting.insert(req, pending.answer);
                }
                () = self.stats.report_ready.notified(), if *synced => {
                    self.report(&mut writer, unsent).await?;
                }
                _ = tick.tick(), if *synced => {
                    self.report(&mut writer, unsent).await?;
                    for (sandbox, cgroup_id) in bound.gone() {
                        info!(sandbox = %sandbox, cgroup_id, "bound cgroup gone or replaced; reporting");
                        write_frame(&mut writer, &AgentMsg::Gone { sandbox, cgroup_id }).await?;
                    }
                }
            }
        }
    }

    /// [`apply`], and what follows the registry: the bound cgroups watched, the netns pins
    /// of detached sandboxes released.
    fn apply_tracked(
        &self,
        msg: ControlMsg,
        registry: &mut Registry,
        secrets: &SecretStore,
        bound: &mut BoundCgroups,
    ) -> Vec<String> {
        match &msg {
            ControlMsg::Snapshot { sandboxes, .. } => bound.replace(sandboxes, &self.cgroup2),
            ControlMsg::PutSandbox { sandbox, .. } => bound.track(sandbox, &self.cgroup2),
            ControlMsg::DeleteSandbox { id, .. } => bound.forget(id),
            _ => {}
        }
        // Which netns pins stay: a snapshot's, a sandbox's current one; released after the
        // registry closed the listeners that used them.
        let pins_after: Option<(Option<SandboxId>, HashSet<PathBuf>)> = match &msg {
            ControlMsg::Snapshot { sandboxes, .. } => Some((
                None,
                sandboxes.iter().filter_map(|s| s.netns.clone()).collect(),
            )),
            ControlMsg::PutSandbox { sandbox, .. } => Some((
                Some(sandbox.id.clone()),
                sandbox.netns.iter().cloned().collect(),
            )),
            ControlMsg::DeleteSandbox { id, .. } => Some((Some(id.clone()), HashSet::new())),
            _ => None,
        };
        let errors = apply(msg, registry, secrets, &self.cgroup2, self.guard.as_ref());
        if let (Some(pins), Some((sandbox, keep))) = (&self.pins, pins_after) {
            match sandbox {
                Some(id) => {
                    pins.release_sandbox(id.as_str(), keep.iter().next().map(PathBuf::as_path))
                }
                None => pins.keep_only(&keep),
            }
        }
        errors
    }

    /// Sends the usage and blocked requests gathered since the last report; what cannot be
    /// written stays in `unsent` for the next session.
    async fn report<W: AsyncWrite + Unpin>(
        &self,
        writer: &mut W,
        unsent: &mut Unsent,
    ) -> Result<(), LinkError> {
        let (usage, blocks) = self.stats.take_reports();
        unsent.merge(usage, blocks);
        if unsent.dropped_blocks > 0 {
            warn!(
                dropped = unsent.dropped_blocks,
                "blocked requests not reported: too many waited for control"
            );
            unsent.dropped_blocks = 0;
        }
        if let Some(msg) = unsent.blocked_msg() {
            write_frame(writer, &msg).await?;
            unsent.blocks.clear();
        }
        if let Some(msg) = unsent.usage_msg(SystemTime::now()) {
            write_frame(writer, &msg).await?;
            unsent.usage.clear();
        }
        Ok(())
    }
}

/// The next reconnection delay: doubled, capped at `max`.
pub fn next_delay(delay: Duration, max: Duration) -> Duration {
    delay.saturating_mul(2).min(max)
}

/// Applies one message from control; returns the per-item failures for `Applied`.
pub fn apply(
    msg: ControlMsg,
    registry: &mut Registry,
    secrets: &SecretStore,
    cgroup2: &Path,
    guard: Option<&GuardHandle>,
) -> Vec<String> {
    let mut errors = Vec::new();
    match msg {
        ControlMsg::Snapshot {
            sandboxes,
            secrets: values,
            guarded,
            ..
        } => {
            if let Some(guard) = guard {
                guard.set_control(guarded);
            }
            let mut specs = Vec::with_capacity(sandboxes.len());
            for s in &sandboxes {
                match SandboxSpec::from_state(s, cgroup2) {
                    Ok(spec) => specs.push(spec),
                    Err(e) => errors.push(e),
                }
            }
            errors.extend(registry.reconcile(&specs).iter().map(ToString::to_string));
            secrets.replace(&sandboxes, values);
        }
        ControlMsg::PutSandbox { sandbox, .. } => {
            match SandboxSpec::from_state(&sandbox, cgroup2) {
                Ok(spec) => {
                    if let Err(e) = registry.put(&spec) {
                        errors.push(e.to_string());
                    }
                }
                Err(e) => errors.push(e),
            }
            secrets.put_sandbox(&sandbox);
        }
        ControlMsg::DeleteSandbox { id, .. } => {
            if let Err(e) = registry.delete(id.as_str()) {
                errors.push(e.to_string());
            }
            secrets.delete_sandbox(id.as_str());
        }
        ControlMsg::PutSecret { secret, .. } => secrets.put_secret(secret),
        ControlMsg::DeleteSecret { id, .. } => secrets.delete_secret(id.as_str()),
        // Answers to the agent's own requests, handled by the session (never acknowledged).
        ControlMsg::Reply { .. } => return errors,
    }
    // Before the acknowledgement: once control answers the change that mounts a sandbox's
    // first secret, its new connections are redirected.
    errors.extend(registry.sync_direct().iter().map(ToString::to_string));
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_or_self_is_trusted() {
        assert!(trusted_peer(0, 1000));
        assert!(trusted_peer(1000, 1000));
        assert!(!trusted_peer(1001, 1000));
        assert!(trusted_peer(0, 0));
        assert!(!trusted_peer(65534, 0));
    }

    fn key(secret: &str, host: &str) -> UsageKey {
        UsageKey {
            sandbox: "sb".into(),
            secret_id: secret.into(),
            host: host.into(),
        }
    }

    #[test]
    fn unsent_reports_aggregate_and_stay_bounded() {
        let mut u = Unsent::default();
        assert!(u.is_empty() && u.usage_msg(SystemTime::now()).is_none());
        let one = SecretUsage {
            substituted: 2,
            ..SecretUsage::default()
        };
        u.merge(vec![(key("s", "h"), one), (key("s", "g"), one)], vec![]);
        u.merge(vec![(key("s", "h"), one)], vec![]);
        let Some(AgentMsg::Usage { reports, at_ms }) = u.usage_msg(UNIX_EPOCH) else {
            panic!("no usage message");
        };
        assert_eq!(at_ms, 0);
        assert_eq!(reports.len(), 2, "one entry per (sandbox, secret, host)");
        let h = reports.iter().find(|r| r.host == "h").unwrap();
        assert_eq!(h.substituted, 4);
        let ev = |n: u64| BlockedEvent {
            key: key("s", "h"),
            at: UNIX_EPOCH + Duration::from_millis(n),
        };
        u.merge(vec![], (0..MAX_UNSENT_BLOCKS as u64 + 5).map(ev).collect());
        assert_eq!(u.dropped_blocks, 5);
        let Some(AgentMsg::Blocked { events }) = u.blocked_msg() else {
            panic!("no blocked message");
        };
        assert_eq!(events.len(), MAX_UNSENT_BLOCKS);
        assert_eq!(events[0].at_ms, 5, "the oldest are dropped first");
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let max = Duration::from_secs(1);
        let mut d = Duration::from_millis(25);
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_delay(d, max);
            seen.push(d);
        }
        assert_eq!(seen[1], Duration::from_millis(50));
        assert_eq!(seen[5], Duration::from_millis(800));
        assert_eq!(*seen.last().unwrap(), max);
        assert_eq!(next_delay(Duration::MAX, max), max);
    }
}
