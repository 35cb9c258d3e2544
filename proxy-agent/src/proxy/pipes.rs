//! Pipes for splice(2), kept between connections.
//!
//! Each passthrough direction needs a pipe; making one costs `pipe2` plus `F_SETPIPE_SZ`
//! (which allocates the larger ring), twice per connection. A finished direction hands its
//! pipe back here instead, and the next connection takes it. A pipe is shared between
//! connections of different sandboxes over time, so one that might still hold bytes is never
//! kept: only a direction that moved everything it read gives its pipe back, and the pool
//! checks with a non-blocking read that it is empty before keeping it (anything else is closed).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// Bytes a pipe is asked to hold; larger pipes mean fewer syscalls per byte on bulk transfers.
const PIPE_SIZE: usize = 1 << 20;
/// What a pipe holds when the pipe-max-size sysctl refuses [`PIPE_SIZE`]: the default.
const DEFAULT_PIPE_SIZE: usize = 1 << 16;

/// One pipe: data spliced into `write` comes out of `read`.
#[derive(Debug)]
pub struct Pipe {
    /// The end splice reads from.
    pub read: OwnedFd,
    /// The end splice writes to.
    pub write: OwnedFd,
    /// Bytes it can hold.
    pub capacity: usize,
}

impl Pipe {
    /// A new non-blocking pipe of [`PIPE_SIZE`] bytes (or the default size).
    pub fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int)) {
            Ok(n) => usize::try_from(n).unwrap_or(DEFAULT_PIPE_SIZE),
            Err(_) => DEFAULT_PIPE_SIZE,
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Whether the pipe holds no bytes: a non-blocking read of an empty pipe whose write end
    /// is open fails with `EAGAIN`. Anything else (bytes, an error) is "not known to be
    /// empty"; the byte such a read may consume does not matter, as that pipe is closed.
    fn is_empty(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            nix::unistd::read(&self.read, &mut byte),
            Err(nix::errno::Errno::EAGAIN)
        )
    }
}

/// Empty pipes waiting for the next connection, at most `max` of them (each costs two file
/// descriptors and its ring; the ring's pages are allocated only while it holds bytes).
#[derive(Debug)]
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    max: usize,
}

impl PipePool {
    /// An empty pool keeping at most `max` idle pipes.
    pub const fn new(max: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max,
        }
    }

    /// An idle pipe, or a new one.
    pub fn take(&self) -> io::Result<Pipe> {
        // A poisoned lock only means another thread panicked while pushing or popping a Vec:
        // the pipes in it are still whole, but a fresh pipe is as good and needs no reasoning.
        if let Ok(mut idle) = self.idle.lock()
            && let Some(pipe) = idle.pop()
        {
            return Ok(pipe);
        }
        Pipe::new()
    }

    /// Keeps `pipe` for another connection if it is empty and the pool has room; closes it
    /// otherwise. Call only after every byte spliced into it was spliced out again.
    pub fn put(&self, pipe: Pipe) {
        if !pipe.is_empty() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max
        {
            idle.push(pipe);
        }
    }

    /// Idle pipes held now.
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn fill(pipe: &Pipe, bytes: &[u8]) {
        nix::unistd::write(&pipe.write, bytes).unwrap();
    }

    #[test]
    fn an_empty_pipe_is_reused() {
        let pool = PipePool::new(4);
        let pipe = pool.take().unwrap();
        let fd = pipe.read.as_raw_fd();
        pool.put(pipe);
        assert_eq!(pool.idle(), 1);
        let again = pool.take().unwrap();
        assert_eq!(again.read.as_raw_fd(), fd, "the idle pipe comes back");
        assert_eq!(pool.idle(), 0);
    }

    /// Bytes of one connection must never reach another: a pipe with bytes in it is closed.
    #[test]
    fn a_pipe_holding_bytes_is_closed_not_kept() {
        let pool = PipePool::new(4);
        let pipe = pool.take().unwrap();
        fill(&pipe, b"another connection's bytes");
        pool.put(pipe);
        assert_eq!(pool.idle(), 0);
        let fresh = pool.take().unwrap();
        assert!(fresh.is_empty());
    }

    #[test]
    fn the_pool_keeps_at_most_max() {
        let pool = PipePool::new(2);
        let pipes: Vec<Pipe> = (0..3).map(|_| pool.take().unwrap()).collect();
        for pipe in pipes {
            pool.put(pipe);
        }
        assert_eq!(pool.idle(), 2);
    }
}
