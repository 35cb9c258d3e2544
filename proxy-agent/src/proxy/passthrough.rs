//! Passthrough: bytes copied both ways untouched, zero-copy through a pipe with splice(2).
//!
//! Each direction owns a pipe; data moves socket → pipe → socket inside the kernel, so a bulk
//! transfer never touches userspace memory. A read EOF is passed on as a write shutdown, so
//! half-closed connections keep working; the first error ends both directions.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{Shutdown, shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes the pipe is asked to hold; larger pipes mean fewer syscalls per byte on bulk transfers.
const PIPE_SIZE: usize = 1 << 20;

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
    let (up, down) = tokio::try_join!(
        splice_one_way(client, upstream),
        splice_one_way(upstream, client)
    )?;
    Ok(Transferred { up, down })
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // The default (64 KiB) still works when the pipe-max-size sysctl refuses a larger size.
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int)) {
            Ok(n) => usize::try_from(n).unwrap_or(1 << 16),
            Err(_) => 1 << 16,
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

async fn splice_one_way(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let pipe = Pipe::new()?;
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
        let proxy =
            tokio::spawn(async move { splice_bidirectional(&proxy_in, &proxy_out).await.unwrap() });

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
    }
}
