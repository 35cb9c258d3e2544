//! A veth pair between the host (root) netns and a sandbox netns, with a default route from the
//! sandbox to the host: a container whose network reaches the host's own addresses, as a bridge
//! network does. The host end is removed on drop (which removes the pair).
use std::net::Ipv4Addr;

use crate::alloc::{self, Block};
use crate::cmd::{ip, try_run};
use crate::netns::NetNs;
use crate::owner;

/// Prefix of the host end: the one [`crate::world`] uses, so stale ones are cleaned up alike.
const HOST_IF_PREFIX: &str = "vh-";

/// The link; its host-side address is a host address like any other.
#[must_use = "dropping it removes it at once"]
#[derive(Debug)]
pub struct HostLink {
    host_if: String,
    block: Block,
}

impl HostLink {
    /// Links `sandbox` to the host netns on a fresh address block.
    pub fn new(sandbox: &NetNs) -> HostLink {
        crate::stale::init();
        let block = alloc::allocate();
        let seq = owner::next_seq();
        let pid = owner::base36(u64::from(owner::pid()));
        let host_if = format!("{HOST_IF_PREFIX}{pid}-{}", owner::base36(seq));
        let sandbox_if = format!("vk-{pid}-{}", owner::base36(seq));
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            &sandbox_if,
            "netns",
            sandbox.name(),
        ]);
        let link = HostLink { host_if, block };
        let (h, s) = (link.host_v4(), link.sandbox_v4());
        ip(&["addr", "add", &format!("{h}/30"), "dev", &link.host_if]);
        ip(&["link", "set", &link.host_if, "up"]);
        sandbox.ip(&["addr", "add", &format!("{s}/30"), "dev", &sandbox_if]);
        sandbox.ip(&["link", "set", &sandbox_if, "up"]);
        sandbox.ip(&["route", "add", "default", "via", &h.to_string()]);
        link
    }

    /// The host's address on the link.
    pub fn host_v4(&self) -> Ipv4Addr {
        self.block.v4(1)
    }

    /// The sandbox's address on the link.
    pub fn sandbox_v4(&self) -> Ipv4Addr {
        self.block.v4(2)
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        if let Err(e) = try_run("ip", &["link", "del", &self.host_if]) {
            eprintln!("veil-tests: {e}");
        }
    }
}
