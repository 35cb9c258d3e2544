//! veil's own listeners — control's REST and metrics, the agent's metrics — out of every
//! sandbox's reach, whatever netns it is in.
//!
//! Control names its listen addresses over the link (`Snapshot.guarded`); the agent adds its
//! own. Each becomes connect-guard rules (`VEIL_GUARDED`, refused by connect4/6) and a
//! bind-guard port in the host netns (`VEIL_LISTENERS`, owner [`OWNER_VEIL`]: no sandbox may
//! stand in for a listener that is down):
//! - a loopback address is guarded for sockets in the host's netns only (a sandbox with its own
//!   netns has its own 127.0.0.1);
//! - an unspecified address (`0.0.0.0`, `::`) means that port on every local destination of
//!   the host netns plus every address of the host, from every netns;
//! - any other address is guarded from every netns.
//!
//! The host's addresses are re-read whenever the kernel announces an address change
//! (rtnetlink), and every [`REFRESH`] in any case. The rules live in pinned maps, so they hold
//! while the agent is down; until control's first snapshot after a start, rules are only added,
//! never removed (control's listeners are known from the previous run).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use proxy_common::{GUARD_ANY_LOCAL, GuardKey, OWNER_VEIL, PortKey};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::bpf::origin::ipv6_words;
use crate::bpf::{BpfError, GuardTable, PortTable, port_key};
use crate::pins::PinLayout;

/// How often the host's addresses are re-read without an announced change.
pub const REFRESH: Duration = Duration::from_secs(30);

/// The rules guarding a set of listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Connect-guard rules.
    pub connect: BTreeSet<GuardKey>,
    /// Ports no sandbox may bind (in the host netns).
    pub bind: BTreeSet<PortKey>,
}

fn guard_key(netns_cookie: u64, ip: IpAddr, port: u16) -> GuardKey {
    let v6 = match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    GuardKey {
        netns_cookie,
        addr: ipv6_words(v6),
        port,
        _pad: [0; 6],
    }
}

/// The rules for `listeners`, given the host's addresses and its netns cookie.
pub fn rules(listeners: &[SocketAddr], host: &BTreeSet<IpAddr>, host_cookie: u64) -> Rules {
    let mut out = Rules::default();
    for listener in listeners {
        let (ip, port) = (listener.ip().to_canonical(), listener.port());
        if port == 0 {
            continue;
        }
        out.bind.insert(port_key(host_cookie, port));
        if ip.is_unspecified() {
            out.connect.insert(GuardKey {
                netns_cookie: host_cookie,
                addr: GUARD_ANY_LOCAL,
                port,
                _pad: [0; 6],
            });
            // `::` also accepts IPv4 unless the socket is IPv6-only; guard both to be sure.
            let families_match = |a: &IpAddr| ip.is_ipv6() || a.is_ipv4();
            for a in host.iter().map(IpAddr::to_canonical).filter(families_match) {
                if !a.is_loopback() {
                    out.connect.insert(guard_key(0, a, port));
                }
            }
        } else if ip.is_loopback() {
            out.connect.insert(guard_key(host_cookie, ip, port));
        } else {
            out.connect.insert(guard_key(0, ip, port));
        }
    }
    out
}

/// Tells the guard task what control listens on.
#[derive(Debug, Clone)]
pub struct GuardHandle {
    tx: watch::Sender<Option<Vec<SocketAddr>>>,
}

impl GuardHandle {
    /// Control's listen addresses, from its latest snapshot.
    pub fn set_control(&self, listeners: Vec<SocketAddr>) {
        self.tx.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&listeners);
            *current = Some(listeners);
            changed
        });
    }
}

/// Why the guard could not start.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// A pinned map could not be opened.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// The agent's own netns cookie could not be read.
    #[error("reading the host netns cookie: {0}")]
    Cookie(std::io::Error),
}

/// The maps the guard writes and what it keeps between refreshes.
struct Guard {
    connect: GuardTable,
    bind: PortTable,
    host_cookie: u64,
    own: Vec<SocketAddr>,
    host: BTreeSet<IpAddr>,
    applied: Option<Rules>,
}

impl Guard {
    /// Applies the rules for control's `listeners` (`None`: not known yet this run) and the
    /// agent's own.
    fn apply(&mut self, control: Option<&[SocketAddr]>) -> Result<(), BpfError> {
        match crate::hostaddrs::host_addresses() {
            Ok(host) => self.host = host,
            Err(e) => {
                warn!(error = %e, "reading the host's addresses failed; keeping the last ones")
            }
        }
        let mut listeners = self.own.clone();
        listeners.extend(control.unwrap_or_default());
        let mut wanted = rules(&listeners, &self.host, self.host_cookie);
        if control.is_none() {
            // What the previous run guarded stays until control says otherwise.
            wanted.connect.extend(self.connect.keys());
            wanted.bind.extend(
                self.bind
                    .entries()
                    .into_iter()
                    .filter(|(_, owner)| *owner == OWNER_VEIL)
                    .map(|(k, _)| k),
            );
        }
        if self.applied.as_ref() == Some(&wanted)
            || (self.applied.is_none()
                && wanted == Rules::default()
                && self.connect.keys().is_empty())
        {
            self.applied = Some(wanted);
            return Ok(());
        }
        self.connect.set(&wanted.connect)?;
        self.bind.set_owned(OWNER_VEIL, &wanted.bind)?;
        info!(
            listeners = listeners.len(),
            connect_rules = wanted.connect.len(),
            ports = wanted.bind.len(),
            "veil's own listeners guarded"
        );
        self.applied = Some(wanted);
        Ok(())
    }
}

/// Starts the task that keeps the guard maps in line with `own` (the agent's listeners),
/// control's listeners and the host's addresses. Must run inside the tokio runtime.
pub fn spawn(pins: &PinLayout, own: Vec<SocketAddr>) -> Result<GuardHandle, GuardError> {
    let mut guard = Guard {
        connect: GuardTable::open(&pins.map(proxy_common::MAP_GUARDED))?,
        bind: PortTable::open(&pins.map(proxy_common::MAP_LISTENERS))?,
        host_cookie: crate::bpf::own_netns_cookie().map_err(GuardError::Cookie)?,
        own,
        host: BTreeSet::new(),
        applied: None,
    };
    let (tx, mut rx) = watch::channel(None::<Vec<SocketAddr>>);
    // Subscribed before the first read, so no change slips between the two.
    let changes = match AddressChanges::subscribe() {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(error = %e, "cannot follow the host's address changes; re-reading them every {}s", REFRESH.as_secs());
            None
        }
    };
    // The agent's own listeners are guarded before the function returns.
    if let Err(e) = guard.apply(None) {
        warn!(error = %e, "guarding veil's own listeners failed");
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
                () = AddressChanges::next(changes.as_ref()) => {}
            }
            let control = rx.borrow_and_update().clone();
            if let Err(e) = guard.apply(control.as_deref()) {
                warn!(error = %e, "guarding veil's own listeners failed");
            }
        }
    });
    Ok(GuardHandle { tx })
}

/// Notifications of address changes on the host (an rtnetlink socket subscribed to the IPv4
/// and IPv6 address groups); their content does not matter, only that something changed.
struct AddressChanges {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl AddressChanges {
    fn subscribe() -> std::io::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
        };
        use std::os::fd::AsRawFd as _;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        // SAFETY: an OwnedFd returns the descriptor it owns, which stays open until the
        // AsyncFd (its owner from here on) drops it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(Self { fd })
    }

    /// Resolves once a change was announced (never, without a subscription).
    async fn next(changes: Option<&Self>) {
        let Some(changes) = changes else {
            return std::future::pending().await;
        };
        loop {
            let Ok(mut guard) = changes.fd.readable().await else {
                return std::future::pending().await;
            };
            let mut buf = [0u8; 8192];
            let mut any = false;
            // Drain everything queued: one refresh covers a burst of changes.
            loop {
                match nix::unistd::read(changes.fd.get_ref(), &mut buf) {
                    Ok(n) if n > 0 => any = true,
                    // ENOBUFS: notifications were lost; a refresh covers them too.
                    Err(nix::errno::Errno::ENOBUFS) => any = true,
                    _ => break,
                }
            }
            guard.clear_ready();
            if any {
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests may unwrap")]
mod tests {
    use super::*;

    const HOST: u64 = 77;

    fn host() -> BTreeSet<IpAddr> {
        ["127.0.0.1", "::1", "10.1.2.3", "fd00::5"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    }

    fn key(netns: u64, addr: &str, port: u16) -> GuardKey {
        guard_key(netns, addr.parse().unwrap(), port)
    }

    fn any_local(port: u16) -> GuardKey {
        GuardKey {
            netns_cookie: HOST,
            addr: GUARD_ANY_LOCAL,
            port,
            _pad: [0; 6],
        }
    }

    #[test]
    fn loopback_is_guarded_in_the_host_netns_only() {
        let r = rules(&["127.0.0.1:3900".parse().unwrap()], &host(), HOST);
        assert_eq!(r.connect, [key(HOST, "127.0.0.1", 3900)].into());
        assert_eq!(r.bind, [port_key(HOST, 3900)].into());
        let r = rules(&["[::1]:9465".parse().unwrap()], &host(), HOST);
        assert_eq!(r.connect, [key(HOST, "::1", 9465)].into());
    }

    #[test]
    fn an_unspecified_address_means_every_host_address() {
        let r = rules(&["0.0.0.0:9464".parse().unwrap()], &host(), HOST);
        assert_eq!(
            r.connect,
            [any_local(9464), key(0, "10.1.2.3", 9464)].into(),
            "IPv4 host addresses from everywhere, every local destination in the host netns"
        );
        let r = rules(&["[::]:9464".parse().unwrap()], &host(), HOST);
        assert_eq!(
            r.connect,
            [
                any_local(9464),
                key(0, "10.1.2.3", 9464),
                key(0, "fd00::5", 9464)
            ]
            .into()
        );
    }

    #[test]
    fn a_specific_host_address_is_guarded_from_every_netns() {
        let r = rules(&["10.1.2.3:3900".parse().unwrap()], &host(), HOST);
        assert_eq!(r.connect, [key(0, "10.1.2.3", 3900)].into());
        assert_eq!(r.bind, [port_key(HOST, 3900)].into());
    }

    #[test]
    fn mapped_addresses_are_stored_like_ipv4_and_port_zero_is_skipped() {
        let mapped = rules(&["[::ffff:10.1.2.3]:80".parse().unwrap()], &host(), HOST);
        let v4 = rules(&["10.1.2.3:80".parse().unwrap()], &host(), HOST);
        assert_eq!(mapped, v4);
        assert_eq!(
            v4.connect.first().unwrap().addr,
            ipv6_words("::ffff:10.1.2.3".parse().unwrap())
        );
        assert_eq!(
            rules(&["127.0.0.1:0".parse().unwrap()], &host(), HOST),
            Rules::default()
        );
    }
}
