//! Name resolution for a sandbox with its own netns: a small DNS forwarder that
//! `veil-control run` serves on the sandbox's own loopback ([`FORWARDER_ADDR`], UDP and TCP port
//! 53) for the sandbox's lifetime, relaying each query unchanged to the host's own nameservers
//! (read from the host's resolv.conf), and the sandbox's private resolv.conf pointing at it.
//!
//! Why a forwarder rather than copying the host's resolv.conf: host nameservers are often
//! loopback stubs (systemd-resolved's 127.0.0.53) that a sandbox netns cannot reach, and the
//! sandbox gets no route anywhere else. The forwarder's listening sockets are made inside the
//! sandbox's netns (a loopback destination, which veil never redirects), its upstream sockets in
//! the host's, so it reaches whatever the host resolves with. Listening on the sandbox's own
//! loopback rather than on the host's end of its link matters for TCP: a TCP connection to a
//! host address would be redirected into veil, whose `egress: "host"` rules refuse every
//! address of the host. It does not cache or rewrite.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// How long one upstream may take to answer one query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Queries in flight at once (the rest wait); bounds what a sandbox can make us hold.
const MAX_IN_FLIGHT: usize = 128;

/// The nameservers of a resolv.conf text; glibc's default (127.0.0.1) when there are none.
pub fn nameservers(resolv: &str) -> Vec<IpAddr> {
    let found: Vec<IpAddr> = resolv
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver")
                .then(|| words.next())
                .flatten()
                // A scoped IPv6 address (fe80::1%eth0) is host-specific: skip it.
                .and_then(|w| w.parse().ok())
        })
        .collect();
    if found.is_empty() {
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
    } else {
        found
    }
}

/// The sandbox's resolv.conf: the forwarder as its only nameserver, with the host's `search`,
/// `domain` and `options` lines kept so names resolve as they do on the host.
pub fn sandbox_resolv_conf(host_resolv: &str) -> String {
    let mut out = format!("# written by veil-control run\nnameserver {FORWARDER_ADDR}\n");
    for line in host_resolv.lines() {
        let first = line.split_whitespace().next();
        if matches!(first, Some("search" | "domain" | "options")) {
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    out
}

/// Where the forwarder listens inside the sandbox's netns (its own loopback).
pub const FORWARDER_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

/// A running forwarder; it stops when dropped.
#[derive(Debug)]
pub struct Forwarder {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Forwarder {
    /// Listens on `bind`:53 (UDP and TCP) and forwards to `upstreams` (port 53 each).
    /// Listens on [`FORWARDER_ADDR`] port 53 inside the netns `sandbox_netns` and relays to
    /// `upstreams` from the caller's netns. Must run inside the tokio runtime.
    pub fn start(sandbox_netns: &File, upstreams: Vec<IpAddr>) -> std::io::Result<Forwarder> {
        let addr = SocketAddr::new(IpAddr::V4(FORWARDER_ADDR), 53);
        let ns = sandbox_netns.try_clone()?;
        // setns changes only the calling thread, and a socket keeps the netns it was made in.
        let (udp, tcp) = std::thread::scope(|scope| {
            scope
                .spawn(move || -> std::io::Result<_> {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                    let udp = std::net::UdpSocket::bind(addr)?;
                    let tcp = std::net::TcpListener::bind(addr)?;
                    udp.set_nonblocking(true)?;
                    tcp.set_nonblocking(true)?;
                    Ok((udp, tcp))
                })
                .join()
                .map_err(|_| std::io::Error::other("the netns thread panicked"))?
        })?;
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = TcpListener::from_std(tcp)?;
        let upstreams: Arc<[SocketAddr]> = upstreams
            .into_iter()
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let tasks = vec![
            tokio::spawn(serve_udp(udp, upstreams.clone(), limit.clone())),
            tokio::spawn(serve_tcp(tcp, upstreams, limit)),
        ];
        Ok(Forwarder { tasks })
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, upstreams: Arc<[SocketAddr]>, limit: Arc<Semaphore>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let query = buf[..n].to_vec();
        let (sock, upstreams) = (sock.clone(), upstreams.clone());
        tokio::spawn(async move {
            if let Some(answer) = ask_udp(&query, &upstreams).await {
                let _ = sock.send_to(&answer, client).await;
            }
            drop(permit);
        });
    }
}

/// The first answer any upstream gives over UDP, trying them in order.
async fn ask_udp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let local: SocketAddr = if up.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = UdpSocket::bind(local).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        if let Ok(Ok(n)) = timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf)).await {
            buf.truncate(n);
            return Some(buf);
        }
    }
    None
}

async fn serve_tcp(listener: TcpListener, upstreams: Arc<[SocketAddr]>, limit: Arc<Semaphore>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let upstreams = upstreams.clone();
        tokio::spawn(async move {
            let _ = timeout(
                Duration::from_secs(30),
                serve_tcp_client(stream, &upstreams),
            )
            .await;
            drop(permit);
        });
    }
}

/// Answers length-prefixed queries on one client connection until it closes.
async fn serve_tcp_client(mut client: TcpStream, upstreams: &[SocketAddr]) -> std::io::Result<()> {
    loop {
        let query = match read_message(&mut client).await {
            Ok(q) => q,
            Err(_) => return Ok(()),
        };
        let Some(answer) = ask_tcp(&query, upstreams).await else {
            return Ok(());
        };
        write_message(&mut client, &answer).await?;
    }
}

async fn ask_tcp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let attempt = async {
            let mut s = TcpStream::connect(up).await?;
            write_message(&mut s, query).await?;
            read_message(&mut s).await
        };
        if let Ok(Ok(answer)) = timeout(UPSTREAM_TIMEOUT, attempt).await {
            return Some(answer);
        }
    }
    None
}

async fn read_message(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(len)];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_message(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "DNS message too long")
    })?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "# comment\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n\
                        nameserver 2001:db8::1\nsearch example.internal\noptions edns0 trust-ad\n";

    #[test]
    fn reads_nameservers() {
        let ns = nameservers(HOST);
        assert_eq!(
            ns,
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "2001:db8::1".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(
            nameservers("search x\n"),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        );
    }

    #[test]
    fn sandbox_resolv_conf_points_at_the_forwarder_only() {
        let text = sandbox_resolv_conf(HOST);
        let servers = nameservers(&text);
        assert_eq!(servers, vec![IpAddr::V4(FORWARDER_ADDR)]);
        assert!(text.contains("search example.internal\n"));
        assert!(text.contains("options edns0 trust-ad\n"));
        // The host's own nameserver lines are not copied.
        assert_eq!(text.matches("nameserver").count(), 1);
    }
}
