//! Passthrough: bytes copied both ways untouched, zero-copy through a pipe with splice(2).
//!
//! Each direction owns a pipe while it runs; data moves socket → pipe → socket inside the
//! kernel, so a bulk transfer never touches userspace memory. A direction that ends cleanly
//! gives its (empty) pipe back to a process-wide [`PipePool`], so a new connection usually
//! makes no pipe at all. A read EOF is passed on as a write shutdown, so half-closed
//! connections keep working; the first error ends both directions (and closes their pipes).

use std::io;
use std::os::fd::AsFd;

use nix::fcntl::{SpliceFFlags, splice};
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::pipes::PipePool;

/// Idle pipes kept across connections: enough for the connections a busy agent opens at
/// once (two pipes each), few enough that the descriptors they hold do not matter.
static PIPES: PipePool = PipePool::new(64);

/// Bytes moved by a finished passthrough.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the client (sandbox) to the upstream.
    pub up: u64,
    /// From the upstream to the client.
    pub down: u64,
}

/// Copies `client` ↔ `upstream` until both directions reached EOF or one failed.
pub async fn splice_bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
) -> io::Result<Transferred> {
    splice_with(&PIPES, client, upstream).await
}

async fn splice_with(
    pool: &PipePool,
    client: &TcpStream,
    upstream: &TcpStream,
) -> io::Result<Transferred> {
    let (up, down) = tokio::try_join!(
        splice_one_way(pool, client, upstream),
        splice_one_way(pool, upstream, client)
    )?;
    Ok(Transferred { up, down })
}

/// Moves `src`'s bytes to `dst` until EOF, then shuts `dst`'s write side. The pipe goes back
/// to `pool` only from the end of the loop, where it is empty; an error or a cancelled future
/// (the other direction failed) drops it, bytes and all.
async fn splice_one_way(pool: &PipePool, src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let pipe = pool.take()?;
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut total = 0u64;
    loop {
        let n = src
            .async_io(Interest::READABLE, || {
                Ok(splice(
                    src.as_fd(),
                    None,
                    &pipe.write,
                    None,
                    pipe.capacity,
                    flags,
                )?)
            })
            .await?;
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            left -= dst
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe.read, None, dst.as_fd(), None, left, flags)?)
                })
                .await?;
        }
        total += n as u64;
    }
    pool.put(pipe);
    match shutdown_write(dst) {
        // The peer may already be gone; what it did not read is lost either way.
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
        other => other?,
    }
    Ok(total)
}

fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    Ok(shutdown(stream.as_raw_fd(), Shutdown::Write)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client ⇄ [proxy_in | splice | proxy_out] ⇄ server, on loopback.
    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, proxy_in) = pair(&l).await;
        let (proxy_out, mut server) = pair(&l).await;
        let pool = std::sync::Arc::new(PipePool::new(4));
        let proxy_pool = pool.clone();
        let proxy = tokio::spawn(async move {
            splice_with(&proxy_pool, &proxy_in, &proxy_out)
                .await
                .unwrap()
        });

        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..700_000u32).map(|i| (i % 241) as u8).collect();
        let up2 = up.clone();
        let writer = tokio::spawn(async move {
            let (mut r, mut w) = client.split();
            let send = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            got
        });
        let mut got_up = Vec::new();
        server.read_to_end(&mut got_up).await.unwrap();
        assert_eq!(got_up, up, "upstream received other bytes");
        // The client's write side is closed but it still reads: answer after its EOF.
        server.write_all(&down).await.unwrap();
        server.shutdown().await.unwrap();
        let got_down = writer.await.unwrap();
        assert_eq!(got_down, down, "client received other bytes");
        let t = proxy.await.unwrap();
        assert_eq!(t.up, up.len() as u64);
        assert_eq!(t.down, down.len() as u64);
        assert_eq!(
            pool.idle(),
            2,
            "both emptied pipes are kept for the next connection"
        );
    }

    /// A pipe that may hold one connection's bytes never serves another: when the upstream
    /// resets with bytes in flight, whatever the pool keeps is empty.
    #[tokio::test]
    async fn a_failed_direction_leaves_no_bytes_in_the_pool() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, proxy_in) = pair(&l).await;
        let (proxy_out, server) = pair(&l).await;
        let pool = std::sync::Arc::new(PipePool::new(4));
        let proxy_pool = pool.clone();
        let proxy =
            tokio::spawn(async move { splice_with(&proxy_pool, &proxy_in, &proxy_out).await });
        // The upstream goes away with a reset while the client keeps sending.
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        let chunk = vec![0x5au8; 1 << 16];
        for _ in 0..256 {
            if client.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let result = proxy.await.unwrap();
        assert!(
            result.is_err(),
            "a reset upstream ends the passthrough with an error"
        );
        while pool.idle() > 0 {
            let pipe = pool.take().unwrap();
            let mut byte = [0u8; 1];
            assert_eq!(
                nix::unistd::read(&pipe.read, &mut byte),
                Err(nix::errno::Errno::EAGAIN),
                "a pooled pipe held bytes"
            );
        }
    }
}
