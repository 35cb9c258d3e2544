//! The "world": a network namespace for upstream servers, linked to the host (root) netns by a
//! veth pair, and optionally to sandbox namespaces by further veth pairs.
//!
//! Forwarding is never enabled anywhere: hosts and sandboxes reach addresses *of* the world
//! netns (its veth ends, where upstream servers bind), which needs no routing beyond the
//! connected /30 and /64 of each link.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::alloc::{self, Block};
use crate::cmd::{ip, try_run, wait_until};
use crate::netns::NetNs;
use crate::owner;

/// Prefix of the world's veth end in the root netns (the only harness interface there).
pub(crate) const HOST_IF_PREFIX: &str = "vh-";

/// Upstream namespace linked to the host netns; everything is removed on drop.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct World {
    // Field order is drop order: the netns (and with it every veth) goes before the blocks.
    ns: NetNs,
    host_if: String,
    world_if: String,
    block: Block,
    links: Mutex<Vec<Block>>,
}

/// Addresses of a sandbox netns linked to a world by [`World::link_sandbox`].
#[derive(Debug, Clone)]
pub struct SandboxLink {
    sandbox_v4: Ipv4Addr,
    world_v4: Ipv4Addr,
    sandbox_v6: Ipv6Addr,
    world_v6: Ipv6Addr,
    sandbox_if: String,
    world_if: String,
}

impl SandboxLink {
    /// The sandbox's IPv4 address on the link (what an upstream sees from a direct connection).
    pub fn sandbox_v4(&self) -> Ipv4Addr {
        self.sandbox_v4
    }

    /// The world side of the link (the sandbox's IPv4 default gateway).
    pub fn world_v4(&self) -> Ipv4Addr {
        self.world_v4
    }

    /// The sandbox's IPv6 address on the link.
    pub fn sandbox_v6(&self) -> Ipv6Addr {
        self.sandbox_v6
    }

    /// The world side of the link (the sandbox's IPv6 default gateway).
    pub fn world_v6(&self) -> Ipv6Addr {
        self.world_v6
    }

    /// Interface name inside the sandbox netns.
    pub fn sandbox_if(&self) -> &str {
        &self.sandbox_if
    }

    /// Interface name inside the world netns.
    pub fn world_if(&self) -> &str {
        &self.world_if
    }
}

fn if_name(prefix: &str, seq: u64) -> String {
    format!(
        "{prefix}{}-{}",
        owner::base36(u64::from(owner::pid())),
        owner::base36(seq)
    )
}

impl World {
    /// Creates the world netns and its veth link to the host netns, addresses from a fresh block.
    pub fn new() -> World {
        crate::stale::init();
        let ns = NetNs::new("world");
        let block = alloc::allocate();
        let seq = owner::next_seq();
        let host_if = if_name(HOST_IF_PREFIX, seq);
        let world_if = if_name("vw-", seq);
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            &world_if,
            "netns",
            ns.name(),
        ]);
        // From here on Drop removes the veth, the netns and the block, whatever fails next.
        let world = World {
            ns,
            host_if,
            world_if,
            block,
            links: Mutex::new(Vec::new()),
        };
        world.configure();
        world
    }

    fn configure(&self) {
        let host_if = self.host_if.as_str();
        let world_if = self.world_if.as_str();
        // The root netns may default to IPv6 off for new links; this one is ours.
        let sysctl = format!("/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6");
        if Path::new(&sysctl).exists() {
            std::fs::write(&sysctl, "0").unwrap_or_else(|e| panic!("writing {sysctl}: {e}"));
        }
        let (h4, w4) = (cidr4(self.block.v4(1)), cidr4(self.block.v4(2)));
        let (h6, w6) = (cidr6(self.block.v6(1)), cidr6(self.block.v6(2)));
        ip(&["addr", "add", &h4, "dev", host_if]);
        ip(&["-6", "addr", "add", &h6, "dev", host_if, "nodad"]);
        ip(&["link", "set", host_if, "up"]);
        self.ns.ip(&["addr", "add", &w4, "dev", world_if]);
        self.ns
            .ip(&["-6", "addr", "add", &w6, "dev", world_if, "nodad"]);
        self.ns.ip(&["link", "set", world_if, "up"]);
        wait_link_ready(None, host_if, self.block.v6(1));
        wait_link_ready(Some(&self.ns), world_if, self.block.v6(2));
    }

    /// The world's namespace (start upstream servers in it).
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    /// The host netns end of the link.
    pub fn host_v4(&self) -> Ipv4Addr {
        self.block.v4(1)
    }

    /// The world end of the link: bind upstream servers here; reachable from the host netns.
    pub fn upstream_v4(&self) -> Ipv4Addr {
        self.block.v4(2)
    }

    /// The host netns end of the link (IPv6).
    pub fn host_v6(&self) -> Ipv6Addr {
        self.block.v6(1)
    }

    /// The world end of the link (IPv6), usable at once (no DAD).
    pub fn upstream_v6(&self) -> Ipv6Addr {
        self.block.v6(2)
    }

    /// [`World::upstream_v4`] as an `IpAddr`.
    pub fn upstream_ip4(&self) -> IpAddr {
        IpAddr::V4(self.upstream_v4())
    }

    /// [`World::upstream_v6`] as an `IpAddr`.
    pub fn upstream_ip6(&self) -> IpAddr {
        IpAddr::V6(self.upstream_v6())
    }

    /// Index of the world's own address block (see [`crate::alloc`]).
    pub fn block_index(&self) -> u32 {
        self.block.index()
    }

    /// Name of the world's veth end in the root netns.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Links a sandbox netns to this world with a veth pair on a block of its own; the
    /// sandbox gets default routes (v4 and v6) via the world side, so processes there that are
    /// not redirected reach upstream servers directly. Removed with the world (or the sandbox
    /// netns, whichever goes first).
    pub fn link_sandbox(&self, sandbox: &NetNs) -> SandboxLink {
        let block = alloc::allocate();
        let seq = owner::next_seq();
        let link = SandboxLink {
            sandbox_v4: block.v4(2),
            world_v4: block.v4(1),
            sandbox_v6: block.v6(2),
            world_v6: block.v6(1),
            sandbox_if: if_name("vx-", seq),
            world_if: if_name("vs-", seq),
        };
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(block);
        self.ns.ip(&[
            "link",
            "add",
            &link.world_if,
            "type",
            "veth",
            "peer",
            "name",
            &link.sandbox_if,
            "netns",
            sandbox.name(),
        ]);
        let (w4, s4) = (cidr4(link.world_v4), cidr4(link.sandbox_v4));
        let (w6, s6) = (cidr6(link.world_v6), cidr6(link.sandbox_v6));
        self.ns.ip(&["addr", "add", &w4, "dev", &link.world_if]);
        self.ns
            .ip(&["-6", "addr", "add", &w6, "dev", &link.world_if, "nodad"]);
        self.ns.ip(&["link", "set", &link.world_if, "up"]);
        sandbox.ip(&["addr", "add", &s4, "dev", &link.sandbox_if]);
        sandbox.ip(&["-6", "addr", "add", &s6, "dev", &link.sandbox_if, "nodad"]);
        sandbox.ip(&["link", "set", &link.sandbox_if, "up"]);
        wait_link_ready(Some(&self.ns), &link.world_if, link.world_v6);
        wait_link_ready(Some(sandbox), &link.sandbox_if, link.sandbox_v6);
        sandbox.ip(&["route", "add", "default", "via", &link.world_v4.to_string()]);
        sandbox.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &link.world_v6.to_string(),
            "dev",
            &link.sandbox_if,
        ]);
        link
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; do it explicitly so the root netns is clean even
        // if the netns deletion below were to fail.
        if let Err(e) = try_run("ip", &["link", "del", &self.host_if]) {
            eprintln!("veil-tests: {e}");
        }
    }
}

fn cidr4(a: Ipv4Addr) -> String {
    format!("{a}/30")
}

fn cidr6(a: Ipv6Addr) -> String {
    format!("{a}/64")
}

/// Waits (≤ 5 s) until the link is operationally up (its qdisc is active only from then on)
/// and `addr6` is not tentative. The kernel's own link-local address may still be doing DAD;
/// nothing here uses it.
fn wait_link_ready(ns: Option<&NetNs>, dev: &str, addr6: Ipv6Addr) {
    let run = |args: &[&str]| -> String {
        match ns {
            Some(ns) => ns.ip(args),
            None => ip(args),
        }
    };
    let needle = format!(" {addr6}/");
    let ready = wait_until(Duration::from_secs(5), || {
        let link = run(&["-o", "link", "show", "dev", dev]);
        let tentative = run(&["-6", "-o", "addr", "show", "dev", dev, "tentative"]);
        link.contains("state UP") && !tentative.contains(&needle)
    });
    assert!(
        ready,
        "link {dev} (netns {}) not up within 5 s: {}",
        ns.map_or("host", |n| n.name()),
        run(&["addr", "show", "dev", dev])
    );
}
