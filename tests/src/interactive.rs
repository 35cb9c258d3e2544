//! A process driven line by line: a script in a sandbox that keeps a connection open and waits
//! for the test between its steps. Its stdout and stderr are read as lines on threads; lines go
//! to its stdin. Nothing here prints what the process wrote (it may hold a leaked value): the
//! test redacts it before any message.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A running process with piped stdin and line-read stdout/stderr; killed (by PID) on drop.
#[derive(Debug)]
pub struct Interactive {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

fn read_lines(from: impl Read + Send + 'static, prefix: &'static str, to: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if to.send(format!("{prefix}{line}")).is_err() {
                break;
            }
        }
    });
}

impl Interactive {
    /// Spawns `cmd` with stdin, stdout and stderr piped (stderr lines are prefixed `stderr: `).
    pub fn spawn(cmd: &mut Command) -> Interactive {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", crate::cmd::describe(cmd)));
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            read_lines(out, "", tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            read_lines(err, "stderr: ", tx);
        }
        Interactive {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a line starting with `prefix`; returns it, or `None` when the
    /// process ended or the time ran out. Every line read is kept for [`Interactive::output`].
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Writes `line` and a newline to its stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("stdin already closed"));
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("writing to the process: {e}"));
    }

    /// Closes stdin and waits up to `timeout` for the process to exit (killed otherwise);
    /// returns whether it exited successfully, and everything it wrote.
    pub fn finish(mut self, timeout: Duration) -> (bool, String) {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The readers end with the process; collect what is left.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(line);
        }
        (status.is_some_and(|s| s.success()), self.output())
    }

    /// Every line read so far.
    pub fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
