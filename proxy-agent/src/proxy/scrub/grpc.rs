//! Scrubbing a gRPC response body message by message (issue 20): see `veil_policy::grpc` for
//! why a byte-stream scrub would corrupt its framing. Each message is reassembled, scrubbed and
//! sent on with its new length; trailers are scrubbed like headers. A message veil cannot
//! scrub (compressed, over `veil_policy::grpc::MAX_MESSAGE`, cut off) ends the stream with
//! veil's own trailers (`grpc-status` 13 or 8, a `grpc-message` starting `veil:`), so the client
//! gets a gRPC error and never the message.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use veil_policy::grpc::{Deframer, GrpcError, scrub_message};
use veil_policy::{SandboxPolicy, ScrubPatterns};

use super::body::Watch;
use super::headers::scrub_headers;
use crate::proxy::body::BoxError;
use crate::stats::Stats;

/// The header a gRPC client lists the message codings it accepts in.
pub const ACCEPT_ENCODING: &str = "grpc-accept-encoding";

/// A gRPC response body, scrubbed message by message.
pub struct GrpcScrubBody {
    inner: Incoming,
    deframer: Deframer,
    policy: Arc<SandboxPolicy>,
    /// The union with the current policy's values once it changed (before or during the
    /// response: a rotation mid-stream is scrubbed like in any other body).
    union: Option<Box<ScrubPatterns>>,
    watch: Watch,
    stats: Arc<Stats>,
    done: bool,
}

impl std::fmt::Debug for GrpcScrubBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcScrubBody")
            .field("deframer", &self.deframer)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl GrpcScrubBody {
    /// Wraps `inner`, scrubbing with `policy`'s patterns (or `union`, when given).
    pub fn new(
        inner: Incoming,
        policy: Arc<SandboxPolicy>,
        union: Option<Box<ScrubPatterns>>,
        watch: Watch,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            inner,
            deframer: Deframer::default(),
            policy,
            union,
            watch,
            stats,
            done: false,
        }
    }

    /// Follows a policy change of the sandbox (see [`Watch::follow`]).
    fn follow_policy(&mut self) {
        if let Some(union) = self.watch.follow(&self.policy) {
            if union.is_some() {
                Stats::inc(&self.stats.scrub_policy_switched);
            }
            self.union = union;
        }
    }

    fn patterns(&self) -> &ScrubPatterns {
        self.union
            .as_deref()
            .unwrap_or_else(|| self.policy.scrub_patterns())
    }

    /// Ends the stream with veil's own status for `e`.
    fn fail(&mut self, e: &GrpcError) -> Frame<Bytes> {
        self.done = true;
        Stats::inc(&self.stats.scrub_withheld);
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static(e.status()));
        if let Ok(v) = HeaderValue::from_str(&e.to_string()) {
            t.insert("grpc-message", v);
        }
        Frame::trailers(t)
    }
}

impl Body for GrpcScrubBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    if let Err(e) = this.deframer.finish() {
                        return Poll::Ready(Some(Ok(this.fail(&e))));
                    }
                    this.done = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Some(Ok(frame)) => frame,
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    let messages = match this.deframer.push(&data) {
                        Ok(m) => m,
                        Err(e) => return Poll::Ready(Some(Ok(this.fail(&e)))),
                    };
                    if messages.is_empty() {
                        continue;
                    }
                    this.follow_policy();
                    let mut out = Vec::new();
                    let mut replaced = 0;
                    for m in &messages {
                        let (framed, n) = scrub_message(this.patterns(), m);
                        out.extend_from_slice(&framed);
                        replaced += n;
                    }
                    this.stats.scrubbed.fetch_add(replaced, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
                Err(frame) => frame,
            };
            if let Ok(mut trailers) = frame.into_trailers() {
                if let Err(e) = this.deframer.finish() {
                    return Poll::Ready(Some(Ok(this.fail(&e))));
                }
                this.follow_policy();
                let replaced = scrub_headers(this.patterns(), &mut trailers);
                this.stats.scrubbed.fetch_add(replaced, Ordering::Relaxed);
                this.done = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
