//! Socket factory: listeners created inside a sandbox's network namespace.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, and a socket keeps the namespace it
//! was created in, so each listener is made on a short-lived thread that entered the netns; the
//! runtime then accepts on it from any thread.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::Path;

use socket2::{Domain, Protocol, Socket, Type};

/// The loopback listeners of one sandbox, still outside any runtime.
#[derive(Debug)]
pub struct SandboxSockets {
    /// Listener on 127.0.0.1.
    pub v4: std::net::TcpListener,
    /// Listener on ::1; `None` when the namespace has no IPv6 loopback.
    pub v6: Option<std::net::TcpListener>,
    /// Cookie of the namespace the listeners live in.
    pub netns_cookie: u64,
}

/// Opens the sandbox's loopback listeners inside `netns` (or the agent's own namespace), on
/// the `prefer`red ports (v4, v6) when they are free, else on fresh ephemeral ports.
pub fn open_listeners(
    netns: Option<&Path>,
    backlog: u32,
    prefer: Option<(u16, u16)>,
) -> io::Result<SandboxSockets> {
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    let (p4, p6) = prefer.unwrap_or((0, 0));
    in_netns(netns, move || {
        let v4 = listen_preferring(Ipv4Addr::LOCALHOST.into(), p4, backlog)?;
        // A namespace with IPv6 disabled has no ::1; IPv6 connects are then refused by eBPF.
        let v6 = match listen_preferring(Ipv6Addr::LOCALHOST.into(), p6, backlog) {
            Ok(l) => Some(l),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => None,
            Err(e) => return Err(e),
        };
        let netns_cookie = crate::bpf::netns_cookie(v4.as_fd())?;
        Ok(SandboxSockets {
            v4,
            v6,
            netns_cookie,
        })
    })
}

/// Listens on `port` if it is free, else on an ephemeral port.
fn listen_preferring(
    ip: std::net::IpAddr,
    port: u16,
    backlog: i32,
) -> io::Result<std::net::TcpListener> {
    if port != 0 {
        match listen(SocketAddr::new(ip, port), backlog) {
            Ok(l) => return Ok(l),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
            Err(e) => return Err(e),
        }
    }
    listen(SocketAddr::new(ip, 0), backlog)
}

fn listen(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_cloexec(true)?;
    // A restarted agent takes its old port back although connections it closed linger in
    // TIME_WAIT on it; without SO_REUSEPORT no other live socket can share the port.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Runs `f` on a fresh thread that has entered `netns` (or directly when `netns` is `None`).
pub fn in_netns<T, F>(netns: Option<&Path>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let Some(netns) = netns else {
        return f();
    };
    let ns = std::fs::File::open(netns)
        .map_err(|e| io::Error::new(e.kind(), format!("open netns {}: {e}", netns.display())))?;
    let name = netns.display().to_string();
    std::thread::Builder::new()
        .name("veil-netns".into())
        .spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("enter netns {name}: {e}"),
                )
            })?;
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_listeners_in_own_netns() {
        // Needs no privileges: the agent's own namespace, ephemeral loopback ports.
        let s = open_listeners(None, 16, None).unwrap();
        assert!(s.v4.local_addr().unwrap().ip().is_loopback());
        let port = s.v4.local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert_ne!(s.netns_cookie, 0);
        // Its port is busy: another one is taken; once free, the preferred one is reused.
        let other = open_listeners(None, 16, Some((port, 0))).unwrap();
        assert_ne!(other.v4.local_addr().unwrap().port(), port);
        drop(s);
        let again = open_listeners(None, 16, Some((port, 0))).unwrap();
        assert_eq!(again.v4.local_addr().unwrap().port(), port);
    }

    #[test]
    fn missing_netns_is_a_clear_error() {
        let e = in_netns(Some(Path::new("/nonexistent/netns")), || Ok(())).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
    }
}
