//! Upstream servers started inside a network namespace: the socket is created on a thread that
//! entered the netns, then served by a tokio runtime on a thread of its own. Each records the
//! peer address of every connection it accepted; drop stops it and closes its connections.
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::netns::NetNs;

/// Longest an HTTP request head may be.
const MAX_HEAD: usize = 64 * 1024;
/// How long a server waits on a silent client before giving up on it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

type Peers = Arc<Mutex<Vec<SocketAddr>>>;

#[derive(Debug, Clone)]
enum Behaviour {
    Echo,
    Hello(String),
    Http(String),
}

/// The shared TCP server machinery.
#[derive(Debug)]
struct TcpServer {
    addr: SocketAddr,
    peers: Peers,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

fn in_netns<T: Send>(ns: Option<&NetNs>, f: impl FnOnce() -> T + Send) -> T {
    match ns {
        Some(ns) => ns.run(f),
        None => std::thread::scope(|s| match s.spawn(f).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }),
    }
}

fn where_(ns: Option<&NetNs>) -> &str {
    ns.map_or("host netns", |n| n.name())
}

impl TcpServer {
    fn start(ns: Option<&NetNs>, ip: IpAddr, behaviour: Behaviour) -> TcpServer {
        TcpServer::start_on(ns, SocketAddr::new(ip, 0), behaviour)
    }

    fn start_on(ns: Option<&NetNs>, bind: SocketAddr, behaviour: Behaviour) -> TcpServer {
        crate::stale::init();
        let listener = in_netns(ns, move || -> std::io::Result<std::net::TcpListener> {
            let s = Socket::new(Domain::for_address(bind), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            if bind.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&bind.into())?;
            // Bursts of hundreds of concurrent connects must not overflow the accept queue.
            s.listen(4096)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .unwrap_or_else(|e| {
            panic!(
                "binding {behaviour:?} server to {bind} in {}: {e}",
                where_(ns)
            )
        });
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr of server on {bind}: {e}"));
        let peers: Peers = Arc::default();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread_peers = peers.clone();
        let thread = std::thread::Builder::new()
            .name(format!("upstream-{addr}"))
            .spawn(move || serve(listener, behaviour, thread_peers, stop_rx))
            .unwrap_or_else(|e| panic!("spawning server thread: {e}"));
        TcpServer {
            addr,
            peers,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    listener: std::net::TcpListener,
    behaviour: Behaviour,
    peers: Peers,
    mut stop: oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veil-tests: server runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("veil-tests: server listener: {e}");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        peers.lock().unwrap_or_else(|p| p.into_inner()).push(peer);
                        let behaviour = behaviour.clone();
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(600),
                                handle(stream, peer, behaviour),
                            )
                            .await;
                        });
                    }
                    Err(e) => {
                        eprintln!("veil-tests: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    });
    // Dropping the runtime cancels every connection task, closing their sockets.
    drop(rt);
}

async fn handle(stream: TcpStream, peer: SocketAddr, behaviour: Behaviour) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    match behaviour {
        Behaviour::Echo => {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::with_capacity(256 * 1024, r);
            tokio::io::copy_buf(&mut r, &mut w).await?;
            w.shutdown().await
        }
        Behaviour::Hello(name) => {
            let (mut r, mut w) = stream.into_split();
            w.write_all(format!("{name} {peer}\n").as_bytes()).await?;
            w.shutdown().await?;
            // Read until the client closes, so unread input never turns our close into a RST
            // that could destroy the greeting before the client reads it.
            drain(&mut r).await
        }
        Behaviour::Http(name) => {
            let (mut r, mut w) = stream.into_split();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                if head.len() > MAX_HEAD {
                    return Err(std::io::Error::other("request head too long"));
                }
                let n = tokio::time::timeout(CLIENT_TIMEOUT, r.read(&mut buf))
                    .await
                    .map_err(|_| std::io::Error::other("client silent"))??;
                if n == 0 {
                    return Ok(());
                }
                head.extend_from_slice(&buf[..n]);
            }
            let body = format!("{name} {peer}\n");
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            w.write_all(response.as_bytes()).await?;
            w.shutdown().await?;
            drain(&mut r).await
        }
    }
}

async fn drain(r: &mut tokio::net::tcp::OwnedReadHalf) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(CLIENT_TIMEOUT, async {
        while r.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    Ok(())
}

macro_rules! tcp_server_api {
    () => {
        /// The address it listens on (the given IP, a kernel-chosen port).
        pub fn addr(&self) -> SocketAddr {
            self.0.addr
        }

        /// The peer address of every connection accepted so far, in order.
        pub fn peers(&self) -> Vec<SocketAddr> {
            self.0.peers()
        }
    };
}

/// Echoes everything it reads until EOF, then shuts down its write side.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct TcpEcho(TcpServer);

impl TcpEcho {
    /// Starts it in `ns`, bound to `ip` on a free port.
    pub fn start(ns: &NetNs, ip: IpAddr) -> TcpEcho {
        TcpEcho(TcpServer::start(Some(ns), ip, Behaviour::Echo))
    }

    /// Starts it in `ns` on a given address (e.g. port 443 for non-TLS bytes where TLS is due).
    pub fn start_on(ns: &NetNs, addr: SocketAddr) -> TcpEcho {
        TcpEcho(TcpServer::start_on(Some(ns), addr, Behaviour::Echo))
    }

    /// Starts it in the test's own (host) netns.
    pub fn start_host(ip: IpAddr) -> TcpEcho {
        TcpEcho(TcpServer::start(None, ip, Behaviour::Echo))
    }

    tcp_server_api!();
}

/// On accept writes `"{name} {peer}\n"` and closes (after the client closes its side).
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct TcpHello(TcpServer);

impl TcpHello {
    /// Starts it in `ns`, bound to `ip` on a free port.
    pub fn start(ns: &NetNs, ip: IpAddr, name: &str) -> TcpHello {
        TcpHello(TcpServer::start(
            Some(ns),
            ip,
            Behaviour::Hello(name.to_owned()),
        ))
    }

    /// Starts it in the test's own (host) netns.
    pub fn start_host(ip: IpAddr, name: &str) -> TcpHello {
        TcpHello(TcpServer::start(
            None,
            ip,
            Behaviour::Hello(name.to_owned()),
        ))
    }

    tcp_server_api!();
}

/// Minimal HTTP/1.1: answers any request with 200 and body `"{name} {peer}\n"`, then closes.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct HttpHello(TcpServer);

impl HttpHello {
    /// Starts it in `ns`, bound to `ip` on a free port.
    pub fn start(ns: &NetNs, ip: IpAddr, name: &str) -> HttpHello {
        HttpHello(TcpServer::start(
            Some(ns),
            ip,
            Behaviour::Http(name.to_owned()),
        ))
    }

    /// Starts it in the test's own (host) netns.
    pub fn start_host(ip: IpAddr, name: &str) -> HttpHello {
        HttpHello(TcpServer::start(None, ip, Behaviour::Http(name.to_owned())))
    }

    /// `http://ADDR/` (IPv6 in brackets), for curl.
    pub fn url(&self) -> String {
        format!("http://{}/", self.0.addr)
    }

    tcp_server_api!();
}

/// Echoes UDP datagrams back to their sender and counts them.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct UdpEcho {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    peers: Peers,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Starts it in `ns`, bound to `ip:port` (port 0 = any free port).
    pub fn start(ns: &NetNs, ip: IpAddr, port: u16) -> UdpEcho {
        UdpEcho::start_in(Some(ns), ip, port)
    }

    /// Starts it in the test's own (host) netns.
    pub fn start_host(ip: IpAddr, port: u16) -> UdpEcho {
        UdpEcho::start_in(None, ip, port)
    }

    fn start_in(ns: Option<&NetNs>, ip: IpAddr, port: u16) -> UdpEcho {
        crate::stale::init();
        let bind = SocketAddr::new(ip, port);
        let socket = in_netns(ns, move || UdpSocket::bind(bind))
            .unwrap_or_else(|e| panic!("binding UDP echo to {bind} in {}: {e}", where_(ns)));
        let addr = socket
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr of UDP echo on {bind}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap_or_else(|e| panic!("UDP echo read timeout: {e}"));
        let count = Arc::new(AtomicU64::new(0));
        let peers: Peers = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (t_count, t_peers, t_stop) = (count.clone(), peers.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("udp-echo-{addr}"))
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !t_stop.load(Ordering::Relaxed) {
                    match socket.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            t_count.fetch_add(1, Ordering::Relaxed);
                            t_peers.lock().unwrap_or_else(|p| p.into_inner()).push(peer);
                            let _ = socket.send_to(&buf[..n], peer);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => {
                            eprintln!("veil-tests: UDP echo {addr}: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .unwrap_or_else(|e| panic!("spawning UDP echo thread: {e}"));
        UdpEcho {
            addr,
            count,
            peers,
            stop,
            thread: Some(thread),
        }
    }

    /// The address it is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sender of every datagram received so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
