//! Bodies crossing the proxy: their types, reading a request body up to a bound for
//! substitution, and replaying what was read.
//!
//! A body within the bound is read whole (its trailers kept); one over it is handed on as the
//! frames already read followed by the rest, byte for byte, so a large upload is delayed by at
//! most the bound and never changed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

/// Error type of bodies crossing the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request or response body as the proxy passes it on.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body read up to a bound.
#[derive(Debug)]
pub enum Bounded<B> {
    /// The whole body, and its trailers if it had any.
    Whole(Vec<u8>, Option<HeaderMap>),
    /// Over the bound: the frames read so far, then the rest.
    Over(Replay<B>),
}

/// Reads `body` while it stays within `max` bytes.
pub async fn read_bounded<B>(mut body: B, max: usize) -> Result<Bounded<B>, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    // A declared length over the bound needs no reading at all.
    if body.size_hint().lower() > max as u64 {
        return Ok(Bounded::Over(Replay::new(VecDeque::new(), Some(body))));
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        match frame.into_data() {
            Ok(data) => {
                if buf.len() + data.len() > max {
                    let mut frames = VecDeque::with_capacity(2);
                    if !buf.is_empty() {
                        frames.push_back(Frame::data(Bytes::from(buf)));
                    }
                    frames.push_back(Frame::data(data));
                    return Ok(Bounded::Over(Replay::new(frames, Some(body))));
                }
                buf.extend_from_slice(&data);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok(Bounded::Whole(buf, trailers))
}

/// Frames already read, then the rest of a body (if any).
#[derive(Debug)]
pub struct Replay<B> {
    frames: VecDeque<Frame<Bytes>>,
    rest: Option<B>,
}

impl<B> Replay<B> {
    /// `frames` first, then `rest`.
    pub fn new(frames: VecDeque<Frame<Bytes>>, rest: Option<B>) -> Self {
        Self { frames, rest }
    }

    fn buffered_len(&self) -> u64 {
        self.frames
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.len() as u64)
            .sum()
    }
}

/// A whole body (e.g. substituted) with its trailers.
pub fn whole(data: Bytes, trailers: Option<HeaderMap>) -> Replay<http_body_util::Empty<Bytes>> {
    let mut frames = VecDeque::with_capacity(2);
    if !data.is_empty() {
        frames.push_back(Frame::data(data));
    }
    if let Some(t) = trailers {
        frames.push_back(Frame::trailers(t));
    }
    Replay::new(frames, None)
}

impl<B> Body for Replay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered_len();
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(rest) => {
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower().saturating_add(buffered));
                if let Some(u) = r.upper() {
                    h.set_upper(u.saturating_add(buffered));
                }
                h
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};

    /// A body of these chunks (and trailers), sizes not declared.
    fn chunks(parts: &[&'static [u8]], trailers: bool) -> Replay<Empty<Bytes>> {
        let mut frames: VecDeque<_> = parts
            .iter()
            .map(|p| Frame::data(Bytes::from_static(p)))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-t", http::HeaderValue::from_static("1"));
            frames.push_back(Frame::trailers(t));
        }
        // Some(Empty) makes the size unknown, like a chunked upload.
        Replay::new(frames, Some(Empty::new()))
    }

    async fn collect<B>(b: B) -> (Vec<u8>, Option<HeaderMap>)
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let c = b.collect().await.unwrap();
        let t = c.trailers().cloned();
        (c.to_bytes().to_vec(), t)
    }

    #[tokio::test]
    async fn within_the_bound_is_read_whole_with_trailers() {
        let Bounded::Whole(data, t) = read_bounded(chunks(&[b"ab", b"cd"], true), 4)
            .await
            .unwrap()
        else {
            panic!("over")
        };
        assert_eq!(data, b"abcd");
        assert!(t.is_some());
        let (out, t) = collect(whole(Bytes::from(data), t)).await;
        assert_eq!(out, b"abcd");
        assert!(t.is_some());
        let w = whole(Bytes::from_static(b"xyz"), None);
        assert_eq!(w.size_hint().exact(), Some(3));
    }

    #[tokio::test]
    async fn over_the_bound_replays_everything_unchanged() {
        let Bounded::Over(r) = read_bounded(chunks(&[b"ab", b"cd", b"ef"], true), 3)
            .await
            .unwrap()
        else {
            panic!("whole")
        };
        let (out, t) = collect(r).await;
        assert_eq!(out, b"abcdef");
        assert!(t.is_some());
        // A declared length over the bound is not read at all.
        let full = Full::new(Bytes::from_static(b"0123456789"));
        let Bounded::Over(r) = read_bounded(full, 9).await.unwrap() else {
            panic!("whole")
        };
        assert_eq!(r.size_hint().exact(), Some(10));
        assert_eq!(collect(r).await.0, b"0123456789");
        // Exactly at the bound is whole.
        let full = Full::new(Bytes::from_static(b"012345678"));
        assert!(matches!(
            read_bounded(full, 9).await.unwrap(),
            Bounded::Whole(..)
        ));
    }
}
