//! Egress modes as tests register sandboxes: the `egress` a runner would choose for a netns,
//! and helpers for the egress tests (firewall rules inside a netns, link-local addresses).
//!
//! A sandbox netns with a default route (linked to the world by [`crate::World::link_sandbox`],
//! like a container with its own network) keeps `"sandbox"`: veil opens its connections inside
//! it. One with no route out can only get out through veil, which is what `veil-control run
//! --netns` makes and registers as `"host"`; the fixtures do the same unless a test names the
//! mode ([`crate::AgentSandbox::with_egress`]).
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use crate::cmd::{ip, try_run};
use crate::netns::NetNs;
use crate::world::World;

/// `egress: "sandbox"`: connections leave from the sandbox's own netns.
pub const SANDBOX: &str = "sandbox";
/// `egress: "host"`: connections leave from the host through the agent's egress rules.
pub const HOST: &str = "host";
/// The test world's IPv6 addresses ([`crate::alloc`]): unique local addresses, which `"host"`
/// egress refuses by default, standing for public ones; test agents allow them.
pub const WORLD_V6: &str = "fd76:6569:6c::/48";

/// The egress a runner would register for a sandbox in `netns` (see the module docs).
pub fn for_netns(netns: Option<&Path>) -> &'static str {
    match netns {
        Some(path) if !has_default_route(path) => HOST,
        _ => SANDBOX,
    }
}

/// [`for_netns`] as the link protocol's type (for tests that speak to the agent directly).
pub fn link_egress(netns: Option<&Path>) -> veil_link::Egress {
    if for_netns(netns) == HOST {
        veil_link::Egress::Host
    } else {
        veil_link::Egress::Sandbox
    }
}

/// Whether the netns at `path` has an IPv4 or IPv6 default route.
pub fn has_default_route(path: &Path) -> bool {
    let net = format!("--net={}", path.display());
    ["-4", "-6"].iter().any(|family| {
        let out = try_run(
            "nsenter",
            &[&net, "ip", family, "-o", "route", "show", "default"],
        )
        .unwrap_or_else(|e| panic!("reading the routes of {}: {e}", path.display()));
        !out.trim().is_empty()
    })
}

/// Drops, inside `ns`, every TCP packet the netns sends to one of `dsts` (an nftables table of
/// its own, removed with the netns): the sandbox's own firewall refusing those destinations.
pub fn drop_tcp_to(ns: &NetNs, dsts: &[SocketAddr]) {
    let rules: String = dsts
        .iter()
        .map(|d| {
            format!(
                "    {} daddr {} tcp dport {} drop\n",
                family(d.ip()),
                d.ip(),
                d.port()
            )
        })
        .collect();
    nft(
        ns,
        &format!(
            "table inet veil_test_drop {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n{rules}  }}\n}}\n"
        ),
    );
}

/// Counters of TCP packets that arrive in a netns from one source to one destination (an
/// nftables table of its own, removed with the netns): who an upstream really hears from.
#[derive(Debug)]
pub struct PacketCounters {
    net: String,
}

const COUNT_TABLE: &str = "veil_test_count";

impl PacketCounters {
    /// Counts, in `ns`, TCP packets from `src` to `dst` under each `name`.
    pub fn install(ns: &NetNs, counters: &[(&str, IpAddr, SocketAddr)]) -> PacketCounters {
        let mut text = format!("table inet {COUNT_TABLE} {{\n");
        for (name, _, _) in counters {
            text.push_str(&format!("  counter {name} {{ }}\n"));
        }
        text.push_str("  chain in {\n    type filter hook input priority 0; policy accept;\n");
        for (name, src, dst) in counters {
            text.push_str(&format!(
                "    {f} saddr {src} {f} daddr {} tcp dport {} counter name {name}\n",
                dst.ip(),
                dst.port(),
                f = family(*src)
            ));
        }
        text.push_str("  }\n}\n");
        nft(ns, &text);
        PacketCounters {
            net: format!("--net={}", ns.path().display()),
        }
    }

    /// Packets counted under `name` so far.
    pub fn packets(&self, name: &str) -> u64 {
        let out = try_run(
            "nsenter",
            &[
                &self.net,
                "nft",
                "list",
                "counter",
                "inet",
                COUNT_TABLE,
                name,
            ],
        )
        .unwrap_or_else(|e| panic!("reading counter {name}: {e}"));
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {out:?}"))
    }
}

/// A link-local address (169.254.0.0/16, the range of cloud metadata services) on the world's
/// loopback, routed from the host netns through the world's link, as a metadata service is
/// reachable from a cloud host. The host route goes on drop (and with the world's veth).
#[derive(Debug)]
pub struct LinkLocal {
    ip: Ipv4Addr,
    host_if: String,
}

impl LinkLocal {
    /// Adds one, unique to `world`'s address block (never 169.254.169.254 itself).
    pub fn add(world: &World) -> LinkLocal {
        let index = world.block_index();
        let third = 128 + u8::try_from((index >> 8) & 0x7f).unwrap_or(0);
        let fourth = u8::try_from(index & 0xff).unwrap_or(1);
        let ll = LinkLocal {
            ip: Ipv4Addr::new(169, 254, third, fourth),
            host_if: world.host_if().to_owned(),
        };
        let cidr = format!("{}/32", ll.ip);
        world.netns().ip(&["addr", "add", &cidr, "dev", "lo"]);
        ip(&[
            "route",
            "add",
            &cidr,
            "via",
            &world.upstream_v4().to_string(),
            "dev",
            &ll.host_if,
        ]);
        ll
    }

    /// The address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

impl Drop for LinkLocal {
    fn drop(&mut self) {
        // Gone already if the world's veth went first.
        let _ = try_run(
            "ip",
            &[
                "route",
                "del",
                &format!("{}/32", self.ip),
                "dev",
                &self.host_if,
            ],
        );
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

/// Loads nftables `rules` inside `ns`.
fn nft(ns: &NetNs, rules: &str) {
    let dir = tempfile::Builder::new()
        .prefix(&crate::owner::tempdir_prefix())
        .tempdir()
        .unwrap_or_else(|e| panic!("temp dir: {e}"));
    let file = dir.path().join("rules.nft");
    std::fs::write(&file, rules).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    let net = format!("--net={}", ns.path().display());
    let file = file.to_string_lossy().into_owned();
    try_run("nsenter", &[&net, "nft", "-f", &file])
        .unwrap_or_else(|e| panic!("nft in {}: {e} (is nftables installed?)", ns.name()));
}
