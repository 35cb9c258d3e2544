//! Peek the ClientHello: read the first bytes of a connection, bounded in size and time, and
//! hand them on in front of the stream, so nothing the client sent is lost whichever way the
//! connection goes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use veil_policy::client_hello::MAX_PEEK_LEN;
use veil_policy::{ClientHelloInfo, NotTlsReason, Peek, parse_client_hello};

/// What the first bytes turned out to be.
#[derive(Debug)]
pub enum Peeked {
    /// A complete ClientHello.
    Tls(ClientHelloInfo),
    /// Not a ClientHello veil understands.
    NotTls(NotTlsReason),
    /// The client sent nothing decisive within the peek timeout (server-speaks-first
    /// protocols end up here).
    Timeout,
    /// The client closed its side before a decision.
    Eof,
}

/// Reads from `stream` into `buf` until the policy's parser decides, `timeout` passes, the
/// client stops sending, or [`MAX_PEEK_LEN`] bytes are buffered. The bytes stay in `buf`.
pub async fn peek_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> io::Result<Peeked> {
    let read = async {
        // Hellos are usually one segment of 0.3–2 KiB; bigger ones take a few reads.
        let mut chunk = [0u8; 4096];
        loop {
            match parse_client_hello(buf) {
                Peek::Tls(info) => return Ok(Peeked::Tls(info)),
                Peek::NotTls(reason) => return Ok(Peeked::NotTls(reason)),
                Peek::NeedMore => {}
            }
            if buf.len() >= MAX_PEEK_LEN {
                return Ok(Peeked::NotTls(NotTlsReason::TooLarge));
            }
            let want = chunk.len().min(MAX_PEEK_LEN - buf.len());
            let n = stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Ok(Peeked::Eof);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Ok(Peeked::Timeout),
    }
}

/// A stream that first yields `prefix`, then reads from `inner`; writes go to `inner`.
#[derive(Debug)]
pub struct PrefixedStream<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> PrefixedStream<S> {
    /// Replays `prefix` before `inner`'s bytes.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                // The hello is not needed any more; free it.
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const HELLO: &[u8] = include_bytes!("../../../policy/testdata/curl_http2.bin");

    #[tokio::test]
    async fn prefix_then_inner_with_small_reads() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut s = PrefixedStream::new(b"hello ".to_vec(), b);
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut out = Vec::new();
        let mut small = [0u8; 4];
        loop {
            let n = s.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&small[..n]);
        }
        assert_eq!(out, b"hello world");
    }

    #[tokio::test]
    async fn writes_go_to_the_inner_stream() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut s = PrefixedStream::new(b"x".to_vec(), b);
        s.write_all(b"up").await.unwrap();
        let mut got = [0u8; 2];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"up");
    }

    #[tokio::test]
    async fn hello_in_pieces_is_peeked_and_replayed_whole() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            for piece in HELLO.chunks(7) {
                a.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            a.write_all(b"after").await.unwrap();
            a
        });
        let mut buf = Vec::new();
        let got = peek_hello(&mut b, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        let Peeked::Tls(info) = got else {
            panic!("{got:?}")
        };
        assert!(info.sni.is_some());
        let _a = writer.await.unwrap();
        let mut s = PrefixedStream::new(buf, b);
        let mut all = vec![0u8; HELLO.len() + 5];
        s.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..HELLO.len()], HELLO);
        assert_eq!(&all[HELLO.len()..], b"after");
    }

    #[tokio::test]
    async fn plain_text_silence_and_eof() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = Vec::new();
        let got = peek_hello(&mut b, &mut buf, Duration::from_secs(5)).await;
        assert!(matches!(
            got,
            Ok(Peeked::NotTls(NotTlsReason::NotHandshake))
        ));
        assert_eq!(buf, b"GET / HTTP/1.1\r\n");

        let (_a, mut b) = tokio::io::duplex(1024);
        let mut buf = Vec::new();
        let got = peek_hello(&mut b, &mut buf, Duration::from_millis(20)).await;
        assert!(matches!(got, Ok(Peeked::Timeout)), "{got:?}");

        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(&HELLO[..10]).await.unwrap();
        drop(a);
        let mut buf = Vec::new();
        let got = peek_hello(&mut b, &mut buf, Duration::from_secs(5)).await;
        assert!(matches!(got, Ok(Peeked::Eof)), "{got:?}");
        assert_eq!(buf, &HELLO[..10]);
    }
}
