//! [`ScrubBody`]: a response body scrubbed as it streams, decoded first when compressed, with
//! the patterns of its request's policy snapshot — widened to the values of a newer policy as
//! soon as one appears (a rotation or mount during a long response).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZlibDecoder};
use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use veil_policy::scrub::{ContentCoding, ScrubState, Sniff, sniff};
use veil_policy::{SandboxPolicy, ScrubPatterns};
use zeroize::Zeroizing;

use crate::proxy::body::BoxError;
use crate::secrets::SecretStore;
use crate::stats::Stats;

/// Decoded bytes produced per poll: with the decoder's window and one upstream chunk, this
/// bounds what a compressed body (however well it compresses) makes veil hold.
pub const DECODE_BUF: usize = 16 * 1024;

/// Where a streaming body looks for a newer policy of its sandbox.
#[derive(Debug)]
pub struct Watch {
    /// The agent's live secrets.
    pub store: SecretStore,
    /// The sandbox.
    pub sandbox: String,
    /// The store's generation the current patterns were chosen at.
    pub generation: u64,
}

impl Watch {
    /// The patterns to scrub with now: `None` while the sandbox's policy is the snapshot's (or
    /// gone), else the union of the snapshot's values and the current policy's. Recomputed only
    /// when the store changed (one atomic load per call otherwise); `Some(switched)` then.
    pub fn follow(&mut self, snapshot: &Arc<SandboxPolicy>) -> Option<Option<Box<ScrubPatterns>>> {
        let generation = self.store.generation();
        if generation == self.generation {
            return None;
        }
        self.generation = generation;
        Some(match self.store.policy(&self.sandbox) {
            Some(now) if !Arc::ptr_eq(&now, snapshot) => Some(Box::new(snapshot.scrub_union(&now))),
            // Unchanged, or every secret gone: the snapshot's values are still scrubbed.
            _ => None,
        })
    }
}

/// A body whose data (decoded from `coding`) and trailers are scrubbed with the sandbox's
/// patterns; it emits identity data. Replacements are added to `Stats::scrubbed` as they happen.
pub struct ScrubBody<B> {
    source: Source<B>,
    /// The snapshot the request was substituted with.
    policy: Arc<SandboxPolicy>,
    /// The snapshot's values and the current policy's, once the policy changed.
    union: Option<Box<ScrubPatterns>>,
    watch: Option<Watch>,
    state: ScrubState,
    stats: Arc<Stats>,
    /// Replacements already added to `stats`.
    counted: u64,
    /// Whether the output is as long as the input (identity coding, length-preserving patterns).
    same_length: bool,
    /// Set once the source ended and what was held back went out.
    finished: bool,
    /// Scrubbed trailers, sent after the last data.
    trailers: Option<HeaderMap>,
    /// The first decoded bytes, before the check that they are not still compressed.
    sniffing: Sniffing,
}

/// The check of a decoded body's first bytes.
enum Sniffing {
    /// Not decided yet: the decoded bytes so far.
    Undecided(Zeroizing<Vec<u8>>),
    /// Not compressed: these bytes are still to be scrubbed and sent.
    Plain(Zeroizing<Vec<u8>>),
    /// Decided and sent (or an identity body, which is not checked).
    Done,
}

impl<B> std::fmt::Debug for ScrubBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrubBody")
            .field("state", &self.state)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

enum Source<B> {
    Plain(B),
    Decoded {
        decoder: Box<Decoder<B>>,
        buf: Box<[u8]>,
        /// The compressed stream ended; what follows it (trailers) is being read.
        draining: bool,
    },
}

enum Decoder<B> {
    Gzip(GzipDecoder<FrameReader<B>>),
    Zlib(ZlibDecoder<FrameReader<B>>),
    Brotli(BrotliDecoder<FrameReader<B>>),
}

impl<B> ScrubBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Wraps `body`, encoded with `coding`; `same_length` when the caller kept `Content-Length`
    /// (identity coding and length-preserving patterns).
    pub fn new(
        body: B,
        coding: ContentCoding,
        policy: Arc<SandboxPolicy>,
        stats: Arc<Stats>,
        same_length: bool,
    ) -> Self {
        let frames = |body| FrameReader {
            body,
            chunk: Bytes::new(),
            trailers: None,
            done: false,
        };
        let decoder = match coding {
            ContentCoding::Identity => {
                return Self::with_source(Source::Plain(body), policy, stats, same_length);
            }
            ContentCoding::Gzip => {
                let mut d = GzipDecoder::new(frames(body));
                d.multiple_members(true);
                Decoder::Gzip(d)
            }
            ContentCoding::Deflate => Decoder::Zlib(ZlibDecoder::new(frames(body))),
            ContentCoding::Brotli => Decoder::Brotli(BrotliDecoder::new(frames(body))),
        };
        let source = Source::Decoded {
            decoder: Box::new(decoder),
            buf: vec![0; DECODE_BUF].into_boxed_slice(),
            draining: false,
        };
        let mut body = Self::with_source(source, policy, stats, false);
        body.sniffing = Sniffing::Undecided(Zeroizing::new(Vec::new()));
        body
    }

    fn with_source(
        source: Source<B>,
        policy: Arc<SandboxPolicy>,
        stats: Arc<Stats>,
        same_length: bool,
    ) -> Self {
        ScrubBody {
            source,
            policy,
            union: None,
            watch: None,
            state: ScrubState::default(),
            stats,
            counted: 0,
            same_length,
            finished: false,
            trailers: None,
            sniffing: Sniffing::Done,
        }
    }

    /// Follows `watch` for a newer policy, starting from `union` (the patterns chosen when the
    /// response head arrived, if the policy had changed by then).
    pub fn watching(mut self, watch: Watch, union: Option<Box<ScrubPatterns>>) -> Self {
        if union.is_some() {
            Stats::inc(&self.stats.scrub_policy_switched);
        }
        self.watch = Some(watch);
        self.union = union;
        self
    }

    /// Decodes until the first bytes show whether the body is still compressed: `Err` if it
    /// is (or does not decode), so the caller can answer 502 before sending the head.
    pub async fn check_start(&mut self) -> Result<(), BoxError> {
        std::future::poll_fn(|cx| self.poll_sniff(cx)).await
    }

    fn poll_sniff(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let Source::Decoded {
            decoder,
            buf,
            draining,
        } = &mut self.source
        else {
            return Poll::Ready(Ok(()));
        };
        loop {
            let Sniffing::Undecided(head) = &mut self.sniffing else {
                return Poll::Ready(Ok(()));
            };
            let mut read = ReadBuf::new(buf);
            if let Err(e) = ready!(Pin::new(decoder.as_mut()).poll_read(cx, &mut read)) {
                self.finished = true;
                return Poll::Ready(Err(Box::new(DecodeError(e))));
            }
            let ended = read.filled().is_empty();
            head.extend_from_slice(read.filled());
            match sniff(head, ended) {
                Sniff::NeedMore => continue,
                Sniff::Compressed(format) => {
                    Stats::inc(&self.stats.scrub_withheld);
                    self.finished = true;
                    return Poll::Ready(Err(Box::new(StillCompressed(format))));
                }
                Sniff::Plain => {
                    *draining |= ended;
                    let head = std::mem::take(head);
                    self.sniffing = Sniffing::Plain(head);
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }

    /// Switches to the union of the snapshot's values and the current policy's when the store
    /// changed: one atomic load per call otherwise.
    fn follow_policy(&mut self) {
        let Some(watch) = &mut self.watch else {
            return;
        };
        if let Some(union) = watch.follow(&self.policy) {
            if union.is_some() {
                Stats::inc(&self.stats.scrub_policy_switched);
            }
            self.union = union;
        }
    }

    fn count(&mut self) {
        let total = self.state.total();
        if total > self.counted {
            self.stats
                .scrubbed
                .fetch_add(total - self.counted, Ordering::Relaxed);
            self.counted = total;
        }
    }
}

/// What one step of the source gave.
enum Step {
    /// Scrubbed output (possibly empty while a value may be starting).
    Data(Vec<u8>),
    /// The source ended, with these trailers.
    End(Option<HeaderMap>),
}

impl<B> Body for ScrubBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.finished {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            this.follow_policy();
            if let Err(e) = ready!(this.poll_sniff(cx)) {
                return Poll::Ready(Some(Err(e)));
            }
            let patterns: &ScrubPatterns = match &this.union {
                Some(union) => union,
                None => this.policy.scrub_patterns(),
            };
            let step = if let Sniffing::Plain(head) = &mut this.sniffing {
                let head = std::mem::take(head);
                this.sniffing = Sniffing::Done;
                let mut out = Vec::with_capacity(head.len() + patterns.max_len());
                this.state.push(patterns, &head, &mut out);
                Step::Data(out)
            } else {
                match &mut this.source {
                    Source::Plain(body) => match ready!(Pin::new(body).poll_frame(cx)) {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => {
                                let mut out = Vec::with_capacity(data.len() + patterns.max_len());
                                this.state.push(patterns, &data, &mut out);
                                Step::Data(out)
                            }
                            Err(frame) => match frame.into_trailers() {
                                Ok(trailers) => Step::End(Some(trailers)),
                                // A frame kind this body does not know: not forwarded.
                                Err(_) => continue,
                            },
                        },
                        Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                        None => Step::End(None),
                    },
                    Source::Decoded {
                        decoder,
                        buf,
                        draining,
                    } => {
                        if *draining {
                            // Bytes after the end of the compressed stream are not forwarded;
                            // the trailers after them are.
                            let frames = decoder.frames();
                            loop {
                                let n = match ready!(Pin::new(&mut *frames).poll_fill_buf(cx)) {
                                    Ok(rest) => rest.len(),
                                    Err(e) => {
                                        return Poll::Ready(Some(Err(Box::new(DecodeError(e)))));
                                    }
                                };
                                if n == 0 {
                                    break;
                                }
                                Pin::new(&mut *frames).consume(n);
                            }
                            Step::End(frames.trailers.take())
                        } else {
                            let mut read = ReadBuf::new(buf);
                            match ready!(Pin::new(decoder.as_mut()).poll_read(cx, &mut read)) {
                                Ok(()) if read.filled().is_empty() => {
                                    *draining = true;
                                    continue;
                                }
                                Ok(()) => {
                                    let decoded = read.filled();
                                    let mut out =
                                        Vec::with_capacity(decoded.len() + patterns.max_len());
                                    this.state.push(patterns, decoded, &mut out);
                                    Step::Data(out)
                                }
                                Err(e) => {
                                    return Poll::Ready(Some(Err(Box::new(DecodeError(e)))));
                                }
                            }
                        }
                    }
                }
            };
            let out = match step {
                Step::Data(out) => out,
                Step::End(trailers) => {
                    let mut out = Vec::new();
                    this.state.finish(patterns, &mut out);
                    this.trailers = trailers.map(|mut t| {
                        let n = super::headers::scrub_headers(patterns, &mut t);
                        this.stats.scrubbed.fetch_add(n, Ordering::Relaxed);
                        t
                    });
                    this.finished = true;
                    out
                }
            };
            this.count();
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Plain(body) if self.same_length && !self.finished => {
                let inner = body.size_hint();
                match inner.exact() {
                    // Held-back bytes are still to come.
                    Some(n) => SizeHint::with_exact(n + self.state.pending_len() as u64),
                    None => SizeHint::default(),
                }
            }
            _ => SizeHint::default(),
        }
    }
}

/// A compressed body that did not decode; names no content.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's compressed body does not decode: {0}")]
struct DecodeError(io::Error);

/// A body that still starts with a compression format's magic once its content coding was
/// decoded (compressed twice): its values would pass the scrubber.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's body is still {0}-compressed after decoding its content-encoding")]
pub struct StillCompressed(pub &'static str);

impl<B> Decoder<B> {
    fn frames(&mut self) -> &mut FrameReader<B> {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Zlib(d) => d.get_mut(),
            Decoder::Brotli(d) => d.get_mut(),
        }
    }
}

impl<B> AsyncRead for Decoder<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Decoder::Gzip(d) => Pin::new(d).poll_read(cx, buf),
            Decoder::Zlib(d) => Pin::new(d).poll_read(cx, buf),
            Decoder::Brotli(d) => Pin::new(d).poll_read(cx, buf),
        }
    }
}

/// A body's data frames as a byte stream for a decoder; keeps the trailers aside.
struct FrameReader<B> {
    body: B,
    /// The rest of the current data frame.
    chunk: Bytes,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl<B> AsyncBufRead for FrameReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        while this.chunk.is_empty() && !this.done {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.chunk = data,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.trailers = Some(trailers);
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e.into()))),
                None => this.done = true,
            }
        }
        Poll::Ready(Ok(&this.chunk))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        self.get_mut().chunk.advance(amt);
    }
}

impl<B> AsyncRead for FrameReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let available = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
