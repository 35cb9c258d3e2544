//! WebSocket on an intercepted connection (issue 20), over an HTTP/1.1 `Upgrade` or an h2
//! extended CONNECT (RFC 8441, `:protocol websocket`): the opening request is substituted like
//! any request (in `forward`) and forwarded the same way (h1 Upgrade to an h1 upstream,
//! extended CONNECT to an h2 one); after the upstream's 101 (h1) or 200 (h2) both sides'
//! upgraded streams are handed to [`relay`], which passes every message through
//! `veil_policy::websocket` — the same relay for both, as both are hyper `Upgraded` streams.
//! An h2 upstream that refuses extended CONNECT (resets the stream: it did not enable it) gets
//! the client's stream reset with `HTTP_1_1_REQUIRED`, which clients answer by retrying over
//! HTTP/1.1.
//!
//! - **server → client**: text and binary messages are scrubbed whole (tungstenite reassembles
//!   fragments, within `websocket_max_message_bytes`, so a value split across fragments is one
//!   text to the scrubber); ping, pong and close payloads are scrubbed too and cut to fit their
//!   frame. Patterns are the upgrade request's policy snapshot, widened to the current policy's
//!   values as soon as the sandbox's secrets change (a rotation during a long session).
//! - **client → server**: placeholders are substituted only where request bodies get it (some
//!   secret's `bodySubstitution`, or `body_substitution` in config), with the current policy;
//!   a placeholder that cannot be substituted safely, or one of a blocking secret going to a host
//!   it does not allow, closes the WebSocket with 1008.
//! - **extensions**: `Sec-WebSocket-Extensions` is removed from the client's offer, so no
//!   `permessage-deflate`: compressed frames are not scrubbable without inflating them, and
//!   inflating would need a per-connection window held in the agent. A 101 that names an
//!   extension anyway is answered 502; a frame with a reserved bit (RSV1 = compressed) or an
//!   unknown opcode closes the WebSocket with 1008 and a `veil:` reason — never passed on.
//! - **limits**: frames over `websocket_max_frame_bytes` or messages over
//!   `websocket_max_message_bytes` close both sides with 1009; no frame either way for
//!   `websocket_idle_timeout_ms` closes both with 1001. Pings are answered on each hop by the
//!   protocol layer and passed on, scrubbed.
//!
//! Each direction runs on its own, so a side that writes without reading never stalls the
//! other direction. Close reasons veil writes itself start with `veil:` and name no value.

mod handshake;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::debug;
use veil_policy::websocket::{
    CLOSE_IDLE, CLOSE_POLICY, CLOSE_PROTOCOL, CLOSE_TOO_BIG, MAX_CLOSE_REASON, message_kind,
    scrub_binary, scrub_close_reason, scrub_control, scrub_text, truncate_text,
};
use veil_policy::{SandboxPolicy, ScrubPatterns};

pub use handshake::{
    Opening, fall_back_to_h1, opening, prepare_request, prepare_response, refused_extended_connect,
};

use crate::proxy::conn::ConnContext;
use crate::proxy::idle::InflightGuard;
use crate::stats::Stats;

/// Relays one WebSocket once both sides have switched; `inflight` keeps the connection from
/// counting as idle while it lasts. Runs to the end of the WebSocket.
pub async fn relay(
    ctx: Arc<ConnContext>,
    snapshot: Option<Arc<SandboxPolicy>>,
    host_ok: bool,
    client: OnUpgrade,
    upstream: OnUpgrade,
    inflight: InflightGuard,
) {
    let _inflight = inflight;
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            debug!(sandbox = %ctx.sandbox, sni = %ctx.sni, error = %e, "WebSocket upgrade did not complete");
            return;
        }
    };
    Stats::inc(&ctx.stats.websocket_relayed);
    let limits = ctx.limits.websocket;
    let config = WebSocketConfig::default()
        .max_frame_size(Some(limits.max_frame_bytes))
        .max_message_size(Some(limits.max_message_bytes));
    let (client_tx, client_rx) = socket(client, Role::Server, config).await.split();
    let (upstream_tx, upstream_rx) = socket(upstream, Role::Client, config).await.split();
    let relay = Relay {
        patterns: tokio::sync::Mutex::new(Patterns::new(&ctx, snapshot)),
        host_ok,
        client: tokio::sync::Mutex::new(client_tx),
        upstream: tokio::sync::Mutex::new(upstream_tx),
        started: Instant::now(),
        last: AtomicU64::new(0),
        ctx,
    };
    relay.run(client_rx, upstream_rx, limits.idle_timeout).await;
}

async fn socket(io: Upgraded, role: Role, config: WebSocketConfig) -> Socket {
    WebSocketStream::from_raw_socket(TokioIo::new(io), role, Some(config)).await
}

type Socket = WebSocketStream<TokioIo<Upgraded>>;
type Tx = SplitSink<Socket, Message>;
type Rx = SplitStream<Socket>;

/// One relayed WebSocket. Each direction runs on its own (a side that writes without reading
/// never blocks the other direction); the sending halves are shared, as either direction may
/// have to close both.
struct Relay {
    ctx: Arc<ConnContext>,
    patterns: tokio::sync::Mutex<Patterns>,
    host_ok: bool,
    client: tokio::sync::Mutex<Tx>,
    upstream: tokio::sync::Mutex<Tx>,
    started: Instant,
    /// Milliseconds from `started` to the last frame either way, for the idle timeout.
    last: AtomicU64,
}

/// What ended a step of the relay.
enum Step {
    /// Go on.
    Continue,
    /// This direction is over (closed, or failed and both sides closed by veil).
    Done,
}

impl Relay {
    async fn run(&self, mut client_rx: Rx, mut upstream_rx: Rx, idle: Duration) {
        let down = async {
            while let Step::Continue = self.server_message(upstream_rx.next().await).await {}
        };
        let up = async {
            while let Step::Continue = self.client_message(client_rx.next().await).await {}
        };
        let watchdog = async {
            loop {
                let quiet = self
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    return;
                }
                tokio::time::sleep(idle - quiet).await;
            }
        };
        tokio::pin!(down, up, watchdog);
        // When one direction ends, the other gets a moment to finish the close handshake.
        tokio::select! {
            () = &mut down => { let _ = tokio::time::timeout(CLOSE_WAIT, &mut up).await; }
            () = &mut up => { let _ = tokio::time::timeout(CLOSE_WAIT, &mut down).await; }
            () = &mut watchdog => {
                Stats::inc(&self.ctx.stats.websocket_closed);
                debug!(sandbox = %self.ctx.sandbox, sni = %self.ctx.sni, "idle WebSocket closed");
                self.close_both(CLOSE_IDLE, "veil: idle timeout").await;
            }
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    async fn server_message(&self, msg: Option<Result<Message, WsError>>) -> Step {
        let msg = match msg {
            Some(Ok(msg)) => msg,
            None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                let _ = self.client.lock().await.close().await;
                return Step::Done;
            }
            Some(Err(e)) => return self.upstream_failed(&e).await,
        };
        self.touch();
        let mut patterns = self.patterns.lock().await;
        let Some(patterns) = patterns.current(&self.ctx) else {
            return self.send_client(msg).await;
        };
        let (out, replaced) = match msg {
            Message::Text(text) => {
                let s = scrub_text(patterns, text.as_str());
                (Message::Text(s.payload.into()), s.replaced)
            }
            Message::Binary(data) => {
                let s = scrub_binary(patterns, &data);
                (Message::Binary(s.payload.into()), s.replaced)
            }
            Message::Ping(data) => {
                let s = scrub_control(patterns, &data);
                (Message::Ping(s.payload.into()), s.replaced)
            }
            Message::Pong(data) => {
                let s = scrub_control(patterns, &data);
                (Message::Pong(s.payload.into()), s.replaced)
            }
            Message::Close(frame) => match frame {
                Some(f) => {
                    let s = scrub_close_reason(patterns, f.reason.as_str());
                    let frame = CloseFrame {
                        code: f.code,
                        reason: s.payload.into(),
                    };
                    (Message::Close(Some(frame)), s.replaced)
                }
                None => (Message::Close(None), 0),
            },
            // Only produced when writing raw frames, never by a read.
            Message::Frame(_) => return Step::Continue,
        };
        self.ctx
            .stats
            .scrubbed
            .fetch_add(replaced, Ordering::Relaxed);
        self.send_client(out).await
    }

    async fn send_client(&self, msg: Message) -> Step {
        let closing = matches!(msg, Message::Close(_));
        match self.client.lock().await.send(msg).await {
            // The client's answer to a close is read by the other direction.
            Ok(()) if !closing => Step::Continue,
            Ok(()) => Step::Done,
            Err(e) => {
                debug!(sandbox = %self.ctx.sandbox, sni = %self.ctx.sni, error = %e, "WebSocket client gone");
                let _ = self.upstream.lock().await.close().await;
                Step::Done
            }
        }
    }

    async fn client_message(&self, msg: Option<Result<Message, WsError>>) -> Step {
        let msg = match msg {
            Some(Ok(msg)) => msg,
            None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                let _ = self.upstream.lock().await.close().await;
                return Step::Done;
            }
            Some(Err(e)) => {
                let (code, reason) = failure(&e);
                Stats::inc(&self.ctx.stats.websocket_closed);
                debug!(sandbox = %self.ctx.sandbox, sni = %self.ctx.sni, error = %e, "WebSocket client failed");
                self.close_both(code, reason).await;
                return Step::Done;
            }
        };
        self.touch();
        let msg = match msg {
            Message::Text(text) => match self.substitute(true, text.as_bytes()) {
                Ok(None) => Message::Text(text),
                Ok(Some(new)) => match String::from_utf8(new) {
                    Ok(new) => Message::Text(new.into()),
                    Err(_) => {
                        return self
                            .refuse("veil: a substituted text message is not UTF-8".into())
                            .await;
                    }
                },
                Err(reason) => return self.refuse(reason).await,
            },
            Message::Binary(data) => match self.substitute(false, &data) {
                Ok(None) => Message::Binary(data),
                Ok(Some(new)) => Message::Binary(new.into()),
                Err(reason) => return self.refuse(reason).await,
            },
            Message::Frame(_) => return Step::Continue,
            other => other,
        };
        let closing = matches!(msg, Message::Close(_));
        match self.upstream.lock().await.send(msg).await {
            Ok(()) if !closing => Step::Continue,
            Ok(()) => Step::Done,
            Err(e) => {
                debug!(sandbox = %self.ctx.sandbox, sni = %self.ctx.sni, error = %e, "WebSocket upstream gone");
                let _ = self.client.lock().await.close().await;
                Step::Done
            }
        }
    }

    /// Substitutes placeholders in a client message where bodies get it: `Ok(None)` when nothing
    /// changed, `Err` with the close reason when the message must not go on.
    fn substitute(&self, text: bool, payload: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let ctx = &self.ctx;
        let Some(policy) = ctx.secrets.policy(ctx.sandbox.as_str()) else {
            return Ok(None);
        };
        if !policy.body_scan_needed(&ctx.sni) {
            return Ok(None);
        }
        let kind = message_kind(text, payload);
        let sub = policy
            .substitute_body(&ctx.sni, self.host_ok, kind, payload)
            .map_err(|e| {
                Stats::inc(&ctx.stats.refused);
                format!("veil: {e}")
            })?;
        if !sub.hits.is_empty() {
            ctx.stats
                .record_hits(ctx.sandbox.as_str(), ctx.sni.as_str(), &policy, &sub.hits);
        }
        if let Some(secret) = policy.blocked_by(&sub.hits) {
            ctx.stats
                .record_blocked(ctx.sandbox.as_str(), ctx.sni.as_str(), &secret.id);
            return Err(format!(
                "veil: secret {} ({}) is not allowed for host {}",
                secret.name, secret.id, ctx.sni
            ));
        }
        Ok(sub.body.map(|b| b.as_bytes().to_vec()))
    }

    async fn refuse(&self, reason: String) -> Step {
        Stats::inc(&self.ctx.stats.websocket_closed);
        debug!(sandbox = %self.ctx.sandbox, sni = %self.ctx.sni, %reason, "WebSocket message refused");
        let reason = truncate_text(reason, MAX_CLOSE_REASON);
        self.close_both(CLOSE_POLICY, &reason).await;
        Step::Done
    }

    async fn upstream_failed(&self, e: &WsError) -> Step {
        let (code, reason) = failure(e);
        Stats::inc(&self.ctx.stats.websocket_closed);
        debug!(sandbox = %self.ctx.sandbox, sni = %self.ctx.sni, error = %e, "WebSocket upstream failed");
        self.close_both(code, reason).await;
        Step::Done
    }

    /// Closes both sides with `code` and `reason` (veil's own words, no value).
    async fn close_both(&self, code: u16, reason: &str) {
        let frame = |reason: &str| {
            Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            }))
        };
        let _ = self.client.lock().await.send(frame(reason)).await;
        let _ = self.upstream.lock().await.send(frame(reason)).await;
    }
}

/// How long a closing side gets to answer the close before its socket is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The close code and reason for a failed read.
fn failure(e: &WsError) -> (u16, &'static str) {
    match e {
        WsError::Protocol(
            ProtocolError::NonZeroReservedBits
            | ProtocolError::UnknownDataFrameType(_)
            | ProtocolError::UnknownControlFrameType(_),
        ) => (
            CLOSE_POLICY,
            "veil: a compressed or extension frame veil did not negotiate and cannot scrub",
        ),
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => (
            CLOSE_TOO_BIG,
            "veil: frame or message over websocket_max_frame_bytes / websocket_max_message_bytes",
        ),
        WsError::Capacity(_) => (CLOSE_TOO_BIG, "veil: over a WebSocket size limit"),
        _ => (CLOSE_PROTOCOL, "veil: WebSocket protocol error"),
    }
}

/// The patterns server messages are scrubbed with: the upgrade's snapshot, widened to the
/// current policy's values once the sandbox's secrets change.
struct Patterns {
    snapshot: Option<Arc<SandboxPolicy>>,
    union: Option<Box<ScrubPatterns>>,
    generation: u64,
    /// The sandbox's policy when last looked at: a generation change elsewhere in the agent
    /// (another sandbox's secrets) leaves it as it is, and the union needs no rebuild.
    seen: Option<Arc<SandboxPolicy>>,
    /// Whether scrubbing is on at all (`scrub_responses`).
    on: bool,
}

impl Patterns {
    fn new(ctx: &ConnContext, snapshot: Option<Arc<SandboxPolicy>>) -> Self {
        Self {
            seen: snapshot.clone(),
            snapshot,
            union: None,
            generation: ctx.secrets.generation(),
            on: ctx.scrub,
        }
    }

    /// The patterns for the next message; `None` when there is nothing to scrub.
    fn current(&mut self, ctx: &ConnContext) -> Option<&ScrubPatterns> {
        if !self.on {
            return None;
        }
        let generation = ctx.secrets.generation();
        if generation != self.generation {
            self.generation = generation;
            let now = ctx.secrets.policy(ctx.sandbox.as_str());
            let unchanged = match (&self.seen, &now) {
                (Some(seen), Some(now)) => Arc::ptr_eq(seen, now),
                (None, None) => true,
                _ => false,
            };
            if unchanged {
                return self.pick();
            }
            self.seen.clone_from(&now);
            self.union = match (&self.snapshot, now) {
                (Some(snap), Some(now)) if !Arc::ptr_eq(snap, &now) => {
                    Stats::inc(&ctx.stats.scrub_policy_switched);
                    Some(Box::new(snap.scrub_union(&now)))
                }
                (None, Some(now)) => {
                    self.snapshot = Some(now);
                    None
                }
                _ => self.union.take(),
            };
        }
        self.pick()
    }

    /// The union when there is one, else the snapshot's patterns if it scrubs.
    fn pick(&self) -> Option<&ScrubPatterns> {
        if let Some(union) = &self.union {
            return Some(union);
        }
        let snapshot = self.snapshot.as_deref()?;
        snapshot.scrubs().then(|| snapshot.scrub_patterns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veil_close_reasons_fit_a_close_frame() {
        let errors = [
            WsError::Protocol(ProtocolError::NonZeroReservedBits),
            WsError::Capacity(CapacityError::MessageTooLong {
                size: 2,
                max_size: 1,
            }),
            WsError::Capacity(CapacityError::TooManyHeaders),
            WsError::Protocol(ProtocolError::HandshakeIncomplete),
        ];
        for e in &errors {
            let (_, reason) = failure(e);
            assert!(
                reason.starts_with("veil:") && reason.len() <= MAX_CLOSE_REASON,
                "{reason}"
            );
        }
        assert_eq!(failure(&errors[0]).0, CLOSE_POLICY);
    }
}
