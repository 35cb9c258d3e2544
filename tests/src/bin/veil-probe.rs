//! `veil-probe`: a small network client run inside sandboxes by the end-to-end tests.
//!
//! It prints exactly ONE JSON line on stdout and exits 0 on success; on failure the line has an
//! `"error"` field (an errno name such as `"EPERM"` or `"ETIMEDOUT"`, or `"USAGE"`, or for
//! `echo` `"CONNECTIONS_FAILED"` with per-connection `"errors"`) and the exit code is non-zero.
//! `--help` and `--version` print text instead and exit 0.
//!
//! ```text
//! veil-probe tcp  --addr A [--bind B] [--send TEXT] [--half-close] [--timeout-ms T]
//! veil-probe echo --addr A --conns N --bytes B [--seed S] [--timeout-ms T]
//! veil-probe udp  --addr A --send TEXT [--connect] [--timeout-ms T]
//! ```
//!
//! Exit status: see [`EXIT_STATUS`].
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use clap::error::ErrorKind as ClapErrorKind;
use clap::{Args, Parser, Subcommand};
use rand::{RngCore, SeedableRng};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};

/// What the exit status means; shown under every `--help`.
const EXIT_STATUS: &str = "\
Exit status:
  0  the probe succeeded (its JSON line on stdout)
  1  the probe failed: the JSON line's \"error\" names why (an errno name, CONNECTIONS_FAILED)
  2  bad command line: the JSON line says {\"error\":\"USAGE\"}, the reason is on stderr";

/// A network client for the end-to-end tests: prints one JSON line.
#[derive(Debug, Parser)]
#[command(
    name = "veil-probe",
    version,
    propagate_version = true,
    after_help = EXIT_STATUS,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connects (optionally bound first), sends TEXT, reads one line or until EOF.
    #[command(after_help = EXIT_STATUS)]
    Tcp(TcpArgs),
    /// N concurrent connections, each sending B seeded-random bytes and checking the echo.
    #[command(after_help = EXIT_STATUS)]
    Echo(EchoArgs),
    /// Sends one datagram (sendto, or connect + send with --connect) and waits for one reply.
    #[command(after_help = EXIT_STATUS)]
    Udp(UdpArgs),
}

/// Options of `tcp`.
#[derive(Debug, Args)]
struct TcpArgs {
    /// Where to connect: IP:PORT or [IPv6]:PORT.
    #[arg(long)]
    addr: SocketAddr,
    /// Bind the socket to this IP:PORT before connecting.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Text to send once connected.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    send: Option<String>,
    /// Shut down the sending side after sending.
    #[arg(long)]
    half_close: bool,
    /// Bound on connecting and on each read.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    timeout_ms: u64,
}

/// Options of `echo`.
#[derive(Debug, Args)]
struct EchoArgs {
    /// The echo server: IP:PORT or [IPv6]:PORT.
    #[arg(long)]
    addr: SocketAddr,
    /// Connections, all open at once before any sends.
    #[arg(long, value_parser = at_least_one)]
    conns: usize,
    /// Bytes sent (and expected back) on each connection.
    #[arg(long)]
    bytes: usize,
    /// Seed of the payloads (distinct per connection).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Bound on connecting and on each read and write.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
}

/// Options of `udp`.
#[derive(Debug, Args)]
struct UdpArgs {
    /// Where to send: IP:PORT or [IPv6]:PORT.
    #[arg(long)]
    addr: SocketAddr,
    /// The datagram's text.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    send: String,
    /// connect(2) first and send(2), instead of sendto(2).
    #[arg(long)]
    connect: bool,
    /// Bound on waiting for the reply.
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    timeout_ms: u64,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// clap's error as one line: its first paragraph (a missing argument is named on the line
/// after the sentence), without the `error: ` prefix.
fn usage_message(e: &clap::Error) -> String {
    if e.kind() == ClapErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return "a subcommand is required: tcp, echo or udp".to_owned();
    }
    let rendered = e.to_string();
    let first = rendered.split("\n\n").next().unwrap_or_default();
    let line = first.split_whitespace().collect::<Vec<_>>().join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_owned()
}

/// A failure: the JSON error line to print.
#[derive(Debug)]
struct Failure(Value);

/// An I/O failure at `stage`, named by its errno.
fn io_failure(stage: &str, e: &std::io::Error) -> Failure {
    Failure(json!({
        "error": errno_name(e),
        "errno": e.raw_os_error(),
        "stage": stage,
        "message": e.to_string(),
    }))
}

fn errno_name(e: &std::io::Error) -> String {
    if let Some(code) = e.raw_os_error() {
        let name = match code {
            libc::EPERM => "EPERM",
            libc::EACCES => "EACCES",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ECONNRESET => "ECONNRESET",
            libc::ECONNABORTED => "ECONNABORTED",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::EAGAIN => "ETIMEDOUT",
            libc::EINPROGRESS => "ETIMEDOUT",
            libc::ENETUNREACH => "ENETUNREACH",
            libc::EHOSTUNREACH => "EHOSTUNREACH",
            libc::EADDRINUSE => "EADDRINUSE",
            libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
            libc::EINVAL => "EINVAL",
            libc::EPIPE => "EPIPE",
            libc::ENOENT => "ENOENT",
            libc::EMSGSIZE => "EMSGSIZE",
            libc::EAFNOSUPPORT => "EAFNOSUPPORT",
            _ => return format!("E{code}"),
        };
        return name.to_owned();
    }
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "ETIMEDOUT".to_owned(),
        ErrorKind::UnexpectedEof => "EOF".to_owned(),
        _ => "EIO".to_owned(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ClapErrorKind::DisplayHelp | ClapErrorKind::DisplayVersion
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // Callers parse stdout as the probe's one JSON line, so a usage error is one too;
            // clap's message (one line naming the problem, then a hint) goes to stderr.
            println!(
                "{}",
                json!({"error": "USAGE", "message": usage_message(&e)})
            );
            e.exit()
        }
    };
    let result = match cli.cmd {
        Cmd::Tcp(a) => tcp(&a),
        Cmd::Echo(a) => echo(&a),
        Cmd::Udp(a) => udp(&a),
    };
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(Failure(v)) => {
            println!("{v}");
            ExitCode::FAILURE
        }
    }
}

/// Connects (optionally bound first), sends TEXT, reads one line or until EOF.
fn tcp(a: &TcpArgs) -> Result<Value, Failure> {
    let addr = a.addr;
    let timeout = Duration::from_millis(a.timeout_ms);
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| io_failure("socket", &e))?;
    if let Some(bind) = a.bind {
        sock.set_reuse_address(true)
            .map_err(|e| io_failure("setsockopt", &e))?;
        sock.bind(&bind.into())
            .map_err(|e| io_failure("bind", &e))?;
    }
    sock.connect_timeout(&addr.into(), timeout)
        .map_err(|e| io_failure("connect", &e))?;
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string());
    let peer = sock
        .peer_addr()
        .map_err(|e| io_failure("getpeername", &e))?
        .as_socket()
        .map(|a| a.to_string());
    let mut stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| io_failure("setsockopt", &e))?;
    if let Some(text) = &a.send {
        stream
            .write_all(text.as_bytes())
            .map_err(|e| io_failure("send", &e))?;
    }
    if a.half_close {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| io_failure("shutdown", &e))?;
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.contains(&b'\n') {
                    break;
                }
            }
            Err(e) => {
                return Err(Failure(json!({
                    "error": errno_name(&e),
                    "errno": e.raw_os_error(),
                    "stage": "recv",
                    "message": e.to_string(),
                    "local": local,
                    "peer_from_getpeername": peer,
                    "partial_reply": String::from_utf8_lossy(&reply),
                })));
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    let reply = String::from_utf8_lossy(&reply);
    Ok(json!({
        "local": local,
        "peer_from_getpeername": peer,
        "reply": reply.strip_suffix('\n').unwrap_or(&reply),
    }))
}

/// Result of one echo connection.
enum ConnResult {
    Ok(u64),
    Failed(String),
}

/// N concurrent connections, each sending B seeded-random bytes and checking the echo.
fn echo(a: &EchoArgs) -> Result<Value, Failure> {
    let (addr, conns, bytes, seed) = (a.addr, a.conns, a.bytes, a.seed);
    let timeout = Duration::from_millis(a.timeout_ms);
    // Every connection is established before any sends, so all N are open at once.
    let barrier = Arc::new(Gate::new(conns, timeout));
    let handles: Vec<_> = (0..conns)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || one_echo(addr, bytes, conn_seed(seed, i), timeout, &barrier))
        })
        .collect();
    let mut ok = 0usize;
    let mut failed = 0usize;
    let mut total = 0u64;
    let mut errors: Vec<String> = Vec::new();
    for h in handles {
        let result = match h {
            Ok(h) => h
                .join()
                .unwrap_or_else(|_| ConnResult::Failed("thread panicked".into())),
            Err(e) => ConnResult::Failed(format!("spawning thread: {e}")),
        };
        match result {
            ConnResult::Ok(n) => {
                ok += 1;
                total += n;
            }
            ConnResult::Failed(e) => {
                failed += 1;
                if errors.len() < 10 {
                    errors.push(e);
                }
            }
        }
    }
    if failed == 0 {
        Ok(json!({"ok": ok, "failed": failed, "bytes": total}))
    } else {
        Err(Failure(json!({
            "error": "CONNECTIONS_FAILED",
            "ok": ok,
            "failed": failed,
            "bytes": total,
            "errors": errors,
        })))
    }
}

/// Per-connection RNG seed: distinct across (seed, connection) pairs, so probes started with
/// seeds 0, 1, 2… never send the same payload on two connections (a mix-up stays visible).
fn conn_seed(seed: u64, conn: usize) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update((conn as u64).to_le_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// A barrier whose wait is bounded: a connection that never arrives cannot hang the others.
struct Gate {
    expected: usize,
    arrived: Mutex<usize>,
    all: Condvar,
    timeout: Duration,
}

impl Gate {
    fn new(expected: usize, timeout: Duration) -> Gate {
        Gate {
            expected,
            arrived: Mutex::new(0),
            all: Condvar::new(),
            timeout,
        }
    }

    fn wait(&self) {
        let mut arrived = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        *arrived += 1;
        if *arrived >= self.expected {
            self.all.notify_all();
            return;
        }
        let expected = self.expected;
        let _ = self
            .all
            .wait_timeout_while(arrived, self.timeout, |n| *n < expected);
    }
}

fn one_echo(
    addr: SocketAddr,
    bytes: usize,
    seed: u64,
    timeout: Duration,
    barrier: &Gate,
) -> ConnResult {
    let connected = TcpStream::connect_timeout(&addr, timeout);
    barrier.wait();
    let stream = match connected {
        Ok(s) => s,
        Err(e) => return ConnResult::Failed(format!("connect: {} ({e})", errno_name(&e))),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut payload = vec![0u8; bytes];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut payload);
    let sent_hash = Sha256::digest(&payload);
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return ConnResult::Failed(format!("dup: {e}")),
    };
    // Write on a second thread: with large payloads the echo fills both directions' buffers.
    let write =
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || -> std::io::Result<()> {
                writer.write_all(&payload)?;
                writer.shutdown(Shutdown::Write)
            });
    let mut reader = stream;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let read_result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let write_result = match write {
        Ok(h) => h
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked"))),
        Err(e) => Err(e),
    };
    if let Err(e) = write_result {
        return ConnResult::Failed(format!("send: {} ({e})", errno_name(&e)));
    }
    if let Err(e) = read_result {
        return ConnResult::Failed(format!(
            "recv after {received} bytes: {} ({e})",
            errno_name(&e)
        ));
    }
    let received_hash = hasher.finalize();
    if received != bytes as u64 || received_hash != sent_hash {
        return ConnResult::Failed(format!(
            "MISMATCH: sent {bytes} bytes sha256 {}, received {received} bytes sha256 {}",
            hex::encode(sent_hash),
            hex::encode(received_hash)
        ));
    }
    ConnResult::Ok(received)
}

/// Sends one datagram (sendto, or connect + send with --connect) and waits for one reply.
fn udp(a: &UdpArgs) -> Result<Value, Failure> {
    let (addr, text) = (a.addr, &a.send);
    let timeout = Duration::from_millis(a.timeout_ms);
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).map_err(|e| io_failure("bind", &e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| io_failure("setsockopt", &e))?;
    let connected = a.connect;
    if connected {
        socket
            .connect(addr)
            .map_err(|e| io_failure("connect", &e))?;
        socket
            .send(text.as_bytes())
            .map_err(|e| io_failure("send", &e))?;
    } else {
        socket
            .send_to(text.as_bytes(), addr)
            .map_err(|e| io_failure("sendto", &e))?;
    }
    let mut buf = vec![0u8; 65536];
    let received = if connected {
        socket.recv(&mut buf).map(|n| (n, addr))
    } else {
        socket.recv_from(&mut buf)
    };
    match received {
        Ok((n, from)) => Ok(json!({
            "sent": true,
            "reply": String::from_utf8_lossy(&buf[..n]),
            "from": from.to_string(),
        })),
        Err(e) => Err(Failure(json!({
            "sent": true,
            "error": errno_name(&e),
            "errno": e.raw_os_error(),
            "stage": "recv",
            "message": e.to_string(),
        }))),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
