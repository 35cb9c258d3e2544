//! `VEIL_ORIG`: where each redirected connection was going, and for which sandbox, keyed by
//! its four-tuple as the agent's accepted socket sees it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd as _;
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, IterableMap as _, MapData, MapError};
use aya::sys::SyscallError;
use proxy_common::{AF_INET, ConnKey, MAP_ORIG, OrigDst};

use super::error::{BpfError, is_not_found, map_err};

/// A connection as the agent's accepted socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    /// Cookie of the network namespace of the listener (and of the client).
    pub netns_cookie: u64,
    /// The listener's address (the accepted socket's local address).
    pub listener: SocketAddr,
    /// The client's address (the accepted socket's peer).
    pub peer: SocketAddr,
}

/// What the kernel recorded when it redirected a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The destination the application dialled.
    pub dst: SocketAddr,
    /// Cgroup id of the sandbox whose listener the connection was redirected to.
    pub cgroup_id: u64,
}

/// Handle on `VEIL_ORIG`; cheap to clone, shared by every connection task.
#[derive(Clone)]
pub struct OrigDstTable {
    map: Arc<Mutex<HashMap<MapData, ConnKey, OrigDst>>>,
}

impl std::fmt::Debug for OrigDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrigDstTable").finish_non_exhaustive()
    }
}

impl OrigDstTable {
    pub(super) fn new(map: HashMap<MapData, ConnKey, OrigDst>) -> Self {
        Self {
            map: Arc::new(Mutex::new(map)),
        }
    }

    /// Removes and returns the record of the connection `conn`; v4-mapped origins come back as
    /// `SocketAddr::V4`. One syscall (lookup-and-delete): this runs for every accepted
    /// connection, and a lookup then a delete would be two.
    pub fn take(&self, conn: &ConnTuple) -> Result<Option<Recorded>, BpfError> {
        let key = conn_key(conn);
        let map = self.map.lock().map_err(|_| BpfError::Poisoned)?;
        let orig: OrigDst = match super::sys::map_take(map.map().fd().as_fd(), &key) {
            Ok(Some(orig)) => orig,
            Ok(None) => return Ok(None),
            Err(io_error) => {
                return Err(map_err(MAP_ORIG)(MapError::SyscallError(SyscallError {
                    call: "bpf_map_lookup_and_delete_elem",
                    io_error,
                })));
            }
        };
        Ok(Some(Recorded {
            dst: orig_to_socket_addr(&orig),
            cgroup_id: orig.cgroup_id,
        }))
    }

    /// Removes the records of connections to the listener `listener` in the netns
    /// `netns_cookie` (called once that listener is closed: nothing can take them rightfully
    /// any more). Returns how many there were.
    pub fn forget_listener(
        &self,
        netns_cookie: u64,
        listener: SocketAddr,
    ) -> Result<usize, BpfError> {
        let words = addr_words(listener);
        self.remove_where(|k| {
            k.netns_cookie == netns_cookie
                && k.listener_addr == words
                && k.listener_port == listener.port()
        })
    }

    /// Removes every record (at start, before any listener exists: they all belong to
    /// connections of listeners that are gone). Returns how many there were.
    pub fn clear(&self) -> Result<usize, BpfError> {
        self.remove_where(|_| true)
    }

    fn remove_where(&self, pred: impl Fn(&ConnKey) -> bool) -> Result<usize, BpfError> {
        let mut map = self.map.lock().map_err(|_| BpfError::Poisoned)?;
        let keys: Vec<ConnKey> = map.keys().filter_map(Result::ok).filter(pred).collect();
        let mut removed = 0;
        for key in keys {
            match map.remove(&key) {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(source) => return Err(map_err(MAP_ORIG)(source)),
            }
        }
        Ok(removed)
    }
}

/// Words of an IPv6 address as the kernel stores them: network-order bytes in memory.
pub(crate) fn ipv6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

pub(crate) fn words_to_ipv6(words: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (chunk, word) in o.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// An address as the kernel side stores it: IPv4 (and IPv4-mapped IPv6) as `::ffff:a.b.c.d`.
pub(crate) fn addr_words(addr: SocketAddr) -> [u32; 4] {
    match addr {
        SocketAddr::V4(v4) => ipv6_words(v4.ip().to_ipv6_mapped()),
        SocketAddr::V6(v6) => ipv6_words(*v6.ip()),
    }
}

/// The key sock_ops wrote for this connection.
pub(crate) fn conn_key(conn: &ConnTuple) -> ConnKey {
    ConnKey {
        netns_cookie: conn.netns_cookie,
        client_addr: addr_words(conn.peer),
        listener_addr: addr_words(conn.listener),
        client_port: conn.peer.port(),
        listener_port: conn.listener.port(),
        _pad: 0,
    }
}

/// The destination the application dialled; IPv4 and IPv4-mapped origins as `SocketAddr::V4`.
pub(crate) fn orig_to_socket_addr(orig: &OrigDst) -> SocketAddr {
    let ip = words_to_ipv6(orig.addr);
    match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, orig.port)),
        None if orig.family == AF_INET => {
            // A v4 socket's origin is always stored mapped; anything else is corrupt, but the
            // low word is still the address it dialled.
            let o = ip.octets();
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(o[12], o[13], o[14], o[15]),
                orig.port,
            ))
        }
        None => SocketAddr::V6(SocketAddrV6::new(ip, orig.port, 0, 0)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests may unwrap")]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proxy_common::AF_INET6;

    fn orig(addr: Ipv6Addr, port: u16, family: u16) -> OrigDst {
        OrigDst {
            addr: ipv6_words(addr),
            port,
            family,
            _pad: 0,
            cgroup_id: 7,
        }
    }

    fn tuple(cookie: u64, listener: &str, peer: &str) -> ConnTuple {
        ConnTuple {
            netns_cookie: cookie,
            listener: listener.parse().unwrap(),
            peer: peer.parse().unwrap(),
        }
    }

    #[test]
    fn ipv6_words_are_network_order_in_memory() {
        let words = ipv6_words("::ffff:127.0.0.1".parse().unwrap());
        assert_eq!(words[0], 0);
        assert_eq!(words[1], 0);
        assert_eq!(words[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(words[3].to_ne_bytes(), [127, 0, 0, 1]);
        let ip: Ipv6Addr = "fd76:6569:6c::1".parse().unwrap();
        assert_eq!(words_to_ipv6(ipv6_words(ip)), ip);
    }

    #[test]
    fn v4_and_mapped_v6_tuples_give_the_same_key() {
        let v4 = tuple(7, "127.0.0.1:1000", "127.0.0.1:40000");
        let mapped = tuple(7, "[::ffff:127.0.0.1]:1000", "[::ffff:127.0.0.1]:40000");
        assert_eq!(conn_key(&v4), conn_key(&mapped));
        assert_ne!(
            conn_key(&v4),
            conn_key(&ConnTuple {
                netns_cookie: 8,
                ..v4
            })
        );
        let native = conn_key(&tuple(7, "[::1]:1001", "[::1]:40000"));
        assert_eq!(native.client_addr, [0, 0, 0, 1u32.to_be()]);
        assert_eq!(native.listener_addr, [0, 0, 0, 1u32.to_be()]);
        assert_eq!((native.client_port, native.listener_port), (40000, 1001));
        assert_eq!(native._pad, 0);
    }

    #[test]
    fn the_listener_is_part_of_the_key() {
        let a = tuple(7, "127.0.0.1:1000", "127.0.0.1:40000");
        let b = tuple(7, "127.0.0.1:2000", "127.0.0.1:40000");
        assert_ne!(conn_key(&a), conn_key(&b));
    }

    #[test]
    fn v4_origins_come_back_as_v4() {
        let dialled = orig("::ffff:198.18.255.1".parse().unwrap(), 80, AF_INET);
        assert_eq!(
            orig_to_socket_addr(&dialled),
            "198.18.255.1:80".parse::<SocketAddr>().unwrap()
        );
        // An IPv6 socket dialling a mapped address: still reached over IPv4.
        let dialled6 = orig("::ffff:198.18.255.1".parse().unwrap(), 443, AF_INET6);
        assert_eq!(
            orig_to_socket_addr(&dialled6),
            "198.18.255.1:443".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn v6_origins_come_back_as_v6() {
        let dialled = orig("fd76:6569:6c::1".parse().unwrap(), 8443, AF_INET6);
        assert_eq!(
            orig_to_socket_addr(&dialled),
            "[fd76:6569:6c::1]:8443".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn every_v4_address_round_trips_through_the_map_layout() {
        for ip in [
            Ipv4Addr::new(0, 0, 0, 1),
            Ipv4Addr::new(198, 18, 255, 1),
            Ipv4Addr::new(255, 255, 255, 255),
        ] {
            for port in [1u16, 80, 65535] {
                let dialled = SocketAddr::V4(SocketAddrV4::new(ip, port));
                let stored = orig(ip.to_ipv6_mapped(), port, AF_INET);
                assert_eq!(orig_to_socket_addr(&stored), dialled);
            }
        }
    }

    proptest! {
        #[test]
        fn v4_tuples_key_like_their_mapped_form(cookie: u64, ip: [u8; 4], port: u16, lport: u16) {
            let ip = Ipv4Addr::from(ip);
            let v4 = ConnTuple {
                netns_cookie: cookie,
                listener: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, lport)),
                peer: SocketAddr::V4(SocketAddrV4::new(ip, port)),
            };
            let v6 = ConnTuple {
                netns_cookie: cookie,
                listener: SocketAddr::V6(SocketAddrV6::new(
                    Ipv4Addr::LOCALHOST.to_ipv6_mapped(), lport, 0, 0)),
                peer: SocketAddr::V6(SocketAddrV6::new(ip.to_ipv6_mapped(), port, 0, 0)),
            };
            prop_assert_eq!(conn_key(&v4), conn_key(&v6));
            prop_assert_eq!(conn_key(&v4).client_addr, ipv6_words(ip.to_ipv6_mapped()));
        }

        #[test]
        fn origins_round_trip(octets: [u8; 16], port: u16) {
            let ip = Ipv6Addr::from(octets);
            let expected = match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
            };
            prop_assert_eq!(orig_to_socket_addr(&orig(ip, port, AF_INET6)), expected);
            prop_assert_eq!(words_to_ipv6(ipv6_words(ip)), ip);
        }
    }
}
