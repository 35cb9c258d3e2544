//! Running helper commands (iproute2, probes) with bounded waits and specific failure messages.
use std::io::Read;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs `program args…` to completion; Err carries the command line, status and stderr.
pub fn try_run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{program} {}` could not start: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `ip args…` and returns its stdout; panics with the command and its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    try_run("ip", args).unwrap_or_else(|e| panic!("{e}"))
}

/// A readable rendering of a command for failure messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Spawns `cmd` with piped stdout/stderr and waits at most `timeout` for it.
///
/// On timeout the child is killed by pid and the call panics with the command and whatever it
/// wrote so far. A non-zero exit is returned, not judged. Output written after the child exits
/// (by a grandchild still holding the pipes) is collected for at most one more second.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("`{what}` could not start: {e}"));
    let stdout = Drain::start(child.stdout.take());
    let stderr = Drain::start(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for `{what}`: {e}"),
        }
    };
    let Some(status) = status else {
        // Ours by pid: the Child we spawned and have not reaped yet.
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`{what}` timed out after {timeout:?} and was killed; stdout: {}; stderr: {}",
            String::from_utf8_lossy(&stdout.finish(Duration::from_millis(200))).trim(),
            String::from_utf8_lossy(&stderr.finish(Duration::from_millis(200))).trim()
        );
    };
    Output {
        status,
        stdout: stdout.finish(Duration::from_secs(1)),
        stderr: stderr.finish(Duration::from_secs(1)),
    }
}

/// Reads a pipe on a thread into a shared buffer, so the reader can be abandoned after a bound.
struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Drain {
    fn start<R: Read + Send + 'static>(pipe: Option<R>) -> Drain {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(pipe.is_none()));
        if let Some(mut pipe) = pipe {
            let (b, d) = (buf.clone(), done.clone());
            std::thread::spawn(move || {
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => b
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                d.store(true, Ordering::Release);
            });
        }
        Drain { buf, done }
    }

    /// What was read, after waiting at most `grace` for EOF.
    fn finish(&self, grace: Duration) -> Vec<u8> {
        wait_until(grace, || self.done.load(Ordering::Acquire));
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The result of one `veil-probe` run: its exit status, its JSON line and its stderr.
#[derive(Debug, Clone)]
pub struct ProbeOutput {
    /// Exit status of the probe (0 = success).
    pub status: ExitStatus,
    /// The single JSON line it printed (`Null` if it printed none).
    pub json: serde_json::Value,
    /// Its stderr, for failure messages.
    pub stderr: String,
}

impl ProbeOutput {
    /// Whether the probe exited 0.
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// The JSON, after asserting the probe succeeded.
    pub fn expect_ok(&self) -> &serde_json::Value {
        assert!(
            self.ok(),
            "veil-probe failed ({}): {} stderr: {}",
            self.status,
            self.json,
            self.stderr
        );
        &self.json
    }

    /// The `"{name} {peer}"` line a hello server answered, split; `None` if the probe failed
    /// or the reply has another shape.
    pub fn hello(&self) -> Option<(String, std::net::SocketAddr)> {
        if !self.ok() {
            return None;
        }
        let reply = self.json.get("reply")?.as_str()?.trim();
        let (name, peer) = reply.split_once(' ')?;
        Some((name.to_owned(), peer.parse().ok()?))
    }

    /// Like [`ProbeOutput::hello`], panicking with the probe's output when there is none.
    pub fn expect_hello(&self) -> (String, std::net::SocketAddr) {
        self.expect_ok();
        self.hello()
            .unwrap_or_else(|| panic!("probe reply is not a hello line: {}", self.json))
    }

    /// The `"error"` field the probe reports on failure (an errno name like `"EPERM"`).
    pub fn error(&self) -> Option<&str> {
        self.json.get("error").and_then(|v| v.as_str())
    }
}

/// Runs a prepared `veil-probe` command (args already added) and parses its JSON line.
pub fn run_probe(cmd: &mut Command, timeout: Duration) -> ProbeOutput {
    let what = describe(cmd);
    let out = output_within(cmd, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let json = if line.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("`{what}` printed non-JSON {line:?}: {e}"))
    };
    ProbeOutput {
        status: out.status,
        json,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
