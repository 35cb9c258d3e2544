//! Idle detection for intercepted connections: how many requests are in flight (from arrival to
//! the end of the response body) and when the last one began or ended.
//!
//! A connection is idle when nothing has been in flight for the idle timeout: a slow upstream or
//! a long streamed response keeps its request in flight, so neither is cut. Bytes on the wire are
//! not the measure: h2 keep-alive PINGs move bytes on a connection nobody uses.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use http_body::{Body, Frame, SizeHint};

/// When a connection last moved bytes, and how many of its requests are in flight.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds since `start` of the last request's start or end.
    last_ms: AtomicU64,
    inflight: AtomicUsize,
}

impl Activity {
    /// A connection active now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Marks a request in flight until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InflightGuard(self.clone())
    }

    /// Resolves once the connection has been idle for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let idle_for = self.idle_for();
            let busy = self.inflight.load(Ordering::Relaxed) > 0;
            if !busy && idle_for >= timeout {
                return;
            }
            let wait = if busy { timeout } else { timeout - idle_for };
            // Never spin on a sub-millisecond remainder.
            tokio::time::sleep(wait.max(Duration::from_millis(5))).await;
        }
    }
}

/// A request in flight on a connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct InflightGuard(Arc<Activity>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request in flight until the body ends or is dropped, so a
/// long streamed response is never taken for an idle connection.
#[derive(Debug)]
pub struct InflightBody<B> {
    inner: B,
    guard: Option<InflightGuard>,
}

impl<B> InflightBody<B> {
    /// Wraps `inner`, holding `guard` until it ends.
    pub fn new(inner: B, guard: InflightGuard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body + Unpin> Body for InflightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_quiet_and_no_request_in_flight() {
        use http_body_util::{BodyExt, Full};
        let a = Activity::new();
        let t = Duration::from_millis(300);
        let started = Instant::now();
        a.idle(t).await;
        assert!(started.elapsed() >= t);
        // A request in flight holds it open past the timeout.
        let guard = a.begin();
        let held = tokio::time::timeout(t * 3, a.idle(t)).await;
        assert!(held.is_err());
        // ... and so does its response body until it ends.
        let mut body = InflightBody::new(Full::new(bytes::Bytes::from_static(b"x")), guard);
        let held = tokio::time::timeout(t * 2, a.idle(t)).await;
        assert!(held.is_err());
        assert!(body.frame().await.is_some());
        assert!(body.frame().await.is_none());
        // Ended now: idle no sooner than the timeout from here.
        let started = Instant::now();
        a.idle(t).await;
        assert!(started.elapsed() >= t);
        // A dropped body ends its request too.
        let body = InflightBody::new(Full::new(bytes::Bytes::from_static(b"x")), a.begin());
        drop(body);
        assert_eq!(a.inflight.load(Ordering::Relaxed), 0);
    }
}
