//! `veil-probe`: a small network client run inside sandboxes by the end-to-end tests.
//!
//! It prints exactly ONE JSON line on stdout and exits 0 on success; on failure the line has an
//! `"error"` field (an errno name such as `"EPERM"` or `"ETIMEDOUT"`, or `"USAGE"`, or for
//! `echo` `"CONNECTIONS_FAILED"` with per-connection `"errors"`) and the exit code is non-zero.
//!
//! ```text
//! veil-probe tcp  --addr A [--bind B] [--send TEXT] [--half-close] [--timeout-ms T]
//! veil-probe echo --addr A --conns N --bytes B [--seed S] [--timeout-ms T]
//! veil-probe udp  --addr A --send TEXT [--connect] [--timeout-ms T]
//! ```
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};

/// A failure: the JSON error line to print.
#[derive(Debug)]
struct Failure(Value);

fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure(json!({"error": "USAGE", "message": msg.to_string()}))
}

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

/// `--key value` and `--flag` options after the subcommand.
struct Opts(HashMap<String, Option<String>>);

impl Opts {
    fn parse(args: &[String], flags: &[&str]) -> Result<Opts, Failure> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let key = a
                .strip_prefix("--")
                .ok_or_else(|| usage(format!("unexpected argument {a:?}")))?;
            if flags.contains(&key) {
                map.insert(key.to_owned(), None);
            } else {
                let v = it
                    .next()
                    .ok_or_else(|| usage(format!("--{key} needs a value")))?;
                map.insert(key.to_owned(), Some(v.clone()));
            }
        }
        Ok(Opts(map))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.as_deref())
    }

    fn flag(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn required(&self, key: &str) -> Result<&str, Failure> {
        self.get(key)
            .ok_or_else(|| usage(format!("--{key} is required")))
    }

    fn addr(&self, key: &str) -> Result<SocketAddr, Failure> {
        let v = self.required(key)?;
        v.parse()
            .map_err(|e| usage(format!("--{key} {v:?} is not IP:PORT ([IPv6]:PORT): {e}")))
    }

    fn number<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> Result<T, Failure>
    where
        T::Err: std::fmt::Display,
    {
        match (self.get(key), default) {
            (Some(v), _) => v.parse().map_err(|e| usage(format!("--{key} {v:?}: {e}"))),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(usage(format!("--{key} is required"))),
        }
    }

    fn timeout(&self) -> Result<Duration, Failure> {
        Ok(Duration::from_millis(
            self.number("timeout-ms", Some(10_000u64))?,
        ))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.split_first() {
        Some((cmd, rest)) => match cmd.as_str() {
            "tcp" => tcp(rest),
            "echo" => echo(rest),
            "udp" => udp(rest),
            other => Err(usage(format!("unknown subcommand {other:?}"))),
        },
        None => Err(usage("usage: veil-probe tcp|echo|udp --addr A ...")),
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
fn tcp(args: &[String]) -> Result<Value, Failure> {
    let o = Opts::parse(args, &["half-close"])?;
    let addr = o.addr("addr")?;
    let timeout = o.timeout()?;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| io_failure("socket", &e))?;
    if let Some(b) = o.get("bind") {
        let bind: SocketAddr = b
            .parse()
            .map_err(|e| usage(format!("--bind {b:?} is not IP:PORT: {e}")))?;
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
    if let Some(text) = o.get("send") {
        stream
            .write_all(text.as_bytes())
            .map_err(|e| io_failure("send", &e))?;
    }
    if o.flag("half-close") {
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
fn echo(args: &[String]) -> Result<Value, Failure> {
    let o = Opts::parse(args, &[])?;
    let addr = o.addr("addr")?;
    let conns: usize = o.number("conns", None)?;
    let bytes: usize = o.number("bytes", None)?;
    let seed: u64 = o.number("seed", Some(0))?;
    let timeout = o
        .number("timeout-ms", Some(60_000u64))
        .map(Duration::from_millis)?;
    if conns == 0 {
        return Err(usage("--conns must be at least 1"));
    }
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
fn udp(args: &[String]) -> Result<Value, Failure> {
    let o = Opts::parse(args, &["connect"])?;
    let addr = o.addr("addr")?;
    let text = o.required("send")?;
    let timeout = o
        .number("timeout-ms", Some(2_000u64))
        .map(Duration::from_millis)?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|e| usage(format!("{e}")))?
    } else {
        "[::]:0".parse().map_err(|e| usage(format!("{e}")))?
    };
    let socket = UdpSocket::bind(bind).map_err(|e| io_failure("bind", &e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| io_failure("setsockopt", &e))?;
    let connected = o.flag("connect");
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
